"""Loading converted SAM checkpoints (written by `weights_conversion`) as NNX modules, and what such a folder records:
its SAM config (`read_config`) and the digest of the checkpoint it was converted from (`weights_digest`)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
from flax import nnx

from autosam_jax.checksums import verify_checksums
from autosam_jax.errors import CheckpointError, DataError
from autosam_jax.faults import restore_or_raise
from autosam_jax.models.config import SamConfig, SamConfigError
from autosam_jax.models.sam import Sam


def read_config(path: str | os.PathLike) -> SamConfig:
  path = Path(path)
  config_file = path / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"{config_file}: missing; convert the SAM weights first (autosam-jax convert CHECKPOINT "
                          f"{path})")
  try:
    values = json.loads(config_file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise CheckpointError(f"{config_file}: not a valid SAM config: {err}; convert the SAM weights again") from None
  try:
    return SamConfig.from_dict(values, source=str(config_file))
  except SamConfigError as err:  # names the file and the field already
    raise CheckpointError(f"{err}; convert the SAM weights again") from None
  except (TypeError, ValueError) as err:
    raise CheckpointError(f"{config_file}: not a valid SAM config: {err}") from None


def weights_digest(weights_dir: Path) -> str:
  """The SHA-256 of the checkpoint a converted-weights folder was made from ("" when its record names none)."""
  info = weights_dir / "conversion.json"
  if not info.is_file():
    raise DataError(f"{info}: missing; give a directory written by autosam-jax convert")
  try:
    record = json.loads(info.read_bytes().decode())
  except (OSError, UnicodeDecodeError, ValueError) as err:
    record = err
  if not isinstance(record, dict):
    raise DataError(f"{info}: unreadable conversion record ({type(record).__name__}); convert the SAM weights again")
  return str(record.get("source_sha256", ""))


def _str_keys(tree):
  return {str(k): _str_keys(v) if isinstance(v, dict) else v for k, v in tree.items()}


@functools.lru_cache(maxsize=8)
def _sam_skeleton(config: SamConfig, encoder_dtype):
  """The graph and abstract state of a `Sam` (tracing its construction takes ~1 s for vit_b: done once per config)."""
  return nnx.split(nnx.eval_shape(lambda: Sam(config, encoder_dtype=encoder_dtype, rngs=nnx.Rngs(0))))


def load_sam(path: str | os.PathLike, *, encoder_dtype=None, sharding: jax.sharding.Sharding | None = None) -> Sam:
  """Builds the NNX `Sam` described by `path/config.json` and fills it from the orbax checkpoint `path/params`.

  encoder_dtype: compute dtype of the image encoder (e.g. jnp.bfloat16); parameters stay float32.
  sharding: where the parameters go (default: this process's first device, i.e. replicated use on one device).
  """
  import orbax.checkpoint as ocp

  path = Path(path).absolute()
  config = read_config(path)
  graphdef, skeleton = _sam_skeleton(config, encoder_dtype)
  state = jax.tree.map(lambda leaf: leaf, skeleton)  # a fresh State to fill; the cached one stays abstract
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding),
                        _str_keys(nnx.to_pure_dict(state)))
  params_dir = path / "params"
  if not params_dir.is_dir():
    raise CheckpointError(f"{params_dir}: missing; the directory was not written by the weight converter")
  verify_checksums(path, CheckpointError, f"convert the SAM weights again (autosam-jax convert CHECKPOINT {path})")
  def restore():
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(params_dir, target)

  restored = restore_or_raise(restore, lambda reason: CheckpointError(
      f"{params_dir}: cannot be restored for the architecture in config.json: {reason}"))
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)
