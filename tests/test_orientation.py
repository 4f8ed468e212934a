"""The canonical slicing order: chosen from the world geometry, the same for every voxel order of one scan, exactly
invertible, in agreement with nibabel's own orientation functions, and followed by `predict` end to end."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from autosam_jax.data.errors import DataError
from autosam_jax.data.orientation import Orientation, choose_orientation, plane_disagreement

# Every voxel order of a 3D volume: a permutation of the axes and a flip of each (48 in all), as nibabel orientations
# (row i: [the new position of stored axis i, +1 kept / -1 reversed]).
ALL_ORNTS = [np.array([[p[i], f[i]] for i in range(3)], float)
             for p in itertools.permutations(range(3)) for f in itertools.product((1, -1), repeat=3)]


def rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
  """A random rotation by at most `max_degrees` about a random axis (Rodrigues), so axes stay closest to their own."""
  axis = rng.normal(size=3)
  axis /= np.linalg.norm(axis)
  angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees))
  cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def make_affine(directions: np.ndarray, spacing, origin=(10.0, -20.0, 30.0)) -> np.ndarray:
  affine = np.eye(4)
  affine[:3, :3] = np.asarray(directions, float) * np.asarray(spacing, float)[None, :]
  affine[:3, 3] = origin
  return affine


def reorder(data: np.ndarray, affine: np.ndarray, spacing, ornt: np.ndarray):
  """The same world content in another voxel order, as nibabel writes it: data, affine and spacing moved together."""
  new_data = apply_orientation(data, ornt)
  new_affine = affine @ inv_ornt_aff(ornt, data.shape)
  new_spacing = [0.0, 0.0, 0.0]
  for old, (new, _) in enumerate(ornt):
    new_spacing[int(new)] = spacing[old]
  return new_data, new_affine, tuple(new_spacing)


def closest_to_z(affine: np.ndarray) -> int:
  """The voxel axis whose direction has the largest S/I component (unique for the mildly oblique test affines)."""
  directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
  return int(np.argmax(np.abs(directions[2])))


@pytest.mark.parametrize("thick_axis", [0, 1, 2])
@pytest.mark.parametrize("world_of_thick", [0, 1, 2])
def test_the_thick_slice_axis_is_the_slice_axis_wherever_it_is_stored(thick_axis, world_of_thick):
  rng = np.random.default_rng(10 * thick_axis + world_of_thick)
  spacing = [1.5, 1.5, 1.5]
  spacing[thick_axis] = 10.0
  # stored axis `thick_axis` along world `world_of_thick`, the others along the remaining world axes, mildly oblique
  worlds = [w for w in range(3) if w != world_of_thick]
  rng.shuffle(worlds)
  directions = np.zeros((3, 3))
  directions[world_of_thick, thick_axis] = 1.0
  for axis, world in zip([a for a in range(3) if a != thick_axis], worlds):
    directions[world, axis] = rng.choice([-1.0, 1.0])
  directions = rotation(rng, 20.0) @ directions
  orientation = choose_orientation(make_affine(directions, spacing), spacing)
  assert orientation.slice_axis == thick_axis
  assert orientation.slice_world_axis == world_of_thick
  assert orientation.canonical_spacing(spacing)[2] == 10.0
  # in-plane axes in world order (R/L before A/P before S/I)
  in_plane = [a for a in range(3) if a != thick_axis]
  in_plane.sort(key=lambda a: int(np.argmax(np.abs(directions[:, a]))))
  assert list(orientation.axes[:2]) == in_plane


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.0, 1.1), (1.0, 1.0, 1.49), (2.0, 1.5, 1.6)])
def test_near_isotropic_voxels_are_sliced_axially(spacing):
  rng = np.random.default_rng(5)
  for trial in range(20):
    directions = rotation(rng, 30.0) @ np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)
    affine = make_affine(directions, spacing)
    orientation = choose_orientation(affine, spacing)
    assert orientation.slice_axis == closest_to_z(affine), trial
    assert orientation.slice_world_axis == 2


def test_the_thick_slice_ratio_is_one_and_a_half():
  affine = make_affine(np.eye(3)[:, [2, 0, 1]], (1.0, 1.0, 1.0))  # stored axis 0 runs along S/I
  assert choose_orientation(affine, (1.0, 1.0, 1.49)).slice_axis == 0
  assert choose_orientation(affine, (1.0, 1.0, 1.5)).slice_axis == 2


def test_an_axial_ras_volume_is_left_as_it_is():
  rng = np.random.default_rng(0)
  spacing = (1.4, 1.4, 8.0)
  orientation = choose_orientation(make_affine(rotation(rng, 15.0), spacing), spacing)
  assert orientation.is_identity and orientation == Orientation()
  data = rng.normal(size=(4, 5, 6))
  np.testing.assert_array_equal(orientation.to_canonical(data), data)
  assert orientation.describe() == "slices along stored axis 2 (S, axial), in-plane axes 0 (R), 1 (A)"


@pytest.mark.parametrize("spacing", [(0.9, 1.3, 6.0), (1.0, 1.1, 1.2)], ids=["thick", "isotropic"])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_voxel_order_gives_the_same_canonical_array(spacing, seed):
  """All 48 permuted/flipped copies of a random oblique volume (data, affine and spacing moved together by nibabel)
  give the identical canonical array, spacing and voxel grid, and `to_stored` recovers each copy exactly."""
  rng = np.random.default_rng(seed)
  data = rng.normal(size=(4, 5, 6)).astype(np.float32)
  base = make_affine(rotation(rng, 35.0), spacing, origin=rng.uniform(-50, 50, 3))
  reference = None
  for ornt in ALL_ORNTS:
    copy, affine, copy_spacing = reorder(data, base, spacing, ornt)
    orientation = choose_orientation(affine, copy_spacing)
    canonical = orientation.to_canonical(copy)
    grid = orientation.canonical_affine(affine, copy.shape)
    if reference is None:
      reference = (canonical, orientation.canonical_spacing(copy_spacing), grid)
    np.testing.assert_array_equal(canonical, reference[0], err_msg=str(ornt.tolist()))
    assert orientation.canonical_spacing(copy_spacing) == reference[1]
    np.testing.assert_allclose(grid, reference[2], atol=1e-9)
    assert orientation.canonical_shape(copy.shape) == canonical.shape
    assert orientation.stored_shape(canonical.shape) == copy.shape
    stored = orientation.to_stored(canonical)
    assert stored.shape == copy.shape
    np.testing.assert_array_equal(stored, copy)
    # trailing axes (channels, class scores) travel along untouched
    stacked = np.stack([copy, -copy], axis=-1)
    np.testing.assert_array_equal(orientation.to_canonical(stacked)[..., 1], -canonical)
    np.testing.assert_array_equal(orientation.to_stored(orientation.to_canonical(stacked)), stacked)
  # the canonical grid is RAS+ up to moving the slice axis last: every axis closest to + its world axis
  ornt = io_orientation(reference[2])
  assert (ornt[:, 1] == 1).all()


@pytest.mark.parametrize("spacing", [(1.2, 1.2, 7.0), (7.0, 1.2, 1.2), (1.2, 7.0, 1.2), (1.0, 1.0, 1.0)])
def test_agrees_with_nibabel_closest_canonical(spacing):
  """Our canonical array is nibabel's RAS reorientation (`apply_orientation` with `io_orientation`) with the slice
  world axis moved last, and our canonical grid is `as_closest_canonical`'s affine with its columns moved alike."""
  rng = np.random.default_rng(3)
  for ornt in ALL_ORNTS[::5]:
    directions = rotation(rng, 25.0) @ np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)
    affine = make_affine(directions, spacing)
    data = rng.normal(size=(5, 6, 7)).astype(np.float32)
    orientation = choose_orientation(affine, spacing)
    nib_ornt = io_orientation(affine)
    for stored_axis in range(3):  # the mapping per axis, as nibabel sees it
      canonical_axis = orientation.axes.index(stored_axis)
      assert orientation.world[canonical_axis] == nib_ornt[stored_axis, 0]
      assert orientation.flips[canonical_axis] == (nib_ornt[stored_axis, 1] < 0)
    ras = apply_orientation(data, nib_ornt)
    np.testing.assert_array_equal(orientation.to_canonical(data), np.moveaxis(ras, orientation.slice_world_axis, -1))
    image = nib.Nifti1Image(data, affine)
    ras_affine = nib.as_closest_canonical(image).affine
    columns = [w for w in range(3) if w != orientation.slice_world_axis] + [orientation.slice_world_axis, 3]
    np.testing.assert_allclose(orientation.canonical_affine(affine, data.shape), ras_affine[:, columns], atol=1e-9)


def test_records_round_trip():
  orientation = Orientation(axes=(1, 2, 0), flips=(True, False, True), world=(0, 1, 2))
  assert Orientation.from_dict(json.loads(json.dumps(orientation.to_dict()))) == orientation
  encoded = orientation.to_array()
  assert encoded.dtype == np.int32 and encoded.shape == (3, 3)
  assert Orientation.from_array(encoded) == orientation
  assert orientation.describe() == ("slices along stored axis 0 (S, axial), in-plane axes 1 (R), 2 (A); stored axes "
                                    "1, 0 reversed")
  with pytest.raises(ValueError):
    Orientation(axes=(0, 0, 2))


def test_degenerate_affine_is_refused():
  with pytest.raises(ValueError, match="direction"):
    choose_orientation(np.diag([1.0, 0.0, 1.0, 1.0]), (1.0, 1.0, 1.0))


def test_plane_disagreement_names_the_cases():
  tilted = np.array([0.0, np.sin(np.deg2rad(30)), np.cos(np.deg2rad(30))])  # 30 degrees off axial: the same view
  assert plane_disagreement({"a": np.array([0.0, 0.0, 1.0]), "b": -tilted}) is None
  warning = plane_disagreement({"a": np.array([0.0, 0.0, 1.0]), "b": tilted, "c": np.array([1.0, 0.0, 0.0])})
  assert "2 with slices stacked along S/I (axial-like: a, b)" in warning, warning
  assert "1 with slices stacked along R/L (sagittal-like: c)" in warning and "\n" not in warning


def test_validate_warns_about_a_dataset_of_two_acquisition_planes(tmp_path):
  """Axial and coronal thick-slice scans in one dataset: a warning naming them; the phantoms' short axes: none."""
  import shutil

  from autosam_jax.data.shapes import write_shapes_dataset
  from autosam_jax.data.synthetic import write_synthetic_acdc
  from autosam_jax.data.validate import validate

  axial = write_shapes_dataset(tmp_path / "axial", num_cases=3, class_names=["a"], seed=1, spacing=(1.0, 1.0, 4.0),
                               shape=(24, 24, 8))
  coronal = write_shapes_dataset(tmp_path / "coronal", num_cases=3, class_names=["a"], seed=1,
                                 spacing=(1.0, 4.0, 1.0), shape=(24, 8, 24))
  for folder in ("imagesTr", "labelsTr"):
    for path in sorted((coronal / folder).iterdir())[1:]:  # cases 1 and 2 of the coronal set replace the axial ones
      shutil.copy(path, axial / folder / path.name)
  warnings = validate(axial).warnings
  assert len(warnings) == 1 and "planes more than 45 degrees apart" in warnings[0], warnings
  assert "2 with slices stacked along A/P (coronal-like: case_001, case_002)" in warnings[0]
  assert "1 with slices stacked along S/I (axial-like: case_000)" in warnings[0]
  write_synthetic_acdc(tmp_path / "acdc", 6, seed=0)
  assert validate(tmp_path / "acdc").warnings == []


def test_slice_examples_reassemble_and_map_back():
  from autosam_jax.data.slices import assemble_volumes, volume_to_examples

  rng = np.random.default_rng(2)
  image = rng.normal(size=(5, 4, 6)).astype(np.float32)
  label = rng.integers(0, 4, size=image.shape).astype(np.uint8)
  spacing = (1.5, 9.0, 1.5)  # thick axis stored second
  affine = make_affine(np.eye(3)[:, [0, 2, 1]] * [1, 1, -1], spacing)  # stored axis 2 runs towards A-
  examples = [e for _, e in volume_to_examples("c", "p", "", image, label, spacing, affine)]
  assert len(examples) == 4
  volume = assemble_volumes(examples)["c"]
  expected = image.transpose(0, 2, 1)[:, ::-1, :]  # canonical: (R, A, S) = (stored 0, reversed stored 2, stored 1)
  np.testing.assert_array_equal(volume.image, expected)
  np.testing.assert_array_equal(volume.spacing, [1.5, 1.5, 9.0])
  np.testing.assert_array_equal(volume.affine, affine)
  assert volume.stored_shape == image.shape
  np.testing.assert_array_equal(volume.to_stored(volume.label), label)
  examples[0]["original_shape"] = np.array([5, 6, 4], np.int32)
  with pytest.raises(ValueError, match="differs from the stored"):
    assemble_volumes(examples)


def _write_nnunet(root, affines, spacing):
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  rng = np.random.default_rng(0)
  for case_id, affine in affines.items():
    shape = (8, 8, 8)
    image = nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), affine)
    image.header.set_zooms(spacing[case_id])
    nib.save(image, root / "imagesTr" / f"{case_id}_0000.nii.gz")
    label = nib.Nifti1Image((rng.random(shape) > 0.5).astype(np.uint8), affine)
    label.header.set_zooms(spacing[case_id])
    nib.save(label, root / "labelsTr" / f"{case_id}.nii.gz")
  (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "blob": 1}, "channel_names": {"0": "MRI"},
                                                 "file_ending": ".nii.gz", "numTraining": len(affines)}))


def test_validation_warns_when_cases_disagree_about_their_plane(tmp_path):
  from autosam_jax.data.validate import validate_nnunet

  thick = (1.0, 1.0, 6.0)
  axial = make_affine(np.eye(3), thick)
  sagittal = make_affine(np.eye(3)[:, [1, 2, 0]], thick)  # stored axis 2 (the thick one) runs along R/L
  _write_nnunet(tmp_path / "mixed", {"a": axial, "b": axial, "c": sagittal}, {c: thick for c in "abc"})
  warnings = [w for w in validate_nnunet(tmp_path / "mixed").warnings if "planes more than" in w]
  assert len(warnings) == 1 and "sagittal-like: c" in warnings[0] and "axial-like: a, b" in warnings[0]
  # the same plane stored in another voxel order is no disagreement
  permuted = axial @ inv_ornt_aff(np.array([[2, 1], [0, -1], [1, 1]], float), (8, 8, 8))
  _write_nnunet(tmp_path / "same", {"a": axial, "b": permuted}, {"a": thick, "b": (1.0, 6.0, 1.0)})
  assert not [w for w in validate_nnunet(tmp_path / "same").warnings if "planes more than" in w]


# End to end through `predict`, with a random UNet (no SAM) on a coarse grid that keeps it fast on the CPU.

def save_unet(directory, record):
  from flax import nnx

  from autosam_jax.data.preprocess import PreprocessConfig
  from autosam_jax.models.unet import UNet
  from autosam_jax.train.loop import TrainConfig, save_model

  config = TrainConfig(head="unet", variant="faithful", unet_base_channels=4, num_classes=4)
  unet = UNet(4, base_channels=4, rngs=nnx.Rngs(3))
  # Random weights give one class everywhere; without the bias and with a larger 1x1 head the labels follow the image.
  unet.head.bias.set_value(np.zeros(unet.head.bias.shape, np.float32))
  unet.head.kernel.set_value(np.asarray(unet.head.kernel.get_value()) * 30)
  _, params, frozen = nnx.split(unet, nnx.Param, ...)
  save_model(directory, params, frozen, config,
             PreprocessConfig(mode="faithful", target_spacing=(2.5, 2.5), slice_size=112).to_dict(), record)
  return directory


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory):
  from autosam_jax.data.labels import ACDC_TABLE

  return save_unet(tmp_path_factory.mktemp("orientation_unet") / "unet", {"labels": ACDC_TABLE.to_dict(),
                                                                          "input": "images"})


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
  """A cardiac phantom's first 3 slices (oblique affine, thick slices), as (data, affine, zooms)."""
  from autosam_jax.data.synthetic import write_synthetic_acdc

  root = tmp_path_factory.mktemp("orientation_scan")
  write_synthetic_acdc(root / "acdc", 1, seed=7)
  source = nib.load(next((root / "acdc" / "patient001").glob("patient001_frame??.nii.gz")))
  return np.asarray(source.dataobj)[:, :, :3], source.affine, source.header.get_zooms()[:3]


def _save(path, data, affine, zooms):
  image = nib.Nifti1Image(data, affine)
  image.header.set_zooms(zooms)
  nib.save(image, path)


def test_predict_follows_the_geometry_not_the_voxel_order(unet_model, scan, tmp_path):
  from autosam_jax.evaluation.predict import predict

  data, affine, zooms = scan
  ornts = ALL_ORNTS[::6] + [ALL_ORNTS[13], ALL_ORNTS[46]]  # every permutation, and flips of every axis
  inputs = tmp_path / "in"
  inputs.mkdir()
  for number, ornt in enumerate(ornts):
    copy, copy_affine, copy_zooms = reorder(data, affine, zooms, ornt)
    _save(inputs / f"copy{number}.nii.gz", copy, copy_affine, copy_zooms)
  written = predict(unet_model, None, inputs, tmp_path / "out", batch_size=4)
  assert [p.name for p in written] == [f"copy{n}.nii.gz" for n in range(len(ornts))]
  assert (ornts[0] == [[0, 1], [1, 1], [2, 1]]).all()  # copy 0 is the scan as it was stored
  reference = np.asarray(nib.load(tmp_path / "out" / "copy0.nii.gz").dataobj)
  assert len(np.unique(reference)) > 1
  for number, ornt in enumerate(ornts):
    result = nib.load(tmp_path / "out" / f"copy{number}.nii.gz")
    source = nib.load(inputs / f"copy{number}.nii.gz")
    assert result.shape == source.shape
    np.testing.assert_array_equal(result.affine, source.affine)
    # the prediction of a reordered copy is the reordered prediction, exactly
    np.testing.assert_array_equal(np.asarray(result.dataobj), apply_orientation(reference, ornt),
                                  err_msg=str(ornt.tolist()))


def _channel_files(folder, names, scan):
  folder.mkdir()
  data, affine, zooms = scan
  for name in names:
    _save(folder / name, data, affine, zooms)


def test_predict_names_nnunet_cases_by_their_case_id(unet_model, scan, tmp_path):
  from autosam_jax.evaluation.predict import predict

  _channel_files(tmp_path / "in", ["case_001_0000.nii.gz", "scan.nii", "other_0000.nii", "subject_0012.nii.gz"],
                 scan)
  written = predict(unet_model, None, tmp_path / "in", tmp_path / "out")
  # nnU-Net cases keep their file ending; a name ending in four digits with no _0000 beside it is a plain scan
  expected = ["case_001.nii.gz", "other.nii", "scan.nii.gz", "subject_0012.nii.gz"]
  assert sorted(p.name for p in written) == expected
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == expected
  with open(tmp_path / "out" / "scan.nii.gz", "rb") as f:
    assert f.read(2) == b"\x1f\x8b"  # gzip
  np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out" / "other.nii").dataobj),
                                np.asarray(nib.load(tmp_path / "out" / "scan.nii.gz").dataobj))


@pytest.mark.parametrize("names,culprit,words", [
    (["a_0000.nii.gz", "a_0001.nii.gz", "a_0002.nii.gz", "a_0003.nii.gz"], "a_0003.nii.gz", "4 channels"),
    (["a_0000.nii.gz", "a_0001.nii.gz"], "a_0001.nii.gz", "trained on one channel"),
    (["a_0000.nii.gz", "a_0001.nii.gz", "a_0002.nii.gz"], "a_0001.nii.gz", "trained on one channel"),
    (["a_0000.nii.gz", "a_0002.nii.gz"], "a_0001.nii.gz", "missing channel"),
    (["a_0000.nii.gz", "a.nii.gz"], "a_0000.nii.gz", "would write a.nii.gz"),
    (["b.nii", "b.nii.gz"], "b.nii.gz", "would write b.nii.gz"),
], ids=["4-channels", "2-channels", "3-channels", "gap", "collision", "collision-plain"])
def test_predict_refuses_ambiguous_inputs_before_writing(unet_model, scan, tmp_path, names, culprit, words):
  from autosam_jax.evaluation.predict import predict

  _channel_files(tmp_path / "in", names, scan)
  with pytest.raises(DataError) as caught:
    predict(unet_model, None, tmp_path / "in", tmp_path / "out")
  message = str(caught.value)
  assert message.startswith(str(tmp_path / "in" / culprit) + ":") and words in message and "\n" not in message
  assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# One frame per dataset: short-axis stacks planned a few degrees apart are cut alike, wherever they lie against the
# world axes (here in-plane axes near 45 degrees between R and A, where the per-volume choice jumps).


def about(axis, degrees: float) -> np.ndarray:
  axis = np.asarray(axis, float) / np.linalg.norm(axis)
  cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  angle = np.deg2rad(degrees)
  return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def short_axis_stacks(num_cases: int, jitter_degrees: float, seed: int, in_plane_degrees: float = 45.0):
  """{case id: (affine, spacing)}: cardiac short-axis stacks (1.4 x 1.4 x 8 mm) whose first in-plane axis lies
  `in_plane_degrees` from R towards A, each turned in-plane and tilted by up to `jitter_degrees` (planning per
  patient), stored in a random one of the 48 voxel orders."""
  rng = np.random.default_rng(seed)
  normal = np.array([-0.35, 0.3, -0.89]) / np.linalg.norm([-0.35, 0.3, -0.89])
  first = about(normal, in_plane_degrees) @ (np.array([1.0, 0.0, 0.0]) - normal[0] * normal)
  first /= np.linalg.norm(first)
  base = np.stack([first, np.cross(normal, first), normal], axis=1)
  stacks = {}
  for i in range(num_cases):
    frame = about(normal, rng.uniform(-jitter_degrees, jitter_degrees)) @ base
    frame = about(np.cross(normal, rng.normal(size=3)), rng.uniform(0.0, jitter_degrees)) @ frame
    affine = make_affine(frame, (1.4, 1.4, 8.0))
    ornt = ALL_ORNTS[int(rng.integers(len(ALL_ORNTS)))]
    _, affine, spacing = reorder(np.zeros((6, 7, 4)), affine, (1.4, 1.4, 8.0), ornt)
    stacks[f"patient{i:03d}"] = (affine, spacing)
  return stacks


def in_plane_angles(frames: dict) -> np.ndarray:
  """The largest angle (degrees) between the same in-plane canonical axis of any two cases."""
  stacked = np.stack([frame[:, :2] for frame in frames.values()])  # (n, 3, 2)
  cosines = np.einsum("adi,bdi->abi", stacked, stacked)
  return float(np.degrees(np.arccos(np.clip(cosines, -1, 1))).max())


@pytest.mark.parametrize("jitter", [5.0, 20.0])
def test_oblique_stacks_with_planning_jitter_are_cut_alike(jitter):
  from autosam_jax.data.orientation import choose_dataset_orientations, world_frame

  stacks = short_axis_stacks(60, jitter, seed=int(jitter))
  own = {c: world_frame(a, choose_orientation(a, s)) for c, (a, s) in stacks.items()}
  assert in_plane_angles(own) > 90  # the per-volume choice cuts some of these stacks transposed or mirrored
  chosen = choose_dataset_orientations(stacks)
  frames = {c: world_frame(stacks[c][0], chosen.orientations[c]) for c in stacks}
  # every pair of cases: their canonical in-plane axes differ by no more than the planning jitter (turn + tilt each)
  assert in_plane_angles(frames) <= 4 * jitter + 1e-6
  assert all(np.sum(f[:, 2] * frames["patient000"][:, 2]) > 0 for f in frames.values())  # slices stacked one way
  assert len(chosen.references) == 1 and chosen.references[0]["cases"] == 60 and not chosen.warnings
  for case_id, (affine, spacing) in stacks.items():  # a new scan of the dataset is cut the same way
    assert align_to_dataset(chosen, affine, spacing) == chosen.orientations[case_id]


def align_to_dataset(chosen, affine, spacing):
  from autosam_jax.data.orientation import align_orientation, reference_for

  return align_orientation(affine, spacing, reference_for(chosen.references, affine, spacing))


def test_the_dataset_frame_keeps_axis_aligned_scans_as_the_per_volume_choice():
  from autosam_jax.data.orientation import choose_dataset_orientations

  rng = np.random.default_rng(4)
  stacks = {}
  for i, ornt in enumerate(ALL_ORNTS[::5]):
    _, affine, spacing = reorder(np.zeros((6, 7, 4)), make_affine(rotation(rng, 10.0), (1.0, 1.2, 6.0)),
                                 (1.0, 1.2, 6.0), ornt)
    stacks[f"case{i}"] = (affine, spacing)
  chosen = choose_dataset_orientations(stacks)
  assert {c: choose_orientation(a, s) for c, (a, s) in stacks.items()} == chosen.orientations


def test_a_case_turned_far_from_the_others_is_named():
  from autosam_jax.data.orientation import choose_dataset_orientations

  stacks = short_axis_stacks(6, 3.0, seed=1, in_plane_degrees=10.0)
  stacks.update({f"turned{i}": a for i, a in enumerate(short_axis_stacks(1, 0.0, seed=2, in_plane_degrees=50.0)
                                                       .values())})
  chosen = choose_dataset_orientations(stacks)
  assert len(chosen.warnings) == 1 and chosen.warnings[0].startswith("1 case(s)")
  assert chosen.warnings[0].split("nearest reordering: ")[1].startswith("turned0 (38 degrees);")
  assert chosen.references[0]["case"].startswith("patient")


def test_the_build_cuts_every_case_in_the_dataset_frame_and_records_it(tmp_path):
  from autosam_jax.data.nnunet import build_nnunet
  from autosam_jax.data.orientation import Orientation, choose_dataset_orientations
  from autosam_jax.data.slices import assemble_volumes

  stacks = short_axis_stacks(4, 10.0, seed=3)
  own = {c: choose_orientation(a, s) for c, (a, s) in stacks.items()}
  chosen = choose_dataset_orientations(stacks)
  assert own != chosen.orientations  # the per-volume choice would cut some of them otherwise
  _write_nnunet(tmp_path / "sax", {c: a for c, (a, _) in stacks.items()}, {c: s for c, (_, s) in stacks.items()})
  builder = build_nnunet(tmp_path / "sax", tmp_path / "tfds")
  source = builder.as_data_source(split="train")
  volumes = assemble_volumes(source[i] for i in range(len(source)))
  assert {c: v.orientation for c, v in volumes.items()} == chosen.orientations
  recorded = builder.info.metadata["orientation_references"]
  assert [r["case"] for r in recorded] == [r["case"] for r in chosen.references]
  assert all(Orientation(**{k: v for k, v in o.to_dict().items()}) == o for o in chosen.orientations.values())


def test_predict_cuts_a_new_scan_in_the_frame_the_model_was_trained_in(scan, tmp_path):
  """A model records its data's reference frames; a scan whose own frame is the reference turned by 90 degrees
  in-plane (its in-plane axes just past 45 degrees from the training scans') is cut as the training scans were."""
  from autosam_jax.data.labels import ACDC_TABLE
  from autosam_jax.data.orientation import align_orientation, world_frame
  from autosam_jax.evaluation.predict import predict

  data, affine, zooms = scan
  own = choose_orientation(affine, zooms)
  frame = world_frame(affine, own)
  turned = np.stack([frame[:, 1], -frame[:, 0], frame[:, 2]], axis=1)  # the training data's frame
  reference = {"case": "patient001_frame01", "frame": turned.tolist(), "world": list(own.world), "cases": 1}
  aligned = align_orientation(affine, zooms, reference)
  assert aligned.axes[:2] == own.axes[:2][::-1]  # transposed against the scan's own choice
  models = {}
  for name, references in (("own", None), ("recorded", [reference])):
    models[name] = save_unet(tmp_path / name, {"labels": ACDC_TABLE.to_dict(), "input": "images",
                                               "orientation_references": references})
  _channel_files(tmp_path / "in", ["scan.nii.gz"], scan)
  predicted = {}
  for name, model in models.items():
    predict(model, None, tmp_path / "in", tmp_path / f"out_{name}", batch_size=4)
    predicted[name] = np.asarray(nib.load(tmp_path / f"out_{name}" / "scan.nii.gz").dataobj)
  assert not np.array_equal(predicted["own"], predicted["recorded"])  # a 2D net sees transposed slices differently
  # what the recorded model predicts is what a model without references predicts for the same voxels under an affine
  # whose own frame is the aligned one (the scan's canonical axes pointing where the training data's did)
  relabelled = np.array(affine, float)
  for i, (axis, flip) in enumerate(zip(aligned.axes, aligned.flips)):
    relabelled[:3, axis] = frame[:, i] * zooms[axis] * (-1.0 if flip else 1.0)
  assert choose_orientation(relabelled, zooms) == aligned
  (tmp_path / "relabelled").mkdir()
  _save(tmp_path / "relabelled" / "scan.nii.gz", data, relabelled, zooms)
  predict(models["own"], None, tmp_path / "relabelled", tmp_path / "out_relabelled", batch_size=4)
  np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "out_relabelled" / "scan.nii.gz").dataobj),
                                predicted["recorded"])
