"""`autosam-jax parity-demo`."""

from __future__ import annotations

import argparse
from pathlib import Path


DESCRIPTION = """Convert a randomly initialised SAM checkpoint and print how closely we match Meta's PyTorch code.

  autosam-jax parity-demo                      # a small non-preset architecture, about a minute on 2 CPU cores
  autosam-jax parity-demo --model-type vit_b   # full-size vit_b at 1024 (a few minutes on CPU)

Builds Meta's `segment-anything` SAM with every tensor random, saves it with `torch.save(model.state_dict())` as
Meta's files are saved, converts it with `autosam-jax convert`, then runs the same image and prompts through both and
prints the largest absolute difference of each output against its tolerance (exit code 1 if one is exceeded)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from autosam_jax.models.config import PRESETS  # no JAX at import

  parser.add_argument("--model-type", choices=sorted(PRESETS), default=None,
                      help="full-size preset to check (default: a small 256-pixel, depth-4 architecture)")
  parser.add_argument("--out", type=Path, default=None,
                      help="keep the random checkpoint and the converted weights here (default: a temporary dir)")
  parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
  import tempfile

  from autosam_jax.models.config import PRESETS, SamConfig
  from weights_conversion.parity import parity_demo

  # a small architecture that is no preset: 256 pixels, depth 4, two global blocks
  demo_config = SamConfig(image_size=256, encoder_embed_dim=192, encoder_depth=4, encoder_num_heads=6,
                          encoder_mlp_dim=768, encoder_global_attn_indexes=(1, 3), window_size=7)
  config = PRESETS[args.model_type] if args.model_type else demo_config
  workdir = args.out or Path(tempfile.mkdtemp(prefix="autosam-parity-"))
  return 0 if parity_demo(config, args.model_type, args.seed, workdir) else 1
