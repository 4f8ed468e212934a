"""A benchmark dataset of real MRI anatomy: slabs of the ICBM152 2009 (sym, 09a) T1 template with tissue labels.

The phantoms (`synthetic.py`, `shapes.py`) are drawn, not scanned: a pipeline that only ever saw them has never met
real anatomy's texture, folding and partial volume. The MNI152 2009 template (an average of 152 adult brains, 1 mm
isotropic) and its grey- and white-matter probability maps ship inside the nilearn wheel, so every machine that can
`pip install --no-deps nilearn` can build the same small real-MRI dataset offline, without a data-use agreement.

Each case is a slab of `slab_thickness` consecutive axial slices of the T1 template (float32, its values unchanged),
the slabs spread evenly, without overlap, over the slices that hold brain (at least `MIN_BRAIN_FRACTION` of the
largest slice's brain area). A slab's affine is the template's with its origin moved to the slab's first slice, so
every voxel keeps its world (MNI) position exactly. Labels (uint8): a voxel is grey matter (1) or white matter (2)
when that map's probability is the larger of the two and at least 0.5 (a tie goes to grey matter), else background.
With `hemispheres` each class is split by the sign of the voxel centre's world x (RAS: x < 0 is left, the midline
plane x = 0 goes right): gm_left 1, gm_right 2, wm_left 3, wm_right 4.

The folder is in nnU-Net's raw layout (`dataset.json`, `imagesTr/mni152_zNNN_0000.nii.gz`, `labelsTr/mni152_zNNN.
nii.gz`, NNN the slab's first template slice) with `run.json`, the options and template checksums it was built from.
The same template and options give the same bytes; a folder built with other options, or not by this builder, is
refused rather than replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from autosam_jax.data.errors import DataError
from autosam_jax.data.nifti import read_nifti
from autosam_jax.data.orientation import voxel_world_axes

COMMAND = "make-mni-dataset"
TEMPLATE_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                  "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                  "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
DEFAULT_SLAB_THICKNESS, DEFAULT_NUM_CASES = 10, 12  # 120 of the template's 135 brain slices, with gaps between slabs
MIN_BRAIN_FRACTION = 0.1  # a slice with less brain than this fraction of the largest slice's is left out
_FIX = "pip install --no-deps nilearn (its wheel ships the template), or give --template-dir DIR with the three files"


@dataclasses.dataclass(frozen=True)
class Template:
  """The T1 template and its tissue classes, in the files' voxel order."""
  t1: np.ndarray  # float32, as stored (scaling applied)
  tissue: np.ndarray  # uint8: 0 background, 1 grey matter, 2 white matter
  affine: np.ndarray  # (4, 4) float64 voxel -> world (MNI) mm, shared by the three files
  spacing: tuple[float, float, float]  # mm
  slab_axis: int  # the voxel axis closest to world S/I: axial slices are taken along it
  paths: dict[str, Path]


def find_template_dir() -> Path:
  """nilearn's bundled data folder, found without importing nilearn (which would load scikit-learn and more)."""
  spec = importlib.util.find_spec("nilearn")
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"{TEMPLATE_FILES['t1']}: not found, nilearn is not installed; {_FIX}")
  return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def template_paths(template_dir: str | Path | None = None) -> dict[str, Path]:
  """The three template files (`find_template_dir()` when `template_dir` is None); DataError naming a missing one."""
  folder = find_template_dir() if template_dir is None else Path(template_dir).expanduser()
  paths = {key: folder / name for key, name in TEMPLATE_FILES.items()}
  for path in paths.values():
    if not path.is_file():
      raise DataError(f"{path}: {'is not a file' if path.exists() else 'not found'}; {_FIX}")
  return paths


def _probabilities(volume) -> np.ndarray:
  """A probability map in 0..1; nilearn stores its maps as 8-bit integers (0..255 for 0..1), which are divided."""
  data, low, high = volume.data, float(volume.data.min()), float(volume.data.max())
  if low >= 0.0 and high <= 1.0 + 1e-3:
    return data
  if low >= 0.0 and high <= 255.0 and np.array_equal(data, np.round(data)):
    return data / np.float32(255.0)  # monotonic: ties and order between the two maps stay as stored
  raise DataError(f"{volume.path}: values span {low:g}..{high:g}, not a probability map (0..1, or 0..255 in 8 bits); "
                  "give the template's own grey/white-matter probability map")


def tissue_classes(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
  """1 where grey matter's probability is the larger (ties included) and >= 0.5, 2 where white matter's is, else 0."""
  grey = (gm >= wm) & (gm >= 0.5)
  white = ~grey & (wm >= 0.5)
  return (grey + 2 * white).astype(np.uint8)


def read_template(template_dir: str | Path | None = None) -> Template:
  """Reads and cross-checks the three files: one voxel grid, probability maps, an axis along S/I."""
  paths = template_paths(template_dir)
  volumes = {key: read_nifti(path) for key, path in paths.items()}
  t1 = volumes["t1"]
  for key in ("gm", "wm"):
    other = volumes[key]
    if other.shape != t1.shape:
      raise DataError(f"{other.path}: shape {other.shape} differs from the T1 template's {t1.shape}; give the three "
                      "files of one template")
    if not np.allclose(other.affine, t1.affine, rtol=0.0, atol=1e-3):
      raise DataError(f"{other.path}: affine differs from the T1 template's; give the three files of one template")
  try:
    slab_axis = int(np.flatnonzero(voxel_world_axes(t1.affine)[:, 0] == 2)[0])
  except ValueError as err:
    raise DataError(f"{t1.path}: {err}; give a template with a valid affine") from None
  tissue = tissue_classes(_probabilities(volumes["gm"]), _probabilities(volumes["wm"]))
  if not tissue.any():
    raise DataError(f"{paths['gm']}: no voxel of grey or white matter has a probability >= 0.5 (nor in "
                    f"{paths['wm'].name}); give the template's own probability maps")
  return Template(t1=t1.data, tissue=tissue, affine=t1.affine, spacing=t1.spacing, slab_axis=slab_axis, paths=paths)


def class_names(hemispheres: bool) -> list[str]:
  """The foreground classes in value order (1, 2, ...)."""
  return ["gm_left", "gm_right", "wm_left", "wm_right"] if hemispheres else ["gm", "wm"]


def slab_affine(affine: np.ndarray, axis: int, start: int) -> np.ndarray:
  """`affine` with its origin moved to voxel `start` along `axis`: slab voxel k is template voxel start + k there."""
  moved = np.array(affine, dtype=np.float64)
  moved[:3, 3] += start * moved[:3, axis]
  return moved


def split_hemispheres(tissue: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Tissue classes (1 gm, 2 wm) split by the sign of each voxel centre's world x: 2c - 1 left (x < 0), 2c right."""
  grid = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in tissue.shape), indexing="ij", sparse=True)
  world_x = affine[0, 3] + sum(affine[0, axis] * grid[axis] for axis in range(3))
  right = (world_x >= 0.0).astype(np.uint8)
  return np.where(tissue > 0, 2 * tissue - 1 + right, 0).astype(np.uint8)


def slab_starts(tissue: np.ndarray, axis: int, thickness: int, num_cases: int) -> list[int]:
  """First slices of `num_cases` slabs spread evenly, without overlap, from the first to the last slice with brain."""
  area = np.count_nonzero(np.moveaxis(tissue, axis, -1), axis=(0, 1))
  if area.max() == 0:
    raise ValueError("the tissue classes hold no brain voxel")
  brain = np.flatnonzero(area >= MIN_BRAIN_FRACTION * area.max())
  first, extent = int(brain[0]), int(brain[-1] - brain[0] + 1)
  if num_cases * thickness > extent:
    raise DataError(f"--cases {num_cases} x --slab-thickness {thickness}: needs {num_cases * thickness} slices but "
                    f"the brain spans {extent} (slices {first}..{first + extent - 1}); ask for fewer cases or thinner "
                    "slabs")
  if num_cases == 1:
    return [first + (extent - thickness) // 2]
  free = extent - thickness  # integer rounding of k * free / (num_cases - 1): gaps of at least 0 between slabs
  return [first + (2 * k * free + num_cases - 1) // (2 * (num_cases - 1)) for k in range(num_cases)]


def _save(path: Path, data: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]) -> None:
  """Both qform and sform in MNI152 space (code 4), as the template's world is; zooms exactly `spacing`."""
  image = nib.Nifti1Image(data, affine)
  image.set_qform(affine, code="mni")
  image.set_sform(affine, code="mni")
  image.header.set_data_dtype(data.dtype)
  image.header.set_zooms(spacing)
  image.header.set_xyzt_units("mm", "sec")
  nib.save(image, str(path))


def _check_count(value: object, option: str, low: int, high: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
    raise DataError(f"{option} {value!r}: must be an integer from {low} to {high}")
  return int(value)


def build_mni_dataset(out_dir: str | Path, template_dir: str | Path | None = None, *,
                      slab_thickness: int = DEFAULT_SLAB_THICKNESS, num_cases: int = DEFAULT_NUM_CASES,
                      hemispheres: bool = False) -> dict[str, object]:
  """Writes the slab dataset to `out_dir` (new, empty, or an earlier build with the same options and template, which
  is rebuilt to the same bytes); it appears whole or not at all. Returns its dataset.json."""
  from autosam_jax.atomic import write_dir
  from autosam_jax.faults import kill_point
  from autosam_jax.outputs import OutputLock, check_output_path, claim_run, file_digest

  out_dir = check_output_path(out_dir, "OUT")
  slab_thickness = _check_count(slab_thickness, "--slab-thickness", 1, 1000)
  num_cases = _check_count(num_cases, "--cases", 1, 1000)
  template = read_template(template_dir)
  starts = slab_starts(template.tissue, template.slab_axis, slab_thickness, num_cases)
  identity = {"slab_thickness": slab_thickness, "num_cases": num_cases, "hemispheres": bool(hemispheres),
              "template_sha256": {key: file_digest(path) for key, path in template.paths.items()}}
  names = class_names(hemispheres)
  case_ids = [f"mni152_z{start:03d}" for start in starts]
  dataset = {"name": "MNI152_2009_slabs",
             "description": f"{num_cases} slabs of {slab_thickness} axial slices of the ICBM152 2009a nonlinear "
                            "symmetric T1 template; grey/white matter from its probability maps (>= 0.5, the larger)"
                            + (", split into hemispheres by world x" if hemispheres else ""),
             "reference": "Fonov et al., NeuroImage 2011 (ICBM 2009a), as shipped by nilearn",
             "channel_names": {"0": "T1"}, "labels": {"background": 0, **{n: v for v, n in enumerate(names, 1)}},
             "numTraining": num_cases, "file_ending": ".nii.gz"}

  def fill(staging: Path) -> None:
    (staging / "imagesTr").mkdir()
    (staging / "labelsTr").mkdir()
    for case_id, start in zip(case_ids, starts):
      cut = tuple(slice(start, start + slab_thickness) if axis == template.slab_axis else slice(None)
                  for axis in range(3))
      affine = slab_affine(template.affine, template.slab_axis, start)
      label = template.tissue[cut]
      if hemispheres:
        label = split_hemispheres(label, affine)
      _save(staging / "imagesTr" / f"{case_id}_0000.nii.gz", np.ascontiguousarray(template.t1[cut], np.float32),
            affine, template.spacing)
      _save(staging / "labelsTr" / f"{case_id}.nii.gz", np.ascontiguousarray(label), affine, template.spacing)
      kill_point("make-mni-dataset-case")
    (staging / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    (staging / "run.json").write_text(json.dumps({"command": COMMAND, "identity": identity}, indent=1) + "\n")

  with contextlib.ExitStack() as stack:
    claim_run(out_dir, COMMAND, identity, write=False)  # a foreign folder, or other options: refused, left untouched
    stack.enter_context(OutputLock(out_dir))
    claim_run(out_dir, COMMAND, identity, write=False)  # again under the lock: another builder may have finished
    write_dir(out_dir, fill, kill_point_name="make-mni-dataset-replace")
  return dataset

