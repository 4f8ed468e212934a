"""`autosam-jax predict`."""

from __future__ import annotations

import argparse
from pathlib import Path


DESCRIPTION = """Segment NIfTI images with a trained head, end to end (encoder included, no cache).

  autosam-jax predict --model runs/autosam_tr1/final_model --weights weights/vit_b --input scans/ --output labels/
  autosam-jax predict --model runs/unet_tr1/final_model --input scans/ --output labels/    (a UNet: no SAM)

Each input (a .nii/.nii.gz file, or every such file in a folder) gets a uint8 label map of the same shape, affine and
header in --output: nnU-Net-style images CASE_0000.nii.gz give CASE.nii.gz (the input's file ending kept, as nnU-Net's
tools pair files by case name and ending), any other image STEM.nii or STEM.nii.gz gives STEM.nii.gz. A folder's
CASE_0000, CASE_0001, ... files are one case; the models take one gray image, so a case with several channels is
refused rather than predicted from channel 0 alone. Every scan is sliced along its through-plane axis in the
canonical voxel order chosen from its own header (`autosam_jax.data.orientation`), as the training data was, and the
labels are mapped back to the file's voxel order. The preprocessing is the one the model was trained with: taken from
the feature cache's manifest with --cache, otherwise rebuilt from the training variant and the SAM config (the model
directory holds only train_config.json, and those two determine it). Every input is read and checked, and the model
loaded, before anything is written, so a bad input or model leaves --output untouched; each output is written under a
temporary name and renamed into place."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", type=Path, required=True, help="a run's final_model/ or best_model/ directory")
  parser.add_argument("--weights", type=Path, help="the converted SAM the model was trained with (not for a UNet)")
  parser.add_argument("--input", type=Path, required=True, help="a NIfTI image, or a folder of them")
  parser.add_argument("--output", type=Path, required=True,
                      help="folder for the label maps (STEM.nii.gz; nnU-Net's CASE_0000.nii.gz gives CASE.nii.gz)")
  parser.add_argument("--cache", type=Path, help="the feature cache the model was trained on (its preprocessing)")
  parser.add_argument("--batch-size", type=int, default=4, help="slices per encoder call (default 4)")


def run(args: argparse.Namespace) -> int:
  from autosam_jax.evaluation.predict import predict

  for path in predict(args.model, args.weights, args.input, args.output, cache_dir=args.cache,
                      batch_size=args.batch_size):
    print(path)
  return 0
