"""DataError, from the one error hierarchy (`autosam_jax.errors`)."""

from autosam_jax.errors import DataError

__all__ = ["DataError"]
