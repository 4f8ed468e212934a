"""`autosam-jax export-merged`."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """Fold a LoRA model's factors into SAM's encoder and write the result as converted weights.

  autosam-jax export-merged runs/lora_tr1/best_model --weights weights/vit_b --out weights/vit_b_lora_tr1

The output is a folder like `autosam-jax convert` writes (config.json, conversion.json, params/, checksums.json):
SAM's image encoder with W + (alpha / rank) A B in every adapted linear, its prompt encoder and mask decoder as in
--weights. Any command that takes --weights loads it (precompute, zero-shot, training heads on the adapted
encoder's embeddings). conversion.json names the model and the base weights it came from. OUT must not exist, or
with --overwrite be an earlier conversion; nothing is written until the model and the weights have been checked."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("model", type=Path, help="a LoRA run's final_model/ or best_model/")
  parser.add_argument("--weights", type=Path, required=True, help="the converted SAM the model was trained on")
  parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
  parser.add_argument("--overwrite", action="store_true", help="replace OUT if it is an earlier conversion")


def run(args: argparse.Namespace) -> int:
  from autosam_jax.evaluation.export import export_merged

  summary = export_merged(args.model, args.weights, args.out, overwrite=args.overwrite)
  print(f"merged the rank-{summary['lora_rank']} LoRA factors of {args.model} into {args.weights}: "
        f"{summary['num_parameters']:,} parameters in {summary['out']}")
  return 0
