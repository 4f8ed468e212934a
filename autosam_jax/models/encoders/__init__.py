"""The image encoder families, as components: every stage asks a model's `SamConfig` which family it holds and goes
through these functions, never through one family's attributes.

A family gives: its modules (`build_encoder`), the grid of its "embedding" feature map (`SamConfig.
image_embedding_size`), the blocks whose linears LoRA may adapt (`adaptable_blocks`: each has attn.qkv, attn.proj,
mlp.lin1, mlp.lin2, qkv columns ordered [q | k | v]), how its attention is computed (`set_attention`), its config read
off checkpoint shapes (`models.config.infer_config`) and its key table (`weights_conversion/tables.py`). The
preprocessing a set of weights needs is the converted folder's (`SamConfig.normalization`, `pixel_mean/std`), not the
family's.

  sam_vit   Meta's SAM ViT-B/L/H (`models/image_encoder.py`)
  tiny_vit  TinyViT (`models/encoders/tiny_vit.py`): MobileSAM at 1024 px, LiteMedSAM at 256 px
  hiera     Hiera + FPN neck (`models/encoders/hiera.py`): SAM 2 / SAM 2.1 tiny, small, base_plus, large; MedSAM2

The encoder's output is a dict of named maps (`encoder_features`): "embedding" (B, G, G, C) always, and for SAM 2
"high_res", the two maps its mask decoder's upscaling path adds (`SamConfig.feature_names`, `feature_shapes`).
"""

from __future__ import annotations

from flax import nnx


def build_encoder(config, *, dtype=None, attention: str = "auto", remat: bool = False, rngs: nnx.Rngs):
  """The image encoder `config` (a SamConfig) describes: (B, S, S, 3) encoder inputs -> (B, G, G, C) embeddings
  (SAM's ViT, TinyViT) or the dict of named maps (Hiera; see `encoder_features`)."""
  if config.encoder_family == "hiera":
    from autosam_jax.models.encoders.hiera import HieraEncoder

    encoder = HieraEncoder(config.hiera, config.image_size, config.prompt_embed_dim, dtype=dtype, remat=remat,
                           rngs=rngs)
    return set_attention(encoder, attention)
  if config.encoder_family == "tiny_vit":
    from autosam_jax.models.encoders.tiny_vit import TinyViTEncoder

    return TinyViTEncoder(config.tiny_vit, config.image_size, config.prompt_embed_dim, dtype=dtype, remat=remat,
                          rngs=rngs)
  from autosam_jax.models.image_encoder import ImageEncoderViT

  return ImageEncoderViT(config, dtype=dtype, attention=attention, remat=remat, rngs=rngs)


def adaptable_blocks(encoder) -> list:
  """The encoder's transformer blocks, in order, each with attn.qkv, attn.proj, mlp.lin1 and mlp.lin2."""
  if hasattr(encoder, "adaptable_blocks"):
    return encoder.adaptable_blocks()
  return list(encoder.blocks)


def encoder_features(encoder, images) -> dict:
  """The encoder's named maps for (B, S, S, 3) inputs: {"embedding": ...} and, for SAM 2, "high_res"."""
  out = encoder(images)
  return out if isinstance(out, dict) else {"embedding": out}


def set_attention(encoder, implementation: str, *, frozen: bool | None = None):
  """How the encoder computes attention from now on (`image_encoder.ATTENTION_IMPLEMENTATIONS`).

  TinyViT's windows of at most 14 x 14 tokens with a learned bias attend as two heads-major matmuls in every case
  (the name is checked, not used). Hiera's attention has no bias: "auto" takes cuDNN's fused attention on CUDA in
  bf16 (forward and backward; `hiera.attention_for`), XLA's otherwise; "chunked" (SAM-ViT's CPU path) means XLA's
  there."""
  from autosam_jax.models import image_encoder

  implementation = image_encoder.check_attention(implementation)
  if type(encoder).__name__ == "HieraEncoder":
    for block in encoder.blocks:
      block.attn.attention = "xla" if implementation == "chunked" else implementation
  elif hasattr(encoder, "blocks"):
    image_encoder.set_attention(encoder, implementation, frozen=frozen)
  return encoder
