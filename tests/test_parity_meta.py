"""Parity with Meta's segment-anything: random weights saved as Meta saves them, converted by our tool."""

import numpy as np
import pytest

from autosam_jax import load_sam
from tests.conftest import TINY_CONFIGS
from weights_conversion import convert
from weights_conversion.parity import assert_parity, jax_outputs, meta_outputs, random_prompts


@pytest.fixture(scope="module")
def converted(meta_checkpoints, tmp_path_factory):
  cache = {}

  def get(name):
    if name not in cache:
      config = TINY_CONFIGS[name]
      torch_sam, path = meta_checkpoints(name, config)
      out_dir, inferred = convert(path, tmp_path_factory.mktemp(name + "-flax") / "converted",
                                  decoder_num_heads=config.decoder_num_heads)
      cache[name] = (torch_sam, load_sam(out_dir), inferred)
    return cache[name]

  return get


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_config_inferred_from_shapes(converted, name):
  _, _, inferred = converted(name)
  assert inferred == TINY_CONFIGS[name]


# (points per set, boxes, mask input, multimask, number of prompt sets, resized input (h, w), original (H, W))
SCENARIOS = {
    "points-multimask": (3, False, False, True, 2, (1.0, 0.75), (300, 225)),
    "box-single": (0, True, False, False, 3, (0.75, 1.0), (90, 120)),
    "points-box-mask": (2, True, True, True, 1, (1.0, 1.0), (77, 77)),
    "mask-only-single": (0, False, True, False, 2, (1.0, 0.5), (400, 200)),
    "no-prompt": (0, False, False, True, 1, (1.0, 1.0), (128, 128)),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("name", ["dim64-win5-pad", "dim48-win4-nopad-smalldecoder"])
def test_outputs_match_meta(converted, name, scenario, rng):
  torch_sam, sam, _ = converted(name)
  num_points, boxes, mask, multimask, num_sets, (fh, fw), original = SCENARIOS[scenario]
  size = TINY_CONFIGS[name].image_size
  input_size = (int(size * fh), int(size * fw))
  image = rng.uniform(0, 255, (*input_size, 3)).astype(np.float32)
  mask_size = 4 * TINY_CONFIGS[name].image_embedding_size if mask else None
  prompts = random_prompts(rng, input_size, num_sets, num_points, boxes, mask_size, multimask)
  if scenario == "no-prompt":
    prompts.point_coords = None
  reference = meta_outputs(torch_sam, image, original, prompts)
  assert_parity(reference, jax_outputs(sam, image, original, prompts))


@pytest.mark.parametrize("name", ["dim96-win7-2global", "dim32-1head-allwindowed"])
def test_image_embeddings_match_meta(converted, name, rng):
  torch_sam, sam, _ = converted(name)
  size = TINY_CONFIGS[name].image_size
  image = rng.uniform(0, 255, (size, size - 32, 3)).astype(np.float32)
  prompts = random_prompts(rng, image.shape[:2], 2, 2, True, None, True)
  reference = meta_outputs(torch_sam, image, (size, size - 32), prompts)
  assert_parity(reference, jax_outputs(sam, image, (size, size - 32), prompts))


def test_end_to_end_forward_matches_meta(converted, rng):
  """Meta's Sam.forward (batched records, images already resized) against our Sam.__call__."""
  import torch

  torch_sam, sam, _ = converted("dim64-win5-pad")
  records = []
  for h, w, original in [(128, 96, (512, 384)), (80, 128, (50, 80))]:
    prompts = random_prompts(rng, (h, w), 2, 2, True, None, True)
    records.append({"image": rng.uniform(0, 255, (h, w, 3)).astype(np.float32), "original_size": original,
                    "point_coords": prompts.point_coords, "point_labels": prompts.point_labels,
                    "boxes": prompts.boxes})
  torch_records = [{"image": torch.from_numpy(r["image"].transpose(2, 0, 1).copy()), "original_size": r["original_size"],
                    "point_coords": torch.from_numpy(r["point_coords"]),
                    "point_labels": torch.from_numpy(r["point_labels"]), "boxes": torch.from_numpy(r["boxes"])}
                   for r in records]
  with torch.no_grad():
    reference = torch_sam(torch_records, multimask_output=True)
  ours = sam(records, multimask_output=True)
  for ref, mine in zip(reference, ours):
    np.testing.assert_allclose(np.asarray(mine["low_res_logits"]), ref["low_res_logits"].numpy().transpose(0, 2, 3, 1),
                               atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(mine["iou_predictions"]), ref["iou_predictions"].numpy(), atol=1e-3, rtol=0)
    ref_masks = ref["masks"].numpy().transpose(0, 2, 3, 1)
    assert mine["masks"].shape == ref_masks.shape
    # Thresholded masks may only differ where the logit sits within round-off of zero.
    disagree = np.asarray(mine["masks"]) != ref_masks
    assert np.all(np.abs(np.asarray(mine["mask_logits"])[disagree]) < 1e-3)
    assert 0.05 < ref_masks.mean() < 0.95


def test_bf16_encoder_close_to_fp32(tiny_weights, rng):
  import jax.numpy as jnp

  # TINY_CONFIGS["dim64-win5-pad"] as Meta saves it, converted once per session (tests/conftest.py)
  sam32, sam16 = load_sam(tiny_weights), load_sam(tiny_weights, encoder_dtype=jnp.bfloat16)
  assert sam16.image_encoder.blocks[0].attn.qkv.kernel[...].dtype == jnp.float32  # params stay fp32
  x = sam32.preprocess(jnp.asarray(rng.uniform(0, 255, (2, 128, 128, 3)), jnp.float32))
  full, half = np.asarray(sam32.image_encoder(x)), np.asarray(sam16.image_encoder(x))
  assert half.dtype == np.float32
  relative = np.linalg.norm(half - full) / np.linalg.norm(full)
  assert 0 < relative < 2e-2, relative


@pytest.mark.parametrize("size, window", [(64, 5), (80, 14), (96, 4)],
                         ids=["one-window-larger-than-the-grid", "window-larger-than-a-5x5-grid", "6x6-grid-of-4s"])
def test_windowed_attention_on_ragged_windows_matches_meta(size, window, rng):
  """Windows that overhang the grid: our windowed blocks attend only their real tokens' queries and project only
  real tokens (the tiny configs above cover windows that divide the grid, and grids of several windows per axis
  that overhang it); Meta pads, and attends with every token."""
  import jax.numpy as jnp
  import torch

  from autosam_jax import SamConfig
  from weights_conversion.meta_reference import build_meta_sam
  from weights_conversion.parity import sam_from_torch

  config = SamConfig(image_size=size, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, encoder_mlp_dim=64,
                     encoder_global_attn_indexes=(1,), window_size=window)
  torch_sam = build_meta_sam(config, seed=1)
  images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    reference = torch_sam.image_encoder(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(sam_from_torch(torch_sam).image_encoder(jnp.asarray(images)))
  assert np.std(reference) > 0.1
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
