"""A dataset folder read back as volumes: its TFDS slice dataset (built on first use, then reused) reassembled into
one `Volume` per case, with the fingerprint of the source files and the dataset's label table."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, NamedTuple


class LoadedDataset(NamedTuple):
  volumes: dict[str, Any]  # case id -> autosam_jax.data.slices.Volume
  fingerprint: str  # SHA-256 of the source files
  labels: Any  # autosam_jax.data.labels.LabelTable
  orientation_references: list  # the reference frames its build cut the cases in (data/orientation.py)


# Under it, one folder per source folder: TFDS names a build by its builder, config and version only (acdc;
# nnunet_raw/<dataset folder name>), so two ACDC folders, or two nnU-Net folders of one name, in one TFDS folder would
# be one build, and the second refused as "built from other source files".
DEFAULT_TFDS_ROOT = Path("~/tensorflow_datasets/autosam-jax")


def default_tfds_dir(source_dir: str | os.PathLike) -> Path:
  """The TFDS folder of a source folder when none is given: DEFAULT_TFDS_ROOT/<folder name>-<8 hex digits of the
  SHA-256 of its resolved path>, so every command given the same source folder (however spelt) finds the same
  build, and no two source folders share one."""
  resolved = Path(source_dir).expanduser().resolve()
  digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
  return DEFAULT_TFDS_ROOT.expanduser() / f"{resolved.name or 'root'}-{digest}"


def load_volumes(source_dir: Path, tfds_dir: Path, tfds_option: str = "--tfds-dir") -> LoadedDataset:
  """Builds (or reuses) the TFDS dataset of the source folder: its volumes by case, fingerprint, label table and
  the orientation references its build recorded.

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
  return LoadedDataset(dict(sorted(volumes.items())), builder.info.metadata["source_fingerprint"], labels,
                       list(builder.info.metadata.get("orientation_references") or []))
