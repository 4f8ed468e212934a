"""The `autosam-jax` command. Subcommands import their heavy dependencies only when they run."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module with add_arguments/run and optionally DESCRIPTION, one-line help)
COMMANDS = {
    "convert": ("weights_conversion.cli", "convert Meta or Hugging Face SAM weights to a Flax checkpoint"),
    "parity-demo": ("experiments.parity_demo", "convert a random SAM checkpoint and print parity with Meta's code"),
    "synth-acdc": ("autosam_jax.data.synthetic", "write synthetic cardiac MRI phantoms in ACDC's file layout"),
    "validate": ("autosam_jax.data.validate", "check an ACDC or nnU-Net NIfTI folder for broken or mismatched files"),
    "build-dataset": ("autosam_jax.data.build", "build a TFDS dataset of 2D slices from ACDC or nnU-Net folders"),
    "make-splits": ("autosam_jax.data.splits", "write seeded patient-level splits (official or cross-validation)"),
    "precompute": ("autosam_jax.features.precompute", "encode every slice once with the frozen SAM encoder into a cache"),
    "image-cache": ("autosam_jax.features.images", "write the model images of every slice, for the UNet baseline"),
    "pretrain-simclr": ("autosam_jax.train.simclr", "SimCLR pretraining of the UNet encoder on unlabeled slices"),
    "train": ("autosam_jax.train.command", "train a prompt-free head on cached embeddings"),
    "evaluate": ("autosam_jax.evaluation.evaluate", "score a trained head on a split's test patients (Dice, HD95)"),
    "predict": ("autosam_jax.evaluation.predict", "segment NIfTI images with a trained head"),
    "zero-shot": ("autosam_jax.evaluation.zero_shot", "score SAM itself, prompted from the ground truth (box or point)"),
    "sweep": ("experiments.label_efficiency", "the label-efficiency experiment: every method x encoder x tr_size x fold"),
    "demo": ("experiments.demo", "the whole pipeline on synthetic phantoms with a small SAM, in minutes on a CPU"),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="autosam-jax", description="SAM adaptation for medical images in JAX/Flax.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (module_name, help_text) in COMMANDS.items():
    module = importlib.import_module(module_name)
    description = getattr(module, "DESCRIPTION", None) or (module.__doc__ or help_text)
    sub = commands.add_parser(name, help=help_text, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    sub.set_defaults(run=module.run)
  return parser


def main(argv: list[str] | None = None) -> int:
  from autosam_jax.faults import run_command

  args = build_parser().parse_args(argv)
  return run_command(args.run, args)


def entry() -> None:
  """The `autosam-jax` executable: `main`, then exit with its code. After SIGINT/SIGTERM (the line is printed, every
  file closed or cleaned up) the process ends at once: the interpreter's shutdown would otherwise join threads that
  XLA and the data pipeline still run, which can crash it."""
  code = main()
  if code in (128 + 2, 128 + 15):
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  entry()
