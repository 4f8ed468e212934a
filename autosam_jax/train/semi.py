"""Semi-supervised training of a head on cached features (TrainConfig semi=true): the labeled patients' slices as in
supervised training, plus the fold's other training patients without their labels, in the same steps.

The encoder is frozen, so every view an unlabeled slice is seen through is computed once, by precompute: its clean
features (view 0, the "weak" view) and S strong views (views -1..-S, `precompute --strong-views S`: brightness,
gamma and noise only, so the slice's pixels stay in place). Each step takes a batch of labeled examples (one cached
view each, as supervised training) and `semi_ratio` unlabeled slices per labeled one, and minimises

  supervised loss (CE + soft Dice) + w(t) * (L_strong + L_fp) / 2

where the pseudo-labels are the arg max of an EMA teacher's softmax on the clean features, kept where the teacher's
confidence reaches `semi_threshold` (FixMatch's weak-to-strong consistency; the teacher as in mean teacher), L_strong
is the student's cross-entropy against them on a strong view mixed by CutMix with the strong view of the example's
next unlabeled slice (the pseudo-labels and their confidence mixed by the same box), and L_fp the student's
against them on the clean features with channel dropout (UniMatch's feature perturbation). With semi_sam_boxes
(SemiSAM's idea, cheap here because the features are cached), the frozen SAM decoder is prompted, per unlabeled slice
and class, with the box around the student's own prediction of the class, and a pseudo-label is kept only where
SAM's masks agree with it (pixels no mask covers count as background). w(t) rises as
`semi_weight * exp(-5 (1 - t)^2)` over `semi_ramp_epochs`. Both cross-entropies are means over every real pixel of the
unlabeled slices (an unconfident pixel adds 0), so padding rows change nothing.

The unlabeled slices are read only through their features and their pixel-validity mask (the target grid's overlap
with the image, which preprocessing's geometry gives): never through their cached targets.

Resumption is exact: the teacher is part of the train state; which unlabeled slices and strong views a step takes is
a function of (seed, epoch, position in the epoch), so the checkpointed loader position continues both streams; the
ramp and the EMA decay are functions of the step.

A step's random draws (CutMix boxes, dropout masks) come from fold_in(key(seed), step) and each unlabeled slice's row
number, and CutMix mixes within one example's unlabeled slices, so a batch padded to another device count gives the
same losses."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from autosam_jax.errors import DataError
from autosam_jax.train.core import all_finite
from autosam_jax.train.loop import (HIGH_RES_FIELDS, HeadProgram, HeadTraining, _example, _high_res, _logits, to_batch,
                                    view_table)

# The CutMix box: its area a fraction of the slice drawn from this range, its aspect ratio log-uniform in
# [1 / CUTMIX_ASPECT, CUTMIX_ASPECT] (UniMatch's ranges), its corners on the embedding's grid.
CUTMIX_AREA = (0.02, 0.4)
CUTMIX_ASPECT = 1 / 0.3
_UNLABELED_PREFIXES = ("weak_", "strong_", "unlabeled_")


def unlabeled_table(cache, cache_dir, patients: list[str], labeled: list[str], val: list[str]) -> np.ndarray:
  """(slices, 1 + S) cache indices of the unlabeled patients' slices: column 0 the clean view, then the strong views
  -1..-S. Refuses, naming the fix, patients that are labeled or validation patients too, patients the cache does not
  hold, and a cache without strong views of them."""
  if not patients:
    raise DataError(f"{cache_dir}: semi-supervised training needs unlabeled patients, and every training patient of "
                    "the fold is labeled; train with fewer labeled patients (--tr-size), cache scans without labels "
                    "too (precompute --unlabeled DIR), or leave semi out")
  for others, what in ((labeled, "labeled"), (val, "validation")):
    both = sorted(set(patients) & set(others))
    if both:
      raise DataError(f"{cache_dir}: patients {both[:5]} are given as unlabeled and as {what} patients; give each "
                      "patient one role")
  depends_on = cache.manifest["depends_on"]
  strong = int(depends_on.get("strong_views", 0))
  present = {it["patient_id"] for it in cache.items}
  missing = sorted(set(patients) - present)
  if missing:
    raise DataError(f"{cache_dir}: holds no slices of the unlabeled patients {missing[:5]}; precompute the cache "
                    "with them (a split file whose training patients include them)")
  with_views = {it["patient_id"] for it in cache.items if it["view"] < 0}
  without = sorted(set(patients) - with_views)
  if not strong or without:
    whose = f" of the unlabeled patients {without[:5]}" if strong else ""
    raise DataError(f"{cache_dir}: holds no strong views{whose}, which semi-supervised training learns from; "
                    "precompute it again with --strong-views 4 and --splits naming them as training patients")
  wanted = set(patients)
  slices = sorted({(it["case_id"], it["slice_index"]) for it in cache.items
                   if it["patient_id"] in wanted and it["view"] == 0})
  return view_table(cache, slices, (0, *range(-1, -strong - 1, -1)))


def ramp(step, ramp_steps: int):
  """The unlabeled loss's share at `step`: exp(-5 (1 - t)^2), t = step / ramp_steps clipped to [0, 1]."""
  import jax.numpy as jnp

  if ramp_steps <= 0:
    return jnp.float32(1.0)
  t = jnp.clip(step.astype(jnp.float32) / ramp_steps, 0.0, 1.0)
  return jnp.exp(-5.0 * (1.0 - t) ** 2)


def ema_decay(step, ema: float):
  """The teacher's decay at `step`: min(ema, (step + 1) / (step + 10))."""
  import jax.numpy as jnp

  t = step.astype(jnp.float32)
  return jnp.minimum(jnp.float32(ema), (t + 1.0) / (t + 10.0))


def cutmix_boxes(keys, grid: int, probability: float):
  """Per key: (y0, y1, x0, x1) of a box on a grid x grid lattice in [0, 1] coordinates (all 0 where no box is
  drawn, with 1 - `probability`)."""
  import jax
  import jax.numpy as jnp

  def one(key):
    k_use, k_area, k_aspect, k_y, k_x = jax.random.split(key, 5)
    area = jax.random.uniform(k_area, minval=CUTMIX_AREA[0], maxval=CUTMIX_AREA[1])
    aspect = jnp.exp(jax.random.uniform(k_aspect, minval=-np.log(CUTMIX_ASPECT), maxval=np.log(CUTMIX_ASPECT)))
    h, w = jnp.minimum(jnp.sqrt(area * aspect), 1.0), jnp.minimum(jnp.sqrt(area / aspect), 1.0)
    cy, cx = jax.random.uniform(k_y), jax.random.uniform(k_x)
    snap = lambda v: jnp.round(jnp.clip(v, 0.0, 1.0) * grid) / grid
    box = jnp.stack([snap(cy - h / 2), snap(cy + h / 2), snap(cx - w / 2), snap(cx + w / 2)])
    return jnp.where(jax.random.uniform(k_use) < probability, box, jnp.zeros(4))

  return jax.vmap(one)(keys)


def box_masks(boxes, size: int):
  """(N, size, size) bool: the pixels of a size x size map whose centres lie in each box."""
  import jax.numpy as jnp

  centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
  rows = (centres[None] >= boxes[:, 0:1]) & (centres[None] < boxes[:, 1:2])
  cols = (centres[None] >= boxes[:, 2:3]) & (centres[None] < boxes[:, 3:4])
  return rows[:, :, None] & cols[:, None, :]


def _next_in_example(x, ratio: int):
  """Row (b, r) of the flattened (B * ratio, ...) array replaced by row (b, (r + 1) % ratio): each unlabeled slice's
  CutMix partner is the next of the same example's slices."""
  import jax.numpy as jnp

  grouped = x.reshape(-1, ratio, *x.shape[1:])
  return jnp.roll(grouped, -1, axis=1).reshape(x.shape)


def _mix(x, partner, mask):
  """x where `mask` is off, the partner's values inside the box (mask (N, h, w), broadcast over channels)."""
  import jax.numpy as jnp

  mask = mask.reshape(*mask.shape, *([1] * (x.ndim - mask.ndim)))
  return jnp.where(mask, partner, x)


def masked_cross_entropy(logits, labels, keep, pixels):
  """sum over pixels of keep * -log softmax(logits)[label], divided by `pixels` (the real pixels' number)."""
  import jax
  import jax.numpy as jnp

  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.sum(picked * keep) / pixels


@dataclasses.dataclass(frozen=True)
class SemiProgram(HeadProgram):
  """The semi-supervised step (see the module's docstring): the student's gradient of the supervised and the
  ramped unlabeled loss, Adam, then the teacher's EMA update. Hashable: runs with equal options share the compiled
  step. The frozen part is {"head": the head's, "sam": SAM's prompt encoder and mask decoder (`BoxPrompted`; empty
  without `sam_graphdef`)}; `input_scale` is the encoder's input pixels per target pixel (for the boxes)."""
  ratio: int = 2
  threshold: float = 0.95
  weight: float = 1.0
  ramp_steps: int = 0
  ema: float = 0.99
  feature_dropout: float = 0.5
  cutmix: float = 0.5
  sam_graphdef: Any = None
  input_scale: float = 4.0
  channels: int = 256  # the embedding's channels (a LoRA model's: its encoder's output), for the feature dropout

  def sam_labels(self, sam_state, features: dict, predicted):
    """(N, T, T) labels of SAM's masks prompted with each class's box around `predicted` (N, T, T): the class of the
    highest positive mask logit, background where none is positive (or where no box could be drawn)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sam = nnx.merge(self.sam_graphdef, sam_state)
    count, size = predicted.shape[0], predicted.shape[1]
    classes = jnp.arange(1, sam.num_classes)
    masks = predicted[:, None] == classes[None, :, None, None]  # (N, K, T, T)
    rows, cols = jnp.any(masks, axis=3), jnp.any(masks, axis=2)  # (N, K, T)
    first = lambda a: jnp.argmax(a, axis=-1)
    last = lambda a: size - 1 - jnp.argmax(a[..., ::-1], axis=-1)
    boxes = jnp.stack([first(cols), first(rows), last(cols), last(rows)], axis=-1).astype(jnp.float32)
    boxes = boxes * self.input_scale  # target pixels -> the encoder's input frame
    present = jnp.any(rows, axis=-1)  # (N, K)
    slots = sam.num_classes - 1
    repeated = jax.tree.map(lambda a: jnp.repeat(a, slots, axis=0), features)
    sparse, dense = sam.prompt_encoder(None, boxes.reshape(count * slots, 4), None)
    low_res, _ = sam.mask_decoder(repeated["embedding"], sam.prompt_encoder.get_dense_pe(), sparse, dense, False,
                                  high_res=repeated.get("high_res"))
    logits = low_res[..., 0].reshape(count, slots, *low_res.shape[1:3])
    if logits.shape[2] != size:
      logits = jax.image.resize(logits, (count, slots, size, size), "bilinear", antialias=False)
    logits = jnp.where(present[:, :, None, None], logits, -jnp.inf)
    best = jnp.max(logits, axis=1)
    return jnp.where(best > 0, 1 + jnp.argmax(logits, axis=1), 0)

  def __call__(self, state, frozen, batch):
    import jax
    import jax.numpy as jnp
    import optax

    from autosam_jax.train.losses import segmentation_loss
    from autosam_jax.train.schedules import learning_rate_of

    step = state["step"]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), step), 2)
    size = batch["target"].shape[1]
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # (B, ratio, ...) -> (B * ratio, ...)
    weak = {k[len("weak_"):]: flat(v) for k, v in batch.items() if k.startswith("weak_")}
    strong = {k[len("strong_"):]: flat(v) for k, v in batch.items() if k.startswith("strong_")}
    pixel_weight = flat(batch["unlabeled_weight"])
    count = pixel_weight.shape[0]
    high_res = lambda maps: [maps[k] for k in HIGH_RES_FIELDS] if HIGH_RES_FIELDS[0] in maps else None

    head_frozen = frozen["head"]
    teacher_logits = _logits(self.graphdef, state["teacher"], head_frozen, weak["embedding"], size,
                             high_res=high_res(weak))
    probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
    pseudo, keep = jnp.argmax(probs, axis=-1), (jnp.max(probs, axis=-1) >= self.threshold) * pixel_weight
    if self.sam_graphdef is not None:  # SemiSAM: keep the pseudo-labels that SAM, prompted by the student's boxes,
      # agrees with
      student = _logits(self.graphdef, state["params"], head_frozen, weak["embedding"], size, high_res=high_res(weak))
      predicted = jnp.where(pixel_weight > 0, jnp.argmax(jax.lax.stop_gradient(student), axis=-1), 0)
      sam_features = {"embedding": weak["embedding"], **({"high_res": high_res(weak)} if high_res(weak) else {})}
      keep = keep * (self.sam_labels(frozen["sam"], sam_features, predicted) == pseudo)
    pixels = jnp.maximum(jnp.sum(pixel_weight), 1.0)

    # one key per unlabeled row (its number in the global batch): the same draws however the batch is padded
    rows = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(count))
    pairs = jax.vmap(lambda k: jax.random.split(k, 2))(rows)
    box_keys, drop_keys = pairs[:, 0], pairs[:, 1]
    grid = min(weak["embedding"].shape[1], size)  # the coarser of the features' (or inputs') grid and the target's
    boxes = cutmix_boxes(box_keys, grid, self.cutmix if self.ratio > 1 else 0.0)
    mixed = {name: _mix(x, _next_in_example(x, self.ratio), box_masks(boxes, x.shape[1]))
             for name, x in strong.items()}
    in_box = box_masks(boxes, size)
    mixed_pseudo = _mix(pseudo, _next_in_example(pseudo, self.ratio), in_box)
    mixed_keep = _mix(keep, _next_in_example(keep, self.ratio), in_box)
    kept = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - self.feature_dropout, (1, 1, self.channels)))(drop_keys)
    scale = kept.astype(jnp.float32) / (1.0 - self.feature_dropout)
    share = self.weight * ramp(step, self.ramp_steps)

    def loss(params):
      logits = _logits(self.graphdef, params, head_frozen, batch["embedding"], size, high_res=_high_res(batch))
      supervised, _ = segmentation_loss(logits, batch["target"], batch["weight"])
      strong_logits = _logits(self.graphdef, params, head_frozen, mixed["embedding"], size,
                              high_res=high_res(mixed))
      fp_logits = _logits(self.graphdef, params, head_frozen, weak["embedding"], size, high_res=high_res(weak),
                          feature_scale=scale)
      unlabeled = 0.5 * (masked_cross_entropy(strong_logits, mixed_pseudo, mixed_keep, pixels)
                         + masked_cross_entropy(fp_logits, pseudo, keep, pixels))
      return supervised + share * unlabeled, (supervised, unlabeled)

    (total, _), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
    tx = self.optimizer(learning_rate_of(state["opt_state"]))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = ema_decay(step, self.ema)
    teacher = jax.tree.map(lambda t, p: decay * t + (1.0 - decay) * p, state["teacher"], params)
    new_state = {**state, "params": params, "opt_state": opt_state, "teacher": teacher, "step": step + 1}
    return new_state, {"loss": total, "finite": all_finite(total, grads)}


def box_prompted(sam, num_classes: int):
  """SAM's prompt encoder and mask decoder, frozen, as one module (SemiSAM's check of the pseudo-labels)."""
  from flax import nnx

  class BoxPrompted(nnx.Module):
    def __init__(self):
      self.prompt_encoder, self.mask_decoder, self.num_classes = sam.prompt_encoder, sam.mask_decoder, num_classes

  return BoxPrompted()


class SemiTraining(HeadTraining):
  """`HeadTraining` with an unlabeled stream: each example id of an epoch (epoch * L + position, L the labeled
  slices) names a labeled view, as supervised training draws it, and `semi_ratio` unlabeled slices, the next ones of
  a seeded permutation of all unlabeled slices that runs on across epochs, each with a strong view drawn from
  (seed, epoch, position). The train state adds the teacher (a copy of the head's trainable parameters); the
  frozen part is {"head": the head's, "sam": SAM's prompt encoder and mask decoder with semi_sam_boxes, else {}}."""

  def __init__(self, config, cache, views_of_slices, val_indices, head, where, out_dir, preprocess, record, *,
               batch_rows: int, unlabeled: np.ndarray, sam=None):
    from flax import nnx

    super().__init__(config, cache, views_of_slices, val_indices, head, where, out_dir, preprocess, record,
                     batch_rows=batch_rows)
    self.unlabeled = unlabeled
    steps_per_epoch = -(-len(views_of_slices) // batch_rows)
    first = cache[int(unlabeled[0, 0])]
    sam_graphdef, sam_state, scale = None, {}, 4.0
    if config.semi_sam_boxes:
      sam_graphdef, sam_state = nnx.split(box_prompted(sam, config.num_classes))
      scale = sam.config.image_size / np.shape(first["target"])[0]
    self.frozen = {"head": self.frozen, "sam": sam_state}
    channels = np.shape(first["embedding"])[-1]
    if config.lora:  # the cache holds encoder inputs: the channels of the adapted encoder's embedding
      import jax
      from autosam_jax.models.encoders import encoder_features

      probe = jax.ShapeDtypeStruct((1, *np.shape(first["embedding"])), np.float32)
      channels = jax.eval_shape(lambda x: encoder_features(head.encoder, x)["embedding"], probe).shape[-1]
    self.program = SemiProgram(self.program.graphdef, config.augment, config.seed, ratio=config.semi_ratio,
                               threshold=config.semi_threshold, weight=config.semi_weight,
                               ramp_steps=config.semi_ramp_epochs * steps_per_epoch, ema=config.semi_ema,
                               feature_dropout=config.semi_feature_dropout, cutmix=config.semi_cutmix,
                               sam_graphdef=sam_graphdef, input_scale=float(scale), channels=int(channels))
    self.maps = tuple(f for f in self.fields if f not in ("target", "valid"))
    ratio = config.semi_ratio
    self.padding = {**self.padding,
                    **{f"{stream}{m}": np.zeros((ratio, *np.shape(first[m])), np.float32)
                       for stream in ("weak_", "strong_") for m in self.maps},
                    "unlabeled_weight": np.zeros((ratio, *np.shape(first["valid"])), np.float32)}
    self._labeled_orders: dict[int, np.ndarray] = {}
    self._laps: dict[int, np.ndarray] = {}

  def initial_state(self, tx) -> dict[str, Any]:
    import jax

    state = super().initial_state(tx)
    return {**state, "teacher": jax.tree.map(lambda x: np.array(x), self.params)}

  def end_epoch(self, end):
    return super().end_epoch(dataclasses.replace(end, frozen=end.frozen["head"]))

  def finish(self, state, frozen, last):
    return super().finish(state, frozen["head"], last)

  def _labeled_order(self, epoch: int) -> np.ndarray:
    if epoch not in self._labeled_orders:  # deterministic: loader threads computing it at once agree
      self._labeled_orders[epoch] = super().epoch_order(epoch)
    return self._labeled_orders[epoch]

  def _permutation(self, lap: int) -> np.ndarray:
    """The order of the unlabeled slices in their `lap`-th pass (kept for the latest few passes)."""
    order = self._laps.get(lap)
    if order is None:  # deterministic: loader threads computing it at once agree
      order = np.random.default_rng([self.train_config.seed, lap, 13]).permutation(len(self.unlabeled))
      self._laps[lap] = order
      for old in sorted(self._laps)[:-4]:
        self._laps.pop(old, None)
    return order

  def epoch_order(self, epoch: int) -> np.ndarray:
    length = len(self._labeled_order(epoch))
    return epoch * length + np.arange(length, dtype=np.int64)

  def example(self, index: int) -> dict[str, np.ndarray]:
    length = len(self.views_of_slices)
    epoch, position = divmod(index, length)
    example = _example(self.cache, self.padding, int(self._labeled_order(epoch)[position]), self.fields)
    ratio, strong_views = self.train_config.semi_ratio, self.unlabeled.shape[1] - 1
    counters = index * ratio + np.arange(ratio)
    chosen = np.random.default_rng([self.train_config.seed, epoch, position, 17]).integers(1, strong_views + 1, ratio)
    weak, strong = [], []
    for counter, view in zip(counters, chosen):
      lap, at = divmod(int(counter), len(self.unlabeled))
      row = self.unlabeled[self._permutation(lap)[at]]
      weak.append(self.cache[int(row[0])])
      strong.append(self.cache[int(row[view])])
    for stream, items in (("weak_", weak), ("strong_", strong)):
      example.update({f"{stream}{m}": np.stack([it[m] for it in items]) for m in self.maps})
    example["unlabeled_weight"] = np.stack([np.asarray(it["valid"], np.float32) for it in weak])
    return example

  def collate(self, examples):
    rows = self.where.rows[1] - self.where.rows[0]
    batch = to_batch({k: v for k, v in examples.items() if not k.startswith(_UNLABELED_PREFIXES)}, rows)
    for name, values in examples.items():
      if name.startswith(_UNLABELED_PREFIXES):
        values = np.asarray(values, np.float32)
        missing = rows - len(values)
        batch[name] = np.concatenate([values, np.zeros((missing, *values.shape[1:]), np.float32)]) if missing \
            else values
    return batch


def train_semi(config, cache_dir, head_factory, out_dir, labeled_patients: list[str], val_patients: list[str],
               unlabeled_patients: list[str], *, inputs: dict[str, Any] | None = None, sam=None,
               **options) -> dict[str, Any]:
  """`loop.train` of a semi-supervised config: the unlabeled patients checked against the cache (every refusal
  before anything is written) and recorded in the run's identity; `options` as `loop.train` takes them. `sam` (the
  converted SAM the head starts from): its prompt encoder and mask decoder, for semi_sam_boxes."""
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.memory import require_memory
  from autosam_jax.outputs import check_output_path
  from autosam_jax.train.core import PREFETCH_BATCHES
  from autosam_jax.train.loop import example_bytes, train

  if not config.semi:
    raise ValueError("train_semi trains semi-supervised configs (semi=true)")
  check_output_path(out_dir)
  cache = FeatureCache(cache_dir)
  # the cache's scans without labels (precompute --unlabeled) are unlabeled patients of every run on it
  scans = cache.manifest["depends_on"].get("unlabeled", {}).get("patients", [])
  unlabeled_patients = sorted({*unlabeled_patients, *scans})
  table = unlabeled_table(cache, Path(cache_dir), unlabeled_patients, labeled_patients, val_patients)
  rows = min(config.batch_size, len(table))  # an estimate: the loop sizes the batch by the labeled slices
  per_example = (1 + 2 * config.semi_ratio) * example_bytes(cache, int(table[0, 0]))  # a labeled + 2 x ratio maps
  require_memory((PREFETCH_BATCHES + 2) * rows * per_example,
                 f"batch size {config.batch_size} with semi_ratio {config.semi_ratio}",
                 "choose a smaller batch_size or semi_ratio")
  identity = {**(inputs or {}), "unlabeled_patients": sorted(unlabeled_patients)}
  if config.semi_sam_boxes:
    if sam is None:
      raise ValueError("semi_sam_boxes prompts SAM's decoder: give train_semi the SAM (sam=load_sam(weights))")
    if cache.manifest["depends_on"].get("preprocess", {}).get("mode") != "improved":
      raise DataError(f"{cache_dir}: semi_sam_boxes prompts SAM on the improved protocol's grid (the faithful "
                      "targets are a 224-pixel resize of another frame); precompute with --mode improved, or leave "
                      "semi_sam_boxes out")
  method = functools.partial(SemiTraining, unlabeled=table, sam=sam)
  return train(config, cache_dir, head_factory, out_dir, labeled_patients, val_patients, inputs=identity,
               method=method, **options)
