"""SAM's two-way transformer (tokens <-> image) in Flax NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from autosam_jax.models.layers import Linear, layer_norm

Array = jax.Array

# Meta's TwoWayTransformer uses nn.LayerNorm's default epsilon, unlike the encoder's 1e-6.
_EPS = 1e-5


class Attention(nnx.Module):
  """Multi-head attention with separate q/k/v projections to `dim / downsample_rate` channels."""

  def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1, *, rngs: nnx.Rngs):
    internal = dim // downsample_rate
    if internal % num_heads:
      raise ValueError(f"{num_heads} heads do not divide the attention width {internal}")
    self.num_heads = num_heads
    self.q_proj = Linear(dim, internal, rngs=rngs)
    self.k_proj = Linear(dim, internal, rngs=rngs)
    self.v_proj = Linear(dim, internal, rngs=rngs)
    self.out_proj = Linear(internal, dim, rngs=rngs)

  def __call__(self, q: Array, k: Array, v: Array) -> Array:
    def heads(x):
      return x.reshape(*x.shape[:-1], self.num_heads, -1)

    q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    return self.out_proj(out.reshape(*out.shape[:-2], -1))


class MLPBlock(nnx.Module):

  def __init__(self, dim: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.lin1 = Linear(dim, mlp_dim, rngs=rngs)
    self.lin2 = Linear(mlp_dim, dim, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.lin2(jax.nn.relu(self.lin1(x)))


class TwoWayAttentionBlock(nnx.Module):
  """Token self-attention, token->image cross-attention, MLP, image->token cross-attention."""

  def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool,
               *, rngs: nnx.Rngs):
    self.self_attn = Attention(dim, num_heads, rngs=rngs)
    self.norm1 = layer_norm(dim, _EPS, rngs=rngs)
    self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate, rngs=rngs)
    self.norm2 = layer_norm(dim, _EPS, rngs=rngs)
    self.mlp = MLPBlock(dim, mlp_dim, rngs=rngs)
    self.norm3 = layer_norm(dim, _EPS, rngs=rngs)
    self.norm4 = layer_norm(dim, _EPS, rngs=rngs)
    self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate, rngs=rngs)
    self.skip_first_layer_pe = skip_first_layer_pe

  def __call__(self, queries: Array, keys: Array, query_pe: Array, key_pe: Array) -> tuple[Array, Array]:
    if self.skip_first_layer_pe:
      queries = self.self_attn(queries, queries, queries)
    else:
      q = queries + query_pe
      queries = queries + self.self_attn(q, q, queries)
    queries = self.norm1(queries)
    q, k = queries + query_pe, keys + key_pe
    queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
    queries = self.norm3(queries + self.mlp(queries))
    q, k = queries + query_pe, keys + key_pe
    keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
    return queries, keys


class TwoWayTransformer(nnx.Module):

  def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2,
               *, rngs: nnx.Rngs):
    self.layers = nnx.List([
        TwoWayAttentionBlock(dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=(i == 0), rngs=rngs)
        for i in range(depth)
    ])
    self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate, rngs=rngs)
    self.norm_final_attn = layer_norm(dim, _EPS, rngs=rngs)

  def __call__(self, image_embedding: Array, image_pe: Array, point_embedding: Array) -> tuple[Array, Array]:
    """image_embedding, image_pe: (B, h, w, C); point_embedding: (B, N, C). Returns (B, N, C), (B, h*w, C)."""
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = jnp.broadcast_to(image_pe, image_embedding.shape).reshape(b, h * w, c)
    queries = point_embedding
    for layer in self.layers:
      queries, keys = layer(queries, keys, point_embedding, key_pe)
    q, k = queries + point_embedding, keys + key_pe
    queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
    return queries, keys
