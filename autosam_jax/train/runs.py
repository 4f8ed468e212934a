"""One training run of a split: the config from its file, the split's labeled patients, the model, the run's
identity."""

from __future__ import annotations

from pathlib import Path


def load_config(path: Path, overrides: list[str]):
  """The TrainConfig of a config file's get_config() and `--set NAME=VALUE` overrides."""
  from autosam_jax.train.loop import TrainConfig

  return TrainConfig.from_file(path, overrides)


def run_inputs(config, splits_file: Path, split, tr_size: int, weights: Path | None) -> dict:
  """What a `train` command's run folder records beyond the config, cache and patients (see loop.run_identity)."""
  from autosam_jax.models.loading import weights_digest
  from autosam_jax.outputs import file_digest

  return {"split": {"file_sha256": file_digest(splits_file), "fold": split.name, "tr_size": tr_size},
          "weights_sha256": weights_digest(Path(weights)) if config.head != "unet" else None}


def train_split(config, cache: Path, weights: Path | None, splits_file: Path, fold: str | None, tr_size: int,
                out: Path, progress: bool = True, announce=None) -> dict:
  """Trains `config`'s model on the first `tr_size` training patients of the split `fold` of `splits_file` (validated
  on its validation patients; a semi-supervised config also learns from the split's other training patients,
  unlabeled); returns `train`'s summary and the labeled patients. `announce(fold, labeled,
  validation)`, if given, is called with the split's name and patients before the run starts (or resumes)."""
  from flax import nnx

  from autosam_jax.data.errors import DataError
  from autosam_jax.data.splits import require_validation_patients, select_split
  from autosam_jax.models.loading import load_sam
  from autosam_jax.models.trained import jnp_dtype
  from autosam_jax.train.loop import build_model, train

  split = select_split(splits_file, fold)
  labeled = split.labeled(tr_size)
  if config.variant == "improved":  # its plateau and best model need validation Dice: refuse before writing
    require_validation_patients(split, splits_file)
  if config.head != "unet" and weights is None:
    from autosam_jax.models.trained import a_head
    raise DataError(f"--weights is needed to initialise {a_head(config.head)} from SAM")

  def head_factory(config):  # num_classes filled in from the cache's label table
    # the UNet is trained from scratch; a LoRA run's encoder computes in its encoder_dtype
    sam = load_sam(weights, encoder_dtype=jnp_dtype(config.encoder_dtype)) if config.head != "unet" else None
    return build_model(config, sam, rngs=nnx.Rngs(config.seed))

  inputs = run_inputs(config, splits_file, split, tr_size, weights)
  if announce is not None:
    announce(split.name, list(labeled), list(split.val))
  if config.semi:  # the fold's other training patients, their labels never read
    from autosam_jax.train.semi import train_semi
    unlabeled = [p for p in split.train if p not in set(labeled)]
    sam = load_sam(weights) if config.semi_sam_boxes else None  # its decoder checks the pseudo-labels
    result = train_semi(config, cache, head_factory, out, labeled, list(split.val), unlabeled, progress=progress,
                        inputs=inputs, sam=sam)
  else:
    result = train(config, cache, head_factory, out, labeled, list(split.val), progress=progress, inputs=inputs)
  return {**result, "labeled": labeled}
