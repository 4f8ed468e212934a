"""`autosam-jax synth-acdc`."""

from __future__ import annotations

import argparse


DESCRIPTION = """Write synthetic cardiac cine-MRI phantoms (ED and ES frames with RV/MYO/LV labels) in ACDC's exact
layout (OUT_DIR/patientNNN/Info.cfg, patientNNN_frameXX.nii.gz, patientNNN_frameXX_gt.nii.gz), or with --nnunet in
nnU-Net's raw layout. The same seed writes the same files; OUT_DIR appears complete or not at all."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("out_dir", help="output folder; must not exist or be empty")
  parser.add_argument("--patients", type=int, default=10, help="number of phantom patients (default 10)")
  parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
  parser.add_argument("--nnunet", action="store_true",
                      help="write nnU-Net's raw layout (dataset.json, imagesTr, labelsTr; one case per ED/ES frame) "
                      "instead of ACDC's")


def run(args: argparse.Namespace) -> int:
  from autosam_jax.data.synthetic import write_phantoms

  write_phantoms(args.out_dir, args.patients, args.seed, nnunet=args.nnunet)
  if args.nnunet:
    print(f"wrote {2 * args.patients} synthetic nnU-Net cases ({args.patients} patients x ED/ES, seed {args.seed}) "
          f"to {args.out_dir}")
  else:
    print(f"wrote {args.patients} synthetic ACDC patients (patient001-patient{args.patients:03d}, ED and ES frames "
          f"with labels, seed {args.seed}) to {args.out_dir}")
  return 0
