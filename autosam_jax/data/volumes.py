"""A dataset folder read back as volumes: its TFDS slice dataset (built on first use, then reused) reassembled into
one `Volume` per case, with the fingerprint of the source files and the dataset's label table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple


class LoadedDataset(NamedTuple):
  volumes: dict[str, Any]  # case id -> autosam_jax.data.slices.Volume
  fingerprint: str  # SHA-256 of the source files
  labels: Any  # autosam_jax.data.labels.LabelTable


def load_volumes(source_dir: Path, tfds_dir: Path, tfds_option: str = "--tfds-dir") -> LoadedDataset:
  """Builds (or reuses) the TFDS dataset of the source folder: its volumes by case, fingerprint and label table.

  `tfds_option` names the TFDS folder in an error (a file where the folder should be)."""
  from autosam_jax.data.build import build
  from autosam_jax.data.labels import LabelTable
  from autosam_jax.data.slices import assemble_volumes
  from autosam_jax.data.validate import detect_layout
  from autosam_jax.outputs import check_folder

  check_folder(tfds_dir, tfds_option)
  builder = build(detect_layout(source_dir), source_dir, tfds_dir)  # the build validates every file
  volumes = {}
  for split in builder.info.splits:
    source = builder.as_data_source(split=split)
    volumes.update(assemble_volumes(source[i] for i in range(len(source))))
  labels = LabelTable.from_dict(builder.info.metadata.get("labels"), f"{builder.data_dir} (dataset metadata)")
  return LoadedDataset(dict(sorted(volumes.items())), builder.info.metadata["source_fingerprint"], labels)
