"""`autosam-jax validate`."""

from __future__ import annotations

import argparse


DESCRIPTION = """Check an ACDC folder (patientNNN/ or training/patientNNN/) or an nnU-Net raw dataset (dataset.json,
imagesTr/, labelsTr/): every labeled frame's files, shapes, spacing, orientation, finite voxels and label values.
Prints a summary and warnings (e.g. constant or outlier-dominated images, duplicated cases); the first problem is one
line naming the file, and exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("data_dir",
                      help="ACDC folder (patientNNN/ or training/patientNNN/) or nnU-Net raw dataset folder")
  parser.add_argument("--layout", choices=("auto", "acdc", "nnunet"), default="auto",
                      help="dataset layout (default: detect)")


def run(args: argparse.Namespace) -> int:
  import sys

  from autosam_jax.data import validate

  check = {"auto": validate.validate, "acdc": validate.validate_acdc, "nnunet": validate.validate_nnunet}[args.layout]
  report = check(args.data_dir)
  print(report.summary())
  for warning in report.warnings:
    print(f"warning: {warning}", file=sys.stderr)
  return 0
