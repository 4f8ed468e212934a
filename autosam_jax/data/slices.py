"""2D slice examples: the feature schema shared by the TFDS builders, and reassembly of slices into volumes.

A slice example carries everything needed to put it back: the patient, the frame (ED/ES for ACDC, "" otherwise),
its index along the volume's third axis, the volume's original shape, voxel spacing and affine. Slices are
`volume[:, :, k]` in the NIfTI file's own voxel order, never reoriented, so a reassembled volume saved with the
stored affine is the original file's geometry.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Iterable, Iterator, Mapping

import numpy as np


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
  })


def slice_key(case_id: str, slice_index: int) -> str:
  """Deterministic example key; zero-padded so keys sort in slice order."""
  return f"{case_id}/slice{slice_index:03d}"


def volume_to_examples(case_id: str, patient_id: str, frame: str, image: np.ndarray, label: np.ndarray,
                       spacing: Iterable[float], affine: np.ndarray) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (key, example) for every slice `k` of a 3D volume, slicing the last axis."""
  if image.ndim != 3 or image.shape != label.shape:
    raise ValueError(f"{case_id}: image {image.shape} and label {label.shape} must be equal 3D shapes")
  num_slices = image.shape[2]
  for k in range(num_slices):
    yield slice_key(case_id, k), {
        "image": np.ascontiguousarray(image[:, :, k], dtype=np.float32),
        "label": np.ascontiguousarray(label[:, :, k], dtype=np.uint8),
        "patient_id": patient_id,
        "case_id": case_id,
        "frame": frame,
        "slice_index": k,
        "num_slices": num_slices,
        "spacing": np.asarray(tuple(spacing), np.float32),
        "affine": np.asarray(affine, np.float64),
        "original_shape": np.asarray(image.shape, np.int32),
    }


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass
class Volume:
  case_id: str
  patient_id: str
  frame: str
  image: np.ndarray  # (X, Y, Z) float32
  label: np.ndarray  # (X, Y, Z) uint8
  spacing: np.ndarray  # (3,)
  affine: np.ndarray  # (4, 4)


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
    volumes[case_id] = Volume(
        case_id=case_id, patient_id=_text(first["patient_id"]), frame=_text(first["frame"]),
        image=np.stack([e["image"] for e in parts], axis=-1), label=np.stack([e["label"] for e in parts], axis=-1),
        spacing=np.asarray(first["spacing"]), affine=np.asarray(first["affine"]))
    if tuple(volumes[case_id].image.shape) != tuple(int(s) for s in first["original_shape"]):
      raise ValueError(f"{case_id}: reassembled shape {volumes[case_id].image.shape} differs from the original "
                       f"{tuple(first['original_shape'])}")
  return volumes
