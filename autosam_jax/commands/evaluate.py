"""`autosam-jax evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam_jax.commands import options

DESCRIPTION = """Dice and HD95 of a trained head on a split's test patients, under both conventions.

  autosam-jax evaluate --model runs/autosam_tr1/final_model --weights weights/vit_b --cache cache/vit_b_faithful \\
      --data ~/data/ACDC --tfds-dir ~/tensorflow_datasets --splits splits/cv5.json --fold cv5-seed0-fold0 \\
      --out runs/autosam_tr1/eval
  autosam-jax evaluate --model runs/unet_tr1/final_model --cache cache/images_faithful --data ~/data/ACDC \\
      --splits splits/cv5.json --fold cv5-seed0-fold0 --out runs/unet_tr1/eval      (a UNet: its image cache, no SAM)

Every slice of each test patient's cases (ACDC: its ED and ES frames) is predicted from its cached clean embedding
(view 0), then scored on the dataset's own classes (its label table, which model, cache and data must share)
  official: the patient's slices (ACDC: ED+ES) stacked into one volume on the target grid (224 x 224 in faithful
    mode; the valid part of the 256 grid in improved mode) against the cache's targets, HD95 in voxels (the paper's
    numbers);
  standard: each frame mapped back to its native grid against the native label volume, HD95 in mm.
Writes OUT/metrics.json (per patient and frame, both conventions, and their means), OUT/metrics.md (the summary table,
a note on classes whose conventions differ by more than 0.05 Dice, and a row per case) and
OUT/predictions/<case_id>.nii.gz (native-grid label maps in the source file's voxel order, with its affine).

Under jax.distributed (--coordinator/--num-processes/--process-id, or JAX's environment variables) each process
predicts and scores every P-th test patient on its own first device; process 0 writes metrics.json and metrics.md."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", type=Path, required=True, help="a run's final_model/ or best_model/ directory")
  parser.add_argument("--weights", type=Path, help="the converted SAM the model was trained with (not for a UNet)")
  parser.add_argument("--cache", type=Path, required=True,
                      help="the feature cache (autosam-jax precompute), or the image cache for a UNet")
  parser.add_argument("--data", type=Path, required=True, help="the ACDC or nnU-Net folder the cache was built from")
  options.add_tfds_dir(parser)
  options.add_split(parser)
  parser.add_argument("--out", type=Path, required=True, help="output folder")
  parser.add_argument("--batch-size", type=int, default=8, help="slices per head call (default 8)")
  options.add_distributed(parser)


def run(args: argparse.Namespace) -> int:
  options.start_distributed(args)
  from autosam_jax.evaluation.evaluate import evaluate

  result = evaluate(args.model, args.weights, args.cache, args.data, options.tfds_dir(args, args.data), args.splits,
                    args.out, fold=args.fold, batch_size=args.batch_size)
  if options.is_main_process():
    print(result["table"])
    print(f"wrote {Path(args.out) / 'metrics.json'}, metrics.md and predictions/")
  return 0
