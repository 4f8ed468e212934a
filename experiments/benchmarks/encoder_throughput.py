"""Image-encoder throughput: ours (JAX, fp32 and bf16) against Meta's segment-anything (PyTorch fp32), one process.

  python -m experiments.benchmarks.encoder_throughput --model-type vit_b --batch-size 1 --repeats 3
  python -m experiments.benchmarks.encoder_throughput --tiny            # seconds; checks the script itself

Both sides get the same random weights (Meta's model, converted through our key tables) and the same input. Each
figure is the median over --repeats timed calls after one warm-up call (which, for JAX, includes compilation).
Prints images/s for each, the ratio ours / PyTorch fp32, the first call's time (JAX: compilation included), and the
relative difference ||ours - PyTorch|| / ||PyTorch|| of the embeddings.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import numpy as np

from autosam_jax.models.config import PRESETS, SamConfig

TINY = SamConfig(image_size=256, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=6, encoder_mlp_dim=768,
                 encoder_global_attn_indexes=(1, 3), window_size=7)


def median_seconds(fn, repeats: int) -> tuple[float, float]:
  start = time.perf_counter()
  fn()
  warmup = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), warmup


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model-type", choices=sorted(PRESETS), default="vit_b")
  parser.add_argument("--tiny", action="store_true", help="a small 256-pixel architecture instead of a preset")
  parser.add_argument("--batch-size", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-torch", action="store_true", help="only time ours (e.g. when PyTorch is too slow)")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="our compute dtypes to time")
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch
  from flax import nnx

  from weights_conversion.meta_reference import build_meta_sam
  from weights_conversion.parity import sam_from_torch

  config = TINY if args.tiny else PRESETS[args.model_type]
  name = "tiny (256px, dim 192, depth 4)" if args.tiny else args.model_type
  size = config.image_size
  torch_sam = build_meta_sam(config, seed=0)
  encoder = torch_sam.image_encoder
  x = np.random.default_rng(0).normal(size=(args.batch_size, size, size, 3)).astype(np.float32)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  print(f"machine: {platform.processor() or platform.machine()}, {jax.device_count()} JAX device(s) "
        f"({jax.devices()[0].platform}), torch threads {torch.get_num_threads()}; jax {jax.__version__}, "
        f"torch {torch.__version__}")
  print(f"encoder {name} at {size}x{size}, batch {args.batch_size}, median of {args.repeats} after 1 warm-up\n")
  rows = []
  reference = None
  if not args.skip_torch:
    with torch.inference_mode():
      reference = encoder(x_torch).numpy().transpose(0, 2, 3, 1)
      seconds, warmup = median_seconds(lambda: encoder(x_torch), args.repeats)
    rows.append(("segment-anything (PyTorch) fp32", seconds, warmup, 0.0))

  for dtype_name in [d for d in args.dtypes.split(",") if d]:
    dtype = {"float32": None, "bfloat16": jnp.bfloat16}[dtype_name]
    sam = sam_from_torch(torch_sam, encoder_dtype=dtype)
    graphdef, state = nnx.split(sam.image_encoder)

    @jax.jit
    def encode(state, images):
      return nnx.merge(graphdef, state)(images)

    x_jax = jnp.asarray(x)
    seconds, warmup = median_seconds(lambda: encode(state, x_jax).block_until_ready(), args.repeats)
    embeddings = np.asarray(encode(state, x_jax))
    diff = float("nan")
    if reference is not None:
      diff = float(np.linalg.norm(embeddings - reference) / np.linalg.norm(reference))
    rows.append((f"autosam-jax (JAX) {'fp32' if dtype is None else 'bf16 (fp32 params)'}", seconds, warmup, diff))

  base = rows[0][1] if reference is not None else None
  print(f"{'implementation':<36}{'images/s':>10}{'s/batch':>10}{'1st call s':>11}{'vs PyTorch':>12}"
        f"{'rel. diff':>12}")
  for label, seconds, warmup, diff in rows:
    ratio = f"{base / seconds:.2f}x" if base else "-"
    print(f"{label:<36}{args.batch_size / seconds:>10.3f}{seconds:>10.2f}{warmup:>11.1f}{ratio:>12}{diff:>12.2e}")
  print(f"\npeak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
