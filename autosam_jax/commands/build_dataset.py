"""`autosam-jax build-dataset`."""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam_jax.commands import options

DESCRIPTION = """Build a dataset of 2D slices from NIfTI volumes (no TensorFlow needed).

  autosam-jax build-dataset acdc ~/data/ACDC
  autosam-jax build-dataset nnunet nnUNet_raw/Dataset027_ACDC --tfds-dir tfds/acdc

The source folder is validated first; a broken file stops the build with one line naming it and nothing is written.
Without --tfds-dir each source folder gets its own folder under ~/tensorflow_datasets/autosam-jax/, which precompute,
image-cache, evaluate and zero-shot find again from their --data. A dataset already built from the same files is
reused; one built from other files is refused."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("kind", choices=["acdc", "nnunet"], help="source layout: ACDC folders or an nnU-Net raw folder")
  parser.add_argument("source_dir", type=Path, help="ACDC folder (holding training/) or nnU-Net dataset folder")
  options.add_tfds_dir(parser)
  options.add_no_progress(parser)


def run(args: argparse.Namespace) -> int:
  from collections import Counter

  from autosam_jax.data.build import build

  options.progress(args)
  builder = build(args.kind, args.source_dir, options.tfds_dir(args, args.source_dir))
  for split, info in builder.info.splits.items():
    source = builder.as_data_source(split=split)
    patients = Counter(source[i]["patient_id"] for i in range(len(source)))
    print(f"{split}: {info.num_examples} slices of {len(patients)} patients")
  print(f"dataset {builder.info.full_name} in {builder.data_dir}")
  return 0
