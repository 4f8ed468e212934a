"""Feature precompute throughput (slices/s through preprocessing + encoder + cache writing) and warm-cache read speed.

  python -m experiments.benchmarks.precompute_throughput --tiny --patients 3
  python -m experiments.benchmarks.precompute_throughput --model-type vit_b --patients 1 --dtype bf16

Random SAM weights in Meta's format are converted, synthetic ACDC phantoms written, then `autosam-jax precompute`'s
function runs (its images/s covers host preprocessing, the encoder and shard writing, after compilation). The read
figure is random-access features/s from the finished cache (memory-mapped shards, page cache warm), median of 3.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from autosam_jax.models.config import PRESETS, SamConfig

TINY = SamConfig(image_size=256, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=6, encoder_mlp_dim=768,
                 encoder_global_attn_indexes=(1, 3), window_size=7)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model-type", choices=sorted(PRESETS), default="vit_b")
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--patients", type=int, default=1)
  parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
  parser.add_argument("--batch-size", type=int, default=4)
  args = parser.parse_args(argv)

  import jax

  from autosam_jax.data.synthetic import write_synthetic_acdc
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.features.precompute import PrecomputeOptions, precompute
  from weights_conversion import convert
  from weights_conversion.meta_reference import build_meta_sam, save_meta_checkpoint

  config = TINY if args.tiny else PRESETS[args.model_type]
  work = Path(tempfile.mkdtemp(prefix="autosam-precompute-bench-"))
  save_meta_checkpoint(build_meta_sam(config), work / "sam.pth")
  weights, _ = convert(work / "sam.pth", work / "weights")
  (work / "sam.pth").unlink()
  write_synthetic_acdc(work / "acdc", args.patients, seed=0)
  options = PrecomputeOptions(dtype="bfloat16" if args.dtype == "bf16" else "float32", batch_size=args.batch_size)
  # A first run on one patient's slices would compile; instead time the whole run and report compile separately by
  # running twice into two directories: the second run's compile is cached in-process.
  precompute(work / "acdc", weights, work / "warmup", tfds_dir=work / "tfds", options=options, progress=False)
  summary = precompute(work / "acdc", weights, work / "cache", tfds_dir=work / "tfds", options=options,
                       progress=False)
  cache = FeatureCache(work / "cache")
  cache.verify()
  order = np.random.default_rng(0).permutation(len(cache))
  rates = []
  for _ in range(3):
    start = time.perf_counter()
    for i in order:
      cache[int(i)]["embedding"].astype(np.float32)
    rates.append(len(order) / (time.perf_counter() - start))
  name = "tiny (256px, dim 192, depth 4)" if args.tiny else args.model_type
  print(f"machine: {platform.machine()}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"jax {jax.__version__}")
  print(f"precompute {name}, {args.dtype}, batch {args.batch_size}: {summary['computed']} slices in "
        f"{summary['seconds']:.1f}s = {summary['images_per_second']:.2f} images/s; cache "
        f"{summary['bytes'] / 2**20:.1f} MiB ({summary['bytes'] / summary['items'] / 2**10:.0f} KiB per slice)")
  print(f"warm-cache random reads: {statistics.median(rates):.0f} features/s (median of 3 passes over "
        f"{len(order)} items)")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
