"""Prompt-free segmentation heads on frozen SAM image embeddings: AutoSAM, CNN and "Linear" (paper-protocol sections 1a,
1b).

Contract: `head(image_embeddings) -> logits`, with embeddings (B, h, w, C) and logits (B, 4h, 4w, num_classes), both
channels-last float32. The resize to the training target (224 or 256) is the caller's job, not the head's.

Every head comes in a `faithful` variant (the official code, quirks included) and an `improved` one (section 6 fixed).
What the official optimiser would not train is held outside `nnx.Param`: `Frozen` for parameters the official code
sets `requires_grad=False` on, `Buffer` for fixed tensors. So `nnx.state(head, nnx.Param)` is exactly the set the
optimiser trains (see `split_trainable`).
"""

from __future__ import annotations

import os
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from autosam_jax.models.config import SamConfig
from autosam_jax.models.init import torch_conv, torch_conv_transpose, torch_mlp
from autosam_jax.models.layers import MLP, ConvTranspose2x2, layer_norm
from autosam_jax.models.mask_decoder import OutputUpscaling
from autosam_jax.models.prompt_encoder import PositionEmbeddingRandom
from autosam_jax.models.sam import Sam
from autosam_jax.models.transformer import TwoWayTransformer

Array = jax.Array
Variant = Literal["faithful", "improved"]
HeadKind = Literal["autosam", "cnn", "linear"]
VARIANTS: tuple[str, ...] = ("faithful", "improved")
HEAD_KINDS: tuple[str, ...] = ("autosam", "cnn", "linear")


class Frozen(nnx.Variable):
  """A parameter kept out of the optimiser, as the official code's `requires_grad=False` does; loaded or random."""


def freeze(module: nnx.Module) -> nnx.Module:
  """Turns every `nnx.Param` inside `module` into a `Frozen` holding the same value (in place); returns `module`."""
  for _, submodule in nnx.iter_modules(module):
    for name, value in list(vars(submodule).items()):
      if isinstance(value, nnx.Param):
        setattr(submodule, name, Frozen(value[...]))
  return module


def split_trainable(module: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else): differentiate and optimise the second, carry the third along."""
  return nnx.split(module, nnx.Param, ...)


def count_params(module: nnx.Module, kind: type[nnx.Variable] = nnx.Param) -> int:
  """Number of scalars in the variables of type `kind` (trainable parameters by default)."""
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, kind))))


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"unknown head variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def _torch_init_upscaling(dim: int, *, rngs: nnx.Rngs) -> OutputUpscaling:
  """SAM's output_upscaling as a fresh PyTorch module would start (the official Linear head without SAM)."""
  upscaling = nnx.eval_shape(lambda: OutputUpscaling(dim, rngs=nnx.Rngs(0)))
  upscaling.conv1 = torch_conv_transpose(dim, dim // 4, rngs=rngs)
  upscaling.norm = layer_norm(dim // 4, 1e-6, rngs=rngs)
  upscaling.conv2 = torch_conv_transpose(dim // 4, dim // 8, rngs=rngs)
  return upscaling


class AutoSamHead(nnx.Module):
  """SAM's mask decoder without prompts, with learned per-class output tokens (paper-protocol section 1a).

  faithful: per class c the tokens [iou_c, mask_c0, mask_c1] (IoU tokens frozen N(0, 1), mask tokens trainable
    N(0, 1)); a fresh random positional encoding; no `no_mask_embed`; transformer, upscaling and hypernetwork MLPs
    0 and 1 from SAM; a frozen IoU head at PyTorch's default init. Each class is its own batch row (image embedding
    replicated C times), and class c's logits are MLP_0(out(mask_c0)) . upscaled_c. MLP_1 is trainable, as in the
    official optimiser, but its output is discarded there, so it is not computed here: its gradient is exactly zero
    either way.
  improved: SAM's positional encoding (a buffer) and `no_mask_embed` (trainable, added to the image embedding);
    one token per class, initialised from SAM's mask token c mod M, read by its own hypernetwork MLP initialised
    from SAM's MLP c mod M (M = 4 for SAM), so each class starts from a token/MLP pair that SAM trained together;
    no IoU tokens or head.
    joint=False: each class is its own batch row, as in the faithful head (classes never interact). With a single
    token per row, token self-attention and image->token attention softmax over one key, so their query and key
    projections receive no gradient (they keep SAM's values; the value and output projections do train).
    joint=True: all class tokens share ONE transformer pass over a single copy of the image embedding (C times
    cheaper). Classes then see each other: token self-attention mixes them, and the image tokens are updated by
    attending to all class tokens at once, so every class decodes from the same upscaled image features.
  """

  def __init__(self, num_classes: int, *, variant: Variant, sam: Sam | None = None, config: SamConfig | None = None,
               joint: bool = False, rngs: nnx.Rngs):
    """sam: the converted SAM to initialise from; config: the decoder architecture when no `sam` is given."""
    _check_variant(variant)
    if joint and variant != "improved":
      raise ValueError("joint decoding of all classes is an improved-variant option; the faithful head decodes each "
                       "class in its own batch row")
    config = sam.config if sam is not None else (config or SamConfig())
    sam_mask_tokens = config.num_multimask_outputs + 1
    if variant == "faithful" and sam_mask_tokens < 2:
      raise ValueError("the faithful AutoSAM head takes hypernetwork MLPs 0 and 1 from SAM, which has only "
                       f"{sam_mask_tokens}")
    dim = config.prompt_embed_dim
    self.num_classes = num_classes
    self.variant = variant
    self.joint = joint
    # SAM 2's decoder adds the encoder's high-resolution maps into its upscaling path; the improved head built from it
    # does too (`uses_high_res`: the trainer then feeds the cache's "high_res" maps). The faithful head is the
    # official SAM code's, which has no such path.
    self.uses_high_res = variant == "improved" and config.use_high_res_features

    decoder = sam.mask_decoder if sam is not None else None
    self.transformer = (nnx.clone(decoder.transformer) if decoder is not None else TwoWayTransformer(
        config.decoder_depth, dim, config.decoder_num_heads, config.decoder_mlp_dim, config.attention_downsample_rate,
        rngs=rngs))
    self.output_upscaling = (nnx.clone(decoder.output_upscaling) if decoder is not None
                             else OutputUpscaling(dim, rngs=rngs))

    def hypernetwork(sam_index: int) -> MLP:
      if decoder is not None:
        return nnx.clone(decoder.output_hypernetworks_mlps[sam_index])
      return MLP(dim, dim, dim // 8, 3, rngs=rngs)

    if variant == "faithful":
      # nn.Embedding's default init; the official loader skips every key containing "iou" or "mask_tokens".
      self.iou_tokens = Frozen(jax.random.normal(rngs.params(), (num_classes, dim)))
      # [c, j] is row 2c + j of the official (2C, dim) embedding table.
      self.mask_tokens = nnx.Param(jax.random.normal(rngs.params(), (num_classes, 2, dim)))
      # Created anew in AutoSamSeg, so SAM's trained matrix is never loaded.
      self.pe_layer = PositionEmbeddingRandom(dim // 2, rngs=rngs)
      self.output_hypernetworks_mlps = nnx.List([hypernetwork(0), hypernetwork(1)])
      self.iou_prediction_head = freeze(torch_mlp(dim, config.iou_head_hidden_dim, 2, config.iou_head_depth,
                                                  rngs=rngs))
    else:
      class_to_sam_token = [c % sam_mask_tokens for c in range(num_classes)]
      if decoder is not None:
        self.class_tokens = nnx.Param(decoder.mask_tokens.embedding[...][jnp.array(class_to_sam_token)])
        self.no_mask_embed = nnx.Param(sam.prompt_encoder.no_mask_embed.embedding[...][0])
        self.pe_layer = nnx.clone(sam.prompt_encoder.pe_layer)
      else:
        self.class_tokens = nnx.Param(jax.random.normal(rngs.params(), (num_classes, dim)))
        self.no_mask_embed = nnx.Param(jax.random.normal(rngs.params(), (dim,)))
        self.pe_layer = PositionEmbeddingRandom(dim // 2, rngs=rngs)
      self.output_hypernetworks_mlps = nnx.List([hypernetwork(i) for i in class_to_sam_token])

  def __call__(self, image_embeddings: Array, high_res: list[Array] | None = None, *,
               return_iou: bool = False) -> Array | tuple[Array, Array]:
    """(B, h, w, C) -> logits (B, 4h, 4w, num_classes).

    high_res: SAM 2's two high-resolution maps ((B, 4h, 4w, C/8), (B, 2h, 2w, C/4)), needed where `uses_high_res`.
    return_iou (faithful only): also return the frozen random IoU head's per-class prediction (B, num_classes),
    which the official code only prints.
    """
    if return_iou and self.variant != "faithful":
      raise ValueError("only the faithful AutoSAM head has an IoU head")
    if self.uses_high_res and high_res is None:
      raise ValueError("this AutoSAM head is built from SAM 2's decoder and adds its high-resolution maps; pass "
                       "high_res (a cache of SAM 2 features holds them)")
    if not self.uses_high_res:
      high_res = None
    b, h, w, dim = image_embeddings.shape
    num_classes = self.num_classes
    image_pe = self.pe_layer.grid(h, w)[None]

    if self.variant == "improved" and self.joint:
      tokens = jnp.broadcast_to(self.class_tokens[...][None], (b, num_classes, dim))
      class_out, image_out = self.transformer(image_embeddings + self.no_mask_embed[...], image_pe, tokens)
      upscaled = self.output_upscaling(image_out.reshape(b, h, w, dim), high_res)
      hyper_in = self._class_hypernetworks(class_out)
      return jnp.einsum("bcd,byxd->byxc", hyper_in, upscaled)

    if self.variant == "faithful":
      src = image_embeddings
      # Per class [iou_c, mask_c0, mask_c1]; row b * C + c of the flattened batch holds image b, class c.
      tokens = jnp.concatenate([self.iou_tokens[...][:, None], self.mask_tokens[...]], axis=1)
    else:
      src = image_embeddings + self.no_mask_embed[...]
      tokens = self.class_tokens[...][:, None]
    src = jnp.broadcast_to(src[:, None], (b, num_classes, h, w, dim)).reshape(b * num_classes, h, w, dim)
    tokens = jnp.broadcast_to(tokens[None], (b, *tokens.shape)).reshape(b * num_classes, *tokens.shape[1:])
    tokens_out, image_out = self.transformer(src, image_pe, tokens)
    if high_res is not None:  # each image's maps for each of its class rows
      high_res = [jnp.repeat(m, num_classes, axis=0) for m in high_res]
    upscaled = self.output_upscaling(image_out.reshape(b * num_classes, h, w, dim), high_res)
    upscaled = upscaled.reshape(b, num_classes, *upscaled.shape[1:])

    if self.variant == "faithful":
      hyper_in = self.output_hypernetworks_mlps[0](tokens_out[:, 1]).reshape(b, num_classes, -1)
    else:
      hyper_in = self._class_hypernetworks(tokens_out[:, 0].reshape(b, num_classes, dim))
    logits = jnp.einsum("bcd,bcyxd->byxc", hyper_in, upscaled)
    if return_iou:
      # The official decoder keeps slice 0 of the 2 IoU outputs (multimask_output=False).
      iou = self.iou_prediction_head(tokens_out[:, 0])[:, 0].reshape(b, num_classes)
      return logits, iou
    return logits

  def _class_hypernetworks(self, class_tokens_out: Array) -> Array:
    """(B, C, dim) -> (B, C, dim / 8), class c through its own MLP."""
    return jnp.stack([mlp(class_tokens_out[:, c]) for c, mlp in enumerate(self.output_hypernetworks_mlps)], axis=1)


class CnnHead(nnx.Module):
  """The official `SegDecoderCNN(num_classes, num_depth=4)`: 20,686,340 parameters for 4 classes, all new.

  No normalisation; every conv has a bias. The two variants are the same network (docs/paper-protocol.md lists no fix
  for it). (B, h, w, 256) -> 1x1 convs to 1024 -> 3x3 blocks 1024 -> 512 -> 256 -> ConvT to 2h -> 128 -> ConvT to 4h ->
  64 -> 3x3 (no activation) -> 1x1 to num_classes.
  """

  def __init__(self, num_classes: int, *, variant: Variant = "faithful", embed_dim: int = 256,
               top_channels: int = 64, depth: int = 4, rngs: nnx.Rngs):
    _check_variant(variant)
    if depth <= 2:
      raise ValueError(f"depth {depth}: the head needs more than 2 blocks (the first two keep the resolution)")
    self.variant = variant
    width = top_channels * 2 ** depth
    self.input_block = nnx.List([torch_conv(embed_dim, width, 1, rngs=rngs), torch_conv(width, width, 1, rngs=rngs)])
    blocks = []
    for i in range(depth):
      channels = top_channels * 2 ** (depth - i)
      if i < 2:
        convs = [torch_conv(channels, channels, 3, rngs=rngs), torch_conv(channels, channels // 2, 3, rngs=rngs)]
        upsample = None
      else:
        convs = [torch_conv(channels, channels, 3, rngs=rngs), torch_conv(channels, channels, 3, rngs=rngs)]
        upsample = torch_conv_transpose(channels, channels // 2, rngs=rngs)
      blocks.append(CnnBlock(convs, upsample))
    self.blocks = nnx.List(blocks)
    self.final_conv = torch_conv(top_channels, top_channels, 3, rngs=rngs)
    self.classifier = torch_conv(top_channels, num_classes, 1, rngs=rngs)

  def __call__(self, image_embeddings: Array) -> Array:
    x = image_embeddings
    for conv in self.input_block:
      x = jax.nn.relu(conv(x))
    for block in self.blocks:
      x = block(x)
    return self.classifier(self.final_conv(x))


class CnnBlock(nnx.Module):
  """Two ReLU convs, then (in the upsampling blocks) a ConvT 2x2/2 with no activation after it."""

  def __init__(self, convs: list[nnx.Conv], upsample: ConvTranspose2x2 | None):
    self.convs = nnx.List(convs)
    self.upsample = upsample

  def __call__(self, x: Array) -> Array:
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return x if self.upsample is None else self.upsample(x)


class LinearHead(nnx.Module):
  """The official `SegDecoderLinear`: SAM's output_upscaling, then 1x1 convs (75,140 parameters for 4 classes).

  ConvT(256 -> 64) -> LayerNorm2d -> GELU -> ConvT(64 -> 32) -> GELU -> 1x1 32 -> 32 -> ReLU -> 1x1 32 -> C.
  faithful applies ReLU to the logits too (paper-protocol section 6.11), so no logit is ever negative; improved does
  not. With `sam`, the upscaling starts from SAM's (the official strict=False load matches its keys); the 1x1 convs are
  new.
  """

  def __init__(self, num_classes: int, *, variant: Variant, sam: Sam | None = None, embed_dim: int = 256,
               rngs: nnx.Rngs):
    _check_variant(variant)
    self.variant = variant
    if sam is not None:
      if sam.config.prompt_embed_dim != embed_dim:
        raise ValueError(f"SAM's decoder width is {sam.config.prompt_embed_dim}, the head's embed_dim {embed_dim}")
      self.output_upscaling = nnx.clone(sam.mask_decoder.output_upscaling)
    else:
      self.output_upscaling = _torch_init_upscaling(embed_dim, rngs=rngs)
    self.hidden_conv = torch_conv(embed_dim // 8, embed_dim // 8, 1, rngs=rngs)
    self.classifier = torch_conv(embed_dim // 8, num_classes, 1, rngs=rngs)

  def __call__(self, image_embeddings: Array) -> Array:
    x = jax.nn.relu(self.hidden_conv(self.output_upscaling(image_embeddings)))
    logits = self.classifier(x)
    return jax.nn.relu(logits) if self.variant == "faithful" else logits


def build_head(kind: HeadKind, num_classes: int, *, variant: Variant, sam: Sam | str | os.PathLike | None = None,
               joint: bool = False, cnn_top_channels: int = 64, rngs: nnx.Rngs) -> nnx.Module:
  """A segmentation head for SAM image embeddings.

  kind: "autosam" (section 1a), "cnn" or "linear" (section 1b). sam: a converted SAM (an NNX `Sam`, or the directory
  `weights_conversion` wrote) whose decoder initialises what the head takes from it; None gives random weights of
  the same architecture (SAM's default decoder sizes). joint: improved AutoSAM only, see `AutoSamHead`.
  cnn_top_channels: the CNN head's narrowest width (the official 64 gives its 1024-wide input block; smaller values
  shrink every layer, e.g. for a CPU demo). Only SAM's decoder parts are copied; the head keeps no reference to the
  image encoder.
  """
  if kind not in HEAD_KINDS:
    raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
  if joint and kind != "autosam":
    raise ValueError(f"joint decoding is an AutoSAM option, not one of the {kind} head")
  if isinstance(sam, (str, os.PathLike)):
    from autosam_jax.models.loading import load_sam
    sam = load_sam(sam)
  if kind == "autosam":
    return AutoSamHead(num_classes, variant=variant, sam=sam, joint=joint, rngs=rngs)
  embed_dim = sam.config.prompt_embed_dim if sam is not None else 256
  if kind == "cnn":
    # The official builder loads SAM with strict=False, which matches no key of this head: SAM only sets the width.
    return CnnHead(num_classes, variant=variant, embed_dim=embed_dim, top_channels=cnn_top_channels, rngs=rngs)
  return LinearHead(num_classes, variant=variant, sam=sam, embed_dim=embed_dim, rngs=rngs)
