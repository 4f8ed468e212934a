"""Hiera with SAM 2's FPN neck, the image encoder of SAM 2 / SAM 2.1 and MedSAM2, in Flax NNX (channels-last).

The trunk: a 7 x 7 / 4 convolutional patch embedding; a position embedding made of a small background grid
(bicubic-resized to the token grid, as PyTorch's `interpolate(mode="bicubic")` does) plus a window-sized embedding
tiled over it; then stages of blocks (LayerNorm, multi-head attention inside non-overlapping windows or over the whole
grid, LayerNorm, GELU MLP). The first block of every later stage widens the channels (x2), doubles the heads and
halves the grid by max-pooling its queries (and its projected shortcut) with stride 2. Each stage's last output
goes to the FPN neck: a 1 x 1 convolution per level to 256 channels, the coarser levels added top-down (nearest
upsampling) into the levels named in `fpn_top_down_levels`; the coarsest level is dropped (`scalp`).

What SAM 2's mask decoder reads, and what this encoder returns (`SAM2ImagePredictor.set_image`'s features):
  "embedding"  the stride-16 level plus `no_mem_embed` (B, S/16, S/16, 256), (64, 64) for a 1024 input;
  "high_res"   [conv_s0(stride-4 level) (B, S/4, S/4, 32), conv_s1(stride-8 level) (B, S/8, S/8, 64)]: the mask
               decoder's 1 x 1 projections, applied once here as SAM 2 does (`SAM2Base.forward_image`).

Layout choices, made once at conversion (`weights_conversion/tables.py`, SAM2): the MLP's linears are `lin1`/`lin2`
(PyTorch: layers.0 / layers.1), so LoRA names the same targets in every family; the fused qkv's columns are already
[all q | all k | all v] in SAM 2.

Attention off cuDNN (XLA's path, the CPU's): heads-major operands (queries pooled in that layout), the softmax's
normalisation after the product with the values, and a global block's queries in chunks of 256 so that their logits
stay in cache (on a 2-core CPU, hiera tiny at 1024 px: 1.45x the whole encoder over the token-major form it replaced;
docs/benchmarks.md). The same sums per query as Meta's code; only the rounding order differs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autosam_jax.models.layers import Linear, cudnn_takes, current_platform, gelu, layer_norm
from autosam_jax.typed_config import TypedConfig, option

Array = jax.Array

PATCH_STRIDE = 4  # the patch embedding: 7 x 7 convolution, stride 4, padding 3
Q_STRIDE = 2  # query pooling at every stage change
# The mask decoder's high-resolution projections (conv_s0, conv_s1) narrow the two finest levels to prompt_embed_dim
# divided by these.
HIGH_RES_DIVISORS = (8, 4)


@dataclasses.dataclass(frozen=True)
class HieraConfig(TypedConfig):
  """The Hiera trunk and FPN neck of SAM 2. Shapes tell the widths, stages, background grid and first window
  (`infer_hiera`); heads, windows and global blocks come from the release whose widths and stages match (`PRESETS`)
  or are given."""

  OPTIONS = "Hiera"

  embed_dim: int = option(96, at_least=1)
  num_heads: int = option(1, at_least=1)  # of the first stage; doubled at every stage change
  stages: tuple[int, ...] = option((1, 2, 7, 2), at_least=1)
  global_att_blocks: tuple[int, ...] = option((5, 7, 9), at_least=0)
  window_spec: tuple[int, ...] = option((8, 4, 14, 7), at_least=1)  # window side per stage
  window_pos_embed_bkg_spatial_size: tuple[int, int] = option((7, 7), at_least=1)
  # The neck: levels that receive the coarser level's features, and how many of the coarsest levels are dropped.
  fpn_top_down_levels: tuple[int, ...] = option((2, 3), at_least=0)
  scalp: int = option(1, at_least=0)
  # SAM2Base.directly_add_no_mem_embed: the image predictor adds `no_mem_embed` to the embedding.
  add_no_mem_embed: bool = option(True, kind="true or false")

  def check(self) -> None:
    if len(self.window_spec) != len(self.stages):
      raise self.refusal(f"window_spec has {len(self.window_spec)} entries for {len(self.stages)} stages")
    if len(self.stages) - self.scalp < 3:
      raise self.refusal(f"{len(self.stages)} stages less scalp {self.scalp} leave fewer than the 3 levels SAM 2's "
                         "decoder reads (two high-resolution maps and the embedding)")
    if any(w % Q_STRIDE for w in self.window_spec[:-1]):
      raise self.refusal(f"window_spec {list(self.window_spec)}: windows before the last stage pool their queries "
                         f"by {Q_STRIDE} and must be even")
    bad = [i for i in self.global_att_blocks if not i < self.depth]
    if bad:
      raise self.refusal(f"global_att_blocks {bad} are outside the trunk's blocks 0..{self.depth - 1}")
    bad = [i for i in self.fpn_top_down_levels if not i < len(self.stages)]
    if bad:
      raise self.refusal(f"fpn_top_down_levels {bad} are not levels of the {len(self.stages)} stages")

  @property
  def depth(self) -> int:
    return sum(self.stages)

  @property
  def stage_ends(self) -> tuple[int, ...]:
    return tuple(sum(self.stages[:i + 1]) - 1 for i in range(len(self.stages)))

  @property
  def dims(self) -> tuple[int, ...]:
    return tuple(self.embed_dim * 2 ** i for i in range(len(self.stages)))

  @property
  def embedding_stride(self) -> int:
    """The stride of the "embedding" map: the finest level is the patch embedding's, each later one 2x coarser."""
    return PATCH_STRIDE * Q_STRIDE ** (len(self.stages) - 1 - self.scalp)

  def check_image_size(self, image_size: int) -> str | None:
    """What keeps this trunk from running at `image_size` (the coarsest level must be a whole grid; the window
    embedding tiles the first level's grid), or None."""
    coarsest = PATCH_STRIDE * Q_STRIDE ** (len(self.stages) - 1)
    if image_size % coarsest:
      return f"is not a multiple of the Hiera trunk's total stride {coarsest}"
    if (image_size // PATCH_STRIDE) % self.window_spec[0]:
      return (f"gives a first-stage grid of {image_size // PATCH_STRIDE} tokens, not a multiple of the first window "
              f"{self.window_spec[0]} that its window position embedding tiles")
    return None

  def blocks(self) -> list[tuple[int, int, int, int, bool]]:
    """(dim, dim_out, heads, window, pools) per block, as Meta's `Hiera.__init__` lays them out: the first block
    of a stage keeps the previous stage's window and pools its queries."""
    out, dim, heads, stage = [], self.embed_dim, self.num_heads, 0
    starts = {end + 1 for end in self.stage_ends[:-1]}
    for i in range(self.depth):
      window = self.window_spec[stage]
      dim_out = dim
      if i in starts:
        dim_out, heads, stage = dim * 2, heads * 2, stage + 1
      out.append((dim, dim_out, heads, 0 if i in self.global_att_blocks else window, i in starts))
      dim = dim_out
    return out


# SAM 2 / SAM 2.1's releases (Meta's configs sam2.1_hiera_{t,s,b+,l}.yaml; SAM 2.0's are the same); MedSAM2 is
# hiera tiny at 512 px.
PRESETS: dict[str, HieraConfig] = {
    "tiny": HieraConfig(96, 1, (1, 2, 7, 2), (5, 7, 9), (8, 4, 14, 7), (7, 7)),
    "small": HieraConfig(96, 1, (1, 2, 11, 2), (7, 10, 13), (8, 4, 14, 7), (7, 7)),
    "base_plus": HieraConfig(112, 2, (2, 3, 16, 3), (12, 16, 20), (8, 4, 14, 7), (14, 14)),
    "large": HieraConfig(144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), (7, 7)),
}


def infer_hiera(shapes: Mapping[tuple[str, ...], tuple[int, ...]], given: Mapping | None = None) -> HieraConfig:
  """The trunk read off a converted parameter tree's shapes (Flax paths under "image_encoder"): width, stages (a
  stage starts where a block has a shortcut projection), background grid and first window. Heads, windows and global
  blocks are the matching release's (`PRESETS`) unless `given` sets them; an unknown trunk without them is refused."""
  def shape(*path: str) -> tuple[int, ...]:
    try:
      return tuple(shapes[("image_encoder", *path)])
    except KeyError:
      raise ValueError(f"checkpoint has no tensor for image_encoder.{'.'.join(path)}; it is not a SAM 2 "
                       "checkpoint") from None

  embed_dim = shape("patch_embed", "kernel")[-1]
  depth = 1 + max(int(p[2]) for p in shapes if p[:2] == ("image_encoder", "blocks"))
  starts = [0] + [i for i in range(depth) if ("image_encoder", "blocks", str(i), "proj", "kernel") in shapes]
  stages = tuple(b - a for a, b in zip(starts, starts[1:] + [depth]))
  background = shape("pos_embed")[1:3]
  first_window = shape("pos_embed_window")[1]
  given = dict(given or {})
  known = [(name, preset) for name, preset in PRESETS.items()
           if (preset.embed_dim, preset.stages) == (embed_dim, stages)]
  if known:
    values = dataclasses.asdict(known[0][1])
  else:
    missing = [k for k in ("num_heads", "window_spec", "global_att_blocks") if k not in given]
    if missing:
      releases = "; ".join(f"{n}: width {p.embed_dim}, stages {list(p.stages)}" for n, p in PRESETS.items())
      raise ValueError(f"a Hiera trunk of width {embed_dim} and stages {list(stages)} is none of SAM 2's releases "
                       f"({releases}); give its {', '.join(missing)} (--hiera '{{\"num_heads\": ..., ...}}')")
    values = dataclasses.asdict(HieraConfig())
  values.update(embed_dim=embed_dim, stages=stages, window_pos_embed_bkg_spatial_size=background)
  values.update(given)
  if isinstance(values["window_spec"], (list, tuple)) and values["window_spec"]:
    values["window_spec"] = (first_window, *tuple(values["window_spec"])[1:])
  return HieraConfig.from_dict(values, source="--hiera" if given else "Hiera trunk")


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's 1-D bicubic resize (`interpolate(mode="bicubic",
  align_corners=False)`: cubic convolution with A = -0.75, source index scale * (i + 0.5) - 0.5 unclamped, taps
  clamped to the border). `jax.image.resize`'s "bicubic" uses A = -0.5 and antialiasing, a different result."""
  a = -0.75
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    source = scale * (i + 0.5) - 0.5
    base = math.floor(source)
    t = source - base
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    for tap, w in zip(range(base - 1, base + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      weights[i, min(max(tap, 0), in_size - 1)] += w
  return weights.astype(np.float32)


def max_pool(x: Array, stride: int = Q_STRIDE) -> Array:
  """(B, H, W, C) -> (B, H // s, W // s, C), max over s x s tiles (MaxPool2d(s, s), floor mode)."""
  b, h, w, c = x.shape
  x = x[:, :h // stride * stride, :w // stride * stride]
  return x.reshape(b, h // stride, stride, w // stride, stride, c).max(axis=(2, 4))


def window_partition(x: Array, window: int) -> tuple[Array, tuple[int, int]]:
  """(B, H, W, C) zero-padded to multiples of `window` -> (B * nH * nW, window, window, C), and the padded size."""
  b, h, w, c = x.shape
  hp, wp = -(-h // window) * window, -(-w // window) * window
  x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
  x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(x: Array, window: int, padded: tuple[int, int], size: tuple[int, int]) -> Array:
  hp, wp = padded
  b = x.shape[0] // ((hp // window) * (wp // window))
  x = x.reshape(b, hp // window, wp // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hp, wp, -1)[:, :size[0], :size[1]]


def attention_for(platform: str, dtype, head_dim: int) -> str:
  """The path "auto" takes: cuDNN's fused attention on CUDA where it takes the queries (bf16/fp16, head dim a
  multiple of 8 and at most 128; Hiera's attention has no bias, so its gradient is cuDNN's too), XLA's otherwise."""
  return "cudnn" if platform == "cuda" and cudnn_takes(dtype, head_dim) else "xla"


class Attention(nnx.Module):
  """Multi-head attention over (B, h, w, C) tokens, queries optionally max-pooled by 2 (a stage change)."""

  def __init__(self, dim: int, dim_out: int, num_heads: int, pool: bool, *, dtype=None, rngs: nnx.Rngs):
    self.num_heads, self.pool, self.dtype = num_heads, pool, dtype
    self.qkv = Linear(dim, 3 * dim_out, dtype=dtype, rngs=rngs)
    self.proj = Linear(dim_out, dim_out, dtype=dtype, rngs=rngs)
    self.attention = "auto"

  @property
  def head_dim(self) -> int:
    return self.proj.kernel.shape[0] // self.num_heads

  def __call__(self, x: Array) -> Array:
    b, h, w, _ = x.shape
    heads, head_dim = self.num_heads, self.head_dim
    implementation = self.attention
    if implementation == "auto":
      implementation = attention_for(current_platform(), self.dtype, head_dim)
    qkv = self.qkv(x)
    if implementation == "cudnn":
      q, k, v = jnp.split(qkv, 3, axis=-1)
      if self.pool:
        q = max_pool(q)
      hq, wq = q.shape[1:3]
      dtype = self.dtype or jnp.bfloat16
      q, k, v = (t.reshape(b, -1, heads, head_dim).astype(dtype) for t in (q, k, v))
      out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32)
      return self.proj(out.reshape(b, hq, wq, heads * head_dim))
    # XLA's path, heads-major (3, B, heads, h, w, head_dim): every matmul below has its batch axes leading, and the
    # query pooling (a max, exact in any layout) acts on the grid axes in place.
    qkv = qkv.reshape(b, h, w, 3, heads, head_dim).transpose(3, 0, 4, 1, 2, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if self.pool:
      q = max_pool_heads(q)
    hq, wq = q.shape[2:4]
    dtype = self.dtype or jnp.float32
    q = (q * head_dim ** -0.5).astype(dtype).reshape(b, heads, hq * wq, head_dim)
    k = k.astype(dtype).reshape(b, heads, h * w, head_dim)
    v = v.astype(dtype).reshape(b, heads, h * w, head_dim)
    # Query chunks are a CPU path (DESIGN: CPU tricks only on the CPU); an accelerator attends to all queries at once.
    chunk = query_chunk(hq * wq) if current_platform() == "cpu" else hq * wq
    if chunk == hq * wq:
      out = attend(q, k, v)
    else:
      # A global block's (heads, N, N) logits (4 x 4096 x 4096 floats for hiera tiny at 1024 px) would go through
      # memory several times; a chunk's stay in cache. Each chunk under jax.checkpoint, so that a backward pass keeps
      # one chunk's logits at a time; a forward pass is unchanged.
      chunks = jnp.moveaxis(q.reshape(b, heads, -1, chunk, head_dim), 2, 0)
      out = jax.lax.map(jax.checkpoint(lambda c: attend(c, k, v)), chunks)
      out = jnp.moveaxis(out, 0, 2).reshape(b, heads, hq * wq, head_dim)
    return self.proj(out.transpose(0, 2, 1, 3).reshape(b, hq, wq, heads * head_dim))


# Queries attended at once by XLA's path: all of them up to QUERY_CHUNK_ABOVE, else chunks of QUERY_CHUNK (256 was
# the fastest of 128..1024 for the 64 x 64 global blocks on a 2-core AVX-512 CPU).
QUERY_CHUNK = 256
QUERY_CHUNK_ABOVE = 1024


def query_chunk(queries: int) -> int:
  if queries <= QUERY_CHUNK_ABOVE or queries % QUERY_CHUNK:
    return queries
  return QUERY_CHUNK


def attend(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T) v over (B, heads, N, head_dim) operands (q already scaled; operands in the matmul dtype, float32
  accumulation), the softmax's normalisation applied after the product with the values: N divisions per query
  instead of N x N."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
  out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out / weights.sum(axis=-1, keepdims=True)


def max_pool_heads(x: Array, stride: int = Q_STRIDE) -> Array:
  """`max_pool` over the grid axes of heads-major (B, heads, H, W, head_dim) queries."""
  b, n, h, w, d = x.shape
  x = x[:, :, :h // stride * stride, :w // stride * stride]
  return x.reshape(b, n, h // stride, stride, w // stride, stride, d).max(axis=(3, 5))


class MLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
    self.lin1 = Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.lin2 = Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.lin2(gelu(self.lin1(x)))


class Block(nnx.Module):
  """Meta's `MultiScaleBlock`: windowed (or global) attention with optional query pooling, then the MLP."""

  def __init__(self, dim: int, dim_out: int, num_heads: int, window: int, pool: bool, *, dtype=None,
               rngs: nnx.Rngs):
    self.window, self.pool = window, pool
    self.norm1 = layer_norm(dim, 1e-6, rngs=rngs)
    self.attn = Attention(dim, dim_out, num_heads, pool, dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(dim_out, 1e-6, rngs=rngs)
    self.mlp = MLP(dim_out, 4 * dim_out, dtype=dtype, rngs=rngs)
    self.proj = Linear(dim, dim_out, dtype=dtype, rngs=rngs) if dim != dim_out else None

  def __call__(self, x: Array) -> Array:
    shortcut = x
    x = self.norm1(x)
    if self.proj is not None:
      shortcut = self.proj(x)
      if self.pool:
        shortcut = max_pool(shortcut)
    size = shortcut.shape[1:3]
    if self.window:
      # Windows overhanging the grid hold zero tokens (after the norm), which are keys and values as in the
      # reference.
      x, padded = window_partition(x, self.window)
      x = self.attn(x)
      window = self.window // Q_STRIDE if self.pool else self.window
      padded = tuple(-(-s // window) * window for s in size)
      x = window_unpartition(x, window, padded, size)
    else:
      x = self.attn(x)
    x = shortcut + x
    return x + self.mlp(self.norm2(x))


class HieraEncoder(nnx.Module):
  """(B, S, S, 3) normalised images -> {"embedding": (B, S/16, S/16, D), "high_res": [(B, S/4, S/4, D/8),
  (B, S/8, S/8, D/4)]}, D = prompt_embed_dim (256).

  `dtype` is the matmul dtype (bf16 operands, float32 accumulation); norms, softmax and residuals stay float32.
  `remat` wraps each block in jax.checkpoint."""

  def __init__(self, config: HieraConfig, image_size: int, out_dim: int, *, dtype=None, remat: bool = False,
               rngs: nnx.Rngs):
    self.config, self.image_size, self.dtype, self.remat = config, image_size, dtype, remat
    dim = config.embed_dim
    self.patch_embed = nnx.Conv(3, dim, (7, 7), strides=(PATCH_STRIDE, PATCH_STRIDE), padding=((3, 3), (3, 3)),
                                dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Param(jnp.zeros((1, *config.window_pos_embed_bkg_spatial_size, dim)))
    self.pos_embed_window = nnx.Param(jnp.zeros((1, config.window_spec[0], config.window_spec[0], dim)))
    self.blocks = nnx.List([Block(*spec, dtype=dtype, rngs=rngs) for spec in config.blocks()])
    # neck.convs[j] projects level n - j (Meta's order: the coarsest first).
    self.neck = nnx.List([Linear(d, out_dim, rngs=rngs) for d in reversed(config.dims)])
    self.conv_s0 = Linear(out_dim, out_dim // HIGH_RES_DIVISORS[0], rngs=rngs)
    self.conv_s1 = Linear(out_dim, out_dim // HIGH_RES_DIVISORS[1], rngs=rngs)
    self.no_mem_embed = nnx.Param(jnp.zeros((out_dim,))) if config.add_no_mem_embed else None

  def adaptable_blocks(self) -> list:
    return list(self.blocks)

  def position_embedding(self, grid: tuple[int, int]) -> Array:
    """The background grid bicubic-resized to `grid` plus the window embedding tiled over it: (1, H, W, C)."""
    background = self.pos_embed[...]
    rows = jnp.asarray(bicubic_matrix(background.shape[1], grid[0]))
    cols = jnp.asarray(bicubic_matrix(background.shape[2], grid[1]))
    resized = jnp.einsum("Hh,bhwc,Ww->bHWc", rows, background, cols, precision=jax.lax.Precision.HIGHEST)
    window = self.pos_embed_window[...]
    tiles = (grid[0] // window.shape[1], grid[1] // window.shape[2])
    return resized + jnp.tile(window, (1, *tiles, 1))

  def trunk(self, x: Array) -> list[Array]:
    x = self.patch_embed(x).astype(jnp.float32)
    x = x + self.position_embedding(x.shape[1:3])
    levels = []
    ends = set(self.config.stage_ends)
    for i, block in enumerate(self.blocks):
      x = _checkpointed(block, x) if self.remat else block(x)
      if i in ends:
        levels.append(x)
    return levels

  def __call__(self, x: Array) -> dict[str, Array | list[Array]]:
    size = self.image_size
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
      raise ValueError(f"image encoder expects (batch, {size}, {size}, 3) images, got {x.shape}")
    levels = self.trunk(x)
    n = len(levels) - 1
    out: list[Array | None] = [None] * len(levels)
    previous = None
    for i in range(n, -1, -1):
      lateral = self.neck[n - i](levels[i])
      if i in self.config.fpn_top_down_levels and previous is not None:
        previous = lateral + jnp.repeat(jnp.repeat(previous, 2, axis=1), 2, axis=2)
      else:
        previous = lateral
      out[i] = previous
    kept = out[:len(out) - self.config.scalp]
    embedding = kept[-1]
    if self.no_mem_embed is not None:
      embedding = embedding + self.no_mem_embed[...]
    return {"embedding": embedding, "high_res": [self.conv_s0(kept[0]), self.conv_s1(kept[1])]}


def _checkpointed(block: nnx.Module, x: Array) -> Array:
  graphdef, state = nnx.split(block)
  return jax.checkpoint(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
