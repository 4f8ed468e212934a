"""SimCLR pretraining of the UNet encoder, the official SimCLR baseline (paper-protocol section 1d); the command is
`autosam_jax/commands/pretrain_simclr.py`.

The official `scripts/main_simclr.py` trains `GlobalConUnet`: the UNet's contracting path and center (`UNetEncoder`
here) -> global average pool -> Linear 512 -> 512 -> Linear 512 -> 256, no nonlinearity between the two, with
NT-Xent (cosine similarity, temperature 0.5) between two augmented views of every slice; Adam 3e-4 with L2 weight
decay 1e-5; batch 8, 100 epochs. Fine-tuning (`main_baseline.py --saved_model_path`) copies only the encoder
(`encoder.contr_*`, `encoder.center`) into the segmentation UNet and leaves its decoder random: `pretrain_simclr`
writes exactly that encoder to OUT/encoder/ and `load_pretrained_encoder` puts it into a `UNet`.

Where this differs from the official code, and why:
- Two independent views (the fix of paper-protocol 6.21). The official `transform_contrast` augments one `data_dict`
  twice and batchgenerators' intensity transforms work in place, so the first view also carries the second pass's
  intensity changes and the views differ mainly by the second spatial transform. Here each view is the full pipeline
  applied to the clean slice with its own key.
- The official run keeps the model with the lowest NT-Xent on its validation loader; this one has no validation pass
  and keeps the last epoch's encoder, as the supervised faithful runs keep their last epoch.
- Slices are those of the given patients (all training patients of a split), not the official `tr_size` truncation of
  `generate_contrast_dataset`.

The train state is a plain pytree {"params", "opt_state", "step"}, trained through the trainer core
(`train/core.py`). Batches come from a numpy shuffle of (seed, epoch) and the augmentation key from (seed, step), so a
checkpoint at each epoch's end is all a killed run needs to resume and end with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autosam_jax.data.augment import AugmentConfig, augment_batch
from autosam_jax.errors import DataError
from autosam_jax.models.init import torch_linear
from autosam_jax.models.unet import UNetEncoder
from autosam_jax.train.core import EpochEnd, KillPoints, LoopOptions, Method, StepProgram
from autosam_jax.typed_config import TypedConfig, option

SCHEDULES = ("faithful", "improved")
AUGMENT_MODES = ("faithful", "improved")
ENCODER_PARAMS = "params"
ENCODER_CONFIG = "simclr_config.json"


@dataclasses.dataclass(frozen=True)
class SimclrConfig(TypedConfig):
  OPTIONS = "SimCLR"

  epochs: int = option(100, at_least=1)
  # images per step; each gives two views, so NT-Xent sees 2 * batch_size samples
  batch_size: int = option(8, at_least=1)
  learning_rate: float = option(3e-4, above=0, finite=True)
  # L2 added to the gradient before Adam, as torch.optim.Adam(weight_decay=...) does
  weight_decay: float = option(1e-5, at_least=0, finite=True)
  temperature: float = option(0.5, above=0, finite=True)
  # faithful: the official CosineAnnealingLR(T_max=iterations per epoch, eta_min=0) stepped once per epoch and only
  # from the end of epoch `schedule_start_epoch` on (see `learning_rate_at`); improved: cosine to 0 over all steps.
  schedule: str = option("faithful", choices=SCHEDULES)
  schedule_start_epoch: int = option(10, at_least=0)
  augment: str = option("faithful", choices=AUGMENT_MODES)  # AugmentConfig.for_mode(...) for both views
  seed: int = option(0, at_least=0, below=2 ** 63)  # jax.random.key takes a 64-bit signed seed
  unet_base_channels: int = option(64, at_least=1)  # the official width; smaller only for quick tests
  projection_hidden: int = option(512, at_least=1)
  projection_dim: int = option(256, at_least=1)


def learning_rate_at(config: SimclrConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
  """The learning rate of the step numbered `step` (0-based), which lies in epoch `epoch`.

  faithful: the official loop builds `CosineAnnealingLR(T_max=len(train_loader))`, i.e. T_max in iterations, but
  calls `scheduler.step()` once per epoch and only at the end of epochs >= 10 (paper-protocol 6.22). So epochs 0..10 run
  at the base rate, epoch e > 10 at base * (1 + cos(pi * (e - 10) / T_max)) / 2, and the decay over the whole run is
  small (with ~170 iterations per epoch, 100 epochs end near 0.6 x base). PyTorch's cosine keeps going past T_max
  (period 2 T_max, rising again); the closed form here does the same.
  improved: base * (1 + cos(pi * step / total_steps)) / 2, updated every step.
  """
  if config.schedule == "faithful":
    t = max(0, epoch - config.schedule_start_epoch)
    return config.learning_rate * (1 + math.cos(math.pi * t / steps_per_epoch)) / 2
  total = config.epochs * steps_per_epoch
  return config.learning_rate * (1 + math.cos(math.pi * step / total)) / 2


class SimclrModel(nnx.Module):
  """`GlobalConUnet`: UNetEncoder -> global average pool -> Linear 8f -> hidden -> Linear hidden -> dim.

  The official MLP has no nonlinearity between its two Linear layers (so the projection is affine); kept as is.
  Its first layer is hard-wired to 512 inputs, i.e. the center width 8f at f = 64; here it follows f.
  """

  def __init__(self, config: SimclrConfig, in_channels: int = 3, *, rngs: nnx.Rngs):
    f = config.unet_base_channels
    self.encoder = UNetEncoder(in_channels, f, rngs=rngs)
    self.f1 = torch_linear(8 * f, config.projection_hidden, rngs=rngs)
    self.f2 = torch_linear(config.projection_hidden, config.projection_dim, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """(B, H, W, in_channels) -> projections (B, projection_dim)."""
    features = self.encoder(images).mean(axis=(1, 2))
    return self.f2(self.f1(features))


def build_model(config: SimclrConfig, *, rngs: nnx.Rngs) -> SimclrModel:
  """The SimCLR model of a config, initialised as a fresh PyTorch `GlobalConUnet` would be (in distribution)."""
  return SimclrModel(config, rngs=rngs)


def nt_xent_loss(z1, z2, temperature: float, weight=None):
  """NT-Xent of paired projections z1, z2 (N, D): mean over the 2N anchors of -log softmax of the positive.

  As the official `NTXentLoss` with cosine similarity: each of the 2N samples is an anchor whose positive is its
  paired view and whose negatives are the other 2N - 2 samples (itself excluded); logits are cosine similarities
  divided by `temperature`. `weight` (N,) marks real samples (> 0): a sample with weight 0 (a zero-padded row of the
  last batch) is neither an anchor nor a negative, so padding does not change the loss; real anchors are averaged
  with their weights (both views of a sample count).
  """
  n = z1.shape[0]
  z = jnp.concatenate([z1, z2]).astype(jnp.float32)
  # F.normalize's clamp (eps 1e-12 on the norm), written so that a zero row has a finite gradient.
  z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-24))
  logits = (z @ z.T) / temperature
  weight = jnp.ones((n,), jnp.float32) if weight is None else jnp.asarray(weight, jnp.float32)
  weight = jnp.concatenate([weight, weight])
  index = jnp.arange(2 * n)
  partner = (index + n) % (2 * n)
  positive = logits[index, partner]
  # Self and padding columns are left out of the softmax; the positive column stays (it is one of the "others").
  candidates = (index[:, None] != index[None, :]) & (weight[None, :] > 0)
  # A finite floor rather than -inf: a padding anchor's row stays finite, and where() passes no NaN gradient back.
  normaliser = jax.nn.logsumexp(jnp.where(candidates, logits, -1e30), axis=1)
  per_anchor = jnp.where(weight > 0, normaliser - positive, 0.0)
  return jnp.sum(weight * per_anchor) / jnp.maximum(jnp.sum(weight), 1e-12)


@functools.partial(jax.jit, static_argnums=(0,))
def initial_params(config: SimclrConfig) -> nnx.State:
  """The model's parameters at init, drawn in one compiled program (layer by layer eagerly, the many small random
  draws take several times longer on CPU); the same values as `build_model(config, rngs=nnx.Rngs(config.seed))`."""
  return nnx.state(build_model(config, rngs=nnx.Rngs(config.seed)), nnx.Param)


@dataclasses.dataclass(frozen=True)
class SimclrProgram(StepProgram):
  """One SimCLR step on a batch {"image" (B, H, W, C) clean slices, "weight" (B,)}: torch.optim.Adam with L2 weight
  decay (the L2 term joins the gradient before the moments), NT-Xent between two augmented views of every slice.
  The graph and config are static, so every run with the same ones (a resumption in the same process, a test)
  reuses one compiled program."""
  graphdef: nnx.GraphDef
  config: SimclrConfig

  def optimizer(self, learning_rate):
    import optax

    from autosam_jax.train.schedules import injected_optimizer

    direction = optax.chain(optax.add_decayed_weights(self.config.weight_decay), optax.scale_by_adam())
    return injected_optimizer(direction, learning_rate)

  def prepare(self, batch, step):
    # Two independent views (paper-protocol 6.21 fixed): the whole pipeline applied to the clean slice twice, each time
    # with its own key. augment_batch gives sample i of its batch the key split(key, 2n)[i], so one call on the batch
    # stacked twice does this (view 1 of slice i draws from key i, view 2 from key n + i) and compiles the pipeline
    # once. The key comes from (seed, step), so a resumed run draws the same views.
    images = batch["image"]
    key = jax.random.fold_in(jax.random.key(self.config.seed), step)
    stacked = jnp.concatenate([images, images])
    no_labels = jnp.zeros(stacked.shape[:3], jnp.int32)  # augment_batch moves labels too; these are unused
    views, _ = augment_batch(key, stacked, no_labels, AugmentConfig.for_mode(self.config.augment))
    return {"views": views, "weight": batch["weight"]}

  def loss(self, params, frozen, batch):
    # One forward pass over both views: InstanceNorm is per sample, so this equals the official two passes.
    n = batch["weight"].shape[0]
    z = nnx.merge(self.graphdef, params)(batch["views"])
    return nt_xent_loss(z[:n], z[n:], self.config.temperature, batch["weight"]), {}


def epoch_order(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
  """The cache indices of an epoch in the order they are trained on: a numpy permutation drawn from (seed, epoch),
  cut into batches by the loop (the last one padded)."""
  return np.asarray(indices)[np.random.default_rng([seed, epoch]).permutation(len(indices))]


def plot_loss_curve(metrics_file: Path, png: Path) -> None:
  """NT-Xent per step (faint) and its mean per epoch, against the epoch."""
  from autosam_jax.train.core import figure, read_rows, save_figure

  rows = read_rows(metrics_file)
  epochs = [r for r in rows if r.get("kind") == "epoch"]
  if not epochs:
    return
  steps = [r for r in rows if r.get("kind") == "step"]
  steps_per_epoch = max(1, epochs[0]["step"])
  fig, ax = figure(figsize=(6, 3.8))
  if steps:
    ax.plot([r["step"] / steps_per_epoch for r in steps], [r["loss"] for r in steps], alpha=0.3, lw=0.8,
            label="step")
  ax.plot([r["epoch"] + 1 for r in epochs], [r["train_loss"] for r in epochs], marker=".", label="epoch mean")
  ax.set_xlabel("epochs completed"), ax.set_ylabel("NT-Xent loss"), ax.legend()
  fig.tight_layout()
  save_figure(fig, png)


def save_encoder(directory: Path, encoder_params: dict[str, Any], config: SimclrConfig) -> None:
  """OUT/encoder/: the UNetEncoder's parameters (orbax, a pure dict) and the config, staged beside the target and
  renamed into place, so a reader never sees half an encoder."""
  import orbax.checkpoint as ocp

  from autosam_jax.atomic import atomic_write_json, write_dir

  def fill(staging: Path) -> None:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(staging / ENCODER_PARAMS, encoder_params)
    atomic_write_json(staging / ENCODER_CONFIG, config.to_dict())

  write_dir(directory, fill)


def check_memory(config: SimclrConfig, abstract_params, image_shape: tuple[int, ...]) -> None:
  """Refuses, before anything is allocated, a run whose model or batch cannot fit in this machine's memory.

  An estimate from the sizes alone (a lower bound: the UNet's deeper activations come on top): the parameters with
  their gradients, Adam's two moments and the update (5 copies); per image of a batch, the host batch as loaded,
  stacked and padded, its device copy and the two augmented views (8 copies of an H x W x C float32 image), and the
  first UNet level's output for both views (H x W x unet_base_channels float32 each)."""
  from autosam_jax.memory import require_memory

  param_bytes = 5 * sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract_params))
  pixels = int(np.prod(image_shape[:2]))
  batch_bytes = config.batch_size * (8 * pixels * int(np.prod(image_shape[2:])) * 4
                                     + 2 * pixels * config.unet_base_channels * 4)
  option_name = "batch_size" if batch_bytes >= param_bytes else "unet_base_channels"
  require_memory(param_bytes + batch_bytes, f"SimCLR {option_name} {getattr(config, option_name)}",
                 f"choose a smaller {option_name}")


class SimclrPretraining(Method):
  """SimCLR pretraining as the trainer core's method: the clean slices of the patients, the schedule of
  `learning_rate_at`, an epoch row of the mean and last NT-Xent, a checkpoint at every epoch's end, and at the end
  the encoder (OUT/encoder/)."""

  diverged = "SimCLR loss"
  meta_keys = ("patients",)

  def __init__(self, config: SimclrConfig, cache, indices: np.ndarray, graphdef, params, patients: list[str],
               out_dir: Path):
    self.simclr_config, self.config = config, config.to_dict()
    self.program = SimclrProgram(graphdef, config)
    self.params, self.frozen = params, None
    self.cache, self.indices, self.patients, self.out_dir = cache, indices, patients, Path(out_dir)
    self.steps_per_epoch = -(-len(indices) // config.batch_size)
    image = self.example(int(indices[0]))["image"]
    self.padding = {"image": np.zeros_like(image), "weight": np.float32(0)}

  def epoch_order(self, epoch: int) -> np.ndarray:
    return epoch_order(self.indices, self.simclr_config.seed, epoch)

  def example(self, index: int) -> dict[str, np.ndarray]:
    return {"image": np.asarray(self.cache[index]["embedding"], np.float32), "weight": np.float32(1)}

  def learning_rate(self, epoch: int, step: int) -> float:
    return learning_rate_at(self.simclr_config, epoch, step, self.steps_per_epoch)

  def end_epoch(self, end: EpochEnd) -> tuple[dict[str, Any], bool]:
    return {"kind": "epoch", "step": end.step, "epoch": end.epoch, "train_loss": float(np.mean(end.losses)),
            "last_loss": end.losses[-1], "lr": end.learning_rate}, True

  def meta(self) -> dict[str, Any]:
    return {"patients": self.patients}

  def finish(self, state, frozen, last: dict[str, Any]) -> dict[str, Any]:
    encoder_params = jax.device_get(nnx.to_pure_dict(state["params"])["encoder"])
    save_encoder(self.out_dir / "encoder", encoder_params, self.simclr_config)
    return {"slices": len(self.indices), "encoder": str(self.out_dir / "encoder")}

  def plot(self, metrics_file: Path, png: Path) -> None:
    plot_loss_curve(metrics_file, png)


def pretrain_simclr(config: SimclrConfig, cache_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    patients: list[str], *, progress: bool = True, stop_after_steps: int | None = None,
                    sync_every_steps: int | None = None) -> dict[str, Any]:
  """Pretrains (or resumes) the SimCLR model on the clean slices (view 0) of `patients` in an image cache.

  Labels are never read. Writes OUT/run.json (what the run is made from: the config, the image cache's manifest
  digest, the patients; a rerun with anything else is refused, naming the field), config.json, metrics.jsonl (a row
  per step and per epoch), curves.png, checkpoints/ (one per epoch) and, at the end, encoder/. One process at a time
  writes OUT (OUT/.lock, taken once every input is checked). `stop_after_steps` ends the run as if it had been killed
  after that many steps (for tests of resumption); `sync_every_steps` is how often the host reads the losses back
  (core.SYNC_EVERY_STEPS by default). Returns timings, the step count, the encoder's directory and the last epoch's
  row.
  """
  import contextlib

  from autosam_jax.outputs import check_output_path

  out_dir = check_output_path(out_dir)
  with contextlib.ExitStack() as stack:  # holds OUT's lock, once taken, to the end
    return _pretrain_simclr(config, cache_dir, out_dir, patients, progress=progress,
                            stop_after_steps=stop_after_steps, sync_every_steps=sync_every_steps, stack=stack)


def _pretrain_simclr(config, cache_dir, out_dir, patients, *, progress, stop_after_steps, sync_every_steps,
                     stack) -> dict[str, Any]:
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.outputs import file_digest, take_output
  from autosam_jax.train.core import SYNC_EVERY_STEPS, fit, placement

  cache = FeatureCache(cache_dir)
  if cache.manifest["depends_on"].get("kind") != "images":
    raise DataError(f"{cache_dir}: SimCLR augments images, but this cache holds SAM embeddings; use an image cache "
                    "(autosam-jax image-cache)")
  patients = sorted(set(patients))
  indices = cache.indices(patients, views=(0,))
  if len(indices) == 0:
    raise DataError(f"{cache_dir}: no cached slices of the patients {patients[:5]}")
  where = placement(config.batch_size)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(config.seed))),
                                       nnx.Param)
  check_memory(config, abstract_params, np.shape(cache[int(indices[0])]["embedding"]))
  # Everything checked: from here on the run writes.
  identity = {"config": config.to_dict(),
              "cache": {"path": str(Path(cache_dir).absolute()),
                        "manifest_sha256": file_digest(Path(cache_dir) / "manifest.json")},
              "patients": patients}
  take_output(stack, out_dir, "pretrain-simclr", identity, main=where.main)

  method = SimclrPretraining(config, cache, indices, graphdef, initial_params(config), patients, out_dir)
  options = LoopOptions(epochs=config.epochs, batch_size=config.batch_size, checkpoint_every_steps=0,
                        sync_every_steps=sync_every_steps or SYNC_EVERY_STEPS, progress=progress,
                        description="SimCLR", stop_after_steps=stop_after_steps,
                        kill_points=KillPoints("simclr.step", None, last_step_after_checkpoint=True))
  return fit(method, out_dir, options, where)


def load_pretrained_encoder(unet, encoder_dir: str | os.PathLike):
  """Copies a SimCLR encoder (OUT/encoder/ of `pretrain_simclr`) into `unet.encoder` in place; returns `unet`.

  As the official fine-tuning (`load_checkpoint`, strict=False) does, only the contracting path and center change;
  the decoder and head keep their random init. Every parameter must match in name and shape (orbax would restore a
  mismatched shape silently), so another width is refused before anything is copied.
  """
  import orbax.checkpoint as ocp

  from autosam_jax.faults import restore_or_raise

  encoder_dir = Path(encoder_dir).absolute()
  params_dir, config_file = encoder_dir / ENCODER_PARAMS, encoder_dir / ENCODER_CONFIG
  if not params_dir.is_dir() or not config_file.is_file():
    raise DataError(f"{encoder_dir}: not a SimCLR encoder (needs {ENCODER_PARAMS}/ and {ENCODER_CONFIG}); give the "
                    "encoder/ directory of an autosam-jax pretrain-simclr run")
  try:
    pretrained = SimclrConfig.from_dict(json.loads(config_file.read_text()), source=str(config_file))
  except json.JSONDecodeError as err:
    raise DataError(f"{config_file}: unreadable ({err})") from None
  state = nnx.state(unet.encoder, nnx.Param)
  wanted = nnx.to_pure_dict(state)

  def restore():
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(params_dir)

  restored = restore_or_raise(restore, lambda reason: DataError(
      f"{encoder_dir}: cannot read the encoder parameters: {reason}"))

  def flat(tree, prefix=()):
    if isinstance(tree, dict):
      return {k: v for key, sub in tree.items() for k, v in flat(sub, prefix + (str(key),)).items()}
    return {"/".join(prefix): tree}

  have, need = flat(restored), flat(wanted)
  width = (f"it was pretrained with unet_base_channels {pretrained.unet_base_channels}; train the UNet with the same "
           "width")
  if set(have) != set(need):
    missing, extra = sorted(set(need) - set(have)), sorted(set(have) - set(need))
    raise DataError(f"{encoder_dir}: parameters do not match this UNet's encoder ({width}); missing {missing[:3]}, "
                    f"unexpected {extra[:3]}")
  for name in sorted(need):
    if tuple(have[name].shape) != tuple(need[name].shape):
      raise DataError(f"{encoder_dir}: {name} has shape {tuple(have[name].shape)} but this UNet's encoder needs "
                      f"{tuple(need[name].shape)} ({width})")
  nnx.replace_by_pure_dict(state, _as_arrays_like(restored, wanted))
  nnx.update(unet.encoder, state)
  return unet


def _as_arrays_like(restored, wanted):
  """`restored`'s arrays as JAX arrays in `wanted`'s dtypes (orbax may hand back numpy arrays)."""
  if isinstance(wanted, dict):
    return {k: _as_arrays_like(restored[k], v) for k, v in wanted.items()}
  return jnp.asarray(restored, dtype=wanted.dtype)


def load_config(path: Path | None, overrides: list[str]) -> SimclrConfig:
  """Options from a config file's get_config() (or the defaults), then each NAME=VALUE override (a Python literal,
  else the text)."""
  return SimclrConfig.from_file(path, overrides)
