"""Training a head on cached embeddings: jit-compiled step with donated state, batch sharded over the "data" mesh,
orbax checkpoints for exact resumption, metrics to JSONL and curves to PNG.

Under jax.distributed (parallel.initialize) the mesh spans every process's devices: each process loads only its rows
of every global batch, whose composition does not depend on the number of processes; the parameters are replicated,
checkpoints and models are saved by all processes together, and process 0 alone writes metrics and curves.

The train state is a plain pytree {"params", "opt_state", "step"}; the head's frozen parts and graph stay outside it.
Each epoch, every labeled slice is seen once, through one of its cached views (view 0 is the clean slice) drawn
from (seed, epoch); batches come from a grain pipeline shuffled from (seed, epoch), the last one padded with
zero-weight samples so every step has the same shape and nothing recompiles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autosam_jax.errors import NonFiniteLossError  # noqa: F401 - importable from here too


# plateau_train_loss: the official code's plateau on the last batch's training loss (min mode); plateau_val_dice: on
# validation Dice (max mode), for the improved variant.
SCHEDULERS = ("plateau_train_loss", "plateau_val_dice")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  head: str = "autosam"  # autosam | cnn | linear (on SAM embeddings) | unet (on images, from scratch)
  variant: str = "faithful"  # faithful | improved
  # Background included; 0 (the default): the dataset's, from the cache's label table. A value that disagrees with
  # the data is refused (naming both) rather than training extra outputs or failing on labels beyond them.
  num_classes: int = 0
  epochs: int = 120
  batch_size: int = 4
  learning_rate: float = 5e-4
  # faithful: plateau on the last training batch's loss from epoch 10 (the official code); improved: plateau on
  # validation Dice, and the best epoch by validation Dice is the model kept.
  scheduler: str = "plateau_train_loss"
  plateau_start_epoch: int = 10
  seed: int = 0
  checkpoint_every_steps: int = 0  # 0: at the end of every epoch only
  # Validate and write the epoch checkpoint every N epochs and after the last one (1: every epoch, as the official
  # code validates). Larger only for quick runs: the plateau on validation Dice then counts validations, not epochs.
  eval_every_epochs: int = 1
  # none | faithful | improved: augment_batch applied to each training batch inside the train step. Only for image
  # caches (write_image_cache), where the "embedding" is the model image; SAM heads get augmented cached views instead.
  augment: str = "none"
  unet_base_channels: int = 64  # the official UNet's width; smaller only for quick tests
  cnn_top_channels: int = 64  # the official CNN head's (its widest layer is 16x this); smaller only for quick runs
  joint: bool = False  # improved AutoSAM only: all class tokens in one decoder pass (C times cheaper)
  # UNet only: an encoder/ directory written by SimCLR pretraining (autosam-jax pretrain-simclr) to start the
  # contracting path and center from; the decoder stays random, as in the official fine-tuning. "" = from scratch.
  init_encoder: str = ""

  def __post_init__(self):
    from autosam_jax.data.errors import DataError

    if self.head not in ("autosam", "cnn", "linear", "unet"):
      raise DataError(f"training config: head must be autosam, cnn, linear or unet, got {self.head!r}")
    if self.variant not in ("faithful", "improved"):
      raise DataError(f"training config: variant must be 'faithful' or 'improved', got {self.variant!r}")
    if self.joint and (self.head != "autosam" or self.variant != "improved"):
      raise DataError("training config: joint decoding is an option of the improved AutoSAM head only "
                      f"(head {self.head!r}, variant {self.variant!r})")
    for name in ("epochs", "batch_size", "num_classes", "unet_base_channels", "cnn_top_channels", "eval_every_epochs"):
      value = getattr(self, name)
      if isinstance(value, int) and not isinstance(value, bool) and value < (0 if name == "num_classes" else 1):
        raise DataError(f"training config: {name} must be positive, got {value}")
    if self.num_classes == 1:
      raise DataError("training config: num_classes counts the background too, so it is at least 2; leave it out to "
                      "take the dataset's")
    for name in ("seed", "checkpoint_every_steps", "plateau_start_epoch"):
      value = getattr(self, name)
      if isinstance(value, int) and value < 0:
        raise DataError(f"training config: {name} must be 0 or more, got {value}")
    if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
            and self.learning_rate > 0):
      raise DataError(f"training config: learning_rate must be a positive number, got {self.learning_rate!r}")
    if self.scheduler not in SCHEDULERS:
      raise DataError(f"training config: scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
    if self.augment not in ("none", "faithful", "improved"):
      raise DataError(f"training config: augment must be 'none', 'faithful' or 'improved', got {self.augment!r}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
      from autosam_jax.data.errors import DataError
      raise DataError(f"{source}: unknown training option(s) {unknown}; known: {sorted(fields)}")
    for name, value in values.items():
      expected = type(getattr(cls(), name))
      # bool is an int to Python, but `epochs=True` is a mistake, not one epoch
      wrong = (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected)
      if wrong and not (expected is float and isinstance(value, int) and not isinstance(value, bool)):
        from autosam_jax.data.errors import DataError
        raise DataError(f"{source}: {name} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return cls(**values)


_FIELDS = ("embedding", "target", "valid")


def _example(cache, padding: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
  """The fields training needs of cache item `index`; `padding` (a zero-weight example) for index -1."""
  if index < 0:
    return padding
  item = cache[index]
  return {k: item[k] for k in _FIELDS}


def _padding(cache, index: int) -> dict[str, np.ndarray]:
  return {k: np.zeros_like(v) for k, v in _example(cache, {}, index).items()}


def local_indices(order: np.ndarray, batch_size: int, rows: tuple[int, int]) -> np.ndarray:
  """Rows [lo, hi) of each global batch of `batch_size` taken in `order` (-1 past its end), batch after batch."""
  steps = -(-len(order) // batch_size)
  padded = np.full(steps * batch_size, -1, np.int64)
  padded[:len(order)] = order
  return padded.reshape(steps, batch_size)[:, rows[0]:rows[1]].ravel()


def _batches(cache, indices: np.ndarray, config: TrainConfig, epoch: int, rows: tuple[int, int], iterator_state=None):
  """A grain iterator over this process's rows of the epoch's global batches: the order of a shuffled slice_dataset
  from (seed, epoch), the last batch padded with zero-weight examples."""
  import grain

  from autosam_jax.data.loader import epoch_order

  local = local_indices(epoch_order(indices, seed=config.seed, epoch=epoch), config.batch_size, rows)
  padding = _padding(cache, int(indices[0]))
  dataset = grain.MapDataset.source(local).map(lambda i: _example(cache, padding, int(i))).batch(rows[1] - rows[0])
  iterator = iter(dataset.to_iter_dataset())
  if iterator_state is not None:
    iterator.set_state(iterator_state)
  return iterator


def epoch_indices(slice_views: np.ndarray, seed: int, epoch: int) -> np.ndarray:
  """One cache index per labeled slice: from row i of `slice_views` ((slices, views + 1) cache indices), the view
  r ~ U{0..views} drawn from (seed, epoch)."""
  rng = np.random.default_rng([seed, epoch, 7])
  chosen = rng.integers(0, slice_views.shape[1], size=len(slice_views))
  return slice_views[np.arange(len(slice_views)), chosen]


def view_table(cache, slices: list[tuple[str, int]], views: int) -> np.ndarray:
  """(slices, views + 1) cache indices of each labeled slice's views (column 0: the clean slice)."""
  lookup = {(it["case_id"], it["slice_index"], it["view"]): i for i, it in enumerate(cache.items)}
  return np.asarray([[lookup[(case, z, v)] for v in range(views + 1)] for case, z in slices], np.int64)


def to_batch(examples: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
  """Stacked grain batch -> fixed-size arrays; missing rows are zero-weight padding."""
  embeddings = np.asarray(examples["embedding"], np.float32)
  targets = np.asarray(examples["target"], np.int32)
  weights = np.asarray(examples["valid"], np.float32)
  missing = batch_size - len(embeddings)
  if missing:
    pad = lambda a: np.concatenate([a, np.zeros((missing, *a.shape[1:]), a.dtype)])
    embeddings, targets, weights = pad(embeddings), pad(targets), pad(weights)
  return {"embedding": embeddings, "target": targets, "weight": weights}


def make_steps(graphdef, tx, mesh, augment: str = "none", seed: int = 0):
  """jit-compiled train and eval steps; the state is donated, the batch sharded over the mesh's "data" axis.

  With `augment` other than "none", the train step augments (image, target) with the key fold_in(key(seed), step)
  before the forward pass: a fresh draw every step, the same after a resumption.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from autosam_jax.train.losses import segmentation_loss

  def logits_of(params, frozen, embedding, target_size):
    logits = nnx.merge(graphdef, params, frozen)(embedding)
    if logits.shape[1] != target_size:  # faithful: 256 -> 224 bilinear, as AutoSamSeg's final interpolate
      logits = jax.image.resize(logits, (logits.shape[0], target_size, target_size, logits.shape[3]), "bilinear",
                                antialias=False)
    return logits

  def train_step(state, frozen, batch, learning_rate):
    if augment != "none":
      from autosam_jax.data.augment import AugmentConfig, augment_batch

      key = jax.random.fold_in(jax.random.key(seed), state["step"])
      images, targets = augment_batch(key, batch["embedding"], batch["target"], AugmentConfig.for_mode(augment))
      batch = {**batch, "embedding": images, "target": targets}

    def loss_fn(params):
      logits = logits_of(params, frozen, batch["embedding"], batch["target"].shape[1])
      return segmentation_loss(logits, batch["target"], batch["weight"])

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    updates = jax.tree.map(lambda u: u * learning_rate, updates)
    params = optax.apply_updates(state["params"], updates)
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, {"loss": loss, **parts,
                                                                                     "finite": finite}

  def eval_step(params, frozen, batch):
    logits = logits_of(params, frozen, batch["embedding"], batch["target"].shape[1])
    loss, _ = segmentation_loss(logits, batch["target"], batch["weight"])
    predicted = jnp.argmax(logits, axis=-1)
    num_classes = logits.shape[-1]
    p = jax.nn.one_hot(predicted, num_classes) * batch["weight"][..., None]
    g = jax.nn.one_hot(batch["target"], num_classes) * batch["weight"][..., None]
    return loss, jnp.sum(p * g, axis=(0, 1, 2)), jnp.sum(p, axis=(0, 1, 2)) + jnp.sum(g, axis=(0, 1, 2))

  return jax.jit(train_step, donate_argnums=(0,)), jax.jit(eval_step)


def validate(eval_step, params, frozen, cache, indices, batch_size: int, rows: tuple[int, int],
             put) -> dict[str, float]:
  """Validation loss and pixel-aggregated Dice per foreground class over the given (clean) cache items.

  Each process loads rows [lo, hi) of every batch; `put` makes the global batch of the processes' parts."""
  if len(indices) == 0:
    return {}
  padding = _padding(cache, int(indices[0]))
  losses, intersection, total = [], 0.0, 0.0
  for start in range(0, len(indices), batch_size):
    local = local_indices(indices[start:start + batch_size], batch_size, rows)
    chunk = [_example(cache, padding, int(i)) for i in local]
    batch = to_batch({k: np.stack([c[k] for c in chunk]) for k in _FIELDS}, rows[1] - rows[0])
    loss, inter, tot = eval_step(params, frozen, put(batch))
    losses.append(float(loss))
    intersection, total = intersection + np.asarray(inter), total + np.asarray(tot)
  dice = 2 * intersection[1:] / np.maximum(total[1:], 1e-9)
  return {"val_loss": float(np.mean(losses)), "val_dice": float(np.mean(dice)),
          **{f"val_dice_class{c + 1}": float(d) for c, d in enumerate(dice)}}


def plot_curves(metrics_file: Path, png: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
  epochs = [r for r in rows if r.get("kind") == "epoch"]
  if not epochs:
    return
  fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.8))
  ax_loss.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], label="train")
  if any("val_loss" in r for r in epochs):
    ax_loss.plot([r["epoch"] for r in epochs if "val_loss" in r], [r["val_loss"] for r in epochs if "val_loss" in r],
                 label="validation")
  ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("CE + soft Dice loss"), ax_loss.legend()
  if any("val_dice" in r for r in epochs):
    ax_dice.plot([r["epoch"] for r in epochs if "val_dice" in r], [r["val_dice"] for r in epochs if "val_dice" in r])
  ax_dice.set_xlabel("epoch"), ax_dice.set_ylabel("validation Dice (mean fg)"), ax_dice.set_ylim(0, 1)
  fig.tight_layout()
  tmp = png.with_name(f".{png.name}.tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, png)


def cache_label_table(cache):
  """The label table a cache (`FeatureCache`) records; caches written before tables existed are refused."""
  from autosam_jax.data.errors import DataError
  from autosam_jax.data.labels import table_of_record

  where = cache.cache_dir / "manifest.json"
  table = table_of_record(cache.manifest["depends_on"], "labels", where)
  if table is None:
    raise DataError(f"{where}: records no label table (a cache from an older version); compute the cache again "
                    "into a new directory")
  return table


def model_record(labels, depends_on: dict[str, Any]) -> dict[str, Any]:
  """What a model's inputs were made from (its cache's `depends_on`), saved with it as model.json so evaluate and
  predict use exactly the same: the classes, and for SAM heads the encoder's dtype and weights."""
  return {"labels": labels.to_dict(), "input": "images" if depends_on.get("kind") == "images" else "sam_embeddings",
          "encoder_dtype": depends_on.get("dtype"), "weights_sha256": depends_on.get("weights_sha256"),
          "dataset_fingerprint": depends_on.get("dataset_fingerprint")}


def resolve_config(config: TrainConfig, labels, where: str) -> TrainConfig:
  """The config with num_classes taken from the dataset's label table; a config that disagrees is an error."""
  if config.num_classes and config.num_classes != labels.num_classes:
    from autosam_jax.data.errors import DataError
    raise DataError(f"{where}: num_classes is {config.num_classes} in the training config but the data has "
                    f"{labels.num_classes} classes ({labels.describe()}); leave num_classes out of the config (it "
                    "comes from the data)")
  return dataclasses.replace(config, num_classes=labels.num_classes)


def run_identity(config: TrainConfig, cache, labeled_patients, val_patients,
                 inputs: dict[str, Any] | None = None) -> dict[str, Any]:
  """What a run folder was made from (run.json): a rerun with anything else is refused instead of resumed."""
  from autosam_jax.outputs import file_digest

  cache_dir = Path(cache.cache_dir)
  return {"config": config.to_dict(),
          "cache": {"path": str(cache_dir.absolute()), "manifest_sha256": file_digest(cache_dir / "manifest.json")},
          "labeled_patients": sorted(labeled_patients), "val_patients": sorted(val_patients), **(inputs or {})}


def example_bytes(cache, index: int) -> int:
  return sum(np.asarray(v).nbytes for v in _example(cache, {}, index).values())


def train(config: TrainConfig, cache_dir: str | os.PathLike, head_factory: Callable[[TrainConfig], Any],
          out_dir: str | os.PathLike,
          labeled_patients: list[str], val_patients: list[str], *, progress: bool = True,
          stop_after_steps: int | None = None, inputs: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains (or resumes) a head in OUT_DIR; returns the final metrics and where the model is.

  `head_factory(config)` builds the NNX head (initialised, e.g. from SAM) for the config with the dataset's
  num_classes filled in (`resolve_config`). `inputs` (e.g. the SAM weights' and split file's digests) joins what
  the run records as its identity in OUT_DIR/run.json, with the config, the cache and the patients: a rerun with
  another identity is refused, naming the field. One process at a time trains in OUT_DIR (OUT_DIR/.lock).
  `stop_after_steps` ends the run early as if it had been killed after that many steps (for tests of resumption).
  """
  from autosam_jax.outputs import check_output_path

  check_output_path(out_dir)
  with contextlib.ExitStack() as stack:  # holds OUT_DIR's lock, once taken, to the end
    return _train(config, cache_dir, head_factory, out_dir, labeled_patients, val_patients, progress=progress,
                  stop_after_steps=stop_after_steps, inputs=inputs, stack=stack)


def _train(config, cache_dir, head_factory, out_dir, labeled_patients, val_patients, *, progress, stop_after_steps,
           inputs, stack) -> dict[str, Any]:
  import jax
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from autosam_jax.atomic import atomic_write_bytes, atomic_write_json
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.parallel import all_gather_objects, barrier, data_mesh, local_rows, replicate
  from autosam_jax.faults import kill_point
  from autosam_jax.train.checkpointing import RunCheckpoints
  from autosam_jax.train.schedules import ReduceLROnPlateau

  out_dir = Path(out_dir)
  cache = FeatureCache(cache_dir)
  cache.check_files()
  labels = cache_label_table(cache)
  config = resolve_config(config, labels, str(Path(cache_dir)))
  views = int(cache.manifest["depends_on"].get("views", 0))
  depends_on = cache.manifest["depends_on"]
  preprocess = depends_on.get("preprocess")  # saved with the model, for predict
  record = model_record(labels, depends_on)
  labeled = sorted({(it["case_id"], it["slice_index"]) for it in cache.items
                    if it["patient_id"] in set(labeled_patients) and it["view"] == 0})
  if not labeled:
    from autosam_jax.data.errors import DataError
    raise DataError(f"{cache_dir}: no cached slices of the labeled patients {labeled_patients[:5]}")
  val_indices = cache.indices(val_patients, views=(0,))
  slice_views = views if set(labeled_patients) <= set(cache.manifest["depends_on"].get("view_patients", [])) else 0
  views_of_slices = view_table(cache, labeled, slice_views)
  images = cache.manifest["depends_on"].get("kind") == "images"
  if images != (config.head == "unet"):
    from autosam_jax.data.errors import DataError
    raise DataError(f"{cache_dir}: holds {'model images' if images else 'SAM embeddings'}, but a {config.head} head "
                    f"trains on {'images' if config.head == 'unet' else 'SAM embeddings'}; give "
                    + ("an image cache (autosam-jax image-cache)" if config.head == "unet" else
                       "a feature cache (autosam-jax precompute)"))
  if config.augment != "none" and cache.manifest["depends_on"].get("kind") != "images":
    from autosam_jax.data.errors import DataError
    raise DataError(f"{cache_dir}: augment {config.augment!r} transforms images, but this cache holds SAM embeddings; "
                    "use an image cache (autosam-jax image-cache) or augment 'none'")

  from autosam_jax.memory import require_memory
  # the host side of a step: the grain batch, its padded copy and the device copy (3x), for every process's rows
  require_memory(3 * config.batch_size * example_bytes(cache, int(views_of_slices[0, 0])), f"batch size "
                 f"{config.batch_size}", "choose a smaller batch_size")
  identity = run_identity(config, cache, labeled_patients, val_patients, inputs)

  head = head_factory(config)
  graphdef, params, frozen = nnx.split(head, nnx.Param, ...)
  tx = optax.adam(1.0)  # the learning rate multiplies the update in the step, so the plateau can change it
  mesh = data_mesh()
  if config.batch_size % len(mesh.devices.ravel()):
    from autosam_jax.data.errors import DataError
    raise DataError(f"batch size {config.batch_size} is not a multiple of the {mesh.devices.size} devices")
  replicated, data = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
  rows = local_rows(data, config.batch_size)  # this process's rows of every global batch
  put = lambda batch: {k: jax.make_array_from_process_local_data(data, v, (config.batch_size, *v.shape[1:]))
                       for k, v in batch.items()}
  main = jax.process_index() == 0  # writes metrics, config and curves
  state = replicate({"params": params, "opt_state": tx.init(params), "step": np.int32(0)}, replicated)
  frozen = replicate(frozen, replicated)
  train_step, eval_step = make_steps(graphdef, tx, mesh, config.augment, config.seed)

  # Everything checked: from here on the run writes.
  from autosam_jax.outputs import take_output

  take_output(stack, out_dir, "train", identity, main=main)
  mode = "min" if config.scheduler == "plateau_train_loss" else "max"
  plateau = ReduceLROnPlateau(mode=mode)
  start_epoch, iterator_state, best = 0, None, {"score": -math.inf, "epoch": -1}
  checkpoints = RunCheckpoints(out_dir / "checkpoints")
  metrics_file = out_dir / "metrics.jsonl"
  if checkpoints.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, meta = checkpoints.restore(abstract, required=("epoch", "iterator_state", "best", "plateau", "step"))
    start_epoch, iterator_state, best = meta["epoch"], meta["iterator_state"], meta["best"]
    plateau = ReduceLROnPlateau(**meta["plateau"])
    # Metrics written after the checkpoint by the killed run are dropped, so the file matches an uninterrupted run.
    if main and metrics_file.exists():
      kept = [l for l in metrics_file.read_text().splitlines() if l and json.loads(l)["step"] <= meta["step"]]
      atomic_write_bytes(metrics_file, "".join(k + "\n" for k in kept).encode())
  elif main:
    atomic_write_json(out_dir / "config.json", config.to_dict())
    atomic_write_bytes(metrics_file, b"")
  barrier("autosam_jax.train.started")

  steps_per_epoch = -(-len(labeled) // config.batch_size)
  bar = None
  if progress and main:
    from tqdm import tqdm
    bar = tqdm(total=config.epochs * steps_per_epoch, initial=int(state["step"]), unit="step", desc="training",
               dynamic_ncols=True)
  started = time.perf_counter()
  last_metrics: dict[str, Any] = {}
  # The bar is closed however the loop ends, so an error message is not printed on the bar's line.
  with (open(metrics_file, "a") if main else open(os.devnull, "w")) as log, \
       (contextlib.closing(bar) if bar is not None else contextlib.nullcontext()):
    for epoch in range(start_epoch, config.epochs):
      indices = epoch_indices(views_of_slices, config.seed, epoch)
      iterator = _batches(cache, indices, config, epoch, rows, iterator_state)
      iterator_state = None
      learning_rate = np.float32(config.learning_rate * plateau.scale)
      step_metrics = None
      for examples in iterator:
        state, step_metrics = train_step(state, frozen, put(to_batch(examples, rows[1] - rows[0])), learning_rate)
        step = int(state["step"])
        if not bool(step_metrics["finite"]):
          raise NonFiniteLossError(f"non-finite loss or gradient at step {step} (epoch {epoch}); lower the learning "
                                   "rate or check the cache")
        log.write(json.dumps({"kind": "step", "step": step, "epoch": epoch, "loss": float(step_metrics["loss"]),
                              "lr": float(learning_rate)}) + "\n")
        if bar is not None:
          bar.update(1)
          bar.set_postfix(epoch=epoch, loss=f"{float(step_metrics['loss']):.3f}")
        # A checkpoint due on the epoch's last step is the epoch-end one, written below once the epoch is complete.
        last_of_epoch = step == (epoch + 1) * steps_per_epoch
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0 and not last_of_epoch:
          log.flush()
          checkpoints.save(step, state, {"epoch": epoch, "iterator_state": iterator.get_state(), "best": best,
                                         "plateau": plateau.state_dict(), "config": config.to_dict(), "step": step})
        kill_point("train.step")  # after the step (and its checkpoint, if one was due)
        if stop_after_steps is not None and step >= stop_after_steps:
          return {"stopped_at_step": step}
      evaluated = (epoch + 1) % config.eval_every_epochs == 0 or epoch == config.epochs - 1
      row = {"kind": "epoch", "step": int(state["step"]), "epoch": epoch, "train_loss": float(step_metrics["loss"]),
             "lr": float(learning_rate)}
      if evaluated:
        row.update(validate(eval_step, state["params"], frozen, cache, val_indices, config.batch_size, rows, put))
      row = all_gather_objects(row)[0]  # every process takes the same scheduler and best-model decisions
      if config.scheduler == "plateau_train_loss":
        if epoch >= config.plateau_start_epoch:
          plateau.step(row["train_loss"])
      elif "val_dice" in row:
        plateau.step(row["val_dice"])
      if "val_dice" in row and row["val_dice"] > best["score"]:
        best = {"score": row["val_dice"], "epoch": epoch}
        if config.variant == "improved":
          save_model(out_dir / "best_model", state["params"], frozen, config, preprocess, record)
      log.write(json.dumps(row) + "\n")
      log.flush()
      last_metrics = row
      due = config.checkpoint_every_steps and int(state["step"]) % config.checkpoint_every_steps == 0
      if evaluated or due:
        checkpoints.save(int(state["step"]), state, {"epoch": epoch + 1, "iterator_state": None, "best": best,
                                                     "plateau": plateau.state_dict(), "config": config.to_dict(),
                                                     "step": int(state["step"])})
        kill_point("train.epoch_saved")
  checkpoints.close()
  save_model(out_dir / "final_model", state["params"], frozen, config, preprocess, record)
  if main:
    plot_curves(metrics_file, out_dir / "curves.png")
  model = "best_model" if config.variant == "improved" and (out_dir / "best_model").exists() else "final_model"
  return {"seconds": time.perf_counter() - started, "steps": int(state["step"]), "model": str(out_dir / model),
          "best": best, "last": last_metrics}


# What a saved model's checksums.json covers (written by save_model, verified by load_head)
MODEL_FILES = ("state", "train_config.json", "preprocess.json", "model.json")


def save_model(directory: Path, params, frozen, config: TrainConfig, preprocess: dict[str, Any] | None = None,
               record: dict[str, Any] | None = None) -> None:
  """The trained head: its parameters and frozen parts as an orbax checkpoint, plus the training config and (when
  given) the preprocessing of the cache it was trained on (preprocess.json), so `predict` maps new scans the same way,
  and what its inputs were made from (model.json: the label table, the encoder dtype and weights digest).

  Under jax.distributed every process calls it (orbax saves collectively); process 0 puts the result in place."""
  import shutil

  import jax
  import orbax.checkpoint as ocp
  from flax import nnx

  from autosam_jax.atomic import atomic_write_json, remove_settled, replace_dir, staging_dir
  from autosam_jax.checksums import write_checksums
  from autosam_jax.parallel import barrier

  directory = Path(directory).absolute()
  main = jax.process_index() == 0
  if jax.process_count() == 1:
    staging = staging_dir(directory)
  else:  # one staging directory all processes know, left over only by a killed run
    staging = directory.parent / f".{directory.name}.partial-shared"
    if main:
      shutil.rmtree(staging, ignore_errors=True)
      staging.mkdir()
    barrier("autosam_jax.save_model.staging")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(staging / "state", {"params": nnx.to_pure_dict(params), "frozen": nnx.to_pure_dict(frozen)})
    if main:
      atomic_write_json(staging / "train_config.json", config.to_dict())
      if preprocess is not None:
        atomic_write_json(staging / "preprocess.json", preprocess)
      if record is not None:
        atomic_write_json(staging / "model.json", record)
      write_checksums(staging, MODEL_FILES)
      replace_dir(staging, directory)
    barrier("autosam_jax.save_model.done")
  except BaseException:
    if main:
      remove_settled(staging)
    raise


def build_model(config: TrainConfig, sam, *, rngs):
  """The model a config trains: a head on SAM embeddings (initialised from `sam`), or the UNet (no SAM needed).

  `config.num_classes` must be set: `train` fills it in from the cache's label table (`resolve_config`)."""
  if config.num_classes < 2:
    raise ValueError("build_model needs the dataset's num_classes; resolve the config first (resolve_config)")
  if config.head == "unet":
    from autosam_jax.models.unet import UNet
    unet = UNet(config.num_classes, base_channels=config.unet_base_channels, rngs=rngs)
    if config.init_encoder:
      from autosam_jax.train.simclr import load_pretrained_encoder
      load_pretrained_encoder(unet, config.init_encoder)
    return unet
  if config.init_encoder:
    from autosam_jax.data.errors import DataError
    raise DataError(f"init_encoder is for the UNet (head 'unet'), not for a {config.head} head")
  from autosam_jax.models.heads import build_head
  return build_head(config.head, config.num_classes, variant=config.variant, sam=sam, joint=config.joint,
                    cnn_top_channels=config.cnn_top_channels, rngs=rngs)


def load_head(model_dir: str | os.PathLike, sam) -> tuple[Any, TrainConfig]:
  """A trained head saved by `save_model` (final_model/ or best_model/ of a run), with its training config.

  `sam` (the converted SAM the run started from, an NNX `Sam`) fixes the head's architecture; None for a UNet.
  """
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx

  from autosam_jax.checksums import verify_checksums
  from autosam_jax.data.errors import DataError
  from autosam_jax.faults import restore_or_raise

  model_dir = Path(model_dir).absolute()
  config_file = model_dir / "train_config.json"
  if not config_file.is_file():
    raise DataError(f"{config_file}: missing; give a run's final_model/ or best_model/ directory")
  verify_checksums(model_dir, DataError, "train the model again (rerun the train command into a new --out)")
  config = TrainConfig.from_dict(json.loads(config_file.read_text()), source=str(config_file))
  # The architecture only: pretrained encoder weights (init_encoder) would be overwritten by the restore anyway.
  shape_config = dataclasses.replace(config, init_encoder="")
  abstract = nnx.eval_shape(lambda: build_model(shape_config, sam, rngs=nnx.Rngs(0)))
  graphdef, params, frozen = nnx.split(abstract, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's, also under jax.distributed
  as_target = lambda state: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
                                         nnx.to_pure_dict(state))
  def restore():
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(model_dir / "state", {"params": as_target(params), "frozen": as_target(frozen)})

  restored = restore_or_raise(restore, lambda reason: DataError(
      f"{model_dir}: cannot be restored as a {config.head} head for this SAM: {reason}"))
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(frozen, restored["frozen"])
  return nnx.merge(graphdef, params, frozen), config


def read_model_record(model_dir: str | os.PathLike) -> dict[str, Any]:
  """model.json of a saved model, with its label table parsed ("labels" becomes a LabelTable); DataError if absent
  (a model saved before models recorded their classes) or unreadable."""
  from autosam_jax.data.errors import DataError
  from autosam_jax.data.labels import LabelTable

  if not Path(model_dir).is_dir():
    raise DataError(f"{model_dir}: no such model directory; give a run's final_model/ or best_model/")
  if not (Path(model_dir) / "train_config.json").is_file():
    raise DataError(f"{Path(model_dir) / 'train_config.json'}: missing; give a run's final_model/ or best_model/ "
                    "directory")
  path = Path(model_dir) / "model.json"
  if not path.is_file():
    raise DataError(f"{path}: missing (a model saved by an older version records no classes); train it again")
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise DataError(f"{path}: unreadable ({type(err).__name__}: {err}); train the model again") from None
  if not isinstance(record, dict):
    raise DataError(f"{path}: not a model record (a JSON object was expected); train the model again")
  record = dict(record)
  record["labels"] = LabelTable.from_dict(record.get("labels"), f"{path} (labels)")
  return record
