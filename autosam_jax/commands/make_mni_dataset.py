"""`autosam-jax make-mni-dataset`."""

from __future__ import annotations

import argparse


DESCRIPTION = """Write a small real-MRI benchmark in nnU-Net's raw layout: slabs of consecutive axial slices of the
ICBM152 2009a T1 template (1 mm, MNI space; each slab keeps its exact world position) labeled grey matter and white
matter from the template's probability maps, or with --hemispheres gm_left, gm_right, wm_left, wm_right (by world x).
The template ships inside nilearn's wheel: `pip install --no-deps nilearn` (nilearn itself is never imported), or
give --template-dir DIR holding its three files. The same options write the same bytes; OUT appears complete or not
at all, and a folder this command did not write, or wrote with other options, is refused. Then:

  autosam-jax validate OUT
  autosam-jax build-dataset nnunet OUT"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from autosam_jax.data.mni import DEFAULT_NUM_CASES, DEFAULT_SLAB_THICKNESS

  parser.add_argument("out_dir", metavar="OUT", help="output folder; new, empty, or an earlier build with the same "
                      "options")
  parser.add_argument("--template-dir", metavar="DIR", default=None,
                      help="folder holding mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz (default: "
                      "nilearn's installed datasets/data)")
  parser.add_argument("--hemispheres", action="store_true",
                      help="split each tissue into left and right by the sign of world x (4 classes)")
  parser.add_argument("--slab-thickness", type=int, default=DEFAULT_SLAB_THICKNESS, metavar="N",
                      help=f"axial slices per case (default {DEFAULT_SLAB_THICKNESS})")
  parser.add_argument("--cases", type=int, default=DEFAULT_NUM_CASES, metavar="N",
                      help=f"number of slabs, spread without overlap over the brain (default {DEFAULT_NUM_CASES})")


def run(args: argparse.Namespace) -> int:
  from autosam_jax.data.mni import build_mni_dataset

  dataset = build_mni_dataset(args.out_dir, args.template_dir, slab_thickness=args.slab_thickness,
                              num_cases=args.cases, hemispheres=args.hemispheres)
  classes = ", ".join(name for name in dataset["labels"] if name != "background")
  print(f"wrote {dataset['numTraining']} MNI152 slabs of {args.slab_thickness} axial slices (classes {classes}) to "
        f"{args.out_dir}; check it with: autosam-jax validate {args.out_dir}")
  return 0
