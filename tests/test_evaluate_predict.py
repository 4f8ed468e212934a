"""Evaluation (both conventions, reassembly, predictions on the native grid) and end-to-end prediction on NIfTI."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from autosam_jax.train.loop import TrainConfig


@pytest.fixture(scope="module")
def run(tiny_world, tmp_path_factory):
  """The tiny world (tests/conftest.py) and its trained linear head; `root` holds what these tests write."""
  return {"root": tmp_path_factory.mktemp("evaluate"), "world": tiny_world, "weights": tiny_world.weights,
          "model": str(tiny_world.model)}


def _evaluate_args(run, out):
  root = run["world"].root
  return ["evaluate", "--model", run["model"], "--weights", str(run["weights"]), "--cache", str(root / "cache"),
          "--data", str(root / "acdc"), "--tfds-dir", str(root / "tfds"), "--splits", str(root / "split.json"),
          "--out", str(out)]


@pytest.fixture(scope="module")
def evaluated(run):
  from autosam_jax.cli import main

  out = run["root"] / "eval"
  assert main(_evaluate_args(run, out)) == 0
  return out


def test_evaluate_writes_both_conventions(run, evaluated, capsys):
  report = json.loads((evaluated / "metrics.json").read_text())
  assert set(report["summary"]) == {"official", "standard"}
  assert report["summary"]["official"]["units"] == "voxel" and report["summary"]["standard"]["units"] == "mm"
  assert list(report["patients"]) == ["patient003"]
  patient = report["patients"]["patient003"]
  assert patient["official"]["convention"] == "official" and set(patient["official"]["classes"]) == {"RV", "MYO", "LV"}
  assert sorted(f["frame"] for f in patient["standard"].values()) == ["ED", "ES"]
  # the official volume is both frames' slices stacked on the 224 grid
  total_slices = sum(f["shape"][2] for f in patient["standard"].values())
  assert patient["official"]["shape"] == [total_slices, 224, 224]
  table = (evaluated / "metrics.md").read_text()
  for word in ("| RV |", "| MYO |", "| LV |", "| mean |", "Dice (official)", "HD95 (standard, mm)", "voxel"):
    assert word in table
  # a row per case: the patient's official volume, then each frame under the standard convention
  rows = table.split("### Per case")[1].strip().splitlines()
  assert rows[0] == "| case | convention | RV | MYO | LV | mean Dice | mean HD95 |"
  assert [r.split(" | ")[:2] for r in rows[2:]] == [["| patient003", "official, model grid"]] + [
      [f"| {case}", f"standard, native grid, {f['frame']}"] for case, f in patient["standard"].items()]


def test_summary_notes_where_the_conventions_disagree_and_why():
  """A class whose mean Dice differs by more than 0.05 between the conventions is named, with the grid each one
  counts on; classes within 0.05 are not."""
  from autosam_jax.evaluation.evaluate import summary_table

  def part(units, values):
    return {"n_cases": 1, "units": units,
            "classes": {k: {"dice": {"value": v}, "hd95": {"value": 1.0}} for k, v in values.items()},
            "overall": {"dice": {"value": 0.5, "n_excluded": 0}, "hd95": {"value": 1.0, "n_excluded": 0}}}

  summary = {"official": part("voxel", {"gray matter": 0.90, "WM": 0.80}),
             "standard": part("mm", {"gray matter": 0.70, "WM": 0.78})}
  notes = summary_table(summary, ["gray matter", "WM"]).split("\n\n")[1]
  gap = [line for line in notes.splitlines() if "between the conventions" in line]
  assert len(gap) == 1 and "gray matter (0.9000 official, 0.7000 standard)" in gap[0] and "WM" not in gap[0]
  assert "model's grid" in gap[0] and "native grid" in gap[0]
  summary["standard"] = part("mm", {"gray matter": 0.88, "WM": 0.78})
  assert "between the conventions" not in summary_table(summary, ["gray matter", "WM"])


def test_prediction_files_have_the_source_geometry(run, evaluated):
  from autosam_jax.data.nifti import read_nifti

  report = json.loads((evaluated / "metrics.json").read_text())
  for case_id in report["patients"]["patient003"]["standard"]:
    source = read_nifti(run["world"].acdc / "patient003" / f"{case_id}.nii.gz")
    prediction = nib.load(evaluated / "predictions" / f"{case_id}.nii.gz")
    assert prediction.shape == source.shape
    np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2, 3}


def test_ground_truth_scores_perfectly(run):
  """The targets fed through the scoring path in place of predictions: proves the stacking and the geometry."""
  from autosam_jax.data.volumes import load_volumes
  from autosam_jax.evaluation.evaluate import _cached_cases, score_patient
  from autosam_jax.evaluation.predict import preprocess_config_from_manifest
  from autosam_jax.features.cache import FeatureCache

  root = run["world"].root
  cache = FeatureCache(root / "cache")
  config = preprocess_config_from_manifest(cache.manifest["depends_on"])
  volumes, _, table, _ = load_volumes(root / "acdc", root / "tfds")
  cases = _cached_cases(cache, "patient003", volumes)
  targets = {case: np.stack([cache[i]["target"] for i in indices]) for case, indices in cases.items()}
  natives = {case: volumes[case].label for case in cases}
  exact = score_patient("patient003", targets, targets, volumes, config, table.foreground, native_predictions=natives)
  assert exact.official.shape[0] == sum(v.shape[2] for v in natives.values())
  checked = 0
  for result in [exact.official, *exact.standard.values()]:
    for name in ("RV", "MYO", "LV"):
      if result.dice[name].status == "ok":
        assert result.dice[name].value == 1.0 and result.hd95[name].value == 0.0, (result.convention, name)
        checked += 1
  assert checked == 9  # every class present in the patient and in each frame
  # through to_native: the 224 targets are a resampling of the native labels, so close but not exact
  mapped = score_patient("patient003", targets, targets, volumes, config, table.foreground)
  for case, result in mapped.standard.items():
    assert mapped.native[case].shape == volumes[case].label.shape
    assert result.mean("dice").value > 0.85, (case, result.to_dict()["mean"])


@pytest.fixture(scope="module")
def phantom(run):
  src = run["world"].acdc / "patient003" / "patient003_frame01.nii.gz"
  image = nib.load(src)
  data = np.asarray(image.dataobj)[:, :, :3]  # a short stack keeps the encoder cheap on the CPU
  out = run["root"] / "phantom_in"
  out.mkdir()
  small = nib.Nifti1Image(data, image.affine, image.header)
  nib.save(small, out / "phantom.nii.gz")
  return out / "phantom.nii.gz"


def test_predict_writes_a_label_map_with_the_input_geometry(run, phantom, tmp_path):
  from autosam_jax.cli import main

  assert main(["predict", "--model", run["model"], "--weights", str(run["weights"]), "--input", str(phantom),
               "--output", str(tmp_path / "out"), "--batch-size", "2"]) == 0
  source, result = nib.load(phantom), nib.load(tmp_path / "out" / "phantom.nii.gz")
  labels = np.asarray(result.dataobj)
  assert labels.shape == source.shape and labels.dtype == np.uint8
  np.testing.assert_array_equal(result.affine, source.affine)
  assert result.header.get_zooms() == source.header.get_zooms()
  assert set(np.unique(labels)) <= {0, 1, 2, 3}


def _assert_refused(capsys, args, named: str, out_dir):
  from autosam_jax.cli import main

  assert main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
  assert not out_dir.exists()


def test_predict_refuses_bad_inputs_and_writes_nothing(run, phantom, tmp_path, capsys):
  truncated = tmp_path / "in" / "truncated.nii.gz"
  truncated.parent.mkdir()
  truncated.write_bytes(phantom.read_bytes()[:300])
  common = ["--weights", str(run["weights"]), "--output", str(tmp_path / "out")]
  _assert_refused(capsys, ["predict", "--model", run["model"], "--input", str(truncated), *common], str(truncated),
                  tmp_path / "out")
  missing_model = tmp_path / "no_such_model"
  _assert_refused(capsys, ["predict", "--model", str(missing_model), "--input", str(phantom), *common],
                  str(missing_model), tmp_path / "out")
  # a model of another head for the same SAM
  import shutil
  other = tmp_path / "other_model"
  shutil.copytree(run["model"], other)
  config = json.loads((other / "train_config.json").read_text())
  (other / "train_config.json").write_text(json.dumps({**config, "head": "cnn"}))
  _assert_refused(capsys, ["predict", "--model", str(other), "--input", str(phantom), *common], str(other),
                  tmp_path / "out")
  # a folder with a good and a bad file: the bad one is found before anything is written
  (tmp_path / "in" / "good.nii.gz").write_bytes(phantom.read_bytes())
  _assert_refused(capsys, ["predict", "--model", run["model"], "--input", str(tmp_path / "in"), *common],
                  str(truncated), tmp_path / "out")


def test_evaluate_reports_bad_inputs_in_one_line(run, tmp_path, capsys):
  args = _evaluate_args(run, tmp_path / "eval")
  args[args.index("--splits") + 1] = str(tmp_path / "missing.json")
  _assert_refused(capsys, args, "missing.json", tmp_path / "eval")


def test_evaluate_refuses_a_folder_of_another_evaluation(run, evaluated, tmp_path, capsys):
  """Rerunning the same evaluation into its folder is fine; another model's scores would replace the recorded
  ones: refused naming the field, the folder unchanged. A model with a flipped byte is refused by its checksum."""
  import shutil

  from autosam_jax.cli import main

  out = tmp_path / "eval"
  shutil.copytree(evaluated, out)
  assert main(_evaluate_args(run, out)) == 0
  before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
  other = Path(shutil.copytree(run["model"], tmp_path / "other_model"))
  args = _evaluate_args(run, out)
  args[args.index("--model") + 1] = str(other)
  capsys.readouterr()
  assert main(args) == 2
  line = capsys.readouterr().err.strip()
  assert line.startswith(f"error: {out}: holds a run with another model"), line
  assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
  state_file = max((p for p in (other / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(state_file.read_bytes())
  data[-1] ^= 0x10
  state_file.write_bytes(bytes(data))
  _assert_refused(capsys, [*args[:-1], str(tmp_path / "eval2")], str(state_file), tmp_path / "eval2")


def test_predict_maps_scans_onto_the_grid_the_model_was_trained_on(phantom, tmp_path):
  """A model saved with preprocess.json (here a random UNet on 112 x 112 slices of 2.5 mm): `predict` without a cache
  resamples each scan onto that grid, not onto the official 224 x 224 of 1.25 mm."""
  from flax import nnx

  from autosam_jax.cli import main
  from autosam_jax.data.labels import ACDC_TABLE
  from autosam_jax.data.nifti import read_nifti
  from autosam_jax.data.orientation import choose_orientation
  from autosam_jax.data.preprocess import PreprocessConfig
  from autosam_jax.evaluation.predict import make_head_forward, predict_volume
  from autosam_jax.models.unet import UNet
  from autosam_jax.train.loop import load_head, save_model

  config = TrainConfig(head="unet", variant="faithful", unet_base_channels=4, num_classes=4)
  coarse = PreprocessConfig(mode="faithful", target_spacing=(2.5, 2.5), slice_size=112)
  unet = UNet(4, base_channels=4, rngs=nnx.Rngs(3))
  # Random weights give one class everywhere; without the bias and with a larger 1x1 head the labels follow the image.
  unet.head.bias.set_value(np.zeros(unet.head.bias.shape, np.float32))
  unet.head.kernel.set_value(np.asarray(unet.head.kernel.get_value()) * 30)
  _, params, frozen = nnx.split(unet, nnx.Param, ...)
  save_model(tmp_path / "unet", params, frozen, config, coarse.to_dict(), {"labels": ACDC_TABLE.to_dict()})
  assert main(["predict", "--model", str(tmp_path / "unet"), "--input", str(phantom), "--output",
               str(tmp_path / "out")]) == 0
  predicted = np.asarray(nib.load(tmp_path / "out" / phantom.name).dataobj)

  head, _ = load_head(tmp_path / "unet", None)
  volume = read_nifti(phantom)
  orientation = choose_orientation(volume.affine, volume.spacing)  # predict slices in the canonical order
  expected = {}
  for grid in (coarse, PreprocessConfig(mode="faithful")):
    forward = make_head_forward(head, grid.target_size, 4)
    expected[grid.slice_size] = predict_volume(volume.data, volume.spacing, None, forward, grid, 4, str(phantom),
                                               orientation=orientation)
  assert len(np.unique(expected[112])) > 1 and not np.array_equal(expected[112], expected[224])
  np.testing.assert_array_equal(predicted, expected[112])
