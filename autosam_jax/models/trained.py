"""A trained model: the architecture a training config names (`build_model`), and a saved model's head read back
into it (`restore_head`).

A saved model (a run's final_model/ or best_model/) holds the parameters and frozen parts as an orbax checkpoint
(state/), train_config.json (its `TrainConfig`), preprocess.json, model.json (what its inputs were made from, its
label table among them) and checksums.json. `TrainConfig` is the run's training config, kept with the model: its
architecture fields (head, variant, num_classes, joint, cnn_top_channels, unet_base_channels, init_encoder) say what
to build; the rest says how it was trained (`autosam_jax/train/loop.py`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from autosam_jax.errors import DataError
from autosam_jax.typed_config import TypedConfig, option



HEADS = ("autosam", "cnn", "linear", "unet")
VARIANTS = ("faithful", "improved")
# plateau_train_loss: the official code's plateau on the last batch's training loss (min mode); plateau_val_dice: on
# validation Dice (max mode), for the improved variant.
SCHEDULERS = ("plateau_train_loss", "plateau_val_dice")
AUGMENT_MODES = ("none", "faithful", "improved")


@dataclasses.dataclass(frozen=True)
class TrainConfig(TypedConfig):
  OPTIONS = "training"

  head: str = option("autosam", choices=HEADS)  # autosam | cnn | linear (on SAM embeddings) | unet (on images)
  variant: str = option("faithful", choices=VARIANTS)
  # Background included; 0 (the default): the dataset's, from the cache's label table. A value that disagrees with
  # the data is refused (naming both) rather than training extra outputs or failing on labels beyond them.
  num_classes: int = option(0, at_least=0)
  epochs: int = option(120, at_least=1)
  batch_size: int = option(4, at_least=1)
  learning_rate: float = option(5e-4, above=0, finite=True)
  # faithful: plateau on the last training batch's loss from epoch 10 (the official code); improved: plateau on
  # validation Dice, and the best epoch by validation Dice is the model kept.
  scheduler: str = option("plateau_train_loss", choices=SCHEDULERS)
  plateau_start_epoch: int = option(10, at_least=0)
  seed: int = option(0, at_least=0, below=2 ** 63)  # jax.random.key takes a 64-bit signed seed
  checkpoint_every_steps: int = option(0, at_least=0)  # 0: at the end of every epoch only
  # Validate and write the epoch checkpoint every N epochs and after the last one (1: every epoch, as the official
  # code validates). Larger only for quick runs: the plateau on validation Dice then counts validations, not epochs.
  eval_every_epochs: int = option(1, at_least=1)
  # none | faithful | improved: augment_batch applied to each training batch inside the train step. Only for image
  # caches (write_image_cache), where the "embedding" is the model image; SAM heads get augmented cached views instead.
  augment: str = option("none", choices=AUGMENT_MODES)
  unet_base_channels: int = option(64, at_least=1)  # the official UNet's width; smaller only for quick tests
  # The official CNN head's (its widest layer is 16x this); smaller only for quick runs.
  cnn_top_channels: int = option(64, at_least=1)
  joint: bool = False  # improved AutoSAM only: all class tokens in one decoder pass (C times cheaper)
  # UNet only: an encoder/ directory written by SimCLR pretraining (autosam-jax pretrain-simclr) to start the
  # contracting path and center from; the decoder stays random, as in the official fine-tuning. "" = from scratch.
  init_encoder: str = ""

  def check(self) -> None:
    if self.joint and (self.head != "autosam" or self.variant != "improved"):
      raise self.refusal("joint decoding is an option of the improved AutoSAM head only "
                         f"(head {self.head!r}, variant {self.variant!r}); leave joint out")
    if self.num_classes == 1:
      raise self.refusal("num_classes counts the background too, so it is at least 2; leave it out to take the "
                         "dataset's")


def read_train_config(model_dir: Path):
  """The TrainConfig saved with a model, checked before anything slow is loaded."""
  if not Path(model_dir).is_dir():
    raise DataError(f"{model_dir}: no such model directory; give a run's final_model/ or best_model/")
  config_file = Path(model_dir) / "train_config.json"
  try:
    values = json.loads(config_file.read_text())
  except FileNotFoundError:
    raise DataError(f"{config_file}: missing; give a run's final_model/ or best_model/ directory") from None
  except (OSError, ValueError) as err:
    raise DataError(f"{config_file}: unreadable ({type(err).__name__}: {err})") from None
  if not isinstance(values, dict):
    raise DataError(f"{config_file}: not a training config (a JSON object was expected)")
  return TrainConfig.from_dict(values, source=str(config_file))


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
