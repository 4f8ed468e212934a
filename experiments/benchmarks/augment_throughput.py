"""Training-augmentation throughput (`autosam_jax.data.augment`), faithful and improved, on the default JAX device.

  python -m experiments.benchmarks.augment_throughput                       # batch 32 at 224x224, 5 repeats
  python -m experiments.benchmarks.augment_throughput --batch-size 8 --repeats 2 --size 96   # seconds; checks itself

Each mode is timed on the same synthetic batch (a phantom slice in [0, 1] with labels 0..3). The first call includes
compilation; the figure is the median of --repeats later calls, each with a fresh key (same shapes: no recompilation),
and counts slices per second until the results are ready on the device.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np


def _phantom(batch_size: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  rows, cols = np.mgrid[:size, :size] / size
  radius = (rows - 0.5) ** 2 + (cols - 0.45) ** 2
  label = np.select([radius < 0.01, radius < 0.03, radius < 0.06], [3, 2, 1], 0).astype(np.uint8)
  noise = np.random.default_rng(0).random((batch_size, size, size, 1), np.float32)
  images = np.repeat(0.25 * label[None, ..., None] + 0.2 * noise, 3, axis=-1).astype(np.float32)
  return images, np.broadcast_to(label, (batch_size, size, size)).copy()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--size", type=int, default=224, help="slice height and width (faithful mode expects 224)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from autosam_jax.data.augment import AugmentConfig, augment_batch

  images, labels = (jnp.asarray(a) for a in _phantom(args.batch_size, args.size))
  device = jax.devices()[0]
  print(f"machine: {platform.processor() or platform.machine()}; JAX {jax.__version__} on {device.platform} "
        f"({device.device_kind}), {jax.device_count()} device(s)")
  print(f"batch {args.batch_size} x {args.size}x{args.size}x3, median of {args.repeats} after the first call\n")
  print(f"{'mode':<10}{'slices/s':>10}{'ms/batch':>10}{'1st call s':>12}")
  for mode in ("faithful", "improved"):
    config = AugmentConfig.for_mode(mode)
    start = time.perf_counter()
    jax.block_until_ready(augment_batch(jax.random.key(0), images, labels, config))
    first = time.perf_counter() - start
    times = []
    for repeat in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(augment_batch(jax.random.key(repeat + 1), images, labels, config))
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(f"{mode:<10}{args.batch_size / seconds:>10.1f}{seconds * 1e3:>10.1f}{first:>12.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
