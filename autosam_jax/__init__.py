"""AutoSAM in JAX/Flax: SAM converted from Meta's checkpoints, frozen, with prompt-free heads for medical images.

The names below are imported on first use, so `import autosam_jax.<module>` (the command line's help, for one)
does not load JAX."""

import importlib

_EXPORTS = {"PRESETS": "autosam_jax.models.config", "SamConfig": "autosam_jax.models.config",
            "CheckpointError": "autosam_jax.errors", "load_sam": "autosam_jax.models.loading",
            "Sam": "autosam_jax.models.sam"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'autosam_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
