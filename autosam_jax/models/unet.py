"""The from-scratch UNet baseline (paper-protocol section 1d): the official `SupConUnet(num_classes=4, in_channels=3)`.

Channels-last: images (B, H, W, 3) -> logits (B, H, W, num_classes), H and W multiples of 16 (224 for ACDC).
Layer names follow the official module (`contr_1_1`, ..., `center`, `expand_4_1`, `upscale4`, ...); the official
`encoder.contr_*` and `encoder.center` (what its SimCLR fine-tuning transfers) are exactly `UNet.encoder` here. Where
docs/paper-protocol.md is silent the official code decides: 3x3 convs with padding 1 and bias; InstanceNorm2d without
affine parameters (eps 1e-5, biased variance, no running statistics); LeakyReLU slope 0.01; the center ends ConvT ->
ReLU; the upsampled map comes first in each concatenation; PyTorch's default init for every layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from autosam_jax.models.init import torch_conv, torch_conv_transpose

Array = jax.Array

# InstanceNorm2d's default epsilon.
_INSTANCE_NORM_EPS = 1e-5
# Four 2x2 max-pools: every level must halve exactly, or the skip connections would need the official center crop.
SIZE_MULTIPLE = 16


def instance_norm(x: Array, epsilon: float = _INSTANCE_NORM_EPS) -> Array:
  """Per sample and channel over the spatial axes, no affine parameters (PyTorch's InstanceNorm2d defaults)."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + epsilon)


def max_pool_2x2(x: Array) -> Array:
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


class ContractingConv(nnx.Module):
  """Conv3x3 -> InstanceNorm -> LeakyReLU (`UNet.contract`)."""

  def __init__(self, in_features: int, out_features: int, *, instance_norm: bool = True, rngs: nnx.Rngs):
    self.conv = torch_conv(in_features, out_features, 3, rngs=rngs)
    self.instance_norm = instance_norm

  def __call__(self, x: Array) -> Array:
    x = self.conv(x)
    return jax.nn.leaky_relu(instance_norm(x) if self.instance_norm else x)


class ExpandingConv(nnx.Module):
  """Conv3x3 -> LeakyReLU, no normalisation (`UNet.expand`)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.conv = torch_conv(in_features, out_features, 3, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jax.nn.leaky_relu(self.conv(x))


class Center(nnx.Module):
  """Conv3x3 8f -> 16f, ReLU, Conv3x3 16f -> 16f, ReLU, ConvT 16f -> 8f, ReLU: back up to 1/8 resolution."""

  def __init__(self, base_channels: int, *, rngs: nnx.Rngs):
    self.conv1 = torch_conv(8 * base_channels, 16 * base_channels, 3, rngs=rngs)
    self.conv2 = torch_conv(16 * base_channels, 16 * base_channels, 3, rngs=rngs)
    self.upscale = torch_conv_transpose(16 * base_channels, 8 * base_channels, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    x = jax.nn.relu(self.conv1(x))
    x = jax.nn.relu(self.conv2(x))
    return jax.nn.relu(self.upscale(x))


class UNetEncoder(nnx.Module):
  """Contracting path 64-128-256-512 plus center: what SimCLR pretrains (the official `DownsampleUnet`).

  `__call__` gives the center features (B, H/8, W/8, 8 * base_channels); `contract` also gives the four skip maps.
  """

  def __init__(self, in_channels: int = 3, base_channels: int = 64, *, instance_norm: bool = True,
               rngs: nnx.Rngs):
    f = base_channels
    self.contr_1_1 = ContractingConv(in_channels, f, instance_norm=instance_norm, rngs=rngs)
    self.contr_1_2 = ContractingConv(f, f, instance_norm=instance_norm, rngs=rngs)
    self.contr_2_1 = ContractingConv(f, 2 * f, instance_norm=instance_norm, rngs=rngs)
    self.contr_2_2 = ContractingConv(2 * f, 2 * f, instance_norm=instance_norm, rngs=rngs)
    self.contr_3_1 = ContractingConv(2 * f, 4 * f, instance_norm=instance_norm, rngs=rngs)
    self.contr_3_2 = ContractingConv(4 * f, 4 * f, instance_norm=instance_norm, rngs=rngs)
    self.contr_4_1 = ContractingConv(4 * f, 8 * f, instance_norm=instance_norm, rngs=rngs)
    self.contr_4_2 = ContractingConv(8 * f, 8 * f, instance_norm=instance_norm, rngs=rngs)
    self.center = Center(f, rngs=rngs)

  def contract(self, images: Array) -> tuple[Array, list[Array]]:
    """(B, H, W, in_channels) -> center (B, H/8, W/8, 8f) and skips at 1, 1/2, 1/4, 1/8 resolution."""
    height, width = images.shape[1:3]
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
      raise ValueError(f"UNet input {height}x{width}: height and width must be multiples of {SIZE_MULTIPLE}")
    skips = []
    x = images
    for first, second in [(self.contr_1_1, self.contr_1_2), (self.contr_2_1, self.contr_2_2),
                          (self.contr_3_1, self.contr_3_2), (self.contr_4_1, self.contr_4_2)]:
      x = second(first(x))
      skips.append(x)
      x = max_pool_2x2(x)
    return self.center(x), skips

  def __call__(self, images: Array) -> Array:
    return self.contract(images)[0]


class UNet(nnx.Module):
  """`SupConUnet(mode="cls")`: `encoder` (contracting path + center), expanding path, 1x1 head to the classes."""

  def __init__(self, num_classes: int = 4, in_channels: int = 3, base_channels: int = 64, *,
               instance_norm: bool = True, rngs: nnx.Rngs):
    f = base_channels
    self.encoder = UNetEncoder(in_channels, f, instance_norm=instance_norm, rngs=rngs)
    self.expand_4_1 = ExpandingConv(16 * f, 8 * f, rngs=rngs)
    self.expand_4_2 = ExpandingConv(8 * f, 8 * f, rngs=rngs)
    self.upscale4 = torch_conv_transpose(8 * f, 4 * f, rngs=rngs)
    self.expand_3_1 = ExpandingConv(8 * f, 4 * f, rngs=rngs)
    self.expand_3_2 = ExpandingConv(4 * f, 4 * f, rngs=rngs)
    self.upscale3 = torch_conv_transpose(4 * f, 2 * f, rngs=rngs)
    self.expand_2_1 = ExpandingConv(4 * f, 2 * f, rngs=rngs)
    self.expand_2_2 = ExpandingConv(2 * f, 2 * f, rngs=rngs)
    self.upscale2 = torch_conv_transpose(2 * f, f, rngs=rngs)
    self.expand_1_1 = ExpandingConv(2 * f, f, rngs=rngs)
    self.expand_1_2 = ExpandingConv(f, f, rngs=rngs)
    self.head = torch_conv(f, num_classes, 1, rngs=rngs)

  def __call__(self, images: Array) -> Array:
    """(B, H, W, in_channels) -> logits (B, H, W, num_classes)."""
    x, (skip1, skip2, skip3, skip4) = self.encoder.contract(images)
    x = self.upscale4(self.expand_4_2(self.expand_4_1(jnp.concatenate([x, skip4], axis=-1))))
    x = self.upscale3(self.expand_3_2(self.expand_3_1(jnp.concatenate([x, skip3], axis=-1))))
    x = self.upscale2(self.expand_2_2(self.expand_2_1(jnp.concatenate([x, skip2], axis=-1))))
    x = self.expand_1_2(self.expand_1_1(jnp.concatenate([x, skip1], axis=-1)))
    return self.head(x)
