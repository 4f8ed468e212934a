"""`autosam-jax convert` (and `python -m weights_conversion`)."""

from __future__ import annotations

import argparse

DESCRIPTION = """Convert SAM weights to a Flax checkpoint.

Reads Meta's segment-anything checkpoints (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth, or any
checkpoint of the same architecture) and Hugging Face SamModel weights (model.safetensors, or its directory). The
architecture is read off the tensor shapes. Writes OUT_DIR/config.json, OUT_DIR/conversion.json, an orbax
checkpoint OUT_DIR/params and OUT_DIR/checksums.json (verified at every load); load it with
`autosam_jax.load_sam(OUT_DIR)`. --overwrite replaces only an earlier conversion: a folder holding other files, or
the checkpoint itself, is refused."""

def add_arguments(parser: argparse.ArgumentParser) -> None:
  from autosam_jax.models.config import PRESETS  # no JAX at import

  parser.add_argument("checkpoint", help="SAM checkpoint: Meta .pth, Hugging Face .safetensors, or an HF model dir")
  parser.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
  parser.add_argument("--model-type", choices=sorted(PRESETS), default=None,
                      help="check that the checkpoint is this preset (default: accept any SAM architecture)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace OUT_DIR if it is an earlier conversion (a folder holding only what convert writes)")
  shapes = parser.add_argument_group("architecture that tensor shapes do not reveal")
  shapes.add_argument("--decoder-num-heads", type=int, help="mask decoder attention heads (default 8, as SAM)")
  shapes.add_argument("--encoder-num-heads", type=int,
                      help="encoder attention heads; needed only without relative position tables")
  shapes.add_argument("--image-size", type=int, help="input size; needed only without an absolute position table")


def run(args: argparse.Namespace) -> int:
  from weights_conversion.convert import convert

  out_dir, config = convert(args.checkpoint, args.out_dir, args.model_type, args.overwrite,
                            decoder_num_heads=args.decoder_num_heads, encoder_num_heads=args.encoder_num_heads,
                            image_size=args.image_size)
  print(f"converted {args.checkpoint} -> {out_dir}: image {config.image_size}, embed dim {config.encoder_embed_dim}, "
        f"depth {config.encoder_depth}, heads {config.encoder_num_heads}, "
        f"global blocks {list(config.encoder_global_attn_indexes)}, window {config.window_size}")
  return 0
