"""The training recipe of each method under each protocol: the paper's options, and the improved protocol's.

`experiments/configs/<head>_<variant>.py` return these (so `autosam-jax train --config` and the sweep read the same
options); a sweep's `train` and `method_train` options override them.
"""

from __future__ import annotations

HEADS = ("autosam", "cnn", "linear", "unet")
VARIANTS = ("faithful", "improved")

# The official scripts: Adam at 5e-4, batch 4, 120 epochs, ReduceLROnPlateau on the last batch's training loss.
PAPER = {"epochs": 120, "batch_size": 4, "learning_rate": 5e-4}
# The improved protocol selects by validation Dice: the plateau follows it, and the best epoch is kept.
SCHEDULER = {"faithful": "plateau_train_loss", "improved": "plateau_val_dice"}


def train_recipe(head: str, variant: str) -> dict:
  """The TrainConfig options of `head` under `variant`. The UNet baselines exist only as the paper ran them (with
  the official augmentation inside the train step)."""
  if head not in HEADS or variant not in VARIANTS or (head == "unet" and variant != "faithful"):
    raise ValueError(f"no recipe for head {head!r} under {variant!r}")
  recipe = {"head": head, "variant": variant, **PAPER, "scheduler": SCHEDULER[variant]}
  if head == "unet":
    recipe["augment"] = "faithful"
  return recipe


# LoRA as SAMed adapts SAM's encoder: rank 4 on the q and v parts of every block's fused qkv, alpha = rank (scale 1),
# no dropout; the encoder computes in bf16, each block rematerialised in the backward pass. Under the project's one
# protocol its optimiser, epochs and schedule are the AutoSAM head's (SAMed's own recipe trains with AdamW and warm-up).
LORA = {"lora_rank": 4, "lora_alpha": 4.0, "lora_dropout": 0.0, "lora_targets": ("q", "v"),
        "encoder_dtype": "bfloat16", "remat": True}


def lora_recipe(variant: str) -> dict:
  """The TrainConfig options of the LoRA method under `variant`: the AutoSAM head's recipe with the encoder adapted
  (the improved AutoSAM decodes every class in one pass, as the joint head does)."""
  recipe = {**train_recipe("autosam", variant), **LORA}
  if variant == "improved":
    recipe["joint"] = True
  return recipe


# The official SimCLR script: 100 epochs of batch 8, Adam at 3e-4 with weight decay 1e-5, temperature 0.5, the
# learning rate stepped once per epoch from epoch 10, the projection 512 -> 256 on the UNet encoder's pooled features.
SIMCLR = {"epochs": 100, "batch_size": 8, "learning_rate": 3e-4, "weight_decay": 1e-5, "temperature": 0.5,
          "schedule": "faithful", "schedule_start_epoch": 10, "augment": "faithful", "unet_base_channels": 64,
          "projection_hidden": 512, "projection_dim": 256}
