"""The official loss: cross-entropy + batch soft Dice over the foreground classes (paper-protocol section 3).

Pixels may carry weights: 0 for padding (improved mode's padded border, or the zero-weight samples that fill the last
batch to a fixed size), 1 otherwise, so the loss equals the official one on the real pixels. A label beyond the
logits' channels is nnU-Net's ignore label (`LabelTable.ignore`): its pixels weigh 0 (`scored`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy(logits: Array, labels: Array, weights: Array) -> Array:
  """Mean over weighted pixels of -log softmax(logits)[label]; logits (B, H, W, C), labels/weights (B, H, W)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.sum(picked * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def batch_soft_dice_loss(logits: Array, labels: Array, weights: Array, smooth: float = 1.0) -> Array:
  """Per foreground class c: 1 - (2 sum p g + s) / (sum p^2 + sum g^2 + s), sums over batch and pixels; then the
  mean over the classes whose loss is positive (the official `result[result > 0].mean()`; a class absent from both
  prediction and target scores exactly 0 there and is left out). 0 if every class is left out."""
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:] * weights[..., None]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)[..., 1:] * weights[..., None]
  axes = tuple(range(probs.ndim - 1))
  intersection = jnp.sum(probs * onehot, axis=axes)
  denominator = jnp.sum(probs * probs, axis=axes) + jnp.sum(onehot * onehot, axis=axes)
  per_class = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)
  kept = per_class > 0
  return jnp.sum(jnp.where(kept, per_class, 0.0)) / jnp.maximum(jnp.sum(kept), 1)


def scored(labels: Array, weights: Array, num_classes: int) -> tuple[Array, Array]:
  """(labels, weights) with the pixels of the ignore label (any value >= num_classes, the logits' channels) given
  weight 0 and label 0, so they carry no loss and no score and index no channel."""
  keep = labels < num_classes
  return jnp.where(keep, labels, 0), weights * keep.astype(weights.dtype)


def segmentation_loss(logits: Array, labels: Array, weights: Array) -> tuple[Array, dict[str, Array]]:
  labels, weights = scored(labels, weights, logits.shape[-1])
  ce = cross_entropy(logits, labels, weights)
  dice = batch_soft_dice_loss(logits, labels, weights)
  return ce + dice, {"ce": ce, "dice_loss": dice}
