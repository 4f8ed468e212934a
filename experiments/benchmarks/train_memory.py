"""Head training's peak host memory against the size of the feature cache it trains from.

  python -m experiments.benchmarks.train_memory                       # 4 and 16 patients, linear head
  python -m experiments.benchmarks.train_memory --patients 4,32 --head autosam

For each dataset size: synthetic phantoms, a tiny random SAM, `precompute` (bf16 cache, 2 bytes per value), then
`autosam-jax train` for one epoch on every patient's slices but two (validation and test) in a fresh process,
whose peak RSS (its own, from wait4) is printed next to the cache's size on disk. Training streams batches from
the cache's shards, so the peak should stay flat while the cache grows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _tree_bytes(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--patients", default="4,16", help="comma-separated dataset sizes (patients)")
  parser.add_argument("--head", choices=["autosam", "cnn", "linear"], default="linear")
  args = parser.parse_args(argv)
  sizes = [int(n) for n in args.patients.split(",")]
  if min(sizes) < 3:
    parser.error("each size needs at least 3 patients (train, validation, test)")

  from autosam_jax.data.splits import Split
  from autosam_jax.data.synthetic import write_synthetic_acdc
  from autosam_jax.features.precompute import PrecomputeOptions, precompute
  from experiments.benchmarks.paper_cell import TINY
  from weights_conversion import convert
  from weights_conversion.meta_reference import build_meta_sam, save_meta_checkpoint

  work = Path(tempfile.mkdtemp(prefix="autosam-train-memory-"))
  save_meta_checkpoint(build_meta_sam(TINY, seed=0), work / "sam.pth")
  weights, _ = convert(work / "sam.pth", work / "weights")
  config = Path(__file__).resolve().parents[1] / "configs" / f"{args.head}_faithful.py"
  rows = []
  for n in sizes:
    root = work / f"n{n}"
    write_synthetic_acdc(root / "acdc", n, seed=0)
    patients = [f"patient{i:03d}" for i in range(1, n + 1)]
    Split(name="all", seed=0, train=tuple(patients[:-2]), val=(patients[-2],), test=(patients[-1],)).to_json(
        root / "split.json")
    summary = precompute(root / "acdc", weights, root / "cache", tfds_dir=root / "tfds", progress=False,
                         options=PrecomputeOptions(dtype="bfloat16"))
    command = [sys.executable, "-m", "autosam_jax.cli", "train", "--config", str(config), "--cache",
               str(root / "cache"), "--weights", str(weights), "--splits", str(root / "split.json"), "--tr-size",
               str(n - 2), "--out", str(root / "run"), "--set", "epochs=1", "--no-progress"]
    with open(root / "train.log", "wb") as log:
      child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "JAX_PLATFORMS": "cpu"})
      _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
      child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
      raise SystemExit(f"training failed; see {root / 'train.log'}")
    peak = usage.ru_maxrss  # KiB on Linux
    steps = sum(1 for line in (root / "run" / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "step")
    rows.append((n, summary["items"], _tree_bytes(root / "cache"), steps, peak / 2**20))

  print(f"{'patients':>9}{'cached slices':>15}{'cache MiB':>11}{'train steps':>13}{'train peak RSS GiB':>20}")
  for n, items, size, steps, rss in rows:
    print(f"{n:>9}{items:>15}{size / 2**20:>11.1f}{steps:>13}{rss:>20.2f}")
  print("\npeak RSS: the whole `autosam-jax train` process (its own rusage from wait4), imports and compilation "
        "included")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
