"""TinyViT, the image encoder of MobileSAM and LiteMedSAM, in Flax NNX (channels-last).

Stages: a convolutional patch embedding, one stage of MBConv blocks, then stages of windowed-attention blocks
(each with a learned per-head bias over window offsets, a depthwise "local" convolution between attention and MLP);
stages end in a patch merging (1x1 conv, strided depthwise 3x3, 1x1 conv); then SAM's neck to the (64, 64, 256)
image embedding. Every convolution is followed by an inference-form BatchNorm (running statistics, no update).

Layout choices, made once at conversion (`weights_conversion/tables.py`, TINY_VIT):
  - the attention's fused qkv projection stores its output columns as [all queries | all keys | all values] (the
    PyTorch layer interleaves them per head), so LoRA's "q"/"k"/"v" targets are contiguous column ranges, as in
    SAM-ViT;
  - the MLP's linears are named `lin1`/`lin2` (PyTorch: fc1/fc2), so LoRA names the same targets in both families.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autosam_jax.models.layers import Buffer, Linear, Neck, gelu, layer_norm, matmul
from autosam_jax.typed_config import TypedConfig, option

Array = jax.Array

# PatchMerging's depthwise conv keeps the resolution for these output widths (the reference code's rule: the last
# stage of every released TinyViT-SAM runs at the resolution of the one before, so the embedding is 64 x 64).
_KEEP_RESOLUTION_WIDTHS = (320, 448, 576)
EMBEDDING_GRID = 64  # the reference forward reshapes the last stage to 64 x 64 tokens


@dataclasses.dataclass(frozen=True)
class TinyVitConfig(TypedConfig):
  """The TinyViT encoder's architecture; every field is read off a checkpoint's shapes (`infer_tiny_vit`)."""

  OPTIONS = "TinyViT"

  embed_dims: tuple[int, ...] = option((64, 128, 160, 320), at_least=1)
  depths: tuple[int, ...] = option((2, 2, 6, 2), at_least=1)
  num_heads: tuple[int, ...] = option((2, 4, 5, 10), at_least=1)  # the first (convolutional) stage has no heads
  window_sizes: tuple[int, ...] = option((7, 7, 14, 7), at_least=1)
  mlp_ratio: float = option(4.0, above=0, finite=True)
  mbconv_expand_ratio: float = option(4.0, above=0, finite=True)
  local_conv_size: int = option(3, at_least=1)
  # The patch embedding: two k x k convolutions of stride s each (LiteMedSAM: 1 x 1, stride 1; MobileSAM: 3 x 3,
  # stride 2, padding 1).
  patch_kernel_size: int = option(1, at_least=1)
  patch_stride: int = option(1, at_least=1)

  def check(self) -> None:
    n = len(self.embed_dims)
    if n < 2 or any(len(getattr(self, f)) != n for f in ("depths", "num_heads", "window_sizes")):
      raise self.refusal(f"embed_dims, depths, num_heads and window_sizes must have one entry per stage (at least "
                         f"2), got {len(self.embed_dims)}, {len(self.depths)}, {len(self.num_heads)}, "
                         f"{len(self.window_sizes)}")
    for dim, heads in zip(self.embed_dims[1:], self.num_heads[1:]):
      if dim % heads:
        raise self.refusal(f"stage width {dim} is not divisible by its {heads} attention heads")
    if self.embed_dims[0] % 2:
      raise self.refusal(f"the patch embedding halves embed_dims[0]; {self.embed_dims[0]} is odd")

  @property
  def merge_strides(self) -> tuple[int, ...]:
    """The stride of each stage's patch merging (all stages but the last have one)."""
    return tuple(1 if out in _KEEP_RESOLUTION_WIDTHS else 2 for out in self.embed_dims[1:])

  @property
  def total_stride(self) -> int:
    return self.patch_stride ** 2 * math.prod(self.merge_strides)


def infer_tiny_vit(shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> tuple[TinyVitConfig, int]:
  """(config, image size) read off a converted parameter tree's shapes (Flax paths under "image_encoder").

  Heads come from the attention-bias tables (heads, offsets) and the window from their offsets (a w x w window has
  w * w distinct |dy|, |dx| offsets); the image size is what makes the reference's 64 x 64 embedding."""
  def shape(*path: str) -> tuple[int, ...]:
    try:
      return tuple(shapes[("image_encoder", *path)])
    except KeyError:
      raise ValueError(f"checkpoint has no tensor for image_encoder.{'.'.join(path)}; it is not a TinyViT "
                       "checkpoint") from None

  stages = 1 + max(int(p[2]) for p in shapes if p[:2] == ("image_encoder", "layers"))
  depths = [1 + max(int(p[4]) for p in shapes if p[:4] == ("image_encoder", "layers", str(i), "blocks"))
            for i in range(stages)]
  embed_dims = [shape("layers", "0", "blocks", "0", "conv1", "kernel")[2]]
  embed_dims += [shape("layers", str(i), "blocks", "0", "attn", "proj", "kernel")[1] for i in range(1, stages)]
  heads, windows = [1], [1]
  for i in range(1, stages):
    h, offsets = shape("layers", str(i), "blocks", "0", "attn", "attention_biases")
    w = math.isqrt(offsets)
    if w * w != offsets:
      raise ValueError(f"stage {i}'s attention bias has {offsets} offsets, not those of a square window")
    heads.append(h)
    windows.append(w)
  hidden = shape("layers", "1", "blocks", "0", "mlp", "lin1", "kernel")[1]
  expand = shape("layers", "0", "blocks", "0", "conv1", "kernel")[3]
  local = shape("layers", "1", "blocks", "0", "local_conv", "kernel")[0]
  kernel = shape("patch_embed", "conv1", "kernel")[0]
  config = TinyVitConfig(embed_dims=tuple(embed_dims), depths=tuple(depths), num_heads=tuple(heads),
                         window_sizes=tuple(windows), mlp_ratio=hidden / embed_dims[1],
                         mbconv_expand_ratio=expand / embed_dims[0], local_conv_size=local,
                         patch_kernel_size=kernel, patch_stride=1 if kernel == 1 else 2)
  return config, EMBEDDING_GRID * config.total_stride


class ConvBN(nnx.Module):
  """PyTorch's Conv2d (no bias) + BatchNorm2d in inference form, the BatchNorm folded into the kernel when traced:
  conv(x, kernel * s) + (bias - mean * s) with s = weight / sqrt(var + eps). The statistics are Buffers (never
  trained); the convolution's operands are in `dtype` (None: float32), its result and the rest float32.

  On CPU, 1 x 1 convolutions run as one matmul and depthwise ones as a sum of k * k shifted, scaled copies: XLA:CPU's
  grouped convolution is about 8x slower than that sum (LiteMedSAM's 3 x 3 depthwise conv over 256 channels at
  256 x 256, batch 4: 2.1 s against 0.26 s; PyTorch 0.40 s), and its 1 x 1 convolution about 2x slower than the
  matmul."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
               groups: int = 1, *, dtype=None, rngs: nnx.Rngs):
    fan_in = in_features // groups * kernel_size ** 2
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (kernel_size, kernel_size, in_features // groups,
                                                              out_features)) / math.sqrt(fan_in))
    self.bn_scale = nnx.Param(jnp.ones((out_features,)))
    self.bn_bias = nnx.Param(jnp.zeros((out_features,)))
    self.bn_mean = Buffer(jnp.zeros((out_features,)))
    self.bn_var = Buffer(jnp.ones((out_features,)))
    self.stride, self.padding, self.groups, self.dtype = stride, padding, groups, dtype

  def __call__(self, x: Array) -> Array:
    scale = self.bn_scale[...] / jnp.sqrt(self.bn_var[...] + 1e-5)
    shift = self.bn_bias[...] - self.bn_mean[...] * scale
    kernel = self.kernel[...] * scale
    k, s, p = kernel.shape[0], self.stride, self.padding
    depthwise = self.groups > 1 and self.groups == kernel.shape[-1] == x.shape[-1]
    if k == 1 and s == 1 and p == 0 and self.groups == 1:
      y = matmul(x, kernel[0, 0], self.dtype)
    elif depthwise and jax.default_backend() == "cpu":
      y = _depthwise_shifted(x.astype(jnp.float32), kernel[:, :, 0], s, p)
    else:
      dtype = self.dtype or jnp.float32
      y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (s, s), ((p, p), (p, p)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
                                       preferred_element_type=jnp.float32)
    return y + shift


def _depthwise_shifted(x: Array, kernel: Array, stride: int, padding: int) -> Array:
  """Depthwise convolution (B, H, W, C) * (k, k, C) as the sum of k * k strided, shifted copies of the padded input."""
  k = kernel.shape[0]
  b, h, w, c = x.shape
  oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride] * kernel[i, j]
      out = term if out is None else out + term
  return out


class PatchEmbed(nnx.Module):
  def __init__(self, dim: int, kernel_size: int, stride: int, *, dtype=None, rngs: nnx.Rngs):
    pad = kernel_size // 2
    self.conv1 = ConvBN(3, dim // 2, kernel_size, stride, pad, dtype=dtype, rngs=rngs)
    self.conv2 = ConvBN(dim // 2, dim, kernel_size, stride, pad, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv2(gelu(self.conv1(x)))


class MBConv(nnx.Module):
  """Inverted residual: 1x1 expand, depthwise 3x3, 1x1 project, residual sum, then GELU (after the sum)."""

  def __init__(self, dim: int, expand_ratio: float, *, dtype=None, rngs: nnx.Rngs):
    hidden = int(dim * expand_ratio)
    self.conv1 = ConvBN(dim, hidden, dtype=dtype, rngs=rngs)
    self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden, dtype=dtype, rngs=rngs)
    self.conv3 = ConvBN(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return gelu(self.conv3(gelu(self.conv2(gelu(self.conv1(x))))) + x)


class PatchMerging(nnx.Module):
  def __init__(self, dim: int, out_dim: int, stride: int, *, dtype=None, rngs: nnx.Rngs):
    self.conv1 = ConvBN(dim, out_dim, dtype=dtype, rngs=rngs)
    self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim, dtype=dtype, rngs=rngs)
    self.conv3 = ConvBN(out_dim, out_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.conv3(gelu(self.conv2(gelu(self.conv1(x)))))


@functools.lru_cache(maxsize=None)
def bias_index(window: int) -> tuple[np.ndarray, int]:
  """(N, N) index into a head's bias table for the N = window^2 tokens of a window, and the table's size: offsets
  (|dy|, |dx|) numbered in the order they first appear scanning query then key positions row-major (the order the
  checkpoint's tables are stored in)."""
  points = list(itertools.product(range(window), range(window)))
  offsets: dict[tuple[int, int], int] = {}
  index = np.empty((len(points), len(points)), np.int32)
  for i, (y1, x1) in enumerate(points):
    for j, (y2, x2) in enumerate(points):
      index[i, j] = offsets.setdefault((abs(y1 - y2), abs(x1 - x2)), len(offsets))
  index.setflags(write=False)
  return index, len(offsets)


class Attention(nnx.Module):
  """Multi-head attention within a window, with its own pre-LayerNorm and a learned bias per head and offset."""

  def __init__(self, dim: int, num_heads: int, window: int, *, dtype=None, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.window = window
    self.dtype = dtype
    self.norm = layer_norm(dim, 1e-5, rngs=rngs)
    self.qkv = Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
    self.proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.attention_biases = nnx.Param(jnp.zeros((num_heads, bias_index(window)[1])))

  def __call__(self, x: Array) -> Array:
    """(B, N, C) tokens of windows -> (B, N, C)."""
    b, n, c = x.shape
    heads, head_dim = self.num_heads, c // self.num_heads
    dtype = self.dtype or jnp.float32
    # (3, B, heads, N, head_dim): heads-major matmuls, which XLA:CPU runs 2.5x faster than token-major einsums here.
    q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, heads, head_dim).transpose(2, 0, 3, 1, 4).astype(dtype)
    index, _ = bias_index(self.window)
    logits = jnp.matmul(q * jnp.asarray(head_dim ** -0.5, dtype), k.swapaxes(-1, -2),
                        preferred_element_type=jnp.float32) + self.attention_biases[...][:, index]
    # The softmax's normalisation after the product with the values: N divisions per query instead of N * N.
    weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    out = jnp.matmul(weights.astype(dtype), v, preferred_element_type=jnp.float32) / weights.sum(-1, keepdims=True)
    return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, c))


class MLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
    self.norm = layer_norm(dim, 1e-5, rngs=rngs)
    self.lin1 = Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.lin2 = Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.lin2(gelu(self.lin1(self.norm(x))))


class Block(nnx.Module):
  """Windowed attention (zero-padded to whole windows, cropped after), residual; depthwise local conv; MLP,
  residual. Works on (B, H, W, C) grids."""

  def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int, *, dtype=None,
               rngs: nnx.Rngs):
    self.window = window
    self.attn = Attention(dim, num_heads, window, dtype=dtype, rngs=rngs)
    self.local_conv = ConvBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim, dtype=dtype,
                             rngs=rngs)
    self.mlp = MLP(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    s = self.window
    ph, pw = -h % s, -w % s
    windows = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    nh, nw = (h + ph) // s, (w + pw) // s
    windows = windows.reshape(b, nh, s, nw, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, s * s, c)
    attended = self.attn(windows).reshape(b, nh, nw, s, s, c).transpose(0, 1, 3, 2, 4, 5)
    x = x + attended.reshape(b, nh * s, nw * s, c)[:, :h, :w]
    x = self.local_conv(x)
    return x + self.mlp(x)


class Stage(nnx.Module):
  def __init__(self, blocks: list[nnx.Module], downsample: PatchMerging | None):
    self.blocks = nnx.List(blocks)
    self.downsample = downsample

  def __call__(self, x: Array, remat: bool = False) -> Array:
    for block in self.blocks:
      x = _checkpointed(block, x) if remat else block(x)
    return x if self.downsample is None else self.downsample(x)


def _checkpointed(block: nnx.Module, x: Array) -> Array:
  graphdef, state = nnx.split(block)
  return jax.checkpoint(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


class TinyViTEncoder(nnx.Module):
  """(B, S, S, 3) preprocessed images -> (B, S / total_stride, S / total_stride, out_chans) image embeddings.

  `dtype` is the convolutions' and matmuls' operand dtype (norms, softmax, residual sums stay float32; the output is
  float32); `remat` recomputes each attention block's activations in the backward pass."""

  def __init__(self, config: TinyVitConfig, image_size: int, out_chans: int, *, dtype=None, remat: bool = False,
               rngs: nnx.Rngs):
    self.config = config
    self.image_size = image_size
    self.dtype = dtype
    self.remat = remat
    dims = config.embed_dims
    self.patch_embed = PatchEmbed(dims[0], config.patch_kernel_size, config.patch_stride, dtype=dtype, rngs=rngs)
    layers = []
    for i, depth in enumerate(config.depths):
      downsample = (PatchMerging(dims[i], dims[i + 1], config.merge_strides[i], dtype=dtype, rngs=rngs)
                    if i + 1 < len(dims) else None)
      if i == 0:
        blocks = [MBConv(dims[0], config.mbconv_expand_ratio, dtype=dtype, rngs=rngs) for _ in range(depth)]
      else:
        blocks = [Block(dims[i], config.num_heads[i], config.window_sizes[i], config.mlp_ratio,
                        config.local_conv_size, dtype=dtype, rngs=rngs) for _ in range(depth)]
      layers.append(Stage(blocks, downsample))
    self.layers = nnx.List(layers)
    self.neck = Neck(dims[-1], out_chans, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    size = self.image_size
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
      raise ValueError(f"image encoder expects (batch, {size}, {size}, 3) images, got {x.shape}")
    x = self.patch_embed(x)
    for i, layer in enumerate(self.layers):
      x = layer(x, remat=self.remat and i > 0)
    return self.neck(x)

  def adaptable_blocks(self) -> list[Block]:
    """The attention blocks, whose attn.qkv / attn.proj / mlp.lin1 / mlp.lin2 LoRA may adapt."""
    return [block for layer in list(self.layers)[1:] for block in layer.blocks]

