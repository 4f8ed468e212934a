"""SAM in Flax NNX: image encoder, prompt encoder and mask decoder with Meta's pre- and post-processing.

Images are channels-last (H, W, 3) RGB on the 0..255 scale; masks come back as (N, H, W, M).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autosam_jax.models.config import SamConfig
from autosam_jax.models.encoders import build_encoder
from autosam_jax.models.mask_decoder import MaskDecoder
from autosam_jax.models.prompt_encoder import PromptEncoder

Array = jax.Array


def preprocess_shape(height: int, width: int, long_side: int, square: bool = False) -> tuple[int, int]:
  """Size after resizing so the longer side is `long_side` (Meta's `ResizeLongestSide.get_preprocess_shape`), or
  with `square` (SAM 2's `SAM2Transforms`) to `long_side` x `long_side` whatever the aspect."""
  if square:
    return long_side, long_side
  scale = long_side / max(height, width)
  return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: Array, long_side: int, square: bool = False) -> Array:
  """(H, W, C) -> longer side `long_side` (or `square`), bilinear with antialiasing (as PIL's and torchvision's
  resizes do)."""
  h, w = preprocess_shape(image.shape[0], image.shape[1], long_side, square)
  return jax.image.resize(jnp.asarray(image, jnp.float32), (h, w, image.shape[2]), "bilinear", antialias=True)


def scale_coords(coords: Array, original_size: tuple[int, int], long_side: int, square: bool = False) -> Array:
  """Point coordinates (..., 2) as (x, y) from the original image frame to the resized one."""
  h, w = original_size
  new_h, new_w = preprocess_shape(h, w, long_side, square)
  return jnp.asarray(coords, jnp.float32) * jnp.array([new_w / w, new_h / h], jnp.float32)


def scale_boxes(boxes: Array, original_size: tuple[int, int], long_side: int, square: bool = False) -> Array:
  """Boxes (..., 4) as (x0, y0, x1, y1) from the original image frame to the resized one."""
  boxes = jnp.asarray(boxes, jnp.float32)
  return scale_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side, square).reshape(boxes.shape)


def resize_bilinear(x: Array, height: int, width: int) -> Array:
  """Resize the spatial axes of (B, H, W, C) like PyTorch's bilinear `interpolate(align_corners=False)`."""
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear", antialias=False)


class Sam(nnx.Module):
  mask_threshold: float = 0.0

  def __init__(self, config: SamConfig, *, encoder_dtype=None, rngs: nnx.Rngs):
    self.config = config
    self.image_encoder = build_encoder(config, dtype=encoder_dtype, rngs=rngs)
    self.prompt_encoder = PromptEncoder(config, rngs=rngs)
    self.mask_decoder = MaskDecoder(config, rngs=rngs)

  def preprocess(self, images: Array) -> Array:
    """(B, h, w, 3) images on the 0..255 scale, longer side already `image_size` -> normalised as the weights expect
    (`SamConfig.normalization`) and zero-padded."""
    size = self.config.image_size
    if images.shape[1] > size or images.shape[2] > size:
      raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} are larger than the model's {size}; "
                       "resize the longest side first (resize_longest_side)")
    x = jnp.asarray(images, jnp.float32)
    if self.config.normalization == "min_max":  # MedSAM's LiteMedSAM inputs: each image to [0, 1]
      low = x.min(axis=(1, 2, 3), keepdims=True)
      x = (x - low) / jnp.maximum(x.max(axis=(1, 2, 3), keepdims=True) - low, 1e-8)
    else:
      x = (x - jnp.asarray(self.config.pixel_mean, jnp.float32)) / jnp.asarray(self.config.pixel_std, jnp.float32)
    return jnp.pad(x, ((0, 0), (0, size - x.shape[1]), (0, size - x.shape[2]), (0, 0)))

  def postprocess_masks(self, masks: Array, input_size: tuple[int, int], original_size: tuple[int, int]) -> Array:
    """Low-resolution logits (B, h, w, M) -> logits at the original image size (B, H, W, M)."""
    if self.config.resize == "square":  # SAM 2: the input is the whole image stretched, nothing to crop
      return resize_bilinear(masks, *original_size)
    size = self.config.image_size
    masks = resize_bilinear(masks, size, size)[:, :input_size[0], :input_size[1]]
    return resize_bilinear(masks, *original_size)

  def predict(self, image_embedding: Array, input_size: tuple[int, int], original_size: tuple[int, int], *,
              point_coords: Array | None = None, point_labels: Array | None = None, boxes: Array | None = None,
              mask_inputs: Array | None = None, multimask_output: bool = True) -> dict[str, Array]:
    """Decodes prompt sets against one image's features, compiled once per shape.

    image_embedding: the (1, h, w, C) embedding, or the encoder's dict of named maps (SAM 2's decoder also reads
    "high_res"). Prompts are in the resized input frame (see `scale_coords`, `scale_boxes`). Returns upscaled mask
    logits (N, H, W, M) at `original_size`, boolean masks, IoU predictions (N, M) and low-resolution logits.
    """
    as_array = lambda a: None if a is None else jnp.asarray(a)
    features = jax.tree.map(jnp.asarray, image_embedding)
    return _predict(self, features, tuple(int(v) for v in input_size),
                    tuple(int(v) for v in original_size), as_array(point_coords), as_array(point_labels),
                    as_array(boxes), as_array(mask_inputs), bool(multimask_output))

  def decode(self, image_embedding: Array | dict, input_size: tuple[int, int], original_size: tuple[int, int],
             point_coords: Array | None, point_labels: Array | None, boxes: Array | None, mask_inputs: Array | None,
             multimask_output: bool) -> dict[str, Array]:
    """The computation behind `predict`, uncompiled (for use inside a caller's own jit)."""
    features = image_embedding if isinstance(image_embedding, dict) else {"embedding": image_embedding}
    points = None if point_coords is None else (point_coords, point_labels)
    sparse, dense = self.prompt_encoder(points, boxes, mask_inputs)
    low_res, iou = self.mask_decoder(features["embedding"], self.prompt_encoder.get_dense_pe(), sparse, dense,
                                     multimask_output, high_res=features.get("high_res"))
    logits = self.postprocess_masks(low_res, input_size, original_size)
    return {"mask_logits": logits, "masks": logits > self.mask_threshold, "iou_predictions": iou,
            "low_res_logits": low_res}

  def encode(self, images: Array) -> Array | dict:
    """Compiled `image_encoder` call: (B, S, S, 3) preprocessed images -> (B, S/16, S/16, C) embeddings (SAM 2: the
    dict of named maps, `encoders.encoder_features`)."""
    return _encode(self.image_encoder, jnp.asarray(images))

  def __call__(self, batched_input: Sequence[dict[str, Any]], multimask_output: bool) -> list[dict[str, Array]]:
    """Meta's `Sam.forward` on channels-last inputs.

    Each record holds "image" (h, w, 3) resized so its longer side is `image_size` (SAM 2: resized to the square),
    "original_size" (H, W), and
    optionally "point_coords" (N, K, 2), "point_labels" (N, K), "boxes" (N, 4), "mask_inputs" (N, h/4, w/4, 1).
    """
    images = jnp.stack([self.preprocess(jnp.asarray(r["image"])[None])[0] for r in batched_input])
    features = self.encode(images)
    outputs = []
    for i, record in enumerate(batched_input):
      outputs.append(self.predict(
          jax.tree.map(lambda a: a[i:i + 1], features), tuple(np.shape(record["image"])[:2]),
          tuple(record["original_size"]),
          point_coords=record.get("point_coords"), point_labels=record.get("point_labels"),
          boxes=record.get("boxes"), mask_inputs=record.get("mask_inputs"), multimask_output=multimask_output))
    return outputs


@nnx.jit
def _encode(image_encoder, images):
  return image_encoder(images)


@functools.partial(nnx.jit, static_argnames=("input_size", "original_size", "multimask_output"))
def _predict(sam, image_embedding, input_size, original_size, point_coords, point_labels, boxes, mask_inputs,
             multimask_output):
  return sam.decode(image_embedding, input_size, original_size, point_coords, point_labels, boxes, mask_inputs,
                    multimask_output)
