"""`autosam-jax sweep`."""

from __future__ import annotations

import argparse
from pathlib import Path

from autosam_jax.commands import options

DESCRIPTION = """The paper's label-efficiency experiment, every cell of it, from one config.

  autosam-jax sweep --config experiments/configs/sweep_paper.py --out sweeps/paper

A cell is (method, encoder, tr_size, fold). The sweep converts the SAM weights (or reuses converted ones), builds the
TFDS dataset, the split file and each feature cache once, then trains and evaluates every cell and writes
  OUT/results.json      the dataset's label table, and every cell: method, encoder, mode, tr_size, fold, per-class
                        Dice and HD95 in both conventions (the dataset's classes, by name)
  OUT/results.md        mean +- std over folds, one row per method (and encoder), one column per tr_size
  OUT/dice_vs_labels.png  mean Dice against the number of labeled volumes, one line per method, std as error bars
  OUT/cells/<cell>.json  one file per finished cell (a rerun skips these: rerunning after a kill resumes the sweep,
                         and a cell killed mid-training resumes from its last checkpoint)
  OUT/runs/...          each cell's run directory (metrics.jsonl, curves.png, final_model/, eval/ with predictions)
One sweep at a time writes OUT (OUT/.lock, taken once the config, the data and the splits are checked); another
command into it is refused, naming the holder's pid.

Methods: autosam, cnn, linear (heads on cached SAM embeddings, one set per encoder), unet (from scratch on images),
simclr (the UNet with its encoder pretrained by SimCLR on the fold's training images, labels unused, then fine-tuned),
zero_shot_box and zero_shot_point (SAM with prompts from the ground truth; no training, so one cell per fold whose
figure stands for every tr_size)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  options.add_config(parser, required=True, what="sweep config")
  parser.add_argument("--out", type=Path, required=True, help="output folder (rerun the same command to resume)")
  options.add_no_progress(parser)


def run(args: argparse.Namespace) -> int:
  from autosam_jax.experiment.sweep import Sweep, load_sweep_config

  result = Sweep(load_sweep_config(args.config, args.set), args.out, progress=options.progress(args)).run()
  print(result["table"])
  print(f"\nwrote {args.out / 'results.json'}, results.md and dice_vs_labels.png")
  return 0
