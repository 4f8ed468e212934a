"""SimCLR pretraining: NT-Xent and the schedule against PyTorch, a short run, loading the encoder into a UNet,
resumption after an interruption, the run folder's record of its inputs and lock, and the command line."""

import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest

from autosam_jax.data.errors import DataError
from autosam_jax.train.simclr import SimclrConfig
from tests.conftest import assert_refused_while_in_use, saved_learning_rate

# A narrow UNet (the official width is 64) and one patient (14 slices: 3 full batches of 4 and one padded with two
# empty rows), so two epochs on CPU stay fast.
CONFIG = SimclrConfig(epochs=2, batch_size=4, unet_base_channels=8)
PATIENTS = ["patient001"]
EXPERIMENT_CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "simclr_pretrain.py"


def official_nt_xent(zis, zjs, temperature):
  """`loss_functions/nt_xent.py:NTXentLoss` (cosine similarity) after `SimCLR._step`'s F.normalize, transcribed."""
  import torch
  import torch.nn.functional as F

  zis, zjs = F.normalize(zis, dim=1), F.normalize(zjs, dim=1)
  representations = torch.cat([zjs, zis], dim=0)
  similarity = torch.nn.CosineSimilarity(dim=-1)(representations.unsqueeze(1), representations.unsqueeze(0))
  batch_size = zis.shape[0]
  eye = np.eye(2 * batch_size) + np.eye(2 * batch_size, k=-batch_size) + np.eye(2 * batch_size, k=batch_size)
  mask = torch.from_numpy(1 - eye).type(torch.bool)
  positives = torch.cat([torch.diag(similarity, batch_size), torch.diag(similarity, -batch_size)])
  negatives = similarity[mask].view(2 * batch_size, -1)
  logits = torch.cat((positives.view(2 * batch_size, 1), negatives), dim=1) / temperature
  labels = torch.zeros(2 * batch_size).long()
  return torch.nn.CrossEntropyLoss(reduction="sum")(logits, labels) / (2 * batch_size)


@pytest.mark.parametrize("n, dim, temperature", [(8, 256, 0.5), (3, 7, 0.1)])
def test_nt_xent_matches_the_official_loss(n, dim, temperature):
  import jax
  import torch

  from autosam_jax.train.simclr import nt_xent_loss

  loss = jax.jit(nt_xent_loss, static_argnums=2)  # one compilation instead of one per operation
  rng = np.random.default_rng(n)
  z1, z2 = rng.normal(size=(2, n, dim)).astype(np.float32) * rng.uniform(0.1, 10, size=(2, n, 1)).astype(np.float32)
  expected = float(official_nt_xent(torch.from_numpy(z1), torch.from_numpy(z2), temperature))
  assert float(loss(z1, z2, temperature)) == pytest.approx(expected, abs=1e-5)
  # Swapping the views changes nothing: every sample is an anchor once per view.
  assert float(loss(z2, z1, temperature)) == pytest.approx(expected, abs=1e-5)


def test_padding_rows_change_neither_the_loss_nor_the_gradient():
  import jax
  import jax.numpy as jnp

  from autosam_jax.train.simclr import nt_xent_loss as eager_loss

  nt_xent_loss = jax.jit(eager_loss, static_argnums=2)
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(2, 5, 32)).astype(np.float32)
  padded = lambda z, fill: np.concatenate([z, fill]).astype(np.float32)
  weight = np.asarray([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  loss = float(nt_xent_loss(z1, z2, 0.5))
  for fill in (np.zeros((3, 32)), rng.normal(size=(3, 32)) * 100):  # zero rows (padded images) or anything at all
    assert float(nt_xent_loss(padded(z1, fill), padded(z2, fill), 0.5, weight)) == pytest.approx(loss, abs=1e-6)
  # Without the mask the same rows would count, so the mask is what keeps the loss.
  assert abs(float(nt_xent_loss(padded(z1, fill), padded(z2, fill), 0.5)) - loss) > 1e-3

  grad = jax.jit(jax.grad(lambda a, b, w: eager_loss(a, b, 0.5, w), argnums=(0, 1)))
  g1, g2 = grad(jnp.asarray(padded(z1, np.zeros((3, 32)))), jnp.asarray(padded(z2, np.zeros((3, 32)))), weight)
  r1, r2 = grad(z1, z2, np.ones(5, np.float32))
  assert np.all(np.isfinite(g1)) and np.all(np.isfinite(g2))
  np.testing.assert_allclose(g1[:5], r1, atol=1e-6)
  np.testing.assert_allclose(g2[:5], r2, atol=1e-6)
  assert not np.any(g1[5:]) and not np.any(g2[5:])


# The scheduler is stepped without optimizer steps: only its learning rates are wanted.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_learning_rate_follows_pytorch_cosine_schedules():
  import torch

  from autosam_jax.train.simclr import learning_rate_at

  steps_per_epoch, epochs = 3, 22  # more epochs past the start than T_max: the official cosine rises again
  faithful = SimclrConfig(epochs=epochs, learning_rate=3e-4, schedule="faithful")
  optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch, eta_min=0)
  for epoch in range(epochs):  # as experiments/simclr_experiment.py: stepped after each epoch from epoch 10
    for i in range(steps_per_epoch):
      step = epoch * steps_per_epoch + i
      assert learning_rate_at(faithful, epoch, step, steps_per_epoch) == pytest.approx(
          optimizer.param_groups[0]["lr"], rel=1e-6, abs=1e-12)
    if epoch >= 10:
      scheduler.step()

  improved = SimclrConfig(epochs=4, learning_rate=1e-3, schedule="improved")
  optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4 * steps_per_epoch, eta_min=0)
  for step in range(4 * steps_per_epoch):
    assert learning_rate_at(improved, step // steps_per_epoch, step, steps_per_epoch) == pytest.approx(
        optimizer.param_groups[0]["lr"], rel=1e-6, abs=1e-12)
    scheduler.step()


def test_config_round_trip_and_rejections():
  assert SimclrConfig.from_dict(CONFIG.to_dict()) == CONFIG
  # The experiment config spells out the official options, which are also the defaults.
  assert SimclrConfig.from_dict(runpy.run_path(str(EXPERIMENT_CONFIG))["get_config"]()) == SimclrConfig()
  assert SimclrConfig.from_dict({"learning_rate": 1}).learning_rate == 1.0
  for bad, word in [({"epoch": 3}, "unknown"), ({"epochs": "3"}, "epochs must be int"),
                    ({"epochs": True}, "epochs must be int"), ({"schedule": "step"}, "schedule"),
                    ({"augment": "none"}, "augment")]:
    with pytest.raises(DataError, match=word):
      SimclrConfig.from_dict(bad, source="cfg.py")


def test_config_refusals_name_the_source_and_the_field_in_one_line():
  for values, message in [({"augment": "none"}, "augment must be one of faithful, improved, got 'none'"),
                          ({"schedule": "step"}, "schedule must be one of faithful, improved, got 'step'"),
                          ({"batch_size": True}, "batch_size must be int, got bool True"),
                          ({"temperature": 0}, "temperature must be a finite number, positive, got 0"),
                          ({"seed": 2 ** 63}, "seed must be an integer, below 2**63, got 9223372036854775808")]:
    with pytest.raises(DataError) as refused:
      SimclrConfig.from_dict(values, source="cfg.py")
    assert str(refused.value) == f"cfg.py: {message}"
  with pytest.raises(DataError, match=r"^SimCLR config: epochs must be int, got bool True$"):
    SimclrConfig(epochs=True)
  assert type(SimclrConfig(weight_decay=0).weight_decay) is float


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory):
  from autosam_jax.data.synthetic import write_synthetic_acdc
  from autosam_jax.features.images import write_image_cache

  root = tmp_path_factory.mktemp("simclr_data")
  write_synthetic_acdc(root / "acdc", 3, seed=11)
  write_image_cache(root / "acdc", root / "tfds", root / "cache", shard_size=16)
  return root / "cache"


@pytest.fixture(scope="module")
def pretrained(image_cache, tmp_path_factory):
  """One uninterrupted two-epoch run (the reference the resumption test compares against)."""
  from autosam_jax.train.simclr import pretrain_simclr

  out = tmp_path_factory.mktemp("simclr_run")
  result = pretrain_simclr(CONFIG, image_cache, out, PATIENTS, progress=False)
  return out, result


def _rows(run_dir):
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _read_encoder(encoder_dir):
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore((encoder_dir / "params").absolute())


def _leaves(tree):
  import jax

  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_pretraining_writes_a_finite_run_and_the_encoder(pretrained):
  from flax import nnx

  from autosam_jax.train.simclr import initial_params

  out, result = pretrained
  rows = _rows(out)
  steps, epochs = [r for r in rows if r["kind"] == "step"], [r for r in rows if r["kind"] == "epoch"]
  assert [r["step"] for r in steps] == list(range(1, 9)) and [r["epoch"] for r in epochs] == [0, 1]
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
  assert result["steps"] == 8 and result["last"] == epochs[-1]
  assert (out / "curves.png").stat().st_size > 0
  encoder_dir = out / "encoder"
  assert result["encoder"] == str(encoder_dir)
  assert SimclrConfig.from_dict(json.loads((encoder_dir / "simclr_config.json").read_text())) == CONFIG
  assert not list(out.glob(".encoder.partial-*"))
  saved = _leaves(_read_encoder(encoder_dir))
  start = _leaves(nnx.to_pure_dict(initial_params(CONFIG)["encoder"]))
  assert saved.keys() == start.keys() and all(saved[k].shape == start[k].shape for k in saved)
  assert any(not np.array_equal(saved[k], start[k]) for k in saved), "the encoder did not train"


def test_load_pretrained_encoder_copies_exactly_the_encoder(pretrained):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.models.unet import UNet
  from autosam_jax.train.simclr import load_pretrained_encoder

  out, _ = pretrained
  # Any random values will do for the UNet's own start, and numpy draws them much faster than its init on CPU.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet(4, base_channels=8, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(3)
  unet = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype)), state))
  before = _leaves(nnx.to_pure_dict(nnx.state(unet, nnx.Param)))
  assert load_pretrained_encoder(unet, out / "encoder") is unet
  after = _leaves(nnx.to_pure_dict(nnx.state(unet, nnx.Param)))
  saved = _leaves(_read_encoder(out / "encoder"))
  encoder_keys = {k for k in after if k.startswith("['encoder']")}
  assert {k.removeprefix("['encoder']") for k in encoder_keys} == saved.keys()
  for key in after:
    if key in encoder_keys:
      np.testing.assert_array_equal(after[key], saved[key.removeprefix("['encoder']")])
      assert not np.array_equal(after[key], before[key])
    else:
      np.testing.assert_array_equal(after[key], before[key])  # decoder and head stay random

  wider = nnx.eval_shape(lambda: UNet(4, base_channels=16, rngs=nnx.Rngs(0)))  # refused on shapes alone
  with pytest.raises(DataError, match="unet_base_channels 8") as err:
    load_pretrained_encoder(wider, out / "encoder")
  assert "\n" not in str(err.value)
  with pytest.raises(DataError, match="not a SimCLR encoder"):
    load_pretrained_encoder(wider, out / "nowhere")


def _listing(folder):
  """Every file under `folder` with its size and modification time: what a refused command must leave as it was."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _checkpoint_steps(run_dir):
  return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_killed_run_resumes_to_the_same_encoder_and_losses(pretrained, image_cache, tmp_path, kill_at):
  from autosam_jax.train.simclr import learning_rate_at, pretrain_simclr

  reference, _ = pretrained
  out = tmp_path / "run"
  # Ctrl-C right after the first epoch's last step, which is right after its checkpoint: that checkpoint is kept.
  kill_at("simclr.step:4")
  with pytest.raises(KeyboardInterrupt):
    pretrain_simclr(CONFIG, image_cache, out, PATIENTS, progress=False)
  assert _checkpoint_steps(out) == [4] and not (out / "encoder").exists()
  assert [(r["kind"], r["step"]) for r in _rows(out)][-2:] == [("step", 4), ("epoch", 4)]
  # the optimizer state holds the learning rate, the next epoch's once the epoch has ended
  assert saved_learning_rate(out / "checkpoints" / "4") == np.float32(learning_rate_at(CONFIG, 1, 4, 4))
  # The rerun resumes there and is interrupted one step into the second epoch: the checkpoint is epoch 0's, and
  # step 5 was logged but not checkpointed.
  kill_at("simclr.step:1")
  with pytest.raises(KeyboardInterrupt):
    pretrain_simclr(CONFIG, image_cache, out, PATIENTS, progress=False)
  kill_at("nowhere")
  assert _checkpoint_steps(out) == [4]
  assert not (out / "encoder").exists() and [r["step"] for r in _rows(out)][-1] == 5
  result = pretrain_simclr(CONFIG, image_cache, out, PATIENTS, progress=False)
  assert result["steps"] == 8
  assert _rows(out) == _rows(reference)
  resumed, uninterrupted = _leaves(_read_encoder(out / "encoder")), _leaves(_read_encoder(reference / "encoder"))
  assert resumed.keys() == uninterrupted.keys()
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], uninterrupted[key])

  # Another configuration, other patients or another image cache: refused, naming the field, nothing changed.
  import shutil

  other_cache = Path(shutil.copytree(image_cache, tmp_path / "other_cache"))
  manifest = other_cache / "manifest.json"
  manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=2))  # the same cache, other bytes
  before = _listing(out)
  for config, cache, patients, field in (
      (SimclrConfig(epochs=3, batch_size=4, unet_base_channels=8), image_cache, PATIENTS, "config.epochs"),
      (CONFIG, image_cache, PATIENTS + ["patient002"], "patients"),
      (CONFIG, other_cache, PATIENTS, "cache.manifest_sha256 (and 1 more)")):
    expected = f"^{re.escape(str(out))}: holds a run with another {re.escape(field)}: "
    with pytest.raises(DataError, match=expected) as err:
      pretrain_simclr(config, cache, out, patients, progress=False)
    assert "\n" not in str(err.value)
    assert _listing(out) == before


def test_a_run_folder_in_use_is_refused_and_left_as_it_is(pretrained, image_cache, tmp_path, capsys):
  """A second pretrain-simclr into a run folder another process writes (a lock is per open file, so a lock this
  process holds counts as another's): one line naming the holder, exit code 2, nothing changed."""
  from autosam_jax.cli import main
  from autosam_jax.data.splits import Split

  out, _ = pretrained
  Split(name="s", seed=0, train=tuple(PATIENTS), val=(), test=("patient003",)).to_json(tmp_path / "split.json")
  argv = ["pretrain-simclr", "--cache", str(image_cache), "--splits", str(tmp_path / "split.json"), "--out", str(out),
          "--no-progress", *(f"--set={name}={getattr(CONFIG, name)!r}" for name in ("epochs", "batch_size",
                                                                                  "unet_base_channels"))]
  assert_refused_while_in_use(capsys, out, argv)
  assert main(argv) == 0  # the same command, the folder free: the finished run is recognised as this one
  assert "8 steps" in capsys.readouterr().out


def test_command_line_rejects_a_bad_option_in_one_line(tmp_path, capsys):
  from autosam_jax.data.splits import Split
  from autosam_jax.cli import main

  splits = Split(name="s", seed=0, train=("patient001",), val=("patient002",), test=("patient003",))
  splits.to_json(tmp_path / "split.json")
  common = ["pretrain-simclr", "--cache", str(tmp_path / "cache"), "--splits", str(tmp_path / "split.json"),
            "--out", str(tmp_path / "run")]

  assert main(common + ["--set", "temprature=0.1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "temprature" in err[0]
  assert not (tmp_path / "run").exists()

  # a valid config, but there is no cache: the error names it
  assert main(common + ["--config", str(EXPERIMENT_CONFIG), "--set", "epochs=2"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "manifest.json" in err[0]
