"""Synthetic ACDC phantoms: ACDC's exact layout, plausible anatomy and geometry, determinism, nnU-Net layout, CLI."""

import json
import re
import stat

import nibabel as nib
import numpy as np
import pytest

from autosam_jax.data import synthetic
from autosam_jax.data.synthetic import ACDC_GROUPS, write_synthetic_acdc, write_synthetic_nnunet

NUM_PATIENTS = 3
SEED = 0


@pytest.fixture(scope="module")
def acdc_dir(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("synthetic") / "acdc"
  patient_dirs = write_synthetic_acdc(out_dir, NUM_PATIENTS, SEED)
  assert patient_dirs == [out_dir / f"patient{k:03d}" for k in range(1, NUM_PATIENTS + 1)]
  return out_dir


@pytest.fixture(scope="module")
def five_phantoms():
  """Patients 1-5: one of each ACDC group."""
  return [synthetic.make_phantom_patient(SEED, number) for number in range(1, 6)]


def read_info(patient_dir):
  return dict(line.split(": ") for line in (patient_dir / "Info.cfg").read_text().splitlines())


def frames(patient_dir):
  """(frame name, image, label) for ED and ES, as nibabel images."""
  info = read_info(patient_dir)
  for name in ("ED", "ES"):
    stem = patient_dir / f"{patient_dir.name}_frame{int(info[name]):02d}"
    yield name, nib.load(f"{stem}.nii.gz"), nib.load(f"{stem}_gt.nii.gz")


def test_layout_and_file_names_are_acdcs(acdc_dir):
  assert sorted(p.name for p in acdc_dir.iterdir()) == ["patient001", "patient002", "patient003"]  # no leftovers
  for patient_dir in acdc_dir.iterdir():
    info = read_info(patient_dir)
    ed, es = int(info["ED"]), int(info["ES"])
    name = patient_dir.name
    assert sorted(p.name for p in patient_dir.iterdir()) == sorted([
        "Info.cfg", f"{name}_frame{ed:02d}.nii.gz", f"{name}_frame{ed:02d}_gt.nii.gz",
        f"{name}_frame{es:02d}.nii.gz", f"{name}_frame{es:02d}_gt.nii.gz"])


def test_info_cfg_lines_are_acdcs(acdc_dir):
  for number in range(1, NUM_PATIENTS + 1):
    lines = (acdc_dir / f"patient{number:03d}" / "Info.cfg").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
    assert lines[0] == "ED: 1"
    assert re.fullmatch(r"ES: (8|9|1[0-5])", lines[1])
    assert lines[2] == f"Group: {ACDC_GROUPS[(number - 1) % 5]}"
    assert re.fullmatch(r"Height: 1\d\d\.0", lines[3])
    assert re.fullmatch(r"NbFrame: \d\d", lines[4]) and int(lines[4].split()[1]) > int(lines[1].split()[1])
    assert re.fullmatch(r"Weight: \d{2,3}\.0", lines[5])


def test_groups_cycle_through_all_five(five_phantoms):
  assert {patient.info["Group"] for patient in five_phantoms} == {"NOR", "MINF", "DCM", "HCM", "RV"}


def test_labels_and_intensities(acdc_dir):
  for patient_dir in acdc_dir.iterdir():
    for _, image, label in frames(patient_dir):
      assert label.get_data_dtype() == np.uint8 and image.get_data_dtype() == np.int16
      labels = np.asanyarray(label.dataobj)
      pixels = np.asanyarray(image.dataobj).astype(np.float32)
      assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
      assert 0 <= pixels.min() and 500 < pixels.max() < 3000
      lv, myo, rv = (pixels[labels == c].mean() for c in (3, 2, 1))
      body = pixels[(labels == 0) & (pixels > 0.3 * lv)]  # tissue around the heart, not air or lung
      assert lv > 2 * myo and rv > 2 * myo  # bright blood, dark myocardium
      assert myo < np.median(body) < lv
      # Texture and noise: tissue is not a flat value.
      assert body.std() > 0.05 * body.mean()


def test_geometry_is_anisotropic_oblique_and_consistent(acdc_dir):
  shapes = set()
  for patient_dir in acdc_dir.iterdir():
    geometry = []
    for _, image, label in frames(patient_dir):
      for volume in (image, label):
        header = volume.header
        zooms = np.array(header.get_zooms())
        assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
        np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), zooms, rtol=1e-5)
        assert zooms[0] == zooms[1] and 1.2 <= zooms[0] <= 1.8 and 5.0 <= zooms[2] <= 10.0
        rotation = volume.affine[:3, :3] / zooms
        assert np.abs(rotation - np.diag(np.diag(rotation))).max() > 0.01  # oblique, not axis-aligned
        x, y, z = volume.shape
        assert 154 <= x <= 256 and 154 <= y <= 256 and x != y and 6 <= z <= 12
        geometry.append((volume.shape, volume.affine))
      shapes.add(image.shape)
    for shape, affine in geometry[1:]:  # ED and ES images and labels share one grid
      assert shape == geometry[0][0]
      np.testing.assert_array_equal(affine, geometry[0][1])
  assert len(shapes) == NUM_PATIENTS


def test_structures_shrink_from_base_to_apex(five_phantoms):
  for number, patient in enumerate(five_phantoms, start=1):
    for frame in (patient.ed, patient.es):
      areas = {name: (np.isin(frame.label, values)).sum(axis=(0, 1))
               for name, values in (("RV", [1]), ("LV", [3]), ("epicardium", [2, 3]))}
      for name, area in areas.items():
        assert np.all(np.diff(area) <= 0), (number, name, area)
        assert area[0] > 0, (number, name, area)
      # The RV ends before the LV: apical slices hold LV/MYO only, or nothing.
      assert np.flatnonzero(areas["RV"]).max() < np.flatnonzero(areas["epicardium"]).max()


def test_es_cavity_smaller_and_myocardium_thicker_than_ed(five_phantoms):
  for patient in five_phantoms:
    volume = {(name, c): (frame.label == c).sum() for name, frame in (("ED", patient.ed), ("ES", patient.es))
              for c in (1, 2, 3)}
    assert volume["ES", 3] < volume["ED", 3]
    assert volume["ES", 1] < volume["ED", 1]
    # The myocardium keeps its volume while the cavity shrinks, so the wall thickens.
    assert abs(volume["ES", 2] / volume["ED", 2] - 1) < 0.15
    assert volume["ES", 2] / volume["ES", 3] > volume["ED", 2] / volume["ED", 3]


def test_same_seed_same_bytes_and_prefix_property(acdc_dir, tmp_path):
  # Patient k depends only on (seed, k): fewer patients give a prefix, a later first id gives the same patient.
  write_synthetic_acdc(tmp_path / "first2", 2, SEED)
  write_synthetic_acdc(tmp_path / "third", 1, SEED, first_patient_id=3)
  for folder, numbers in ((tmp_path / "first2", (1, 2)), (tmp_path / "third", (3,))):
    for number in numbers:
      name = f"patient{number:03d}"
      assert sorted(p.name for p in (folder / name).iterdir()) == sorted(p.name for p in (acdc_dir / name).iterdir())
      for file in (folder / name).iterdir():
        assert file.read_bytes() == (acdc_dir / name / file.name).read_bytes(), file


def test_different_seed_different_phantom():
  first, second = synthetic.make_phantom_patient(0, 1), synthetic.make_phantom_patient(1, 1)
  assert first.ed.image.shape != second.ed.image.shape or not np.array_equal(first.ed.image, second.ed.image)
  assert first.spacing != second.spacing


def test_existing_patient_folder_is_not_overwritten(acdc_dir):
  before = (acdc_dir / "patient001" / "Info.cfg").read_text()
  with pytest.raises(synthetic.DataError, match="patient001: already exists"):
    write_synthetic_acdc(acdc_dir, 1, SEED + 1)
  assert (acdc_dir / "patient001" / "Info.cfg").read_text() == before


def test_nnunet_layout_holds_the_same_phantoms(acdc_dir, tmp_path):
  out_dir = write_synthetic_nnunet(tmp_path / "Dataset001_Synthetic", 3, SEED)
  assert json.loads((out_dir / "dataset.json").read_text()) == {
      "channel_names": {"0": "cineMRI"}, "labels": {"background": 0, "RV": 1, "MYO": 2, "LV": 3},
      "numTraining": 3, "file_ending": ".nii.gz"}
  cases = ["acdc_001_ED", "acdc_001_ES", "acdc_002_ED"]
  assert sorted(p.name for p in (out_dir / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in cases]
  assert sorted(p.name for p in (out_dir / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
  assert sorted(p.name for p in out_dir.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
  acdc_frames = {name: (image, label) for name, image, label in frames(acdc_dir / "patient001")}
  for frame in ("ED", "ES"):
    image = nib.load(out_dir / "imagesTr" / f"acdc_001_{frame}_0000.nii.gz")
    label = nib.load(out_dir / "labelsTr" / f"acdc_001_{frame}.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), np.asanyarray(acdc_frames[frame][0].dataobj))
    np.testing.assert_array_equal(np.asanyarray(label.dataobj), np.asanyarray(acdc_frames[frame][1].dataobj))


def synth_acdc(argv) -> int:
  from autosam_jax.cli import main

  return main(["synth-acdc", *argv])


def test_cli_writes_atomically_and_refuses_a_non_empty_folder(tmp_path, capsys):
  out_dir = tmp_path / "acdc"
  out_dir.mkdir()  # an existing empty folder is fine
  assert synth_acdc([str(out_dir), "--patients", "1", "--seed", "3"]) == 0
  summary = capsys.readouterr().out.strip()
  assert "\n" not in summary and "1 synthetic ACDC patients" in summary and str(out_dir) in summary
  assert [p.name for p in out_dir.iterdir()] == ["patient001"]
  assert stat.S_IMODE(out_dir.stat().st_mode) & 0o055  # not left private, as a temporary folder would be
  assert sorted(p.name for p in tmp_path.iterdir()) == ["acdc"]  # no temporary folder left behind

  assert synth_acdc([str(out_dir), "--patients", "1", "--seed", "4", "--nnunet"]) == 2
  error = capsys.readouterr().err
  assert error.startswith("error: ") and error.count("\n") == 1 and str(out_dir) in error
  assert [p.name for p in out_dir.iterdir()] == ["patient001"]


def test_cli_nnunet(tmp_path, capsys):
  out_dir = tmp_path / "nnunet"
  assert synth_acdc([str(out_dir), "--patients", "1", "--nnunet"]) == 0
  assert "2 synthetic nnU-Net cases" in capsys.readouterr().out
  assert json.loads((out_dir / "dataset.json").read_text())["numTraining"] == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["nnunet"]
