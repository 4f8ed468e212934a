"""A LoRA model is evaluated and predicted as the network its validation ran: unmerged, in its dtype. Merging the
factors into the base kernels (W + dW, float32) is exact in float32 but not in bf16, where the encoder rounds the
merged kernel while training computed bf16(W) x + (x A) B; export-merged records that difference."""

import dataclasses
import json

import numpy as np
import pytest

from autosam_jax.train.loop import TrainConfig

LORA = TrainConfig(head="linear", variant="improved", num_classes=4, lora_rank=2, lora_alpha=4.0)


def _adapted(weights, dtype: str):
  """An AdaptedSam of the tiny SAM in `dtype` whose factors B are drawn away from zero (a small update beside W, as
  after training), and its config."""
  import jax
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.models.lora import lora_layers
  from autosam_jax.models.trained import jnp_dtype
  from autosam_jax.train.loop import build_model

  config = dataclasses.replace(LORA, encoder_dtype=dtype)
  model = build_model(config, load_sam(weights, encoder_dtype=jnp_dtype(dtype)), rngs=nnx.Rngs(0))
  for i, layer in enumerate(lora_layers(model.encoder)):
    for name, _, _ in layer.parts:
      b = getattr(layer, f"b_{name}")
      b[...] = jax.random.normal(jax.random.key(i), b.shape) * 0.02
  return model, config


def _inputs(tiny_world, count: int = 2) -> np.ndarray:
  from autosam_jax.data.preprocess import PreprocessConfig, encoder_input, preprocess_volume
  from autosam_jax.data.volumes import load_volumes

  volumes, _, _, _ = load_volumes(tiny_world.acdc, tiny_world.tfds)
  volume = next(iter(volumes.values()))
  config = PreprocessConfig(mode="improved", encoder_size=128, head_size=32)
  pre = preprocess_volume(volume.image, volume.spacing, None, config, name="test")
  return np.asarray(encoder_input(pre.images[:count], pre.geometry), np.float32)


def _saved(tiny_world, tmp_path, dtype: str):
  """(model dir of a saved LoRA model in `dtype`, the model as validation runs it, its config)."""
  from flax import nnx

  from autosam_jax.data.labels import ACDC_TABLE
  from autosam_jax.models.loading import weights_digest
  from autosam_jax.models.lora import TRAINABLE
  from autosam_jax.train.loop import model_record, save_model

  model, config = _adapted(tiny_world.weights, dtype)
  _, params, frozen = nnx.split(model, TRAINABLE, ...)
  depends_on = {"kind": "sam_inputs", "weights_sha256": weights_digest(tiny_world.weights), "dtype": "float32"}
  model_dir = tmp_path / f"model_{dtype}"
  save_model(model_dir, params, frozen, config, record=model_record(ACDC_TABLE, depends_on, config))
  return model_dir, model, config


def _validation_logits(model, x) -> np.ndarray:
  """The forward validation runs (train/loop.py's eval step): the AdaptedSam as trained, no merge."""
  from flax import nnx

  return np.asarray(nnx.jit(lambda model, x: model(x))(model, x), np.float64)


@pytest.mark.parametrize("dtype", ["bfloat16"])  # float32: merged and unmerged agree (the test below)
def test_evaluate_and_predict_compute_what_validation_computed(tiny_world, tmp_path, dtype):
  """The evaluate path (load_model + make_head_forward on encoder inputs) and the predict path (the model's SAM
  encodes, its head decodes) give validation's logits to round-off, in bf16 too. Merged, the bf16 model's logits
  moved by a sizeable part of what the factors change (the check fails on a merging evaluation)."""
  import jax
  import jax.numpy as jnp

  from autosam_jax.evaluation.predict import load_model, make_head_forward

  model_dir, model, _ = _saved(tiny_world, tmp_path, dtype)
  x = jnp.asarray(_inputs(tiny_world))
  expected = _validation_logits(model, x)
  grid = expected.shape[1]
  _, head, _ = load_model(model_dir, tiny_world.weights, encoder=False)
  evaluated = make_head_forward(head, grid, batch_size=2)(np.asarray(x))
  sam, head, _ = load_model(model_dir, tiny_world.weights, encoder=True)
  predicted = make_head_forward(head, grid, batch_size=2)(np.asarray(sam.encode(x)))
  # what the factors change, the scale of any difference that matters
  update = np.abs(expected - _validation_logits(_frozen_of(model), x)).max()
  assert update > 1e-3
  for got in (evaluated, predicted):
    assert np.abs(got - expected).max() <= 1e-3 * update, np.abs(got - expected).max() / update
  assert jax.default_backend() == "cpu"


def _frozen_of(model):
  """The same model with its factors' B set to zero: the frozen encoder under its head."""
  from flax import nnx

  from autosam_jax.models.lora import lora_layers

  copy = nnx.clone(model)
  for layer in lora_layers(copy.encoder):
    for name, _, _ in layer.parts:
      b = getattr(layer, f"b_{name}")
      b[...] = b[...] * 0
  return copy


@pytest.mark.parametrize("dtype, merged_is_validated", [("float32", True), ("bfloat16", False)])
def test_merged_equals_unmerged_in_float32_only(tiny_world, dtype, merged_is_validated):
  """merge_lora folds W + dW in float32: in a float32 encoder it computes the adapted one's logits to round-off; in a
  bf16 one, the merged kernel's rounding moves the update by a sizeable fraction, as merge_rounding says."""
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.models.lora import merge_lora, merge_rounding

  model, _ = _adapted(tiny_world.weights, dtype)
  x = jnp.asarray(_inputs(tiny_world))
  unmerged = _validation_logits(model, x)
  update = np.abs(unmerged - _validation_logits(_frozen_of(model), x)).max()
  rounding = merge_rounding(model.encoder, model.encoder.dtype)
  merged_model = nnx.clone(model)
  merge_lora(merged_model.encoder)
  error = np.abs(_validation_logits(merged_model, x) - unmerged).max() / update
  if merged_is_validated:
    assert rounding == 0 and error < 1e-3
  else:
    assert rounding > 0.02 and error > 1e-2


def test_export_merged_records_what_bf16_rounding_does_to_the_update(tiny_world, tmp_path):
  from autosam_jax.evaluation.export import export_merged

  model_dir, _, _ = _saved(tiny_world, tmp_path, "bfloat16")
  summary = export_merged(model_dir, tiny_world.weights, tmp_path / "merged")
  conversion = json.loads((tmp_path / "merged" / "conversion.json").read_text())
  assert conversion["lora_encoder_dtype"] == "bfloat16"
  assert conversion["merge_rounding_bf16"] == summary["merge_rounding_bf16"] > 0.02
