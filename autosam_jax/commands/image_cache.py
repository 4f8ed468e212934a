"""`autosam-jax image-cache`."""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam_jax.commands import options

DESCRIPTION = """An image cache: the faithful model images and targets in the feature cache's on-disk format, for the UNet.

  autosam-jax image-cache --data ~/data/ACDC --tfds-dir ~/tensorflow_datasets --out cache/acdc_images_faithful

Each item's "embedding" is the slice's model image (224, 224, 3) float32 in [0, 1] and its "target" the (224, 224)
label map, so `FeatureCache` reads it and the training loop runs on it unchanged. Only clean slices (view 0) are
stored: the UNet is augmented on the fly in the train step (TrainConfig.augment), not through cached views.
Rerunning after a kill finishes the job, as precompute does: whole shards are kept, the rest is written. One command
at a time writes a cache (OUT/.lock); another into the same folder is refused, naming the holder's pid."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--data", type=Path, required=True, help="ACDC or nnU-Net NIfTI folder")
  options.add_tfds_dir(parser)
  parser.add_argument("--out", type=Path, required=True, help="cache directory (created, or finished if it exists)")
  parser.add_argument("--shard-size", type=int, default=64, help="slices per shard file")
  parser.add_argument("--slice-size", type=int, default=224, help="model grid side in pixels (default 224, official)")
  parser.add_argument("--spacing", type=float, default=1.25,
                      help="model grid pixel size in mm (default 1.25, official; 2.5 with --slice-size 112 keeps the "
                           "field of view at a quarter of the pixels)")


def run(args: argparse.Namespace) -> int:
  from autosam_jax.features.images import write_image_cache

  summary = write_image_cache(args.data, options.tfds_dir(args, args.data), args.out, shard_size=args.shard_size,
                              slice_size=args.slice_size, spacing=args.spacing)
  print(f"image cache {args.out}: {summary['items']} slices in {summary['shards']} shards")
  return 0
