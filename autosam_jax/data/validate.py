"""Dataset validation, and the one place that knows the ACDC and nnU-Net raw folder layouts.

`validate(data_dir)` finds the layout, checks every labeled volume, and returns a `ValidationReport` whose `cases`
list every labeled frame with its image and label paths; dataset builders enumerate files from it rather than from
the folders. The first problem raises `DataError` with one line naming the file, the problem and the fix.

ACDC (as released): `patientNNN/Info.cfg` names the ED and ES frames; `patientNNN_frameXX.nii.gz` is the image and
`patientNNN_frameXX_gt.nii.gz` its label (0 background, 1 RV, 2 MYO, 3 LV). The patient folders may sit in
`data_dir` or in `data_dir/training` (the release's `testing/` folder is not read). The unlabeled cine series
`patientNNN_4d.nii.gz` is ignored.

nnU-Net raw (v2, and v1's dataset.json conventions): `dataset.json` (labels, channel_names, file_ending),
`imagesTr/CASE_0000.nii.gz` (one file per channel) and `labelsTr/CASE.nii.gz`; `imagesTs` is unlabeled and ignored.
nnU-Net has no notion of patients, so a case id ending in `_ED`, `_ES` or `_frameNN` (the names used when ACDC is
converted) is taken as a frame of the patient named by the rest of the id; any other case is its own patient.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from autosam_jax.data.errors import DataError
from autosam_jax.data.labels import ACDC_TABLE, LabelTable
from autosam_jax.data.nifti import NiftiVolume, read_label, read_nifti


SPACING_RELATIVE_TOLERANCE = 1e-3
# Image and label affines are compared where they matter: where each puts the corners of the voxel grid, in image
# voxels. Below AFFINE_NOISE_VOXELS the difference is float32 rounding of the header; up to AFFINE_MAX_VOXELS (half a
# voxel, so every label voxel still lands on its own image voxel) it is header noise and only warned about; beyond that
# the label lies on another grid (flipped, axes swapped, shifted or rotated), and using it would train on wrong masks.
AFFINE_NOISE_VOXELS, AFFINE_MAX_VOXELS = 1e-3, 0.5
# An image is dominated by outliers when its maximum lies more than OUTLIER_RATIO times as far above its minimum as the
# OUTLIER_PERCENTILE-th percentile does. The faithful mode scales each volume min-max to 0..127 grey levels, so there
# all but the top 0.1% of voxels would land within 1.27 grey levels of black: the image is blanked. Real scans
# (MRI's bright fat and vessels, CT's bone and metal) stay within a few times that percentile.
OUTLIER_RATIO, OUTLIER_PERCENTILE = 100.0, 99.9

_ACDC_PATIENT_DIR = re.compile(r"patient\d+")
_NNUNET_CHANNEL_FILE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")
_FRAME_SUFFIX = re.compile(r"(?P<patient>.+)_(?:(?P<phase>ED|ES)|frame(?P<number>\d+))")


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
  """One labeled 3D frame."""
  case_id: str  # unique in the dataset: "patient001_frame01" (ACDC) or the nnU-Net case identifier
  patient_id: str  # frames of one patient share it; splits are made over patients
  frame: str | None  # "ED" or "ES" when known, else None
  frame_number: int | None  # the cine frame number (ACDC's frameXX), else None
  image_path: Path  # for nnU-Net, channel 0000
  label_path: Path
  shape: tuple[int, int, int]  # (X, Y, slices)
  spacing: tuple[float, float, float]  # mm
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # ACDC's Info.cfg fields (ints/floats parsed)
  extra_channel_paths: tuple[Path, ...] = ()  # nnU-Net channels 0001, 0002, ...
  affine: np.ndarray | None = None  # (4, 4) voxel -> world mm of the image (its label's agrees within half a voxel)

  @property
  def num_slices(self) -> int:
    return self.shape[2]


@dataclasses.dataclass
class ValidationReport:
  layout: str  # "acdc" or "nnunet"
  root: Path  # the folder holding the patient folders (ACDC) or dataset.json (nnU-Net)
  labels: dict[str, int]  # name -> value
  cases: list[Case]
  warnings: list[str] = dataclasses.field(default_factory=list)
  dataset_json: dict[str, Any] | None = None
  orientation: Any = None  # orientation.DatasetOrientation of the cases (`dataset_orientation`): how builds cut them

  @property
  def label_table(self) -> LabelTable:
    return LabelTable(tuple(name for name, _ in sorted(self.labels.items(), key=lambda item: item[1])))

  @property
  def patient_ids(self) -> list[str]:
    return list(dict.fromkeys(case.patient_id for case in self.cases))

  @property
  def num_slices(self) -> int:
    return sum(case.num_slices for case in self.cases)

  def cases_of(self, patient_id: str) -> list[Case]:
    return [case for case in self.cases if case.patient_id == patient_id]

  def summary(self) -> str:
    layout_name = {"acdc": "ACDC", "nnunet": "nnU-Net raw"}[self.layout]
    slices = [case.num_slices for case in self.cases]
    in_plane = np.array([case.spacing[:2] for case in self.cases])
    between = np.array([case.spacing[2] for case in self.cases])
    frames = sorted({case.frame for case in self.cases if case.frame})
    frame_text = f" ({' and '.join(frames)})" if frames else ""
    labels = ", ".join(f"{value} {name}" for name, value in sorted(self.labels.items(), key=lambda item: item[1]))
    return (f"{layout_name} dataset {self.root}: {len(self.patient_ids)} patients, {len(self.cases)} labeled "
            f"volumes{frame_text}, {self.num_slices} slices ({min(slices)}-{max(slices)} per volume)\n"
            f"  spacing {in_plane.min():.3g}-{in_plane.max():.3g} mm in-plane, {between.min():.3g}-{between.max():.3g} "
            f"mm between slices; labels {labels}; {len(self.warnings)} warnings")


def _check_pair(image: NiftiVolume, label: NiftiVolume, warnings: list[str]) -> None:
  if image.shape != label.shape:
    raise DataError(f"{label.path}: label shape {label.shape} differs from image {image.path.name} shape "
                    f"{image.shape}; the label must be on the image's voxel grid (resample it with nearest-neighbour)")
  image_spacing, label_spacing = np.asarray(image.spacing), np.asarray(label.spacing)
  if not np.allclose(label_spacing, image_spacing, rtol=SPACING_RELATIVE_TOLERANCE, atol=0):
    raise DataError(f"{label.path}: voxel spacing {tuple(round(s, 6) for s in label.spacing)} mm differs from image "
                    f"{image.path.name} spacing {tuple(round(s, 6) for s in image.spacing)} mm; fix the header "
                    "(pixdim) or resample the label onto the image")
  # The label's voxel grid in image voxel coordinates; an element-wise comparison of the affines would mix mm and
  # direction cosines and could not tell rounding from a flip.
  try:
    label_to_image = np.linalg.inv(image.affine) @ label.affine
  except np.linalg.LinAlgError:
    raise DataError(f"{image.path}: the affine (sform/qform) is not invertible; fix the image header") from None
  corners = np.array([[i, j, k, 1.0] for i in (0, image.shape[0] - 1) for j in (0, image.shape[1] - 1)
                      for k in (0, image.shape[2] - 1)])
  moved = float(np.abs((corners @ label_to_image.T - corners)[:, :3]).max())
  if moved <= AFFINE_NOISE_VOXELS:
    return
  if moved <= AFFINE_MAX_VOXELS:
    warnings.append(f"{label.path}: affine differs slightly from image {image.path.name} (a corner of the voxel grid "
                    f"moves {moved:.3g} voxel); below half a voxel this is header noise and the label is used as is")
    return
  linear = label_to_image[:3, :3]
  signed_permutation = np.round(linear)
  if np.allclose(linear, signed_permutation, atol=1e-2) and (np.abs(signed_permutation).sum(axis=0) == 1).all() \
      and (np.abs(signed_permutation).sum(axis=1) == 1).all():
    if (np.abs(np.diag(signed_permutation)) != 1).any():
      kind = "its voxel axes are swapped"
    elif (np.diag(signed_permutation) < 0).any():
      flipped = [str(a) for a in np.flatnonzero(np.diag(signed_permutation) < 0)]
      kind = (f"voxel axis {flipped[0]} is flipped" if len(flipped) == 1 else
              f"voxel axes {', '.join(flipped)} are flipped")
    else:
      kind = f"it is shifted by {tuple(round(float(t), 2) for t in label_to_image[:3, 3])} voxels"
  else:
    kind = "it is rotated or scaled"
  raise DataError(f"{label.path}: affine does not match image {image.path.name}: {kind}, so a corner of the voxel "
                  f"grid lands {moved:.3g} voxels away; the label must lie on the image's grid: save it with the "
                  "image's affine (sform and qform) if only the header is wrong, else resample it onto the image")


def _check_intensities(image: NiftiVolume, warnings: list[str]) -> None:
  """Warns about an image that holds no contrast: constant, or a few outlier voxels far above the rest."""
  low, high = float(image.data.min()), float(image.data.max())
  if low == high:
    warnings.append(f"{image.path}: image is constant (every voxel is {low:g}); it holds no anatomy, export it again "
                    "or remove the case")
    return
  top = float(np.percentile(image.data, OUTLIER_PERCENTILE))
  if high - low > OUTLIER_RATIO * (top - low):
    warnings.append(f"{image.path}: image is dominated by outliers: its maximum {high:g} lies over {OUTLIER_RATIO:g}x "
                    f"further above its minimum {low:g} than the {OUTLIER_PERCENTILE:g}th percentile {top:g} does, so "
                    "min-max intensity scaling leaves the rest of the image nearly black; fix or clip those voxels")


def _check_duplicate(case: Case, image: NiftiVolume, seen: dict[tuple[Any, ...], Case], warnings: list[str]) -> None:
  """Warns when `image` (the case's first channel) holds the same voxels as an earlier case's: a case held twice can
  land in both the training and the test split. The voxels are hashed, not the files, so a copy saved again (another
  compression, another header) is found too."""
  digest = hashlib.blake2b(image.data.ravel(order="K"), digest_size=16).digest()
  key = (image.data.shape, digest)
  first = seen.setdefault(key, case)
  if first is not case:
    warnings.append(f"{case.image_path}: image has the same voxels as {first.image_path} (case {first.case_id}); a "
                    "duplicated case can land in both the training and the test split, remove one of them")


def _parse_value(text: str) -> Any:
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def read_info_cfg(path: Path) -> dict[str, Any]:
  """ACDC's `Info.cfg`: `key: value` lines; ints and floats parsed, and ED and ES required as frame numbers."""
  if not path.is_file():
    raise DataError(f"{path}: missing; every ACDC patient folder needs Info.cfg with ED and ES frame numbers "
                    "(e.g. 'ED: 1' and 'ES: 12')")
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as err:
    raise DataError(f"{path}: cannot read ({type(err).__name__}); copy the file again") from err
  info = {}
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    key, colon, value = line.partition(":")
    if not colon:
      raise DataError(f"{path}: line {line_number} {line.strip()!r} is not 'key: value'; fix or remove the line")
    info[key.strip()] = _parse_value(value.strip())
  for key in ("ED", "ES"):
    if key not in info:
      raise DataError(f"{path}: no '{key}:' line; add the {key} frame number (e.g. '{key}: "
                      f"{1 if key == 'ED' else 12}')")
    if not isinstance(info[key], int) or info[key] < 0:
      raise DataError(f"{path}: {key} is {info[key]!r}, not a frame number; write e.g. '{key}: "
                      f"{1 if key == 'ED' else 12}'")
  if info["ED"] == info["ES"]:
    raise DataError(f"{path}: ED and ES are both frame {info['ED']}; they must name two different frames")
  return info


def _nifti_path(folder: Path, stem: str) -> Path:
  """`stem.nii.gz`, or `stem.nii` when only the uncompressed file is there."""
  compressed = folder / f"{stem}.nii.gz"
  uncompressed = folder / f"{stem}.nii"
  return uncompressed if not compressed.exists() and uncompressed.exists() else compressed


def _acdc_patient_dirs(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir() if p.is_dir() and _ACDC_PATIENT_DIR.fullmatch(p.name))


def _find_acdc_root(data_dir: Path) -> Path | None:
  for candidate in (data_dir, data_dir / "training"):
    if candidate.is_dir() and _acdc_patient_dirs(candidate):
      return candidate
  return None


def _check_folder(data_dir: Path) -> None:
  if not data_dir.exists():
    raise DataError(f"{data_dir}: folder not found; check the path")
  if not data_dir.is_dir():
    raise DataError(f"{data_dir}: is a file, not a dataset folder; pass the folder that holds the data")
  if not any(data_dir.iterdir()):
    raise DataError(f"{data_dir}: folder is empty; expected ACDC patient folders (patientNNN/) or an nnU-Net raw "
                    "dataset (dataset.json, imagesTr/, labelsTr/)")


def dataset_orientation(cases: list[Case]):
  """How the cases are cut (`orientation.choose_dataset_orientations`): one reference frame per acquisition plane,
  each case's axes ordered and flipped nearest to it. Uses the affines validation read: no file is opened again."""
  from autosam_jax.data.orientation import choose_dataset_orientations

  return choose_dataset_orientations({case.case_id: (case.affine, case.spacing) for case in cases},
                                     {case.case_id: case.image_path for case in cases})


def _check_planes(root: Path, cases: list[Case], warnings: list[str]):
  """Warns when the cases are acquired in different planes (slice planes far apart in world space), so a model
  trained on the majority's plane sees the others' rarely, and names the cases whose in-plane axes stay far from their
  plane's reference frame (`dataset_orientation`)."""
  from autosam_jax.data.orientation import plane_disagreement, slice_normal

  chosen = dataset_orientation(cases)
  normals = {case.case_id: slice_normal(case.affine, chosen.orientations[case.case_id]) for case in cases}
  warning = plane_disagreement(normals)
  if warning:
    warnings.append(f"{root}: {warning}")
  warnings.extend(f"{root}: {warning}" for warning in chosen.warnings)
  return chosen


def validate_acdc(data_dir: str | Path) -> ValidationReport:
  """Checks an ACDC folder (patients in `data_dir` or `data_dir/training`); raises `DataError` at the first problem."""
  data_dir = Path(data_dir)
  _check_folder(data_dir)
  root = _find_acdc_root(data_dir)
  if root is None:
    raise DataError(f"{data_dir}: no ACDC patient folders (patientNNN/) here or in training/; point at the folder "
                    "that holds patient001/, patient002/, ...")
  allowed = set(ACDC_TABLE.values)
  cases, warnings = [], []
  seen: dict[tuple[Any, ...], Case] = {}
  for patient_dir in _acdc_patient_dirs(root):
    patient_id = patient_dir.name
    info = read_info_cfg(patient_dir / "Info.cfg")
    for frame in ("ED", "ES"):
      frame_number = info[frame]
      stem = f"{patient_id}_frame{frame_number:02d}"
      image_path, label_path = _nifti_path(patient_dir, stem), _nifti_path(patient_dir, f"{stem}_gt")
      for path, what in ((image_path, "image"), (label_path, "label")):
        if not path.exists():
          raise DataError(f"{path}: missing {what} of the {frame} frame (Info.cfg says {frame}: {frame_number}); "
                          f"restore the file or fix {frame} in {patient_dir / 'Info.cfg'}")
      image = read_nifti(image_path)
      label = read_label(label_path, allowed)
      _check_pair(image, label, warnings)
      _check_intensities(image, warnings)
      cases.append(Case(case_id=stem, patient_id=patient_id, frame=frame, frame_number=frame_number,
                        image_path=image_path, label_path=label_path, shape=image.shape, spacing=image.spacing,
                        info=dict(info), affine=image.affine))
      _check_duplicate(cases[-1], image, seen, warnings)
  orientation = _check_planes(root, cases, warnings)
  return ValidationReport(layout="acdc", root=root, labels=ACDC_TABLE.to_dict(), cases=cases, warnings=warnings,
                          orientation=orientation)


def _read_dataset_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    raise DataError(f"{path}: not found; an nnU-Net raw dataset needs dataset.json with 'labels', 'channel_names' and "
                    "'file_ending'")
  try:
    dataset = json.loads(path.read_text())
  except json.JSONDecodeError as err:
    raise DataError(f"{path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); fix the file") from err
  except (OSError, UnicodeDecodeError) as err:
    raise DataError(f"{path}: cannot read ({type(err).__name__}); copy the file again") from err
  if not isinstance(dataset, dict):
    raise DataError(f"{path}: holds a JSON {type(dataset).__name__}, not an object; nnU-Net's dataset.json is an "
                    "object with 'labels', 'channel_names' and 'file_ending'")
  return dataset


def _nnunet_labels(path: Path, dataset: dict[str, Any]) -> dict[str, int]:
  return LabelTable.from_dataset_json(path, dataset.get("labels")).to_dict()


def _nnunet_num_channels(path: Path, dataset: dict[str, Any], warnings: list[str]) -> int:
  channels = dataset.get("channel_names", dataset.get("modality"))
  if channels is None:
    warnings.append(f"{path}: no 'channel_names'; assuming one channel (_0000)")
    return 1
  if not isinstance(channels, dict) or not channels:
    raise DataError(f"{path}: 'channel_names' must be an object like {{\"0\": \"cineMRI\"}}")
  if sorted(channels) != [str(i) for i in range(len(channels))]:
    raise DataError(f"{path}: 'channel_names' keys {sorted(channels)} must be \"0\", \"1\", ... in order")
  return len(channels)


def _nnunet_file_ending(path: Path, dataset: dict[str, Any], warnings: list[str]) -> str:
  file_ending = dataset.get("file_ending")
  if file_ending is None:
    warnings.append(f"{path}: no 'file_ending'; assuming .nii.gz as nnU-Net v1 did")
    return ".nii.gz"
  if file_ending not in (".nii.gz", ".nii"):
    raise DataError(f"{path}: file_ending {file_ending!r} is not supported; convert the images to .nii.gz")
  return file_ending


def validate_nnunet(data_dir: str | Path) -> ValidationReport:
  """Checks an nnU-Net raw dataset folder; raises `DataError` at the first problem."""
  data_dir = Path(data_dir)
  _check_folder(data_dir)
  dataset_json_path = data_dir / "dataset.json"
  dataset = _read_dataset_json(dataset_json_path)
  warnings: list[str] = []
  labels = _nnunet_labels(dataset_json_path, dataset)
  num_channels = _nnunet_num_channels(dataset_json_path, dataset, warnings)
  file_ending = _nnunet_file_ending(dataset_json_path, dataset, warnings)

  images_dir, labels_dir = data_dir / "imagesTr", data_dir / "labelsTr"
  for folder in (images_dir, labels_dir):
    if not folder.is_dir():
      raise DataError(f"{folder}: folder not found; nnU-Net raw datasets keep training images in imagesTr/ "
                      "(CASE_0000.nii.gz) and labels in labelsTr/ (CASE.nii.gz)")

  channel_files: dict[str, dict[int, Path]] = {}
  for path in sorted(images_dir.iterdir()):
    if not path.name.endswith(file_ending) or path.name.startswith("."):
      continue
    match = _NNUNET_CHANNEL_FILE.fullmatch(path.name[:-len(file_ending)])
    if match is None:
      raise DataError(f"{path}: image name lacks the channel suffix; nnU-Net names images CASE_0000{file_ending}")
    channel_files.setdefault(match["case"], {})[int(match["channel"])] = path
  label_files = {path.name[:-len(file_ending)]: path for path in sorted(labels_dir.iterdir())
                 if path.name.endswith(file_ending) and not path.name.startswith(".")}
  if not channel_files and not label_files:
    raise DataError(f"{images_dir}: no {file_ending} images in imagesTr/ or labels in labelsTr/; add the training "
                    f"cases as CASE_0000{file_ending} and CASE{file_ending}")
  for case_id, label_path in label_files.items():
    if case_id not in channel_files:
      raise DataError(f"{label_path}: label without an image; add imagesTr/{case_id}_0000{file_ending} or remove "
                      "the label")

  allowed = set(labels.values())
  cases = []
  seen: dict[tuple[Any, ...], Case] = {}
  for case_id, channels in channel_files.items():
    if case_id not in label_files:
      raise DataError(f"{channels[min(channels)]}: image without a label; add labelsTr/{case_id}{file_ending} or "
                      "move the image to imagesTs/")
    declared = f"dataset.json declares {num_channels} channel(s), _0000 to _{num_channels - 1:04d}"
    missing = sorted(set(range(num_channels)) - set(channels))
    extra = sorted(set(channels) - set(range(num_channels)))
    if missing:
      raise DataError(f"{images_dir / f'{case_id}_{missing[0]:04d}{file_ending}'}: missing channel of case {case_id}; "
                      f"{declared}; add the file or fix channel_names")
    if extra:
      raise DataError(f"{channels[extra[0]]}: channel not declared in dataset.json channel_names; {declared}; add "
                      "it there or remove the file")
    label = read_label(label_files[case_id], allowed)
    images = {}
    for channel in sorted(channels):
      images[channel] = image = read_nifti(channels[channel])
      _check_pair(image, label, warnings)
      _check_intensities(image, warnings)
    match = _FRAME_SUFFIX.fullmatch(case_id)
    patient_id = match["patient"] if match else case_id
    frame = match["phase"] if match else None
    frame_number = int(match["number"]) if match and match["number"] else None
    cases.append(Case(case_id=case_id, patient_id=patient_id, frame=frame, frame_number=frame_number,
                      image_path=channels[0], label_path=label_files[case_id], shape=label.shape,
                      spacing=label.spacing, extra_channel_paths=tuple(channels[c] for c in sorted(channels)[1:]),
                      affine=label.affine))
    _check_duplicate(cases[-1], images[0], seen, warnings)

  num_training = dataset.get("numTraining")
  if num_training is not None and num_training != len(cases):
    warnings.append(f"{dataset_json_path}: numTraining is {num_training} but imagesTr/labelsTr hold {len(cases)} "
                    "cases; update numTraining")
  if num_channels > 1:
    warnings.append(f"{dataset_json_path}: {num_channels} channels declared; AutoSAM uses channel 0000 only")
  orientation = _check_planes(data_dir, cases, warnings)
  return ValidationReport(layout="nnunet", root=data_dir, labels=labels, cases=cases, warnings=warnings,
                          dataset_json=dataset, orientation=orientation)


def detect_layout(data_dir: str | Path) -> str:
  """"nnunet" (dataset.json or imagesTr/) or "acdc" (patientNNN/ here or in training/), from the folder's structure
  alone; a folder of neither layout is a DataError."""
  data_dir = Path(data_dir)
  _check_folder(data_dir)
  if (data_dir / "dataset.json").exists() or (data_dir / "imagesTr").is_dir():
    return "nnunet"
  if _find_acdc_root(data_dir) is not None:
    return "acdc"
  if _ACDC_PATIENT_DIR.fullmatch(data_dir.name):
    raise DataError(f"{data_dir}: is one ACDC patient's folder; pass the folder that holds it ({data_dir.parent})")
  raise DataError(f"{data_dir}: neither ACDC (patientNNN/ folders, here or in training/) nor nnU-Net raw layout "
                  "(dataset.json, imagesTr/, labelsTr/); point at the dataset's top folder")


def validate(data_dir: str | Path) -> ValidationReport:
  """Detects the layout (`detect_layout`) and checks every file of it."""
  return validate_nnunet(data_dir) if detect_layout(data_dir) == "nnunet" else validate_acdc(data_dir)
