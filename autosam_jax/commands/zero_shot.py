"""`autosam-jax zero-shot`."""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam_jax.commands import options

DESCRIPTION = """SAM itself, prompted from the ground truth, on a split's test patients (paper-protocol 1d).

  autosam-jax zero-shot --weights weights/vit_b --data ~/data/ACDC --tfds-dir ~/tensorflow_datasets \\
      --splits splits/cv5.json --fold cv5-seed0-fold0 --prompt box --mode improved --out runs/sam_zero_shot_box

The paper's zero-shot baseline (`scripts/inference.py`): for every slice of each test patient's cases (ACDC: its ED
and ES frames), one prompt per foreground class of the dataset (its label table; ACDC: RV 1, MYO 2, LV 3) present in
the ground-truth slice, all of a slice's prompts decoded in one SAM call with multimask_output=False. The prompts
come from the labels, so this is an oracle: it also tells SAM which classes are in the slice.
  --prompt box: the class's tight bounding box with a 1-pixel margin (as the official `get_box`), clipped to the image.
  --prompt point: one positive point, the class pixel nearest the class's centre of mass (the official point-prompt
    script is a broken stub, so this variant is ours).
Each mask is its logits > 0; a pixel that no class mask covers is background, and one that several cover goes to the
lowest class value (the official argmax over [background, class 1, class 2, ...] with 0/1 masks).

--mode faithful: the official pipeline, normalisation bug included (paper-protocol 6.5): the 224 x 224 model image in
[0, 1]
  is upsampled bilinearly to the encoder size and then normalised with SAM's pixel mean/std, which are on the 0..255
  scale, so the encoder sees an almost constant image of about -2. Prompts are computed on the 224 label and scaled to
  the encoder frame as `ResizeLongestSide` does; masks come back at 224 (the official grid).
--mode improved: the image on the 0..255 scale (percentile-clipped native slice), resized so its longer side is the
  encoder size keeping its aspect ratio, SAM's normalisation, zero padding: what SAM was trained on, so this is the
  fair comparison. Prompts are computed on the native label slice and scaled into the resized frame.

Scored as `autosam-jax evaluate` scores a head, on the dataset's classes: official (a patient's frames, ACDC's ED+ES,
stacked on the target grid, HD95 in voxels) and standard (per case on the native grid, HD95 in mm). Writes
OUT/metrics.json, OUT/metrics.md and OUT/predictions/<case_id>.nii.gz (native-grid label maps in the source file's
voxel order, with its affine), only once every patient is done, so a failure writes none of them. One command at a
time writes OUT: it is locked (OUT/.lock) once every input is checked, and another command into it is refused, naming
the holder's pid."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--weights", type=Path, required=True, help="converted SAM weights (autosam-jax convert)")
  parser.add_argument("--data", type=Path, required=True, help="the ACDC or nnU-Net folder")
  options.add_tfds_dir(parser)
  options.add_split(parser)
  parser.add_argument("--prompt", choices=("box", "point"), default="box",
                      help="box: GT bounding box with a 1-pixel margin (the paper's); point: one point per class")
  parser.add_argument("--mode", choices=("faithful", "improved"), default="faithful",
                      help="faithful: the official input, normalisation bug included; improved: correctly "
                           "normalised 0..255 input at the native aspect ratio (default faithful)")
  parser.add_argument("--out", type=Path, required=True, help="output folder")
  parser.add_argument("--batch-size", type=int, default=4, help="slices per encoder call (default 4)")


def run(args: argparse.Namespace) -> int:
  from autosam_jax.evaluation.zero_shot import zero_shot

  result = zero_shot(args.weights, args.data, options.tfds_dir(args, args.data), args.splits, args.out,
                     fold=args.fold, prompt=args.prompt, mode=args.mode, batch_size=args.batch_size)
  print(result["table"])
  print(f"wrote {Path(args.out) / 'metrics.json'}, metrics.md and predictions/")
  return 0
