"""Whole runs through the `autosam-jax` command on tiny synthetic data: the faithful heads and the UNet trained,
killed at a chosen point after a mid-epoch checkpoint (AutoSAM with SIGKILL, the linear head with SIGINT, both as
processes of their own; the CNN and the UNet interrupted in this process) and resumed (the linear head also through a
rerun on a full disk);
the improved mode from precompute to predict; the UNet without SAM; and
model/cache mismatches refused before anything is written."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import WORLD_SPLIT, limited_file_size

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "experiments" / "configs"
EPOCHS = 2
BATCH_SIZE = 4
TRAIN, VAL, TEST = "patient001", "patient002", "patient003"
UNET_GRID = 112  # the UNet's image cache: 112 x 112 pixels of 2.5 mm


def _main(args: list[str]) -> int:
  from autosam_jax.cli import main

  return main([str(a) for a in args])


def _rows(run_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _final_params(run_dir: Path) -> list[np.ndarray]:
  import jax
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore((run_dir / "final_model" / "state").absolute())
  return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


@pytest.fixture(scope="module")
def data(tiny_world, tmp_path_factory):
  """The tiny world (tests/conftest.py: three phantoms for train, val and test, the split file, the faithful feature
  cache with a view of each training slice) and the test patient's images as a folder to predict."""
  from autosam_jax.features.cache import FeatureCache

  assert ((TRAIN,), (VAL,), (TEST,)) == (WORLD_SPLIT["train"], WORLD_SPLIT["val"], WORLD_SPLIT["test"])
  root = tmp_path_factory.mktemp("cli_runs")
  data = {"root": root, "weights": tiny_world.weights, "acdc": tiny_world.acdc, "tfds": tiny_world.tfds,
          "splits": tiny_world.split, "cache": tiny_world.cache_views}
  labeled = [it for it in FeatureCache(data["cache"]).items if it["patient_id"] == TRAIN and it["view"] == 0]
  data["steps_per_epoch"] = -(-len(labeled) // BATCH_SIZE)
  assert data["steps_per_epoch"] >= 2, "the training patient needs slices for two steps an epoch"
  # the test patient's images (not labels), as a folder to predict
  images = root / "test_images"
  images.mkdir()
  for path in sorted((data["acdc"] / TEST).glob(f"{TEST}_frame??.nii.gz")):
    shutil.copy(path, images / path.name)
  data["images"] = images
  assert len(list(images.iterdir())) == 2
  # Training subprocesses share compiled programs with this process through the session's persistent JAX cache.
  data["env"] = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return data


def _assert_same_geometry(prediction_file: Path, source_file: Path, header_copied: bool) -> np.ndarray:
  source, result = nib.load(source_file), nib.load(prediction_file)
  labels = np.asarray(result.dataobj)
  assert labels.shape == source.shape and labels.dtype == np.uint8, (prediction_file, labels.shape, source.shape)
  if header_copied:
    np.testing.assert_array_equal(result.affine, source.affine)
  else:
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
  np.testing.assert_array_equal(result.header["dim"], source.header["dim"])
  np.testing.assert_allclose(result.header.get_zooms(), source.header.get_zooms(), rtol=1e-6)
  assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
  return labels


# ---------------------------------------------------------------------------------------------------------------------
# Faithful heads: trained, killed after a mid-epoch checkpoint, rerun


HEADS = {"autosam": [], "cnn": ["--set", "cnn_top_channels=8"], "linear": [], "unet": ["--set", "unet_base_channels=8"]}


def _train_args(data, head: str, out: Path) -> list[str]:
  # A step checkpoint one step into the second epoch, so the kill lands where the data iterator's state matters.
  every = data["steps_per_epoch"] + 1
  # the UNet trains on images (with the official augmentation in the step) and needs no SAM
  inputs = (["--cache", str(data["image_cache"])] if head == "unet" else
            ["--cache", str(data["cache"]), "--weights", str(data["weights"])])
  return ["train", "--config", str(CONFIGS / f"{head}_faithful.py"), *inputs,
          "--splits", str(data["splits"]), "--tr-size", "1", "--out", str(out),
          "--set", f"epochs={EPOCHS}", "--set", f"batch_size={BATCH_SIZE}", "--set", f"checkpoint_every_steps={every}",
          *HEADS[head]]


def _checkpoint_steps(run_dir: Path) -> list[int]:
  directory = run_dir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


@pytest.mark.parametrize("head", sorted(HEADS))
def test_faithful_head_trains_and_resumes_bit_identically_after_a_kill(data, head, tmp_path, request, capsys,
                                                                       kill_at):
  """The reference and the rerun run in this process. The killed run stops at a chosen point, right after step
  spe + 2, one step past the mid-epoch checkpoint at spe + 1: AutoSAM's is a process of its own killed with SIGKILL,
  the linear head's one that gets SIGINT (through the executable), and the CNN's and the UNet's run in this process,
  interrupted there as a Ctrl-C would."""
  if head == "unet":
    data = {**data, "image_cache": request.getfixturevalue("image_cache")}
  spe = data["steps_per_epoch"]
  reference = tmp_path / "reference"
  capsys.readouterr()
  assert _main(_train_args(data, head, reference)) == 0, capsys.readouterr().err[-3000:]
  assert f"trained {head} (faithful) on 1 patient(s): {EPOCHS * spe} steps" in capsys.readouterr().out
  rows = _rows(reference)
  steps = [r for r in rows if r["kind"] == "step"]
  epochs = [r for r in rows if r["kind"] == "epoch"]
  assert [r["step"] for r in steps] == list(range(1, EPOCHS * spe + 1))
  assert [r["epoch"] for r in epochs] == list(range(EPOCHS)) and all("val_dice" in r for r in epochs)
  assert all(math.isfinite(r["loss"]) for r in steps)
  saved = json.loads((reference / "final_model" / "train_config.json").read_text())
  assert saved["head"] == head and saved["variant"] == "faithful" and saved["epochs"] == EPOCHS
  assert (reference / "curves.png").stat().st_size > 1000

  killed = tmp_path / "killed"
  mid_epoch = spe + 1
  # The linear head's run gets a Ctrl-C (SIGINT) there instead: one line, exit code 130, no traceback or crash.
  how = {"autosam": "KILL", "linear": "INT"}.get(head, "in-process")
  if how == "in-process":
    kill_at(f"train.step:{mid_epoch + 1}", "INT")
    assert _main(_train_args(data, head, killed)) == 130
    kill_at("")
  else:
    env = {**data["env"], "AUTOSAM_JAX_KILL_AT": f"train.step:{mid_epoch + 1}", "AUTOSAM_JAX_KILL_SIGNAL": how}
    process = subprocess.run([sys.executable, "-m", "autosam_jax.cli", *_train_args(data, head, killed)], env=env,
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  if how == "INT":
    assert process.returncode == 130, process.stderr[-3000:]
    assert process.stderr.strip().splitlines()[-1] == ("error: SIGINT: interrupted; rerun the same command to resume "
                                                       "(finished work is kept)"), process.stderr[-3000:]
    assert "Traceback" not in process.stderr
  elif how == "KILL":
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
  assert _checkpoint_steps(killed) == [spe, mid_epoch] and not (killed / "final_model").exists()

  if head == "linear":
    # Rerun on a "full disk" (files limited to 200 kB; this head's checkpoint is ~1 MB): it resumes, its first
    # checkpoint write fails, and it stops with one line and exit code 4, the kill's checkpoint still the latest.
    full = subprocess.run([*limited_file_size(200_000), sys.executable, "-m", "autosam_jax.cli",
                           *_train_args(data, head, killed)], env=data["env"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    lines = full.stderr.strip().splitlines()  # the progress bar comes before it
    assert full.returncode == 4 and lines[-1].startswith("error: disk full while writing"), full.stderr[-3000:]
    assert str(killed) in lines[-1], lines[-1]  # names where it was writing
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert _checkpoint_steps(killed)[-1] == mid_epoch and not (killed / "final_model").exists()

  capsys.readouterr()
  assert _main(_train_args(data, head, killed)) == 0
  rerun = capsys.readouterr()
  assert f"trained {head} (faithful)" in rerun.out
  # it resumed from the checkpoint (its progress starts there) rather than starting again
  progress = re.search(r"(\d+)/(\d+) \[", rerun.err)
  assert progress and progress.groups() == (str(mid_epoch), str(EPOCHS * spe)), \
      f"the rerun did not start from checkpoint {mid_epoch}: {rerun.err[:500]}"
  ours, theirs = _final_params(killed), _final_params(reference)
  assert len(ours) == len(theirs) > 0
  for a, b in zip(ours, theirs):
    np.testing.assert_array_equal(a, b)
  assert _rows(killed) == rows
  # temporary files: none; the run's lock file (.lock) is kept on purpose, as the one hidden file
  leftovers = [p.name for p in killed.rglob("*") if (p.name.startswith(".") and p.name != ".lock") or "tmp" in p.name]
  assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------------------------------
# Improved mode: precompute, train, evaluate, predict


@pytest.fixture(scope="module")
def improved(data):
  root = data["root"]
  cache = root / "cache_improved"
  assert _main(["precompute", "--data", data["acdc"], "--tfds-dir", data["tfds"], "--weights", data["weights"],
                "--out", cache, "--mode", "improved", "--dtype", "fp32", "--batch-size", "8"]) == 0
  out = root / "run_improved"
  # A high learning rate, so that the head predicts more than background and comparing label maps means something.
  assert _main(["train", "--config", CONFIGS / "autosam_improved.py", "--cache", cache, "--weights", data["weights"],
                "--splits", data["splits"], "--tr-size", "1", "--out", out, "--set", "joint=True",
                "--set", f"epochs={EPOCHS}", "--set", f"batch_size={BATCH_SIZE}", "--set", "learning_rate=0.02"]) == 0
  assert (out / "best_model" / "train_config.json").is_file() and (out / "final_model").is_dir()
  return {"cache": cache, "run": out, "model": out / "best_model"}


def _improved_valid_grid(source_file: Path, encoder_size: int, head_size: int) -> tuple[int, int]:
  """Rows and columns of the improved head grid that hold image: the physical extent's longer side resized to the
  encoder size (SAM's ResizeLongestSide), seen on the head grid."""
  header = nib.load(source_file).header
  (rows, cols), (sx, sy) = header.get_data_shape()[:2], header.get_zooms()[:2]
  extents = (rows * sx, cols * sy)
  resized = [min(int(e * encoder_size / max(extents) + 0.5), encoder_size) for e in extents]
  return tuple(min(math.ceil(n * head_size / encoder_size - 1e-9), head_size) for n in resized)


def test_improved_mode_end_to_end(data, improved, tmp_path):
  from autosam_jax import SamConfig
  from autosam_jax.models.loading import read_config

  sam = read_config(data["weights"])
  assert isinstance(sam, SamConfig)
  head_size = 4 * sam.image_embedding_size
  saved = json.loads((improved["model"] / "train_config.json").read_text())
  assert saved["variant"] == "improved" and saved["joint"] is True and saved["head"] == "autosam"

  evaluation = tmp_path / "eval"
  assert _main(["evaluate", "--model", improved["model"], "--weights", data["weights"], "--cache", improved["cache"],
                "--data", data["acdc"], "--tfds-dir", data["tfds"], "--splits", data["splits"], "--out", evaluation,
                "--batch-size", "4"]) == 0
  report = json.loads((evaluation / "metrics.json").read_text())
  assert set(report["summary"]) == {"official", "standard"}
  assert report["summary"]["official"]["units"] == "voxel" and report["summary"]["standard"]["units"] == "mm"
  assert report["preprocess"]["mode"] == "improved" and report["train_config"]["variant"] == "improved"
  patient = report["patients"][TEST]
  frames = patient["standard"]
  assert sorted(f["frame"] for f in frames.values()) == ["ED", "ES"]
  # the official volume: both frames' slices on the part of the improved head grid that holds image
  grid = _improved_valid_grid(data["acdc"] / TEST / f"{sorted(frames)[0]}.nii.gz", sam.image_size, head_size)
  assert max(grid) == head_size and min(grid) <= head_size
  assert patient["official"]["shape"] == [sum(f["shape"][2] for f in frames.values()), *grid]
  evaluated = {}
  for case_id in frames:
    source = data["acdc"] / TEST / f"{case_id}.nii.gz"
    evaluated[case_id] = _assert_same_geometry(evaluation / "predictions" / f"{case_id}.nii.gz", source, False)

  predicted = tmp_path / "predicted"
  assert _main(["predict", "--model", improved["model"], "--weights", data["weights"], "--input", data["images"],
                "--output", predicted, "--batch-size", "4"]) == 0
  assert sorted(p.name for p in predicted.iterdir()) == sorted(p.name for p in data["images"].iterdir())
  for source in sorted(data["images"].iterdir()):
    labels = _assert_same_geometry(predicted / source.name, source, True)
    # the encoder and preprocessing run here agree with the cached embeddings evaluate used (up to rounding near ties)
    agreement = np.mean(labels == evaluated[source.name.removesuffix(".nii.gz")])
    assert agreement > 0.98, (source.name, agreement)


# ---------------------------------------------------------------------------------------------------------------------
# The UNet: image cache, no SAM weights anywhere


@pytest.fixture(scope="module")
def image_cache(data):
  cache = data["root"] / "cache_images"
  # the official field of view (224 pixels of 1.25 mm) at a quarter of the pixels, as the demo trains its UNet
  assert _main(["image-cache", "--data", data["acdc"], "--tfds-dir", data["tfds"], "--out", cache, "--slice-size",
                str(UNET_GRID), "--spacing", "2.5"]) == 0
  return cache


@pytest.fixture(scope="module")
def unet(data, image_cache):
  root, cache = data["root"], image_cache
  out = root / "run_unet"
  assert _main(["train", "--config", CONFIGS / "unet_faithful.py", "--cache", cache, "--splits", data["splits"],
                "--tr-size", "1", "--out", out, "--set", "unet_base_channels=8", "--set", "epochs=1",
                "--set", f"batch_size={BATCH_SIZE}"]) == 0
  return {"cache": cache, "run": out, "model": out / "final_model"}


def test_unet_through_the_command_without_weights(data, unet, tmp_path):
  saved = json.loads((unet["model"] / "train_config.json").read_text())
  assert saved["head"] == "unet" and saved["unet_base_channels"] == 8 and saved["augment"] == "faithful"
  rows = _rows(unet["run"])
  assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [0]
  assert all(math.isfinite(r["loss"]) for r in rows if r["kind"] == "step")

  evaluation = tmp_path / "eval"
  assert _main(["evaluate", "--model", unet["model"], "--cache", unet["cache"], "--data", data["acdc"], "--tfds-dir",
                data["tfds"], "--splits", data["splits"], "--out", evaluation, "--batch-size", "4"]) == 0
  report = json.loads((evaluation / "metrics.json").read_text())
  assert set(report["summary"]) == {"official", "standard"} and report["train_config"]["head"] == "unet"
  patient = report["patients"][TEST]
  assert patient["official"]["shape"] == [sum(f["shape"][2] for f in patient["standard"].values()), UNET_GRID,
                                          UNET_GRID]
  for case_id in patient["standard"]:
    _assert_same_geometry(evaluation / "predictions" / f"{case_id}.nii.gz", data["acdc"] / TEST / f"{case_id}.nii.gz",
                          False)

  predicted = tmp_path / "predicted"
  assert _main(["predict", "--model", unet["model"], "--input", data["images"], "--output", predicted,
                "--batch-size", "4"]) == 0
  for source in sorted(data["images"].iterdir()):
    _assert_same_geometry(predicted / source.name, source, True)


# ---------------------------------------------------------------------------------------------------------------------
# Mismatches: exit 2, one line on stderr, nothing written


def _assert_refused(capsys, args, words: tuple[str, ...], out_dir: Path):
  capsys.readouterr()
  assert _main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert all(w in err[0] for w in words), (words, err[0])
  assert not out_dir.exists(), f"{out_dir} was written by a refused command"


def test_mismatched_models_and_caches_are_refused(data, improved, unet, tmp_path, capsys):
  common = ["--data", data["acdc"], "--tfds-dir", data["tfds"], "--splits", data["splits"]]
  # a UNet cannot read SAM embeddings
  _assert_refused(capsys, ["evaluate", "--model", unet["model"], "--cache", data["cache"], *common,
                           "--out", tmp_path / "unet_on_features"],
                  ("holds SAM embeddings", "unet head takes model images", "autosam-jax image-cache"),
                  tmp_path / "unet_on_features")
  # a SAM head cannot read images
  _assert_refused(capsys, ["evaluate", "--model", improved["model"], "--weights", data["weights"], "--cache",
                           unet["cache"], *common, "--out", tmp_path / "head_on_images"],
                  ("holds model images", "autosam head takes SAM embeddings", "autosam-jax precompute"),
                  tmp_path / "head_on_images")
  # a SAM head needs the SAM it was trained with
  _assert_refused(capsys, ["predict", "--model", improved["model"], "--input", data["images"], "--output",
                           tmp_path / "head_without_weights"], ("--weights",), tmp_path / "head_without_weights")
