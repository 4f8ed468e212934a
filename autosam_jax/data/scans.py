"""Folders of scans without labels, as `predict` and semi-supervised training take them: any .nii / .nii.gz files,
nnU-Net channel files (CASE_0000) grouped into cases; each read, checked and cut in the dataset's frames."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from autosam_jax.data.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CHANNEL_NAME = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")  # nnU-Net's CASE_0000
MAX_CHANNELS = 3
# The patient id of an unlabeled scan of an extra folder: this prefix and its case name (no dataset case has a ":")
UNLABELED_PREFIX = "unlabeled:"


def input_files(path: Path) -> list[Path]:
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
    if not files:
      raise DataError(f"{path}: holds no .nii or .nii.gz files")
    return files
  if not path.exists():
    raise DataError(f"{path}: file not found")
  if not path.name.endswith(NIFTI_SUFFIXES):
    raise DataError(f"{path}: not a NIfTI file (.nii or .nii.gz)")
  return [path]


@dataclasses.dataclass(frozen=True)
class InputCase:
  """One scan to segment: its image file (nnU-Net: channel _0000) and the name of the label map it gives."""
  path: Path
  output_name: str


def _split_suffix(name: str) -> tuple[str, str]:
  suffix = next(s for s in NIFTI_SUFFIXES if name.endswith(s))
  return name[:-len(suffix)], suffix


def input_cases(files: list[Path], collision: str = "would write {name}, as {other} does; rename one of them or "
                "predict them into separate output folders") -> list[InputCase]:
  """Groups nnU-Net channel files (CASE_0000, CASE_0001, ...) into cases and names every output; DataError for a
  gap in a case's channels, a case with several channels, or two inputs that would write one output name. Files
  named like a channel but without a _0000 beside them (subject_0012.nii.gz) are plain scans."""
  plain: list[InputCase] = []
  channels: dict[tuple[Path, str], dict[int, Path]] = {}
  for path in files:
    stem, suffix = _split_suffix(path.name)
    match = CHANNEL_NAME.fullmatch(stem)
    if match is None:
      plain.append(InputCase(path, f"{stem}.nii.gz"))
    else:
      channels.setdefault((path.parent, match["case"]), {})[int(match["channel"])] = path
  grouped = []
  for (folder, case), found in channels.items():
    if 0 not in found:  # e.g. subject_0012.nii.gz: a name that ends in four digits, not an nnU-Net channel file
      plain += [InputCase(path, f"{_split_suffix(path.name)[0]}.nii.gz") for path in found.values()]
      continue
    suffix = _split_suffix(found[min(found)].name)[1]
    present = ", ".join(f"_{c:04d}" for c in sorted(found))
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
      raise DataError(f"{folder / f'{case}_{missing[0]:04d}{suffix}'}: missing channel of case {case} (found "
                      f"{present}); nnU-Net numbers a case's channels _0000, _0001, ... without gaps, add the file or "
                      "remove the others")
    if len(found) > MAX_CHANNELS:
      raise DataError(f"{found[MAX_CHANNELS]}: case {case} has {len(found)} channels ({present}); at most "
                      f"{MAX_CHANNELS} are supported and the model takes one gray image, give only the _0000 file")
    if len(found) > 1:
      raise DataError(f"{found[1]}: case {case} has {len(found)} channels ({present}) but the model was trained on one "
                      "channel (_0000); give only the _0000 file (e.g. in a folder of its own)")
    grouped.append(InputCase(found[0], f"{case}{suffix}"))
  cases = sorted(plain + grouped, key=lambda c: c.path)
  by_name: dict[str, InputCase] = {}
  for case in cases:
    other = by_name.setdefault(case.output_name, case)
    if other is not case:
      raise DataError(f"{case.path}: {collision.format(name=case.output_name, other=other.path)}")
  return cases


def read_unlabeled(folder: str | Path, references: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
  """The scans of `folder` (imagesTs/, imagesTr/ without labels, any folder of NIfTI) as `slices.Volume`s for
  semi-supervised training: read and checked as every NIfTI is (`nifti.read_nifti`: one DataError per bad file),
  cut in the dataset's reference frames (`orientation_for`, as predict cuts new scans), their labels all zero
  (never read). Case and patient id: UNLABELED_PREFIX + the case name."""
  from autosam_jax.data.nifti import read_nifti
  from autosam_jax.data.orientation import orientation_for
  from autosam_jax.data.slices import Volume

  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(f"{folder}: no such folder of unlabeled scans; give a folder of .nii / .nii.gz images")
  cases = input_cases(input_files(folder), "is case {name} too, as {other} is; rename one of them")
  volumes = {}
  for case in cases:
    scan = read_nifti(case.path)
    if min(scan.shape) < 1 or scan.data.ndim != 3:
      raise DataError(f"{case.path}: not a 3D image (shape {scan.data.shape}); give 3D scans")
    orientation = orientation_for(scan.affine, scan.spacing, references, case.path)
    name = UNLABELED_PREFIX + case.output_name[:-len(".nii.gz")]
    image = np.ascontiguousarray(orientation.to_canonical(scan.data), np.float32)
    volumes[name] = Volume(case_id=name, patient_id=name, frame="", image=image,
                           label=np.zeros(image.shape, np.uint8),
                           spacing=np.asarray(orientation.canonical_spacing(scan.spacing)),
                           affine=np.asarray(scan.affine), orientation=orientation, stored_shape=scan.shape)
  return volumes
