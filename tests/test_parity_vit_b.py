"""Full-size vit_b at 1024x1024: Meta's architecture exactly, random weights, converted with --model-type vit_b."""

import numpy as np
import pytest

from autosam_jax import PRESETS, load_sam
from weights_conversion import convert
from weights_conversion.parity import TOLERANCES, jax_outputs, max_abs_differences, meta_outputs, random_prompts
from tests.conftest import optimized


@pytest.mark.slow  # in the suite; `-m "not slow"` leaves it out of a quick run
def test_vit_b_full_size_matches_meta(meta_checkpoints, tmp_path):
  config = PRESETS["vit_b"]
  torch_sam, checkpoint = meta_checkpoints("vit_b", config)
  assert sum(p.numel() for p in torch_sam.image_encoder.parameters()) == 89_670_912  # Meta's vit_b encoder
  out_dir, inferred = convert(checkpoint, tmp_path / "vit_b", model_type="vit_b")
  assert inferred == config
  sam = load_sam(out_dir)

  rng = np.random.default_rng(0)
  image = rng.uniform(0, 255, (1024, 768, 3)).astype(np.float32)  # a 4:3 image resized to longest side 1024
  prompts = random_prompts(rng, (1024, 768), 2, 2, True, None, True)
  reference = meta_outputs(torch_sam, image, (1200, 900), prompts)
  # the encoder compiled at XLA's default level: the suite's level 0 runs full-size vit_b several times slower
  encode = lambda sam, images: optimized(lambda sam, x: sam.encode(x), sam, images)
  ours = jax_outputs(sam, image, (1200, 900), prompts, encode=encode)
  diffs = max_abs_differences(reference, ours)
  assert reference["image_embeddings"].shape == (1, 64, 64, 256)
  assert np.std(reference["image_embeddings"]) > 0.1 and np.std(reference["low_res_logits"]) > 0.01
  assert all(diffs[k] <= TOLERANCES[k] for k in diffs), diffs
