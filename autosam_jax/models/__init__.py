"""Flax NNX modules: SAM (encoder, prompt encoder, mask decoder)."""

from autosam_jax.models.config import PRESETS, SamConfig, infer_config
from autosam_jax.models.image_encoder import ImageEncoderViT
from autosam_jax.models.mask_decoder import MaskDecoder
from autosam_jax.models.prompt_encoder import PromptEncoder
from autosam_jax.models.sam import Sam
from autosam_jax.models.transformer import TwoWayTransformer

__all__ = ["PRESETS", "SamConfig", "infer_config", "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam",
           "TwoWayTransformer"]
