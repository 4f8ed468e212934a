"""The heads of paper-protocol sections 1a/1b written plainly in PyTorch, with the official loss and Adam: the reference
that `head_step` and `paper_cell` time ours against.

Channels-first, as the official code. The AutoSAM head is SAM's mask decoder without prompt tokens, built from
segment_anything's own `TwoWayTransformer`, `MLP`, `LayerNorm2d` and `PositionEmbeddingRandom`. It computes what the
loss needs: the faithful head's discarded second mask (MLP 1) and its frozen IoU head are built (so the parameter
counts match the official head) but not run, exactly as in ours; the official code runs both, so it is a little
slower than this reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from weights_conversion.meta_reference import import_segment_anything

import_segment_anything()  # stubs torchvision where it is missing
from segment_anything.modeling.common import LayerNorm2d  # noqa: E402
from segment_anything.modeling.mask_decoder import MLP  # noqa: E402
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom  # noqa: E402
from segment_anything.modeling.transformer import TwoWayTransformer  # noqa: E402


def _output_upscaling(dim: int) -> nn.Sequential:
  return nn.Sequential(nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
                       nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU())


def _frozen(module: nn.Module) -> nn.Module:
  for p in module.parameters():
    p.requires_grad_(False)
  return module


class AutoSamHead(nn.Module):
  """faithful: per class [iou_c, mask_c0, mask_c1] tokens, each class its own batch row; improved joint: one token
  per class, all classes in one transformer pass over image + no_mask_embed, one hypernetwork MLP per class."""

  def __init__(self, num_classes: int, variant: str = "faithful", joint: bool = False, dim: int = 256):
    super().__init__()
    if (variant == "improved") != joint:
      raise ValueError("the reference has the faithful head and the improved joint one")
    self.num_classes, self.variant = num_classes, variant
    self.transformer = TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=8, mlp_dim=2048)
    self.output_upscaling = _output_upscaling(dim)
    self.pe_layer = PositionEmbeddingRandom(dim // 2)
    if variant == "faithful":
      self.iou_token = _frozen(nn.Embedding(num_classes, dim))
      self.mask_tokens = nn.Embedding(2 * num_classes, dim)
      self.output_hypernetworks_mlps = nn.ModuleList([MLP(dim, dim, dim // 8, 3) for _ in range(2)])
      self.iou_prediction_head = _frozen(MLP(dim, 256, 2, 3))
    else:
      self.class_tokens = nn.Parameter(torch.randn(num_classes, dim))
      self.no_mask_embed = nn.Parameter(torch.randn(dim))
      self.output_hypernetworks_mlps = nn.ModuleList([MLP(dim, dim, dim // 8, 3) for _ in range(num_classes)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """(B, dim, h, w) -> logits (B, C, 4h, 4w)."""
    b, dim, h, w = x.shape
    c = self.num_classes
    image_pe = self.pe_layer((h, w))[None]
    if self.variant == "faithful":
      src = torch.repeat_interleave(x, c, dim=0)  # row b * C + c
      tokens = torch.cat([self.iou_token.weight[:, None], self.mask_tokens.weight.view(c, 2, dim)], dim=1)
      hs, src = self.transformer(src, image_pe, tokens.repeat(b, 1, 1))
      upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b * c, dim, h, w))
      hyper_in = self.output_hypernetworks_mlps[0](hs[:, 1])[:, None]  # (B C, 1, dim / 8)
      return (hyper_in @ upscaled.flatten(2)).view(b, c, 4 * h, 4 * w)
    tokens = self.class_tokens[None].expand(b, -1, -1)
    hs, src = self.transformer(x + self.no_mask_embed[:, None, None], image_pe, tokens)
    upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, dim, h, w))
    hyper_in = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
    return (hyper_in @ upscaled.flatten(2)).view(b, c, 4 * h, 4 * w)


class CnnHead(nn.Module):
  """`SegDecoderCNN(num_classes, num_depth=4)`: 1x1 convs to 16 top, 3x3 blocks, two ConvT upsamplings, no norms."""

  def __init__(self, num_classes: int, embed_dim: int = 256, top: int = 64, depth: int = 4):
    super().__init__()
    width = top * 2 ** depth
    layers = [nn.Conv2d(embed_dim, width, 1), nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU()]
    for i in range(depth):
      ch = top * 2 ** (depth - i)
      if i < 2:
        layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch // 2, 3, padding=1), nn.ReLU()]
      else:
        layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                   nn.ConvTranspose2d(ch, ch // 2, 2, 2)]
    layers += [nn.Conv2d(top, top, 3, padding=1), nn.Conv2d(top, num_classes, 1)]
    self.net = nn.Sequential(*layers)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.net(x)


class LinearHead(nn.Module):
  """`SegDecoderLinear`: SAM's output_upscaling, 1x1 conv 32 -> 32, ReLU, 1x1 conv 32 -> C (ReLU on it: faithful)."""

  def __init__(self, num_classes: int, variant: str = "faithful", embed_dim: int = 256):
    super().__init__()
    self.variant = variant
    self.output_upscaling = _output_upscaling(embed_dim)
    self.hidden_conv = nn.Conv2d(embed_dim // 8, embed_dim // 8, 1)
    self.classifier = nn.Conv2d(embed_dim // 8, num_classes, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    logits = self.classifier(F.relu(self.hidden_conv(self.output_upscaling(x))))
    return F.relu(logits) if self.variant == "faithful" else logits


def build(kind: str, num_classes: int, variant: str = "faithful", joint: bool = False) -> nn.Module:
  if kind == "autosam":
    return AutoSamHead(num_classes, variant, joint)
  if kind == "cnn":
    return CnnHead(num_classes)
  return LinearHead(num_classes, variant)


def counts(module: nn.Module) -> dict[str, int]:
  """Scalars in trainable parameters, frozen parameters and buffers."""
  return {"trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
          "frozen": sum(p.numel() for p in module.parameters() if not p.requires_grad),
          "buffers": sum(b.numel() for b in module.buffers())}


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
  """The official loss: CrossEntropyLoss + SoftDiceLoss(batch_dice=True, do_bg=False), smooth 1, on (B, C, H, W)."""
  ce = F.cross_entropy(logits, target)
  probs = torch.softmax(logits, dim=1)[:, 1:]
  onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
  axes = (0, 2, 3)
  intersection = (probs * onehot).sum(axes)
  denominator = (probs * probs).sum(axes) + (onehot * onehot).sum(axes)
  per_class = 1 - (2 * intersection + 1) / (denominator + 1)
  return ce + per_class[per_class > 0].mean()


def _logits(head: nn.Module, embeddings: torch.Tensor, target_size: int) -> torch.Tensor:
  logits = head(embeddings)
  if logits.shape[-1] != target_size:  # AutoSamSeg / SamFeatSeg: bilinear to 224
    logits = F.interpolate(logits, size=(target_size, target_size), mode="bilinear", align_corners=False)
  return logits


def make_train_step(head: nn.Module, learning_rate: float = 5e-4):
  """step(embeddings (B, 256, h, w), target (B, H, W) int64) -> loss: forward, loss, backward, Adam."""
  optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=learning_rate)
  head.train()

  def step(embeddings: torch.Tensor, target: torch.Tensor) -> float:
    loss = segmentation_loss(_logits(head, embeddings, target.shape[-1]), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  return step


def make_eval_step(head: nn.Module):
  """Validation: forward and loss under no_grad."""

  @torch.no_grad()
  def step(embeddings: torch.Tensor, target: torch.Tensor) -> float:
    return float(segmentation_loss(_logits(head, embeddings, target.shape[-1]), target))

  return step
