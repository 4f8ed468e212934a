"""Reading NIfTI volumes, with every way a file can be bad turned into one `DataError` line that names it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np

from autosam_jax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class NiftiVolume:
  """A 3D volume as stored: axes (X, Y, Z) in voxel order, slices along Z."""
  data: np.ndarray  # float32 for images (scaling applied), uint8 for labels
  affine: np.ndarray  # (4, 4) float64 voxel -> scanner mm (sform if set, else qform)
  spacing: tuple[float, float, float]  # header zooms in mm
  header: nib.Nifti1Header
  path: Path

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(int(n) for n in self.data.shape)


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def _load(path: Path, as_float: bool) -> tuple[nib.Nifti1Image, np.ndarray]:
  if not path.exists():
    raise DataError(f"{path}: file not found; check the path (a .nii.gz image, or its label *_gt.nii.gz)")
  if not path.is_file():
    raise DataError(f"{path}: is a folder, not a NIfTI file; pass the .nii or .nii.gz file itself")
  try:
    # mmap=False and reading the array here, not lazily later: a truncated or corrupt file must fail now, with its name.
    image = nib.load(str(path), mmap=False)
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
      raise DataError(f"{path}: is a {type(image).__name__}, not NIfTI; convert it to .nii.gz")
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
  return image, data


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


def _spacing(path: Path, image: nib.Nifti1Image) -> tuple[float, float, float]:
  zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
  if len(zooms) < 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
    raise DataError(f"{path}: voxel spacing {zooms} is not three positive numbers; fix pixdim in the NIfTI header")
  return zooms


def _check_finite(path: Path, data: np.ndarray) -> None:
  if np.issubdtype(data.dtype, np.floating):
    finite = np.isfinite(data)
    if not finite.all():
      bad = np.argwhere(~finite)
      first = tuple(int(i) for i in bad[0])
      raise DataError(f"{path}: {len(bad)} NaN or Inf voxels (first at index {first}); replace them (e.g. with 0) "
                      "and save the file again")


def read_nifti(path: str | Path) -> NiftiVolume:
  """Reads a 3D image as float32; raises `DataError` for a missing, unreadable, non-3D or non-finite file."""
  path = Path(path)
  image, data = _load(path, as_float=True)
  data = _as_3d(path, data)
  _check_finite(path, data)
  return NiftiVolume(data=data, affine=np.asarray(image.affine, dtype=np.float64), spacing=_spacing(path, image),
                     header=image.header, path=path)


def read_label(path: str | Path, allowed_labels: Iterable[int]) -> NiftiVolume:
  """Reads a 3D label map as uint8; `DataError` also for non-integer values and values outside `allowed_labels`."""
  path = Path(path)
  allowed = sorted({int(v) for v in allowed_labels})
  if not allowed or allowed[0] < 0 or allowed[-1] > 255:
    raise ValueError(f"allowed label values must be within 0..255, got {allowed}")
  image, data = _load(path, as_float=False)
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
                     spacing=_spacing(path, image), header=image.header, path=path)
