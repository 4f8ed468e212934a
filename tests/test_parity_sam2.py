"""SAM 2 (Hiera + FPN, SAM 2's mask decoder) against Meta's `sam2` package on random weights.

Every tensor of Meta's model is drawn at random and non-zero (`sam2_reference.build_sam2_model`), saved as Meta's
`{"model": ...}` checkpoints are, converted by `weights_conversion`, and loaded by `load_sam`. The encoder's named maps
are compared with what Meta's image predictor hands its decoder (`SAM2ImagePredictor.set_image`'s features), the
masks with its `predict` for point and box prompts.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sam2")

from tests.conftest import optimized  # noqa: E402
from weights_conversion import sam2_reference  # noqa: E402

convert_module = importlib.import_module("weights_conversion.convert")


def _relative(ours, reference) -> float:
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def _converted(tmp_path, release: str, image_size: int):
  """Meta's model, saved, converted and loaded as a user does."""
  from autosam_jax.models.loading import load_sam

  model = sam2_reference.build_sam2_model(release, image_size, seed=1)
  checkpoint = sam2_reference.save_meta_checkpoint(model, tmp_path / f"sam2.1_hiera_{release}.pt")
  out, config = convert_module.convert(checkpoint, tmp_path / f"{release}-converted", image_size=image_size)
  return model, load_sam(out), config, out


def _converted_in_memory(release: str, image_size: int):
  """Meta's model through the converter's tables and shape inference, without the files (the larger releases)."""
  from flax import nnx

  from autosam_jax.models.sam import Sam

  model = sam2_reference.build_sam2_model(release, image_size, seed=1)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  config, params, _ = convert_module.convert_state(state, f"sam2.1_hiera_{release}.pt", image_size=image_size)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Sam(config, rngs=nnx.Rngs(0))))
  flat = {path: v.replace(params[tuple(str(p) for p in path)]) for path, v in abstract.flat_state()}
  return model, nnx.merge(graphdef, nnx.State.from_flat_path(flat)), config


def _reference_features(model, images: np.ndarray) -> dict:
  """What `SAM2ImagePredictor.set_image` stores for the decoder, for a batch of preprocessed inputs."""
  with torch.no_grad():
    backbone = model.forward_image(torch.from_numpy(images).permute(0, 3, 1, 2))
    _, feats, _, _ = model._prepare_backbone_features(backbone)
    feats[-1] = feats[-1] + model.no_mem_embed
  size = images.shape[1] // 4
  maps = [f.permute(1, 2, 0).reshape(len(images), -1, size // 2 ** k, size // 2 ** k).permute(0, 2, 3, 1).numpy()
          for k, f in enumerate(feats)]
  return {"embedding": maps[2], "high_res": maps[:2]}


@pytest.fixture(scope="module")
def tiny_1024(tmp_path_factory):
  """hiera tiny at SAM 2's 1024 px, converted from a saved checkpoint (shared by the encoder and predictor tests)."""
  return _converted(tmp_path_factory.mktemp("sam2-tiny"), "tiny", 1024)


@pytest.mark.parametrize("release,image_size", [("tiny", 1024), ("small", 64), ("base_plus", 64), ("large", 64)])
def test_encoder_features_match_meta(request, release, image_size):
  """Every release's trunk (widths, stages, windows, global blocks, position grids) at a size a CPU runs (64 px
  still crosses every stage, the later windows overhanging their grids): the embedding (with no_mem_embed) and both
  high-resolution maps (after conv_s0 / conv_s1)."""
  import jax.numpy as jnp

  if image_size == 1024:
    model, sam, config, _ = request.getfixturevalue("tiny_1024")
  else:
    model, sam, config = _converted_in_memory(release, image_size)
  assert config.hiera.stages == {"tiny": (1, 2, 7, 2), "small": (1, 2, 11, 2), "base_plus": (2, 3, 16, 3),
                                 "large": (2, 6, 36, 4)}[release]
  assert config.hiera.num_heads == (1 if release in ("tiny", "small") else 2)
  images = np.random.default_rng(0).standard_normal((1, image_size, image_size, 3)).astype(np.float32)
  ours = optimized(lambda sam, x: sam.image_encoder(x), sam, jnp.asarray(images))
  reference = _reference_features(model, images)
  grid = image_size // 16
  assert ours["embedding"].shape == (1, grid, grid, 256)
  assert [m.shape for m in ours["high_res"]] == [(1, 4 * grid, 4 * grid, 32), (1, 2 * grid, 2 * grid, 64)]
  assert _relative(ours["embedding"], reference["embedding"]) <= 1e-4
  for ours_map, reference_map in zip(ours["high_res"], reference["high_res"]):
    assert _relative(ours_map, reference_map) <= 1e-4


def test_image_predictor_matches_meta(tiny_1024):
  """An image of another aspect through SAM 2's preprocessing (square resize, ImageNet mean/std), then masks and
  IoU scores for points, a box, and a box with a point, multimask and single-mask (SAM 2's stability fallback)."""
  import jax.numpy as jnp

  from autosam_jax.models.sam import resize_longest_side, scale_boxes, scale_coords

  size = 1024
  model, sam, config, out = tiny_1024
  assert config.resize == "square" and config.use_high_res_features and config.pred_obj_scores
  conversion = (out / "conversion.json").read_text()
  assert "memory_attention" in conversion and "pred_obj_score_head" in conversion  # listed, not silently dropped
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (150, 200, 3)).astype(np.uint8)
  predictor = sam2_reference.predictor(model)
  predictor.set_image(image)

  resized = resize_longest_side(jnp.asarray(image, jnp.float32), size, square=True)
  features = optimized(lambda sam, x: sam.image_encoder(sam.preprocess(x)), sam, resized[None])
  assert _relative(features["embedding"], predictor._features["image_embed"].permute(0, 2, 3, 1).numpy()) <= 1e-4

  prompts = [dict(point_coords=np.array([[60.0, 40.0], [120.0, 90.0]]), point_labels=np.array([1, 0])),
             dict(box=np.array([30.0, 20.0, 150.0, 120.0])),
             dict(box=np.array([30.0, 20.0, 150.0, 120.0]), point_coords=np.array([[80.0, 70.0]]),
                  point_labels=np.array([1]))]
  for prompt in prompts:
    for multimask in (True, False):
      masks, iou, low_res = predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
      coords = None if "point_coords" not in prompt else scale_coords(prompt["point_coords"][None], (150, 200), size,
                                                                      square=True)
      labels = None if "point_labels" not in prompt else jnp.asarray(prompt["point_labels"][None], jnp.int32)
      boxes = None if "box" not in prompt else scale_boxes(prompt["box"][None], (150, 200), size, square=True)
      ours = sam.predict(features, (size, size), (150, 200), point_coords=coords, point_labels=labels, boxes=boxes,
                         multimask_output=multimask)
      assert _relative(ours["low_res_logits"][0].transpose(2, 0, 1), low_res) <= 1e-3
      assert _relative(ours["mask_logits"][0].transpose(2, 0, 1), masks) <= 1e-3
      np.testing.assert_allclose(np.asarray(ours["iou_predictions"][0]), iou, atol=1e-4)


def test_unknown_trunk_needs_its_heads_and_windows(tmp_path):
  """A trunk of no release is refused naming what shapes cannot tell; given them (--hiera), it converts."""
  from autosam_jax.errors import ConversionError

  model = sam2_reference.build_sam2_model("tiny", 128, overrides=(
      "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]"))
  checkpoint = sam2_reference.save_meta_checkpoint(model, tmp_path / "custom.pt")
  with pytest.raises(ConversionError, match=r"none of SAM 2's releases.*num_heads, window_spec, global_att_blocks"):
    convert_module.convert(checkpoint, tmp_path / "refused", image_size=128)
  assert not (tmp_path / "refused").exists()
  _, config = convert_module.convert(checkpoint, tmp_path / "given", image_size=128, hiera={
      "num_heads": 1, "window_spec": [8, 4, 14, 7], "global_att_blocks": [3]})
  assert config.hiera.stages == (1, 1, 2, 1) and config.hiera.global_att_blocks == (3,)
