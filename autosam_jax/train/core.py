"""The one training loop every method runs through: state, jitted step, grain batches, checkpoints and exact
resumption, metrics.jsonl, curves.

A method (`Method`: the heads and the UNet in `loop`, SimCLR in `simclr`) supplies
  - what is trained: `params` (the trainable part) and `frozen` (passed to every step, never updated), and a
    `StepProgram`, the jit-compiled part: its optimizer direction and loss, or a whole step of its own;
  - its batches: the example ids of each epoch in order (`epoch_order`) and one example by id (`example`), which
    one grain pipeline (prefetching in threads, resumable mid-epoch) loads and batches;
  - its learning rate per step (`learning_rate`), which the loop writes into the optimizer state whenever it changes;
  - what an epoch's end does (`end_epoch`: the epoch's row of metrics, validation, schedule decisions, whether to
    checkpoint), what its checkpoints record beyond the loop's position (`meta`, `restore`), what the end of the run
    saves (`finish`), and its curves (`plot`).

The train state is a plain pytree the method makes (`Method.initial_state`): by default {"params", "opt_state",
"step"}; a method may add parts of its own (a teacher's weights, a queue), which the checkpoints save and restore
with the rest. The loop itself needs only "step" and "opt_state" (which holds the learning rate,
`schedules.injected_optimizer`); a run of equal programs in one process reuses one compiled step. The loop reads
nothing back from the device at each step: the step returns its loss and folds "every step so far was finite" into a
device-side guard (the first non-finite step, 0 while there is none), and the host reads both every
`sync_every_steps` steps, before every checkpoint and at every epoch's end. A non-finite step raises
`NonFiniteLossError` naming it; its row and those after it are never written, nor is any checkpoint after it (each
checkpoint is written only once the guard has been read clean).

Under jax.distributed the "data" mesh spans every process's devices: each process loads only its rows of every
global batch, whose composition does not depend on the number of processes; the state is replicated, checkpoints
are saved by all processes together, and process 0 alone writes metrics, config.json and curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autosam_jax.errors import NonFiniteLossError

# The host reads the losses and the finite guard every this many steps (and at checkpoints and epoch ends); in
# between, steps are dispatched without waiting for the device.
SYNC_EVERY_STEPS = 20
# The batch pipeline: loader threads, and batches kept ready ahead of the step.
LOADER_THREADS = 2
PREFETCH_BATCHES = 2

# What every checkpoint's JSON metadata holds (a method's `meta` adds to it).
CHECKPOINT_META = ("epoch", "step", "iterator_state", "epoch_losses")


@dataclasses.dataclass(frozen=True)
class KillPoints:
  """The fault-test points (`faults.kill_point`) a method's loop passes: `step` after each step (and its mid-epoch
  checkpoint, if one was due), `epoch_saved` (if any) after each epoch-end checkpoint. With
  `last_step_after_checkpoint`, an epoch's last step passes `step` only after the epoch's end (and checkpoint)."""
  step: str = "train.step"
  epoch_saved: str | None = "train.epoch_saved"
  last_step_after_checkpoint: bool = False


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  epochs: int
  batch_size: int  # global: every process's rows together
  checkpoint_every_steps: int = 0  # 0: only where the method's end_epoch asks
  sync_every_steps: int = SYNC_EVERY_STEPS
  progress: bool = True
  description: str = "training"  # the progress bar's
  stop_after_steps: int | None = None  # end as if killed after this many steps (tests of resumption)
  kill_points: KillPoints = KillPoints()


def all_finite(loss, grads):
  """Whether the loss and every gradient are finite (a device scalar)."""
  import jax
  import jax.numpy as jnp

  return jnp.isfinite(loss) & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))


@dataclasses.dataclass(frozen=True)
class StepProgram:
  """The jit-compiled part of a method. Hashable (a frozen dataclass of static values: graph definitions, configs,
  seeds), so every run with an equal program reuses the compiled step.

  The default step: `prepare` the batch (e.g. augment it with a key from the step), the gradient of `loss` with
  respect to the trainable params, an update by `optimizer()` (whose learning rate is in its state), and whether
  the loss and gradients were finite. A method with another kind of step (several losses, parts trained in turn)
  overrides `__call__`, returning the new state and at least {"loss", "finite"}."""

  def optimizer(self, learning_rate):
    """The optax transformation at `learning_rate`, built with `schedules.injected_optimizer`: the rate is in its
    state, where the loop sets it (the step updates with the state's rate, whatever the value given here)."""
    raise NotImplementedError

  def prepare(self, batch: dict[str, Any], step) -> dict[str, Any]:
    return batch

  def loss(self, params, frozen, batch: dict[str, Any]):
    """(scalar loss, dict of auxiliary scalars)."""
    raise NotImplementedError

  def __call__(self, state, frozen, batch):
    import jax
    import optax

    from autosam_jax.train.schedules import learning_rate_of

    batch = self.prepare(batch, state["step"])
    (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(state["params"], frozen, batch)
    tx = self.optimizer(learning_rate_of(state["opt_state"]))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, **aux, "finite": all_finite(loss, grads)}


@functools.cache
def _compiled_step(program: StepProgram):
  """The jit-compiled step of `program`, one per distinct program: equal programs (runs of one architecture in a
  process) share it and its compilation. The program is closed over, not a static argument, so that it is hashed
  once per run here instead of at every step's call (a vit_b graph definition takes milliseconds). State and guard
  are donated; the guard becomes the new step's number if it is the first non-finite one."""
  import jax
  import jax.numpy as jnp

  def step(state, guard, frozen, batch):
    state, metrics = program(state, frozen, batch)
    guard = jnp.where((guard == 0) & ~metrics["finite"], state["step"], guard)
    return state, guard, metrics["loss"]

  return jax.jit(step, donate_argnums=(0, 1))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live: the state replicated over the "data" mesh, each global batch split along it, this
  process holding rows [rows[0], rows[1]) of every batch. `batch_size` is the global batch on the devices: the
  run's batch rounded up to a multiple of the device count, the added rows zero-weight padding."""
  mesh: Any
  replicated: Any
  data: Any
  rows: tuple[int, int]
  batch_size: int

  @property
  def main(self) -> bool:
    import jax

    return jax.process_index() == 0

  def put(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """The global batch of the processes' rows."""
    import jax

    return {k: jax.make_array_from_process_local_data(self.data, v, (self.batch_size, *v.shape[1:]))
            for k, v in batch.items()}

  def replicate(self, tree):
    from autosam_jax.parallel import replicate

    return replicate(tree, self.replicated)


def placement(batch_size: int) -> Placement:
  """The placement of a run with global batches of `batch_size` examples: on the devices, batches of the next
  multiple of the device count (a batch of 4 on 8 devices: 4 examples and 4 zero-weight rows, one row per device),
  so every batch size runs on every mesh with the losses of one device."""
  from jax.sharding import NamedSharding, PartitionSpec

  from autosam_jax.parallel import data_mesh, local_rows

  mesh = data_mesh()
  on_devices = -(-batch_size // mesh.devices.size) * mesh.devices.size
  data = NamedSharding(mesh, PartitionSpec("data"))
  return Placement(mesh, NamedSharding(mesh, PartitionSpec()), data, local_rows(data, on_devices), on_devices)


def local_indices(order: np.ndarray, batch_size: int, rows: tuple[int, int], width: int | None = None) -> np.ndarray:
  """Rows [lo, hi) of each global batch of `batch_size` taken in `order`, batch after batch; -1 past its end and in
  the columns a batch is widened by to `width` (the batch on the devices, `Placement.batch_size`)."""
  steps = -(-len(order) // batch_size)
  padded = np.full(steps * batch_size, -1, np.int64)
  padded[:len(order)] = order
  batches = padded.reshape(steps, batch_size)
  if width is not None and width > batch_size:
    batches = np.concatenate([batches, np.full((steps, width - batch_size), -1, np.int64)], axis=1)
  return batches[:, rows[0]:rows[1]].ravel()


def batch_pipeline(order: np.ndarray, example: Callable[[int], dict], padding: dict, batch_size: int,
                   rows: tuple[int, int], collate: Callable[[dict], dict] | None = None, iterator_state=None,
                   width: int | None = None):
  """A grain iterator over this process's rows of the global batches of `order` (example ids): each example
  loaded by `example(id)`, rows past the end of `order` `padding` (a zero-weight example, so every step has one
  shape and nothing recompiles), stacked and `collate`d in LOADER_THREADS threads, PREFETCH_BATCHES ahead of the
  step. `iterator_state` (a `get_state()` of an iterator over the same order) continues where that one stopped.
  `width`: the batch on the devices (`local_indices`)."""
  import grain

  local = local_indices(np.asarray(order), batch_size, rows, width)
  dataset = grain.MapDataset.source(local).map(lambda i: padding if i < 0 else example(int(i)))
  dataset = dataset.batch(rows[1] - rows[0])
  if collate is not None:
    dataset = dataset.map(collate)
  options = grain.ReadOptions(num_threads=LOADER_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
  iterator = iter(dataset.to_iter_dataset(options))
  if iterator_state is not None:
    iterator.set_state(iterator_state)
  return iterator


@dataclasses.dataclass
class EpochEnd:
  """What `Method.end_epoch` sees: the epoch, the steps done, this epoch's losses (all its steps, those before a
  resumption included), the learning rate of its last step, and the state (checked finite)."""
  epoch: int
  step: int
  losses: list[float]
  learning_rate: float
  state: Any
  frozen: Any


class Method:
  """What a training method supplies to `fit` (see the module's docstring). Attributes set by the method:
  `program` (a StepProgram), `params` and `frozen` (the initial trainable and frozen parts: for a method that trains
  adapters of a frozen encoder, the adapters and the encoder), `config` (a dict: config.json and each checkpoint's
  record), `padding` (a zero-weight example) and `diverged` (what went non-finite, in the error: "loss",
  "SimCLR loss")."""

  program: StepProgram
  params: Any
  frozen: Any = None
  config: dict[str, Any]
  padding: dict[str, np.ndarray]
  diverged: str = "loss"
  meta_keys: tuple[str, ...] = ()  # what `meta` adds to every checkpoint (a checkpoint without them is damaged)

  def initial_state(self, tx) -> dict[str, Any]:
    """The train state before the first step, for the optimizer `tx`: a dict with at least "step" (int32 0) and
    "opt_state" (`tx`'s state, where the loop sets the learning rate); the default step also reads "params"."""
    return {"params": self.params, "opt_state": tx.init(self.params), "step": np.int32(0)}

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The global order of the epoch's example ids (cut into batches of batch_size, the last one padded)."""
    raise NotImplementedError

  def example(self, index: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def collate(self, examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stacked batch of examples -> the arrays the step takes (in the loader's threads)."""
    return examples

  def learning_rate(self, epoch: int, step: int) -> float:
    """The learning rate of step number `step` (0-based), which lies in `epoch`; the value written to the metrics
    (the optimizer state gets it as float32)."""
    raise NotImplementedError

  def end_epoch(self, end: EpochEnd) -> tuple[dict[str, Any], bool]:
    """The epoch's row of metrics (written after the step rows) and whether to write a checkpoint now."""
    raise NotImplementedError

  def meta(self) -> dict[str, Any]:
    """What a checkpoint records beyond the loop's position (JSON)."""
    return {}

  def restore(self, meta: dict[str, Any]) -> None:
    """Takes back what `meta` recorded, from the checkpoint a resumed run starts from."""

  def finish(self, state, frozen, last: dict[str, Any]) -> dict[str, Any]:
    """At the end (also of a rerun of a finished run): saves what the run produces (from the final state and the
    placed frozen part); returns the result's fields. `last` is the last epoch's row."""
    return {}

  def plot(self, metrics_file: Path, png: Path) -> None:
    """Draws the curves of metrics.jsonl (process 0 only)."""


def read_rows(metrics_file: Path) -> list[dict[str, Any]]:
  return [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]


def save_figure(fig, png: Path) -> None:
  """`fig` as PNG, written beside and renamed into place; the figure is closed."""
  import matplotlib.pyplot as plt

  tmp = png.with_name(f".{png.name}.tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, png)


def figure(*args, **kwargs):
  """matplotlib's subplots, off-screen."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt.subplots(*args, **kwargs)


class MetricsLog:
  """OUT/metrics.jsonl: one JSON row per step and per epoch, written by process 0 only."""

  def __init__(self, path: Path, main: bool):
    self.path, self.main, self._file = Path(path), main, None

  def start(self) -> None:
    from autosam_jax.atomic import atomic_write_bytes

    if self.main:
      atomic_write_bytes(self.path, b"")

  def keep_until(self, step: int) -> None:
    """Drops the rows a killed run wrote after its checkpoint at `step`, so the file matches an uninterrupted
    run's."""
    from autosam_jax.atomic import atomic_write_bytes

    if self.main and self.path.exists():
      kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
      atomic_write_bytes(self.path, "".join(k + "\n" for k in kept).encode())

  def __enter__(self) -> "MetricsLog":
    self._file = open(self.path, "a") if self.main else open(os.devnull, "w")
    return self

  def __exit__(self, *exc) -> None:
    self._file.close()

  def write(self, row: dict[str, Any]) -> None:
    self._file.write(json.dumps(row) + "\n")

  def flush(self) -> None:
    self._file.flush()

  def last_epoch_row(self) -> dict[str, Any]:
    if not self.path.exists():
      return {}
    return next((r for r in reversed(read_rows(self.path)) if r["kind"] == "epoch"), {})


class _Steps:
  """The steps dispatched since the host last read the device: their losses (device scalars) and the guard."""

  def __init__(self, log: MetricsLog, bar, diverged: str, losses: list[float]):
    self.log, self.bar, self.diverged = log, bar, diverged
    self.pending: list[tuple[int, int, float, Any]] = []  # (step, epoch, learning rate, loss)
    self.losses = losses  # the current epoch's, read

  def add(self, step: int, epoch: int, learning_rate: float, loss) -> None:
    self.pending.append((step, epoch, learning_rate, loss))

  def sync(self, guard) -> None:
    """Reads the pending losses and the guard (one wait for the device); writes the step rows up to the first
    non-finite step, then raises NonFiniteLossError naming it."""
    import jax

    if not self.pending:
      return
    pending, self.pending = self.pending, []
    values = jax.device_get([guard, *(p[3] for p in pending)])
    bad = int(values[0])
    written = 0
    for (step, epoch, learning_rate, _), loss in zip(pending, values[1:]):
      if bad and step >= bad:
        raise NonFiniteLossError(f"non-finite {self.diverged} or gradient at step {bad} (epoch {epoch}); lower the "
                                 "learning rate or check the cache")
      self.losses.append(float(loss))
      self.log.write({"kind": "step", "step": step, "epoch": epoch, "loss": float(loss),
                      "lr": learning_rate})
      written += 1
    if self.bar is not None:
      self.bar.update(written)
      self.bar.set_postfix(epoch=pending[-1][1], loss=f"{self.losses[-1]:.3f}")


def fit(method: Method, out_dir: Path, options: LoopOptions, where: Placement) -> dict[str, Any]:
  """Trains (or resumes) `method` in OUT_DIR, whose lock the caller holds (`outputs.take_output`); returns
  `method.finish`'s fields with "seconds", "steps" and "last" (the last epoch's row), or {"stopped_at_step": n}.

  Writes OUT_DIR/config.json (a fresh run), metrics.jsonl, checkpoints/ (mid-epoch every
  `checkpoint_every_steps` steps, and at the epoch ends the method asks for), then what `finish` saves, and
  curves.png."""
  import jax

  from autosam_jax.atomic import atomic_write_json
  from autosam_jax.faults import kill_point
  from autosam_jax.parallel import barrier
  from autosam_jax.train.checkpointing import RunCheckpoints
  from autosam_jax.train.schedules import learning_rate_of, with_learning_rate

  out_dir = Path(out_dir)
  tx = method.program.optimizer(method.learning_rate(0, 0))
  state = where.replicate(method.initial_state(tx))
  frozen = where.replicate(method.frozen if method.frozen is not None else {})
  guard = where.replicate(np.int32(0))
  log = MetricsLog(out_dir / "metrics.jsonl", where.main)
  checkpoints = RunCheckpoints(out_dir / "checkpoints")
  start_epoch, iterator_state, epoch_losses = 0, None, []
  if checkpoints.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    state, meta = checkpoints.restore(abstract, required=CHECKPOINT_META + tuple(method.meta_keys))
    start_epoch, iterator_state, epoch_losses = meta["epoch"], meta["iterator_state"], list(meta["epoch_losses"])
    method.restore(meta)
    log.keep_until(meta["step"])
  elif where.main:
    atomic_write_json(out_dir / "config.json", method.config)
    log.start()
  barrier("autosam_jax.train.started")

  step = int(state["step"])
  current_rate = np.float32(learning_rate_of(state["opt_state"]))  # read once, then followed on the host

  def set_rate(rate: float):
    nonlocal state, current_rate
    if np.float32(rate) != current_rate:
      current_rate = np.float32(rate)
      state = {**state, "opt_state": with_learning_rate(state["opt_state"], where.replicate(current_rate))}

  def save(epoch: int, iterator_state, losses: list[float]) -> None:
    checkpoints.save(step, state, {"epoch": epoch, "step": step, "iterator_state": iterator_state,
                                   "epoch_losses": losses, "config": method.config, **method.meta()})

  steps_per_epoch = -(-len(method.epoch_order(0)) // options.batch_size)
  bar = None
  if options.progress and where.main:
    from tqdm import tqdm
    bar = tqdm(total=options.epochs * steps_per_epoch, initial=step, unit="step", desc=options.description,
               dynamic_ncols=True)
  kills, every = options.kill_points, options.checkpoint_every_steps
  train_step = _compiled_step(method.program)
  started = time.perf_counter()
  last_row: dict[str, Any] = {}
  try:
    # The bar is closed however the loop ends, so an error message is not printed on the bar's line.
    with log, (contextlib.closing(bar) if bar is not None else contextlib.nullcontext()):
      steps = _Steps(log, bar, method.diverged, epoch_losses)
      try:
        for epoch in range(start_epoch, options.epochs):
          order = method.epoch_order(epoch)
          batches = -(-len(order) // options.batch_size)
          iterator = batch_pipeline(order, method.example, method.padding, options.batch_size, where.rows,
                                    method.collate, iterator_state, width=where.batch_size)
          iterator_state = None
          rate = None
          for examples in iterator:
            rate = method.learning_rate(epoch, step)
            set_rate(rate)
            state, guard, loss = train_step(state, guard, frozen, where.put(examples))
            step += 1
            steps.add(step, epoch, rate, loss)
            last_of_epoch = len(steps.losses) + len(steps.pending) == batches
            # A checkpoint due on the epoch's last step is the epoch-end one, written once the epoch is complete.
            due = every and step % every == 0 and not last_of_epoch
            if due or step % options.sync_every_steps == 0 or last_of_epoch:
              steps.sync(guard)
            if due:
              log.flush()
              save(epoch, iterator.get_state(), steps.losses)
            if not (last_of_epoch and kills.last_step_after_checkpoint):
              kill_point(kills.step)
            if options.stop_after_steps is not None and step >= options.stop_after_steps:
              steps.sync(guard)
              return {"stopped_at_step": step}
          steps.sync(guard)
          row, checkpoint = method.end_epoch(EpochEnd(epoch, step, steps.losses, rate, state, frozen))
          log.write(row)
          log.flush()
          last_row = row
          if epoch + 1 < options.epochs:  # the next epoch's rate, in the state its checkpoint holds
            set_rate(method.learning_rate(epoch + 1, step))
          steps.losses.clear()
          if checkpoint:
            save(epoch + 1, None, [])
            if kills.epoch_saved:
              kill_point(kills.epoch_saved)
          if kills.last_step_after_checkpoint:
            kill_point(kills.step)
      except BaseException as err:
        if not isinstance(err, NonFiniteLossError):  # steps finished before an interruption are still logged
          with contextlib.suppress(Exception):
            steps.sync(guard)
        raise
  finally:
    checkpoints.close()
  last_row = last_row or log.last_epoch_row()  # a rerun of a finished run: its last row is in the metrics
  result = method.finish(state, frozen, last_row)
  if where.main:
    method.plot(log.path, out_dir / "curves.png")
  return {"seconds": time.perf_counter() - started, "steps": step, **result, "last": last_row}
