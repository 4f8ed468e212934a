"""Key tables: source checkpoint key pattern -> Flax parameter path + layout change.

A row is (regex over the whole source key, Flax path template with `{1}`-style group references, layout).
Layouts say how a PyTorch tensor becomes its Flax counterpart:
  same       copied as is
  linear     (out, in) -> (in, out)
  conv       (out, in, kh, kw) -> (kh, kw, in, out)
  convt2x2   ConvTranspose2d (in, out, 2, 2) -> (in, 2, 2, out) for `ConvTranspose2x2`
  conv1x1    a 1 x 1 Conv2d (out, in, 1, 1) -> (in, out), as the `Linear` it is channels-last
  nchw       a (1, C, H, W) parameter map -> (1, H, W, C)
  flat       a (1, ..., C) parameter -> (C,)
  drop       a tensor the architecture has and its forward never reads (a BatchNorm's step counter, a classifier
             the segmentation model does not use): consumed, counted in conversion.json, not written
"""

from __future__ import annotations

import numpy as np

LAYOUTS = {
    "same": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "convt2x2": lambda a: a.transpose(0, 2, 3, 1),
    "conv1x1": lambda a: a[:, :, 0, 0].T,
    "nchw": lambda a: a.transpose(0, 2, 3, 1),
    "flat": lambda a: a.reshape(-1),
    "drop": lambda a: a,
}

Row = tuple[str, str | None, str]


def _linear(src: str, dst: str) -> list[Row]:
  return [(src + r"\.weight", dst + ".kernel", "linear"), (src + r"\.bias", dst + ".bias", "same")]


def _norm(src: str, dst: str) -> list[Row]:
  return [(src + r"\.weight", dst + ".scale", "same"), (src + r"\.bias", dst + ".bias", "same")]


def _conv(src: str, dst: str, layout: str = "conv") -> list[Row]:
  return [(src + r"\.weight", dst + ".kernel", layout), (src + r"\.bias", dst + ".bias", "same")]


def _embed(src: str, dst: str) -> list[Row]:
  return [(src + r"\.weight", dst + ".embedding", "same")]


_N = r"(\d+)"


def _attention(src: str, dst: str) -> list[Row]:
  return [row for p in ("q_proj", "k_proj", "v_proj", "out_proj") for row in _linear(f"{src}\\.{p}", f"{dst}.{p}")]


# Meta's segment-anything state dict (sam_vit_{b,l,h}_*.pth).
META: list[Row] = [
    *_conv(r"image_encoder\.patch_embed\.proj", "image_encoder.patch_embed"),
    (r"image_encoder\.pos_embed", "image_encoder.pos_embed", "same"),
    *_norm(rf"image_encoder\.blocks\.{_N}\.(norm1|norm2)", "image_encoder.blocks.{1}.{2}"),
    *_linear(rf"image_encoder\.blocks\.{_N}\.attn\.(qkv|proj)", "image_encoder.blocks.{1}.attn.{2}"),
    (rf"image_encoder\.blocks\.{_N}\.attn\.(rel_pos_h|rel_pos_w)", "image_encoder.blocks.{1}.attn.{2}", "same"),
    *_linear(rf"image_encoder\.blocks\.{_N}\.mlp\.(lin1|lin2)", "image_encoder.blocks.{1}.mlp.{2}"),
    (r"image_encoder\.neck\.0\.weight", "image_encoder.neck.conv1.kernel", "conv"),
    *_norm(r"image_encoder\.neck\.1", "image_encoder.neck.norm1"),
    (r"image_encoder\.neck\.2\.weight", "image_encoder.neck.conv2.kernel", "conv"),
    *_norm(r"image_encoder\.neck\.3", "image_encoder.neck.norm2"),
    (r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "same"),
    *_embed(rf"prompt_encoder\.point_embeddings\.{_N}", "prompt_encoder.point_embeddings.{1}"),
    *_embed(r"prompt_encoder\.(not_a_point_embed|no_mask_embed)", "prompt_encoder.{1}"),
    *_conv(r"prompt_encoder\.mask_downscaling\.0", "prompt_encoder.mask_downscaling.conv1"),
    *_norm(r"prompt_encoder\.mask_downscaling\.1", "prompt_encoder.mask_downscaling.norm1"),
    *_conv(r"prompt_encoder\.mask_downscaling\.3", "prompt_encoder.mask_downscaling.conv2"),
    *_norm(r"prompt_encoder\.mask_downscaling\.4", "prompt_encoder.mask_downscaling.norm2"),
    *_conv(r"prompt_encoder\.mask_downscaling\.6", "prompt_encoder.mask_downscaling.conv3"),
    *_embed(r"mask_decoder\.(iou_token|mask_tokens)", "mask_decoder.{1}"),
    *_attention(rf"mask_decoder\.transformer\.layers\.{_N}\."
                r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)",
                "mask_decoder.transformer.layers.{1}.{2}"),
    *_norm(rf"mask_decoder\.transformer\.layers\.{_N}\.(norm[1-4])", "mask_decoder.transformer.layers.{1}.{2}"),
    *_linear(rf"mask_decoder\.transformer\.layers\.{_N}\.mlp\.(lin1|lin2)",
             "mask_decoder.transformer.layers.{1}.mlp.{2}"),
    *_attention(r"mask_decoder\.transformer\.final_attn_token_to_image",
                "mask_decoder.transformer.final_attn_token_to_image"),
    *_norm(r"mask_decoder\.transformer\.norm_final_attn", "mask_decoder.transformer.norm_final_attn"),
    *_conv(r"mask_decoder\.output_upscaling\.0", "mask_decoder.output_upscaling.conv1", "convt2x2"),
    *_norm(r"mask_decoder\.output_upscaling\.1", "mask_decoder.output_upscaling.norm"),
    *_conv(r"mask_decoder\.output_upscaling\.3", "mask_decoder.output_upscaling.conv2", "convt2x2"),
    *_linear(rf"mask_decoder\.output_hypernetworks_mlps\.{_N}\.layers\.{_N}",
             "mask_decoder.output_hypernetworks_mlps.{1}.layers.{2}"),
    *_linear(rf"mask_decoder\.iou_prediction_head\.layers\.{_N}", "mask_decoder.iou_prediction_head.layers.{1}"),
]

# Hugging Face transformers `SamModel` (model.safetensors). Its MLPs name their layers proj_in, layers.k,
# proj_out; `hf_mlp_layer_names` renames them to numbered layers before this table applies.
HUGGING_FACE: list[Row] = [
    *_conv(r"vision_encoder\.patch_embed\.projection", "image_encoder.patch_embed"),
    (r"vision_encoder\.pos_embed", "image_encoder.pos_embed", "same"),
    *_norm(rf"vision_encoder\.layers\.{_N}\.layer_norm([12])", "image_encoder.blocks.{1}.norm{2}"),
    *_linear(rf"vision_encoder\.layers\.{_N}\.attn\.(qkv|proj)", "image_encoder.blocks.{1}.attn.{2}"),
    (rf"vision_encoder\.layers\.{_N}\.attn\.(rel_pos_h|rel_pos_w)", "image_encoder.blocks.{1}.attn.{2}", "same"),
    *_linear(rf"vision_encoder\.layers\.{_N}\.mlp\.(lin1|lin2)", "image_encoder.blocks.{1}.mlp.{2}"),
    (r"vision_encoder\.neck\.conv([12])\.weight", "image_encoder.neck.conv{1}.kernel", "conv"),
    *_norm(r"vision_encoder\.neck\.layer_norm([12])", "image_encoder.neck.norm{1}"),
    # The same tensor twice (tied weights); both copies must agree.
    (r"(?:shared_image_embedding|prompt_encoder\.shared_embedding)\.positional_embedding",
     "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "same"),
    *_embed(rf"prompt_encoder\.point_embed\.{_N}", "prompt_encoder.point_embeddings.{1}"),
    *_embed(r"prompt_encoder\.(not_a_point_embed|no_mask_embed)", "prompt_encoder.{1}"),
    *_conv(r"prompt_encoder\.mask_embed\.conv([123])", "prompt_encoder.mask_downscaling.conv{1}"),
    *_norm(r"prompt_encoder\.mask_embed\.layer_norm([12])", "prompt_encoder.mask_downscaling.norm{1}"),
    *_embed(r"mask_decoder\.(iou_token|mask_tokens)", "mask_decoder.{1}"),
    *_attention(rf"mask_decoder\.transformer\.layers\.{_N}\."
                r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)",
                "mask_decoder.transformer.layers.{1}.{2}"),
    *_norm(rf"mask_decoder\.transformer\.layers\.{_N}\.layer_norm([1-4])",
           "mask_decoder.transformer.layers.{1}.norm{2}"),
    *_linear(rf"mask_decoder\.transformer\.layers\.{_N}\.mlp\.(lin1|lin2)",
             "mask_decoder.transformer.layers.{1}.mlp.{2}"),
    *_attention(r"mask_decoder\.transformer\.final_attn_token_to_image",
                "mask_decoder.transformer.final_attn_token_to_image"),
    *_norm(r"mask_decoder\.transformer\.layer_norm_final_attn", "mask_decoder.transformer.norm_final_attn"),
    *_conv(r"mask_decoder\.upscale_conv([12])", "mask_decoder.output_upscaling.conv{1}", "convt2x2"),
    *_norm(r"mask_decoder\.upscale_layer_norm", "mask_decoder.output_upscaling.norm"),
    *_linear(rf"mask_decoder\.output_hypernetworks_mlps\.{_N}\.layers\.{_N}",
             "mask_decoder.output_hypernetworks_mlps.{1}.layers.{2}"),
    *_linear(rf"mask_decoder\.iou_prediction_head\.layers\.{_N}", "mask_decoder.iou_prediction_head.layers.{1}"),
]


def _conv_bn(src: str, dst: str) -> list[Row]:
  """TinyViT's Conv2d_BN: a bias-free conv (`c`) and a BatchNorm (`bn`) whose step counter the forward never reads."""
  return [(src + r"\.c\.weight", dst + ".kernel", "conv"), (src + r"\.bn\.weight", dst + ".bn_scale", "same"),
          (src + r"\.bn\.bias", dst + ".bn_bias", "same"), (src + r"\.bn\.running_mean", dst + ".bn_mean", "same"),
          (src + r"\.bn\.running_var", dst + ".bn_var", "same"), (src + r"\.bn\.num_batches_tracked", None, "drop")]


_BLOCK = rf"image_encoder\.layers\.{_N}\.blocks\.{_N}"
# The prompt encoder and mask decoder: SAM's, in every family's checkpoint.
_DECODER = [row for row in META if not row[0].startswith("image_encoder")]

# MobileSAM's and LiteMedSAM's TinyViT (image_encoder.layers.*), then SAM's prompt encoder and mask decoder. The
# fused qkv's columns are reordered from per-head [q k v] to [all q | all k | all v] after this table
# (`tiny_vit_qkv_order`); TinyViT's ImageNet classifier (norm_head, head), in MobileSAM's file, is not used by SAM.
TINY_VIT: list[Row] = [
    *_conv_bn(r"image_encoder\.patch_embed\.seq\.0", "image_encoder.patch_embed.conv1"),
    *_conv_bn(r"image_encoder\.patch_embed\.seq\.2", "image_encoder.patch_embed.conv2"),
    *_conv_bn(rf"{_BLOCK}\.(conv[123]|local_conv)", "image_encoder.layers.{1}.blocks.{2}.{3}"),
    *_conv_bn(rf"image_encoder\.layers\.{_N}\.downsample\.(conv[123])", "image_encoder.layers.{1}.downsample.{2}"),
    (rf"{_BLOCK}\.attn\.attention_biases", "image_encoder.layers.{1}.blocks.{2}.attn.attention_biases", "same"),
    *_norm(rf"{_BLOCK}\.(attn|mlp)\.norm", "image_encoder.layers.{1}.blocks.{2}.{3}.norm"),
    *_linear(rf"{_BLOCK}\.attn\.(qkv|proj)", "image_encoder.layers.{1}.blocks.{2}.attn.{3}"),
    *_linear(rf"{_BLOCK}\.mlp\.fc1", "image_encoder.layers.{1}.blocks.{2}.mlp.lin1"),
    *_linear(rf"{_BLOCK}\.mlp\.fc2", "image_encoder.layers.{1}.blocks.{2}.mlp.lin2"),
    (r"image_encoder\.neck\.0\.weight", "image_encoder.neck.conv1.kernel", "conv"),
    *_norm(r"image_encoder\.neck\.1", "image_encoder.neck.norm1"),
    (r"image_encoder\.neck\.2\.weight", "image_encoder.neck.conv2.kernel", "conv"),
    *_norm(r"image_encoder\.neck\.3", "image_encoder.neck.norm2"),
    (r"image_encoder\.(norm_head|head)\.(weight|bias)", None, "drop"),
    *_DECODER,
]

_TRUNK = rf"image_encoder\.trunk\.blocks\.{_N}"


def _sam2_decoder() -> list[Row]:
  """SAM's prompt encoder and mask decoder rows with SAM 2's names: `sam_` prefixes, the transformer's MLP as
  layers.0 / layers.1."""
  rows = []
  for pattern, dst, layout in _DECODER:
    pattern = pattern.replace(r"prompt_encoder\.", r"sam_prompt_encoder\.", 1).replace(
        r"mask_decoder\.", r"sam_mask_decoder\.", 1)
    if r"mlp\.(lin1|lin2)" in pattern:
      for k in (0, 1):
        rows.append((pattern.replace(r"mlp\.(lin1|lin2)", rf"mlp\.layers\.{k}"),
                     dst.replace("mlp.{2}", f"mlp.lin{k + 1}"), layout))
    else:
      rows.append((pattern, dst, layout))
  return rows


# The parts of a SAM 2 checkpoint the image predictor never runs: video memory (memory attention and encoder, object
# pointers, temporal encodings) and the object-score head. Consumed and listed in conversion.json, not written.
SAM2_LEFT_OUT = (r"(memory_attention|memory_encoder|obj_ptr_proj|obj_ptr_tpos_proj|mask_downsample)\..+",
                 r"maskmem_tpos_enc", r"no_mem_pos_enc", r"no_obj_ptr", r"no_obj_embed_spatial",
                 r"sam_mask_decoder\.pred_obj_score_head\..+")

# Meta's SAM 2 / SAM 2.1 (and MedSAM2) checkpoints: the Hiera trunk, the FPN neck, the mask decoder's
# high-resolution projections and `no_mem_embed` make the image encoder (`models/encoders/hiera.py`); then SAM's
# prompt encoder and SAM 2's mask decoder.
SAM2: list[Row] = [
    *_conv(r"image_encoder\.trunk\.patch_embed\.proj", "image_encoder.patch_embed"),
    (r"image_encoder\.trunk\.(pos_embed|pos_embed_window)", "image_encoder.{1}", "nchw"),
    *_norm(rf"{_TRUNK}\.(norm1|norm2)", "image_encoder.blocks.{1}.{2}"),
    *_linear(rf"{_TRUNK}\.attn\.(qkv|proj)", "image_encoder.blocks.{1}.attn.{2}"),
    *_linear(rf"{_TRUNK}\.mlp\.layers\.0", "image_encoder.blocks.{1}.mlp.lin1"),
    *_linear(rf"{_TRUNK}\.mlp\.layers\.1", "image_encoder.blocks.{1}.mlp.lin2"),
    *_linear(rf"{_TRUNK}\.proj", "image_encoder.blocks.{1}.proj"),
    *_conv(rf"image_encoder\.neck\.convs\.{_N}\.conv", "image_encoder.neck.{1}", "conv1x1"),
    *_conv(r"sam_mask_decoder\.(conv_s0|conv_s1)", "image_encoder.{1}", "conv1x1"),
    (r"no_mem_embed", "image_encoder.no_mem_embed", "flat"),
    *_embed(r"sam_mask_decoder\.obj_score_token", "mask_decoder.obj_score_token"),
    *[(pattern, None, "drop") for pattern in SAM2_LEFT_OUT],
    *_sam2_decoder(),
]

TABLES = {"meta": META, "huggingface": HUGGING_FACE, "tiny_vit": TINY_VIT, "sam2": SAM2}


def tiny_vit_qkv_order(params: dict[tuple[str, ...], np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
  """TinyViT's fused qkv (columns per head: q, k, v) -> columns [q of every head | k | v], as `tiny_vit.Attention`
  and LoRA's q/k/v targets read them. The heads of a block are its attention-bias table's rows."""
  out = dict(params)
  for path, value in params.items():
    if path[-3:-1] != ("attn", "qkv"):
      continue
    heads = params[(*path[:-2], "attention_biases")].shape[0]
    *lead, width = value.shape
    out[path] = np.ascontiguousarray(
        value.reshape(*lead, heads, 3, width // (3 * heads)).swapaxes(-3, -2).reshape(value.shape))
  return out


def hf_mlp_layer_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Hugging Face MLPs: proj_in -> layers.0, layers.k -> layers.{k+1}, proj_out -> layers.{last}."""
  import re

  pattern = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\."
                       r"(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$")
  hidden = {}
  for key in state:
    match = pattern.match(key)
    if match and match.group(3) is not None:
      hidden[match.group(1)] = max(hidden.get(match.group(1), -1), int(match.group(3)))
  renamed = {}
  for key, value in state.items():
    match = pattern.match(key)
    if not match:
      renamed[key] = value
      continue
    prefix, part, index, leaf = match.groups()
    if part == "proj_in":
      layer = 0
    elif part == "proj_out":
      layer = hidden.get(prefix, -1) + 2
    else:
      layer = int(index) + 1
    renamed[f"{prefix}.layers.{layer}.{leaf}"] = value
  return renamed
