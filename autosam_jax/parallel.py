"""Devices and processes: the 1-D "data" mesh, and start-up under jax.distributed.

Launch one process per host (or per GPU) and give each the coordinator's address, the number of processes and its
own id, by flags (`--coordinator host:port --num-processes N --process-id I`) or by JAX's environment variables
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). On SLURM and TPU VMs, `--distributed auto` lets JAX
read the cluster's own variables.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("multi-process (jax.distributed)")
  group.add_argument("--coordinator", help="host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
  group.add_argument("--num-processes", type=int, help="number of processes (or JAX_NUM_PROCESSES)")
  group.add_argument("--process-id", type=int, help="this process's id, 0..N-1 (or JAX_PROCESS_ID)")
  group.add_argument("--distributed", choices=["off", "auto"], default="off",
                     help="auto: let JAX detect SLURM or a TPU VM and initialise from its variables")


def initialize(args: argparse.Namespace) -> None:
  """Starts jax.distributed when flags or environment ask for it; must run before any JAX computation."""
  import jax

  coordinator = getattr(args, "coordinator", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if getattr(args, "distributed", "off") == "auto":
    jax.distributed.initialize()
    return
  if not coordinator:
    return
  num_processes = getattr(args, "num_processes", None) or int(os.environ["JAX_NUM_PROCESSES"])
  process_id = getattr(args, "process_id", None)
  if process_id is None:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need gloo to talk
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def local_data_mesh():
  """A 1-D mesh named "data" over this process's devices."""
  import jax

  return jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))


def barrier(name: str) -> None:
  """Waits for every process (a no-op in a single process)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
