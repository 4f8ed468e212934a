"""Reading NIfTI volumes, with every way a file can be bad turned into one `DataError` line that names it."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

from autosam_jax.data.errors import DataError
from autosam_jax.memory import size_text

SPACING_RANGE_VARIABLE = "AUTOSAM_JAX_SPACING_RANGE"
# Voxel spacings (mm) seen in medical images lie well inside this range; a value outside it is almost always a unit
# error (micrometres or metres stored as millimetres), and resampling such a volume to a millimetre grid would need
# terabytes. AUTOSAM_JAX_SPACING_RANGE="LOW,HIGH" (mm) replaces it for data that really is that fine or coarse.
DEFAULT_SPACING_RANGE = (0.01, 50.0)
# Deflate cannot compress by more than about 1032:1, so a .nii.gz cannot hold more than this many times its own size.
_GZIP_MAX_RATIO = 1100


@dataclasses.dataclass(frozen=True)
class NiftiVolume:
  """A 3D volume as stored: axes (X, Y, Z) in voxel order, slices along Z."""
  data: np.ndarray  # float32 for images (scaling applied), uint8 for labels
  affine: np.ndarray  # (4, 4) float64 voxel -> scanner space in the header's unit (sform if set, else qform)
  spacing: tuple[float, float, float]  # mm: the affine's voxel size (sform) or pixdim, by xyzt_units
  header: nib.Nifti1Header
  path: Path

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(int(n) for n in self.data.shape)


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def spacing_range() -> tuple[float, float]:
  """The plausible voxel spacing range (low, high) in mm, both inclusive: `DEFAULT_SPACING_RANGE` unless the
  environment variable AUTOSAM_JAX_SPACING_RANGE="LOW,HIGH" sets another; `DataError` when its value is malformed."""
  text = os.environ.get(SPACING_RANGE_VARIABLE, "")
  if not text.strip():
    return DEFAULT_SPACING_RANGE
  try:
    low, high = (float(part) for part in text.split(","))
  except ValueError:
    low = high = math.nan
  if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
    raise DataError(f"{SPACING_RANGE_VARIABLE}: {text!r} is not 'LOW,HIGH' in mm with 0 < LOW < HIGH (e.g. "
                    f"'0.01,50'); fix or unset the variable")
  return low, high


class _DropPixdimNotes(logging.Filter):
  """nibabel logs that it replaced a zero or negative pixdim while loading; `_spacing` refuses those files itself."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "pixdim" not in record.getMessage()


def _nib_load(path: Path) -> nib.filebasedimages.FileBasedImage:
  quiet, logger = _DropPixdimNotes(), logging.getLogger("nibabel.global")
  logger.addFilter(quiet)
  try:
    return nib.load(str(path), mmap=False)
  finally:
    logger.removeFilter(quiet)


def _load(path: Path, as_float: bool) -> tuple[nib.Nifti1Image, nib.Nifti1Header, np.ndarray]:
  """The image, its header as stored on disk (see `_stored_header`) and its voxels."""
  if not path.exists():
    raise DataError(f"{path}: file not found; check the path (a .nii.gz image, or its label *_gt.nii.gz)")
  if not path.is_file():
    raise DataError(f"{path}: is a folder, not a NIfTI file; pass the .nii or .nii.gz file itself")
  try:
    # mmap=False and reading the array here, not lazily later: a truncated or corrupt file must fail now, with its name.
    image = _nib_load(path)
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
      raise DataError(f"{path}: is a {type(image).__name__}, not NIfTI; convert it to .nii.gz")
    header = _stored_header(path, image)
    # Before the voxels are read: nibabel allocates the array the header describes, whatever the file holds.
    dims, dtype, num_bytes = _check_header(path, header)
    _check_data_size(path, dims, dtype, int(getattr(image.dataobj, "offset", header.get_data_offset())), num_bytes)
    data = image.get_fdata(dtype=np.float32) if as_float else np.asanyarray(image.dataobj)
    if path.name.endswith(".gz"):
      _check_gzip_stream(path)
  except DataError:
    raise
  # nibabel and the gzip/zlib layers raise many unrelated types for a bad file (OSError, EOFError, zlib.error,
  # ImageFileError, HeaderDataError, ValueError, struct.error ...); all of them mean the same thing to the user.
  except Exception as err:  # noqa: BLE001
    kind = type(err).__name__
    if kind == "error":  # zlib.error, struct.error: the bare name says nothing
      kind = f"{type(err).__module__}.{kind}"
    raise DataError(f"{path}: cannot read NIfTI ({kind}: {_one_line(err)}); the file is truncated or corrupt, copy or "
                    "export it again") from err
  return image, header, data


def _stored_header(path: Path, image: nib.Nifti1Image) -> nib.Nifti1Header:
  """The header exactly as stored. The one nibabel loads has been repaired: a zero pixdim reads as 1 and a negative
  one as its absolute value, which would hide a broken spacing."""
  with nib.openers.ImageOpener(str(path)) as stream:
    return type(image.header).from_fileobj(stream, check=False)


def _check_header(path: Path, header: nib.Nifti1Header) -> tuple[list[int], np.dtype, int]:
  """The stored dims, the voxel dtype and the bytes of voxel data the header asks for; `DataError` for dims that are
  not positive and for voxel types that are not one real number per voxel."""
  dtype = header.get_data_dtype()
  if dtype.kind == "c":
    raise DataError(f"{path}: voxels are complex-valued ({dtype.name}); save a real-valued volume (e.g. the magnitude) "
                    "as float32 or int16")
  if dtype.fields is not None or dtype.kind not in "biuf":
    kind = "".join(dtype.names) if dtype.names and set(dtype.names) <= set("RGBA") else str(dtype)
    raise DataError(f"{path}: voxels are {kind} ({dtype.itemsize} bytes each), not one number per voxel; save a "
                    "single-channel (grayscale) volume")
  ndim = int(header["dim"][0])
  if not 1 <= ndim <= 7:
    raise DataError(f"{path}: header dim[0] is {ndim}, not a number of dimensions (1-7); the header is corrupt, "
                    "export the file again")
  dims = [int(d) for d in header["dim"][1:ndim + 1]]
  if min(dims) <= 0:
    raise DataError(f"{path}: header dims {'x'.join(map(str, dims))} include a zero or negative size; the header is "
                    "corrupt, export the file again")
  return dims, dtype, math.prod(dims) * dtype.itemsize


def _check_data_size(path: Path, dims: list[int], dtype: np.dtype, offset: int, num_bytes: int) -> None:
  """`DataError` when the file holds fewer than `offset + num_bytes` bytes (after decompression); allocates nothing
  of that size."""
  needed = offset + num_bytes
  name = path.name.lower()
  if name.endswith(".gz"):
    held = _gzip_size(path, needed)
  elif name.endswith(".nii"):
    held = path.stat().st_size
  else:  # other compressions nibabel opens (.bz2, .zst): no size on record, count by decompressing
    held = _streamed_size(path, needed + 1)
  if held < needed:
    raise DataError(f"{path}: header says {'x'.join(map(str, dims))} {dtype.name} ({size_text(num_bytes)}) but the "
                    f"file holds {size_text(max(held - offset, 0))} of voxel data; the file is truncated or its header "
                    "is wrong, export it again")


def _gzip_size(path: Path, needed: int) -> int:
  """The uncompressed size of a gzip file when it is at least `needed`, else (at most `needed + 1`) counted.

  The last member's trailer records its size mod 2**32 (ISIZE). When that alone is at least `needed`, the file holds
  enough, whether it has one member or several. Otherwise (a short file, a size of 4 GiB or more, several members, or
  a damaged trailer) the stream is decompressed and counted, up to `needed + 1` bytes and in chunks. A trailer
  promising more than deflate can expand the file to is not trusted either."""
  size = path.stat().st_size
  if needed < 2**32 and needed <= _GZIP_MAX_RATIO * size and size >= 18:  # 18: the smallest gzip member
    with open(path, "rb") as stream:
      stream.seek(-4, os.SEEK_END)
      if int.from_bytes(stream.read(4), "little") >= needed:
        return needed
  return _streamed_size(path, needed + 1)


def _streamed_size(path: Path, limit: int) -> int:
  """Decompressed bytes of `path`, counted up to `limit` in chunks of at most 1 MiB."""
  count = 0
  with nib.openers.ImageOpener(str(path)) as stream:
    while count < limit:
      chunk = stream.read(min(1 << 20, limit - count))
      if not chunk:
        break
      count += len(chunk)
  return count


def _check_gzip_stream(path: Path) -> None:
  """Reads the whole gzip stream to its end, where gzip checks the CRC and length of the data. nibabel reads only the
  bytes the header asks for, so damaged deflate data can decode into wrong voxels without an error."""
  import gzip

  with gzip.open(path, "rb") as stream:
    while stream.read(1 << 24):
      pass


def _as_3d(path: Path, data: np.ndarray) -> np.ndarray:
  # Trailing singleton dimensions (X, Y, Z, 1) are common in exports and hold the same volume.
  shape = data.shape
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    hint = ("it looks like a cine or multi-channel series; pass one 3D frame (ACDC's *_4d.nii.gz is not a labeled "
            "frame)" if data.ndim > 3 else "store it as a 3D volume (X, Y, slices)")
    raise DataError(f"{path}: {len(shape)}D volume of shape {shape} where a 3D volume is expected; {hint}")
  return data


# NIfTI's xyzt_units, its low three bits: the unit of pixdim[1:4] and of the affine. 0 ("unknown") is what many tools
# write for millimetres, and what nnU-Net and ITK read as millimetres.
SPACE_UNITS = {0: ("unknown", 1.0), 1: ("m", 1000.0), 2: ("mm", 1.0), 3: ("micron", 1e-3)}
# pixdim and the sform's voxel size are float32 copies of one number when a header is sound; beyond this relative
# difference one of them is wrong, and which one the scanner meant cannot be told.
PIXDIM_AFFINE_TOLERANCE = 1e-3


def _affine_source(header: nib.Nifti1Header) -> str:
  """Which of the header's geometries nibabel's `image.affine` is: "sform", "qform" or "pixdim" (neither code set)."""
  if int(header["sform_code"]) > 0:
    return "sform"
  return "qform" if int(header["qform_code"]) > 0 else "pixdim"


def _space_unit(path: Path, header: nib.Nifti1Header) -> tuple[str, float]:
  """(unit name, millimetres per unit) of the header's spatial unit code; `DataError` for a code NIfTI does not
  define."""
  code = int(header["xyzt_units"]) & 0x07
  if code not in SPACE_UNITS:
    raise DataError(f"{path}: xyzt_units gives the spatial unit code {code}, which NIfTI does not define (0 unknown, "
                    "1 metre, 2 mm, 3 micron); fix xyzt_units in the NIfTI header (2 for mm)")
  return SPACE_UNITS[code]


def _spacing(path: Path, header: nib.Nifti1Header, affine: np.ndarray) -> tuple[float, float, float]:
  """The voxel spacing in mm of the three spatial axes, from the geometry nibabel's `affine` was made of: the sform's
  column lengths when the sform is set (a zero pixdim there is only unset), else the pixdims; converted from the
  header's unit (xyzt_units) to mm. `DataError` when a pixdim is negative or not finite, when pixdim and the sform
  disagree, for an unknown unit code, and unless each spacing lies within `spacing_range()`."""
  pixdim = tuple(float(p) for p in header["pixdim"][1:4])
  unit, to_mm = _space_unit(path, header)
  source = _affine_source(header)

  def shown(values) -> str:
    return "(" + ", ".join(f"{s:.6g}" for s in values) + ")"

  valid = [math.isfinite(s) and s > 0 for s in pixdim]
  if source == "sform" and all(math.isfinite(s) and s >= 0 for s in pixdim):
    columns = np.asarray(affine, np.float64)[:3, :3]
    spacing = tuple(float(n) for n in np.linalg.norm(columns, axis=0))
    if not all(math.isfinite(s) and s > 0 for s in spacing):
      raise DataError(f"{path}: the sform's voxel size {shown(spacing)} is not three positive numbers; fix the sform "
                      "(srow_x/y/z) in the NIfTI header")
    for axis, (set_value, from_affine) in enumerate(zip(pixdim, spacing)):
      if valid[axis] and abs(set_value - from_affine) > PIXDIM_AFFINE_TOLERANCE * max(set_value, from_affine):
        raise DataError(f"{path}: pixdim {shown(pixdim)} and the sform's voxel size {shown(spacing)} disagree (axis "
                        f"{axis}); one of them is wrong: fix pixdim or the sform in the NIfTI header so both give "
                        "the voxel size")
    # where both are set they agree, and pixdim is the number as written (the sform's column length carries rounding)
    spacing = tuple(set_value if valid[axis] else from_affine
                    for axis, (set_value, from_affine) in enumerate(zip(pixdim, spacing)))
  elif not all(valid):
    raise DataError(f"{path}: voxel spacing {shown(pixdim)} is not three positive numbers; fix pixdim in the NIfTI "
                    "header (the voxel size in mm)")
  else:
    spacing = pixdim
  spacing = tuple(s * to_mm for s in spacing)
  low, high = spacing_range()
  # pixdims are float32: a spacing of exactly 0.01 mm is stored as 0.0099999998.
  if not all(low * (1 - 1e-6) <= s <= high * (1 + 1e-6) for s in spacing):
    unit_text = "" if to_mm == 1.0 else f" (from {unit} by xyzt_units)"
    raise DataError(f"{path}: voxel spacing {shown(spacing)} mm{unit_text} is outside the plausible {low:g}-{high:g} "
                    f"mm range (micrometres or metres stored as mm?); fix pixdim or xyzt_units in the NIfTI header, "
                    f"or if it is right set {SPACING_RANGE_VARIABLE}=LOW,HIGH (mm) to a range that holds it")
  return spacing


def _check_finite(path: Path, data: np.ndarray) -> None:
  if np.issubdtype(data.dtype, np.floating):
    finite = np.isfinite(data)
    if not finite.all():
      bad = np.argwhere(~finite)
      first = tuple(int(i) for i in bad[0])
      raise DataError(f"{path}: {len(bad)} NaN or Inf voxels (first at index {first}); replace them (e.g. with 0) "
                      "and save the file again")


def read_nifti(path: str | Path) -> NiftiVolume:
  """Reads a 3D image as float32; raises `DataError` for a missing, unreadable, truncated, non-3D, non-real or
  non-finite file, and for a voxel spacing that is not positive or outside `spacing_range()`."""
  path = Path(path)
  image, header, data = _load(path, as_float=True)
  data = _as_3d(path, data)
  _check_finite(path, data)
  return NiftiVolume(data=data, affine=np.asarray(image.affine, dtype=np.float64),
                     spacing=_spacing(path, header, image.affine), header=image.header, path=path)


def read_label(path: str | Path, allowed_labels: Iterable[int]) -> NiftiVolume:
  """Reads a 3D label map as uint8; `DataError` also for non-integer values and values outside `allowed_labels`."""
  path = Path(path)
  allowed = sorted({int(v) for v in allowed_labels})
  if not allowed or allowed[0] < 0 or allowed[-1] > 255:
    raise ValueError(f"allowed label values must be within 0..255, got {allowed}")
  image, header, data = _load(path, as_float=False)
  data = _as_3d(path, data)
  _check_finite(path, data)
  if data.dtype == np.uint8:
    present = np.flatnonzero(np.bincount(data.ravel(), minlength=256))  # much faster than np.unique on big volumes
  else:
    present = np.unique(data)
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(present, np.round(present)):
      fractional = present[present != np.round(present)]
      raise DataError(f"{path}: label map holds non-integer values (e.g. {fractional[:3].tolist()}); this looks like "
                      "an image, not a label map, or it was resampled with interpolation; use nearest-neighbour")
  unexpected = sorted(set(present.tolist()) - set(allowed))
  if unexpected:
    shown = ", ".join(f"{v:g}" for v in unexpected[:10]) + (" ..." if len(unexpected) > 10 else "")
    raise DataError(f"{path}: unexpected label values {shown} (allowed: {', '.join(map(str, allowed))}); relabel the "
                    "file or declare these labels")
  return NiftiVolume(data=data.astype(np.uint8, copy=False), affine=np.asarray(image.affine, dtype=np.float64),
                     spacing=_spacing(path, header, image.affine), header=image.header, path=path)
