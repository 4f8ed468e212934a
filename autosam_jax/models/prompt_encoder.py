"""SAM's prompt encoder (points, boxes, masks) in Flax NNX, channels-last."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autosam_jax.models.config import SamConfig
from autosam_jax.models.layers import Buffer, gelu, layer_norm

Array = jax.Array


class PositionEmbeddingRandom(nnx.Module):
  """Random Fourier features of normalised (x, y) coordinates; the Gaussian matrix is a buffer, never trained."""

  def __init__(self, num_pos_feats: int, *, rngs: nnx.Rngs):
    self.positional_encoding_gaussian_matrix = Buffer(jax.random.normal(rngs.params(), (2, num_pos_feats)))

  def _encode(self, coords: Array) -> Array:
    """coords in [0, 1], last axis (x, y) -> (..., 2 * num_pos_feats) as [sin, cos]."""
    projected = 2 * np.pi * ((2 * coords - 1) @ self.positional_encoding_gaussian_matrix[...])
    return jnp.concatenate([jnp.sin(projected), jnp.cos(projected)], axis=-1)

  def grid(self, height: int, width: int) -> Array:
    """Encoding of every cell centre of a (height, width) grid: (height, width, C)."""
    y = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
    x = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
    coords = jnp.stack(jnp.broadcast_arrays(x[None, :], y[:, None]), axis=-1)
    return self._encode(coords)

  def with_coords(self, coords: Array, image_size: tuple[int, int]) -> Array:
    """Pixel coordinates (..., 2) as (x, y) in an image of (height, width) = image_size."""
    scale = jnp.array([image_size[1], image_size[0]], dtype=jnp.float32)
    return self._encode(coords.astype(jnp.float32) / scale)


class MaskDownscaling(nnx.Module):
  """(B, 4h, 4w, 1) mask logits -> (B, h, w, embed_dim)."""

  def __init__(self, mask_in_chans: int, embed_dim: int, *, rngs: nnx.Rngs):
    mid = mask_in_chans // 4
    self.conv1 = nnx.Conv(1, mid, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
    self.norm1 = layer_norm(mid, 1e-6, rngs=rngs)
    self.conv2 = nnx.Conv(mid, mask_in_chans, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
    self.norm2 = layer_norm(mask_in_chans, 1e-6, rngs=rngs)
    self.conv3 = nnx.Conv(mask_in_chans, embed_dim, (1, 1), rngs=rngs)

  def __call__(self, masks: Array) -> Array:
    x = gelu(self.norm1(self.conv1(masks)))
    x = gelu(self.norm2(self.conv2(x)))
    return self.conv3(x)


class PromptEncoder(nnx.Module):
  """Embeds prompts for the mask decoder: sparse (points, box corners) and dense (mask or `no_mask_embed`)."""

  def __init__(self, config: SamConfig, *, rngs: nnx.Rngs):
    dim = config.prompt_embed_dim
    self.embed_dim = dim
    self.input_image_size = (config.image_size, config.image_size)
    self.image_embedding_size = (config.image_embedding_size, config.image_embedding_size)
    self.pe_layer = PositionEmbeddingRandom(dim // 2, rngs=rngs)
    # Rows: negative point, positive point, box top-left corner, box bottom-right corner.
    self.point_embeddings = nnx.List([nnx.Embed(1, dim, rngs=rngs) for _ in range(4)])
    self.not_a_point_embed = nnx.Embed(1, dim, rngs=rngs)
    self.mask_downscaling = MaskDownscaling(config.mask_in_chans, dim, rngs=rngs)
    self.no_mask_embed = nnx.Embed(1, dim, rngs=rngs)
    # SAM 2's image predictor gives a box as its two corners among the points (labels 2 and 3, before any clicks),
    # so a padding point follows them; SAM's embeds boxes after the points, without one.
    self.boxes_as_points = config.encoder_family == "hiera"

  def get_dense_pe(self) -> Array:
    """Positional encoding of the image embedding grid: (1, h, w, C)."""
    return self.pe_layer.grid(*self.image_embedding_size)[None]

  def _embed_points(self, coords: Array, labels: Array, pad: bool) -> Array:
    coords = coords.astype(jnp.float32) + 0.5  # pixel centres
    if pad:
      coords = jnp.concatenate([coords, jnp.zeros((coords.shape[0], 1, 2), coords.dtype)], axis=1)
      labels = jnp.concatenate([labels, -jnp.ones((labels.shape[0], 1), labels.dtype)], axis=1)
    embedding = self.pe_layer.with_coords(coords, self.input_image_size)
    labels = labels[..., None]
    embedding = jnp.where(labels == -1, self.not_a_point_embed.embedding[...][0], embedding)
    embedding = embedding + jnp.where(labels == 0, self.point_embeddings[0].embedding[...][0], 0.0)
    embedding = embedding + jnp.where(labels == 1, self.point_embeddings[1].embedding[...][0], 0.0)
    # Labels 2 and 3: a box's corners given as points (SAM 2's predictor passes boxes this way).
    embedding = embedding + jnp.where(labels == 2, self.point_embeddings[2].embedding[...][0], 0.0)
    embedding = embedding + jnp.where(labels == 3, self.point_embeddings[3].embedding[...][0], 0.0)
    return embedding

  def _embed_boxes(self, boxes: Array) -> Array:
    corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
    embedding = self.pe_layer.with_coords(corners, self.input_image_size)
    corner_embeddings = jnp.stack([self.point_embeddings[2].embedding[...][0],
                                   self.point_embeddings[3].embedding[...][0]])
    return embedding + corner_embeddings

  def __call__(self, points: tuple[Array, Array] | None = None, boxes: Array | None = None,
               masks: Array | None = None) -> tuple[Array, Array]:
    """Returns sparse (B, N, C) and dense (B, h, w, C) embeddings.

    points: ((B, N, 2) pixel coordinates (x, y) in the resized input frame, (B, N) labels 1 fg / 0 bg / -1 pad,
    2 / 3 a box's corners);
    boxes: (B, 4) as (x0, y0, x1, y1); masks: (B, 4h, 4w, 1) low-resolution mask logits.
    """
    if points is not None:
      batch = points[0].shape[0]
    elif boxes is not None:
      batch = boxes.shape[0]
    elif masks is not None:
      batch = masks.shape[0]
    else:
      batch = 1
    if self.boxes_as_points and boxes is not None:
      corners = boxes.astype(jnp.float32).reshape(-1, 2, 2)
      corner_labels = jnp.broadcast_to(jnp.array([2, 3], jnp.int32), corners.shape[:2])
      points = (corners, corner_labels) if points is None else (
          jnp.concatenate([corners, points[0].astype(jnp.float32)], axis=1),
          jnp.concatenate([corner_labels, points[1].astype(jnp.int32)], axis=1))
      boxes = None
    sparse = [jnp.zeros((batch, 0, self.embed_dim), jnp.float32)]
    if points is not None:
      sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
    if boxes is not None:
      sparse.append(self._embed_boxes(boxes))
    sparse_embeddings = jnp.concatenate(sparse, axis=1)
    if masks is not None:
      dense_embeddings = self.mask_downscaling(masks)
    else:
      h, w = self.image_embedding_size
      dense_embeddings = jnp.broadcast_to(self.no_mask_embed.embedding[...].reshape(1, 1, 1, -1),
                                          (batch, h, w, self.embed_dim))
    return sparse_embeddings, dense_embeddings
