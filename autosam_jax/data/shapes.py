"""Small labeled 3D datasets of nested and adjacent blobs, in nnU-Net's raw layout, that are not ACDC.

The cardiac phantoms (`synthetic.py`) always carry ACDC's three classes, its thick short-axis slices and one voxel
order, so they cannot show that a pipeline really follows a dataset's own label table and geometry. These datasets
vary exactly what the phantoms hold fixed:

- Any number of classes with any names (`class_names`), written as nnU-Net v2's dataset.json
  (`{"background": 0, NAME: 1, ...}`) or v1's (`{"0": "background", "1": NAME, ...}`, `modality`, a `training` list).
- Any voxel spacing (isotropic or thick slices) and volume shape, and any voxel order: `voxel_order` and `flips`
  store the same world content transposed and reversed, with the affine's columns permuted and negated and its
  origin moved, so every voxel keeps its world position. Reoriented to the closest canonical (RAS) order, every
  voxel order of one seed gives identical arrays.
- One or more image channels (`imagesTr/CASE_0000.nii.gz`, `_0001`, ...). Case ids are `case_000`, `case_001`, ...:
  no frame suffix, so every case is its own patient.

Content, per case: the classes come in groups of two, an outer blob and an inner one nested inside it (the last
group holds one blob when the number of classes is odd). With one group the blob sits near the centre; otherwise the
groups sit side by side around the centre, at a random phase. Blobs are rotated ellipsoids with a smooth random
wobble of their surface; outer blobs span half to two thirds of the slices and inner ones a third to a half, so
every class appears in every case and in many slices. Each class has its own mean intensity (outer blobs darker
than inner ones, all brighter than the body around them), varied by a per-case gain, a smooth texture, a
partial-volume blur, a multiplicative bias field and Rician-like noise. Further channels give each class another
intensity, as a second MRI contrast would.

A case depends only on (seed, case number, number of classes, shape, spacing, oblique rotation): writing 3 cases
gives the first 3 of writing 5, channel 0000 does not depend on `num_channels`, the voxel order changes how the
content is stored but not the content, and the same arguments give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from autosam_jax.data.labels import LabelTable
from autosam_jax.data.synthetic import save_nifti, staged_directory

CHANNEL_NAME = "MRI"
MAX_OBLIQUE_DEGREES = 30.0  # past 45 degrees the voxel axes would no longer map to one world axis each


@dataclasses.dataclass(frozen=True)
class ShapesCase:
  """One case in its canonical voxel order (axes along world x, y, z up to the oblique rotation)."""
  images: tuple[np.ndarray, ...]  # one int16 array of shape `shape` per channel
  label: np.ndarray  # uint8, shape `shape`; 0 background, 1..K the classes
  affine: np.ndarray  # (4, 4) float64 voxel -> world mm
  spacing: tuple[float, float, float]  # mm, per voxel axis


def _channel_names(num_channels: int) -> dict[str, str]:
  return {str(c): CHANNEL_NAME if c == 0 else f"{CHANNEL_NAME}{c + 1}" for c in range(num_channels)}


def _rotation_about(axis: np.ndarray, angle: float) -> np.ndarray:
  """Rodrigues' formula; an angle of 0 gives the identity exactly, so `oblique_degrees=0` is axis-aligned."""
  axis = axis / np.linalg.norm(axis)
  cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
  return np.eye(3) + math.sin(angle) * cross + (1.0 - math.cos(angle)) * (cross @ cross)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
  """Zero-mean, unit-std noise correlated over about a twelfth of the volume along every axis.

  The correlation length is a fraction of the volume rather than a number of voxels, so a thick-slice volume gets
  the same shapes as an isotropic one of the same extent.
  """
  sigma = tuple(max(1.0, n / 12.0) for n in shape)
  field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, output=np.float32,
                                  mode="reflect")
  return (field - field.mean()) / max(float(field.std()), 1e-6)


def _blob(coords: Sequence[np.ndarray], centre: np.ndarray, semi_axes: np.ndarray, in_plane_angle: float,
          wobble: np.ndarray) -> np.ndarray:
  """Voxels inside a rotated ellipsoid whose surface moves in and out by `wobble` (a fraction of its size)."""
  cos_a, sin_a = math.cos(in_plane_angle), math.sin(in_plane_angle)
  dx, dy, dz = (coords[a] - np.float32(centre[a]) for a in range(3))
  u = (dx * np.float32(cos_a) + dy * np.float32(sin_a)) / np.float32(semi_axes[0])
  v = (-dx * np.float32(sin_a) + dy * np.float32(cos_a)) / np.float32(semi_axes[1])
  w = dz / np.float32(semi_axes[2])
  return u * u + v * v + w * w <= (1.0 + wobble) ** 2


def _intensity_levels(num_classes: int) -> list[float]:
  """Mean intensity of each class (index 0 for class 1), in units of the case's gain.

  Outer blobs share the dim band and inner ones the bright band, with a wide gap between: a small inner blob loses
  some brightness to partial volume with the darker blob around it, and must still stay clear of every outer class.
  """
  outers = list(range(1, num_classes + 1, 2))
  inners = list(range(2, num_classes + 1, 2))
  level = dict(zip(outers, np.linspace(0.3, 0.6, len(outers)) if len(outers) > 1 else [0.45]))
  level.update(zip(inners, np.linspace(0.85, 1.15, len(inners)) if len(inners) > 1 else [1.0]))
  return [float(level[k]) for k in range(1, num_classes + 1)]


def make_shapes_case(seed: int, case_number: int, num_classes: int, *, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                     shape: Sequence[int] = (48, 48, 24), num_channels: int = 1,
                     oblique_degrees: float = 10.0) -> ShapesCase:
  """Builds one case in canonical voxel order; it depends only on the arguments (channel 0 not on `num_channels`)."""
  shape = tuple(int(n) for n in shape)
  spacing = tuple(float(s) for s in spacing)
  rng = np.random.default_rng(np.random.SeedSequence([seed, case_number]))

  # Voxel-centre coordinates in units of the half extent, in (-1, 1) along every axis, for broadcasting.
  axes = [((np.arange(n, dtype=np.float32) - (n - 1) / 2) / (n / 2)) for n in shape]
  coords = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])

  # Layout: groups of (outer, inner) classes side by side around the centre, or one group near the centre.
  num_groups = (num_classes + 1) // 2
  phase = float(rng.uniform(0.0, 2.0 * np.pi))
  if num_groups == 1:
    ring_radius, outer_size = 0.0, 0.55
  else:
    ring_radius = float(rng.uniform(0.42, 0.5))
    outer_size = min(0.4, 0.9 * ring_radius * math.sin(math.pi / num_groups))
  blobs = {}  # class -> (centre, semi-axes, in-plane angle, wobble amplitude)
  for group in range(num_groups):
    angle = phase + 2.0 * np.pi * group / num_groups + float(rng.uniform(-0.15, 0.15))
    centre = np.array([ring_radius * math.cos(angle), ring_radius * math.sin(angle), 0.0])
    centre += rng.uniform(-0.08, 0.08, size=3) * (1.0, 1.0, 2.0)
    semi_axes = np.array([outer_size * float(rng.uniform(0.8, 1.15)), outer_size * float(rng.uniform(0.8, 1.15)),
                          float(rng.uniform(0.5, 0.7))])
    blobs[2 * group + 1] = (centre, semi_axes, float(rng.uniform(0.0, np.pi)), float(rng.uniform(0.06, 0.14)))
    if 2 * group + 2 <= num_classes:
      # Off-centre but well inside the outer blob, so that a rim of the outer class surrounds it on every side.
      inner_scale = np.array([rng.uniform(0.5, 0.62), rng.uniform(0.5, 0.62), rng.uniform(0.6, 0.75)])
      offset = rng.uniform(-1.0, 1.0, size=3) * (semi_axes - semi_axes * inner_scale) * 0.35
      blobs[2 * group + 2] = (centre + offset, semi_axes * inner_scale, float(rng.uniform(0.0, np.pi)),
                              float(rng.uniform(0.04, 0.1)))

  label = np.zeros(shape, dtype=np.uint8)
  for klass in sorted(blobs, key=lambda k: (k % 2 == 0, k)):  # outer blobs first, then each inner one inside its own
    centre, semi_axes, in_plane_angle, amplitude = blobs[klass]
    inside = _blob(coords, centre, semi_axes, in_plane_angle, np.float32(amplitude) * _smooth_field(rng, shape))
    if klass % 2 == 0:
      inside &= label == klass - 1
    label[inside] = klass

  # The world geometry: a small oblique rotation of RAS axes, the volume centre at a random point near the origin.
  rotation_axis = rng.standard_normal(3)
  rotation_angle = math.radians(float(rng.uniform(0.0, 1.0)) * oblique_degrees)
  linear = _rotation_about(rotation_axis, rotation_angle) * np.asarray(spacing)[None, :]
  affine = np.eye(4)
  affine[:3, :3] = linear
  affine[:3, 3] = rng.uniform(-40.0, 40.0, size=3) - linear @ ((np.asarray(shape) - 1) / 2)

  # Intensities: every random number of the shared anatomy is drawn before any channel's noise.
  scale = 1000.0 * float(rng.uniform(0.85, 1.15))  # scanner gain differs per case
  texture = _smooth_field(rng, shape)
  body_axes = rng.uniform(0.9, 0.98, size=2)
  body = (coords[0] / np.float32(body_axes[0])) ** 2 + (coords[1] / np.float32(body_axes[1])) ** 2 <= 1.0
  bias = rng.uniform(-0.04, 0.04, size=6).astype(np.float32)
  x, y, z = coords
  bias_field = np.exp(bias[0] * x + bias[1] * y + bias[2] * z + bias[3] * x * x + bias[4] * y * y + bias[5] * x * y)
  levels = _intensity_levels(num_classes)

  images = []
  for channel in range(num_channels):
    # Another channel is another contrast: the class intensities are handed round, the body stays the darkest.
    means = np.zeros(num_classes + 1, dtype=np.float32)
    means[0] = 0.15 * scale
    means[1:] = [scale * levels[(klass + channel) % num_classes] for klass in range(num_classes)]
    image = means[label] * (1.0 + np.float32(0.03) * texture)
    background = np.where(body, np.float32(0.15 * scale) * (1.0 + np.float32(0.2) * texture), np.float32(0.02 * scale))
    image = np.where(label == 0, background, image).astype(np.float32)
    image = ndimage.gaussian_filter(image, 0.5, output=np.float32)  # partial-volume edges
    image *= bias_field
    noise_std = np.float32(0.03 * scale)
    real = image + rng.standard_normal(shape, dtype=np.float32) * noise_std
    imaginary = rng.standard_normal(shape, dtype=np.float32) * noise_std
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    images.append(np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16))
  return ShapesCase(images=tuple(images), label=label, affine=affine, spacing=spacing)


def reorder_voxels(data: np.ndarray, affine: np.ndarray, voxel_order: Sequence[int],
                   flips: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
  """The same world content stored in another voxel order: stored axis i is axis `voxel_order[i]` of `data`,
  reversed when `flips[i]`.

  The affine's column i becomes column `voxel_order[i]`, negated when flipped, and a flipped axis moves the origin to
  what was that axis's last voxel, so `new_affine @ stored_index` is the world position of the same voxel.
  """
  stored = np.transpose(data, tuple(voxel_order))
  new_affine = np.eye(4)
  new_affine[:3, 3] = affine[:3, 3]
  for i, (axis, flip) in enumerate(zip(voxel_order, flips)):
    column = np.asarray(affine[:3, axis], dtype=np.float64)
    if flip:
      stored = np.flip(stored, axis=i)
      new_affine[:3, 3] += (data.shape[axis] - 1) * column
      column = -column
    new_affine[:3, i] = column
  return np.ascontiguousarray(stored), new_affine


def _check_arguments(num_cases: int, class_names: Sequence[str], seed: int, spacing: Sequence[float],
                     shape: Sequence[int], voxel_order: Sequence[int], flips: Sequence[bool], dataset_json_version: int,
                     num_channels: int, oblique_degrees: float) -> None:
  if not 1 <= num_cases <= 100_000:
    raise ValueError(f"need 1 <= num_cases <= 100000, got {num_cases}")
  if "background" in class_names:
    raise ValueError("class_names must not hold 'background': label 0 is always the background")
  if not 1 <= len(class_names) <= 255:
    raise ValueError(f"need 1 to 255 class names (uint8 labels), got {len(class_names)}")
  LabelTable(("background", *class_names))  # distinct, non-empty strings
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f"spacing must be three positive numbers (mm), got {tuple(spacing)}")
  if len(shape) != 3 or not all(int(n) == n and n >= 4 for n in shape):
    raise ValueError(f"shape must be three integers of at least 4, got {tuple(shape)}")
  if sorted(voxel_order) != [0, 1, 2]:
    raise ValueError(f"voxel_order must be a permutation of (0, 1, 2), got {tuple(voxel_order)}")
  if len(flips) != 3 or not all(isinstance(f, (bool, np.bool_)) for f in flips):
    raise ValueError(f"flips must be three booleans, got {tuple(flips)}")
  if dataset_json_version not in (1, 2):
    raise ValueError(f"dataset_json_version must be 1 or 2, got {dataset_json_version!r}")
  if not 1 <= num_channels <= 9999:
    raise ValueError(f"need 1 <= num_channels <= 9999 (4-digit channel suffixes), got {num_channels}")
  if not 0.0 <= oblique_degrees <= MAX_OBLIQUE_DEGREES:
    raise ValueError(f"oblique_degrees must be within 0..{MAX_OBLIQUE_DEGREES:g}, got {oblique_degrees}")


def _dataset_json(version: int, class_names: Sequence[str], case_ids: Sequence[str],
                  num_channels: int) -> dict[str, object]:
  names = ["background", *class_names]
  if version == 2:
    return {"channel_names": _channel_names(num_channels), "labels": {name: value for value, name in enumerate(names)},
            "numTraining": len(case_ids), "file_ending": ".nii.gz"}
  # nnU-Net v1 lists each training case by its image without the channel suffix.
  return {"name": "Shapes", "description": "Synthetic nested and adjacent blobs", "tensorImageSize": "4D",
          "modality": _channel_names(num_channels), "labels": {str(value): name for value, name in enumerate(names)},
          "numTraining": len(case_ids), "numTest": 0,
          "training": [{"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"}
                       for case in case_ids],
          "test": []}


def write_shapes_dataset(out_dir: str | Path, *, num_cases: int, class_names: Sequence[str], seed: int,
                         spacing: Sequence[float] = (1.0, 1.0, 1.0), shape: Sequence[int] = (48, 48, 24),
                         voxel_order: Sequence[int] = (0, 1, 2), flips: Sequence[bool] = (False, False, False),
                         dataset_json_version: int = 2, num_channels: int = 1,
                         oblique_degrees: float = 10.0) -> Path:
  """Writes `num_cases` blob cases with classes `class_names` (values 1, 2, ...) in nnU-Net's raw layout.

  `spacing` and `shape` are those of the canonical voxel order, whose axes run along world x, y and z (RAS, turned
  by up to `oblique_degrees`); the files store axis `voxel_order[i]` as their axis i, reversed where `flips[i]`, with
  shape, zooms and affine to match. `out_dir` must be new or empty; it appears complete or not at all. Returns it.
  """
  if isinstance(class_names, str):
    raise ValueError(f"class_names must be a sequence of names, got the string {class_names!r}")
  class_names = list(class_names)
  _check_arguments(num_cases, class_names, seed, spacing, shape, voxel_order, flips, dataset_json_version,
                   num_channels, oblique_degrees)
  voxel_order = tuple(int(a) for a in voxel_order)
  flips = tuple(bool(f) for f in flips)
  stored_spacing = tuple(float(spacing[axis]) for axis in voxel_order)
  case_ids = [f"case_{number:0{max(3, len(str(num_cases - 1)))}d}" for number in range(num_cases)]
  with staged_directory(Path(out_dir)) as staging:
    (staging / "imagesTr").mkdir()
    (staging / "labelsTr").mkdir()
    for number, case_id in enumerate(case_ids):
      case = make_shapes_case(seed, number, len(class_names), spacing=spacing, shape=shape,
                              num_channels=num_channels, oblique_degrees=oblique_degrees)
      for channel, image in enumerate(case.images):
        stored, affine = reorder_voxels(image, case.affine, voxel_order, flips)
        save_nifti(staging / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz", stored, affine, stored_spacing)
      stored, affine = reorder_voxels(case.label, case.affine, voxel_order, flips)
      save_nifti(staging / "labelsTr" / f"{case_id}.nii.gz", stored, affine, stored_spacing)
    dataset = _dataset_json(dataset_json_version, class_names, case_ids, num_channels)
    (staging / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
  return Path(out_dir)
