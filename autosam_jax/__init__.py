"""AutoSAM in JAX/Flax: SAM converted from Meta's checkpoints, frozen, with prompt-free heads for medical images."""

from autosam_jax.models.config import PRESETS, SamConfig
from autosam_jax.models.loading import CheckpointError, load_sam
from autosam_jax.models.sam import Sam

__all__ = ["PRESETS", "CheckpointError", "Sam", "SamConfig", "load_sam"]
__version__ = "0.1.0"
