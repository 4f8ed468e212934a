"""SAM's mask decoder in Flax NNX. Masks come out channels-last: (B, 4h, 4w, num_masks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from autosam_jax.models.config import SamConfig
from autosam_jax.models.layers import MLP, ConvTranspose2x2, gelu, layer_norm
from autosam_jax.models.transformer import TwoWayTransformer

Array = jax.Array


class OutputUpscaling(nnx.Module):
  """ConvT 2x2/2 -> LayerNorm2d -> GELU -> ConvT 2x2/2 -> GELU: (B, h, w, C) -> (B, 4h, 4w, C/8)."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.conv1 = ConvTranspose2x2(dim, dim // 4, rngs=rngs)
    self.norm = layer_norm(dim // 4, 1e-6, rngs=rngs)
    self.conv2 = ConvTranspose2x2(dim // 4, dim // 8, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return gelu(self.conv2(gelu(self.norm(self.conv1(x)))))


class MaskDecoder(nnx.Module):

  def __init__(self, config: SamConfig, *, rngs: nnx.Rngs):
    dim = config.prompt_embed_dim
    self.num_mask_tokens = config.num_multimask_outputs + 1
    self.transformer = TwoWayTransformer(config.decoder_depth, dim, config.decoder_num_heads, config.decoder_mlp_dim,
                                         config.attention_downsample_rate, rngs=rngs)
    self.iou_token = nnx.Embed(1, dim, rngs=rngs)
    self.mask_tokens = nnx.Embed(self.num_mask_tokens, dim, rngs=rngs)
    self.output_upscaling = OutputUpscaling(dim, rngs=rngs)
    self.output_hypernetworks_mlps = nnx.List(
        [MLP(dim, dim, dim // 8, 3, rngs=rngs) for _ in range(self.num_mask_tokens)])
    self.iou_prediction_head = MLP(dim, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth,
                                   rngs=rngs)

  def __call__(self, image_embeddings: Array, image_pe: Array, sparse_prompt_embeddings: Array,
               dense_prompt_embeddings: Array, multimask_output: bool) -> tuple[Array, Array]:
    """Returns mask logits (B, 4h, 4w, M) and IoU predictions (B, M); M = 3 with multimask output, else 1.

    image_embeddings is (1, h, w, C), shared by every prompt set, or (B, h, w, C), one image per prompt set.
    """
    masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                         dense_prompt_embeddings)
    selected = slice(1, None) if multimask_output else slice(0, 1)
    return masks[..., selected], iou_pred[:, selected]

  def predict_masks(self, image_embeddings: Array, image_pe: Array, sparse_prompt_embeddings: Array,
                    dense_prompt_embeddings: Array) -> tuple[Array, Array]:
    batch = sparse_prompt_embeddings.shape[0]
    output_tokens = jnp.concatenate([self.iou_token.embedding[...], self.mask_tokens.embedding[...]], axis=0)
    output_tokens = jnp.broadcast_to(output_tokens[None], (batch, *output_tokens.shape))
    tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)

    if image_embeddings.shape[0] not in (1, batch):
      raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {batch} prompt sets: give one image, "
                       "or one image per prompt set")
    src = jnp.broadcast_to(image_embeddings, (batch, *image_embeddings.shape[1:])) + dense_prompt_embeddings
    b, h, w, c = src.shape
    hs, src = self.transformer(src, image_pe, tokens)
    iou_token_out = hs[:, 0]
    mask_tokens_out = hs[:, 1:1 + self.num_mask_tokens]

    upscaled = self.output_upscaling(src.reshape(b, h, w, c))
    hyper_in = jnp.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                         axis=1)
    masks = jnp.einsum("bmc,byxc->byxm", hyper_in, upscaled)
    return masks, self.iou_prediction_head(iou_token_out)
