"""Training a head on cached embeddings (or the UNet on cached model images) through the trainer core
(`train/core.py`): the head's method (`HeadTraining`: its step, batches, plateau schedule, validation, best and final
model), the training config, and saving and loading the trained model.

Each epoch, every labeled slice is seen once, through one of its cached views (view 0 is the clean slice) drawn
from (seed, epoch); batches come in the order of a grain shuffle from (seed, epoch), the last one padded with
zero-weight samples so every step has the same shape and nothing recompiles. The head's frozen parts and graph stay
outside the train state; its trainable parameters are the nnx.Param of the head.

With lora_rank, the encoder is in the loop: the cache holds encoder inputs (autosam-jax precompute --store inputs,
its views the augmentation), the model is an `AdaptedSam` (the encoder with LoRA factors, the head on it), and the
trainable parameters are the factors and the head's (`models.lora.TRAINABLE`); the encoder's base weights are frozen,
passed to every step and left out of the saved model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autosam_jax.errors import DataError, NonFiniteLossError  # noqa: F401 - NonFiniteLossError importable from here
from autosam_jax.train.core import EpochEnd, KillPoints, LoopOptions, Method, StepProgram, local_indices
from autosam_jax.models.trained import CACHE_KINDS, TrainConfig, cache_kind, kind_refusal

_FIELDS = ("embedding", "target", "valid")
# SAM 2's high-resolution maps, read from the cache for a head that adds them (`AutoSamHead.uses_high_res`).
HIGH_RES_FIELDS = ("high_res_0", "high_res_1")


def fields_for(head, cache) -> tuple[str, ...]:
  """The cache fields a head trains on: SAM 2's high-resolution maps too where it adds them (a cache without them
  is refused, naming the fix)."""
  if not getattr(head, "uses_high_res", False):
    return _FIELDS
  if "high_res" not in getattr(cache, "feature_maps", ()):
    raise DataError(f"{cache.cache_dir}: holds no high-resolution maps, which this AutoSAM head (SAM 2's decoder) "
                    "adds; precompute the cache again with this version (SAM 2 caches hold them)")
  return _FIELDS + HIGH_RES_FIELDS


def _example(cache, padding: dict[str, np.ndarray], index: int,
             fields: tuple[str, ...] = _FIELDS) -> dict[str, np.ndarray]:
  """The fields training needs of cache item `index`; `padding` (a zero-weight example) for index -1."""
  if index < 0:
    return padding
  item = cache[index]
  return {k: item[k] for k in fields}


def _padding(cache, index: int, fields: tuple[str, ...] = _FIELDS) -> dict[str, np.ndarray]:
  return {k: np.zeros_like(v) for k, v in _example(cache, {}, index, fields).items()}


def _high_res(batch) -> list | None:
  return [batch[k] for k in HIGH_RES_FIELDS] if HIGH_RES_FIELDS[0] in batch else None


def epoch_indices(slice_views: np.ndarray, seed: int, epoch: int) -> np.ndarray:
  """One cache index per labeled slice: from row i of `slice_views` ((slices, views + 1) cache indices), the view
  r ~ U{0..views} drawn from (seed, epoch)."""
  rng = np.random.default_rng([seed, epoch, 7])
  chosen = rng.integers(0, slice_views.shape[1], size=len(slice_views))
  return slice_views[np.arange(len(slice_views)), chosen]


def view_table(cache, slices: list[tuple[str, int]], views) -> np.ndarray:
  """(slices, views + 1) cache indices of each labeled slice's views (column 0: the clean slice); `views` may also
  be the view numbers themselves, in column order (semi-supervised training: 0, -1, ..., -S)."""
  numbers = range(views + 1) if isinstance(views, (int, np.integer)) else tuple(views)
  lookup = {(it["case_id"], it["slice_index"], it["view"]): i for i, it in enumerate(cache.items)}
  return np.asarray([[lookup[(case, z, v)] for v in numbers] for case, z in slices], np.int64)


def to_batch(examples: dict[str, Any], batch_size: int) -> dict[str, np.ndarray]:
  """Stacked grain batch -> fixed-size arrays; missing rows are zero-weight padding."""
  embeddings = np.asarray(examples["embedding"], np.float32)
  targets = np.asarray(examples["target"], np.int32)
  weights = np.asarray(examples["valid"], np.float32)
  high_res = [np.asarray(examples[k], np.float32) for k in HIGH_RES_FIELDS if k in examples]
  missing = batch_size - len(embeddings)
  if missing:
    pad = lambda a: np.concatenate([a, np.zeros((missing, *a.shape[1:]), a.dtype)])
    embeddings, targets, weights = pad(embeddings), pad(targets), pad(weights)
    high_res = [pad(m) for m in high_res]
  return {"embedding": embeddings, "target": targets, "weight": weights, **dict(zip(HIGH_RES_FIELDS, high_res))}


def _logits(graphdef, params, frozen, embedding, target_size: int, dropout_key=None, high_res=None,
            feature_scale=None):
  """The model's logits on the target grid. `embedding`: the cached features (a LoRA model: the encoder inputs);
  `feature_scale` multiplies the features before the head (a LoRA model: its encoder's embedding)."""
  import jax
  from flax import nnx

  model = nnx.merge(graphdef, params, frozen)
  if dropout_key is not None:
    from autosam_jax.models.lora import set_dropout_key
    set_dropout_key(model, dropout_key)
  if feature_scale is not None and hasattr(model, "encoder"):  # an AdaptedSam: the features come from its encoder
    logits = model(embedding, feature_scale=feature_scale)
  else:
    embedding = embedding if feature_scale is None else embedding * feature_scale
    logits = model(embedding) if high_res is None else model(embedding, high_res)
  if logits.shape[1] != target_size:  # faithful: 256 -> 224 bilinear, as AutoSamSeg's final interpolate
    logits = jax.image.resize(logits, (logits.shape[0], target_size, target_size, logits.shape[3]), "bilinear",
                              antialias=False)
  return logits


@dataclasses.dataclass(frozen=True)
class HeadProgram(StepProgram):
  """The head's train step: Adam (the learning rate in its state), the official CE + soft Dice loss. With `augment`
  other than "none", the batch's (image, target) are augmented with the key fold_in(key(seed), step) before the
  forward pass: a fresh draw every step, the same after a resumption. With `dropout` (a LoRA model's factor dropout),
  the dropout masks come from fold_in(fold_in(key(seed), step), 1) the same way."""
  graphdef: Any
  augment: str = "none"
  seed: int = 0
  dropout: bool = False

  def optimizer(self, learning_rate):
    import optax

    from autosam_jax.train.schedules import injected_optimizer

    return injected_optimizer(optax.scale_by_adam(), learning_rate)

  def prepare(self, batch, step):
    if self.augment == "none" and not self.dropout:
      return batch
    import jax

    from autosam_jax.data.augment import AugmentConfig, augment_batch

    key = jax.random.fold_in(jax.random.key(self.seed), step)
    if self.dropout:
      batch = {**batch, "dropout_key": jax.random.fold_in(key, 1)}
    if self.augment == "none":
      return batch
    if HIGH_RES_FIELDS[0] in batch:
      raise ValueError("augmenting cached features would move the embedding but not SAM 2's high-resolution maps; "
                       "train on a cache of augmented views (precompute --views) with augment 'none'")
    images, targets = augment_batch(key, batch["embedding"], batch["target"], AugmentConfig.for_mode(self.augment))
    return {**batch, "embedding": images, "target": targets}

  def loss(self, params, frozen, batch):
    from autosam_jax.train.losses import segmentation_loss

    logits = _logits(self.graphdef, params, frozen, batch["embedding"], batch["target"].shape[1],
                     batch.get("dropout_key"), _high_res(batch))
    return segmentation_loss(logits, batch["target"], batch["weight"])


def _eval_step(params, frozen, batch, *, graphdef):
  import jax
  import jax.numpy as jnp

  from autosam_jax.train.losses import scored, segmentation_loss

  logits = _logits(graphdef, params, frozen, batch["embedding"], batch["target"].shape[1], high_res=_high_res(batch))
  loss, _ = segmentation_loss(logits, batch["target"], batch["weight"])
  predicted = jnp.argmax(logits, axis=-1)
  num_classes = logits.shape[-1]
  target, weight = scored(batch["target"], batch["weight"], num_classes)  # the ignore label's pixels weigh 0
  p = jax.nn.one_hot(predicted, num_classes) * weight[..., None]
  g = jax.nn.one_hot(target, num_classes) * weight[..., None]
  # the batch's loss is a mean over its weighted pixels: their number lets validation weigh batches by it
  return (loss, jnp.sum(p * g, axis=(0, 1, 2)), jnp.sum(p, axis=(0, 1, 2)) + jnp.sum(g, axis=(0, 1, 2)),
          jnp.sum(weight))


@functools.cache
def _compiled_eval_step():
  """The jit-compiled eval step, the graph static: runs of one architecture share its compilation."""
  import jax

  return jax.jit(_eval_step, static_argnames=("graphdef",))


def make_steps(graphdef, augment: str = "none", seed: int = 0):
  """(train_step(state, frozen, batch) -> (state, metrics), eval_step(params, frozen, batch) -> (loss, intersection,
  total, weight)), jit-compiled, the state donated: the steps `train` runs, for benchmarks. The state is {"params",
  "opt_state": HeadProgram(...).optimizer(learning_rate).init(params), "step"}."""
  import jax

  program = HeadProgram(graphdef, augment, seed)
  return jax.jit(program.__call__, donate_argnums=(0,)), functools.partial(_compiled_eval_step(), graphdef=graphdef)


def class_keys(names) -> list[str]:
  """A metric-key part per class name, in order: ASCII letters and digits, lower case, other runs as "_" ("Gray
  matter" -> "gray_matter", "Körper" -> "korper"); a name that leaves nothing, or the key of an earlier class,
  gets its label value ("class3"), so every key is distinct."""
  import re
  import unicodedata

  keys: list[str] = []
  for value, name in enumerate(names, 1):
    plain = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    key = re.sub(r"[^0-9a-z]+", "_", plain.lower()).strip("_")
    if not key or key in keys:
      key = f"class{value}"
    while key in keys:
      key += f"_{value}"
    keys.append(key)
  return keys


def validate(eval_step, params, frozen, cache, indices, batch_size: int, rows: tuple[int, int],
             put, width: int | None = None, class_names=None, fields: tuple[str, ...] = _FIELDS) -> dict[str, float]:
  """Validation loss and pixel-aggregated Dice per foreground class over the given (clean) cache items.

  val_loss is the mean over the real (weighted) pixels: each batch's loss, a mean over its weighted pixels, counts
  by their number, so a short or padded last batch weighs what it holds. A class with no pixel in the targets nor
  in the predictions has no Dice (0 / 0 is undefined; `evaluation.metrics` leaves undefined values out of its means
  too): it gets no val_dice_<class> entry and is left out of val_dice, the mean over the others; with no class left
  there is no val_dice. Entries are named by `class_names` (the label table's foreground; `class_keys`), class1,
  class2, ... without.

  Each process loads rows [lo, hi) of every batch (widened to `width` rows with zero-weight padding); `put` makes
  the global batch of the processes' parts."""
  if len(indices) == 0:
    return {}
  import jax

  padding = _padding(cache, int(indices[0]), fields)
  outputs = []  # the device's results, read once at the end: the host loads batch n + 1 while the device runs n
  for start in range(0, len(indices), batch_size):
    local = local_indices(indices[start:start + batch_size], batch_size, rows, width)
    chunk = [_example(cache, padding, int(i), fields) for i in local]
    batch = to_batch({k: np.stack([c[k] for c in chunk]) for k in fields}, rows[1] - rows[0])
    outputs.append(eval_step(params, frozen, put(batch)))
  loss_sum, weight_sum, intersection, total = 0.0, 0.0, 0.0, 0.0
  for loss, inter, tot, weight in jax.device_get(outputs):
    loss_sum, weight_sum = loss_sum + float(loss) * float(weight), weight_sum + float(weight)
    intersection, total = intersection + np.asarray(inter), total + np.asarray(tot)
  row = {"val_loss": loss_sum / max(weight_sum, 1e-9)}
  keys = class_keys(class_names) if class_names is not None else [f"class{c}" for c in range(1, len(total))]
  dice = {key: 2 * float(i) / float(t) for key, i, t in zip(keys, intersection[1:], total[1:], strict=True)
          if t > 0}
  if dice:
    row["val_dice"] = float(np.mean(list(dice.values())))
    row.update({f"val_dice_{key}": value for key, value in dice.items()})
  return row


def plot_curves(metrics_file: Path, png: Path) -> None:
  from autosam_jax.train.core import figure, read_rows, save_figure

  epochs = [r for r in read_rows(metrics_file) if r.get("kind") == "epoch"]
  if not epochs:
    return
  fig, (ax_loss, ax_dice) = figure(1, 2, figsize=(10, 3.8))
  ax_loss.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], label="train")
  if any("val_loss" in r for r in epochs):
    ax_loss.plot([r["epoch"] for r in epochs if "val_loss" in r], [r["val_loss"] for r in epochs if "val_loss" in r],
                 label="validation")
  ax_loss.set_xlabel("epoch"), ax_loss.set_ylabel("CE + soft Dice loss"), ax_loss.legend()
  if any("val_dice" in r for r in epochs):
    ax_dice.plot([r["epoch"] for r in epochs if "val_dice" in r], [r["val_dice"] for r in epochs if "val_dice" in r])
  ax_dice.set_xlabel("epoch"), ax_dice.set_ylabel("validation Dice (mean fg)"), ax_dice.set_ylim(0, 1)
  fig.tight_layout()
  save_figure(fig, png)


def model_record(labels, depends_on: dict[str, Any], config: TrainConfig | None = None) -> dict[str, Any]:
  """What a model's inputs were made from (its cache's `depends_on`), saved with it as model.json so evaluate and
  predict use exactly the same: the classes, and for SAM heads the encoder's dtype and weights (for a LoRA model, the
  dtype it was trained in and the base weights its factors adapt)."""
  dtype = config.encoder_dtype if config is not None and config.lora else depends_on.get("dtype")
  return {"labels": labels.to_dict(), "input": cache_kind(depends_on), "encoder_dtype": dtype,
          "weights_sha256": depends_on.get("weights_sha256"),
          # the encoder (family and architecture) the inputs come from: predict refuses weights of another one
          "sam_config": depends_on.get("sam_config"),
          "dataset_fingerprint": depends_on.get("dataset_fingerprint"),
          # the frames the training data was cut in: predict cuts new scans alike (data/orientation.py)
          "orientation_references": depends_on.get("orientation_references")}


def resolve_config(config: TrainConfig, labels, where: str) -> TrainConfig:
  """The config with num_classes taken from the dataset's label table; a config that disagrees is an error."""
  if config.num_classes and config.num_classes != labels.num_classes:
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


def warn_main(message: str) -> None:
  """`warning: MESSAGE` on stderr, from process 0 only (every process checks the same inputs)."""
  import sys

  import jax

  if jax.process_index() == 0:
    print(f"warning: {message}", file=sys.stderr)


def example_bytes(cache, index: int) -> int:
  return sum(np.asarray(v).nbytes for v in _example(cache, {}, index).values())


class HeadTraining(Method):
  """A head (or the UNet) trained on a cache: the trainer core's method.

  Learning rate: the config's, times the plateau's scale (the plateau acts at epoch ends: on the last batch's loss
  from `plateau_start_epoch`, or on validation Dice). Each epoch ends with validation (every `eval_every_epochs`
  and after the last), the best model by validation Dice (kept as best_model/ by the improved variant) and a
  checkpoint when validated or when `checkpoint_every_steps` divides the step."""

  diverged = "loss"
  meta_keys = ("best", "plateau")

  def __init__(self, config: TrainConfig, cache, views_of_slices: np.ndarray, val_indices: np.ndarray, head,
               where, out_dir: Path, preprocess, record, *, batch_rows: int):
    from flax import nnx

    from autosam_jax.models.lora import TRAINABLE
    from autosam_jax.train.schedules import ReduceLROnPlateau

    if config.semi and type(self) is HeadTraining:
      raise ValueError("a semi-supervised config trains through train/semi.py (train_semi), with unlabeled patients")
    graphdef, self.params, self.frozen = nnx.split(head, TRAINABLE if config.lora else nnx.Param, ...)
    self.program = HeadProgram(graphdef, config.augment, config.seed, dropout=config.lora and config.lora_dropout > 0)
    self.eval_step = functools.partial(_compiled_eval_step(), graphdef=graphdef)
    self.train_config, self.config = config, config.to_dict()
    self.cache, self.views_of_slices, self.val_indices = cache, views_of_slices, val_indices
    self.batch_rows = batch_rows  # the global batch's real rows (LoopOptions.batch_size)
    self.where, self.out_dir, self.preprocess, self.record = where, Path(out_dir), preprocess, record
    from autosam_jax.data.labels import LabelTable

    # the scored classes, by label value (not the background, not an ignore label)
    self.class_names = LabelTable.from_dict(record["labels"], "the model record").foreground_names
    self.fields = fields_for(head, cache)
    self.padding = _padding(cache, int(views_of_slices[0, 0]), self.fields)
    self.plateau = ReduceLROnPlateau(mode="min" if config.scheduler == "plateau_train_loss" else "max")
    self.best = {"score": float("-inf"), "epoch": -1}

  def epoch_order(self, epoch: int) -> np.ndarray:
    from autosam_jax.data.loader import epoch_order

    seed = self.train_config.seed
    return epoch_order(epoch_indices(self.views_of_slices, seed, epoch), seed=seed, epoch=epoch)

  def example(self, index: int) -> dict[str, np.ndarray]:
    return _example(self.cache, self.padding, index, self.fields)

  def collate(self, examples):
    return to_batch(examples, self.where.rows[1] - self.where.rows[0])

  def learning_rate(self, epoch: int, step: int) -> float:
    return float(np.float32(self.train_config.learning_rate * self.plateau.scale))

  def end_epoch(self, end: EpochEnd) -> tuple[dict[str, Any], bool]:
    from autosam_jax.parallel import all_gather_objects

    config = self.train_config
    evaluated = (end.epoch + 1) % config.eval_every_epochs == 0 or end.epoch == config.epochs - 1
    row = {"kind": "epoch", "step": end.step, "epoch": end.epoch, "train_loss": end.losses[-1],
           "lr": end.learning_rate}
    if evaluated:
      row.update(validate(self.eval_step, end.state["params"], end.frozen, self.cache, self.val_indices,
                          min(config.batch_size, self.where.batch_size), self.where.rows, self.where.put,
                          self.where.batch_size, class_names=self.class_names, fields=self.fields))
    row = all_gather_objects(row)[0]  # every process takes the same scheduler and best-model decisions
    # A validation without val_dice (no class in the validation slices' targets or predictions) says nothing about
    # the model: it neither steps the plateau on validation Dice nor competes for the best model.
    if config.scheduler == "plateau_train_loss":
      if end.epoch >= config.plateau_start_epoch:
        self.plateau.step(row["train_loss"])
    elif "val_dice" in row:
      self.plateau.step(row["val_dice"])
    if "val_dice" in row and row["val_dice"] > self.best["score"]:
      self.best = {"score": row["val_dice"], "epoch": end.epoch}
      if config.variant == "improved":
        save_model(self.out_dir / "best_model", end.state["params"], end.frozen, config, self.preprocess,
                   self.record)
    due = config.checkpoint_every_steps and end.step % config.checkpoint_every_steps == 0
    return row, bool(evaluated or due)

  def meta(self) -> dict[str, Any]:
    return {"best": self.best, "plateau": self.plateau.state_dict()}

  def restore(self, meta: dict[str, Any]) -> None:
    from autosam_jax.train.schedules import ReduceLROnPlateau

    self.best, self.plateau = meta["best"], ReduceLROnPlateau(**meta["plateau"])

  def finish(self, state, frozen, last: dict[str, Any]) -> dict[str, Any]:
    save_model(self.out_dir / "final_model", state["params"], frozen, self.train_config, self.preprocess,
               self.record)
    improved = self.train_config.variant == "improved" and (self.out_dir / "best_model").exists()
    return {"model": str(self.out_dir / ("best_model" if improved else "final_model")), "best": self.best}

  def plot(self, metrics_file: Path, png: Path) -> None:
    plot_curves(metrics_file, png)


def train(config: TrainConfig, cache_dir: str | os.PathLike, head_factory: Callable[[TrainConfig], Any],
          out_dir: str | os.PathLike,
          labeled_patients: list[str], val_patients: list[str], *, progress: bool = True,
          stop_after_steps: int | None = None, inputs: dict[str, Any] | None = None,
          sync_every_steps: int | None = None, method: Callable[..., HeadTraining] | None = None) -> dict[str, Any]:
  """Trains (or resumes) a head in OUT_DIR; returns the final metrics and where the model is.

  `head_factory(config)` builds the NNX head (initialised, e.g. from SAM) for the config with the dataset's
  num_classes filled in (`resolve_config`). `inputs` (e.g. the SAM weights' and split file's digests) joins what
  the run records as its identity in OUT_DIR/run.json, with the config, the cache and the patients: a rerun with
  another identity is refused, naming the field. One process at a time trains in OUT_DIR (OUT_DIR/.lock).
  `stop_after_steps` ends the run early as if it had been killed after that many steps (for tests of resumption);
  `sync_every_steps` is how often the host reads the losses back (core.SYNC_EVERY_STEPS by default). `method`
  makes the trainer's method (HeadTraining's arguments; `train/semi.py` passes its own), HeadTraining by default.
  """
  from autosam_jax.outputs import check_output_path

  check_output_path(out_dir)
  with contextlib.ExitStack() as stack:  # holds OUT_DIR's lock, once taken, to the end
    return _train(config, cache_dir, head_factory, out_dir, labeled_patients, val_patients, progress=progress,
                  stop_after_steps=stop_after_steps, inputs=inputs, stack=stack, sync_every_steps=sync_every_steps,
                  method=method or HeadTraining)


def _train(config, cache_dir, head_factory, out_dir, labeled_patients, val_patients, *, progress, stop_after_steps,
           inputs, stack, sync_every_steps, method) -> dict[str, Any]:
  from autosam_jax.features.cache import FeatureCache, cache_label_table
  from autosam_jax.memory import require_memory
  from autosam_jax.outputs import take_output
  from autosam_jax.train.core import PREFETCH_BATCHES, SYNC_EVERY_STEPS, fit, placement

  out_dir = Path(out_dir)
  cache = FeatureCache(cache_dir)
  cache.check_files()
  labels = cache_label_table(cache)
  config = resolve_config(config, labels, str(Path(cache_dir)))
  depends_on = cache.manifest["depends_on"]
  views = int(depends_on.get("views", 0))
  preprocess = depends_on.get("preprocess")  # saved with the model, for predict
  record = model_record(labels, depends_on, config)
  mode = (preprocess or {}).get("mode")
  if mode not in (None, config.variant):
    warn_main(f"{cache_dir}: the cache was computed under the {mode} protocol but the config trains the "
              f"{config.variant} variant; evaluate and predict refuse such a model with this cache (precompute "
              f"--mode {config.variant}, or set variant={mode})")
  labeled = sorted({(it["case_id"], it["slice_index"]) for it in cache.items
                    if it["patient_id"] in set(labeled_patients) and it["view"] == 0})
  if not labeled:
    raise DataError(f"{cache_dir}: no cached slices of the labeled patients {labeled_patients[:5]}")
  val_indices = cache.indices(val_patients, views=(0,))
  slice_views = views if set(labeled_patients) <= set(depends_on.get("view_patients", [])) else 0
  views_of_slices = view_table(cache, labeled, slice_views)
  refusal = kind_refusal(str(cache_dir), depends_on, config)
  if refusal is not None:
    raise refusal
  if config.augment != "none" and cache_kind(depends_on) != "images":
    raise DataError(f"{cache_dir}: augment {config.augment!r} transforms model images, but this cache holds "
                    f"{CACHE_KINDS[cache_kind(depends_on)]}; augment 'none' (SAM heads and LoRA runs are augmented "
                    "through the cache's views: precompute --views K)")
  # A batch beyond the data holds nothing more (its other rows are zero-weight padding, which neither the loss nor
  # validation counts): it runs as big as the data, so batch_size=100000 on 244 slices takes 244 rows of memory, not
  # 100000 (tens of GB). An epoch is still one step of every slice; the run records the batch_size it was given.
  rows = min(config.batch_size, max(len(views_of_slices), len(val_indices)))
  # the host side of a step: the batches the loader keeps ready, the one being stacked, and the device copy, for
  # every process's rows
  require_memory((PREFETCH_BATCHES + 2) * rows * example_bytes(cache, int(views_of_slices[0, 0])),
                 f"batch size {config.batch_size}", "choose a smaller batch_size")
  identity = run_identity(config, cache, labeled_patients, val_patients, inputs)

  head = head_factory(config)
  where = placement(rows)
  # Everything checked: from here on the run writes.
  take_output(stack, out_dir, "train", identity, main=where.main)
  method = method(config, cache, views_of_slices, val_indices, head, where, out_dir, preprocess, record,
                  batch_rows=rows)
  options = LoopOptions(epochs=config.epochs, batch_size=rows,
                        checkpoint_every_steps=config.checkpoint_every_steps,
                        sync_every_steps=sync_every_steps or SYNC_EVERY_STEPS, progress=progress,
                        description="training", stop_after_steps=stop_after_steps,
                        kill_points=KillPoints("train.step", "train.epoch_saved"))
  return fit(method, out_dir, options, where)


# What a saved model's checksums.json covers (written by save_model, verified by load_head)
MODEL_FILES = ("state", "train_config.json", "preprocess.json", "model.json")


def save_model(directory: Path, params, frozen, config: TrainConfig, preprocess: dict[str, Any] | None = None,
               record: dict[str, Any] | None = None) -> None:
  """The trained head: its parameters and frozen parts as an orbax checkpoint (of a LoRA model, its factors and head:
  not the encoder's base weights), plus the training config and (when
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
    from autosam_jax.models.trained import saved_part

    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(staging / "state", {"params": nnx.to_pure_dict(params),
                                            "frozen": saved_part(nnx.to_pure_dict(frozen), config)})
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
  """The model a config trains (`models.trained.build_model`), with a UNet's encoder copied from its SimCLR
  pretraining when `config.init_encoder` names one."""
  from autosam_jax.models.trained import build_model as build_architecture

  model = build_architecture(config, sam, rngs=rngs)
  if config.head == "unet" and config.init_encoder:
    from autosam_jax.train.simclr import load_pretrained_encoder
    load_pretrained_encoder(model, config.init_encoder)
  return model


def load_head(model_dir: str | os.PathLike, sam) -> tuple[Any, TrainConfig]:
  """A trained head saved by `save_model` (final_model/ or best_model/ of a run), with its training config.

  `sam` (the converted SAM the run started from, an NNX `Sam`) fixes the head's architecture; None for a UNet.
  """
  from autosam_jax.checksums import verify_checksums
  from autosam_jax.models.trained import read_train_config, restore_head

  model_dir = Path(model_dir).absolute()
  if not (model_dir / "train_config.json").is_file():
    raise DataError(f"{model_dir / 'train_config.json'}: missing; give a run's final_model/ or best_model/ directory")
  verify_checksums(model_dir, DataError, "train the model again (rerun the train command into a new --out)")
  config = read_train_config(model_dir)  # after the checksums: a damaged config is reported as damaged
  return restore_head(model_dir, config, sam), config


