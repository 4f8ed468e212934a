"""Head train-step time: our jitted train step (JAX) against the same heads written plainly in PyTorch, one process.

  python -m experiments.benchmarks.head_step                      # 16x16x256 embeddings (a 256-pixel SAM)
  python -m experiments.benchmarks.head_step --full --repeats 3   # vit_b's 64x64x256 embeddings
  python -m experiments.benchmarks.head_step --heads linear --repeats 2   # seconds; checks the script itself

Ours is `autosam_jax.train.loop.make_steps`'s train step, the one `autosam-jax train` runs (jit, donated state,
CE + batch soft Dice, Adam through optax), on heads from `autosam_jax.models.heads.build_head`. The reference
(experiments/benchmarks/torch_heads.py) has the same architectures, parameter counts (asserted), loss and Adam.
Both get batch 4 of random embeddings and random 224x224 labels; the head's 4h x 4w logits are resized bilinearly
to 224, as in the official code. After warm-up (ours: compilation first), the two sides' steps alternate, so drift
of a shared machine hits both alike; figures are medians over --repeats steps, each ending with the loss on the host.
Peak RSS is process-wide (getrusage) and cumulative over everything run so far, both sides included.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time

import numpy as np

HEADS = {  # name -> (kind, variant, joint)
    "autosam": ("autosam", "faithful", False),
    "autosam_joint": ("autosam", "improved", True),
    "cnn": ("cnn", "faithful", False),
    "linear": ("linear", "faithful", False),
}
LABELS = {"autosam": "AutoSAM faithful", "autosam_joint": "AutoSAM improved, joint", "cnn": "CNN head",
          "linear": "Linear head faithful"}


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def our_counts(head) -> dict[str, int]:
  from autosam_jax.models.heads import Frozen, count_params
  from autosam_jax.models.layers import Buffer

  return {"trainable": count_params(head), "frozen": count_params(head, Frozen), "buffers": count_params(head, Buffer)}


def our_steps(head, learning_rate: float = 5e-4):
  """(train(batch) -> loss, evaluate(batch) -> loss) with the real steps of `autosam-jax train` on `head`."""
  from flax import nnx

  from autosam_jax.train.loop import HeadProgram, make_steps

  graphdef, params, frozen = nnx.split(head, nnx.Param, ...)
  train_step, eval_step = make_steps(graphdef)
  # the learning rate lives in the optimizer state (optax.inject_hyperparams), as in train()
  state = {"params": params, "opt_state": HeadProgram(graphdef).optimizer(learning_rate).init(params),
           "step": np.int32(0)}

  def train(batch):
    nonlocal state
    state, metrics = train_step(state, frozen, batch)
    return float(metrics["loss"])

  def evaluate(batch):
    return float(eval_step(state["params"], frozen, batch)[0])

  return train, evaluate


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--full", action="store_true", help="vit_b's 64x64 embedding grid (default: 16x16)")
  parser.add_argument("--grid", type=int, help="embedding grid side (overrides --full)")
  parser.add_argument("--target-size", type=int, default=224)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=10, help="timed steps per side and head")
  parser.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated, of {', '.join(HEADS)}")
  args = parser.parse_args(argv)
  heads = [h for h in args.heads.split(",") if h]
  unknown = [h for h in heads if h not in HEADS]
  if unknown:
    parser.error(f"unknown head(s) {unknown}; choose from {', '.join(HEADS)}")
  grid = args.grid or (64 if args.full else 16)

  import jax
  import torch
  from flax import nnx

  from autosam_jax.models.heads import build_head
  from experiments.benchmarks import torch_heads

  torch.set_num_threads(os.cpu_count() or 1)
  num_classes, b, size = 4, args.batch_size, args.target_size
  rng = np.random.default_rng(0)
  embeddings = rng.normal(size=(b, grid, grid, 256)).astype(np.float32)
  targets = rng.integers(0, num_classes, size=(b, size, size)).astype(np.int32)
  batch = {"embedding": embeddings, "target": targets, "weight": np.ones((b, size, size), np.float32)}
  x_torch = torch.from_numpy(embeddings.transpose(0, 3, 1, 2).copy())
  y_torch = torch.from_numpy(targets.astype(np.int64))

  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} JAX "
        f"device(s) ({jax.devices()[0].platform}), torch threads {torch.get_num_threads()}; jax {jax.__version__}, "
        f"torch {torch.__version__}")
  print(f"embeddings {b}x{grid}x{grid}x256 -> logits {4 * grid}x{4 * grid} -> {size}x{size}, {num_classes} classes; "
        f"median of {args.repeats} alternating steps after warm-up\n")
  rows = []
  for name in heads:
    kind, variant, joint = HEADS[name]
    torch.manual_seed(0)
    reference = torch_heads.build(kind, num_classes, variant, joint)
    ours = build_head(kind, num_classes, variant=variant, joint=joint, rngs=nnx.Rngs(0))
    counts_torch, counts_ours = torch_heads.counts(reference), our_counts(ours)
    print(f"{LABELS[name]}: parameters ours {counts_ours}, PyTorch {counts_torch}")
    assert counts_ours == counts_torch, f"{name}: parameter counts differ"

    torch_step = torch_heads.make_train_step(reference)
    jax_step, _ = our_steps(ours)
    start = time.perf_counter()
    jax_step(batch)
    compile_seconds = time.perf_counter() - start
    torch_step(x_torch, y_torch)
    jax_step(batch)
    times = {"torch": [], "jax": []}
    for _ in range(args.repeats):
      start = time.perf_counter()
      torch_step(x_torch, y_torch)
      times["torch"].append(time.perf_counter() - start)
      start = time.perf_counter()
      jax_step(batch)
      times["jax"].append(time.perf_counter() - start)
    rows.append((name, counts_ours["trainable"], statistics.median(times["torch"]), statistics.median(times["jax"]),
                 compile_seconds, peak_rss_gib()))
    del reference, ours, torch_step, jax_step

  print(f"\n{'head':<26}{'trainable':>12}{'PyTorch s/step':>16}{'ours s/step':>13}{'PyTorch steps/s':>17}"
        f"{'ours steps/s':>14}{'ours vs PyTorch':>17}{'compile s':>11}{'peak RSS GiB':>14}")
  for name, trainable, torch_s, jax_s, compile_s, rss in rows:
    print(f"{LABELS[name]:<26}{trainable:>12,}{torch_s:>16.4f}{jax_s:>13.4f}{1 / torch_s:>17.2f}{1 / jax_s:>14.2f}"
          f"{torch_s / jax_s:>16.2f}x{compile_s:>11.1f}{rss:>14.2f}")
  print("\nours vs PyTorch: PyTorch's median step time / ours (above 1: ours faster). Peak RSS: whole process, both "
        "sides, cumulative up to that row.")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
