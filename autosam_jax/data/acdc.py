"""TFDS builder for ACDC (Automated Cardiac Diagnosis Challenge), written as array_record, read without TensorFlow.

  builder = build_acdc(source_dir="~/data/ACDC", data_dir="~/tensorflow_datasets")
  slices = builder.as_data_source(split="train")     # random access, no TensorFlow

Every patient's ED and ES frames become 2D slice examples (see `autosam_jax.data.slices`). The source folder is
validated first (`autosam_jax.data.validate`): a broken file stops the build with one line naming it, before anything
is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow_datasets as tfds

from autosam_jax.data.errors import DataError
from autosam_jax.data.labels import ACDC_TABLE
from autosam_jax.faults import kill_point
from autosam_jax.data.slices import slice_features, volume_to_examples


_INSTRUCTIONS = """\
ACDC cannot be downloaded automatically: its terms require registration.
1. Register and download the ACDC training data from https://www.creatis.insa-lyon.fr/Challenge/acdc/
   (or https://humanheart-project.creatis.insa-lyon.fr/database/).
2. Unpack it so that SOURCE_DIR/training/patient001/Info.cfg exists (SOURCE_DIR/testing/ is used too when its
   patients have *_gt.nii.gz labels).
3. Build: autosam-jax build-dataset acdc SOURCE_DIR --tfds-dir DATA_DIR
"""


class QuietBuild:
  """TFDS's announcements of a download, left out: these builds download nothing (the files are local and validated
  first), and TFDS knows no size to announce ("Downloading and preparing dataset Unknown size ...")."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


def case_examples(cases, allowed_labels, orientations):
  """Slice examples of validated cases (`autosam_jax.data.validate.Case`), each cut along its through-plane axis in
  the canonical voxel order chosen once for the dataset (`orientations`: {case id: Orientation}, from
  `validate.dataset_orientation`), so stacks planned a few degrees apart are not cut mirrored against each other."""
  from autosam_jax.data.nifti import read_label, read_nifti

  for case in cases:
    image = read_nifti(case.image_path)
    label = read_label(case.label_path, set(allowed_labels))
    orientation = orientations[case.case_id]
    for example in volume_to_examples(case.case_id, case.patient_id, case.frame or "", image.data, label.data,
                                      image.spacing, image.affine, orientation):
      kill_point("build.example")
      yield example


def source_fingerprint(cases) -> str:
  """SHA-256 over the image and label files a dataset is built from (their names and bytes)."""
  import hashlib

  digest = hashlib.sha256()
  for case in sorted(cases, key=lambda c: c.case_id):
    for path in (case.image_path, case.label_path):
      digest.update(Path(path).name.encode())
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
          digest.update(chunk)
  return digest.hexdigest()


class Acdc(QuietBuild, tfds.core.GeneratorBasedBuilder):
  """ACDC cine-MRI, ED and ES frames, as 2D short-axis slices with labels 0 bg, 1 RV, 2 MYO, 3 LV."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "2D slices of the ED and ES frames with geometry for reassembly.",
                   "1.1.0": "Slices along the through-plane axis of a canonical voxel order chosen from the geometry, "
                            "with the orientation recorded; spacing in canonical order.",
                   "1.2.0": "In-plane order chosen once per dataset (reference frames in the metadata); spacing from "
                            "the sform in the header's unit."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__class__.__doc__, features=slice_features(),
        homepage="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
        metadata=tfds.core.MetadataDict(class_names=list(ACDC_TABLE.names), labels=ACDC_TABLE.to_dict()))

  def _split_generators(self, dl_manager):
    from autosam_jax.data.validate import dataset_orientation

    reports = validated_acdc_parts(Path(dl_manager.manual_dir))
    cases = [c for r in reports.values() for c in r.cases]
    self.info.metadata["source_fingerprint"] = source_fingerprint(cases)
    # training and testing patients cut in one frame
    chosen = reports["train"].orientation if len(reports) == 1 else dataset_orientation(cases)
    self.info.metadata["orientation_references"] = chosen.references
    return {split: self._generate_examples(report.cases, chosen.orientations) for split, report in reports.items()}

  def _generate_examples(self, cases, orientations):
    yield from case_examples(cases, ACDC_TABLE.values, orientations)


def validated_acdc_parts(root: Path) -> dict:
  """{"train": report of training/, "test": report of testing/ when it holds labels}."""
  from autosam_jax.data.validate import validate_acdc

  training = root / "training" if (root / "training").is_dir() else root
  reports = {"train": validate_acdc(training)}
  testing = root / "testing"
  if testing.is_dir() and any(testing.glob("patient*/*_gt.nii.gz")):
    reports["test"] = validate_acdc(testing)
  return reports


def build_acdc(source_dir: str | os.PathLike, data_dir: str | os.PathLike, progress: bool = True) -> Acdc:
  """Validates SOURCE_DIR, then writes the dataset under DATA_DIR (with TFDS's progress bars if `progress`); an
  existing build is reused only if it was made from the same files."""
  source_dir = Path(source_dir).expanduser()
  if not source_dir.is_dir():
    raise DataError(f"{source_dir}: no such directory; {_INSTRUCTIONS.splitlines()[0]}")
  reports = validated_acdc_parts(source_dir)  # fails fast, before anything is written
  builder = Acdc(data_dir=str(Path(data_dir).expanduser()), file_format="array_record")
  return prepare(builder, source_dir, source_fingerprint([c for r in reports.values() for c in r.cases]), progress)


def prepare(builder, source_dir: Path, fingerprint: str, progress: bool = True):
  """download_and_prepare, refusing to reuse a build made from other source files.

  TFDS writes into `DATA_DIR/NAME/incomplete.*` and renames the finished build into place; a killed build leaves
  that folder behind. Builds hold an exclusive lock on `DATA_DIR/NAME` (released by the kernel however the process
  ends), so a build that gets the lock knows every `incomplete.*` there is stale and deletes it first."""
  import fcntl
  import shutil

  data_path = Path(builder.data_dir)
  dataset_dir = data_path.parent
  if not (data_path / "dataset_info.json").exists():  # a finished build is only read: a read-only folder serves
    from autosam_jax.outputs import check_writable

    check_writable(dataset_dir, "--tfds-dir")
  dataset_dir.mkdir(parents=True, exist_ok=True)
  lock = os.open(dataset_dir, os.O_RDONLY)
  try:
    fcntl.flock(lock, fcntl.LOCK_EX)
    for stale in dataset_dir.glob("incomplete.*"):
      shutil.rmtree(stale, ignore_errors=True)
    if (data_path / "dataset_info.json").exists():
      built_from = builder.info.metadata.get("source_fingerprint")
      if built_from != fingerprint:
        raise DataError(f"{data_path}: was built from other source files than {source_dir} (changed since, or "
                        "another dataset of the same layout); delete that folder to rebuild it, or choose another "
                        "--tfds-dir (a sweep's tfds_dir)")
      return builder
    tfds.display_progress_bar(progress)  # TFDS's switch is a global: set for every build
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(source_dir)))
    return builder
  finally:
    os.close(lock)
