"""Small building blocks shared by the SAM modules. Channels-last throughout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


# cuDNN's fused attention: the input dtypes and head dims it takes (jax._src.cudnn.fused_attention_stablehlo's
# checks on GPUs before Hopper; Hopper takes head dims up to 256, but 128 holds on every GPU).
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def current_platform() -> str:
  """The platform JAX computes on: "cpu", "tpu", or for a GPU "cuda" or "rocm" (cuDNN exists only on the first)."""
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  client = jax.devices()[0].client
  return "cuda" if "cuda" in f"{client.platform} {client.platform_version}".lower() else "rocm"


def cudnn_takes(dtype, head_dim: int) -> bool:
  """Whether cuDNN's fused attention takes queries of `dtype` (None: float32) and `head_dim`."""
  return dtype is not None and jnp.dtype(dtype) in [jnp.dtype(d) for d in CUDNN_DTYPES] and (
      head_dim <= CUDNN_MAX_HEAD_DIM and head_dim % 8 == 0)


class Buffer(nnx.Variable):
  """A fixed tensor that belongs to the model but is never trained (PyTorch's `register_buffer`)."""


def gelu(x: Array) -> Array:
  # PyTorch's nn.GELU is the exact erf form; Flax's default is the tanh approximation.
  return jax.nn.gelu(x, approximate=False)


def layer_norm(num_features: int, epsilon: float, *, dtype=None, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance as PyTorch computes it; the one-pass form loses digits when |mean| >> std.
  return nnx.LayerNorm(num_features, epsilon=epsilon, use_fast_variance=False, dtype=dtype, rngs=rngs)


def matmul(x: Array, kernel: Array, dtype=None) -> Array:
  """x @ kernel with operands in `dtype` (None: as given) and float32 accumulation and result.

  Only the matmul operands are narrowed: on CPUs with bf16 units (AMX, AVX512-BF16) and on GPUs the matmuls run
  at bf16 speed, while norms, softmax and residual sums stay float32, where XLA:CPU has no bf16 arithmetic anyway.
  """
  if dtype is None:
    return jnp.dot(x, kernel)
  return jnp.dot(x.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)


class Linear(nnx.Module):
  """y = x @ kernel + bias; with `dtype` set, the matmul runs in that dtype (see `matmul`), params stay float32."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=None,
               rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    y = matmul(x, self.kernel[...], self.dtype)
    return y if self.bias is None else y + self.bias[...]


class MLP(nnx.Module):
  """SAM's `MLP`: `num_layers` Linear layers, ReLU between them (not after the last)."""

  def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, *, rngs: nnx.Rngs):
    dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
    self.layers = nnx.List([Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: Array) -> Array:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


class ConvTranspose2x2(nnx.Module):
  """Transposed convolution with kernel 2 and stride 2, written as a per-pixel Dense plus depth-to-space.

  The windows do not overlap, so y[2i+a, 2j+b, o] = bias[o] + sum_c x[i, j, c] * kernel[c, a, b, o]; this is
  exactly PyTorch's ConvTranspose2d(k=2, s=2) with its weight (C, O, 2, 2) permuted to (C, 2, 2, O).
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2, 3))(
        rngs.params(), (in_features, 2, 2, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    _, _, _, o = self.kernel.shape
    y = jnp.dot(x.reshape(b * h * w, c), self.kernel[...].reshape(c, 4 * o).astype(x.dtype))
    y = y.reshape(b, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)
    return y + self.bias[...].astype(x.dtype)


class SameConv(nnx.Conv):
  """Stride-1 k x k convolution with (k - 1) / 2 zero padding; nnx.Conv's parameters (kernel (k, k, in, out), bias).

  On CPU, a convolution of at least `gemm_min_macs` multiply-adds is computed as a matmul (1 x 1) or as one matmul
  over the k * k shifted copies of the input (im2col): there XLA's convolutions, above all the kernel-gradient one,
  run up to 2x slower than its GEMM (on a 2-core Xeon, a 3x3 1024 -> 1024 conv at 16x16, batch 4, forward and
  backward: 0.51 s as a convolution, 0.36 s as im2col, 0.35 s in PyTorch). Smaller convolutions (all of the demo's
  UNet, whose train step im2col made 8-13% slower) and every convolution on GPU/TPU use nnx.Conv's own.
  """

  gemm_min_macs = 5e8

  def __call__(self, inputs: Array) -> Array:
    kh, kw = self.kernel_size
    b, h, w, c = inputs.shape
    macs = b * h * w * kh * kw * c * self.out_features
    if jax.default_backend() != "cpu" or macs < self.gemm_min_macs:
      return super().__call__(inputs)
    dtype = self.dtype or inputs.dtype
    x = jnp.pad(inputs.astype(dtype), ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    columns = jnp.concatenate([x[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=-1)
    kernel = self.kernel[...].astype(dtype).reshape(kh * kw * c, self.out_features)
    y = jnp.dot(columns.reshape(b * h * w, kh * kw * c), kernel).reshape(b, h, w, self.out_features)
    return y + self.bias[...].astype(dtype) if self.bias is not None else y


class Neck(nnx.Module):
  """Conv1x1 (no bias) -> LayerNorm2d -> Conv3x3 (no bias) -> LayerNorm2d, to `out_chans` channels."""

  def __init__(self, embed_dim: int, out_chans: int, *, dtype=None, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(embed_dim, out_chans, (1, 1), use_bias=False, dtype=dtype, rngs=rngs)
    self.norm1 = layer_norm(out_chans, 1e-6, rngs=rngs)
    self.conv2 = nnx.Conv(out_chans, out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                          rngs=rngs)
    self.norm2 = layer_norm(out_chans, 1e-6, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = self.norm1(self.conv1(x).astype(jnp.float32))
    return self.norm2(self.conv2(x).astype(jnp.float32))
