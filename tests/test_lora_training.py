"""LoRA runs (the encoder in the loop) through the trainer: the input cache, step 0 equal to the frozen model, what is
trained and saved, exact resumption, evaluate and predict on a LoRA model, and the refusals of mismatched caches."""

import dataclasses
import json

from pathlib import Path

import numpy as np
import pytest

from autosam_jax.train.loop import TrainConfig, train

# The improved linear head on the tiny SAM's encoder with rank-2 factors on q and v (the sweep's LoRA cells in
# tests/test_own_dataset.py run the recipe: the joint AutoSAM head).
LORA = TrainConfig(head="linear", variant="improved", epochs=2, batch_size=4, learning_rate=5e-3,
                   scheduler="plateau_val_dice", lora_rank=2, lora_alpha=4.0, checkpoint_every_steps=3)


@pytest.fixture(scope="module")
def world(tiny_world, tmp_path_factory):
  """The tiny world's input cache (one augmented view of patient001's slices) and a LoRA run on patient001."""
  from types import SimpleNamespace

  from autosam_jax.data.splits import Split
  from autosam_jax.features.precompute import PrecomputeOptions, precompute

  root = tmp_path_factory.mktemp("lora_training")
  precompute(tiny_world.acdc, tiny_world.weights, root / "inputs", tfds_dir=tiny_world.tfds, progress=False,
             options=PrecomputeOptions(mode="improved", views=1, dtype="float32", shard_size=32, store="inputs"),
             view_patients={"patient001"})
  split = Split.from_json(tiny_world.split)
  ns = SimpleNamespace(root=root, inputs=root / "inputs", weights=tiny_world.weights, split=split,
                       split_file=tiny_world.split, acdc=tiny_world.acdc, tfds=tiny_world.tfds,
                       cache=tiny_world.cache)
  ns.result = _run(ns, root / "run")
  return ns


def _factory(weights):
  def make(config):
    from flax import nnx

    from autosam_jax import load_sam
    from autosam_jax.models.trained import jnp_dtype
    from autosam_jax.train.loop import build_model
    return build_model(config, load_sam(weights, encoder_dtype=jnp_dtype(config.encoder_dtype)),
                       rngs=nnx.Rngs(config.seed))
  return make


def _run(world, out, config=LORA, cache=None, **kwargs):
  return train(config, cache or world.inputs, _factory(world.weights), out, list(world.split.labeled(1)),
               list(world.split.val), progress=False, **kwargs)


def _main(args) -> int:
  from autosam_jax.cli import main

  return main([str(a) for a in args])


def _saved_state(model_dir: Path):
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore((model_dir / "state").absolute())


def _leaves(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, prefix + (str(k),))
  else:
    yield prefix, np.asarray(tree)


def test_the_input_cache_holds_the_encoders_inputs(world):
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.models.loading import read_config

  cache = FeatureCache(world.inputs)
  size = read_config(world.weights).image_size
  depends_on = cache.manifest["depends_on"]
  assert depends_on["kind"] == "sam_inputs" and depends_on["views"] == 1
  assert cache[0]["embedding"].shape == (size, size, 3)
  views = [it for it in cache.items if it["view"] == 1]
  assert views and {it["patient_id"] for it in views} == {"patient001"}
  index = {(it["case_id"], it["slice_index"], it["view"]): i for i, it in enumerate(cache.items)}
  first = views[0]
  clean, view = (index[(first["case_id"], first["slice_index"], v)] for v in (0, 1))
  assert not np.array_equal(cache[clean]["embedding"], cache[view]["embedding"])  # an augmented view differs


def test_step_zero_equals_the_frozen_model(world):
  """B starts at zero: the adapted encoder with its head computes what the frozen encoder with the same head does."""
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.train.loop import build_model

  config = dataclasses.replace(LORA, num_classes=4)
  frozen_config = dataclasses.replace(config, lora_rank=0)
  adapted = build_model(config, load_sam(world.weights), rngs=nnx.Rngs(0))
  sam = load_sam(world.weights)
  head = build_model(frozen_config, sam, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.stack([FeatureCache(world.inputs)[i]["embedding"] for i in range(2)]))
  expected = np.asarray(nnx.jit(lambda head, encoder, x: head(encoder(x)))(head, sam.image_encoder, x))
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda model, x: model(x))(adapted, x)), expected, atol=1e-5, rtol=0)
  assert np.abs(expected).max() > 1e-3  # the comparison is of real logits


def test_the_encoder_options_of_a_lora_config_reach_the_model(world):
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.models.trained import jnp_dtype
  from autosam_jax.train.loop import build_model

  config = TrainConfig(head="linear", num_classes=3, lora_rank=2, attention="xla", remat=True, encoder_dtype="bfloat16")
  model = build_model(config, load_sam(world.weights, encoder_dtype=jnp_dtype("bfloat16")), rngs=nnx.Rngs(0))
  assert model.encoder.remat and model.encoder.dtype == jnp.bfloat16
  assert [b.attn.attention for b in model.encoder.blocks] == ["xla"] * len(model.encoder.blocks)
  with pytest.raises(ValueError, match="load it with encoder_dtype"):  # an fp32 SAM for a bf16 config
    build_model(config, load_sam(world.weights), rngs=nnx.Rngs(0))


def test_a_lora_run_trains_only_the_factors_and_the_head_and_saves_no_base_weights(world):
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.models.lora import LoraParam, TRAINABLE
  from autosam_jax.train.loop import build_model

  config = dataclasses.replace(LORA, num_classes=4)
  model = build_model(config, load_sam(world.weights), rngs=nnx.Rngs(0))
  _, params, frozen = nnx.split(model, TRAINABLE, ...)
  trained = [(tuple(map(str, p)), v) for p, v in nnx.to_flat_state(params)]
  factors = [p for p, v in trained if isinstance(v, LoraParam)]
  depth = len(model.encoder.blocks)
  assert len(factors) == depth * 2 * 2  # q and v of every block, A and B each
  assert all(p[0] == "head" for p, v in trained if not isinstance(v, LoraParam))
  assert any(p[0] == "head" for p, _ in trained)
  frozen_paths = [tuple(map(str, p)) for p, _ in nnx.to_flat_state(frozen)]
  assert any(p[:2] == ("encoder", "blocks") and p[-1] == "kernel" for p in frozen_paths)  # base weights: frozen

  state = _saved_state(Path(world.result["model"]))
  saved = dict(_leaves(state["params"]))
  assert "encoder" not in state["frozen"]  # the base weights are the converted SAM's, not the model's
  assert sorted(p for p in saved if p[0] == "encoder") == sorted(factors)
  b = [v for p, v in saved.items() if p[-1].startswith("b_")]
  assert b and all(np.abs(v).max() > 0 for v in b)  # the B factors left zero: training reached them
  model_json = json.loads((Path(world.result["model"]) / "model.json").read_text())
  assert model_json["input"] == "sam_inputs" and model_json["encoder_dtype"] == "float32"
  from autosam_jax.models.loading import weights_digest
  assert model_json["weights_sha256"] == weights_digest(world.weights)


def test_a_lora_run_killed_with_sigkill_resumes_to_the_same_parameters(world, tmp_path, capsys):
  """The train command killed (SIGKILL) one step after its mid-epoch checkpoint at step 3, then rerun: the same
  factors and head, to the bit, as the uninterrupted run."""
  import os
  import signal
  import subprocess
  import sys

  config = tmp_path / "lora.py"
  config.write_text(f"def get_config():\n  return {LORA.to_dict()!r}\n")
  out = tmp_path / "run"
  args = ["train", "--config", config, "--cache", world.inputs, "--weights", world.weights, "--splits",
          world.split_file, "--tr-size", "1", "--out", out, "--no-progress"]
  env = {**os.environ, "AUTOSAM_JAX_KILL_AT": "train.step:4", "AUTOSAM_JAX_KILL_SIGNAL": "KILL",
         "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
  killed = subprocess.run([sys.executable, "-m", "autosam_jax.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not (out / "final_model").exists() and (out / "checkpoints").is_dir()
  assert _main(args) == 0
  resumed = dict(_leaves(_saved_state(out / "final_model")["params"]))
  uninterrupted = dict(_leaves(_saved_state(world.root / "run" / "final_model")["params"]))
  assert resumed.keys() == uninterrupted.keys()
  for path, value in uninterrupted.items():
    np.testing.assert_array_equal(resumed[path], value, err_msg="/".join(path))


def test_evaluate_and_predict_take_a_lora_model(world, tmp_path):
  """Evaluate (merged model over the input cache) agrees with the unmerged model, and predict on the test patient's
  scans writes what evaluate wrote for them."""
  import jax.numpy as jnp
  import nibabel as nib
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.evaluation.evaluate import evaluate
  from autosam_jax.evaluation.predict import load_model, predict
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.models.trained import read_train_config, restore_head

  model_dir = Path(world.result["model"])
  _, merged, _ = load_model(model_dir, world.weights, encoder=False)  # what evaluate runs: the factors merged
  unmerged = restore_head(model_dir, read_train_config(model_dir), load_sam(world.weights))
  cache = FeatureCache(world.inputs)
  x = jnp.asarray(np.stack([cache[i]["embedding"] for i in cache.indices(["patient003"])[:3]]))
  run = nnx.jit(lambda model, x: model(x))
  np.testing.assert_allclose(np.asarray(run(merged, x)), np.asarray(run(unmerged, x)), atol=1e-4, rtol=1e-4)
  sam, _, _ = load_model(model_dir, world.weights, encoder=True)  # what predict runs: SAM's encoder merged
  encode = nnx.jit(lambda encoder, x: encoder(x))
  adapted = np.asarray(encode(unmerged.encoder, x))
  np.testing.assert_allclose(np.asarray(encode(sam.image_encoder, x)), adapted, atol=1e-4, rtol=1e-4)
  assert np.abs(adapted - np.asarray(encode(load_sam(world.weights).image_encoder, x))).max() > 1e-4

  evaluated = evaluate(model_dir, world.weights, world.inputs, world.acdc, world.tfds, world.split_file,
                       tmp_path / "eval")
  dice = evaluated["report"]["summary"]["official"]["overall"]["dice"]["value"]
  assert 0 <= dice <= 1
  images = sorted((world.acdc / "patient003").glob("patient003_frame??.nii.gz"))
  assert images
  written = predict(model_dir, world.weights, images[0], tmp_path / "predicted")
  predicted = np.asarray(nib.load(written[0]).dataobj)
  evaluated_case = np.asarray(nib.load(tmp_path / "eval" / "predictions" / images[0].name).dataobj)
  assert predicted.shape == evaluated_case.shape
  assert np.mean(predicted == evaluated_case) > 0.999


@pytest.mark.parametrize("case", ["lora_on_embeddings", "head_on_inputs", "evaluate_lora_on_embeddings"])
def test_a_cache_of_the_wrong_kind_is_refused_in_one_line(world, tmp_path, case):
  from autosam_jax.errors import DataError

  with pytest.raises(DataError) as err:
    if case == "lora_on_embeddings":
      _run(world, tmp_path / "run", cache=world.cache)
    elif case == "head_on_inputs":
      _run(world, tmp_path / "run", config=dataclasses.replace(LORA, lora_rank=0))
    else:
      from autosam_jax.evaluation.evaluate import evaluate
      evaluate(Path(world.result["model"]), world.weights, world.cache, world.acdc, world.tfds, world.split_file,
               tmp_path / "eval")
  message = str(err.value)
  assert "\n" not in message
  if case == "head_on_inputs":
    assert "SAM encoder inputs" in message and "autosam-jax precompute)" in message
  else:
    assert "holds SAM embeddings" in message and "precompute --store inputs" in message
  assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("values, message", [
    (dict(head="unet", lora_rank=4), "the UNet has none"),
    (dict(remat=True), "set lora_rank"),
    (dict(encoder_dtype="bfloat16"), "set lora_rank"),
    (dict(attention="chunked"), "set lora_rank"),
    (dict(lora_rank=4, attention="flash"), "attention"),
    (dict(lora_rank=4, lora_targets=["q", "q"]), "name a layer twice"),
    (dict(lora_rank=4, lora_targets=["qkv", "v"]), "leave out 'q', 'k' and 'v'"),
    (dict(lora_rank=4, lora_targets=["attn"]), "lora_targets"),
    (dict(lora_rank=4, lora_targets=[]), "at least one of"),
    (dict(lora_rank=-1), "lora_rank"),
])
def test_lora_training_options_are_checked(values, message):
  from autosam_jax.errors import DataError

  with pytest.raises(DataError, match=message) as err:
    TrainConfig.from_dict(values, source="cfg.py")
  assert str(err.value).startswith("cfg.py: ")


def test_the_training_configs_choices_are_the_models():
  """TrainConfig spells out the LoRA targets and attention implementations (it imports no JAX); they must stay the
  models' own lists."""
  from autosam_jax.models import image_encoder, lora, trained

  assert trained.LORA_TARGETS == lora.TARGETS
  assert trained.ATTENTIONS == image_encoder.ATTENTION_IMPLEMENTATIONS + tuple(image_encoder.LEGACY_ATTENTION)


def test_export_merged_writes_weights_every_command_loads(world, tiny_world, tmp_path, capsys):
  """The exported SAM's encoder computes what the trained (unmerged) adapted encoder does; a frozen-encoder head and
  an existing folder are refused in one line, writing nothing."""
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.models.trained import read_train_config, restore_head

  model_dir, out = Path(world.result["model"]), tmp_path / "merged"
  assert _main(["export-merged", model_dir, "--weights", world.weights, "--out", out]) == 0
  assert "rank-2 LoRA factors" in capsys.readouterr().out
  exported = load_sam(out)
  unmerged = restore_head(model_dir, read_train_config(model_dir), load_sam(world.weights))
  base = load_sam(world.weights)
  x = jnp.asarray(np.stack([FeatureCache(world.inputs)[i]["embedding"] for i in range(2)]))
  encode = nnx.jit(lambda encoder, x: encoder(x))
  adapted = np.asarray(encode(unmerged.encoder, x))
  np.testing.assert_allclose(np.asarray(encode(exported.image_encoder, x)), adapted, atol=1e-4, rtol=1e-4)
  assert np.abs(adapted - np.asarray(encode(base.image_encoder, x))).max() > 1e-4  # the factors changed something
  mask_decoder = lambda sam: [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(sam.mask_decoder))]
  for a, b in zip(mask_decoder(exported), mask_decoder(base)):
    np.testing.assert_array_equal(a, b)
  conversion = json.loads((out / "conversion.json").read_text())
  assert conversion["lora_rank"] == 2 and conversion["source"] == str(model_dir.absolute())

  for args, named in (([tiny_world.model, "--weights", world.weights, "--out", tmp_path / "other"], "no LoRA factors"),
                      ([model_dir, "--weights", world.weights, "--out", out], "already exists")):
    assert _main(["export-merged", *args]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and named in err and "\n" not in err
  assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("remat", [False, True])
def test_lora_dropout_draws_its_masks_from_the_step(world, remat):
  """With lora_dropout the factors see dropped-out inputs, drawn from (seed, step): the same step gives the same loss
  (also under remat), another step another one, and no dropout the plain loss."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.models.lora import TRAINABLE, lora_layers
  from autosam_jax.train.loop import HeadProgram, build_model

  config = dataclasses.replace(LORA, num_classes=4, lora_dropout=0.5, remat=remat)
  model = build_model(config, load_sam(world.weights), rngs=nnx.Rngs(0))
  for i, layer in enumerate(lora_layers(model.encoder)):  # B away from zero, so that the factors' input matters
    for name, _, _ in layer.parts:
      b = getattr(layer, f"b_{name}")
      b[...] = jax.random.normal(jax.random.key(i), b.shape) * 0.5
  graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
  cache = FeatureCache(world.inputs)
  items = [cache[i] for i in range(2)]
  batch = {"embedding": jnp.asarray(np.stack([it["embedding"] for it in items])),
           "target": jnp.asarray(np.stack([it["target"] for it in items]).astype(np.int32)),
           "weight": jnp.asarray(np.stack([it["valid"] for it in items]).astype(np.float32))}
  program = HeadProgram(graphdef, seed=3, dropout=True)
  loss = jax.jit(lambda params, frozen, batch, step: program.loss(params, frozen, program.prepare(batch, step))[0])
  first, again, other = (float(loss(params, frozen, batch, jnp.int32(s))) for s in (0, 0, 1))
  plain = float(jax.jit(lambda p, f, b: HeadProgram(graphdef).loss(p, f, b)[0])(params, frozen, batch))
  assert np.isfinite([first, other, plain]).all()
  assert first == again and first != other and first != plain
