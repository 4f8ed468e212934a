"""2D slice examples: the feature schema shared by the TFDS builders, and reassembly of slices into volumes.

A slice example carries everything needed to put it back: the patient, the frame (ED/ES for ACDC, "" otherwise),
its index along the canonical slice axis, the voxel spacing in canonical order, and the stored file's shape and
affine with the orientation between the two. Slices are `canonical[:, :, k]` of the volume permuted and flipped into
the canonical order chosen from its geometry (`autosam_jax.data.orientation`), so every scan is cut in its
acquisition plane whatever voxel order the file stores; `Volume.to_stored` maps a canonical label volume back to the
file's voxel order, where the stored affine applies.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from autosam_jax.data.orientation import IDENTITY, Orientation, choose_orientation


def slice_features():
  """The TFDS FeaturesDict of one slice example (imported lazily: TFDS is slow to import)."""
  import tensorflow_datasets as tfds

  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(None, None), dtype=np.float32, encoding="zlib"),
      "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
      "patient_id": tfds.features.Text(),
      "case_id": tfds.features.Text(),
      "frame": tfds.features.Text(),
      "slice_index": np.int32,
      "num_slices": np.int32,
      "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
      "affine": tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
      "original_shape": tfds.features.Tensor(shape=(3,), dtype=np.int32),
      # Per canonical axis: [stored axis, flipped (0/1), world axis] (`Orientation.to_array`).
      "orientation": tfds.features.Tensor(shape=(3, 3), dtype=np.int32),
  })


def slice_key(case_id: str, slice_index: int) -> str:
  """Deterministic example key; zero-padded so keys sort in slice order."""
  return f"{case_id}/slice{slice_index:03d}"


def volume_to_examples(case_id: str, patient_id: str, frame: str, image: np.ndarray, label: np.ndarray,
                       spacing: Iterable[float], affine: np.ndarray, orientation: Orientation | None = None
                       ) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (key, example) for every canonical slice `k` of a 3D volume given as stored (image, label, spacing and
  affine in the file's voxel order); `orientation` defaults to the one chosen from the affine and spacing."""
  if image.ndim != 3 or image.shape != label.shape:
    raise ValueError(f"{case_id}: image {image.shape} and label {label.shape} must be equal 3D shapes")
  spacing = tuple(float(s) for s in spacing)
  if orientation is None:
    orientation = choose_orientation(affine, spacing)
  canonical_image, canonical_label = orientation.to_canonical(image), orientation.to_canonical(label)
  num_slices = canonical_image.shape[2]
  for k in range(num_slices):
    yield slice_key(case_id, k), {
        "image": np.ascontiguousarray(canonical_image[:, :, k], dtype=np.float32),
        "label": np.ascontiguousarray(canonical_label[:, :, k], dtype=np.uint8),
        "patient_id": patient_id,
        "case_id": case_id,
        "frame": frame,
        "slice_index": k,
        "num_slices": num_slices,
        "spacing": np.asarray(orientation.canonical_spacing(spacing), np.float32),
        "affine": np.asarray(affine, np.float64),
        "original_shape": np.asarray(image.shape, np.int32),
        "orientation": orientation.to_array(),
    }


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class Volume:
  """A reassembled case in canonical voxel order (slices along the last axis), with what maps it back to its file."""
  case_id: str
  patient_id: str
  frame: str
  image: np.ndarray  # canonical (X, Y, Z) float32
  label: np.ndarray  # canonical (X, Y, Z) uint8
  spacing: np.ndarray  # (3,) mm, canonical order
  affine: np.ndarray  # (4, 4) of the stored file's voxel order
  orientation: Orientation = IDENTITY  # stored -> canonical
  stored_shape: tuple[int, int, int] | None = None  # the stored file's shape (None: the canonical one, identity)

  def to_stored(self, labels: np.ndarray) -> np.ndarray:
    """A canonical (X, Y, Z) label volume in the stored file's voxel order, to be written with `affine`."""
    labels = np.asarray(labels)
    if tuple(labels.shape[:3]) != tuple(self.image.shape):
      raise ValueError(f"{self.case_id}: labels of shape {labels.shape} are not on the canonical grid "
                       f"{self.image.shape}")
    return np.ascontiguousarray(self.orientation.to_stored(labels))


def assemble_volumes(examples: Iterable[Mapping[str, Any]]) -> dict[str, Volume]:
  """Groups slice examples by case and stacks them back into volumes, checking that no slice is missing."""
  by_case: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
  for example in examples:
    by_case[_text(example["case_id"])].append(example)
  volumes = {}
  for case_id, parts in by_case.items():
    parts = sorted(parts, key=lambda e: int(e["slice_index"]))
    num_slices = int(parts[0]["num_slices"])
    indices = [int(e["slice_index"]) for e in parts]
    if indices != list(range(num_slices)):
      raise ValueError(f"{case_id}: slices {indices} do not make up the volume's {num_slices} slices")
    first = parts[0]
    orientation = Orientation.from_array(first["orientation"]) if "orientation" in first else IDENTITY
    stored_shape = tuple(int(s) for s in first["original_shape"])
    volumes[case_id] = Volume(
        case_id=case_id, patient_id=_text(first["patient_id"]), frame=_text(first["frame"]),
        image=np.stack([e["image"] for e in parts], axis=-1), label=np.stack([e["label"] for e in parts], axis=-1),
        spacing=np.asarray(first["spacing"]), affine=np.asarray(first["affine"]), orientation=orientation,
        stored_shape=stored_shape)
    if tuple(volumes[case_id].image.shape) != orientation.canonical_shape(stored_shape):
      raise ValueError(f"{case_id}: reassembled shape {volumes[case_id].image.shape} differs from the stored "
                       f"{stored_shape} in canonical order ({orientation.describe()}): "
                       f"{orientation.canonical_shape(stored_shape)}")
  return volumes
