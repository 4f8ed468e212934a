"""Devices and processes: the 1-D "data" mesh, and start-up under jax.distributed.

Launch one process per host (or per GPU) and give each the coordinator's address, the number of processes and its
own id, by flags (`--coordinator host:port --num-processes N --process-id I`) or by JAX's environment variables
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). On SLURM and TPU VMs, `--distributed auto` lets JAX
read the cluster's own variables. Every process must see the same files (a shared filesystem for several hosts).
"""

from __future__ import annotations

import os

import numpy as np


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False) -> None:
  """Starts jax.distributed when the arguments or JAX's environment variables ask for it; must run before any JAX
  computation. `auto` lets JAX read a SLURM or TPU VM's own variables."""
  import jax

  if jax.distributed.is_initialized():  # several commands run in one process (tests, scripts)
    return
  if auto:
    jax.distributed.initialize()
    return
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not coordinator:
    return
  num_processes = num_processes or int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need gloo to talk
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def local_data_mesh():
  """A 1-D mesh named "data" over this process's devices."""
  import jax

  return jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))


def data_mesh():
  """A 1-D mesh named "data" over every process's devices (this process's alone when there is one process)."""
  import jax

  return jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))


def local_rows(sharding, size: int) -> tuple[int, int]:
  """Rows [lo, hi) of a global batch of `size` that this process's devices hold under `sharding` (split along the
  batch axis); the processes' parts are contiguous and in process order for a 1-D mesh over `jax.devices()`."""
  spans = [index[0].indices(size)[:2] for index in sharding.addressable_devices_indices_map((size,)).values()]
  lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
  if sum(e - s for s, e in spans) != hi - lo:
    raise ValueError(f"this process's devices hold non-contiguous rows of the batch: {sorted(spans)}")
  return lo, hi


def replicate(tree, sharding):
  """`tree`'s arrays, equal on every process, placed with `sharding` (replicated) on every process's devices.

  jax.device_put in a single process; across processes it refuses arrays committed to a local device (a cross-host
  transfer), so they go through the host."""
  import jax

  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)), tree)


def all_gather_objects(value) -> list:
  """Every process's `value` (any picklable object), in process order; [value] in a single process."""
  import jax

  if jax.process_count() == 1:
    return [value]
  import pickle

  from jax.experimental import multihost_utils

  data = np.frombuffer(pickle.dumps(value), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [pickle.loads(gathered[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def barrier(name: str) -> None:
  """Waits for every process (a no-op in a single process)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
