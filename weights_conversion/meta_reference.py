"""Meta's `segment-anything` PyTorch model built for any SamConfig, with every tensor randomised.

Used by the parity tests, the parity demo and the benchmarks: real SAM weights cannot be downloaded here, so
correctness is shown on random weights saved exactly as Meta saves its checkpoints.
"""

from __future__ import annotations

import importlib
import sys
import types
from functools import partial
from pathlib import Path

from autosam_jax.models.config import SamConfig


_TORCHVISION_STUBS = ("torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.transforms",
                      "torchvision.transforms.functional")


def _stub_torchvision() -> None:
  """segment_anything imports torchvision at package import, for helpers we never call; stand in for it."""
  def unavailable(*args, **kwargs):
    raise RuntimeError("torchvision is not installed; this segment_anything helper needs it")

  attrs = {"torchvision.ops.boxes": {"batched_nms": unavailable, "box_area": unavailable},
           "torchvision.transforms.functional": {"resize": unavailable, "to_pil_image": unavailable}}
  for name in _TORCHVISION_STUBS:
    module = types.ModuleType(name)
    module.__dict__.update(attrs.get(name, {}))
    sys.modules[name] = module


def import_segment_anything():
  if "segment_anything" in sys.modules:
    return sys.modules["segment_anything"]
  try:
    importlib.import_module("torchvision")
    stubbed = False
  except Exception:  # missing, or a CUDA build that fails to load beside the CPU torch
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
    _stub_torchvision()
    stubbed = True
  try:
    return importlib.import_module("segment_anything")
  except ImportError as err:
    raise ImportError("Meta's segment-anything package is needed here: pip install 'autosam-jax[convert]'") from err
  finally:
    if stubbed:
      # segment_anything holds what it took from the stubs; out of sys.modules they no longer tell other packages'
      # probes (transformers, under peft) that torchvision is installed.
      for name in _TORCHVISION_STUBS:
        sys.modules.pop(name, None)


def build_meta_sam(config: SamConfig, seed: int = 0):
  """Meta's `Sam` for `config` (eval mode, float32), every parameter and buffer drawn at random."""
  import torch

  import_segment_anything()
  from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

  torch.manual_seed(seed)
  grid = config.image_embedding_size
  sam = Sam(
      image_encoder=ImageEncoderViT(
          img_size=config.image_size, patch_size=config.patch_size, embed_dim=config.encoder_embed_dim,
          depth=config.encoder_depth, num_heads=config.encoder_num_heads,
          mlp_ratio=config.encoder_mlp_dim / config.encoder_embed_dim, out_chans=config.prompt_embed_dim,
          qkv_bias=config.qkv_bias, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_abs_pos=config.use_abs_pos,
          use_rel_pos=config.use_rel_pos, window_size=config.window_size,
          global_attn_indexes=config.encoder_global_attn_indexes),
      prompt_encoder=PromptEncoder(
          embed_dim=config.prompt_embed_dim, image_embedding_size=(grid, grid),
          input_image_size=(config.image_size, config.image_size), mask_in_chans=config.mask_in_chans),
      mask_decoder=MaskDecoder(
          num_multimask_outputs=config.num_multimask_outputs,
          transformer=TwoWayTransformer(depth=config.decoder_depth, embedding_dim=config.prompt_embed_dim,
                                        mlp_dim=config.decoder_mlp_dim, num_heads=config.decoder_num_heads,
                                        attention_downsample_rate=config.attention_downsample_rate),
          transformer_dim=config.prompt_embed_dim, iou_head_depth=config.iou_head_depth,
          iou_head_hidden_dim=config.iou_head_hidden_dim),
      pixel_mean=list(config.pixel_mean), pixel_std=list(config.pixel_std))
  if int(sam.image_encoder.blocks[0].mlp.lin1.out_features) != config.encoder_mlp_dim:
    raise ValueError(f"encoder_mlp_dim {config.encoder_mlp_dim} is not an integer multiple Meta's builder can express")
  from segment_anything.modeling.common import LayerNorm2d

  randomize_weights(sam, seed, norm_types=(LayerNorm2d,))
  return sam.eval()


def randomize_weights(model, seed: int, norm_types: tuple[type, ...] = ()) -> None:
  """Draws every tensor of a SAM model (Meta's or transformers') at random, in place.

  Linear and conv weights get std 1/sqrt(fan_in) (unscaled weights make the decoder so ill-conditioned that float32
  rounding alone moves logits by 1e-3), norms 1 + 0.2 N(0, 1), embeddings N(0, 1). The tensors both libraries
  initialise to zero (relative position tables, absolute position embedding) are drawn too, so a parity test sees
  them, and the positional Fourier matrix gets Meta's unit scale.
  """
  import torch

  generator = torch.Generator().manual_seed(seed)

  def noise(tensor, scale=1.0, offset=0.0):
    tensor.copy_(offset + scale * torch.randn(tensor.shape, generator=generator))

  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
        # ConvTranspose2d weights are (in, out, kh, kw): each output sums over `in` inputs.
        transposed = isinstance(module, torch.nn.ConvTranspose2d)
        noise(module.weight, (module.weight.shape[0] if transposed else module.weight[0].numel()) ** -0.5)
        if module.bias is not None:
          noise(module.bias, 0.05)
      elif isinstance(module, (torch.nn.LayerNorm, *norm_types)):
        noise(module.weight, 0.2, 1.0)
        noise(module.bias, 0.2)
      elif isinstance(module, torch.nn.Embedding):
        noise(module.weight)
    for name, tensor in model.state_dict(keep_vars=True).items():
      if name.endswith(("rel_pos_h", "rel_pos_w", "pos_embed")):
        noise(tensor, 0.5)
      elif name.endswith(("positional_encoding_gaussian_matrix", "positional_embedding")):
        noise(tensor)


def save_meta_checkpoint(sam, path: str | Path) -> Path:
  """Saves exactly as Meta's checkpoints are saved: `torch.save(model.state_dict())`, buffers included."""
  import torch

  path = Path(path)
  state = {k: v for k, v in sam.state_dict().items() if k not in ("pixel_mean", "pixel_std")}
  torch.save(state, path)
  return path
