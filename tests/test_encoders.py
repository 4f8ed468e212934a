"""Every stage with a second encoder family: a tiny TinyViT (random weights, MedSAM's min-max inputs) through
precompute, a head's training, evaluate and predict, a LoRA run on its input cache; and the refusals of a cache or a
model used with another encoder's weights, naming both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autosam_jax.train.loop import TrainConfig, train


def _tiny_tiny_vit():
  from autosam_jax.models.config import SamConfig
  from autosam_jax.models.encoders.tiny_vit import TinyVitConfig

  # 128 px -> 16 x 16 embedding grid (every merge halves: no width keeps the resolution), 4 stages of one block.
  return SamConfig(encoder_family="tiny_vit", image_size=128, normalization="min_max", prompt_embed_dim=64,
                   decoder_mlp_dim=128, tiny_vit=TinyVitConfig(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                                               num_heads=(1, 2, 2, 2), window_sizes=(1, 4, 4, 4)))


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
  from types import SimpleNamespace

  from autosam_jax.data.splits import Split
  from autosam_jax.experiment.demo import write_random_sam
  from autosam_jax.features.precompute import PrecomputeOptions, precompute

  root = tmp_path_factory.mktemp("encoders")
  weights = write_random_sam(root / "tiny-vit", seed=3, config=_tiny_tiny_vit())
  for store in ("embeddings", "inputs"):
    precompute(tiny_world.acdc, weights, root / store, tfds_dir=tiny_world.tfds, progress=False,
               options=PrecomputeOptions(mode="improved", views=0, dtype="float32", shard_size=64, store=store))
  return SimpleNamespace(root=root, weights=weights, cache=root / "embeddings", inputs=root / "inputs",
                         split=Split.from_json(tiny_world.split), tiny=tiny_world)


def _factory(weights):
  def make(config):
    from flax import nnx

    from autosam_jax import load_sam
    from autosam_jax.train.loop import build_model
    return build_model(config, load_sam(weights), rngs=nnx.Rngs(config.seed))
  return make


def test_the_cache_holds_the_tiny_vit_embeddings_of_min_max_inputs(world):
  """Precompute ran the TinyViT on MedSAM-normalised inputs: each image scaled to [0, 1] by its own extremes, then
  zero-padded (checked here against the formula, on the slice the cache was given)."""
  import jax.numpy as jnp

  from autosam_jax import load_sam
  from autosam_jax.features.cache import FeatureCache

  manifest = json.loads((world.cache / "manifest.json").read_text())["depends_on"]
  assert manifest["sam_config"]["encoder_family"] == "tiny_vit"
  assert manifest["preprocess"]["normalization"] == "min_max" and manifest["preprocess"]["head_size"] == 64
  inputs, embeddings = FeatureCache(world.inputs), FeatureCache(world.cache)
  index = inputs.indices(["patient002"])[3]
  x = np.asarray(inputs[index]["embedding"], np.float32)
  assert x.shape == (128, 128, 3)
  rows = np.flatnonzero(x.any(axis=(1, 2)))  # the image's extent; zero padding after it
  cols = np.flatnonzero(x.any(axis=(0, 2)))
  image = x[:rows[-1] + 1, :cols[-1] + 1]
  assert image.min() == pytest.approx(0.0, abs=1e-6) and image.max() == pytest.approx(1.0, abs=1e-6)
  assert not x[rows[-1] + 1:].any() and not x[:, cols[-1] + 1:].any()
  encoded = np.asarray(load_sam(world.weights).encode(jnp.asarray(x[None])))[0]
  np.testing.assert_allclose(np.asarray(embeddings[index]["embedding"]), encoded, atol=1e-5, rtol=1e-5)


def test_a_head_trains_evaluates_and_predicts_on_tiny_vit_features(world, tmp_path):
  import nibabel as nib

  from autosam_jax.evaluation.evaluate import evaluate
  from autosam_jax.evaluation.predict import predict

  config = TrainConfig(head="linear", variant="improved", epochs=1, batch_size=4, learning_rate=3e-3,
                       scheduler="plateau_val_dice", checkpoint_every_steps=0)
  result = train(config, world.cache, _factory(world.weights), tmp_path / "run", list(world.split.labeled(1)),
                 list(world.split.val), progress=False)
  model = Path(result["model"])
  assert json.loads((model / "model.json").read_text())["sam_config"]["encoder_family"] == "tiny_vit"
  evaluated = evaluate(model, world.weights, world.cache, world.tiny.acdc, world.tiny.tfds, world.tiny.split,
                       tmp_path / "eval")
  assert 0 <= evaluated["report"]["summary"]["standard"]["overall"]["dice"]["value"] <= 1
  image = sorted((world.tiny.acdc / "patient003").glob("patient003_frame??.nii.gz"))[0]
  written = predict(model, world.weights, image, tmp_path / "predicted")
  predicted = np.asarray(nib.load(written[0]).dataobj)
  assert predicted.shape == nib.load(image).shape
  np.testing.assert_array_equal(predicted, np.asarray(nib.load(tmp_path / "eval" / "predictions" / image.name).dataobj))

  # The TinyViT model with the SAM-ViT weights, and the SAM-ViT model with the TinyViT cache: one line naming both.
  from autosam_jax.data.errors import DataError

  with pytest.raises(DataError, match=r"holds SAM ViT \(width 64, depth 2\) at 128 px, but .* was trained on TinyViT "
                                      r"at 128 px"):
    predict(model, world.tiny.weights, image, tmp_path / "refused")
  with pytest.raises(DataError, match=r"computed with TinyViT at 128 px, --weights holds SAM ViT \(width 64"):
    evaluate(world.tiny.model, world.tiny.weights, world.cache, world.tiny.acdc, world.tiny.tfds, world.tiny.split,
             tmp_path / "refused_eval")
  assert not (tmp_path / "refused").exists() and not (tmp_path / "refused_eval").exists()


def test_a_lora_run_adapts_the_tiny_vit_blocks(world, tmp_path):
  """LoRA through the encoder registry: factors on every attention block's q and v (none on the MBConv stage),
  trained with the head; the base weights stay as converted."""
  import orbax.checkpoint as ocp

  config = TrainConfig(head="linear", variant="improved", epochs=1, batch_size=4, learning_rate=5e-3,
                       scheduler="plateau_val_dice", lora_rank=2, lora_alpha=4.0, checkpoint_every_steps=0)
  result = train(config, world.inputs, _factory(world.weights), tmp_path / "run", list(world.split.labeled(1)),
                 list(world.split.val), progress=False)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore((Path(result["model"]) / "state").absolute())
  factors = {"/".join(path): np.asarray(v) for path, v in _leaves(state["params"]["encoder"])}
  assert sorted({p.split("/")[1] for p in factors}) == ["1", "2", "3"]  # the attention stages, not the MBConv one
  assert {p.split("/")[-2] for p in factors} == {"qkv"}
  assert all(p.rsplit("/", 1)[-1] in ("a_q", "b_q", "a_v", "b_v") for p in factors)
  assert any(np.abs(v).max() > 0 for p, v in factors.items() if p.endswith("b_q")), "the factors must have trained"


def _leaves(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, prefix + (str(k),))
  else:
    yield prefix, tree
