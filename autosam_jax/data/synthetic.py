"""Synthetic cardiac cine-MRI phantoms written in ACDC's exact file layout (or nnU-Net's raw layout).

Nobody working on this project has ACDC, so every data path (validation, dataset building, training, evaluation) is
exercised on these phantoms instead. They copy what matters to a segmentation pipeline:

- ACDC's layout: `patientNNN/Info.cfg` (`ED: 1`, `ES: 12`, `Group: DCM`, `Height: 184.0`, `NbFrame: 30`,
  `Weight: 95.0`) and `patientNNN_frameXX.nii.gz` / `patientNNN_frameXX_gt.nii.gz` for the ED and ES frames. The cine
  series `patientNNN_4d.nii.gz` of the real release is not written: it is large, unlabeled, and nothing here reads it.
- Labels as ACDC's (uint8; 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity, papillary muscles included in it),
  images as int16 scanner intensities (bright blood, dark myocardium, textured mid-gray tissue, dark lungs).
- Short-axis stacks from base (slice 0) to apex: the LV cavity and epicardium are nested half-ellipsoids and the RV a
  shorter one sharing the septum, so structures shrink towards the apex, whose slices hold LV/MYO only or nothing.
- At ES the LV cavity shrinks by the patient's ejection fraction and the myocardium keeps its area, so it thickens.
- Pathology groups cycle DCM, HCM, MINF, NOR, RV by patient number, each with its own cavity size, wall thickness,
  ejection fraction and RV size; any five consecutive patients cover all groups.
- Anisotropic voxels (in-plane 1.2-1.8 mm, 5-10 mm between slices), non-square matrices of 154-256 voxels, 6-12
  slices, an oblique rotation in the affine (qform and sform), in-plane blur, a smooth multiplicative bias field and
  Rician-like noise.

A patient's content depends only on (seed, patient number): writing 3 patients gives the first 3 of writing 5, and
the same seed gives the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from autosam_jax.atomic import staging_dir
from autosam_jax.data.errors import DataError
from autosam_jax.data.labels import ACDC_TABLE


ACDC_GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")  # ACDC's order: patients 1-20 DCM, 21-40 HCM, ...
_RV, _MYO, _LV = (ACDC_TABLE.to_dict()[name] for name in ("RV", "MYO", "LV"))  # the label values written

# Per group: LV cavity radius at the base (mm), myocardial wall thickness (mm), ejection fraction, RV size factor.
_GROUP_ANATOMY = {
    "NOR": dict(cavity_mm=(20.0, 26.0), wall_mm=(7.0, 10.0), ejection_fraction=(0.55, 0.70), rv_scale=(0.9, 1.1)),
    "DCM": dict(cavity_mm=(28.0, 35.0), wall_mm=(5.0, 7.0), ejection_fraction=(0.10, 0.35), rv_scale=(0.9, 1.2)),
    "HCM": dict(cavity_mm=(16.0, 22.0), wall_mm=(13.0, 18.0), ejection_fraction=(0.65, 0.80), rv_scale=(0.8, 1.0)),
    "MINF": dict(cavity_mm=(24.0, 30.0), wall_mm=(6.0, 9.0), ejection_fraction=(0.25, 0.45), rv_scale=(0.9, 1.1)),
    "RV": dict(cavity_mm=(19.0, 25.0), wall_mm=(7.0, 10.0), ejection_fraction=(0.50, 0.65), rv_scale=(1.4, 1.7)),
}


@dataclasses.dataclass(frozen=True)
class PhantomFrame:
  """One labeled frame: int16 image and uint8 label of shape (X, Y, Z), slice 0 at the base."""
  image: np.ndarray
  label: np.ndarray


@dataclasses.dataclass(frozen=True)
class PhantomPatient:
  patient_id: str  # "patient007"
  info: dict[str, str]  # Info.cfg fields, values formatted as ACDC writes them
  ed_frame_number: int
  es_frame_number: int
  ed: PhantomFrame
  es: PhantomFrame
  affine: np.ndarray  # (4, 4) float64
  spacing: tuple[float, float, float]  # mm, (x, y, z)


# The left ventricle's long axis in scanner (RAS) coordinates, base to apex: towards the patient's left, anterior and
# inferior, so short-axis planes are double-oblique, as cardiac MRI plans them; the in-plane image axes run closest to
# R and A, as scanners store short-axis images in one convention.
LONG_AXIS_RAS = (-0.35, 0.3, -0.89)
MAX_TILT_DEGREES = 10.0  # patients' hearts differ in orientation, but their short-axis planes stay alike
MAX_IN_PLANE_DEGREES = 10.0


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
  axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
  k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
  return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
  """A short-axis frame (columns: in-plane x, in-plane y, slice normal): the long axis `LONG_AXIS_RAS` tilted by up to
  MAX_TILT_DEGREES in a random direction, turned in-plane by up to MAX_IN_PLANE_DEGREES. The planes are oblique in
  every scanner direction and alike across patients, as the short-axis stacks of one cardiac dataset are."""
  normal = np.asarray(LONG_AXIS_RAS, np.float64) / np.linalg.norm(LONG_AXIS_RAS)
  first = np.array([1.0, 0.0, 0.0]) - normal[0] * normal  # R, made orthogonal to the long axis
  first /= np.linalg.norm(first)
  frame = np.stack([first, np.cross(normal, first), normal], axis=1)
  in_plane = np.deg2rad(float(rng.uniform(-MAX_IN_PLANE_DEGREES, MAX_IN_PLANE_DEGREES)))
  frame = _axis_rotation(normal, in_plane) @ frame
  tilt_axis = np.cross(normal, rng.standard_normal(3))
  tilt = _axis_rotation(tilt_axis, np.deg2rad(float(rng.uniform(0.0, MAX_TILT_DEGREES))))
  return tilt @ frame


def _inside_ellipse(u2: np.ndarray, v2: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """`u2`, `v2`: squared coordinates along the ellipse axes; `a`, `b`: semi-axes per slice (0 means no ellipse).

  Written without division so that zero-sized ellipses at and past the apex are simply empty.
  """
  return (u2 * (b * b) + v2 * (a * a) <= (a * a) * (b * b)) & (a > 0)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], sigma_voxels: float) -> np.ndarray:
  """Zero-mean, unit-std texture correlated over `sigma_voxels` in-plane, independent across slices."""
  field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), (sigma_voxels, sigma_voxels, 0),
                                  output=np.float32)
  return (field - field.mean()) / max(float(field.std()), 1e-6)


def make_phantom_patient(seed: int, patient_number: int) -> PhantomPatient:
  """Builds one patient's ED and ES frames; the result depends only on (seed, patient_number)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, patient_number]))
  group = ACDC_GROUPS[(patient_number - 1) % len(ACDC_GROUPS)]
  anatomy = _GROUP_ANATOMY[group]

  # Geometry: ACDC-like matrices, never square, and a stack that covers 45-100 mm of the long axis.
  size_x = int(rng.integers(154, 257))
  size_y = int(rng.integers(154, 256))
  if size_y >= size_x:
    size_y += 1
  num_slices = int(rng.integers(6, 13))
  in_plane_mm = round(float(rng.uniform(1.2, 1.8)), 4)
  slice_gap_mm = round(float(rng.uniform(max(5.0, 45.0 / (num_slices - 1)), min(10.0, 100.0 / (num_slices - 1)))), 2)
  spacing = (in_plane_mm, in_plane_mm, slice_gap_mm)
  shape = (size_x, size_y, num_slices)

  # Heart anatomy at ED, in mm, in the slice plane.
  cavity_radius = float(rng.uniform(*anatomy["cavity_mm"]))
  cavity_elongation = float(rng.uniform(1.0, 1.25))
  cavity_a, cavity_b = cavity_radius * cavity_elongation ** 0.5, cavity_radius / cavity_elongation ** 0.5
  wall = float(rng.uniform(*anatomy["wall_mm"]))
  epi_a, epi_b = cavity_a + wall, cavity_b + wall
  epi_radius = (epi_a + epi_b) / 2
  lv_angle = float(rng.uniform(0.0, np.pi))
  rv_direction = float(np.pi + rng.uniform(-0.5, 0.5))  # the RV lies on the -x side, as in radiological views
  rv_scale = float(rng.uniform(*anatomy["rv_scale"]))
  rv_thickness = epi_radius * float(rng.uniform(0.5, 0.8)) * rv_scale
  rv_wrap = float(rng.uniform(1.1, 1.35)) * rv_scale ** 0.5  # RV long semi-axis over the epicardial radius
  ejection_fraction = float(rng.uniform(*anatomy["ejection_fraction"]))
  rv_es_scale = float(rng.uniform(0.55, 0.75))

  # Long axis: the epicardial apex lies between 0.8 and 1.15 stack lengths below the base, so some stacks end in
  # empty slices and some stop short of the apex; the RV ends well before the LV.
  stack_mm = (num_slices - 1) * slice_gap_mm
  epi_length = stack_mm * float(rng.uniform(0.8, 1.15)) + 0.5 * slice_gap_mm
  cavity_length = epi_length - wall * float(rng.uniform(0.8, 1.2))
  rv_length = epi_length * float(rng.uniform(0.55, 0.8))
  depth = np.arange(num_slices, dtype=np.float64) * slice_gap_mm

  def taper(length: float) -> np.ndarray:
    return np.sqrt(np.clip(1.0 - (depth / length) ** 2, 0.0, None))

  cavity_taper, epi_taper, rv_taper = taper(cavity_length), taper(epi_length), taper(rv_length)

  # The RV ellipse is centred inside the LV on the septal side and reaches `rv_thickness` beyond the epicardium, so
  # what lies outside the epicardium is a crescent that wraps the septum. Any point of an ellipse lies within its
  # larger semi-axis of its centre, which bounds the heart for cropping and placement.
  rv_centre_fraction = 0.45
  heart_reach = max(epi_a, epi_b, epi_radius * (rv_centre_fraction + max(rv_wrap, 1.0 - rv_centre_fraction))
                    + rv_thickness) + 3.0 * in_plane_mm

  # Placement and body: the heart sits near the centre of the field of view, inside a textured torso.
  half_fov_x, half_fov_y = size_x * in_plane_mm / 2, size_y * in_plane_mm / 2
  center_x = float(rng.uniform(-1, 1)) * max(0.0, half_fov_x - heart_reach - 10.0) * 0.4
  center_y = float(rng.uniform(-1, 1)) * max(0.0, half_fov_y - heart_reach - 10.0) * 0.4
  body_a = min(float(rng.uniform(140.0, 190.0)), 0.47 * 2 * half_fov_x)
  body_b = min(float(rng.uniform(100.0, 140.0)), 0.47 * 2 * half_fov_y)
  body_a, body_b = max(body_a, abs(center_x) + heart_reach + 15.0), max(body_b, abs(center_y) + heart_reach + 15.0)

  blood = float(rng.uniform(800.0, 1000.0))  # scanner gain differs per patient
  intensity = dict(lv=blood, rv=blood * float(rng.uniform(0.85, 0.97)), myo=blood * float(rng.uniform(0.2, 0.3)),
                   tissue=blood * float(rng.uniform(0.38, 0.48)), fat=blood * float(rng.uniform(0.75, 0.9)),
                   lung=blood * 0.05, air=blood * 0.01, papillary=blood * float(rng.uniform(0.3, 0.45)))
  noise_std = blood * float(rng.uniform(0.02, 0.04))
  texture = _smooth_field(rng, shape, sigma_voxels=float(rng.uniform(1.5, 3.5)))
  bias_coefficients = rng.uniform(-0.15, 0.15, size=6)

  # Pixel-centre coordinates in mm relative to the field-of-view centre, shape (X, Y, 1) for broadcasting over slices.
  x_mm = ((np.arange(size_x, dtype=np.float32) - (size_x - 1) / 2) * in_plane_mm)[:, None, None]
  y_mm = ((np.arange(size_y, dtype=np.float32) - (size_y - 1) / 2) * in_plane_mm)[None, :, None]
  body = (x_mm / body_a) ** 2 + (y_mm / body_b) ** 2 <= 1.0
  body_inner = (x_mm / (body_a - 12.0)) ** 2 + (y_mm / (body_b - 12.0)) ** 2 <= 1.0
  lungs = np.zeros((size_x, size_y, 1), dtype=bool)
  for side in (-1.0, 1.0):
    lung_x = center_x + side * (heart_reach + 0.25 * body_a)
    lungs |= ((x_mm - lung_x) / (0.28 * body_a)) ** 2 + ((y_mm - center_y) / (0.6 * body_b)) ** 2 <= 1.0
  around_heart = (x_mm - center_x) ** 2 + (y_mm - center_y) ** 2 <= (heart_reach + 8.0) ** 2
  lungs &= body_inner & ~around_heart

  bias_x, bias_y = x_mm / half_fov_x, y_mm / half_fov_y
  bias_z = (np.arange(num_slices, dtype=np.float32) / max(num_slices - 1, 1) - 0.5)[None, None, :]
  c = bias_coefficients.astype(np.float32)
  bias_field = np.exp(c[0] * bias_x + c[1] * bias_y + c[2] * bias_x ** 2 + c[3] * bias_y ** 2 + c[4] * bias_x * bias_y
                      + c[5] * bias_z)

  background = np.where(body, np.float32(intensity["fat"]), np.float32(intensity["air"]))
  background = np.where(body_inner, intensity["tissue"] * (1.0 + 0.15 * texture), background)
  background = np.where(lungs, intensity["lung"] * (1.0 + 0.5 * texture), background)

  # The heart is drawn only inside its bounding box: the volume is mostly background, and the ellipse tests over the
  # whole volume would dominate the run time.
  crop_x = slice(max(0, int(np.searchsorted(x_mm[:, 0, 0], center_x - heart_reach))),
                 int(np.searchsorted(x_mm[:, 0, 0], center_x + heart_reach, side="right")))
  crop_y = slice(max(0, int(np.searchsorted(y_mm[0, :, 0], center_y - heart_reach))),
                 int(np.searchsorted(y_mm[0, :, 0], center_y + heart_reach, side="right")))
  dx, dy = x_mm[crop_x] - center_x, y_mm[:, crop_y] - center_y
  cos_lv, sin_lv = np.cos(lv_angle), np.sin(lv_angle)
  u2, v2 = (dx * cos_lv + dy * sin_lv) ** 2, (-dx * sin_lv + dy * cos_lv) ** 2
  ed_cavity_a, ed_cavity_b = cavity_a * cavity_taper, cavity_b * cavity_taper
  ed_epi_a, ed_epi_b = epi_a * epi_taper, epi_b * epi_taper

  # ES: the cavity area shrinks by (1 - ejection fraction); the epicardium shrinks uniformly so that the myocardial
  # ring keeps its ED area per slice, which is what makes the wall thicker.
  cavity_scale = np.sqrt(1.0 - ejection_fraction)
  es_cavity_a, es_cavity_b = ed_cavity_a * cavity_scale, ed_cavity_b * cavity_scale
  ring_fraction = np.divide(ed_cavity_a * ed_cavity_b, ed_epi_a * ed_epi_b, out=np.zeros(num_slices),
                            where=ed_epi_a > 0)
  epi_scale = np.sqrt(1.0 - (1.0 - cavity_scale ** 2) * ring_fraction)
  es_epi_a, es_epi_b = ed_epi_a * epi_scale, ed_epi_b * epi_scale

  def frame(cavity_a_z, cavity_b_z, epi_a_z, epi_b_z, rv_size: float) -> PhantomFrame:
    cavity = _inside_ellipse(u2, v2, cavity_a_z, cavity_b_z)
    epicardium = _inside_ellipse(u2, v2, epi_a_z, epi_b_z)
    epi_radius_z = (epi_a_z + epi_b_z) / 2
    rv_offset = rv_centre_fraction * epi_radius_z
    # Both RV semi-axes vanish with the RV taper, so past the RV apex the ellipse is empty or hidden in the LV.
    rv_short_z = ((1.0 - rv_centre_fraction) * epi_radius_z + rv_thickness * rv_size * rv_taper) * (rv_taper > 0)
    rv_long_z = rv_wrap * rv_size ** 0.5 * epi_radius_z * rv_taper
    cos_rv, sin_rv = np.cos(rv_direction), np.sin(rv_direction)
    rv_dx, rv_dy = dx - rv_offset * cos_rv, dy - rv_offset * sin_rv
    rv_u2, rv_v2 = (rv_dx * cos_rv + rv_dy * sin_rv) ** 2, (-rv_dx * sin_rv + rv_dy * cos_rv) ** 2
    rv = _inside_ellipse(rv_u2, rv_v2, rv_short_z, rv_long_z) & ~epicardium

    label = np.zeros(shape, dtype=np.uint8)
    heart_label = label[crop_x, crop_y]
    heart_label[rv] = _RV
    heart_label[epicardium] = _MYO
    heart_label[cavity] = _LV

    # Two papillary muscles: dark in the image, labeled LV cavity as in ACDC's ground truth.
    papillary = np.zeros(cavity.shape, dtype=bool)
    cavity_radius_z = (cavity_a_z + cavity_b_z) / 2
    for angle in (lv_angle + 0.9, lv_angle + 2.3):
      px, py = 0.55 * cavity_radius_z * np.cos(angle), 0.55 * cavity_radius_z * np.sin(angle)
      papillary |= (dx - px) ** 2 + (dy - py) ** 2 <= (0.16 * cavity_radius_z) ** 2
    papillary &= cavity

    image = background.copy()
    heart_image = image[crop_x, crop_y]
    heart_image[rv] = intensity["rv"]
    heart_image[epicardium] = intensity["myo"]
    heart_image[cavity] = intensity["lv"]
    heart_image[papillary] = intensity["papillary"]
    image = ndimage.gaussian_filter(image, (0.7, 0.7, 0.0), output=np.float32)  # partial-volume edges
    image *= bias_field
    # Magnitude images: noise on the real and imaginary parts makes the background Rician, never negative.
    real = image + rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_std)
    imaginary = rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_std)
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    return PhantomFrame(image=np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16), label=label)

  ed = frame(ed_cavity_a, ed_cavity_b, ed_epi_a, ed_epi_b, 1.0)
  es = frame(es_cavity_a, es_cavity_b, es_epi_a, es_epi_b, rv_es_scale)

  rotation = _random_rotation(rng)
  linear = rotation * np.asarray(spacing)[None, :]
  volume_centre = (np.asarray(shape) - 1) / 2
  affine = np.eye(4)
  affine[:3, :3] = linear
  affine[:3, 3] = rng.uniform(-60.0, 60.0, size=3) - linear @ volume_centre

  num_frames = int(rng.integers(25, 36))
  es_frame_number = int(rng.integers(8, 16))
  info = {"ED": "1", "ES": str(es_frame_number), "Group": group,
          "Height": f"{float(rng.integers(150, 196)):.1f}", "NbFrame": str(num_frames),
          "Weight": f"{float(rng.integers(50, 111)):.1f}"}
  return PhantomPatient(patient_id=f"patient{patient_number:03d}", info=info, ed_frame_number=1,
                        es_frame_number=es_frame_number, ed=ed, es=es, affine=affine, spacing=spacing)


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]) -> None:
  """Saves with qform and sform both set (code 1, scanner) and zooms exactly `spacing`, as scanner exports are."""
  image = nib.Nifti1Image(data, affine)
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  image.header.set_data_dtype(data.dtype)
  image.header.set_zooms(spacing)
  image.header.set_xyzt_units("mm", "sec")
  nib.save(image, str(path))


def _write_acdc_patient(patient: PhantomPatient, patient_dir: Path) -> None:
  patient_dir.mkdir()
  info_lines = [f"{key}: {value}" for key, value in sorted(patient.info.items())]
  (patient_dir / "Info.cfg").write_text("\n".join(info_lines) + "\n")
  for number, frame in ((patient.ed_frame_number, patient.ed), (patient.es_frame_number, patient.es)):
    stem = f"{patient.patient_id}_frame{number:02d}"
    save_nifti(patient_dir / f"{stem}.nii.gz", frame.image, patient.affine, patient.spacing)
    save_nifti(patient_dir / f"{stem}_gt.nii.gz", frame.label, patient.affine, patient.spacing)


def write_synthetic_acdc(out_dir: str | Path, num_patients: int, seed: int, first_patient_id: int = 1) -> list[Path]:
  """Writes patients `first_patient_id` .. `first_patient_id + num_patients - 1` as `out_dir/patientNNN/`.

  Each patient folder appears whole or not at all (built under a temporary name, then renamed), so a second call with
  a later `first_patient_id` adds patients to the same folder. An existing patient folder is never overwritten.
  Returns the patient folders.
  """
  if num_patients < 1 or first_patient_id < 1 or first_patient_id + num_patients - 1 > 999:
    raise ValueError(f"need 1 <= patient numbers <= 999, got {num_patients} patients from {first_patient_id}")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  patient_dirs = []
  for patient_number in range(first_patient_id, first_patient_id + num_patients):
    patient_dir = out_dir / f"patient{patient_number:03d}"
    if patient_dir.exists():
      raise DataError(f"{patient_dir}: already exists; write into an empty folder or choose another first_patient_id")
    # `.patientNNN.partial-PID-RANDOM`, made with mkdir (the process umask, not mkdtemp's 0700); what killed runs left
    # for this patient is deleted first.
    staging = staging_dir(patient_dir)
    try:
      _write_acdc_patient(make_phantom_patient(seed, patient_number), staging / patient_dir.name)
      (staging / patient_dir.name).rename(patient_dir)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    patient_dirs.append(patient_dir)
  return patient_dirs


@contextlib.contextmanager
def staged_directory(out_dir: Path) -> Iterator[Path]:
  """Yields a temporary sibling of `out_dir` to fill; renames it to `out_dir` only if the block succeeds.

  Refuses an `out_dir` that exists and is not an empty folder, so nothing of the user's is ever replaced.
  """
  out_dir = Path(out_dir).absolute()
  if out_dir.is_symlink():
    raise DataError(f"{out_dir}: is a symbolic link; give the folder it points to ({os.path.realpath(out_dir)}) or "
                    "another output folder")
  if out_dir.exists() and not out_dir.is_dir():
    raise DataError(f"{out_dir}: already exists and is a file, not a folder; choose another output folder")
  if out_dir.exists() and any(out_dir.iterdir()):
    raise DataError(f"{out_dir}: already exists and is not empty; choose a new output folder or empty this one")
  above = next(parent for parent in out_dir.parents if parent.exists())
  if not above.is_dir():
    raise DataError(f"{above}: is a file, not a folder; choose another output folder")
  from autosam_jax.outputs import check_writable

  check_writable(out_dir.parent, "output folder")  # the staging folder is made beside `out_dir`
  # `.NAME.partial-PID-RANDOM` beside the output, made with mkdir (mkdtemp's private 0700 mode would stay on the
  # renamed output folder); what killed writers of the same output left there (for processes no longer alive) is
  # deleted first.
  staging = staging_dir(out_dir)
  try:
    yield staging
    # os.rename replaces an empty directory atomically on POSIX.
    staging.rename(out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def write_synthetic_nnunet(out_dir: str | Path, num_cases: int, seed: int) -> Path:
  """Writes `num_cases` phantom frames in nnU-Net's raw layout: `dataset.json`, `imagesTr/acdc_001_ED_0000.nii.gz`,
  `labelsTr/acdc_001_ED.nii.gz`, then `acdc_001_ES`, `acdc_002_ED`, ... (patients as in `write_synthetic_acdc`).

  `out_dir` must be new or empty; it appears complete or not at all. Returns `out_dir`.
  """
  if num_cases < 1 or num_cases > 2 * 999:
    raise ValueError(f"need 1 <= num_cases <= 1998, got {num_cases}")
  out_dir = Path(out_dir)
  with staged_directory(out_dir) as staging:
    (staging / "imagesTr").mkdir()
    (staging / "labelsTr").mkdir()
    for patient_number in range(1, (num_cases + 1) // 2 + 1):
      patient = make_phantom_patient(seed, patient_number)
      frames = (("ED", patient.ed), ("ES", patient.es))[:num_cases - 2 * (patient_number - 1)]
      for frame_name, frame in frames:
        case_id = f"acdc_{patient_number:03d}_{frame_name}"
        save_nifti(staging / "imagesTr" / f"{case_id}_0000.nii.gz", frame.image, patient.affine, patient.spacing)
        save_nifti(staging / "labelsTr" / f"{case_id}.nii.gz", frame.label, patient.affine, patient.spacing)
    dataset = {"channel_names": {"0": "cineMRI"}, "labels": ACDC_TABLE.to_dict(), "numTraining": num_cases,
               "file_ending": ".nii.gz"}
    (staging / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
  return out_dir


def write_phantoms(out_dir: str | Path, num_patients: int, seed: int, nnunet: bool = False) -> None:
  """`num_patients` phantom patients (ED and ES frames) into the new or empty `out_dir`, in ACDC's layout or in
  nnU-Net's raw layout (one case per frame); `out_dir` appears complete or not at all."""
  if isinstance(num_patients, bool) or not 1 <= num_patients <= 999:
    raise DataError(f"--patients {num_patients}: must be between 1 and 999 (ACDC numbers patients with 3 digits)")
  if seed < 0:
    raise DataError(f"--seed {seed}: must be a non-negative integer")
  if nnunet:
    write_synthetic_nnunet(out_dir, 2 * num_patients, seed)
    return
  with staged_directory(Path(out_dir)) as staging:
    write_synthetic_acdc(staging, num_patients, seed)
