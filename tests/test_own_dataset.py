"""Datasets that are not ACDC, through the command line as a user runs them: nnU-Net's raw layout with their own
classes and names, isotropic voxels in a non-standard voxel order (v1 dataset.json), and five classes plus nnU-Net's
ignore label on thick slices (v2). Every output names exactly the dataset's scored classes; Dice per class is checked
against MONAI on the written predictions (with the ignore label's pixels left out, as nnU-Net scores); permuted and
flipped copies of a scan give the permuted and flipped prediction."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from tests.conftest import TINY_CONFIGS

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "experiments" / "configs"
NAME = "dim64-win5-pad"
BRAIN = ["grey matter", "white matter"]
ORGANS = ["liver", "spleen", "left kidney", "cyst", "vessel"]
ACDC_WORDS = ("RV", "MYO", "LV", "ED", "ES")


def _main(args) -> int:
  from autosam_jax.cli import main

  return main([str(a) for a in args])


@pytest.fixture(scope="module")
def world(meta_checkpoints, tmp_path_factory):
  from autosam_jax.data.shapes import write_shapes_dataset

  root = tmp_path_factory.mktemp("own_dataset")
  _, checkpoint = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  # Isotropic 1 mm voxels stored with the axes permuted and two of them reversed, labels in v1's {"0": name} form.
  brain = write_shapes_dataset(root / "Dataset201_Brain", num_cases=6, class_names=BRAIN, seed=3,
                               spacing=(1.0, 1.0, 1.0), shape=(36, 40, 32), voxel_order=(2, 0, 1),
                               flips=(True, False, True), dataset_json_version=1)
  # The last class is nnU-Net's ignore label: unannotated blobs, never a class of the model or of a report.
  organs = write_shapes_dataset(root / "Dataset202_Organs", num_cases=6, class_names=[*ORGANS, "ignore"], seed=4,
                                spacing=(1.5, 1.5, 5.0), shape=(48, 44, 10))
  assert _main(["convert", checkpoint, root / "weights"]) == 0
  return {"root": root, "checkpoint": checkpoint, "brain": brain, "organs": organs, "weights": root / "weights"}


def _labels_of(dataset: Path) -> dict[str, int]:
  from autosam_jax.data.labels import LabelTable

  declared = json.loads((dataset / "dataset.json").read_text())["labels"]
  return LabelTable.from_dataset_json(dataset, declared).to_dict()


def _monai_dice(prediction: np.ndarray, truth: np.ndarray, value: int) -> float:
  metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
  as_batch = lambda mask: torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()
  return float(metric(as_batch(prediction == value), as_batch(truth == value))[0, 0])


def _check_report(eval_dir: Path, dataset: Path, names: list[str]) -> None:
  """metrics.json/md name exactly the dataset's classes, and each standard Dice is MONAI's on the written files."""
  report = json.loads((eval_dir / "metrics.json").read_text())
  assert report["labels"] == _labels_of(dataset) and report["classes"] == names
  for convention in ("official", "standard"):
    assert list(report["summary"][convention]["classes"]) == names
  table = (eval_dir / "metrics.md").read_text()
  summary, _, per_case = table.partition("### Per case")
  rows = [line.split("|")[1].strip() for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
  assert rows == ["class", *names, "mean"]
  if "zero_shot" not in str(eval_dir):  # evaluate's reports add a row per case
    assert per_case.splitlines()[2] == "| case | convention | " + " | ".join(names) + " | mean Dice | mean HD95 |"
  assert not any(word in table.replace("SAM", "") for word in ACDC_WORDS), table
  scored = 0
  for patient in report["patients"].values():
    for case_id, result in patient["standard"].items():
      assert list(result["classes"]) == names
      written = nib.load(eval_dir / "predictions" / f"{case_id}.nii.gz")
      label_file = nib.load(dataset / "labelsTr" / f"{case_id}.nii.gz")
      # mapped back to the file's own voxel order and geometry
      assert written.shape == label_file.shape
      np.testing.assert_allclose(written.affine, label_file.affine, atol=1e-5)
      prediction, truth = np.asarray(written.dataobj), np.asarray(label_file.dataobj)
      assert set(np.unique(prediction).tolist()) <= set(range(len(names) + 1))  # never the ignore label
      ignore = _labels_of(dataset).get("ignore")
      if ignore is not None:  # nnU-Net's scoring: the ignore label's pixels count for no class
        assert (truth == ignore).any() and (prediction[truth == ignore] > 0).any()
        prediction, truth = np.where(truth == ignore, 0, prediction), np.where(truth == ignore, 0, truth)
      for name, value in _labels_of(dataset).items():
        if value == 0 or name == "ignore":
          continue
        ours, monai = result["classes"][name]["dice"]["value"], _monai_dice(prediction, truth, value)
        assert (math_nan(ours) and math_nan(monai)) or ours == pytest.approx(monai, abs=1e-6), (case_id, name)
        scored += 1
  assert scored >= len(names)


def math_nan(value) -> bool:
  return value is None or (isinstance(value, float) and np.isnan(value))


def test_sweep_on_a_two_class_isotropic_dataset_in_another_voxel_order(world, capsys):
  """The improved protocol on 6 patients (a validation patient kept), a head, LoRA on the encoder, the UNet and
  zero-shot SAM."""
  brain, root = world["brain"], world["root"]
  assert _main(["validate", brain]) == 0
  summary = capsys.readouterr().out
  assert "0 background, 1 grey matter, 2 white matter" in summary and "6 patients" in summary

  values = {"data": str(brain), "encoders": {"tiny": str(world["weights"])},
            "methods": ["autosam", "lora", "unet", "zero_shot_box"], "mode": "improved", "tr_sizes": [2],
            "num_folds": 2, "folds": [0], "dtype": "fp32", "train": {"epochs": 2, "learning_rate": 5e-3, "batch_size": 4},
            # LoRA in fp32 without remat, as on a CPU (bf16 and remat: tests/test_lora*.py)
            "method_train": {"unet": {"unet_base_channels": 8}, "autosam": {"joint": True},
                             "lora": {"encoder_dtype": "float32", "remat": False}},
            "image_size": 64, "image_spacing": 1.0}
  config = root / "brain_sweep.py"
  config.write_text(f"def get_config():\n  return {values!r}\n")
  out = root / "brain_sweep"
  assert _main(["sweep", "--config", config, "--out", out, "--no-progress"]) == 0
  printed = capsys.readouterr().out

  results = json.loads((out / "results.json").read_text())
  assert results["labels"] == _labels_of(brain) == {"background": 0, "grey matter": 1, "white matter": 2}
  assert results["classes"] == BRAIN and results["finished"] == results["total"] == 4
  splits = json.loads((out / "splits.json").read_text())["splits"][0]
  assert len(splits["val"]) >= 1  # the improved protocol's plateau and best model need one
  for cell in results["cells"]:
    for convention in ("official", "standard"):
      for metric in ("dice", "hd95"):
        assert list(cell[convention][metric]) == [*BRAIN, "mean"]
    _check_report(out / cell["run_dir"] / "eval", brain, BRAIN)
  table = (out / "results.md").read_text()
  assert "grey matter and white matter" in table and "one volume per case" in table
  assert not any(word in table.replace("SAM", "") for word in ACDC_WORDS), table
  assert "grey matter and white matter" in printed
  autosam = next(c for c in results["cells"] if c["method"] == "autosam" and c["tr_size"] == 2)
  model = out / autosam["run_dir"] / "best_model"
  assert json.loads((model / "model.json").read_text())["labels"] == _labels_of(brain)
  assert json.loads((model / "train_config.json").read_text())["num_classes"] == 3
  lora = next(c for c in results["cells"] if c["method"] == "lora" and c["tr_size"] == 2)
  lora_config = json.loads((out / lora["run_dir"] / "best_model" / "train_config.json").read_text())
  assert lora_config["lora_rank"] == 4 and lora_config["joint"] and lora_config["num_classes"] == 3
  assert json.loads((out / "cache" / "tiny-improved-inputs" / "manifest.json").read_text())["depends_on"]["kind"] \
      == "sam_inputs"
  assert "LoRA + AutoSAM head (tiny)" in table


@pytest.fixture(scope="module")
def organs_run(world):
  """make-splits, precompute, train, evaluate on the 5-class dataset, each as its own command."""
  organs, root, weights = world["organs"], world["root"], world["weights"]
  tfds, cache, splits = root / "tfds_organs", root / "cache_organs", root / "organs_splits.json"
  assert _main(["make-splits", organs, "--folds", "3", "--val-patients", "1", "--out", splits]) == 0
  assert _main(["precompute", "--data", organs, "--tfds-dir", tfds, "--weights", weights, "--out", cache,
                "--mode", "faithful", "--dtype", "bf16", "--batch-size", "8"]) == 0
  manifest = json.loads((cache / "manifest.json").read_text())
  assert manifest["depends_on"]["labels"] == _labels_of(organs)
  run = root / "organs_run"
  assert _main(["train", "--config", CONFIGS / "linear_faithful.py", "--cache", cache, "--weights", weights,
                "--splits", splits, "--tr-size", "1", "--out", run, "--set", "epochs=2", "--no-progress"]) == 0
  assert _main(["evaluate", "--model", run / "final_model", "--weights", weights, "--cache", cache, "--data", organs,
                "--tfds-dir", tfds, "--splits", splits, "--out", run / "eval"]) == 0
  # the frame the build cut the cases in travels to the cache and the model, for predict
  built = json.loads(next(tfds.rglob("metadata.json")).read_text())["orientation_references"]
  assert len(built) == 1 and built[0]["cases"] == 6
  assert manifest["depends_on"]["orientation_references"] == built
  assert json.loads((run / "final_model" / "model.json").read_text())["orientation_references"] == built
  return {"tfds": tfds, "cache": cache, "splits": splits, "run": run}


def test_five_classes_through_train_evaluate_and_predict(world, organs_run, tmp_path, capsys):
  organs, weights, run = world["organs"], world["weights"], organs_run["run"]
  config = json.loads((run / "final_model" / "train_config.json").read_text())
  assert config["num_classes"] == 6  # from the data, not a default: background and 5 classes, not the ignore label
  _check_report(run / "eval", organs, ORGANS)

  # predict on the raw nnU-Net images: outputs named by case (the channel suffix dropped), the file's geometry kept
  out = tmp_path / "predicted"
  assert _main(["predict", "--model", run / "final_model", "--weights", weights, "--input", organs / "imagesTr",
                "--output", out]) == 0
  written = sorted(p.name for p in out.iterdir())
  assert written == sorted(p.name for p in (organs / "labelsTr").iterdir())
  for name in written:
    labels = np.asarray(nib.load(out / name).dataobj)
    assert labels.shape == nib.load(organs / "labelsTr" / name).shape
    assert set(np.unique(labels).tolist()) <= set(range(len(ORGANS) + 1))
  # predict's own encoder pass gives what evaluate computed from the (bf16) cache
  for case_id in json.loads((run / "eval" / "metrics.json").read_text())["patients"]:
    evaluated = np.asarray(nib.load(run / "eval" / "predictions" / f"{case_id}.nii.gz").dataobj)
    agree = np.mean(evaluated == np.asarray(nib.load(out / f"{case_id}.nii.gz").dataobj))
    assert agree > 0.999, (case_id, agree)


def test_permuted_and_flipped_copies_give_the_same_prediction(world, organs_run, tmp_path):
  from autosam_jax.data.shapes import reorder_voxels

  organs, weights, run = world["organs"], world["weights"], organs_run["run"]
  source = nib.load(organs / "imagesTr" / "case_001_0000.nii.gz")
  data = np.asarray(source.dataobj)
  inputs = tmp_path / "copies"
  inputs.mkdir()
  orders = {"as_stored": ((0, 1, 2), (False, False, False)), "swapped": ((1, 0, 2), (False, True, False)),
            "slices_first": ((2, 0, 1), (True, False, True))}
  for name, (order, flips) in orders.items():
    stored, affine = reorder_voxels(data, source.affine, order, flips)
    nib.save(nib.Nifti1Image(stored, affine), inputs / f"{name}.nii.gz")
  out = tmp_path / "predicted"
  assert _main(["predict", "--model", run / "final_model", "--weights", weights, "--input", inputs,
                "--output", out]) == 0
  reference = np.asarray(nib.load(out / "as_stored.nii.gz").dataobj)
  assert len(np.unique(reference)) > 1  # a prediction with structure, not an empty map
  for name, (order, flips) in orders.items():
    expected, _ = reorder_voxels(reference, source.affine, order, flips)
    np.testing.assert_array_equal(np.asarray(nib.load(out / f"{name}.nii.gz").dataobj), expected, err_msg=name)


def test_a_config_with_other_classes_is_refused_naming_both(world, organs_run, tmp_path, capsys):
  out = tmp_path / "run"
  assert _main(["train", "--config", CONFIGS / "linear_faithful.py", "--cache", organs_run["cache"], "--weights",
                world["weights"], "--splits", organs_run["splits"], "--tr-size", "1", "--out", out,
                "--set", "num_classes=4", "--no-progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "num_classes is 4" in err[0] and "6 classes" in err[0] and "liver" in err[0], err
  assert not out.exists()
  # a model of one dataset evaluated on a cache and data of another
  brain_cache = world["root"] / "cache_brain"
  assert _main(["precompute", "--data", world["brain"], "--tfds-dir", world["root"] / "tfds_brain", "--weights",
                world["weights"], "--out", brain_cache, "--mode", "faithful", "--dtype", "fp32"]) == 0
  capsys.readouterr()
  assert _main(["evaluate", "--model", organs_run["run"] / "final_model", "--weights", world["weights"],
                "--cache", brain_cache, "--data", world["brain"], "--tfds-dir", world["root"] / "tfds_brain",
                "--splits", organs_run["splits"], "--out", tmp_path / "eval"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "liver" in err[0] and "grey matter" in err[0], err
  assert not (tmp_path / "eval").exists()


def test_each_source_folder_gets_its_own_default_tfds_folder(tmp_path, monkeypatch, capsys):
  """Two datasets of one layout and one name in different places: without --tfds-dir each is built in a folder of
  its own (the same for every spelling of its path); in one --tfds-dir (or its old name --data-dir) the second is
  refused, naming the fix."""
  from autosam_jax.data.shapes import write_shapes_dataset
  from autosam_jax.data.volumes import default_tfds_dir

  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  first, second = (write_shapes_dataset(tmp_path / where / "Dataset201_Brain", num_cases=2, class_names=BRAIN,
                                        seed=seed, shape=(24, 24, 6)) for where, seed in (("a", 1), ("b", 2)))
  assert default_tfds_dir("a/Dataset201_Brain") == default_tfds_dir(first) == default_tfds_dir(f"{first}/")
  assert default_tfds_dir(first) != default_tfds_dir(second)
  assert default_tfds_dir(first).parent == tmp_path / "home" / "tensorflow_datasets" / "autosam-jax"
  for dataset in (first, second):
    assert _main(["build-dataset", "nnunet", dataset]) == 0
    assert f"in {default_tfds_dir(dataset)}/" in capsys.readouterr().out
  assert _main(["build-dataset", "nnunet", first, "--data-dir", tmp_path / "shared"]) == 0
  assert (tmp_path / "shared" / "nnunet_raw").is_dir()
  capsys.readouterr()
  assert _main(["build-dataset", "nnunet", second, "--tfds-dir", tmp_path / "shared"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "built from other source files" in err[0] and "another --tfds-dir" in err[0], err


def test_the_own_dataset_sweep_config_fits_six_cases_and_is_the_readmes(tmp_path):
  """experiments/configs/own_dataset_sweep.py on a dataset of 6 cases (the README's practice dataset): 3 folds of
  tr_size 1 and 2 with a validation patient each, a LoRA cell among them; its docstring's command is the README's."""
  import ast
  import re

  from autosam_jax.experiment.sweep import _cells, load_sweep_config, prepare_splits

  path = CONFIGS / "own_dataset_sweep.py"
  config = load_sweep_config(path, ["data=Dataset201_Brain", "encoders={'vit_b': 'weights/vit_b'}"])
  splits, _ = prepare_splits(config, tmp_path, [f"case_{i:03d}" for i in range(6)])
  assert [len(s.val) for s in splits] == [1, 1, 1]
  cells = _cells(config, splits)
  assert len(cells) == 24 and {c.method for c in cells} >= {"lora", "unet"}
  docstring = ast.get_docstring(ast.parse(path.read_text()))
  flat = lambda text: " ".join(text.replace("\\\n", " ").split())
  command = re.search(r"autosam-jax sweep --config \S+own_dataset_sweep.py.*?\}\"", docstring, re.S).group(0)
  assert flat(command) in flat((REPO_ROOT / "README.md").read_text())
