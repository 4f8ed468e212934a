"""Arguments that several commands share."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_tfds_dir(parser: argparse.ArgumentParser) -> None:
  # --data-dir: the name build-dataset had before every command said --tfds-dir; kept so old scripts still run
  parser.add_argument("--tfds-dir", "--data-dir", dest="tfds_dir", type=Path, default=None,
                      help="where the TFDS slice dataset is built or found (default: a folder of the source folder's "
                           "own under ~/tensorflow_datasets/autosam-jax/, the same for every command given it)")


def tfds_dir(args: argparse.Namespace, source_dir: Path) -> Path:
  """`--tfds-dir`, or the default TFDS folder of `source_dir` (`data.volumes.default_tfds_dir`)."""
  if args.tfds_dir is not None:
    return args.tfds_dir.expanduser()
  from autosam_jax.data.volumes import default_tfds_dir

  return default_tfds_dir(source_dir)


def add_split(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--splits", type=Path, required=True, help="split file (autosam-jax make-splits)")
  parser.add_argument("--fold", help="split name inside the file (default: the first)")


def add_config(parser: argparse.ArgumentParser, required: bool, what: str) -> None:
  parser.add_argument("--config", type=Path, required=required, help=f"{what}: a Python file with get_config()")
  parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override a config option")


def add_no_progress(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs and batch jobs)")


def progress(args: argparse.Namespace) -> bool:
  """Whether the command shows progress bars (no --no-progress); TFDS's, while it builds a dataset, follow."""
  from autosam_jax.data.build import show_progress

  show_progress(not args.no_progress)
  return not args.no_progress


def add_distributed(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("multi-process (jax.distributed)")
  group.add_argument("--coordinator", help="host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
  group.add_argument("--num-processes", type=int, help="number of processes (or JAX_NUM_PROCESSES)")
  group.add_argument("--process-id", type=int, help="this process's id, 0..N-1 (or JAX_PROCESS_ID)")
  group.add_argument("--distributed", choices=["off", "auto"], default="off",
                     help="auto: let JAX detect SLURM or a TPU VM and initialise from its variables")


def start_distributed(args: argparse.Namespace) -> None:
  """jax.distributed from `add_distributed`'s flags (or JAX's environment variables); before any JAX computation."""
  from autosam_jax import parallel

  parallel.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed == "auto")


def is_main_process() -> bool:
  """Process 0 prints the results under jax.distributed (and alone)."""
  import jax

  return jax.process_index() == 0
