"""Parity with Hugging Face transformers' SamModel: random weights saved as transformers saves them, converted by
our tool.

How transformers' prompts map onto ours (read off transformers' models/sam/modeling_sam.py):
  input_points (images, prompt sets, points, 2) and input_labels (images, prompt sets, points) are our
  point_coords[None] and point_labels[None]: the same (x, y) pixel frame of the resized input, labels 1 / 0 / -1.
  Its extra label -10 (a padding point whose embedding is zeroed but still attended to) has no counterpart in Meta's
  or our model, so it is not used here.
  input_boxes (images, prompt sets, 4) is boxes[None]; pred_masks (images, sets, M, 4h, 4w) and iou_scores
  (images, sets, M) are our low-resolution logits (sets, 4h, 4w, M) and IoU predictions (sets, M).
  input_masks (images, 1, 4h, 4w) is one mask per image, shared by all its prompt sets; Meta and we take one per
  prompt set, so mask inputs are compared with a single prompt set.

transformers' two-way transformer LayerNorms use eps 1e-6 (config layer_norm_eps; its final one keeps 1e-5), Meta's
and ours 1e-5. Within these tolerances that is invisible: about 4e-5 on low-resolution logits, against 7e-6 when
transformers is given 1e-5.
"""

import json

import numpy as np
import pytest
import torch

from autosam_jax import load_sam
from tests.conftest import TINY_CONFIGS
from weights_conversion import convert
from weights_conversion.convert import ConversionError, convert_state, read_checkpoint
from weights_conversion.meta_reference import randomize_weights
from weights_conversion.parity import TOLERANCES, assert_parity, jax_outputs, max_abs_differences, random_prompts

transformers = pytest.importorskip("transformers")

# The architecture of TINY_CONFIGS[META_EQUIVALENT], in transformers' terms.
META_EQUIVALENT = "dim64-win5-pad"
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=128, window_size=5,
              global_attn_indexes=[1], mlp_dim=256)
PROMPT_ENCODER = dict(image_size=128, image_embedding_size=8)
TIED = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")


def build_hf_sam(seed: int = 0):
  """transformers' SamModel with every tensor random, as `build_meta_sam` does for Meta's model.

  transformers zero-initialises rel_pos and pos_embed and draws the Fourier matrix with std hidden_size / 2; all are
  redrawn so the comparison sees them, and the Fourier matrix gets Meta's unit scale (a std of 32 would make the
  prompt encodings pure noise). Weights are scaled by fan-in: unscaled random weights make the decoder so
  ill-conditioned that float32 rounding alone moves low-resolution logits by about 1e-3.
  """
  from transformers import SamConfig as HFSamConfig
  from transformers import SamModel

  torch.manual_seed(seed)
  config = HFSamConfig(vision_config=VISION, prompt_encoder_config=PROMPT_ENCODER)
  model = SamModel(config).eval()
  randomize_weights(model, seed)
  assert model.shared_image_embedding.positional_embedding is model.prompt_encoder.shared_embedding.positional_embedding
  return model


@pytest.fixture(scope="module")
def hf_sam(tmp_path_factory):
  """The model, saved twice: save_pretrained (a directory with config.json) and a bare .safetensors file."""
  from safetensors.torch import save_file

  model = build_hf_sam()
  root = tmp_path_factory.mktemp("hf-sam")
  model.save_pretrained(root / "pretrained")
  # Clones, so safetensors stores both tied copies (save_pretrained keeps one); no config.json beside it.
  (root / "bare").mkdir()
  save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
            str(root / "bare" / "sam.safetensors"))
  return model, {"directory": root / "pretrained", "file": root / "bare" / "sam.safetensors"}


@pytest.fixture(scope="module")
def converted(hf_sam, tmp_path_factory):
  _, sources = hf_sam
  result = {}
  for kind, source in sources.items():
    out_dir, config = convert(source, tmp_path_factory.mktemp(f"hf-{kind}-flax") / "converted")
    result[kind] = (load_sam(out_dir), config, json.loads((out_dir / "conversion.json").read_text()))
  return result


def test_save_pretrained_keeps_one_tied_copy(hf_sam, converted):
  _, sources = hf_sam
  stored = set(read_checkpoint(sources["directory"])[0])
  # Whichever of the two names transformers keeps, the converter must accept it alone.
  assert len(stored & set(TIED)) == 1
  assert converted["file"][2]["num_tensors"] == converted["directory"][2]["num_tensors"] + 1
  assert all(info["source_format"] == "huggingface" for _, _, info in converted.values())


def test_config_matches_meta_equivalent(converted, meta_checkpoints):
  """The architecture read off an HF checkpoint is the one read off a Meta checkpoint of the same model."""
  _, meta_path = meta_checkpoints(META_EQUIVALENT, TINY_CONFIGS[META_EQUIVALENT])
  meta_config, _, fmt = convert_state(read_checkpoint(meta_path)[0], meta_path)
  assert fmt == "meta"
  for kind, (_, hf_config, _) in converted.items():
    assert hf_config.image_size == 128 and hf_config.encoder_embed_dim == 64 and hf_config.encoder_depth == 2
    assert hf_config.encoder_num_heads == 4 and hf_config.window_size == 5
    assert hf_config.encoder_global_attn_indexes == (1,)
    assert hf_config == meta_config, kind


def test_both_saves_give_the_same_parameters(converted):
  from flax import nnx

  flat = {kind: dict(nnx.to_flat_state(nnx.state(sam))) for kind, (sam, _, _) in converted.items()}
  assert flat["directory"].keys() == flat["file"].keys()
  for path, variable in flat["directory"].items():
    np.testing.assert_array_equal(np.asarray(variable[...]), np.asarray(flat["file"][path][...]), err_msg=str(path))


def hf_outputs(model, pixel_values: np.ndarray, prompts) -> dict:
  """transformers' pipeline from normalised, padded pixels (1, S, S, 3): vision encoder, prompt encoder, decoder."""
  num_sets = next(len(a) for a in (prompts.point_coords, prompts.boxes, prompts.mask_inputs) if a is not None)
  kwargs = {}
  if prompts.point_coords is not None:
    kwargs["input_points"] = torch.from_numpy(prompts.point_coords)[None]
    kwargs["input_labels"] = torch.from_numpy(prompts.point_labels).long()[None]
  if prompts.boxes is not None:
    kwargs["input_boxes"] = torch.from_numpy(prompts.boxes)[None]
  if prompts.mask_inputs is not None:
    assert num_sets == 1, "transformers takes one mask per image"
    kwargs["input_masks"] = torch.from_numpy(prompts.mask_inputs)[:, None]
  with torch.no_grad():
    embeddings = model.get_image_embeddings(torch.from_numpy(np.ascontiguousarray(pixel_values.transpose(0, 3, 1, 2))))
    sparse, dense = model.get_prompt_embeddings(**kwargs)
    out = model(image_embeddings=embeddings, multimask_output=prompts.multimask_output, **kwargs)
  # The no-mask dense embedding is a view of a Parameter, which keeps requires_grad even under no_grad.
  nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  return {"image_embeddings": nhwc(embeddings), "sparse_embeddings": sparse[0].detach().numpy(),
          "dense_embeddings": np.broadcast_to(nhwc(dense), (num_sets, *nhwc(dense).shape[1:])),
          "low_res_logits": out.pred_masks[0].numpy().transpose(0, 2, 3, 1),
          "iou_predictions": out.iou_scores[0].numpy()}


# (points per set, boxes, mask input, number of prompt sets)
SCENARIOS = {
    "points": (3, False, False, 3),
    "boxes": (0, True, False, 2),
    "points-boxes": (2, True, False, 2),
    "points-mask": (2, False, True, 1),
}


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_outputs_match_transformers(hf_sam, converted, scenario, multimask, rng):
  model, _ = hf_sam
  sam = converted["directory"][0]
  num_points, boxes, mask, num_sets = SCENARIOS[scenario]
  input_size = (128, 96)  # padded on the right, as a portrait image is
  image = rng.uniform(0, 255, (*input_size, 3)).astype(np.float32)
  prompts = random_prompts(rng, input_size, num_sets, num_points, boxes, 32 if mask else None, multimask)
  if num_points:
    prompts.point_labels[0, -1] = -1  # Meta's "not a point", which transformers keeps
  ours = jax_outputs(sam, image, input_size, prompts)
  pixel_values = np.asarray(sam.preprocess(image[None]))
  assert_parity(hf_outputs(model, pixel_values, prompts), ours)


def test_image_embeddings_of_file_conversion(hf_sam, converted, rng):
  from flax import nnx

  model, _ = hf_sam
  sam = converted["file"][0]
  pixel_values = np.asarray(sam.preprocess(rng.uniform(0, 255, (1, 96, 128, 3)).astype(np.float32)))
  with torch.no_grad():
    reference = model.get_image_embeddings(torch.from_numpy(np.ascontiguousarray(pixel_values.transpose(0, 3, 1, 2))))
  ours = nnx.jit(lambda encoder, x: encoder(x))(sam.image_encoder, pixel_values)
  diff = max_abs_differences({"image_embeddings": reference.numpy().transpose(0, 2, 3, 1)},
                             {"image_embeddings": ours})
  assert diff["image_embeddings"] <= TOLERANCES["image_embeddings"], diff


def test_tied_copies_must_agree(hf_sam):
  _, sources = hf_sam
  state, _ = read_checkpoint(sources["file"])
  only_prompt_copy = {k: v for k, v in state.items() if k != TIED[0]}
  config, params, _ = convert_state(only_prompt_copy, sources["file"])
  np.testing.assert_array_equal(params[("prompt_encoder", "pe_layer", "positional_encoding_gaussian_matrix")],
                                state[TIED[1]])
  state[TIED[1]] = state[TIED[1]] + 1
  with pytest.raises(ConversionError, match="same tied tensor"):
    convert_state(state, sources["file"])


def test_config_json_supplies_what_shapes_hide(hf_sam):
  _, sources = hf_sam
  state, hf_config = read_checkpoint(sources["directory"])
  assert hf_config["mask_decoder_config"]["num_attention_heads"] == 8
  hf_config["mask_decoder_config"]["num_attention_heads"] = 4
  assert convert_state(state, sources["directory"], hf_config=hf_config)[0].decoder_num_heads == 4
  # Without relative position tables the encoder's heads, window and global blocks come only from config.json.
  no_rel_pos = {k: v for k, v in state.items() if ".rel_pos_" not in k}
  config = convert_state(no_rel_pos, sources["directory"], hf_config=hf_config)[0]
  assert (config.use_rel_pos, config.encoder_num_heads, config.window_size,
          config.encoder_global_attn_indexes) == (False, 4, 5, (1,))
  # Where the shapes do tell, a config.json that disagrees is an error, not a silent choice.
  hf_config["vision_config"]["num_attention_heads"] = 2
  with pytest.raises(ConversionError, match="rel_pos"):
    convert_state(state, sources["directory"], hf_config=hf_config)


def test_safetensors_read_whatever_the_header_length(hf_sam, tmp_path):
  """bfloat16 tensors (numpy has no such dtype), and a header length whose first byte is 0x80, a pickle's magic."""
  from safetensors.torch import save_file

  model, _ = hf_sam
  tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != TIED[1]}
  path = tmp_path / "sam.safetensors"
  for pad in range(0, 512, 8):
    save_file(tensors, str(path), metadata={"pad": "x" * pad})
    if path.read_bytes()[0] == 0x80:
      break
  else:
    pytest.fail("no metadata length gave a header length ending in 0x80")
  state, _ = read_checkpoint(path)
  np.testing.assert_array_equal(state["vision_encoder.pos_embed"], tensors["vision_encoder.pos_embed"].float().numpy())
