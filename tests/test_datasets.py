"""TFDS builders (no TensorFlow) over synthetic phantoms in ACDC and nnU-Net layouts, volume round trip, grain."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autosam_jax.data.errors import DataError
from autosam_jax.data.loader import SliceIndex, slice_dataset
from autosam_jax.data.slices import assemble_volumes

NUM_PATIENTS = 3


@pytest.fixture(scope="module")
def acdc_source(tmp_path_factory):
  from autosam_jax.data.synthetic import write_synthetic_acdc

  root = tmp_path_factory.mktemp("acdc")
  write_synthetic_acdc(root / "training", NUM_PATIENTS, seed=7)
  return root


@pytest.fixture(scope="module")
def acdc_built(acdc_source, tmp_path_factory):
  from autosam_jax.data.acdc import build_acdc

  data_root = tmp_path_factory.mktemp("tfds")
  builder = build_acdc(acdc_source, data_root)
  source = builder.as_data_source(split="train")
  return builder, source, [source[i] for i in range(len(source))], data_root


def _nifti_cases(root):
  """case id -> (image, label, affine, zooms) read straight from the phantom files."""
  cases = {}
  for gt in sorted(root.glob("training/patient*/*_gt.nii.gz")):
    image_file = gt.with_name(gt.name.replace("_gt", ""))
    cases[gt.name.replace("_gt.nii.gz", "")] = (nib.load(image_file), nib.load(gt))
  return cases


def _canonical(data, image):
  """The phantom in canonical slicing order, by nibabel: reoriented to RAS, then its slice axis (thick, stored last)
  moved last again."""
  from nibabel.orientations import apply_orientation, io_orientation

  ornt = io_orientation(image.affine)
  return np.moveaxis(apply_orientation(data, ornt), int(ornt[2, 0]), -1)


def _canonical_spacing(image):
  from nibabel.orientations import io_orientation

  ornt = io_orientation(image.affine)
  zooms = image.header.get_zooms()[:3]
  return [zooms[int(np.flatnonzero(ornt[:, 0] == w)[0])] for w in range(3) if w != ornt[2, 0]] + [zooms[2]]


def test_built_without_tensorflow(acdc_built):
  assert "tensorflow" not in sys.modules


def test_every_slice_of_every_frame(acdc_built, acdc_source):
  _, source, examples, _ = acdc_built
  files = _nifti_cases(acdc_source)
  assert len(files) == 2 * NUM_PATIENTS  # ED and ES per patient
  assert len(source) == sum(img.shape[2] for img, _ in files.values())
  frames = {(e["patient_id"].decode(), e["frame"].decode()) for e in examples}
  assert frames == {(f"patient{p:03d}", f) for p in range(1, NUM_PATIENTS + 1) for f in ("ED", "ES")}


def test_volumes_reassemble_with_their_geometry(acdc_built, acdc_source):
  _, _, examples, _ = acdc_built
  volumes = assemble_volumes(examples)
  files = _nifti_cases(acdc_source)
  assert len(volumes) == len(files)
  for volume in volumes.values():
    frame_file = [k for k in files if k.startswith(volume.patient_id)]
    matches = [k for k in frame_file
               if np.array_equal(_canonical(files[k][1].get_fdata().astype(np.uint8), files[k][1]), volume.label)]
    assert len(matches) == 1, volume.case_id
    image, label = files[matches[0]]
    # sliced in the canonical order; affine and shape those of the stored file, to which the labels map back
    np.testing.assert_array_equal(volume.image, _canonical(image.get_fdata(dtype=np.float32), image))
    np.testing.assert_allclose(volume.affine, image.affine)
    assert volume.stored_shape == image.shape
    np.testing.assert_array_equal(volume.to_stored(volume.label), np.asarray(label.dataobj))
    np.testing.assert_allclose(volume.spacing, _canonical_spacing(image), rtol=1e-6)
    assert set(np.unique(volume.label)) <= {0, 1, 2, 3}


def test_keys_deterministic_across_builds(acdc_built, acdc_source, tmp_path):
  from autosam_jax.data.acdc import build_acdc

  _, _, examples, _ = acdc_built
  again = build_acdc(acdc_source, tmp_path / "tfds2").as_data_source(split="train")
  order = [(e["case_id"], int(e["slice_index"])) for e in examples]
  assert [(again[i]["case_id"], int(again[i]["slice_index"])) for i in range(len(again))] == order


def test_rebuild_reuses_and_refuses_other_sources(acdc_built, acdc_source, tmp_path):
  import shutil

  from autosam_jax.data.acdc import build_acdc

  builder, _, _, data_root = acdc_built
  info_file = Path(builder.data_dir) / "dataset_info.json"
  before = info_file.stat().st_mtime_ns
  build_acdc(acdc_source, data_root)
  assert info_file.stat().st_mtime_ns == before  # reused, not rewritten
  changed = tmp_path / "changed"
  shutil.copytree(acdc_source, changed)
  victim = sorted(changed.glob("training/patient001/*_frame*.nii.gz"))[0]
  img = nib.load(victim)
  nib.save(nib.Nifti1Image(img.get_fdata() + 1.0, img.affine, img.header), victim)
  with pytest.raises(DataError, match="other source files"):
    build_acdc(changed, data_root)


def test_broken_source_stops_before_writing(acdc_source, tmp_path):
  import shutil

  from autosam_jax.data.acdc import build_acdc

  broken = tmp_path / "broken"
  shutil.copytree(acdc_source, broken)
  victim = sorted(broken.glob("training/patient002/*_gt.nii.gz"))[0]
  victim.write_bytes(victim.read_bytes()[:200])
  data_dir = tmp_path / "tfds"
  with pytest.raises(DataError, match=victim.name):
    build_acdc(broken, data_dir)
  assert not list(data_dir.glob("acdc/*/*.array_record*")) if data_dir.exists() else True


def test_nnunet_builder(tmp_path):
  from autosam_jax.data.nnunet import build_nnunet
  from autosam_jax.data.synthetic import write_synthetic_nnunet

  source = write_synthetic_nnunet(tmp_path / "Dataset901_Phantom", 2, seed=3)
  builder = build_nnunet(source, tmp_path / "tfds")
  assert builder.info.metadata["class_names"] == ["background", "RV", "MYO", "LV"]
  data = builder.as_data_source(split="train")
  volumes = assemble_volumes(data[i] for i in range(len(data)))
  labels = sorted(source.glob("labelsTr/*.nii.gz"))
  assert len(volumes) == len(labels)
  for label_file in labels:
    case = label_file.name.replace(".nii.gz", "")
    label = nib.load(label_file)
    np.testing.assert_array_equal(volumes[case].label, _canonical(label.get_fdata().astype(np.uint8), label))
    np.testing.assert_allclose(volumes[case].affine, label.affine)
    image = nib.load(source / "imagesTr" / f"{case}_0000.nii.gz")
    np.testing.assert_array_equal(volumes[case].image, _canonical(image.get_fdata(dtype=np.float32), image))


def test_build_dataset_command_prints_only_its_own_lines(tmp_path, capfd, monkeypatch):
  """No TFDS download announcement ("Downloading and preparing dataset Unknown size ..."), no absl warning about
  the folder's BuilderConfig, and with --no-progress no TFDS progress bar: the command's two lines alone."""
  from autosam_jax.cli import main
  from autosam_jax.data import build
  from autosam_jax.data.shapes import write_shapes_dataset

  monkeypatch.setattr(build, "_tfds_progress", True)  # --no-progress turns it off for this process
  source = write_shapes_dataset(tmp_path / "Dataset902_Blobs", num_cases=2, class_names=["gray matter"], seed=0,
                                shape=(16, 16, 4))
  capfd.readouterr()
  assert main(["build-dataset", "nnunet", str(source), "--data-dir", str(tmp_path / "tfds"),
               "--no-progress"]) == 0
  out, err = capfd.readouterr()
  assert err == "" and [line.split(" ")[0] for line in out.splitlines()] == ["train:", "dataset"], (out, err)


def test_grain_loader_order_and_resume(acdc_built):
  _, source, _, _ = acdc_built
  index = SliceIndex.build(source)
  assert index.patients == [f"patient{p:03d}" for p in range(1, NUM_PATIENTS + 1)]
  chosen = index.for_patients(["patient002"])
  assert {index.patient_ids[i] for i in chosen} == {"patient002"}
  with pytest.raises(DataError, match="patient999"):
    index.for_patients(["patient999"])

  def cases(dataset):
    return [[c.decode() + str(s) for c, s in zip(b["case_id"], b["slice_index"])] for b in dataset]

  full = cases(slice_dataset(source, chosen, batch_size=4, seed=1, epoch=0))
  assert sorted(sum(full, [])) == sorted(index.case_ids[i] + str(index.slice_indices[i]) for i in chosen)
  assert cases(slice_dataset(source, chosen, batch_size=4, seed=1, epoch=0)) == full
  assert cases(slice_dataset(source, chosen, batch_size=4, seed=1, epoch=1)) != full
  iterator = iter(slice_dataset(source, chosen, batch_size=4, seed=1, epoch=0))
  next(iterator)
  state = iterator.get_state()
  resumed = iter(slice_dataset(source, chosen, batch_size=4, seed=1, epoch=0))
  resumed.set_state(state)
  assert cases(resumed) == full[1:]


def test_make_splits_command(acdc_source, tmp_path, capsys):
  from autosam_jax.cli import main
  from autosam_jax.data.splits import load_splits

  out = tmp_path / "cv.json"
  assert main(["make-splits", str(acdc_source), "--protocol", "cv", "--folds", "3", "--seed", "4", "--out",
               str(out)]) == 0
  folds = load_splits(out, known_patients=[f"patient{p:03d}" for p in range(1, NUM_PATIENTS + 1)])
  assert sorted(p for fold in folds for p in fold.test) == [f"patient{p:03d}" for p in range(1, NUM_PATIENTS + 1)]
  assert main(["make-splits", str(tmp_path / "empty"), "--out", str(tmp_path / "x.json")]) == 2
  assert "error:" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
