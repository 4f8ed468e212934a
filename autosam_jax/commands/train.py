"""`autosam-jax train`."""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam_jax.commands import options

DESCRIPTION = """Train a prompt-free head on cached SAM embeddings, or LoRA factors of SAM's encoder with the head.

  autosam-jax train --config experiments/configs/autosam_faithful.py --cache cache/vit_b_faithful \\
      --weights weights/vit_b --splits splits/cv5.json --fold cv5-seed0-fold0 --tr-size 1 --out runs/autosam_tr1

A config is a Python file whose get_config() returns training options (see autosam_jax.train.loop.TrainConfig);
--set name=value overrides one. The UNet baseline (head "unet", see experiments/configs/unet_faithful.py) trains
from scratch on an image cache (autosam-jax image-cache) and needs no --weights; with --set
init_encoder=PRETRAIN/encoder its encoder starts from SimCLR pretraining (autosam-jax pretrain-simclr). Rerunning the
same command after a kill resumes from the last checkpoint and ends with the same parameters; a rerun with other
inputs (config, cache, weights, split file, fold, --tr-size) is refused, naming what differs, and one process at a time
trains in OUT. Writes OUT/run.json, config.json, metrics.jsonl, curves.png, checkpoints/, final_model/ (and
best_model/ in the improved variant).

Several processes (jax.distributed: --coordinator/--num-processes/--process-id, or JAX's environment variables) train
one model together: the batch is split over every process's devices, with the same batches and results (to
round-off) as one process with as many devices. All processes need the same files, OUT included.

With lora_rank (experiments/configs/lora_autosam.py) the encoder is in the loop: --cache is an input cache
(autosam-jax precompute --store inputs, its --views the augmentation), the factors and the head are trained, and the
saved model holds them and the digest of --weights, whose base weights it needs (export-merged folds them in)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--cache", type=Path, required=True,
                      help="feature cache (autosam-jax precompute); for LoRA an input cache (--store inputs)")
  parser.add_argument("--weights", type=Path, help="converted SAM (to initialise decoder heads; not for head unet)")
  options.add_split(parser)
  parser.add_argument("--tr-size", type=int, required=True, help="number of labeled training patients")
  parser.add_argument("--out", type=Path, required=True, help="run directory (resumed if it exists)")
  parser.add_argument("--debug-nans", action="store_true", help="switch on JAX's NaN checking (slow)")
  options.add_config(parser, required=True, what="training options")
  options.add_no_progress(parser)
  options.add_distributed(parser)


def run(args: argparse.Namespace) -> int:
  options.start_distributed(args)
  import jax

  from autosam_jax.train.runs import load_config, train_split

  if args.debug_nans:
    jax.config.update("jax_debug_nans", True)
  config = load_config(args.config, args.set)
  main = options.is_main_process()

  def announce(fold: str, labeled: list[str], validation: list[str]) -> None:
    if main:  # flushed: the line comes before the progress bar (stderr) and any error
      print(f"fold {fold}: training on {_patients(labeled)}; validating on {_patients(validation)}", flush=True)

  result = train_split(config, args.cache, args.weights, args.splits, args.fold, args.tr_size, args.out,
                       progress=options.progress(args), announce=announce)
  if main:
    print(f"trained {config.head} ({config.variant}) on {len(result['labeled'])} patient(s): {result['steps']} steps "
          f"in {result['seconds']:.1f}s; model in {result['model']}; {last_epoch(result['last'])}")
  return 0


def _patients(patients: list[str]) -> str:
  return f"{len(patients)} patient(s) ({', '.join(patients)})" if patients else "no patients"


def last_epoch(row: dict) -> str:
  """The last epoch's row of metrics.jsonl as a line: its entries (per-class Dice named by the dataset's classes),
  losses and Dice to 4 decimals, the learning rate to 4 significant digits; metrics.jsonl keeps them whole."""
  if not row:
    return "no epoch finished"
  rounded = lambda key, value: f"{value:.4g}" if key == "lr" else f"{value:.4f}" if isinstance(value, float) else value
  values = ", ".join(f"{key} {rounded(key, value)}" for key, value in row.items()
                     if key not in ("kind", "epoch", "step"))
  return f"last epoch {row.get('epoch')} (step {row.get('step')}): {values}"
