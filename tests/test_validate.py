"""Validation of ACDC and nnU-Net raw datasets: a phantom dataset is copied, broken one way, and must fail with one
line that names the offending file, and the CLI must exit 2 (0 for the intact dataset)."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from autosam_jax.data.errors import DataError
from autosam_jax.data.nifti import read_label, read_nifti
from autosam_jax.data.synthetic import save_nifti, write_synthetic_acdc, write_synthetic_nnunet
from autosam_jax.data.validate import validate, validate_acdc, validate_nnunet

SEED = 5


def file_warnings(report) -> list[str]:
  """The report's warnings (the phantoms' short-axis planes are alike: no dataset-wide plane warning)."""
  return list(report.warnings)


@pytest.fixture(scope="module")
def pristine_acdc(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("pristine") / "acdc"
  write_synthetic_acdc(out_dir, 2, SEED)
  return out_dir


@pytest.fixture(scope="module")
def pristine_nnunet(tmp_path_factory):
  return write_synthetic_nnunet(tmp_path_factory.mktemp("pristine") / "Dataset001_Synthetic", 3, SEED)


@pytest.fixture
def acdc(pristine_acdc, tmp_path):
  return shutil.copytree(pristine_acdc, tmp_path / "acdc")


@pytest.fixture
def nnunet(pristine_nnunet, tmp_path):
  return shutil.copytree(pristine_nnunet, tmp_path / "nnunet")


def es_number(patient_dir):
  return int(dict(line.split(": ") for line in (patient_dir / "Info.cfg").read_text().splitlines())["ES"])


def image_of(acdc_dir, patient="patient001", frame_number=1):
  return acdc_dir / patient / f"{patient}_frame{frame_number:02d}.nii.gz"


def label_of(acdc_dir, patient="patient001", frame_number=1):
  return acdc_dir / patient / f"{patient}_frame{frame_number:02d}_gt.nii.gz"


def run_cli(data_dir, capsys, *extra):
  from autosam_jax.cli import main

  code = main(["validate", str(data_dir), *extra])
  return code, capsys.readouterr()


def assert_rejected(data_dir, offending_path, capsys, *fragments, check=validate):
  """The check raises one line naming `offending_path`; the CLI prints it as `error: ...` and exits 2."""
  with pytest.raises(DataError) as caught:
    check(data_dir)
  message = str(caught.value)
  assert "\n" not in message, message
  assert str(offending_path) in message, message
  for fragment in fragments:
    assert fragment in message, message
  code, captured = run_cli(data_dir, capsys)
  assert code == 2
  assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and str(offending_path) in captured.err
  assert captured.out == ""
  return message


def resave(path, transform):
  """Rewrites a NIfTI file after `transform(data, affine, zooms) -> (data, affine, zooms)`."""
  volume = nib.load(path)
  data, affine, zooms = transform(np.asanyarray(volume.dataobj), volume.affine.copy(), volume.header.get_zooms())
  save_nifti(path, data, affine, tuple(zooms))


# ---------------------------------------------------------------- intact datasets


def test_valid_acdc_report_lists_every_frame(acdc, capsys):
  report = validate(acdc)
  assert report.layout == "acdc" and report.root == acdc and file_warnings(report) == []
  assert report.labels == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
  assert report.patient_ids == ["patient001", "patient002"]
  assert [(case.patient_id, case.frame) for case in report.cases] == [
      ("patient001", "ED"), ("patient001", "ES"), ("patient002", "ED"), ("patient002", "ES")]
  for case in report.cases:
    es = es_number(acdc / case.patient_id)
    assert case.frame_number == (1 if case.frame == "ED" else es)
    assert case.case_id == f"{case.patient_id}_frame{case.frame_number:02d}"
    assert case.image_path == image_of(acdc, case.patient_id, case.frame_number)
    assert case.label_path == label_of(acdc, case.patient_id, case.frame_number)
    assert case.info["ED"] == 1 and case.info["ES"] == es and case.info["Group"] in ("DCM", "HCM")
    assert isinstance(case.info["Height"], float)
    assert case.shape == nib.load(case.image_path).shape
    np.testing.assert_allclose(case.spacing, nib.load(case.image_path).header.get_zooms())
  assert report.num_slices == sum(case.shape[2] for case in report.cases)
  assert [case.frame for case in report.cases_of("patient002")] == ["ED", "ES"]

  code, captured = run_cli(acdc, capsys)
  assert code == 0 and captured.err == ""
  assert "ACDC dataset" in captured.out and "2 patients, 4 labeled volumes" in captured.out
  assert len(captured.out.splitlines()) <= 3


def test_acdc_patients_in_a_training_subfolder(acdc, tmp_path):
  release = tmp_path / "ACDC"
  release.mkdir()
  acdc.rename(release / "training")
  (release / "MANDATORY_CITATION.md").write_text("cite\n")
  report = validate(release)
  assert report.layout == "acdc" and report.root == release / "training" and len(report.cases) == 4


def test_uncompressed_nii_and_trailing_singleton_dimension_are_accepted(acdc):
  image_path = image_of(acdc)
  volume = nib.load(image_path)
  nib.save(nib.Nifti1Image(np.asanyarray(volume.dataobj), volume.affine, volume.header), acdc / "patient001" /
           "patient001_frame01.nii")
  image_path.unlink()
  resave(label_of(acdc), lambda data, affine, zooms: (data[..., None], affine, (*zooms, 1.0)))
  report = validate_acdc(acdc)
  assert report.cases[0].image_path.name == "patient001_frame01.nii"
  assert read_label(label_of(acdc), {0, 1, 2, 3}).data.ndim == 3


def test_valid_nnunet_report(nnunet, capsys):
  report = validate(nnunet)
  assert report.layout == "nnunet" and file_warnings(report) == []
  assert [case.case_id for case in report.cases] == ["acdc_001_ED", "acdc_001_ES", "acdc_002_ED"]
  assert report.patient_ids == ["acdc_001", "acdc_002"]  # frames of one patient stay together in splits
  assert [case.frame for case in report.cases] == ["ED", "ES", "ED"]
  assert report.cases[0].image_path == nnunet / "imagesTr" / "acdc_001_ED_0000.nii.gz"
  assert report.cases[0].label_path == nnunet / "labelsTr" / "acdc_001_ED.nii.gz"
  assert report.dataset_json["numTraining"] == 3
  code, captured = run_cli(nnunet, capsys)
  assert code == 0 and "nnU-Net raw dataset" in captured.out and "3 labeled volumes" in captured.out


# ---------------------------------------------------------------- ACDC: each way to break it


def test_truncated_image(acdc, capsys):
  path = image_of(acdc, "patient002")
  content = path.read_bytes()
  path.write_bytes(content[:len(content) // 2])
  assert_rejected(acdc, path, capsys, "truncated or corrupt")


def test_garbage_label(acdc, capsys):
  path = label_of(acdc)
  path.write_bytes(np.random.default_rng(0).bytes(4000))
  assert_rejected(acdc, path, capsys, "cannot read NIfTI")


def test_corrupt_gzip_stream(acdc, capsys):
  # A valid gzip header followed by damaged deflate data: the error surfaces only when the voxels are read.
  path = image_of(acdc)
  content = bytearray(path.read_bytes())
  content[2000:2400] = bytes(400)
  path.write_bytes(bytes(content))
  assert_rejected(acdc, path, capsys, "cannot read NIfTI")


def test_missing_label(acdc, capsys):
  path = label_of(acdc, "patient002", es_number(acdc / "patient002"))
  path.unlink()
  assert_rejected(acdc, path, capsys, "missing label of the ES frame")


def test_missing_image(acdc, capsys):
  path = image_of(acdc)
  path.unlink()
  assert_rejected(acdc, path, capsys, "missing image of the ED frame")


def test_missing_info_cfg(acdc, capsys):
  path = acdc / "patient002" / "Info.cfg"
  path.unlink()
  assert_rejected(acdc, path, capsys, "missing")


@pytest.mark.parametrize("content, fragment", [("ED: 1\nGroup: NOR\n", "no 'ES:' line"),
                                               ("ES: 9\nGroup: NOR\n", "no 'ED:' line"),
                                               ("ED: one\nES: 9\n", "not a frame number"),
                                               ("ED 1\nES: 9\n", "line 1")])
def test_bad_info_cfg(acdc, capsys, content, fragment):
  path = acdc / "patient001" / "Info.cfg"
  path.write_text(content)
  assert_rejected(acdc, path, capsys, fragment)


def test_label_shape_mismatch(acdc, capsys):
  path = label_of(acdc)
  resave(path, lambda data, affine, zooms: (data[:-3], affine, zooms))
  assert_rejected(acdc, path, capsys, "label shape", "differs from image")


def _thicker_slices(data, affine, zooms):
  affine[:3, 2] *= 1.01
  return data, affine, (zooms[0], zooms[1], zooms[2] * 1.01)


def test_label_spacing_mismatch(acdc, capsys):
  path = label_of(acdc)
  resave(path, _thicker_slices)
  assert_rejected(acdc, path, capsys, "voxel spacing", "differs from image")


def test_label_pixdim_that_its_own_sform_contradicts(acdc, capsys):
  path = label_of(acdc)
  resave(path, lambda data, affine, zooms: (data, affine, (zooms[0], zooms[1], zooms[2] * 1.01)))
  assert_rejected(acdc, path, capsys, "pixdim", "and the sform's voxel size", "disagree")


def _flip_axis_0(data, affine, zooms):
  # the same box in space, walked the other way along axis 0: voxel 0 of the label lies on the image's last voxel
  affine[:3, 3] += affine[:3, 0] * (data.shape[0] - 1)
  affine[:3, 0] *= -1
  return data, affine, zooms


def _swap_axes_0_1(data, affine, zooms):  # both in-plane axes have the same spacing, so only the affine tells
  affine[:, [0, 1]] = affine[:, [1, 0]]
  return data, affine, zooms


def _shift_origin(data, affine, zooms):  # 2.5 mm, more than a voxel in-plane
  affine[:3, 3] += 2.5
  return data, affine, zooms


def _rotate_2_degrees(data, affine, zooms):  # about the volume's first voxel, in scanner space
  angle = np.deg2rad(2.0)
  rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
  affine[:3, :3] = rotation @ affine[:3, :3]
  return data, affine, zooms


@pytest.mark.parametrize("transform,kind", [(_flip_axis_0, "voxel axis 0 is flipped"),
                                            (_swap_axes_0_1, "axes are swapped"), (_shift_origin, "shifted by"),
                                            (_rotate_2_degrees, "rotated")])
def test_label_on_another_grid_is_refused(acdc, capsys, transform, kind):
  path = label_of(acdc)
  resave(path, transform)
  message = assert_rejected(acdc, path, capsys, "affine does not match image", image_of(acdc).name, kind,
                            "resample it onto the image")
  assert float(message.split("lands ")[1].split(" voxels")[0]) > 0.5


def test_sub_voxel_affine_noise_is_a_warning(acdc, capsys):
  path = label_of(acdc)

  def jitter(data, affine, zooms):  # 0.2 mm and a little rotation noise: well below a voxel (over 1 mm here)
    affine[:3, 3] += 0.2
    affine[:3, :3] *= 1 + 1e-5
    return data, affine, zooms

  resave(path, jitter)
  report = validate(acdc)
  assert len(report.cases) == 4
  warnings = file_warnings(report)
  assert len(warnings) == 1 and str(path) in warnings[0] and "affine" in warnings[0]
  assert "\n" not in warnings[0]
  moved = float(warnings[0].split("moves ")[1].split(" voxel")[0])
  assert 0.05 < moved < 0.5
  code, captured = run_cli(acdc, capsys)
  assert code == 0
  assert captured.err.startswith("warning: ") and str(path) in captured.err


def test_float32_rounding_of_the_affine_is_no_warning(acdc):
  path = label_of(acdc)
  resave(path, lambda data, affine, zooms: (data, affine + 1e-6 * np.sign(affine), zooms))
  assert read_label(path, range(4)).affine.tolist() != read_nifti(image_of(acdc)).affine.tolist()  # header changed
  assert file_warnings(validate(acdc)) == []


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_image_voxels(acdc, capsys, bad_value):
  path = image_of(acdc, "patient002")

  def insert(data, affine, zooms):
    data = data.astype(np.float32)
    data[10, 20, 1] = bad_value
    return data, affine, zooms

  resave(path, insert)
  assert_rejected(acdc, path, capsys, "NaN or Inf", "(10, 20, 1)")


def test_undeclared_label_value(acdc, capsys):
  path = label_of(acdc, "patient002")

  def insert(data, affine, zooms):
    data = data.copy()
    data[5, 5, 0] = 7
    return data, affine, zooms

  resave(path, insert)
  assert_rejected(acdc, path, capsys, "unexpected label values 7", "allowed: 0, 1, 2, 3")


def test_fractional_label_values(acdc, capsys):
  path = label_of(acdc)
  resave(path, lambda data, affine, zooms: (data.astype(np.float32) * 0.5, affine, zooms))
  assert_rejected(acdc, path, capsys, "non-integer")


def test_4d_image(acdc, capsys):
  path = image_of(acdc)
  resave(path, lambda data, affine, zooms: (np.stack([data, data], axis=-1), affine, (*zooms, 1.0)))
  assert_rejected(acdc, path, capsys, "4D volume", "3D volume is expected")


def test_empty_folder(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  assert_rejected(empty, empty, capsys, "folder is empty")
  assert_rejected(empty, empty, capsys, "folder is empty", check=validate_acdc)


def test_folder_without_patients(tmp_path, capsys):
  folder = tmp_path / "unrelated"
  folder.mkdir()
  (folder / "notes.txt").write_text("hello\n")
  assert_rejected(folder, folder, capsys, "neither ACDC")
  assert_rejected(folder, folder, capsys, "no ACDC patient folders", check=validate_acdc)


def test_a_single_patient_folder(acdc, capsys):
  assert_rejected(acdc / "patient001", acdc / "patient001", capsys, "one ACDC patient's folder")


def test_missing_folder(tmp_path, capsys):
  assert_rejected(tmp_path / "nowhere", tmp_path / "nowhere", capsys, "not found")


# ---------------------------------------------------------------- nnU-Net: each way to break it


def test_nnunet_missing_dataset_json(nnunet, capsys):
  path = nnunet / "dataset.json"
  path.unlink()
  assert_rejected(nnunet, path, capsys, "not found")


def test_nnunet_unparseable_dataset_json(nnunet, capsys):
  path = nnunet / "dataset.json"
  path.write_text('{"labels": {"background": 0,,}')
  assert_rejected(nnunet, path, capsys, "not valid JSON", "line 1")


def test_nnunet_dataset_json_without_labels(nnunet, capsys):
  path = nnunet / "dataset.json"
  path.write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz"}))
  assert_rejected(nnunet, path, capsys, "no 'labels'")


def test_nnunet_image_without_label(nnunet, capsys):
  (nnunet / "labelsTr" / "acdc_001_ES.nii.gz").unlink()
  assert_rejected(nnunet, nnunet / "imagesTr" / "acdc_001_ES_0000.nii.gz", capsys, "image without a label")


def test_nnunet_label_without_image(nnunet, capsys):
  (nnunet / "imagesTr" / "acdc_002_ED_0000.nii.gz").unlink()
  assert_rejected(nnunet, nnunet / "labelsTr" / "acdc_002_ED.nii.gz", capsys, "label without an image")


def test_nnunet_label_outside_declared_labels(nnunet, capsys):
  # Only background, RV and MYO declared: the LV voxels (3) of every label file are unexpected.
  dataset_json = nnunet / "dataset.json"
  dataset = json.loads(dataset_json.read_text())
  dataset["labels"] = {"background": 0, "RV": 1, "MYO": 2}
  dataset_json.write_text(json.dumps(dataset))
  assert_rejected(nnunet, nnunet / "labelsTr" / "acdc_001_ED.nii.gz", capsys, "unexpected label values 3")


def test_nnunet_v1_labels_are_understood(nnunet):
  dataset_json = nnunet / "dataset.json"
  dataset = json.loads(dataset_json.read_text())
  dataset["labels"] = {"0": "background", "1": "RV", "2": "MYO", "3": "LV"}
  dataset_json.write_text(json.dumps(dataset))
  assert validate_nnunet(nnunet).labels == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}


def test_nnunet_truncated_label(nnunet, capsys):
  path = nnunet / "labelsTr" / "acdc_001_ES.nii.gz"
  content = path.read_bytes()
  path.write_bytes(content[:len(content) // 2])
  assert_rejected(nnunet, path, capsys, "truncated or corrupt")


def test_nnunet_shape_mismatch(nnunet, capsys):
  path = nnunet / "labelsTr" / "acdc_002_ED.nii.gz"
  resave(path, lambda data, affine, zooms: (data[:, :-1], affine, zooms))
  assert_rejected(nnunet, path, capsys, "label shape")


def test_nnunet_num_training_mismatch_is_a_warning(nnunet):
  dataset_json = nnunet / "dataset.json"
  dataset = json.loads(dataset_json.read_text())
  dataset["numTraining"] = 10
  dataset_json.write_text(json.dumps(dataset))
  report = validate(nnunet)
  assert len(report.cases) == 3 and len(file_warnings(report)) == 1 and "numTraining" in file_warnings(report)[0]


# ---------------------------------------------------------------- the readers on their own


def test_read_nifti_returns_float32_with_geometry(pristine_acdc):
  volume = read_nifti(image_of(pristine_acdc))
  on_disk = nib.load(image_of(pristine_acdc))
  assert volume.data.dtype == np.float32 and volume.shape == on_disk.shape
  np.testing.assert_array_equal(volume.data, np.asanyarray(on_disk.dataobj).astype(np.float32))
  np.testing.assert_allclose(volume.affine, on_disk.affine)
  assert volume.spacing == tuple(float(z) for z in on_disk.header.get_zooms())
  label = read_label(label_of(pristine_acdc), {0, 1, 2, 3})
  assert label.data.dtype == np.uint8 and set(np.unique(label.data).tolist()) == {0, 1, 2, 3}


def test_read_nifti_on_a_gzip_that_is_not_nifti(tmp_path):
  path = tmp_path / "notes.nii.gz"
  with gzip.open(path, "wb") as f:
    f.write(b"not a nifti header" * 40)
  with pytest.raises(DataError, match="cannot read NIfTI") as caught:
    read_nifti(path)
  assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_nnunet_missing_channel(nnunet, capsys):
  dataset_json = nnunet / "dataset.json"
  dataset = json.loads(dataset_json.read_text())
  dataset["channel_names"] = {"0": "cineMRI", "1": "T2"}
  dataset_json.write_text(json.dumps(dataset))
  assert_rejected(nnunet, nnunet / "imagesTr" / "acdc_001_ED_0001.nii.gz", capsys, "missing channel")
