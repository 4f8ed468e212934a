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

  def __call__(self, x: Array, high_res: list[Array] | None = None) -> Array:
    """With `high_res` ([(B|1, 4h, 4w, C/8), (B|1, 2h, 2w, C/4)], SAM 2), each is added before the activation at its
    resolution."""
    if high_res is None:
      return gelu(self.conv2(gelu(self.norm(self.conv1(x)))))
    s0, s1 = high_res
    x = gelu(self.norm(self.conv1(x) + s1))
    return gelu(self.conv2(x) + s0)


class MaskDecoder(nnx.Module):

  def __init__(self, config: SamConfig, *, rngs: nnx.Rngs):
    dim = config.prompt_embed_dim
    self.num_mask_tokens = config.num_multimask_outputs + 1
    self.transformer = TwoWayTransformer(config.decoder_depth, dim, config.decoder_num_heads, config.decoder_mlp_dim,
                                         config.attention_downsample_rate, rngs=rngs)
    self.use_high_res_features = config.use_high_res_features
    self.iou_sigmoid = config.iou_prediction_use_sigmoid
    self.dynamic_multimask = config.dynamic_multimask_via_stability
    # SAM 2: a token before the IoU token that scores whether the object is present (its head is not converted:
    # the image predictor does not read it, but the token takes part in the attention).
    self.obj_score_token = nnx.Embed(1, dim, rngs=rngs) if config.pred_obj_scores else None
    self.iou_token = nnx.Embed(1, dim, rngs=rngs)
    self.mask_tokens = nnx.Embed(self.num_mask_tokens, dim, rngs=rngs)
    self.output_upscaling = OutputUpscaling(dim, rngs=rngs)
    self.output_hypernetworks_mlps = nnx.List(
        [MLP(dim, dim, dim // 8, 3, rngs=rngs) for _ in range(self.num_mask_tokens)])
    self.iou_prediction_head = MLP(dim, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth,
                                   rngs=rngs)

  def __call__(self, image_embeddings: Array, image_pe: Array, sparse_prompt_embeddings: Array,
               dense_prompt_embeddings: Array, multimask_output: bool,
               high_res: list[Array] | None = None) -> tuple[Array, Array]:
    """Returns mask logits (B, 4h, 4w, M) and IoU predictions (B, M); M = 3 with multimask output, else 1.

    image_embeddings is (1, h, w, C), shared by every prompt set, or (B, h, w, C), one image per prompt set;
    high_res the encoder's two high-resolution maps (SAM 2), batched the same way.
    """
    masks, iou_pred = self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings,
                                         dense_prompt_embeddings, high_res)
    if multimask_output:
      return masks[..., 1:], iou_pred[:, 1:]
    if self.dynamic_multimask:
      return self._stable_single_mask(masks, iou_pred)
    return masks[..., :1], iou_pred[:, :1]

  def _stable_single_mask(self, masks: Array, iou_pred: Array, delta: float = 0.05,
                          threshold: float = 0.98) -> tuple[Array, Array]:
    """SAM 2's single-mask output: the single-mask token's mask while its stability (the area above +delta over the
    area above -delta) reaches `threshold`, else the multimask output with the highest predicted IoU."""
    best = jnp.argmax(iou_pred[:, 1:], axis=-1) + 1
    best_masks = jnp.take_along_axis(masks, best[:, None, None, None], axis=-1)
    best_iou = jnp.take_along_axis(iou_pred, best[:, None], axis=-1)
    single = masks[..., :1]
    inside = jnp.sum(single > delta, axis=(1, 2, 3)).astype(jnp.float32)
    union = jnp.sum(single > -delta, axis=(1, 2, 3)).astype(jnp.float32)
    stable = jnp.where(union > 0, inside / jnp.maximum(union, 1.0), 1.0) >= threshold
    return (jnp.where(stable[:, None, None, None], single, best_masks),
            jnp.where(stable[:, None], iou_pred[:, :1], best_iou))

  def predict_masks(self, image_embeddings: Array, image_pe: Array, sparse_prompt_embeddings: Array,
                    dense_prompt_embeddings: Array, high_res: list[Array] | None = None) -> tuple[Array, Array]:
    batch = sparse_prompt_embeddings.shape[0]
    leading = [] if self.obj_score_token is None else [self.obj_score_token.embedding[...]]
    output_tokens = jnp.concatenate(leading + [self.iou_token.embedding[...], self.mask_tokens.embedding[...]],
                                    axis=0)
    output_tokens = jnp.broadcast_to(output_tokens[None], (batch, *output_tokens.shape))
    tokens = jnp.concatenate([output_tokens, sparse_prompt_embeddings.astype(output_tokens.dtype)], axis=1)

    if image_embeddings.shape[0] not in (1, batch):
      raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {batch} prompt sets: give one image, "
                       "or one image per prompt set")
    src = jnp.broadcast_to(image_embeddings, (batch, *image_embeddings.shape[1:])) + dense_prompt_embeddings
    b, h, w, c = src.shape
    hs, src = self.transformer(src, image_pe, tokens)
    first = len(leading)
    iou_token_out = hs[:, first]
    mask_tokens_out = hs[:, first + 1:first + 1 + self.num_mask_tokens]

    if self.use_high_res_features and high_res is None:
      raise ValueError("this mask decoder (SAM 2's) adds the encoder's high-resolution maps; pass high_res")
    upscaled = self.output_upscaling(src.reshape(b, h, w, c), high_res if self.use_high_res_features else None)
    hyper_in = jnp.stack([mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
                         axis=1)
    masks = jnp.einsum("bmc,byxc->byxm", hyper_in, upscaled)
    iou_pred = self.iou_prediction_head(iou_token_out)
    return masks, jax.nn.sigmoid(iou_pred) if self.iou_sigmoid else iou_pred
