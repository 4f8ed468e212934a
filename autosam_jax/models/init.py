"""PyTorch's default initialisation, for the layers the official code creates fresh (the heads' new layers, the UNet,
SimCLR's projection): every Conv2d, ConvTranspose2d and Linear weight and bias drawn from U(-1/sqrt(fan_in),
1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5) for the weight, PyTorch's bias rule for the bias)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autosam_jax.models.layers import MLP, ConvTranspose2x2, SameConv

Array = jax.Array


def torch_uniform(key: Array, shape: tuple[int, ...], fan_in: int) -> Array:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) float32 of `shape`, a pure function of `key`."""
  bound = 1.0 / np.sqrt(fan_in)
  try:
    words = np.asarray(jax.random.key_data(key)).ravel().tolist()
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    # Traced (nnx.eval_shape, jit): drawn by XLA; flat, because partitionable threefry compiles several times slower
    # for a 4-D shape than for the same count in 1-D.
    return jax.random.uniform(key, (int(np.prod(shape)),), jnp.float32, -bound, bound).reshape(shape)
  # A concrete key: drawn on the host from the key's bits. XLA would compile one sampler per layer shape (~30 ms
  # each, seconds per head); the draw is as reproducible, a pure function of the key.
  values = np.random.default_rng(words).uniform(-bound, bound, int(np.prod(shape))).astype(np.float32)
  return jnp.asarray(values.reshape(shape))


def torch_conv(in_features: int, out_features: int, kernel_size: int, *, rngs: nnx.Rngs) -> SameConv:
  """Conv k x k (k odd), stride 1, zero padding (k - 1) / 2, with bias, initialised as PyTorch's `nn.Conv2d`."""
  if kernel_size % 2 != 1:
    raise ValueError(f"kernel size {kernel_size}: only odd sizes keep the resolution with symmetric padding")
  fan_in = in_features * kernel_size * kernel_size
  pad = (kernel_size - 1) // 2
  return SameConv(in_features, out_features, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
                  kernel_init=lambda key, shape, dtype=None: torch_uniform(key, shape, fan_in),
                  bias_init=lambda key, shape, dtype=None: torch_uniform(key, shape, fan_in), rngs=rngs)


def torch_conv_transpose(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> ConvTranspose2x2:
  """ConvTranspose 2x2 stride 2, initialised as PyTorch's `nn.ConvTranspose2d`.

  PyTorch reads fan_in off dimension 1 of the (in, out, 2, 2) weight, i.e. out_features * 4, not in_features * 4.
  """
  # Built abstractly: its own default init would be drawn (and compiled) only to be replaced.
  layer = nnx.eval_shape(lambda: ConvTranspose2x2(in_features, out_features, rngs=nnx.Rngs(0)))
  fan_in = out_features * 4
  layer.kernel = nnx.Param(torch_uniform(rngs.params(), (in_features, 2, 2, out_features), fan_in))
  layer.bias = nnx.Param(torch_uniform(rngs.params(), (out_features,), fan_in))
  return layer


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
  """nn.Linear as PyTorch initialises it: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  init = lambda key, shape, dtype=None: torch_uniform(key, shape, in_features)
  return nnx.Linear(in_features, out_features, kernel_init=init, bias_init=init, rngs=rngs)


def torch_mlp(input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, *, rngs: nnx.Rngs) -> MLP:
  """SAM's MLP with every `nn.Linear` as PyTorch initialises it: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  mlp = nnx.eval_shape(lambda: MLP(input_dim, hidden_dim, output_dim, num_layers, rngs=nnx.Rngs(0)))
  for layer in mlp.layers:
    fan_in, fan_out = layer.kernel.shape
    layer.kernel = nnx.Param(torch_uniform(rngs.params(), (fan_in, fan_out), fan_in))
    layer.bias = nnx.Param(torch_uniform(rngs.params(), (fan_out,), fan_in))
  return mlp
