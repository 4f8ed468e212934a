"""`autosam-jax precompute`."""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam_jax.commands import options

DESCRIPTION = """Run the frozen SAM encoder once over a dataset and store the embeddings.

  autosam-jax precompute --data ~/data/ACDC --weights weights/vit_b --out cache/acdc_vit_b_faithful \\
      --mode faithful --views 4 --splits splits/cv5.json --dtype bf16 --batch-size 8

Every slice gets its exact (clean) embedding, view 0. Slices of the patients that some split labels for training get
K augmented views too (the augmentation of `autosam_jax.data.augment`, seeded per item, so a view is the same
whichever process or run computes it), and with --strong-views S, S photometric views each (intensity only, the
slice's pixels in place): what semi-supervised training (semi=true) learns from on the patients it leaves
unlabeled. The size the strong views add is printed before encoding starts. The encoder runs under jax.jit with the batch sharded over a 1-D "data" mesh
of this process's devices and the parameters replicated; the last batch is padded to the same shape, so nothing is
compiled twice. Host-side preprocessing of the next batch overlaps the device's work on the current one.

Killed at any point, the same command finishes the job: whole shards are kept, the rest is computed. Under
jax.distributed each process takes every P-th shard; process 0 writes the final manifest. One command at a time
writes a cache: OUT/.lock, held by process 0 for all of a jax.distributed run; another command into the same folder
is refused, naming the holder's pid."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--data", type=Path, required=True, help="ACDC or nnU-Net NIfTI folder")
  options.add_tfds_dir(parser)
  parser.add_argument("--weights", type=Path, required=True, help="directory written by autosam-jax convert")
  parser.add_argument("--out", type=Path, required=True, help="cache directory (created, or resumed if it exists)")
  parser.add_argument("--mode", choices=["faithful", "improved"], default="faithful")
  parser.add_argument("--views", type=int, default=0, help="augmented views per labeled training slice (default 0)")
  parser.add_argument("--strong-views", type=int, default=0,
                      help="photometric views per training slice, for semi-supervised training (default 0; e.g. 4)")
  parser.add_argument("--unlabeled", type=Path, metavar="DIR",
                      help="a folder of scans without labels (imagesTs/, any .nii/.nii.gz) to cache with their "
                           "strong views: semi-supervised training learns from them too (needs --strong-views)")
  parser.add_argument("--splits", type=Path, help="split file (make-splits); its training patients get the views")
  parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                      help="encoder matmul and storage dtype (default bf16: half the disk, twice the speed on AMX/GPU)")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--store", choices=["embeddings", "inputs"], default="embeddings",
                      help="embeddings (default: what frozen-encoder heads train on) or inputs: the preprocessed "
                           "encoder inputs, an input cache for LoRA runs (the encoder in the loop; no encoder runs)")
  parser.add_argument("--shard-size", type=int, default=64, help="slices per shard file")
  options.add_distributed(parser)


def run(args: argparse.Namespace) -> int:
  options.start_distributed(args)
  from autosam_jax.features.precompute import PrecomputeOptions, precompute

  choices = PrecomputeOptions(mode=args.mode, views=args.views, strong_views=args.strong_views,
                              dtype="bfloat16" if args.dtype == "bf16" else "float32", batch_size=args.batch_size,
                              seed=args.seed, shard_size=args.shard_size, store=args.store)
  summary = precompute(args.data, args.weights, args.out, tfds_dir=options.tfds_dir(args, args.data),
                       options=choices, splits_file=args.splits, unlabeled_dir=args.unlabeled)
  what = "encoder inputs" if args.store == "inputs" else "embeddings"
  print(f"cache {args.out}: {summary['items']} {what} in {summary['shards']} shards, "
        f"{summary['bytes'] / 2**20:.1f} MiB; computed {summary['computed']} now at "
        f"{summary['images_per_second']:.2f} images/s on {summary['devices']} device(s) x "
        f"{summary['processes']} process(es)")
  return 0
