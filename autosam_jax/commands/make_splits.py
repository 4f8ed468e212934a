"""`autosam-jax make-splits`."""

from __future__ import annotations

import argparse
from pathlib import Path


DESCRIPTION = """Write patient-level splits of a NIfTI dataset to JSON.

  autosam-jax make-splits ~/data/ACDC --protocol official --seed 0 --out splits/official.json
  autosam-jax make-splits ~/data/ACDC --protocol cv --folds 5 --seed 0 --out splits/cv5.json

official: one 70/15/15 train/val/test split (the paper's protocol, with the seed recorded).
cv: K folds whose test parts partition the patients, each with a validation part carved from its training part.
--val-patients sets the validation part (default 0.15 of the patients, at least one where the dataset allows it).
tr_size k always means the first k patients of a split's seeded training order, so smaller sets nest in larger."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from autosam_jax.data.splits import DEFAULT_VAL_PATIENTS

  parser.add_argument("data_dir", type=Path, help="ACDC or nnU-Net NIfTI folder (its patients are read from it)")
  parser.add_argument("--protocol", choices=["official", "cv"], default="cv")
  parser.add_argument("--folds", type=int, default=5, help="folds for --protocol cv (default 5)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--val-patients", default=str(DEFAULT_VAL_PATIENTS), metavar="COUNT|FRACTION",
                      help="validation patients: a count (e.g. 1; 0 for none) or a fraction of all patients (e.g. "
                      "0.15, the default, the official share); a fraction keeps at least one validation patient "
                      "whenever train and test still keep one each (int(0.15 N) is 0 below 7 patients), because "
                      "the improved protocol's plateau and best model need validation Dice")
  parser.add_argument("--out", type=Path, required=True, help="JSON file to write")


def run(args: argparse.Namespace) -> int:
  from autosam_jax.data.splits import make_splits

  splits = make_splits(args.data_dir, args.protocol, args.folds, args.seed, args.val_patients, args.out)
  for split in splits:
    print(f"{split.name}: train {len(split.train)}, val {len(split.val)}, test {len(split.test)}")
  print(f"wrote {args.out}")
  return 0
