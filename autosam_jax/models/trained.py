"""A trained model: the architecture a training config names (`build_model`), and a saved model's head read back
into it (`restore_head`).

A saved model (a run's final_model/ or best_model/) holds the parameters and frozen parts as an orbax checkpoint
(state/), train_config.json (its `TrainConfig`), preprocess.json, model.json (what its inputs were made from, its
label table among them) and checksums.json. The config is the run's `TrainConfig` (a dataclass of the training
code); only its architecture fields are read here: head, variant, num_classes, joint, cnn_top_channels,
unet_base_channels and init_encoder."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from autosam_jax.errors import DataError


def build_model(config, sam, *, rngs):
  """The architecture a config names, freshly initialised: a head on SAM embeddings (initialised from `sam`), or the
  UNet (no SAM needed).

  `config.num_classes` must be set (`train` takes it from the cache's label table). A UNet's `init_encoder` (the
  SimCLR encoder a training run starts from) is not loaded here: the UNet comes back randomly initialised, and the
  training code copies the encoder in."""
  if config.num_classes < 2:
    raise ValueError("build_model needs the dataset's num_classes; resolve the config first (resolve_config)")
  if config.head == "unet":
    from autosam_jax.models.unet import UNet
    return UNet(config.num_classes, base_channels=config.unet_base_channels, rngs=rngs)
  if config.init_encoder:
    raise DataError(f"init_encoder is for the UNet (head 'unet'), not for a {config.head} head")
  from autosam_jax.models.heads import build_head
  return build_head(config.head, config.num_classes, variant=config.variant, sam=sam, joint=config.joint,
                    cnn_top_channels=config.cnn_top_channels, rngs=rngs)


def restore_head(model_dir: str | os.PathLike, config, sam) -> Any:
  """The trained head saved in `model_dir`, once its files match their checksums: the architecture of `config` (the
  model's training config, as its train_config.json gives it) filled from its checkpoint.

  `sam` (the converted SAM the run started from, an NNX `Sam`) fixes the head's architecture; None for a UNet.
  """
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx

  from autosam_jax.checksums import verify_checksums
  from autosam_jax.faults import restore_or_raise

  model_dir = Path(model_dir).absolute()
  config_file = model_dir / "train_config.json"
  if not config_file.is_file():
    raise DataError(f"{config_file}: missing; give a run's final_model/ or best_model/ directory")
  verify_checksums(model_dir, DataError, "train the model again (rerun the train command into a new --out)")
  # The architecture only: pretrained encoder weights (init_encoder) would be overwritten by the restore anyway.
  shape_config = dataclasses.replace(config, init_encoder="")
  abstract = nnx.eval_shape(lambda: build_model(shape_config, sam, rngs=nnx.Rngs(0)))
  graphdef, params, frozen = nnx.split(abstract, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's, also under jax.distributed
  as_target = lambda state: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
                                         nnx.to_pure_dict(state))

  def restore():
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(model_dir / "state", {"params": as_target(params), "frozen": as_target(frozen)})

  restored = restore_or_raise(restore, lambda reason: DataError(
      f"{model_dir}: cannot be restored as a {config.head} head for this SAM: {reason}"))
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(frozen, restored["frozen"])
  return nnx.merge(graphdef, params, frozen)
