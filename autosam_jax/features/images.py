"""An image cache: the faithful model images and targets in the feature cache's format, for the UNet baseline.

Each item's "embedding" is the slice's model image (224, 224, 3) float32 in [0, 1] and its "target" the label map,
so `FeatureCache` reads it and the training loop runs on it unchanged; only clean slices are stored (the UNet is
augmented in the train step). The command: `autosam_jax/commands/image_cache.py`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from autosam_jax.data.errors import DataError


OPTION_NAMES = {"out": "--out", "tfds_dir": "--tfds-dir", "shard_size": "--shard-size", "slice_size": "--slice-size"}


def write_image_cache(source_dir: str | os.PathLike, tfds_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      mode: str = "faithful", shard_size: int = 64, *, slice_size: int = 224,
                      spacing: float = 1.25, option_names: dict[str, str] | None = None) -> dict[str, Any]:
  """Writes (or finishes) the image cache of a dataset folder; returns a summary (items, shards).

  slice_size, spacing: the model grid, slice_size x slice_size pixels of `spacing` mm (the official 224 at 1.25 mm;
  e.g. 112 at 2.5 mm covers the same field of view with a quarter of the pixels). `option_names` renames options in
  error messages (see OPTION_NAMES), for callers whose users set them elsewhere (the sweep's config). OUT_DIR is
  locked once every input is checked, to the end."""
  import contextlib

  with contextlib.ExitStack() as stack:  # holds OUT_DIR's lock, once taken, to the end
    return _write_image_cache(source_dir, tfds_dir, out_dir, mode, shard_size, slice_size=slice_size, spacing=spacing,
                              option_names=option_names, stack=stack)


def _write_image_cache(source_dir, tfds_dir, out_dir, mode, shard_size, *, slice_size, spacing, option_names,
                       stack) -> dict[str, Any]:
  from autosam_jax.data.preprocess import PreprocessConfig, preprocess_volume
  from autosam_jax.data.volumes import load_volumes
  from autosam_jax.faults import kill_point
  from autosam_jax.features.cache import open_cache, work_items
  from autosam_jax.memory import require_memory
  from autosam_jax.outputs import check_folder, check_output_path

  names = {**OPTION_NAMES, **(option_names or {})}
  out_dir = check_output_path(out_dir, names["out"])
  check_folder(tfds_dir, names["tfds_dir"])
  if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
    raise DataError(f"{names['shard_size']} must be a positive integer, got {shard_size!r}")
  # Improved-mode model images keep each volume's native grid, so slices differ in shape and cannot share shards.
  if mode != "faithful":
    raise DataError(f"image cache: only the faithful mode (fixed-size square slices) is supported, got {mode!r}")
  preprocess_config = PreprocessConfig(mode=mode, target_spacing=(spacing, spacing), slice_size=slice_size)
  volumes, fingerprint, labels, references = load_volumes(Path(source_dir), Path(tfds_dir), names["tfds_dir"])
  items = work_items(volumes, set(), 0)
  # Before the first volume is preprocessed: one volume at a time, resized to the model grid in float64 (a few
  # copies), its model images (float32, 3 channels) and targets, and a shard of slices as a list and stacked.
  slice_bytes = slice_size * slice_size
  deepest = max((v.image.shape[2] for v in volumes.values()), default=0)
  needed = deepest * slice_bytes * (4 * 8 + 3 * 4 + 2) + 2 * min(shard_size, len(items)) * slice_bytes * (3 * 4 + 2)
  require_memory(needed, f"{names['slice_size']} {slice_size} with {names['shard_size']} {shard_size}",
                 f"choose a smaller {names['slice_size']} (or {names['shard_size']})")
  depends_on = {"kind": "images", "preprocess": preprocess_config.to_dict(), "dataset_fingerprint": fingerprint,
                "views": 0, "view_patients": [], "labels": labels.to_dict(),
                "orientation_references": references}
  writer = open_cache(stack, out_dir, depends_on, items, shard_size, "float32")
  preprocessed: dict[str, Any] = {}  # one volume at a time: items are in (case, slice) order

  def prepared(case_id: str):
    if case_id not in preprocessed:
      preprocessed.clear()
      v = volumes[case_id]
      preprocessed[case_id] = preprocess_volume(v.image, v.spacing, v.label, preprocess_config, name=case_id)
    return preprocessed[case_id]

  for shard in range(writer.num_shards):
    if writer.shard_done(shard):
      continue
    images, targets, valid = [], [], []
    for item in writer.shard_items(shard):
      pre = prepared(item["case_id"])
      z = item["slice_index"]
      images.append(pre.images[z])
      # An unlabeled volume is stored with an all-invalid mask, so it can never count towards a loss or a score.
      labeled = pre.targets is not None
      targets.append(pre.targets[z] if labeled else np.zeros(pre.target_valid.shape, np.uint8))
      valid.append(pre.target_valid if labeled else np.zeros_like(pre.target_valid))
    writer.write_shard(shard, np.stack(images), np.stack(targets), np.stack(valid))
    kill_point("image_cache.shard")  # the shard is whole: its files and its .done record are in place
  writer.finalize()
  return {"items": len(writer.items), "shards": writer.num_shards}
