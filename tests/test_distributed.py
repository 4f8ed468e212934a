"""One pipeline (precompute with an augmented view, train, evaluate) three ways: in this process on one device, in
one process with 4 CPU devices, and as 2 processes x 2 devices under jax.distributed on localhost, the latter's
training stopped after a mid-epoch checkpoint and resumed by both processes. All three give the same feature cache (to
round-off) and, trained on one of the caches, the same losses and parameters and the same evaluation. The batch of 3
is padded with zero-weight rows to 4 on the devices. The 1-device and 4-device runs also train LoRA factors with the
linear head on an input cache, and the linear head semi-supervised (a patient more in the training set, unlabeled),
with the same losses."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# 5 steps an epoch: a checkpoint at step 3 (fewer saves than every 2 steps), the 2-process run stopped after step 4
EPOCHS, BATCH_SIZE, STOP_AT, CHECKPOINT_EVERY = 2, 3, 4, 3
LORA_SETS = ["epochs=1", f"batch_size={BATCH_SIZE}", "learning_rate=0.005", "lora_rank=2", "plateau_start_epoch=1"]
# every unlabeled pixel pseudo-labeled (threshold 0), so the unlabeled stream and its CutMix boxes count in the loss
SEMI_SETS = ["epochs=1", f"batch_size={BATCH_SIZE}", "learning_rate=0.005", "semi=True", "semi_threshold=0.0",
             "semi_ramp_epochs=0", "plateau_start_epoch=1"]
TIMEOUT_S = 240


def pipeline(a: dict) -> None:
  """A whole pipeline, as `autosam-jax` commands in this process: precompute (one augmented view of the training
  patient's slices), train (in the 2-process run first stopped after STOP_AT steps through the Python API, then
  resumed by the command) and evaluate. Every run trains on the 4-device run's cache and evaluates one model on it:
  the caches agree to round-off, not bitwise (XLA:CPU's matmul kernels depend on the batch's shape), and a training
  of ten steps would carry that round-off into its losses; each stage is compared on the same inputs."""
  from autosam_jax.cli import main

  flags = a["flags"]
  assert main(["precompute", "--data", a["acdc"], "--tfds-dir", a["tfds"], "--weights", a["weights"], "--out",
               a["cache"], "--dtype", "fp32", "--batch-size", "4", "--shard-size", "16", "--views", "1", "--splits",
               a["splits"], *flags]) == 0
  import jax
  assert (jax.process_count(), jax.device_count()) == (a["processes"], a["devices"]), jax.devices()
  train = ["train", "--config", a["config"], "--cache", a["train_cache"], "--weights", a["weights"], "--splits",
           a["splits"], "--tr-size", "1", "--out", a["run"], *[f"--set={s}" for s in a["sets"]], *flags]
  if a["stop_at"]:
    from flax import nnx
    from autosam_jax.data.splits import load_splits
    from autosam_jax.models.loading import load_sam
    from autosam_jax.train.runs import load_config, run_inputs
    from autosam_jax.train.loop import build_model, train as train_loop
    config = load_config(Path(a["config"]), a["sets"])
    split = load_splits(Path(a["splits"]))[0]
    head = lambda config: build_model(config, load_sam(a["weights"]), rngs=nnx.Rngs(config.seed))
    stopped = train_loop(config, a["train_cache"], head, a["run"], split.labeled(1), list(split.val), progress=False,
                         stop_after_steps=a["stop_at"],
                         inputs=run_inputs(config, Path(a["splits"]), split, 1, Path(a["weights"])))
    assert stopped == {"stopped_at_step": a["stop_at"]}, stopped
    steps = sorted(int(p.name) for p in Path(a["run"], "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < a["stop_at"], steps
    started = Path(a["run"], "config.json").stat()
  assert main(train) == 0
  if a["stop_at"]:  # resumed, not restarted: a fresh start rewrites config.json
    assert Path(a["run"], "config.json").stat().st_ino == started.st_ino
  assert main(["evaluate", "--model", a["eval_model"], "--weights", a["weights"], "--cache", a["eval_cache"], "--data",
               a["acdc"], "--tfds-dir", a["tfds"], "--splits", a["splits"], "--out", a["eval"], *flags]) == 0
  if a.get("lora"):  # the encoder in the loop: an input cache, LoRA factors and the AutoSAM head
    inputs = str(Path(a["cache"]).with_name("inputs"))
    assert main(["precompute", "--data", a["acdc"], "--tfds-dir", a["tfds"], "--weights", a["weights"], "--out",
                 inputs, "--dtype", "fp32", "--store", "inputs", "--shard-size", "64", *flags]) == 0
    assert main(["train", "--config", a["lora"], "--cache", inputs, "--weights", a["weights"], "--splits",
                 a["splits"], "--tr-size", "1", "--out", str(Path(a["run"]).with_name("lora")),
                 *[f"--set={s}" for s in LORA_SETS], *flags]) == 0
  if a.get("semi"):  # a split with a second, unlabeled training patient; its cache has strong views
    semi = a["semi"]
    if semi["precompute"]:
      assert main(["precompute", "--data", a["acdc"], "--tfds-dir", a["tfds"], "--weights", a["weights"], "--out",
                   semi["cache"], "--dtype", "fp32", "--batch-size", "4", "--shard-size", "64", "--strong-views", "1",
                   "--splits", semi["splits"], *flags]) == 0
    assert main(["train", "--config", a["config"], "--cache", semi["cache"], "--weights", a["weights"], "--splits",
                 semi["splits"], "--tr-size", "1", "--out", str(Path(a["run"]).with_name("semi")),
                 *[f"--set={s}" for s in SEMI_SETS], *flags]) == 0
  print("driver done", jax.process_index())


DRIVER = f"""
import json, sys
sys.path.insert(0, {str(REPO_ROOT)!r})
from tests.test_distributed import pipeline
pipeline(json.loads(sys.argv[1]))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(arguments: list[dict], devices: int, extra_env: list[dict], jax_cache: Path) -> list[str]:
  """Runs one driver per argument dict at once; their outputs. A run past TIMEOUT_S (a hang) fails the test."""
  processes = []
  for args, env in zip(arguments, extra_env):
    # The compilation cache spares the resumed training its recompilation.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags,
           "JAX_COMPILATION_CACHE_DIR": str(jax_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **env}
    processes.append(subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  deadline, outputs = time.time() + TIMEOUT_S, []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=max(1, deadline - time.time()))[0])
  except subprocess.TimeoutExpired:
    for process in processes:
      process.kill()
    tails = [(p.communicate()[0] or "")[-3000:] for p in processes]
    pytest.fail(f"a run did not finish in {TIMEOUT_S}s (hang?); output tails: {tails}")
  assert [p.returncode for p in processes] == [0] * len(processes), [o[-4000:] for o in outputs]
  return outputs


def _rows(run_dir: Path, kind: str) -> list[dict]:
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return [r for r in rows if r["kind"] == kind]


def _params(model_dir: Path, weights: str) -> list[np.ndarray]:
  """A model saved from 4 devices, loaded on this process's one device."""
  import jax
  from flax import nnx

  from autosam_jax.models.loading import load_sam
  from autosam_jax.train.loop import load_head

  head, _ = load_head(model_dir, load_sam(weights))
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(head, nnx.Param))]


def _cache(cache_dir: Path) -> list[dict]:
  from autosam_jax.features.cache import FeatureCache

  cache = FeatureCache(cache_dir)
  return [cache[i] for i in range(len(cache))]


@pytest.fixture(scope="module")
def runs(tiny_weights, tmp_path_factory):
  from autosam_jax.data.splits import Split
  from autosam_jax.data.synthetic import write_synthetic_acdc

  from flax import nnx

  from autosam_jax.models.loading import load_sam
  from autosam_jax.train.runs import load_config
  from autosam_jax.train.loop import build_model, save_model

  root = tmp_path_factory.mktemp("distributed")
  write_synthetic_acdc(root / "acdc", 4, seed=11)
  Split(name="s", seed=0, train=("patient001",), val=("patient002",),
        test=("patient003", "patient004")).to_json(root / "split.json")
  Split(name="s", seed=0, train=("patient001", "patient003"), val=("patient002",),
        test=("patient004",)).to_json(root / "semi_split.json")
  semi = {"splits": str(root / "semi_split.json"), "cache": str(root / "one" / "semi_cache")}
  common = {"acdc": str(root / "acdc"), "tfds": str(root / "tfds"), "weights": str(tiny_weights),
            "splits": str(root / "split.json"), "config": str(REPO_ROOT / "experiments/configs/linear_faithful.py"),
            "sets": [f"epochs={EPOCHS}", f"batch_size={BATCH_SIZE}", "learning_rate=0.005",
                     f"checkpoint_every_steps={CHECKPOINT_EVERY}", "plateau_start_epoch=1"],
            "eval_model": str(root / "eval_model"), "eval_cache": str(root / "one" / "cache"),
            "train_cache": str(root / "one" / "cache")}
  # Both runs evaluate one untrained head, whose predictions hold every class (the briefly trained ones are empty).
  from autosam_jax.data.labels import ACDC_TABLE
  from autosam_jax.train.loop import model_record

  config = dataclasses.replace(load_config(Path(common["config"]), common["sets"]), num_classes=4)
  _, params, frozen = nnx.split(build_model(config, load_sam(tiny_weights), rngs=nnx.Rngs(2)), nnx.Param, ...)
  save_model(root / "eval_model", params, frozen, config,
             record=model_record(ACDC_TABLE, {"dtype": "float32"}))  # the phantoms' classes, fp32 cache
  one = {**common, "flags": [], "processes": 1, "devices": 4, "stop_at": 0,
         "lora": str(REPO_ROOT / "experiments/configs/linear_faithful.py"), "semi": {**semi, "precompute": True},
         **{k: str(root / "one" / k) for k in ("cache", "run", "eval")}}
  single_output = _launch([one], 4, [{}], root / "jax_cache")
  # the same pipeline on this process's one device (its programs are those the other test files compile)
  pipeline({**one, "devices": 1, **{k: str(root / "single" / k) for k in ("cache", "run", "eval")},
            "semi": {**semi, "precompute": False}})  # trains on the 4-device run's cache, as the others
  port = _free_port()
  two = []
  for i in range(2):
    paths = {k: str(root / "two" / k) for k in ("cache", "run", "eval")}
    # Process 0 takes the flags, process 1 JAX's environment variables.
    flags = ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", "0"] if i == 0 else []
    two.append({**common, **paths, "flags": flags, "processes": 2, "devices": 4, "stop_at": STOP_AT})
  env = [{}, {"JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}]
  outputs = _launch(two, 2, env, root / "jax_cache")
  return {"single": root / "single", "one": root / "one", "two": root / "two",
          "outputs": [single_output[0], *outputs], "weights": tiny_weights}


def test_one_device_four_devices_and_two_processes_write_the_same_cache(runs):
  assert all("on 2 device(s) x 2 process(es)" in o for o in runs["outputs"][1:]), runs["outputs"]
  assert "on 4 device(s) x 1 process(es)" in runs["outputs"][0]
  expected = _cache(runs["single"] / "cache")
  assert {item["view"] for item in expected} == {0, 1}  # the augmented views too
  for other in ("one", "two"):
    got = _cache(runs[other] / "cache")
    assert len(got) == len(expected) > 0
    for a, b in zip(expected, got):
      assert (a["case_id"], a["slice_index"], a["view"]) == (b["case_id"], b["slice_index"], b["view"])
      np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5, rtol=0, err_msg=other)
      np.testing.assert_array_equal(a["target"], b["target"], err_msg=other)
      np.testing.assert_array_equal(a["valid"], b["valid"], err_msg=other)


def test_two_processes_and_one_device_train_as_one_process_with_four_devices(runs):
  single, one, two = runs["single"] / "run", runs["one"] / "run", runs["two"] / "run"
  steps_one, steps_two, steps_single = _rows(one, "step"), _rows(two, "step"), _rows(single, "step")
  assert STOP_AT < len(steps_one) // EPOCHS, "the stop must fall inside the first epoch, after a checkpoint"
  assert ([r["step"] for r in steps_two] == [r["step"] for r in steps_one] == [r["step"] for r in steps_single]
          == list(range(1, len(steps_one) + 1)))
  np.testing.assert_allclose([r["loss"] for r in steps_two], [r["loss"] for r in steps_one], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([r["loss"] for r in steps_single], [r["loss"] for r in steps_one], rtol=1e-4, atol=1e-5)
  epochs_one, epochs_two = _rows(one, "epoch"), _rows(two, "epoch")
  assert len(epochs_one) == len(epochs_two) == EPOCHS
  for a, b in zip(epochs_one, epochs_two):
    assert a.keys() == b.keys() and "val_dice" in a and (a["step"], a["epoch"]) == (b["step"], b["epoch"])
    numbers = [k for k in a if k != "kind"]
    np.testing.assert_allclose([b[k] for k in numbers], [a[k] for k in numbers], rtol=1e-5, atol=1e-6)
  expected = _params(one / "final_model", runs["weights"])
  for other in (two, single):
    got = _params(other / "final_model", runs["weights"])
    assert len(expected) == len(got) > 0
    for a, b in zip(expected, got):  # round-off of the reduction order reaches ~2e-6; a wrong batch moves ~lr = 5e-3
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=str(other))
  assert (two / "curves.png").is_file() and (two / "config.json").is_file()
  assert not list(runs["two"].glob("run/.*partial*"))
  # The trained model prints once (process 0), the resumed run's summary included.
  assert sum("trained linear (faithful)" in o for o in runs["outputs"][1:]) == 1


def test_a_lora_run_on_four_devices_trains_as_on_one(runs):
  """Batches of 3 on 4 devices (a zero-weight row on one of them) against 1 device: the same losses and factors."""
  from autosam_jax import load_sam
  from autosam_jax.models.trained import read_train_config, restore_head

  one, single = runs["one"] / "lora", runs["single"] / "lora"
  steps_one, steps_single = _rows(one, "step"), _rows(single, "step")
  assert len(steps_one) == len(steps_single) > 1
  np.testing.assert_allclose([r["loss"] for r in steps_single], [r["loss"] for r in steps_one], rtol=1e-4, atol=1e-5)
  config = read_train_config(one / "final_model")
  assert config.lora_rank == 2 and config.batch_size == 3
  models = [restore_head(run / "final_model", config, load_sam(runs["weights"])) for run in (one, single)]
  from autosam_jax.models.lora import lora_layers
  factors = [[np.asarray(layer.b_q[...]) for layer in lora_layers(m.encoder)] for m in models]
  assert factors[0] and all(np.abs(b).max() > 0 for b in factors[0])
  for a, b in zip(*factors):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_a_semi_supervised_run_on_four_devices_trains_as_on_one(runs):
  """Batches of 3 labeled slices and 6 unlabeled ones on 4 devices (zero-weight rows on one of them) against 1
  device: the same losses, teacher's pseudo-labels and CutMix boxes included, and the same head."""
  one, single = runs["one"] / "semi", runs["single"] / "semi"
  steps_one, steps_single = _rows(one, "step"), _rows(single, "step")
  assert len(steps_one) == len(steps_single) > 1
  np.testing.assert_allclose([r["loss"] for r in steps_single], [r["loss"] for r in steps_one], rtol=1e-4, atol=1e-5)
  record = json.loads((one / "run.json").read_text())["identity"]
  assert record["unlabeled_patients"] == ["patient003"] and record["config"]["semi"] is True
  for a, b in zip(_params(one / "final_model", runs["weights"]), _params(single / "final_model", runs["weights"]),
                  strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_two_processes_and_one_device_evaluate_as_one_process_with_four_devices(runs):
  import nibabel as nib

  one = runs["one"] / "eval"
  report = json.loads((one / "metrics.json").read_text())
  assert list(report["patients"]) == ["patient003", "patient004"]  # one for each process
  assert all(report["summary"]["official"]["classes"][c]["hd95"]["value"] > 0 for c in ("RV", "MYO", "LV"))
  files = sorted(p.name for p in (one / "predictions").iterdir())
  assert files
  for other in (runs["two"] / "eval", runs["single"] / "eval"):
    assert json.loads((other / "metrics.json").read_text()) == report
    assert (other / "metrics.md").read_text() == (one / "metrics.md").read_text()
    assert sorted(p.name for p in (other / "predictions").iterdir()) == files
    for name in files:
      np.testing.assert_array_equal(np.asarray(nib.load(other / "predictions" / name).dataobj),
                                    np.asarray(nib.load(one / "predictions" / name).dataobj))
