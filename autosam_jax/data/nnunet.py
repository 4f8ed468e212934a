"""TFDS builder for a folder in nnU-Net's raw layout (dataset.json, imagesTr/*_0000.nii.gz, labelsTr/*.nii.gz).

  builder = build_nnunet(source_dir="nnUNet_raw/Dataset027_ACDC", data_dir="~/tensorflow_datasets")

Single-channel images only (SAM takes one gray image replicated to RGB). The classes are dataset.json's "labels"
(nnU-Net v2 {name: value} or v1 {"value": name}), recorded as the dataset's label table in its metadata
(`labels`: {name: value}; `autosam_jax.data.labels`). Patients are as `autosam_jax.data.validate` reads them from
case ids (`X_ED`/`X_ES`/`X_frameNN` are frames of patient X; any other case is its own patient), so a patient's
frames never straddle a split.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import tensorflow_datasets as tfds

from autosam_jax.data.acdc import QuietBuild, case_examples, prepare, source_fingerprint
from autosam_jax.data.errors import DataError
from autosam_jax.data.slices import slice_features


def _dataset_name(source_dir: Path) -> str:
  """A TFDS config name from the folder (Dataset027_ACDC -> dataset027_acdc)."""
  name = re.sub(r"[^a-z0-9_]+", "_", source_dir.name.lower()).strip("_")
  return name or "dataset"


class NnunetRaw(QuietBuild, tfds.core.GeneratorBasedBuilder):
  """2D slices of an nnU-Net raw dataset's training cases, labels as declared in its dataset.json."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "2D slices with geometry for reassembly.",
                   "1.1.0": "Slices along the through-plane axis of a canonical voxel order chosen from the geometry, "
                            "with the orientation recorded; spacing in canonical order.",
                   "1.2.0": "In-plane order chosen once per dataset (reference frames in the metadata); spacing from "
                            "the sform in the header's unit."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the nnU-Net raw dataset folder (holding dataset.json) as the source directory."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.__class__.__doc__, features=slice_features(),
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    from autosam_jax.data.validate import validate_nnunet

    source = Path(dl_manager.manual_dir)
    report = validate_nnunet(source)  # parses dataset.json's labels, v1 or v2, into one table
    table = report.label_table
    self.info.metadata["class_names"] = list(table.names)
    self.info.metadata["labels"] = table.to_dict()
    self.info.metadata["source_fingerprint"] = source_fingerprint(report.cases)
    self.info.metadata["orientation_references"] = report.orientation.references
    return {"train": self._generate_examples(report.cases, table.values, report.orientation.orientations)}

  def _generate_examples(self, cases, allowed_labels, orientations):
    yield from case_examples(cases, allowed_labels, orientations)


@contextlib.contextmanager
def _no_custom_config_warning():
  """Without absl's "WARNING:absl:Using custom data configuration: BuilderConfig(...)": every nnU-Net folder is
  a config of its own (named after the folder), not one of a fixed list, so the warning would come with every
  dataset."""
  import logging

  drop = lambda record: not str(record.msg).startswith("Using custom data configuration")
  absl = logging.getLogger("absl")
  absl.addFilter(drop)
  try:
    yield
  finally:
    absl.removeFilter(drop)


def build_nnunet(source_dir: str | os.PathLike, data_dir: str | os.PathLike, progress: bool = True) -> NnunetRaw:
  from autosam_jax.data.validate import validate_nnunet

  source_dir = Path(source_dir).expanduser()
  if not (source_dir / "dataset.json").is_file():
    raise DataError(f"{source_dir}: no dataset.json; give an nnU-Net raw dataset folder (e.g. Dataset027_ACDC)")
  report = validate_nnunet(source_dir)
  config = tfds.core.BuilderConfig(name=_dataset_name(source_dir))
  with _no_custom_config_warning():
    builder = NnunetRaw(config=config, data_dir=str(Path(data_dir).expanduser()), file_format="array_record")
  return prepare(builder, source_dir, source_fingerprint(report.cases), progress)
