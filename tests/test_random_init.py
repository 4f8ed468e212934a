"""Host-side random initialisation (the demo's SAM, PyTorch-style head layers) and repeated loads of converted SAMs."""

import numpy as np

from tests.conftest import TINY_CONFIGS

NAME = "dim64-win5-pad"


def test_demo_sam_parameters_cover_the_model_in_its_init_distributions(tmp_path):
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.models.loading import load_sam
  from autosam_jax.models.sam import Sam
  from autosam_jax.experiment.demo import random_sam_params
  from weights_conversion.convert import write_converted

  config = TINY_CONFIGS[NAME]
  params = random_sam_params(config, seed=1)
  _, abstract = nnx.split(nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(0))))
  shapes = {tuple(str(p) for p in path): tuple(v.shape) for path, v in nnx.to_flat_state(abstract)}
  assert {k: v.shape for k, v in params.items()} == shapes
  assert all(v.dtype == np.float32 for v in params.values())
  assert all(np.array_equal(v, params[k]) for k, v in random_sam_params(config, seed=1).items())

  def key(*parts):
    return next(k for k in params if k[-len(parts):] == parts)

  qkv = params[key("blocks", "0", "attn", "qkv", "kernel")]  # lecun normal: std 1 / sqrt(fan_in), within 2 std
  assert abs(qkv.std() * np.sqrt(qkv.shape[0]) - 1) < 0.05 and np.abs(qkv).max() <= 2 / 0.8796 / np.sqrt(qkv.shape[0])
  upscale = params[key("output_upscaling", "conv1", "kernel")]  # (in, 2, 2, out): fan-in is the input axis alone
  assert abs(upscale.std() * np.sqrt(upscale.shape[0]) - 1) < 0.1
  tokens = params[key("mask_tokens", "embedding")]
  assert abs(tokens.std() * np.sqrt(tokens.shape[-1]) - 1) < 0.25
  assert not params[key("pos_embed")].any() and (params[key("neck", "norm1", "scale")] == 1).all()

  write_converted(tmp_path / "sam", config, params, {"source": "test", "source_format": "random",
                                                     "source_sha256": "x", "num_tensors": len(params),
                                                     "num_parameters": int(sum(v.size for v in params.values()))})
  sam = load_sam(tmp_path / "sam")
  embedding = sam.image_encoder(jnp.asarray(np.random.default_rng(0).normal(size=(1, 128, 128, 3)), jnp.float32))
  assert np.isfinite(np.asarray(embedding)).all() and float(np.asarray(embedding).std()) > 0.1


def test_loading_a_sam_twice_gives_independent_modules(meta_checkpoints, tmp_path):
  import jax
  from flax import nnx

  from autosam_jax.models.loading import load_sam
  from weights_conversion import convert

  _, checkpoint = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  weights, _ = convert(checkpoint, tmp_path / "weights")
  first, second = load_sam(weights), load_sam(weights)
  a, b = jax.tree.leaves(nnx.state(first)), jax.tree.leaves(nnx.state(second))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  kernel = first.mask_decoder.output_upscaling.conv1.kernel
  kernel.set_value(kernel.get_value() + 1)
  assert not np.array_equal(kernel.get_value(), second.mask_decoder.output_upscaling.conv1.kernel.get_value())
  third = load_sam(weights)  # the cached skeleton was not filled by the earlier loads
  assert np.array_equal(third.mask_decoder.output_upscaling.conv1.kernel.get_value(),
                        second.mask_decoder.output_upscaling.conv1.kernel.get_value())


def test_torch_style_layers_draw_uniform_values_reproducibly_from_the_key():
  from flax import nnx

  from autosam_jax.models.init import torch_conv

  layers = [torch_conv(32, 16, 3, rngs=nnx.Rngs(7)) for _ in range(2)]
  kernels = [np.asarray(layer.kernel.get_value()) for layer in layers]
  assert kernels[0].shape == (3, 3, 32, 16) and np.array_equal(kernels[0], kernels[1])
  bound = 1 / np.sqrt(32 * 9)
  assert np.abs(kernels[0]).max() <= bound and abs(kernels[0].std() - bound / np.sqrt(3)) < 0.05 * bound
  other = np.asarray(torch_conv(32, 16, 3, rngs=nnx.Rngs(8)).kernel.get_value())
  assert not np.array_equal(kernels[0], other)
  abstract = nnx.eval_shape(lambda: torch_conv(32, 16, 3, rngs=nnx.Rngs(7)))  # traced keys take XLA's sampler
  assert abstract.kernel.shape == (3, 3, 32, 16)
