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
"""

from __future__ import annotations

from flax import nnx

FEATURES = ("embedding",)  # the named feature maps every family returns (B, 64, 64, 256)


def build_encoder(config, *, dtype=None, attention: str = "auto", remat: bool = False, rngs: nnx.Rngs):
  """The image encoder `config` (a SamConfig) describes: (B, S, S, 3) encoder inputs -> (B, G, G, C) embeddings."""
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


def set_attention(encoder, implementation: str, *, frozen: bool | None = None):
  """How the encoder computes attention from now on (`image_encoder.ATTENTION_IMPLEMENTATIONS`). TinyViT's windows
  of at most 14 x 14 tokens with a learned bias attend as one einsum in every case; the name is checked, not used."""
  from autosam_jax.models import image_encoder

  image_encoder.check_attention(implementation)
  if hasattr(encoder, "blocks"):
    image_encoder.set_attention(encoder, implementation, frozen=frozen)
  return encoder


def set_remat(encoder, remat: bool) -> None:
  encoder.remat = remat
