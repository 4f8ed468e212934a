"""Flax NNX modules: SAM (encoder, prompt encoder, mask decoder), the prompt-free heads and the UNet baseline."""

from autosam_jax.models.config import PRESETS, SamConfig, infer_config
from autosam_jax.models.heads import AutoSamHead, CnnHead, Frozen, LinearHead, build_head
from autosam_jax.models.image_encoder import ImageEncoderViT
from autosam_jax.models.mask_decoder import MaskDecoder
from autosam_jax.models.prompt_encoder import PromptEncoder
from autosam_jax.models.sam import Sam
from autosam_jax.models.transformer import TwoWayTransformer
from autosam_jax.models.unet import UNet

__all__ = ["PRESETS", "SamConfig", "infer_config", "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "Sam",
           "TwoWayTransformer", "AutoSamHead", "CnnHead", "LinearHead", "Frozen", "build_head", "UNet"]
