"""Head training on a feature cache: loss, learning, resumption, non-finite guard, CLI. 1 vs 4 devices and 2
processes: tests/test_distributed.py."""

import json
import os
import re

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import saved_learning_rate

from autosam_jax.train.loop import NonFiniteLossError, TrainConfig, train

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(head="linear", variant="faithful", epochs=3, batch_size=4, learning_rate=5e-3,
                     plateau_start_epoch=1, checkpoint_every_steps=0)


@pytest.fixture(scope="module")
def setup(tiny_world, tmp_path_factory):
  """The tiny world's cache with augmented views of patient001, its split; `root` holds what these tests write."""
  from autosam_jax.data.splits import Split

  root = tmp_path_factory.mktemp("train")
  return {"root": root, "weights": tiny_world.weights, "cache": tiny_world.cache_views,
          "split": Split.from_json(tiny_world.split), "split_file": tiny_world.split}


def _factory(setup, config):
  def make(config=config):
    from flax import nnx

    from autosam_jax import load_sam
    from autosam_jax.models.heads import build_head
    return build_head(config.head, config.num_classes, variant=config.variant, sam=load_sam(setup["weights"]),
                      rngs=nnx.Rngs(config.seed))
  return make


def _run(setup, out, config=CONFIG, **kwargs):
  return train(config, setup["cache"], _factory(setup, config), out, list(setup["split"].labeled(1)),
               list(setup["split"].val), progress=False, **kwargs)


def _final_params(run_dir):
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore((run_dir / "final_model" / "state").absolute())
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(restored["params"])]


def _losses(run_dir):
  return [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
          if json.loads(l)["kind"] == "step"]


@pytest.fixture(scope="module")
def uninterrupted(setup):
  out = setup["root"] / "run_full"
  return out, _run(setup, out)


def test_loss_matches_the_official_formula():
  import torch

  from autosam_jax.train.losses import segmentation_loss

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 16, 16, 4)).astype(np.float32)
  labels = rng.integers(0, 3, size=(3, 16, 16))  # class 3 absent: its Dice term is left out
  ours, _ = segmentation_loss(logits, labels, np.ones(labels.shape, np.float32))
  # The official CrossEntropyLoss + SoftDiceLoss(batch_dice=True, do_bg=False), written with torch ops (NCHW).
  x = torch.from_numpy(logits).permute(0, 3, 1, 2)
  y = torch.from_numpy(labels)
  ce = torch.nn.functional.cross_entropy(x, y)
  p = torch.softmax(x, 1)[:, 1:]
  g = torch.nn.functional.one_hot(y, 4).permute(0, 3, 1, 2).float()[:, 1:]
  per_class = 1 - (2 * (p * g).sum((0, 2, 3)) + 1) / ((p * p).sum((0, 2, 3)) + (g * g).sum((0, 2, 3)) + 1)
  reference = ce + per_class[per_class > 0].mean()
  np.testing.assert_allclose(float(ours), float(reference), rtol=1e-5)


def test_training_learns_and_writes_its_outputs(uninterrupted):
  out, result = uninterrupted
  losses = _losses(out)
  assert result["steps"] == len(losses) > 0
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  epochs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in l
            and json.loads(l)["kind"] == "epoch"]
  assert len(epochs) == CONFIG.epochs and all("val_dice" in e for e in epochs)
  # per-class entries are named by the cache's label table (ACDC's)
  assert {k for k in epochs[-1] if k.startswith("val_dice_")} == {"val_dice_rv", "val_dice_myo", "val_dice_lv"}
  assert (out / "curves.png").stat().st_size > 1000 and (out / "final_model" / "train_config.json").exists()


def test_resume_after_interruption_ends_with_the_same_params(setup, uninterrupted):
  out = setup["root"] / "run_interrupted"
  steps_per_epoch = uninterrupted[1]["steps"] // CONFIG.epochs
  stopped = _run(setup, out, stop_after_steps=steps_per_epoch + 1)  # one step into the second epoch
  assert stopped == {"stopped_at_step": steps_per_epoch + 1}
  _run(setup, out)
  for a, b in zip(_final_params(uninterrupted[0]), _final_params(out)):
    np.testing.assert_array_equal(a, b)
  assert _losses(out) == _losses(uninterrupted[0])


def test_validation_every_n_epochs_keeps_the_training_and_resumes(setup, uninterrupted, tmp_path):
  import dataclasses

  config = dataclasses.replace(CONFIG, eval_every_epochs=2)
  steps_per_epoch = uninterrupted[1]["steps"] // CONFIG.epochs
  out = tmp_path / "sparse"
  # killed in the second epoch, before its first epoch checkpoint (after epoch 1): the rerun starts from scratch
  assert _run(setup, out, config, stop_after_steps=steps_per_epoch + 1) == {"stopped_at_step": steps_per_epoch + 1}
  assert not (out / "checkpoints").exists() or not any(p.name.isdigit() for p in (out / "checkpoints").iterdir())
  _run(setup, out, config)
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  epochs = [r for r in rows if r["kind"] == "epoch"]
  assert [r["epoch"] for r in epochs] == [0, 1, 2]
  assert ["val_dice" in r for r in epochs] == [False, True, True]  # every 2nd epoch, and the last
  checkpoints = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert checkpoints[-1] == 3 * steps_per_epoch and 1 * steps_per_epoch not in checkpoints
  # validating less often changes nothing in the training itself (faithful: plateau on the training loss)
  assert _losses(out) == _losses(uninterrupted[0])
  for a, b in zip(_final_params(uninterrupted[0]), _final_params(out)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_with_the_step(setup, tmp_path):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  def poisoned(resolved):
    graphdef, params, rest = nnx.split(_factory(setup, CONFIG)(resolved), nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * jnp.nan, params), rest)

  with pytest.raises(NonFiniteLossError, match="step 1 "):
    train(CONFIG, setup["cache"], poisoned, tmp_path / "nan", list(setup["split"].labeled(1)), [], progress=False)


def test_the_learning_rate_is_in_the_optimizer_state_across_a_resume(setup, tmp_path, monkeypatch, kill_at):
  """The plateau's cut (here at every epoch end from plateau_start_epoch 1: patience -1) is the optimizer state's
  learning rate: the checkpoint after epoch 1 holds the rate of epoch 2, and the run resumed from it ends as the
  uninterrupted one, bit for bit."""
  import functools

  from autosam_jax.train import schedules

  monkeypatch.setattr(schedules, "ReduceLROnPlateau", functools.partial(schedules.ReduceLROnPlateau, patience=-1))
  reference = tmp_path / "reference"
  steps = _run(setup, reference)["steps"]
  rows = [json.loads(l) for l in (reference / "metrics.jsonl").read_text().splitlines()]
  cut = float(np.float32(CONFIG.learning_rate * 0.1))
  assert [r["lr"] for r in rows if r["kind"] == "epoch"] == [float(np.float32(CONFIG.learning_rate))] * 2 + [cut]
  out = tmp_path / "run"
  kill_at("train.epoch_saved:2")  # right after the checkpoint of epoch 1
  with pytest.raises(KeyboardInterrupt):
    _run(setup, out)
  saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())[-1]
  assert saved == 2 * steps // CONFIG.epochs
  assert saved_learning_rate(out / "checkpoints" / str(saved)) == np.float32(cut)
  kill_at("nowhere")
  _run(setup, out)
  _assert_same_run(out, reference)


def test_a_non_finite_step_is_found_at_the_next_read_and_nothing_after_it_is_checkpointed(setup, tmp_path,
                                                                                          monkeypatch, kill_at):
  """One NaN image in a chosen batch: the steps run on without the host reading them, and the next read (every
  sync_every_steps steps, or before a checkpoint) names the first non-finite step; its row, the later ones and a
  checkpoint due after it are never written, a checkpoint before it is kept."""
  import dataclasses

  from autosam_jax import faults
  from autosam_jax.train import loop

  poisoned = {}
  order, example = loop.HeadTraining.epoch_order, loop.HeadTraining.example

  def poisoned_order(self, epoch):
    result = order(self, epoch)
    if epoch == 0:
      poisoned["index"] = int(result[(poisoned["step"] - 1) * CONFIG.batch_size])  # first of that step's batch
    return result

  def poisoned_example(self, index):
    item = example(self, index)
    return {**item, "embedding": item["embedding"] * np.nan} if index == poisoned["index"] else item

  monkeypatch.setattr(loop.HeadTraining, "epoch_order", poisoned_order)
  monkeypatch.setattr(loop.HeadTraining, "example", poisoned_example)
  step_rows = lambda out: [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
                           if json.loads(l)["kind"] == "step"]
  checkpoints = lambda out: sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())

  # read every 3 steps: steps 1 to 3 are dispatched, and the read after step 3 finds step 2
  poisoned["step"] = 2
  kill_at("train.step:1000")  # counts the steps that passed their kill point
  with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step 2 \(epoch 0\)"):
    _run(setup, tmp_path / "periodic", sync_every_steps=3)
  assert faults._hits["train.step"] == 2  # step 3 ran before the read that found step 2
  assert step_rows(tmp_path / "periodic") == [1] and checkpoints(tmp_path / "periodic") == []

  # checkpoints every 2 steps, no periodic read: the one at step 2 is kept, the read at the epoch's end names step 3
  poisoned["step"] = 3
  config = dataclasses.replace(CONFIG, checkpoint_every_steps=2)
  with pytest.raises(NonFiniteLossError, match="at step 3 "):
    _run(setup, tmp_path / "checkpointed", config, sync_every_steps=1000)
  assert step_rows(tmp_path / "checkpointed") == [1, 2] and checkpoints(tmp_path / "checkpointed") == [2]


def _validation(examples, batch_size, class_names=("gray matter", "white/matter")):
  """`validate` with the real eval step on a model whose logits are its input: each example is (logits (H, W, C),
  target (H, W), valid (H, W)), the cache a list of them."""
  from flax import nnx

  from autosam_jax.train import loop

  class Logits(nnx.Module):
    def __call__(self, x):
      return x

  graphdef, params, frozen = nnx.split(Logits(), nnx.Param, ...)
  step = lambda p, f, batch: loop._compiled_eval_step()(p, f, batch, graphdef=graphdef)
  cache = [{"embedding": np.asarray(x, np.float32), "target": np.asarray(t, np.int32),
            "valid": np.asarray(v, np.float32)} for x, t, v in examples]
  return loop.validate(step, params, frozen, cache, np.arange(len(cache)), batch_size, (0, batch_size),
                       lambda batch: batch, class_names=list(class_names))


def _labels_to_logits(labels, num_classes=3):
  return np.eye(num_classes, dtype=np.float32)[labels] * 5.0


def test_validation_dice_leaves_out_classes_absent_from_targets_and_predictions():
  """Class 2 is in no target and no prediction: its Dice is 0 / 0, undefined, so it has no entry and stays out of
  the mean (it used to count as 0, halving val_dice here). Entries are named by the label table."""
  target, predicted = np.zeros((4, 4), np.int64), np.zeros((4, 4), np.int64)
  target[0, :] = 1  # |G| = 4
  predicted[0, :2], predicted[1, 0] = 1, 1  # |P| = 3, |P and G| = 2: Dice 4 / 7
  ones, background = np.ones((4, 4)), np.zeros((4, 4), np.int64)
  row = _validation([(_labels_to_logits(predicted), target, ones),
                     (_labels_to_logits(background), background, ones)], batch_size=2)
  assert set(row) == {"val_loss", "val_dice", "val_dice_gray_matter"}, row
  assert row["val_dice"] == pytest.approx(4 / 7) and row["val_dice_gray_matter"] == pytest.approx(4 / 7)
  # no class anywhere: no Dice at all, the loss still
  row = _validation([(_labels_to_logits(background), background, ones)] * 2, batch_size=2)
  assert set(row) == {"val_loss"} and np.isfinite(row["val_loss"])


def test_validation_loss_is_the_mean_over_real_pixels_not_over_batches():
  """Three examples in batches of 2: the last batch holds one example and a zero-weight row, and that example has
  only half its pixels weighted (the improved mode's padded border). Each batch's loss is a mean over its weighted
  pixels, so the validation loss weighs the batches by them (32 and 8 pixels), not 1 : 1 as a mean of the batch
  means did."""
  from autosam_jax.train.losses import segmentation_loss

  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 4, 4, 3)).astype(np.float32) * 3
  targets = rng.integers(0, 3, size=(3, 4, 4))
  valid = np.ones((3, 4, 4), np.float32)
  valid[2, :, 2:] = 0
  row = _validation(list(zip(logits, targets, valid)), batch_size=2)
  first = float(segmentation_loss(logits[:2], targets[:2], valid[:2])[0])
  last = float(segmentation_loss(logits[2:], targets[2:], valid[2:])[0])
  assert row["val_loss"] == pytest.approx((32 * first + 8 * last) / 40, rel=1e-5)
  assert abs((first + last) / 2 - row["val_loss"]) > 0.05  # what the mean of batch means gave
  # the keys of odd class names: ASCII, lower case, one "_" per run of other characters, distinct
  from autosam_jax.train.loop import class_keys
  assert class_keys(["Gray  matter", "Körper (L)", "gray-matter", "???"]) == [
      "gray_matter", "korper_l", "class3", "class4"]


def test_a_config_of_another_protocol_than_the_cache_is_warned_of(setup, tmp_path, capsys):
  """The improved variant on a faithful cache: one warning line naming both (evaluate and predict refuse the
  model with that cache); the run is not refused (here it stops when the head is built)."""
  import dataclasses

  class Built(Exception):
    pass

  def stop(config):
    raise Built

  capsys.readouterr()
  with pytest.raises(Built):
    train(dataclasses.replace(CONFIG, variant="improved"), setup["cache"], stop, tmp_path / "run",
          list(setup["split"].labeled(1)), list(setup["split"].val), progress=False)
  warnings = capsys.readouterr().err.strip().splitlines()
  assert len(warnings) == 1 and warnings[0].startswith(f"warning: {setup['cache']}: ") and \
      "under the faithful protocol but the config trains the improved variant" in warnings[0], warnings
  with pytest.raises(Built):
    train(CONFIG, setup["cache"], stop, tmp_path / "run", list(setup["split"].labeled(1)), [], progress=False)
  assert capsys.readouterr().err == ""


def test_a_head_needing_sam_weights_is_refused_without_them_in_plain_words(tmp_path):
  from autosam_jax.data.errors import DataError
  from autosam_jax.data.splits import Split
  from autosam_jax.train.runs import train_split

  Split(name="s", seed=0, train=("p1",), val=("p2",), test=("p3",)).to_json(tmp_path / "split.json")
  with pytest.raises(DataError, match=r"^--weights is needed to initialise an autosam head from SAM$"):
    train_split(TrainConfig(head="autosam"), tmp_path / "cache", None, tmp_path / "split.json", None, 1,
                tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_typed_config_refusals_are_one_line_naming_the_source_and_the_field():
  import dataclasses

  from autosam_jax.data.errors import DataError
  from autosam_jax.typed_config import TypedConfig, option

  @dataclasses.dataclass(frozen=True)
  class Toy(TypedConfig):
    OPTIONS = "toy"
    count: int = option(1, at_least=1)
    rate: float = option(0.5, above=0, finite=True)
    mode: str = option("a", choices=("a", "b"))
    sizes: tuple[int, ...] = option((1,), at_least=0)
    label: str | None = None
    flag: bool = False

  toy = Toy.from_dict({"count": 2, "rate": 1, "sizes": [2, 3], "label": None}, source="toy.py")
  assert toy == Toy(count=2, rate=1.0, sizes=(2, 3)) and type(toy.rate) is float and Toy.from_dict(toy.to_dict()) == toy
  for values, message in [
      ({"cont": 2}, "unknown toy option(s) ['cont']; known: ['count', 'flag', 'label', 'mode', 'rate', 'sizes']"),
      ({"count": True}, "count must be int, got bool True"),  # bool is not an int
      ({"flag": 1}, "flag must be bool, got int 1"),
      ({"count": 0}, "count must be a positive integer, got 0"),
      ({"rate": -1}, "rate must be a finite number, positive, got -1"),
      ({"rate": float("inf")}, "rate must be a finite number, got inf"),
      ({"mode": "c"}, "mode must be one of a, b, got 'c'"),
      ({"sizes": [1, -1]}, "sizes: every item must be an integer, 0 or more, got [1, -1]"),
      ({"sizes": 3}, "sizes must be a list of int, got int 3"),
      ({"label": 3}, "label must be str or None, got int 3")]:
    with pytest.raises(DataError) as refused:
      Toy.from_dict(values, source="toy.py")
    assert str(refused.value) == f"toy.py: {message}"
  # constructed directly, or replaced: the same rules, named by the options' kind
  with pytest.raises(DataError, match=r"^toy config: count must be a positive integer, got 0$"):
    Toy(count=0)
  with pytest.raises(DataError, match=r"^toy config: mode must be one of a, b, got 'c'$"):
    dataclasses.replace(toy, mode="c")

  for values, message in [({"scheduler": "step"}, "scheduler must be one of plateau_train_loss, plateau_val_dice, "
                                                  "got 'step'"),
                          ({"epochs": True}, "epochs must be int, got bool True"),
                          ({"seed": -1}, "seed must be an integer, 0 or more, got -1"),
                          ({"augment": "strong"}, "augment must be one of none, faithful, improved, got 'strong'")]:
    with pytest.raises(DataError) as refused:
      TrainConfig.from_dict(values, source="cfg.py")
    assert str(refused.value) == f"cfg.py: {message}"
  with pytest.raises(DataError, match=r"^training config: epochs must be int, got str '3'$"):
    TrainConfig(epochs="3")


def test_train_command(setup, tmp_path, capsys):
  from autosam_jax.cli import main

  common = ["train", "--config", str(REPO_ROOT / "experiments/configs/linear_faithful.py"),
            "--cache", str(setup["cache"]),
            "--weights", str(setup["weights"]), "--splits", str(setup["split_file"]), "--tr-size", "1"]
  assert main([*common, "--out", str(tmp_path / "run"), "--set", "epochs=1"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == "fold s: training on 1 patient(s) (patient001); validating on 1 patient(s) (patient002)"
  assert lines[-1].startswith("trained linear (faithful)"), lines
  # the last epoch's entries: classes by name, numbers rounded (metrics.jsonl keeps them whole)
  last = lines[-1].split("last epoch 0 (step ")[1]
  assert "val_dice_rv " in last and "val_dice_class" not in last and not re.search(r"\d\.\d{5,}", last), last
  row = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
  assert f"val_loss {row['val_loss']:.4f}," in last and len(repr(row["val_loss"])) > 8
  assert (tmp_path / "run" / "final_model" / "train_config.json").exists()
  assert main([*common, "--out", str(tmp_path / "bad"), "--set", "epochs='many'"]) == 2
  assert "epochs must be int" in capsys.readouterr().err
  assert main([*common, "--out", str(tmp_path / "bad2"), "--set", "learning_rat=0.1"]) == 2
  assert "unknown training option" in capsys.readouterr().err
  assert main([*common[:-1], "99", "--out", str(tmp_path / "bad3")]) == 2
  assert "tr_size 99 is larger than the training set" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Reliability: interruptions at chosen points, damaged checkpoints, run identity, one process per run folder


def _assert_same_run(out, reference):
  assert _losses(out) == _losses(reference)
  for a, b in zip(_final_params(reference), _final_params(out), strict=True):
    np.testing.assert_array_equal(a, b)


def test_interrupted_right_after_a_checkpoint_on_an_epochs_last_step_resumes(setup, uninterrupted, tmp_path,
                                                                              kill_at):
  """checkpoint_every_steps equal to the steps of an epoch: the checkpoint due on the epoch's last step is the
  epoch-end one (a mid-epoch one there left a run that could never finish); interrupted just after it, the rerun
  ends as the uninterrupted run."""
  import dataclasses

  steps_per_epoch = uninterrupted[1]["steps"] // CONFIG.epochs
  config = dataclasses.replace(CONFIG, checkpoint_every_steps=steps_per_epoch)
  out = tmp_path / "run"
  kill_at("train.epoch_saved:1")
  with pytest.raises(KeyboardInterrupt):
    _run(setup, out, config)
  steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [steps_per_epoch] and not (out / "final_model").exists()
  _run(setup, out, config)
  _assert_same_run(out, uninterrupted[0])


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(setup, uninterrupted, tmp_path, capsys):
  import dataclasses

  config = dataclasses.replace(CONFIG, checkpoint_every_steps=1)
  out = tmp_path / "run"
  assert _run(setup, out, config, stop_after_steps=3) == {"stopped_at_step": 3}
  newest = out / "checkpoints" / "3"
  for path in (p for p in newest.rglob("*") if p.is_file() and p.stat().st_size > 100):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # truncated, as by a full disk or a bad copy
  capsys.readouterr()
  _run(setup, out, config)
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
  assert len(warnings) == 1 and str(newest) in warnings[0] and "damaged checkpoint" in warnings[0], warnings
  _assert_same_run(out, uninterrupted[0])
  # none readable: one line naming the folder
  broken = tmp_path / "broken"
  assert _run(setup, broken, config, stop_after_steps=2) == {"stopped_at_step": 2}
  for path in (p for p in (broken / "checkpoints").rglob("*") if p.is_file() and p.stat().st_size > 100):
    path.write_bytes(b"")
  from autosam_jax.data.errors import DataError
  with pytest.raises(DataError, match="no checkpoint can be read"):
    _run(setup, broken, config)


def _command(setup, out, *extra, splits=None):
  return ["train", "--config", str(REPO_ROOT / "experiments/configs/linear_faithful.py"), "--cache",
          str(setup["cache"]), "--weights", str(setup["weights"]), "--splits",
          str(splits or setup["split_file"]), "--tr-size", "1", "--out", str(out), "--set", "epochs=2",
          "--set", "checkpoint_every_steps=2", "--no-progress", *extra]


def _listing(folder):
  return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_train_command_interrupted_by_sigterm_then_rerun(setup, tmp_path, capsys, kill_at):
  """SIGTERM at the 3rd step: one line, exit 143, the last checkpoint kept; the same command resumes and ends with
  the parameters of an uninterrupted run; a rerun with other inputs is refused naming the field."""
  from autosam_jax.cli import main
  from autosam_jax.data.splits import Split

  reference = tmp_path / "reference"
  assert main(_command(setup, reference)) == 0
  out = tmp_path / "run"
  kill_at("train.step:3", "TERM")
  assert main(_command(setup, out)) == 143
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: SIGTERM: interrupted; rerun the same command to resume (finished work is kept)"], err
  assert (out / "checkpoints" / "2").is_dir() and not (out / "final_model").exists()
  kill_at("nowhere")
  before = _listing(out)
  other_split = tmp_path / "other_split.json"
  Split(name="s", seed=1, train=("patient001",), val=("patient003",), test=("patient002",)).to_json(other_split)
  for extra, splits, field in ((["--set", "epochs=3"], None, "config.epochs"),
                               ([], other_split, "split.file_sha256"),
                               (["--set", "seed=1"], None, "config.seed")):
    assert main(_command(setup, out, *extra, splits=splits)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"holds a run with another {field}" in lines[0] and str(out) in lines[0], lines
    assert _listing(out) == before
  assert main(_command(setup, out)) == 0
  _assert_same_run(out, reference)
  import stat
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out / "run.json", out / "config.json",
                                                             out / "final_model" / "model.json")}
  umask = os.umask(0)
  os.umask(umask)
  assert set(modes.values()) == {0o666 & ~umask}, modes


def test_one_process_per_run_folder_and_no_foreign_folders(setup, tmp_path, capsys):
  from autosam_jax.cli import main
  from autosam_jax.outputs import OutputLock

  out = tmp_path / "run"
  with OutputLock(out):  # another holder (a lock is per open file, so this process counts as another)
    assert main(_command(setup, out)) == 2
  line = capsys.readouterr().err.strip()
  assert line.startswith(f"error: {out}: in use by another process (pid {os.getpid()})"), line
  assert sorted(p.name for p in out.iterdir()) == [".lock"]
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("the user's")
  assert main(_command(setup, mine)) == 2
  assert "is not empty (notes.txt)" in capsys.readouterr().err
  assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  assert main(_command(setup, a_file)) == 2
  assert "exists and is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "x"


def test_saved_model_with_flipped_bytes_is_refused(setup, uninterrupted, tmp_path):
  import shutil

  from autosam_jax import load_sam
  from autosam_jax.data.errors import DataError
  from autosam_jax.train.loop import load_head

  model = Path(shutil.copytree(uninterrupted[0] / "final_model", tmp_path / "model"))
  load_head(model, load_sam(setup["weights"]))
  target = max((p for p in (model / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x01
  target.write_bytes(bytes(data))
  with pytest.raises(DataError, match="checksum mismatch") as caught:
    load_head(model, load_sam(setup["weights"]))
  assert str(target) in str(caught.value)
