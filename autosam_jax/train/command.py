"""`autosam-jax train`: train a head on a feature cache for one split and tr_size."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """Train a prompt-free head on cached SAM embeddings.

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
round-off) as one process with as many devices. All processes need the same files, OUT included."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", type=Path, required=True, help="Python config file with get_config()")
  parser.add_argument("--cache", type=Path, required=True, help="feature cache (autosam-jax precompute)")
  parser.add_argument("--weights", type=Path, help="converted SAM (to initialise decoder heads; not for head unet)")
  parser.add_argument("--splits", type=Path, required=True, help="split file (autosam-jax make-splits)")
  parser.add_argument("--fold", help="split name inside the file (default: the first)")
  parser.add_argument("--tr-size", type=int, required=True, help="number of labeled training patients")
  parser.add_argument("--out", type=Path, required=True, help="run directory (resumed if it exists)")
  parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a config option")
  parser.add_argument("--debug-nans", action="store_true", help="switch on JAX's NaN checking (slow)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, batch jobs)")
  from autosam_jax import parallel
  parallel.add_arguments(parser)


def load_config(path: Path, overrides: list[str]):
  from autosam_jax.config_files import apply_overrides, read_config_file
  from autosam_jax.train.loop import TrainConfig

  values = apply_overrides(read_config_file(path), overrides)
  return TrainConfig.from_dict(values, source=str(path))


def run_inputs(config, splits_file: Path, split, tr_size: int, weights: Path | None) -> dict:
  """What a `train` command's run folder records beyond the config, cache and patients (see loop.run_identity)."""
  from autosam_jax.features.precompute import weights_digest
  from autosam_jax.outputs import file_digest

  return {"split": {"file_sha256": file_digest(splits_file), "fold": split.name, "tr_size": tr_size},
          "weights_sha256": weights_digest(Path(weights)) if config.head != "unet" else None}


def run(args: argparse.Namespace) -> int:
  import jax

  from autosam_jax import parallel
  from autosam_jax.data.errors import DataError
  from autosam_jax.data.splits import require_validation_patients, select_split
  from autosam_jax.models.loading import CheckpointError
  from autosam_jax.train.loop import NonFiniteLossError, train

  parallel.initialize(args)
  if args.debug_nans:
    jax.config.update("jax_debug_nans", True)
  try:
    config = load_config(args.config, args.set)
    split = select_split(args.splits, args.fold)
    labeled = split.labeled(args.tr_size)
    if config.variant == "improved":  # its plateau and best model need validation Dice: refuse before writing
      require_validation_patients(split, args.splits)
    if config.head != "unet" and args.weights is None:
      raise DataError(f"--weights is needed to initialise a {config.head} head from SAM")
    from autosam_jax.models.loading import load_sam
    from autosam_jax.train.loop import build_model

    def head_factory(config):  # num_classes filled in from the cache's label table
      from flax import nnx
      sam = load_sam(args.weights) if config.head != "unet" else None  # the UNet is trained from scratch
      return build_model(config, sam, rngs=nnx.Rngs(config.seed))

    inputs = run_inputs(config, args.splits, split, args.tr_size, args.weights)
    result = train(config, args.cache, head_factory, args.out, labeled, list(split.val),
                   progress=not args.no_progress, inputs=inputs)
  except (DataError, CheckpointError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except NonFiniteLossError as err:
    print(f"error: {err}", file=sys.stderr)
    return 3
  if jax.process_index() == 0:
    print(f"trained {config.head} ({config.variant}) on {len(labeled)} patient(s): {result['steps']} steps in "
          f"{result['seconds']:.1f}s; model in {result['model']}; last epoch {result['last']}")
  return 0
