"""NIfTI folders -> TFDS array_record datasets of 2D slices, for either layout."""

from __future__ import annotations

from pathlib import Path


def build(kind: str, source_dir: Path, data_dir: Path):
  """Builds (or reuses) the TFDS slice dataset of an "acdc" or "nnunet" folder; returns its builder."""
  if kind == "acdc":
    from autosam_jax.data.acdc import build_acdc
    return build_acdc(source_dir, data_dir)
  from autosam_jax.data.nnunet import build_nnunet
  return build_nnunet(source_dir, data_dir)
