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
# The encoder's linears LoRA can adapt (`models/lora.py`, whose LoraConfig checks the combination).
LORA_TARGETS = ("q", "k", "v", "qkv", "proj", "lin1", "lin2")
ENCODER_DTYPES = ("float32", "bfloat16")
# How the encoder computes attention (`models/image_encoder.py`, ATTENTION_IMPLEMENTATIONS).
ATTENTIONS = ("auto", "chunked", "xla", "cudnn", "fused")  # "fused": an earlier name of "xla" (saved configs)


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
  # LoRA on SAM's image encoder (the encoder in the loop, on an input cache: autosam-jax precompute --store inputs).
  # 0: the encoder stays frozen and the head trains on cached embeddings. The update of a targeted linear is
  # (lora_alpha / lora_rank) * dropout(x) A B, B starting at zero; lora_targets: "q", "k", "v" (parts of the fused
  # qkv, SAMed's choice "q", "v"), "qkv" (all of it), "proj", "lin1", "lin2".
  lora_rank: int = option(0, at_least=0)
  lora_alpha: float = option(4.0, above=0, finite=True)
  lora_dropout: float = option(0.0, at_least=0, below=1)
  lora_targets: tuple[str, ...] = option(("q", "v"), choices=LORA_TARGETS)
  # LoRA only: the compute dtype of the encoder's matmuls in training and in the saved model's use (norms, softmax
  # and residuals stay float32), and jax.checkpoint per encoder block (recomputed in the backward pass: less memory).
  encoder_dtype: str = option("float32", choices=ENCODER_DTYPES)
  remat: bool = False
  # LoRA only: the encoder's attention, in training and in the saved model's use. auto: query chunks on CPU, XLA's
  # jax.nn.dot_product_attention on accelerators ("xla": fastest there, but its relative-position bias is a
  # (B, heads, N, N) array per global block); chunked: query chunks everywhere, each recomputed in the backward pass
  # (the least memory: a vit_b-at-1024 step of batch 4 in 20.9 GiB by XLA's analysis, against 56 GiB). cudnn
  # (cuDNN's fused attention) is refused: it takes bf16/fp16 only, and a LoRA step needs the gradient of the
  # relative-position bias, which cuDNN gives only for an attention batch of 1 (a windowed block's is images x
  # windows); the frozen encoder's forward takes it by itself (precompute, zero-shot, predict).
  attention: str = option("auto", choices=ATTENTIONS)
  # Semi-supervised training (semi: true; `train/semi.py`): a head on cached features (or, with lora_rank, on its
  # adapted encoder's, from an input cache) learns from the labeled slices
  # and, in the same steps, from the fold's other training patients without their labels: an EMA teacher's
  # confident predictions on each unlabeled slice's clean features are the pseudo-labels the student learns to give
  # on the slice's strong views (photometric views cached by precompute --strong-views, mixed by CutMix) and on its
  # clean features with channel dropout. The SEMI_FIELDS below are its options (refused without semi).
  semi: bool = False
  semi_ratio: int = option(2, at_least=1)  # unlabeled slices per labeled slice in a step
  semi_threshold: float = option(0.95, at_least=0, below=1)  # the teacher's confidence a pseudo-labeled pixel needs
  semi_weight: float = option(1.0, at_least=0, finite=True)  # the unlabeled loss's weight once ramped in
  # epochs over which the unlabeled loss's weight rises (as exp(-5 (1 - t)^2), t the fraction done); 0: at once
  semi_ramp_epochs: int = option(5, at_least=0)
  # the teacher's EMA decay; at step t it is min(semi_ema, (t + 1) / (t + 10)), so a short run's teacher follows
  semi_ema: float = option(0.99, at_least=0, below=1)
  semi_feature_dropout: float = option(0.5, at_least=0, below=1)  # channel dropout on the clean features' stream
  semi_cutmix: float = option(0.5, at_least=0, at_most=1)  # the probability a strong view gets a box of another
  # SemiSAM: keep a pseudo-label only where SAM's decoder, prompted with the box of the student's prediction of each
  # class, agrees (improved variant)
  semi_sam_boxes: bool = False

  @property
  def lora(self) -> bool:
    return self.lora_rank > 0

  def to_dict(self) -> dict[str, Any]:
    """The fields; a run without semi leaves semi and its options out (as configs and run records before them)."""
    values = super().to_dict()
    if not self.semi:
      for name in ("semi", *SEMI_FIELDS):
        values.pop(name)
    return values

  def lora_config(self):
    """The LoraConfig of the lora_* fields (LoRA runs only)."""
    from autosam_jax.models.lora import LoraConfig

    return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                      targets=self.lora_targets)

  def check(self) -> None:
    changed = [n for n in SEMI_FIELDS if getattr(self, n) != TrainConfig.__dataclass_fields__[n].default]
    if changed and not self.semi:
      raise self.refusal(f"{', '.join(changed)}: options of semi-supervised training; set semi=true or leave them "
                         "out")
    if self.semi_sam_boxes and self.variant != "improved":
      raise self.refusal("semi_sam_boxes prompts SAM on the improved protocol's target grid; set variant=improved "
                         "or leave semi_sam_boxes out")
    if self.semi and self.head == "unet":
      raise self.refusal("semi trains a head on SAM's features (cached, or with lora_rank its adapted encoder's), "
                         "not the UNet; set head to autosam, cnn or linear, or leave semi out")
    if self.semi and self.lora and (self.lora_dropout > 0 or self.semi_sam_boxes):
      raise self.refusal("semi with lora_rank takes neither lora_dropout nor semi_sam_boxes (the teacher and SAM's "
                         "decoder would need the encoder's features of every view); leave them out")
    if self.lora and self.head == "unet":
      raise self.refusal("lora_rank adapts SAM's encoder, and the UNet has none; leave lora_rank out for head 'unet'")
    if not self.lora and (self.remat or self.encoder_dtype != "float32" or self.attention != "auto"):
      raise self.refusal("remat, encoder_dtype and attention are options of the encoder in the loop; set lora_rank "
                         "(e.g. 4) or leave them out")
    if self.lora and self.attention == "cudnn":
      raise self.refusal(f"attention 'cudnn' cannot train LoRA with encoder_dtype {self.encoder_dtype!r}: cuDNN's "
                         "fused attention takes bf16/fp16 only and gives the relative-position bias gradient a LoRA "
                         "step needs only for an attention batch of 1; set attention=xla (or leave it out: auto)")
    if self.lora:
      self.lora_config()  # LoraConfig's rules between the targets, refused under this config's source
    if self.joint and (self.head != "autosam" or self.variant != "improved"):
      raise self.refusal("joint decoding is an option of the improved AutoSAM head only "
                         f"(head {self.head!r}, variant {self.variant!r}); leave joint out")
    if self.num_classes == 1:
      raise self.refusal("num_classes counts the background too, so it is at least 2; leave it out to take the "
                         "dataset's")


# The options of semi-supervised training, in configs only with semi.
SEMI_FIELDS = ("semi_ratio", "semi_threshold", "semi_weight", "semi_ramp_epochs", "semi_ema", "semi_feature_dropout",
               "semi_cutmix", "semi_sam_boxes")


# What a cache's items are (its manifest's depends_on "kind"; absent in a feature cache) and the model they feed.
CACHE_KINDS = {"images": "model images", "sam_inputs": "SAM encoder inputs", "sam_embeddings": "SAM embeddings"}


def cache_kind(depends_on: dict[str, Any]) -> str:
  return depends_on.get("kind") or "sam_embeddings"


def a_head(head: str) -> str:
  """The head named with its article, as it is said: "an autosam head", "a cnn head", "a unet head"."""
  return f"{'an' if head[:1] in ('a', 'e', 'i', 'o') else 'a'} {head} head"


def needed_kind(config) -> str:
  """The cache kind a model trains and is evaluated on: images (UNet), encoder inputs (LoRA) or embeddings."""
  return "images" if config.head == "unet" else "sam_inputs" if config.lora else "sam_embeddings"


def kind_refusal(where: str, depends_on: dict[str, Any], config) -> DataError | None:
  """The error for a cache of another kind than `config`'s model takes, naming the command that makes the right one
  (None if it is of the right kind)."""
  have, need = cache_kind(depends_on), needed_kind(config)
  if have == need:
    return None
  model = a_head(config.head) + (f" with LoRA (lora_rank {config.lora_rank})" if config.lora else "")
  make = {"images": "an image cache (autosam-jax image-cache)",
          "sam_inputs": "an input cache (autosam-jax precompute --store inputs)",
          "sam_embeddings": "a feature cache (autosam-jax precompute)"}[need]
  return DataError(f"{where}: holds {CACHE_KINDS.get(have, have)}, but {model} takes {CACHE_KINDS[need]}; give {make}")


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
  """The architecture a config names, freshly initialised: a head on SAM embeddings (initialised from `sam`), the
  UNet (no SAM needed), or with lora_rank an `AdaptedSam`: `sam`'s image encoder with LoRA factors (added to it in
  place: `sam.image_encoder` is the adapted encoder afterwards, with the initial factors) and the head on it. The
  head is drawn from `rngs` before the factors, so an adapted model's head starts as the frozen-encoder run's of the
  same seed.

  `config.num_classes` must be set (`train` takes it from the cache's label table). A UNet's `init_encoder` (the
  SimCLR encoder a training run starts from) is not loaded here: the UNet comes back randomly initialised, and the
  training code copies the encoder in."""
  if config.num_classes < 2:
    raise ValueError("build_model needs the dataset's num_classes; resolve the config first (resolve_config)")
  if config.head == "unet":
    from autosam_jax.models.unet import UNet
    return UNet(config.num_classes, base_channels=config.unet_base_channels, rngs=rngs)
  if config.init_encoder:
    raise DataError(f"init_encoder is for the UNet (head 'unet'), not for {a_head(config.head)}")
  from autosam_jax.models.heads import build_head
  head = build_head(config.head, config.num_classes, variant=config.variant, sam=sam, joint=config.joint,
                    cnn_top_channels=config.cnn_top_channels, rngs=rngs)
  if not config.lora:
    return head
  from autosam_jax.models.lora import AdaptedSam, add_lora

  encoder = sam.image_encoder
  if jnp_dtype(config.encoder_dtype) != encoder.dtype:
    raise ValueError(f"build_model: the SAM's encoder computes in {encoder.dtype}, the config asks for "
                     f"{config.encoder_dtype}; load it with encoder_dtype=jnp_dtype(config.encoder_dtype)")
  encoder.remat = config.remat
  if config.attention != "auto":
    from autosam_jax.models.encoders import set_attention
    set_attention(encoder, config.attention)
  return AdaptedSam(add_lora(encoder, config.lora_config(), rngs=rngs), head)


def jnp_dtype(name: str):
  """The encoder compute dtype of a config's or a cache's name ("float32": None, the parameters' own)."""
  if name == "bfloat16":
    import jax.numpy as jnp
    return jnp.bfloat16
  return None


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
  if config.lora:  # built for real: the factors are added to `sam`'s encoder, whose base weights are not saved
    from autosam_jax.models.lora import TRAINABLE
    model = build_model(shape_config, sam, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
  else:
    abstract = nnx.eval_shape(lambda: build_model(shape_config, sam, rngs=nnx.Rngs(0)))
    graphdef, params, frozen = nnx.split(abstract, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's, also under jax.distributed
  as_target = lambda tree: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device), tree)
  saved_frozen = saved_part(nnx.to_pure_dict(frozen), config)

  def restore():
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(model_dir / "state", {"params": as_target(nnx.to_pure_dict(params)),
                                                        "frozen": as_target(saved_frozen)})

  what = a_head(config.head) + (f" with rank-{config.lora_rank} LoRA factors" if config.lora else "")
  restored = restore_or_raise(restore, lambda reason: DataError(
      f"{model_dir}: cannot be restored as {what} for this SAM: {reason}"))
  nnx.replace_by_pure_dict(params, restored["params"])
  frozen_values = nnx.to_pure_dict(frozen)
  frozen_values.update(restored["frozen"])
  nnx.replace_by_pure_dict(frozen, frozen_values)
  return nnx.merge(graphdef, params, frozen)


def saved_part(frozen: dict, config) -> dict:
  """What a saved model keeps of the frozen part (a pure dict): all of it, except for a LoRA model the encoder's
  base weights (the converted SAM's, named by the model's weights digest)."""
  if not config.lora:
    return frozen
  return {k: v for k, v in frozen.items() if k != "encoder"}
