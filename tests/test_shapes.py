"""Blob datasets in nnU-Net's raw layout: dataset.json in both versions, declared labels only, consistent pairs,
voxel orders that keep every voxel's world position (checked with nibabel's own reorientation), determinism, and a
staged write that never leaves a partial folder."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from autosam_jax.data import shapes
from autosam_jax.data.errors import DataError
from autosam_jax.data.shapes import write_shapes_dataset
from autosam_jax.data.validate import validate_nnunet

SEED = 3
TWO = ("liver", "tumour")
FIVE = ("GM", "WM", "CSF", "lesion", "vessel")


def file_bytes(folder):
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def load(path):
  image = nib.load(str(path))
  return np.asanyarray(image.dataobj), image


@pytest.fixture(scope="module")
def two_class(tmp_path_factory):
  return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "Dataset101_Two", num_cases=6, class_names=TWO,
                              seed=SEED)


@pytest.fixture(scope="module")
def five_class(tmp_path_factory):
  return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "Dataset102_Five", num_cases=6, class_names=FIVE,
                              seed=SEED, spacing=(1.5, 1.5, 4.0), shape=(40, 36, 10))


def test_layout_and_dataset_json_v2(two_class):
  case_ids = [f"case_{k:03d}" for k in range(6)]
  assert sorted(p.name for p in two_class.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]
  assert sorted(p.name for p in (two_class / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in case_ids]
  assert sorted(p.name for p in (two_class / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in case_ids]
  assert json.loads((two_class / "dataset.json").read_text()) == {
      "channel_names": {"0": "MRI"}, "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": 6,
      "file_ending": ".nii.gz"}


def test_dataset_json_v1_and_channels(tmp_path):
  out = write_shapes_dataset(tmp_path / "v1", num_cases=3, class_names=FIVE, seed=SEED, dataset_json_version=1,
                             num_channels=2)
  dataset = json.loads((out / "dataset.json").read_text())
  assert dataset["labels"] == {"0": "background", "1": "GM", "2": "WM", "3": "CSF", "4": "lesion", "5": "vessel"}
  assert dataset["modality"] == {"0": "MRI", "1": "MRI2"}
  assert dataset["numTraining"] == 3
  assert dataset["training"] == [
      {"image": f"./imagesTr/case_{k:03d}.nii.gz", "label": f"./labelsTr/case_{k:03d}.nii.gz"} for k in range(3)]
  assert "channel_names" not in dataset and "file_ending" not in dataset
  assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
      f"case_{k:03d}_{c:04d}.nii.gz" for k in range(3) for c in range(2)]
  # Channel 0 is the one-channel dataset's; channel 1 is another contrast of the same label map.
  single = write_shapes_dataset(tmp_path / "single", num_cases=3, class_names=FIVE, seed=SEED)
  for k in range(3):
    channel0 = (out / "imagesTr" / f"case_{k:03d}_0000.nii.gz").read_bytes()
    assert channel0 == (single / "imagesTr" / f"case_{k:03d}_0000.nii.gz").read_bytes()
    assert (out / "labelsTr" / f"case_{k:03d}.nii.gz").read_bytes() == \
        (single / "labelsTr" / f"case_{k:03d}.nii.gz").read_bytes()
    first, _ = load(out / "imagesTr" / f"case_{k:03d}_0000.nii.gz")
    second, _ = load(out / "imagesTr" / f"case_{k:03d}_0001.nii.gz")
    label, _ = load(out / "labelsTr" / f"case_{k:03d}.nii.gz")
    order_first = np.argsort([first[label == c].mean() for c in range(1, 6)])
    order_second = np.argsort([second[label == c].mean() for c in range(1, 6)])
    assert not np.array_equal(order_first, order_second)


@pytest.mark.parametrize("dataset", ["two_class", "five_class"])
def test_labels_are_the_declared_classes_present_in_most_cases_and_slices(dataset, request):
  folder = request.getfixturevalue(dataset)
  num_classes = len(json.loads((folder / "dataset.json").read_text())["labels"]) - 1
  seen = set()
  cases_with = np.zeros(num_classes + 1, dtype=int)
  for path in sorted((folder / "labelsTr").iterdir()):
    label, _ = load(path)
    assert label.dtype == np.uint8
    values = set(np.unique(label).tolist())
    assert values <= set(range(num_classes + 1))
    seen |= values
    for value in values:
      slices_with = int(np.any(label == value, axis=(0, 1)).sum())
      # A class that is there covers at least a fifth of the slices, not a speck in one.
      assert slices_with >= max(2, label.shape[2] // 5), (path, value, slices_with)
      cases_with[value] += 1
  assert seen == set(range(num_classes + 1))
  assert (cases_with >= 5).all(), cases_with  # 6 cases: every class in most of them


def test_each_class_has_its_own_intensity(five_class):
  """Learnable from intensity alone: in every case, the classes' mean intensities lie further apart than the spread
  of intensities within a class (noise, texture, bias and blurred edges together)."""
  for path in sorted((five_class / "labelsTr").iterdir()):
    label, _ = load(path)
    image, _ = load(five_class / "imagesTr" / path.name.replace(".nii.gz", "_0000.nii.gz"))
    image = image.astype(np.float64)
    means = np.array([image[label == value].mean() for value in range(6)])
    within = np.median([image[label == value].std() for value in range(1, 6)])
    gaps = np.diff(np.sort(means))
    assert gaps.min() > within, (path, means, within)


@pytest.mark.parametrize("dataset", ["two_class", "five_class"])
def test_image_and_label_share_grid_and_spacing(dataset, request):
  folder = request.getfixturevalue(dataset)
  for label_path in sorted((folder / "labelsTr").iterdir()):
    label, label_image = load(label_path)
    image, image_image = load(folder / "imagesTr" / label_path.name.replace(".nii.gz", "_0000.nii.gz"))
    assert image.shape == label.shape and image.dtype == np.int16
    np.testing.assert_array_equal(image_image.affine, label_image.affine)
    np.testing.assert_allclose(np.linalg.norm(label_image.affine[:3, :3], axis=0), label_image.header.get_zooms(),
                               rtol=1e-5)
    np.testing.assert_allclose(image_image.get_qform(), image_image.get_sform(), atol=1e-4)


def test_same_arguments_same_bytes_and_prefix(two_class, tmp_path):
  again = write_shapes_dataset(tmp_path / "again", num_cases=6, class_names=TWO, seed=SEED)
  assert file_bytes(again) == file_bytes(two_class)
  fewer = write_shapes_dataset(tmp_path / "fewer", num_cases=3, class_names=TWO, seed=SEED)
  fewer_files = {name: data for name, data in file_bytes(fewer).items() if name != "dataset.json"}
  assert fewer_files == {name: file_bytes(two_class)[name] for name in fewer_files}
  other = write_shapes_dataset(tmp_path / "other", num_cases=6, class_names=TWO, seed=SEED + 1)
  assert file_bytes(other)["labelsTr/case_000.nii.gz"] != file_bytes(two_class)["labelsTr/case_000.nii.gz"]


@pytest.mark.parametrize("voxel_order,flips", [((1, 0, 2), (False, False, False)), ((0, 1, 2), (True, False, True)),
                                               ((2, 0, 1), (False, True, False)), ((1, 2, 0), (True, True, True))])
def test_voxel_orders_store_the_same_world_content(voxel_order, flips, tmp_path):
  arguments = dict(num_cases=2, class_names=FIVE, seed=SEED, spacing=(0.8, 1.2, 3.0), shape=(30, 26, 12))
  reference = write_shapes_dataset(tmp_path / "ras", **arguments)
  reordered = write_shapes_dataset(tmp_path / "reordered", voxel_order=voxel_order, flips=flips, **arguments)
  # Stored axis i runs along world axis voxel_order[i], backwards when flipped: nibabel reads that off the affine.
  expected_orientation = [[axis, -1.0 if flip else 1.0] for axis, flip in zip(voxel_order, flips)]
  rng = np.random.default_rng(0)
  for relative in ("imagesTr/case_000_0000.nii.gz", "labelsTr/case_000.nii.gz", "labelsTr/case_001.nii.gz"):
    ref_data, ref_image = load(reference / relative)
    new_data, new_image = load(reordered / relative)
    np.testing.assert_array_equal(nib.io_orientation(ref_image.affine), [[0, 1.0], [1, 1.0], [2, 1.0]])
    np.testing.assert_array_equal(nib.io_orientation(new_image.affine), expected_orientation)
    assert new_data.shape == tuple(ref_data.shape[axis] for axis in voxel_order)
    np.testing.assert_allclose(new_image.header.get_zooms(), [(0.8, 1.2, 3.0)[axis] for axis in voxel_order])
    assert new_data.shape != ref_data.shape or not np.array_equal(new_data, ref_data)  # really stored differently

    ref_canonical, new_canonical = nib.as_closest_canonical(ref_image), nib.as_closest_canonical(new_image)
    np.testing.assert_array_equal(np.asanyarray(new_canonical.dataobj), np.asanyarray(ref_canonical.dataobj))
    np.testing.assert_allclose(new_canonical.affine, ref_canonical.affine, atol=1e-4)

    # Any stored voxel, mapped to world mm and back into the reference grid, holds the same value.
    index = np.stack([rng.integers(0, n, size=50) for n in new_data.shape])
    world = new_image.affine[:3, :3] @ index + new_image.affine[:3, 3:4]
    ref_index = np.linalg.solve(ref_image.affine[:3, :3], world - ref_image.affine[:3, 3:4])
    ref_index_rounded = np.rint(ref_index).astype(int)
    np.testing.assert_allclose(ref_index, ref_index_rounded, atol=1e-3)
    np.testing.assert_array_equal(new_data[tuple(index)], ref_data[tuple(ref_index_rounded)])


def test_oblique_affine_and_axis_aligned_option(tmp_path):
  oblique = write_shapes_dataset(tmp_path / "oblique", num_cases=2, class_names=TWO, seed=SEED, spacing=(1, 1, 2))
  straight = write_shapes_dataset(tmp_path / "straight", num_cases=2, class_names=TWO, seed=SEED, spacing=(1, 1, 2),
                                  oblique_degrees=0.0)
  for case in ("case_000", "case_001"):
    _, tilted = load(oblique / "labelsTr" / f"{case}.nii.gz")
    _, aligned = load(straight / "labelsTr" / f"{case}.nii.gz")
    np.testing.assert_allclose(aligned.affine[:3, :3], np.diag([1.0, 1.0, 2.0]), atol=1e-6)
    off_diagonal = tilted.affine[:3, :3] - np.diag(np.diag(tilted.affine[:3, :3]))
    assert 0 < np.abs(off_diagonal).max() < np.sin(np.radians(shapes.MAX_OBLIQUE_DEGREES)) * 2.0
    # The rotation turns the grid in the world but leaves the voxels' content as it is.
    np.testing.assert_array_equal(load(oblique / "labelsTr" / f"{case}.nii.gz")[0],
                                  load(straight / "labelsTr" / f"{case}.nii.gz")[0])


def test_validator_reads_both_versions(two_class, five_class, tmp_path):
  report = validate_nnunet(two_class)
  assert report.labels == {"background": 0, "liver": 1, "tumour": 2}
  assert [case.case_id for case in report.cases] == [f"case_{k:03d}" for k in range(6)]
  assert report.patient_ids == [f"case_{k:03d}" for k in range(6)]  # no frame suffix: each case its own patient
  assert report.warnings == []
  report = validate_nnunet(five_class)
  assert report.labels == {"background": 0, **{name: value for value, name in enumerate(FIVE, start=1)}}
  assert {case.shape for case in report.cases} == {(40, 36, 10)}
  assert {case.spacing for case in report.cases} == {(1.5, 1.5, 4.0)}
  v1 = write_shapes_dataset(tmp_path / "v1", num_cases=2, class_names=FIVE, seed=SEED, dataset_json_version=1)
  assert validate_nnunet(v1).labels == validate_nnunet(five_class).labels


def test_existing_target_is_refused_and_nothing_is_left_behind(two_class, tmp_path):
  target = tmp_path / "taken"
  target.mkdir()
  (target / "mine.txt").write_text("keep")
  with pytest.raises(DataError, match="already exists"):
    write_shapes_dataset(target, num_cases=2, class_names=TWO, seed=SEED)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
  assert sorted(p.name for p in target.iterdir()) == ["mine.txt"]


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
  calls = []
  original = shapes.save_nifti

  def failing_save(*args, **kwargs):
    calls.append(args[0])
    if len(calls) == 3:
      raise OSError("disk full")
    original(*args, **kwargs)

  monkeypatch.setattr(shapes, "save_nifti", failing_save)
  with pytest.raises(OSError, match="disk full"):
    write_shapes_dataset(tmp_path / "out", num_cases=4, class_names=TWO, seed=SEED)
  assert len(calls) == 3
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [dict(class_names=()), dict(class_names=("a", "a")), dict(class_names=("background",)),
                                 dict(class_names="ab"), dict(voxel_order=(0, 0, 1)), dict(flips=(True, False)),
                                 dict(dataset_json_version=3), dict(spacing=(1.0, 0.0, 1.0)), dict(shape=(48, 48)),
                                 dict(num_cases=0), dict(seed=-1), dict(oblique_degrees=60.0)])
def test_bad_arguments_are_refused_before_writing(bad, tmp_path):
  arguments = dict(num_cases=2, class_names=TWO, seed=SEED) | bad
  with pytest.raises(ValueError):
    write_shapes_dataset(tmp_path / "out", **arguments)
  assert list(tmp_path.iterdir()) == []
