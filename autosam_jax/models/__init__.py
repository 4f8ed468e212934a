"""Flax NNX modules: SAM (encoder, prompt encoder, mask decoder), the prompt-free heads and the UNet baseline.

The names below are imported on first use (see `autosam_jax.__init__`)."""

import importlib

_EXPORTS = {"PRESETS": "config", "SamConfig": "config", "infer_config": "config", "ImageEncoderViT": "image_encoder",
            "MaskDecoder": "mask_decoder", "PromptEncoder": "prompt_encoder", "Sam": "sam",
            "TwoWayTransformer": "transformer", "AutoSamHead": "heads", "CnnHead": "heads", "LinearHead": "heads",
            "Frozen": "heads", "build_head": "heads", "UNet": "unet"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'autosam_jax.models' has no attribute {name!r}")
  return getattr(importlib.import_module(f"autosam_jax.models.{_EXPORTS[name]}"), name)
