"""The MNI152 slab dataset, built from a small synthetic template with the real files' names (nilearn not needed):
world positions kept by each slab's affine, tissue labels by the probability rule, hemispheres by world x (with a
flipped and sheared x axis), dataset.json, identical bytes on rebuilds, and refusals that leave folders untouched."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from autosam_jax.cli import main
from autosam_jax.data import mni
from autosam_jax.data.errors import DataError
from autosam_jax.data.validate import validate_nnunet

SHAPE = (20, 24, 30)
# x runs right-to-left (voxel order and world order disagree) and leans with z, so world x depends on the slice;
# anisotropic voxels and an offset. Entries are exact in float32, and world x = 0 falls on voxel centres.
AFFINE = np.array([[-1.5, 0.0, 0.25, 15.0], [0.0, 1.25, 0.0, -17.5], [0.0, 0.0, 2.0, -20.0], [0.0, 0.0, 0.0, 1.0]])
BRAIN = (5, 25)  # slices 5..24 hold brain; slice 3 a speck below MIN_BRAIN_FRACTION; the rest none
THICKNESS, CASES = 4, 5  # 20 slices: the slabs tile the brain exactly


def file_bytes(folder):
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def world(affine, i, j, k):
  return affine @ np.array([i, j, k, 1.0])


@pytest.fixture(scope="module")
def template(tmp_path_factory):
  """The three files in a folder; grey matter as float probabilities, white matter as nilearn's 8-bit integers."""
  folder = tmp_path_factory.mktemp("template")
  rng = np.random.default_rng(0)
  t1 = np.rint(rng.uniform(0.0, 1000.0, SHAPE)).astype(np.float32)
  gm = rng.uniform(0.0, 1.0, SHAPE).astype(np.float32)
  wm = np.rint(rng.uniform(0.0, 255.0, SHAPE)).astype(np.uint8)
  gm[..., :BRAIN[0]] = 0.0
  wm[..., :BRAIN[0]] = 0
  gm[..., BRAIN[1]:] = 0.0
  wm[..., BRAIN[1]:] = 0
  gm[2, 3, 3] = 0.9  # one voxel of grey matter in slice 3: almost no brain, so no slab starts there
  gm[4:8, 5, 10], wm[4:8, 5, 10] = 0.6, 153  # ties (153 / 255 == 0.6): grey matter wins
  for name, data in (("t1", t1), ("gm", gm), ("wm", wm)):
    nib.save(nib.Nifti1Image(data, AFFINE), str(folder / mni.TEMPLATE_FILES[name]))
  return folder, t1, gm.astype(np.float64), wm / 255.0


def build(out, template_dir, **options):
  options = {"slab_thickness": THICKNESS, "num_cases": CASES, **options}
  return mni.build_mni_dataset(out, template_dir, **options)


@pytest.fixture(scope="module")
def built(template, tmp_path_factory):
  folder = template[0]
  out = tmp_path_factory.mktemp("built")
  return build(out / "tissue", folder), out / "tissue", build(out / "hemi", folder, hemispheres=True), out / "hemi"


def cases(out):
  return sorted(p.name[:-len(".nii.gz")] for p in (out / "labelsTr").iterdir())


def test_slabs_keep_world_positions_and_t1_values(template, built):
  _, t1, _, _ = template
  out = built[1]
  assert cases(out) == [f"mni152_z{z:03d}" for z in (5, 9, 13, 17, 21)]
  for case in cases(out):
    z0 = int(case[-3:])
    image = nib.load(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
    label = nib.load(str(out / "labelsTr" / f"{case}.nii.gz"))
    assert image.shape == label.shape == (*SHAPE[:2], THICKNESS)
    assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj), t1[:, :, z0:z0 + THICKNESS])
    for stored in (image, label):
      for i, j, k in ((0, 0, 0), (19, 23, 3), (7, 11, 2), (19, 0, 1)):
        np.testing.assert_allclose(world(stored.affine, i, j, k), world(AFFINE, i, j, z0 + k), rtol=0, atol=1e-5)
      assert int(stored.header["sform_code"]) == 4 and int(stored.header["qform_code"]) == 4  # MNI152 space


def test_labels_follow_the_probability_rule(template, built):
  _, _, gm, wm = template
  out = built[1]
  probabilities = np.stack([gm, wm])
  expected = np.argmax(probabilities, axis=0).astype(np.uint8) + 1  # argmax takes the first (grey) on a tie
  expected[probabilities.max(axis=0) < 0.5] = 0
  assert (expected[4:8, 5, 10] == 1).all()
  for case in cases(out):
    z0 = int(case[-3:])
    label = np.asarray(nib.load(str(out / "labelsTr" / f"{case}.nii.gz")).dataobj)
    np.testing.assert_array_equal(label, expected[:, :, z0:z0 + THICKNESS])
    assert set(np.unique(label)) == {0, 1, 2}


def test_hemispheres_split_by_world_x(built):
  tissue_dir, hemi_dir = built[1], built[3]
  i, _, k = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), np.arange(THICKNESS), indexing="ij")
  on_midline = 0
  for case in cases(hemi_dir):
    z0 = int(case[-3:])
    tissue = np.asarray(nib.load(str(tissue_dir / "labelsTr" / f"{case}.nii.gz")).dataobj)
    hemi = np.asarray(nib.load(str(hemi_dir / "labelsTr" / f"{case}.nii.gz")).dataobj)
    x = AFFINE[0, 0] * i + AFFINE[0, 2] * (z0 + k) + AFFINE[0, 3]  # the template's world x, not the slab's
    assert (x < 0).any() and (x > 0).any()
    on_midline += int(np.count_nonzero((x == 0) & (tissue > 0)))
    left, right = x < 0, x >= 0  # the midline plane goes right
    expected = np.zeros_like(tissue)
    expected[(tissue == 1) & left], expected[(tissue == 1) & right] = 1, 2
    expected[(tissue == 2) & left], expected[(tissue == 2) & right] = 3, 4
    np.testing.assert_array_equal(hemi, expected)
    assert (hemi[:2] % 2 == 0)[tissue[:2] > 0].all()  # the first voxels along the flipped x axis are right
    assert (hemi[-2:] % 2 == 1)[tissue[-2:] > 0].all()
  assert on_midline > 0


def test_dataset_json_and_validation(built):
  tissue, tissue_dir, hemi, hemi_dir = built
  for dataset, folder, labels in ((tissue, tissue_dir, {"background": 0, "gm": 1, "wm": 2}),
                                  (hemi, hemi_dir, {"background": 0, "gm_left": 1, "gm_right": 2, "wm_left": 3,
                                                    "wm_right": 4})):
    on_disk = json.loads((folder / "dataset.json").read_text())
    assert on_disk == dataset
    assert on_disk["labels"] == labels
    assert on_disk["channel_names"] == {"0": "T1"} and on_disk["file_ending"] == ".nii.gz"
    assert on_disk["numTraining"] == CASES
    report = validate_nnunet(folder)
    assert report.labels == labels and len(report.cases) == CASES and report.warnings == []


def test_same_options_give_the_same_bytes(template, built, tmp_path):
  folder = template[0]
  assert main(["make-mni-dataset", str(tmp_path / "again"), "--template-dir", str(folder), "--slab-thickness",
               str(THICKNESS), "--cases", str(CASES)]) == 0
  reference = file_bytes(built[1])
  assert file_bytes(tmp_path / "again") == reference
  build(tmp_path / "again", folder)  # an earlier build with the same options is rebuilt, to the same bytes
  assert file_bytes(tmp_path / "again") == reference
  assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no staging folder left beside it


def test_missing_template_file_names_it(template, tmp_path, monkeypatch):
  partial = tmp_path / "partial"
  shutil.copytree(template[0], partial)
  (partial / mni.TEMPLATE_FILES["wm"]).unlink()
  with pytest.raises(DataError, match=rf"{mni.TEMPLATE_FILES['wm']}: not found; pip install --no-deps nilearn"):
    build(tmp_path / "out", partial)
  assert not (tmp_path / "out").exists()
  # without --template-dir: nilearn's data folder, found without importing nilearn, or one line when it is missing
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(DataError, match=rf"{mni.TEMPLATE_FILES['t1']}: not found, nilearn is not installed"):
    build(tmp_path / "out", None)
  package = tmp_path / "site" / "nilearn"
  shutil.copytree(template[0], package / "datasets" / "data")
  spec = importlib.machinery.ModuleSpec("nilearn", None, is_package=True)
  spec.submodule_search_locations = [str(package)]
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "nilearn" else None)
  assert mni.find_template_dir() == package / "datasets" / "data"
  assert build(tmp_path / "out", None)["numTraining"] == CASES


def test_foreign_or_other_options_folder_is_refused_untouched(template, built, tmp_path):
  folder = template[0]
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine\n")
  with pytest.raises(DataError, match="is not empty .*notes.txt"):
    build(foreign, folder)
  assert file_bytes(foreign) == {"notes.txt": b"mine\n"}
  earlier = tmp_path / "earlier"
  shutil.copytree(built[1], earlier)
  with pytest.raises(DataError, match="another hemispheres"):
    build(earlier, folder, hemispheres=True)
  assert file_bytes(earlier) == file_bytes(built[1])
  with pytest.raises(DataError, match=r"--cases 6 x --slab-thickness 4: needs 24 slices but the brain spans 20"):
    build(tmp_path / "too_many", folder, num_cases=6)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "foreign"]
