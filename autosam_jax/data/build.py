"""NIfTI folders -> TFDS array_record datasets of 2D slices, for either layout."""

from __future__ import annotations

from pathlib import Path

# Whether TFDS draws its progress bars while this process builds a dataset (commands given --no-progress turn them off
# with the rest of theirs). Module state rather than an argument: a build happens deep inside precompute, image-cache,
# evaluate and the sweep.
_tfds_progress = True


def show_progress(enabled: bool) -> None:
  """TFDS's progress bars on or off for the builds this process makes from now on."""
  global _tfds_progress
  _tfds_progress = bool(enabled)


def build(kind: str, source_dir: Path, data_dir: Path):
  """Builds (or reuses) the TFDS slice dataset of an "acdc" or "nnunet" folder; returns its builder."""
  if kind == "acdc":
    from autosam_jax.data.acdc import build_acdc
    return build_acdc(source_dir, data_dir, progress=_tfds_progress)
  from autosam_jax.data.nnunet import build_nnunet
  return build_nnunet(source_dir, data_dir, progress=_tfds_progress)
