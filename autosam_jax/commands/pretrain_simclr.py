"""`autosam-jax pretrain-simclr`."""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam_jax.commands import options

DESCRIPTION = """Pretrain the UNet encoder with SimCLR (the official SimCLR baseline) on an image cache.

  autosam-jax image-cache --data ~/data/ACDC --out cache/images_faithful
  autosam-jax pretrain-simclr --config experiments/configs/simclr_pretrain.py --cache cache/images_faithful \\
      --splits splits/cv5.json --fold cv5-seed0-fold0 --out runs/simclr_fold0
  autosam-jax train --config experiments/configs/unet_faithful.py --cache cache/images_faithful \\
      --splits splits/cv5.json --fold cv5-seed0-fold0 --tr-size 1 --out runs/unet_simclr_tr1 \\
      --set init_encoder=runs/simclr_fold0/encoder

Trains on the clean slices of every training patient of the split (labels unused). --config is optional (a Python
file whose get_config() returns options of autosam_jax.train.simclr.SimclrConfig; the defaults are the official
ones); --set name=value overrides one. Rerunning the same command after a kill resumes from the last epoch's
checkpoint and ends with the same parameters; a rerun with another config, image cache or split's training patients
is refused, naming what differs (OUT/run.json records them), and so is a second command while one writes OUT.
Writes OUT/run.json, config.json, metrics.jsonl, curves.png, checkpoints/ and encoder/ (what train's init_encoder
loads)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--cache", type=Path, required=True, help="image cache (autosam-jax image-cache)")
  options.add_split(parser)
  parser.add_argument("--out", type=Path, required=True, help="run directory (resumed if it exists)")
  options.add_config(parser, required=False, what="SimCLR options (default: the official ones)")
  options.add_no_progress(parser)


def run(args: argparse.Namespace) -> int:
  from autosam_jax.data.splits import select_split
  from autosam_jax.train.simclr import load_config, pretrain_simclr

  config = load_config(args.config, args.set)
  split = select_split(args.splits, args.fold)
  result = pretrain_simclr(config, args.cache, args.out, list(split.train), progress=not args.no_progress)
  print(f"pretrained SimCLR on {result['slices']} slices of {len(split.train)} patient(s): {result['steps']} steps "
        f"in {result['seconds']:.1f}s; encoder in {result['encoder']}; last epoch {result['last']}")
  return 0
