"""SAM architecture configuration: presets, JSON round-trip, and inference from tensor shapes."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from autosam_jax.errors import DataError
from autosam_jax.models.encoders.hiera import HieraConfig
from autosam_jax.models.encoders.tiny_vit import TinyVitConfig
from autosam_jax.typed_config import TypedConfig, option


class SamConfigError(DataError, ValueError):
  """An architecture no model can be built from. A DataError (one line, exit code 2) and a ValueError, which is what
  the callers that turn it into a ConversionError or CheckpointError catch."""


_BOOL = "true or false"
# The image encoder families (`models/encoders`): Meta's ViT, TinyViT (MobileSAM, LiteMedSAM), Hiera (SAM 2, MedSAM2).
ENCODER_FAMILIES = ("sam_vit", "tiny_vit", "hiera")
# How encoder inputs are normalised: "mean_std", (x - pixel_mean) / pixel_std on the 0..255 scale (SAM, MobileSAM);
# "min_max", each resized image scaled to [0, 1] by its own minimum and maximum (MedSAM's LiteMedSAM inference).
# Padding follows, with zeros, in both.
NORMALIZATIONS = ("mean_std", "min_max")
# How an image becomes the encoder's square input: "longest_side", resized so its longer side is image_size, the
# rest zero-padded (SAM, MedSAM); "square", resized to image_size x image_size whatever its aspect (SAM 2).
RESIZES = ("longest_side", "square")
_RGB = "a list of 3 numbers (red, green, blue)"
# The options of convert that set a field (what tensor shapes do not tell), named with it in messages.
_CONVERT_OPTIONS = {"decoder_num_heads": "--decoder-num-heads", "encoder_num_heads": "--encoder-num-heads",
                    "image_size": "--image-size"}


def _shown(name: str) -> str:
  return f"{name} ({_CONVERT_OPTIONS[name]})" if name in _CONVERT_OPTIONS else name


@dataclasses.dataclass(frozen=True)
class SamConfig(TypedConfig):
  """Everything needed to build a SAM model; names follow Meta's builder arguments.

  Refuses an architecture no model can be built from with a SamConfigError naming the field (and the convert option
  that sets it), before any layer is built: one line where a zero or negative size would otherwise fail deep inside
  a layer (a division by zero, a negative shape) or build a broken model."""

  OPTIONS = "SAM"
  ERROR = SamConfigError
  UNKNOWN = "unknown SAM config key(s) {unknown}; known: {known}"

  # The encoder family, its input size, and (for families other than SAM's ViT) its own section.
  encoder_family: str = option("sam_vit", choices=ENCODER_FAMILIES)
  image_size: int = option(1024, at_least=1, shown=_shown("image_size"))
  tiny_vit: TinyVitConfig | None = None
  hiera: HieraConfig | None = None
  # Image encoder (SAM's ViT; these fields describe the "sam_vit" family only).
  patch_size: int = option(16, at_least=1)
  encoder_embed_dim: int = option(768, at_least=1)
  encoder_depth: int = option(12, at_least=1)
  encoder_num_heads: int = option(12, at_least=1, shown=_shown("encoder_num_heads"))
  encoder_mlp_dim: int = option(3072, at_least=1)
  encoder_global_attn_indexes: tuple[int, ...] = option((2, 5, 8, 11), at_least=0)
  window_size: int = option(14, at_least=0)  # 0: every block attends globally
  use_abs_pos: bool = option(True, kind=_BOOL)
  use_rel_pos: bool = option(True, kind=_BOOL)
  qkv_bias: bool = option(True, kind=_BOOL)
  # Shared width of the neck output, prompt embeddings and decoder.
  prompt_embed_dim: int = option(256, at_least=1)
  # Prompt encoder; the mask downscaling starts with mask_in_chans / 4 channels.
  mask_in_chans: int = option(16, at_least=4)
  # Mask decoder.
  decoder_depth: int = option(2, at_least=1)
  decoder_num_heads: int = option(8, at_least=1, shown=_shown("decoder_num_heads"))
  decoder_mlp_dim: int = option(2048, at_least=1)
  attention_downsample_rate: int = option(2, at_least=1)
  num_multimask_outputs: int = option(3, at_least=0)
  iou_head_depth: int = option(3, at_least=1)
  iou_head_hidden_dim: int = option(256, at_least=1)
  # SAM 2's mask decoder (the "hiera" family only): skips from the encoder's high-resolution maps into the upscaling,
  # an object-score token before the IoU token, IoU predictions through a sigmoid, and for a single mask the
  # fallback to the best of the multimask outputs when its logits are unstable (what `build_sam2` turns on).
  use_high_res_features: bool = option(False, kind=_BOOL)
  pred_obj_scores: bool = option(False, kind=_BOOL)
  iou_prediction_use_sigmoid: bool = option(False, kind=_BOOL)
  dynamic_multimask_via_stability: bool = option(False, kind=_BOOL)
  # Pre-processing (0..255 RGB scale, as Meta's Sam).
  pixel_mean: tuple[float, float, float] = option((123.675, 116.28, 103.53), finite=True, kind=_RGB)
  pixel_std: tuple[float, float, float] = option((58.395, 57.12, 57.375), above=0, finite=True, kind=_RGB)
  normalization: str = option("mean_std", choices=NORMALIZATIONS)
  resize: str = option("longest_side", choices=RESIZES)

  def check(self) -> None:
    """The rules between fields (each field's own are its `option`)."""
    for family in ("tiny_vit", "hiera"):
      if (self.encoder_family == family) != (getattr(self, family) is not None):
        raise self.refusal(f"encoder_family {self.encoder_family!r} needs "
                           + (f"a {family} section" if getattr(self, family) is None else f"no {family} section"))
    if self.encoder_family != "hiera":
      set_fields = [name for name in SAM2_FIELDS if getattr(self, name) != _DEFAULTS[name]]
      if set_fields:
        raise self.refusal(f"{', '.join(set_fields)} {'belongs' if len(set_fields) == 1 else 'belong'} to SAM 2's "
                           f"decoder and inputs (encoder_family 'hiera'), not to {self.encoder_family!r}")
    if self.encoder_family == "hiera":
      if not self.use_high_res_features:  # the encoder always returns them (conv_s0 / conv_s1 are its own)
        raise self.refusal("use_high_res_features must be true for encoder_family 'hiera': SAM 2's encoder returns "
                           "its high-resolution maps and its decoder adds them")
      problem = self.hiera.check_image_size(self.image_size)
      if problem:
        raise self.refusal(f"{_shown('image_size')} {self.image_size} {problem}")
    elif self.encoder_family == "tiny_vit":
      if self.image_size % self.tiny_vit.total_stride:
        raise self.refusal(f"{_shown('image_size')} {self.image_size} is not a multiple of the TinyViT's stride "
                           f"{self.tiny_vit.total_stride}")
    else:
      self._check_vit()
    self._check_decoder()

  def _check_vit(self) -> None:
    if self.image_size % self.patch_size:
      raise self.refusal(f"{_shown('image_size')} {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.encoder_embed_dim % self.encoder_num_heads:
      raise self.refusal(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                         f"{_shown('encoder_num_heads')} {self.encoder_num_heads}")
    bad = [i for i in self.encoder_global_attn_indexes if not i < self.encoder_depth]
    if bad:
      raise self.refusal(f"encoder_global_attn_indexes {bad} are outside the encoder's blocks "
                         f"0..{self.encoder_depth - 1} (encoder_depth {self.encoder_depth})")

  def _check_decoder(self) -> None:
    # The prompt encoder's positional encoding has prompt_embed_dim / 2 frequencies; the mask decoder upscales to
    # prompt_embed_dim / 8 channels.
    if self.prompt_embed_dim % 2 or self.prompt_embed_dim < 8:
      raise self.refusal(f"prompt_embed_dim must be an even number of at least 8, got {self.prompt_embed_dim}")
    # The decoder's self-attention spans prompt_embed_dim channels, its cross-attention prompt_embed_dim divided by
    # attention_downsample_rate: the heads must divide both.
    internal = self.prompt_embed_dim // self.attention_downsample_rate
    if internal < 1:
      raise self.refusal(f"attention_downsample_rate {self.attention_downsample_rate} leaves no channels of "
                         f"prompt_embed_dim {self.prompt_embed_dim}")
    for width in (self.prompt_embed_dim, internal):
      if width % self.decoder_num_heads:
        raise self.refusal(f"{_shown('decoder_num_heads')} {self.decoder_num_heads} do not divide the mask decoder's "
                           f"attention width {width}")

  @property
  def image_embedding_size(self) -> int:
    """Side of the encoder's output grid (64 for SAM's 1024 input, LiteMedSAM's 256 and MobileSAM's 1024)."""
    if self.encoder_family == "tiny_vit":
      return self.image_size // self.tiny_vit.total_stride
    if self.encoder_family == "hiera":
      return self.image_size // self.hiera.embedding_stride
    return self.image_size // self.patch_size

  @property
  def feature_names(self) -> tuple[str, ...]:
    """The named maps the encoder returns: "embedding" always, "high_res" where the decoder reads them (SAM 2)."""
    return ("embedding", "high_res") if self.use_high_res_features else ("embedding",)

  def feature_shapes(self) -> dict[str, list[tuple[int, int, int]]]:
    """(h, w, channels) of every named map of one image: "embedding" one, "high_res" the strides 4 and 8 maps."""
    g, d = self.image_embedding_size, self.prompt_embed_dim
    shapes = {"embedding": [(g, g, d)]}
    if self.use_high_res_features:
      shapes["high_res"] = [(4 * g, 4 * g, d // 8), (2 * g, 2 * g, d // 4)]
    return shapes

  def to_dict(self) -> dict[str, Any]:
    """The fields that describe this model: a family other than SAM's ViT leaves the ViT's out (and SAM's ViT the
    empty sections of the others)."""
    values = dataclasses.asdict(self)
    if self.encoder_family != "sam_vit":
      for name in VIT_FIELDS:
        values.pop(name)
    for family in ("tiny_vit", "hiera"):
      if getattr(self, family) is None:
        values.pop(family)
    if self.encoder_family != "hiera":
      for name in SAM2_FIELDS:
        values.pop(name)
    return values

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @property
  def family_name(self) -> str:
    """The encoder as people name it, for messages."""
    if self.encoder_family == "tiny_vit":
      return f"TinyViT at {self.image_size} px"
    if self.encoder_family == "hiera":
      stages = "-".join(str(n) for n in self.hiera.stages)
      return f"Hiera (SAM 2; width {self.hiera.embed_dim}, stages {stages}) at {self.image_size} px"
    return f"SAM ViT (width {self.encoder_embed_dim}, depth {self.encoder_depth}) at {self.image_size} px"


# The fields of the "sam_vit" family's encoder.
VIT_FIELDS = ("patch_size", "encoder_embed_dim", "encoder_depth", "encoder_num_heads", "encoder_mlp_dim",
              "encoder_global_attn_indexes", "window_size", "use_abs_pos", "use_rel_pos", "qkv_bias")
# The fields of SAM 2's decoder and inputs, written only for the "hiera" family (other families' configs, and the
# caches and runs that record them, stay as they were).
SAM2_FIELDS = ("use_high_res_features", "pred_obj_scores", "iou_prediction_use_sigmoid",
               "dynamic_multimask_via_stability", "resize")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamConfig)}


def _preset(embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...]) -> SamConfig:
  return SamConfig(encoder_embed_dim=embed_dim, encoder_depth=depth, encoder_num_heads=num_heads,
                   encoder_mlp_dim=4 * embed_dim, encoder_global_attn_indexes=global_attn)


PRESETS: dict[str, SamConfig] = {
    "vit_b": _preset(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _preset(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _preset(1280, 32, 16, (7, 15, 23, 31)),
}


def infer_config(shapes: Mapping[tuple[str, ...], tuple[int, ...]], **overrides: Any) -> SamConfig:
  """Reads the architecture off a converted parameter tree's shapes.

  `shapes` maps Flax parameter paths (as produced by the conversion tables) to array shapes. What shapes cannot
  tell (attention heads without relative position tables, decoder heads) comes from `overrides` or Meta's defaults.
  """
  def shape(*path: str) -> tuple[int, ...]:
    try:
      return tuple(shapes[path])
    except KeyError:
      raise ValueError(f"checkpoint has no tensor for {'.'.join(path)}; it is not a SAM checkpoint") from None

  if ("image_encoder", "pos_embed_window") in shapes:
    from autosam_jax.models.encoders.hiera import infer_hiera

    hiera = infer_hiera(shapes, overrides.pop("hiera", None))
    values = dict(encoder_family="hiera", hiera=hiera, image_size=1024, resize="square",
                  prompt_embed_dim=shape("image_encoder", "neck", "0", "kernel")[-1],
                  use_high_res_features=True, iou_prediction_use_sigmoid=True, dynamic_multimask_via_stability=True,
                  pred_obj_scores=("mask_decoder", "obj_score_token", "embedding") in shapes)
    values.update(_decoder_values(shapes, shape, values["prompt_embed_dim"]))
    values.update(overrides)
    return SamConfig(**values)

  if any(p[:2] == ("image_encoder", "layers") for p in shapes):
    from autosam_jax.models.encoders.tiny_vit import infer_tiny_vit

    tiny_vit, image_size = infer_tiny_vit(shapes)
    values: dict[str, Any] = dict(encoder_family="tiny_vit", tiny_vit=tiny_vit, image_size=image_size,
                                  prompt_embed_dim=shape("image_encoder", "neck", "conv1", "kernel")[-1])
    values.update(_decoder_values(shapes, shape, values["prompt_embed_dim"]))
    values.update(overrides)
    return SamConfig(**values)

  patch, _, _, embed_dim = shape("image_encoder", "patch_embed", "kernel")
  depth = 1 + max(int(p[2]) for p in shapes if p[:2] == ("image_encoder", "blocks"))
  use_abs_pos = ("image_encoder", "pos_embed") in shapes
  use_rel_pos = ("image_encoder", "blocks", "0", "attn", "rel_pos_h") in shapes
  mlp_dim = shape("image_encoder", "blocks", "0", "mlp", "lin1", "kernel")[1]
  prompt_embed_dim = shape("image_encoder", "neck", "conv1", "kernel")[-1]

  values: dict[str, Any] = dict(patch_size=patch, encoder_embed_dim=embed_dim, encoder_depth=depth,
                                encoder_mlp_dim=mlp_dim, use_abs_pos=use_abs_pos, use_rel_pos=use_rel_pos,
                                prompt_embed_dim=prompt_embed_dim)
  values["qkv_bias"] = ("image_encoder", "blocks", "0", "attn", "qkv", "bias") in shapes
  if use_abs_pos:
    values["image_size"] = shape("image_encoder", "pos_embed")[1] * patch
  elif "image_size" not in overrides:
    raise ValueError("checkpoint has no absolute position embedding; pass the image size explicitly")

  if use_rel_pos:
    grid = (values.get("image_size") or overrides["image_size"]) // patch
    head_dim = shape("image_encoder", "blocks", "0", "attn", "rel_pos_h")[1]
    values["encoder_num_heads"] = embed_dim // head_dim
    table_sizes = [shape("image_encoder", "blocks", str(i), "attn", "rel_pos_h")[0] for i in range(depth)]
    global_blocks = tuple(i for i, n in enumerate(table_sizes) if n == 2 * grid - 1)
    window_tables = {n for n in table_sizes if n != 2 * grid - 1}
    if len(window_tables) > 1:
      raise ValueError(f"windowed blocks disagree on their relative position table sizes: {sorted(window_tables)}")
    if window_tables:
      values["window_size"] = (window_tables.pop() + 1) // 2
      values["encoder_global_attn_indexes"] = global_blocks
    else:
      # A window as large as the grid is global attention; nothing in the shapes tells the two apart.
      values["window_size"] = overrides.get("window_size", 0)
      values["encoder_global_attn_indexes"] = tuple(range(depth)) if not values["window_size"] else ()

  elif "encoder_num_heads" not in overrides:
    raise ValueError("checkpoint has no relative position tables, so the encoder's attention heads cannot be read "
                     "off its shapes; pass them explicitly (--encoder-num-heads)")

  values.update(_decoder_values(shapes, shape, prompt_embed_dim))
  values.update(overrides)
  return SamConfig(**values)


def _decoder_values(shapes, shape, prompt_embed_dim: int) -> dict[str, Any]:
  """The prompt encoder's and mask decoder's fields, read off their shapes (the same in every family)."""
  values: dict[str, Any] = {}
  values["mask_in_chans"] = shape("prompt_encoder", "mask_downscaling", "conv2", "kernel")[-1]
  values["decoder_depth"] = 1 + max(int(p[3]) for p in shapes if p[:3] == ("mask_decoder", "transformer", "layers"))
  values["decoder_mlp_dim"] = shape("mask_decoder", "transformer", "layers", "0", "mlp", "lin1", "kernel")[1]
  internal = shape("mask_decoder", "transformer", "final_attn_token_to_image", "q_proj", "kernel")[1]
  values["attention_downsample_rate"] = prompt_embed_dim // internal
  values["num_multimask_outputs"] = shape("mask_decoder", "mask_tokens", "embedding")[0] - 1
  iou_layers = [p for p in shapes if p[:3] == ("mask_decoder", "iou_prediction_head", "layers") and p[-1] == "kernel"]
  values["iou_head_depth"] = len(iou_layers)
  values["iou_head_hidden_dim"] = shape("mask_decoder", "iou_prediction_head", "layers", "0", "kernel")[1]
  return values
