"""SAM's ViT image encoder in Flax NNX, channels-last, numerically equal to Meta's `ImageEncoderViT`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autosam_jax.models.config import SamConfig
from autosam_jax.models.layers import (  # noqa: F401 - the attention platform helpers are importable from here too
    CUDNN_DTYPES, CUDNN_MAX_HEAD_DIM, Linear, Neck, cudnn_takes, current_platform, gelu, layer_norm, matmul)

Array = jax.Array


def relative_position_index(size: int) -> np.ndarray:
  """index[i, j] = i - j + size - 1 into a (2 * size - 1)-row table (Meta's `get_rel_pos` for equal q/k sizes)."""
  coords = np.arange(size)
  return coords[:, None] - coords[None, :] + size - 1


def softmax(logits: Array) -> Array:
  # Written out: on CPU this fuses into two passes where jax.nn.softmax's guarded version takes more.
  exp = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  return exp / jnp.sum(exp, axis=-1, keepdims=True)


def query_rows_per_chunk(height: int, width: int, max_tokens: int = 128) -> int:
  """Rows of queries attended at once: all of them for small grids, else the largest divisor of `height` whose
  rows hold at most `max_tokens` queries, so that a chunk's logits stay in cache instead of a (heads, N, N) array
  going through memory several times (64 MB per head for a 64x64 grid)."""
  if height * width <= 1024:
    return height
  fitting = [r for r in range(1, height + 1) if height % r == 0 and r * width <= max_tokens]
  return max(fitting) if fitting else 1


# How global and windowed attention are computed, each path named for what it runs:
#   "chunked": the CPU path: all queries at once for small grids, else query rows in chunks through lax.map (see
#     query_rows_per_chunk), each chunk under jax.checkpoint;
#   "xla": jax.nn.dot_product_attention(implementation="xla"), the relative-position term as its bias (what
#     implementation=None runs too: in JAX 0.10 that is always XLA's attention, never cuDNN's);
#   "cudnn": jax.nn.dot_product_attention(implementation="cudnn"), cuDNN's fused flash attention: bf16/fp16 inputs
#     only, head dim <= 128 and a multiple of 8, and a bias gradient only for an attention batch of 1 (a windowed
#     block's batch is images x windows), so for forward passes nothing differentiates;
#   "auto": `attention_for` decides where the encoder is traced, for the platform it runs on, its dtype and head
#     dim, and whether it is frozen (`set_attention(..., frozen=True)`: precompute, zero-shot, predict).
ATTENTION_IMPLEMENTATIONS = ("auto", "chunked", "xla", "cudnn")


# Saved configs of earlier versions say "fused": jax.nn.dot_product_attention(implementation=None), which is XLA's.
LEGACY_ATTENTION = {"fused": "xla"}


def check_attention(implementation: str) -> str:
  """The implementation's current name (an earlier version's name mapped to what it ran); ValueError if unknown."""
  implementation = LEGACY_ATTENTION.get(implementation, implementation)
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention {implementation!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
  return implementation


def attention_for(platform: str, dtype, head_dim: int, frozen: bool) -> str:
  """The path "auto" takes on `platform` (`current_platform`) for matmuls in `dtype` (None: float32) and heads of
  `head_dim`: query chunks on the CPU; cuDNN for a frozen encoder's forward on CUDA where cuDNN takes the dtype and
  head dim (precompute, zero-shot and predict of SAM-ViT in bf16); XLA's attention otherwise: in training (a LoRA
  step differentiates the relative-position bias, which depends on the adapted queries, and cuDNN returns a bias
  gradient only for a batch of 1), in float32, for other head dims, on other accelerators."""
  if platform == "cpu":
    return "chunked"
  if frozen and platform == "cuda" and cudnn_takes(dtype, head_dim):
    return "cudnn"
  return "xla"


def resolve_attention(implementation: str, platform: str | None = None, *, dtype=None, head_dim: int = 64,
                      frozen: bool = False) -> str:
  """`implementation` itself, or for "auto" `attention_for(platform or current_platform(), dtype, head_dim,
  frozen)`."""
  implementation = check_attention(implementation)
  if implementation != "auto":
    return implementation
  return attention_for(platform or current_platform(), dtype, head_dim, frozen)


class Attention(nnx.Module):
  """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative position bias (MViTv2)."""

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, use_rel_pos: bool, grid_size: int,
               dtype=None, attention: str = "auto", rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.attention = check_attention(attention)  # resolved for the platform when traced (`resolve_attention`)
    self.frozen = False  # set_attention(..., frozen=True): no gradient ever flows through this attention
    self.head_dim = dim // num_heads
    self.qkv = Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
    self.proj = Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.use_rel_pos = use_rel_pos
    self.dtype = dtype
    if use_rel_pos:
      self.rel_pos_h = nnx.Param(jnp.zeros((2 * grid_size - 1, self.head_dim)))
      self.rel_pos_w = nnx.Param(jnp.zeros((2 * grid_size - 1, self.head_dim)))

  def __call__(self, x: Array) -> Array:
    return self.proj(self.mix(self.qkv(x)))

  def mix(self, qkv: Array, query_rows: int | None = None, query_cols: int | None = None) -> Array:
    """The attention between the projections: (B, H, W, 3C) queries, keys and values -> (B, R, C', C), the input of
    `proj`, for the queries of the top-left R x C' tokens only (default: all of them; every token is still a key).
    A windowed block attends its padded windows' real tokens this way, and runs `qkv` and `proj`, which act token by
    token, on its unpadded grid."""
    b, h, w, three_dim = qkv.shape
    dim = three_dim // 3
    rows, cols = query_rows or h, query_cols or w
    heads, head_dim = self.num_heads, self.head_dim
    # Head-major (3, B, heads, H, W, head_dim): every matmul below then has its batch axes leading.
    qkv = qkv.astype(self.dtype or jnp.float32)
    qkv = qkv.reshape(b, h, w, 3, heads, head_dim).transpose(3, 0, 4, 1, 2, 5)
    q = qkv[0] if (rows, cols) == (h, w) else qkv[0][:, :, :rows, :cols]
    k, v = qkv[1].reshape(b, heads, h * w, head_dim), qkv[2].reshape(b, heads, h * w, head_dim)
    rel_h = rel_w = None
    if self.use_rel_pos:
      # Meta adds the bias computed from the unscaled query.
      table_h = self.rel_pos_h[...][relative_position_index(h)[:rows]].astype(q.dtype)  # (R, H, head_dim)
      table_w = self.rel_pos_w[...][relative_position_index(w)[:cols]].astype(q.dtype)  # (C', W, head_dim)
      rel_h = jnp.einsum("bnyxd,ykd->bnyxk", q, table_h, preferred_element_type=jnp.float32)
      rel_w = jnp.einsum("bnyxd,xld->bnyxl", q, table_w, preferred_element_type=jnp.float32)
    implementation = resolve_attention(self.attention, dtype=q.dtype, head_dim=head_dim, frozen=self.frozen)
    if implementation != "chunked":
      return self._fused(q, k, v, rel_h, rel_w, (h, w), implementation)
    scale = jnp.asarray(head_dim ** -0.5, q.dtype)

    def attend(q_rows, rel_h_rows, rel_w_rows):
      chunk = q_rows.shape[2]
      logits = jnp.einsum("bnyxd,bnkd->bnyxk", q_rows * scale, k, preferred_element_type=jnp.float32)
      if rel_h_rows is not None:
        logits = logits.reshape(b, heads, chunk, cols, h, w) + rel_h_rows[..., :, None] + rel_w_rows[..., None, :]
        logits = logits.reshape(b, heads, chunk, cols, h * w)
      return jnp.einsum("bnyxk,bnkd->bnyxd", softmax(logits).astype(v.dtype), v,
                        preferred_element_type=jnp.float32)

    chunk = query_rows_per_chunk(rows, cols)
    if chunk == rows:
      out = attend(q, rel_h, rel_w)
    else:
      def chunks(a):  # (B, heads, R, ...) -> (R / chunk, B, heads, chunk, ...)
        return None if a is None else jnp.moveaxis(a.reshape(b, heads, rows // chunk, chunk, *a.shape[3:]), 2, 0)
      # Each chunk under jax.checkpoint: a backward pass recomputes one chunk's logits at a time instead of keeping
      # every chunk's (the whole (B, heads, H * W, H * W) attention of a global block, 3.2 GB at vit_b's 64 x 64
      # grid and batch 4); a forward pass alone is unchanged.
      out = jax.lax.map(jax.checkpoint(lambda c: attend(*c)), (chunks(q), chunks(rel_h), chunks(rel_w)))
      out = jnp.moveaxis(out, 0, 2).reshape(b, heads, rows, cols, head_dim)
    return out.transpose(0, 2, 3, 1, 4).reshape(b, rows, cols, dim)

  def _fused(self, q, k, v, rel_h, rel_w, key_grid: tuple[int, int], implementation: str) -> Array:
    """jax.nn.dot_product_attention(implementation=`implementation`: "xla" or "cudnn") over (B, tokens, heads,
    head_dim), the decomposed relative-position term materialised as its (B, heads, queries, keys) bias; (B, R, C', C)
    out for (B, heads, R, C', head_dim) queries."""
    if implementation == "cudnn" and not cudnn_takes(q.dtype, q.shape[-1]):
      raise ValueError(f"attention 'cudnn': cuDNN's fused attention takes bf16/fp16 queries with a head dim <= "
                       f"{CUDNN_MAX_HEAD_DIM} and a multiple of 8, not {q.dtype} with head dim {q.shape[-1]}; use "
                       "attention 'xla' (or 'auto')")
    b, heads, rows, cols, head_dim = q.shape
    queries, keys = rows * cols, key_grid[0] * key_grid[1]
    bias = None
    if rel_h is not None:
      bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, heads, queries, keys).astype(q.dtype)
    out = jax.nn.dot_product_attention(
        q.reshape(b, heads, queries, head_dim).transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3), bias=bias, scale=head_dim ** -0.5, implementation=implementation)
    return out.astype(jnp.float32).reshape(b, rows, cols, heads * head_dim)


class MLPBlock(nnx.Module):

  def __init__(self, dim: int, mlp_dim: int, activation, *, dtype=None, rngs: nnx.Rngs):
    self.lin1 = Linear(dim, mlp_dim, dtype=dtype, rngs=rngs)
    self.lin2 = Linear(mlp_dim, dim, dtype=dtype, rngs=rngs)
    self.activation = activation

  def __call__(self, x: Array) -> Array:
    return self.lin2(self.activation(self.lin1(x)))


class Block(nnx.Module):
  """Pre-norm transformer block; windowed attention when `window_size` > 0, global attention otherwise."""

  def __init__(self, config: SamConfig, window_size: int, *, dtype=None, attention: str = "auto",
               rngs: nnx.Rngs):
    dim = config.encoder_embed_dim
    self.window_size = window_size
    self.norm1 = layer_norm(dim, 1e-6, rngs=rngs)
    self.attn = Attention(dim, config.encoder_num_heads, qkv_bias=config.qkv_bias, use_rel_pos=config.use_rel_pos,
                          grid_size=window_size or config.image_embedding_size, dtype=dtype, attention=attention,
                          rngs=rngs)
    self.norm2 = layer_norm(dim, 1e-6, rngs=rngs)
    self.mlp = MLPBlock(dim, config.encoder_mlp_dim, gelu, dtype=dtype, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    shortcut = x
    x = self.norm1(x)
    if self.window_size > 0:
      x = self._windowed_attention(x)
    else:
      x = self.attn(x)
    x = shortcut + x
    return x + self.mlp(self.norm2(x))

  def _windowed_attention(self, x: Array) -> Array:
    """Meta's windowed attention: zero-pad the grid to whole windows, attend within each window, crop. The same
    numbers for less work:
      - `qkv` and `proj` act token by token, so they run on the unpadded grid: a padding token's projections are
        those of a zero token (the biases), and its outputs would be cropped;
      - the padding tokens are keys and values as in Meta's, but never queries: the windows on the grid's last row
        and column attend their real tokens' queries only (each group of windows with the same real size at once).
    At vit_b's 16 x 16 grid of 256 px (padded to 28 x 28) that is a third of the projections' and the attention's
    queries; at 1024 px (64 x 64 padded to 70 x 70), 84%."""
    window = self.window_size
    b, h, w, dim = x.shape
    qkv = self.attn.qkv(x)
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
      padding_token = self.attn.qkv(jnp.zeros((1, 1, 1, dim), x.dtype))  # exactly the bias (+ 0 from LoRA factors)
      real = np.zeros((1, h + pad_h, w + pad_w, 1), bool)
      real[:, :h, :w] = True
      qkv = jnp.where(real, jnp.pad(qkv, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))), padding_token)
    n_h, n_w = (h + pad_h) // window, (w + pad_w) // window
    windows = qkv.reshape(b, n_h, window, n_w, window, -1).transpose(0, 1, 3, 2, 4, 5)  # (B, nH, nW, ws, ws, 3C)

    def groups(n: int, size: int) -> list[tuple[slice, int]]:  # (windows, real tokens in each) along one axis
      last = size - (n - 1) * window
      if last == window:
        return [(slice(0, n), window)]
      return ([(slice(0, n - 1), window)] if n > 1 else []) + [(slice(n - 1, n), last)]

    bands = []
    for row_windows, rows in groups(n_h, h):
      parts = []
      for col_windows, cols in groups(n_w, w):
        group = windows[:, row_windows, col_windows]
        gr, gc = group.shape[1:3]
        out = self.attn.mix(group.reshape(b * gr * gc, window, window, -1), rows, cols)  # (B gr gc, rows, cols, C)
        out = out.reshape(b, gr, gc, rows, cols, dim).transpose(0, 1, 3, 2, 4, 5)
        parts.append(out.reshape(b, gr * rows, gc * cols, dim))
      bands.append(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2))
    mixed = bands[0] if len(bands) == 1 else jnp.concatenate(bands, axis=1)  # (B, H, W, C)
    return self.attn.proj(mixed)


class PatchEmbed(nnx.Module):
  """Conv(k=p, s=p) written as patchify + matmul (same sums, no convolution kernel needed)."""

  def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, dtype=None, rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.kernel = nnx.Param(nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)(
        rngs.params(), (patch_size, patch_size, in_chans, embed_dim)))
    self.bias = nnx.Param(jnp.zeros((embed_dim,)))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    p = self.patch_size
    patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, p * p * c)
    return matmul(patches, self.kernel[...].reshape(p * p * c, -1), self.dtype) + self.bias[...]


class ImageEncoderViT(nnx.Module):
  """(B, S, S, 3) normalised, padded images -> (B, S/16, S/16, 256) image embeddings.

  `dtype` is the matmul dtype (e.g. jnp.bfloat16: bf16 operands, float32 accumulation); norms, softmax and the
  residual stream stay float32, and parameters are always stored in float32. The output is float32.
  `attention` is how attention is computed (ATTENTION_IMPLEMENTATIONS; `set_attention` changes it later), and
  `remat` wraps each block in jax.checkpoint (its activations are recomputed in the backward pass instead of kept:
  the memory of training with the encoder in the loop).
  """

  def __init__(self, config: SamConfig, *, dtype=None, attention: str = "auto", remat: bool = False,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    dim = config.encoder_embed_dim
    grid = config.image_embedding_size
    self.patch_embed = PatchEmbed(config.patch_size, 3, dim, dtype=dtype, rngs=rngs)
    self.pos_embed = nnx.Param(jnp.zeros((1, grid, grid, dim))) if config.use_abs_pos else None
    self.blocks = nnx.List([
        Block(config, 0 if i in config.encoder_global_attn_indexes else config.window_size, dtype=dtype,
              attention=attention, rngs=rngs)
        for i in range(config.encoder_depth)
    ])
    self.neck = Neck(dim, config.prompt_embed_dim, dtype=dtype, rngs=rngs)
    self.remat = remat

  def __call__(self, x: Array) -> Array:
    size = self.config.image_size
    if x.ndim != 4 or x.shape[1:] != (size, size, 3):
      raise ValueError(f"image encoder expects (batch, {size}, {size}, 3) images, got {x.shape}")
    x = self.patch_embed(x)
    if self.pos_embed is not None:
      x = x + self.pos_embed[...]
    for block in self.blocks:
      x = _checkpointed(block, x) if self.remat else block(x)
    return self.neck(x)


def _checkpointed(block: nnx.Module, x: Array) -> Array:
  """`block(x)` under jax.checkpoint. A pure function of the block's state (split here, merged inside), so that it
  also traces where the encoder was itself merged inside a plain JAX transform (jax.grad over split parameters, as
  the trainer does), where nnx.remat would have to update variables of an outer trace."""
  graphdef, state = nnx.split(block)
  return jax.checkpoint(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)


def set_attention(encoder: ImageEncoderViT, implementation: str, *, frozen: bool | None = None) -> ImageEncoderViT:
  """Every block of `encoder` computes attention with `implementation` (ATTENTION_IMPLEMENTATIONS) from now on.

  frozen: True for an encoder that only runs forward passes nothing differentiates (the frozen encoder of precompute,
  zero-shot and predict), where "auto" may take cuDNN's fused attention (`attention_for`); None leaves it as it was
  (False when built)."""
  check_attention(implementation)
  for block in encoder.blocks:
    block.attn.attention = implementation
    if frozen is not None:
      block.attn.frozen = frozen
  return encoder
