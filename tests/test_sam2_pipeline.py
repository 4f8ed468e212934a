"""A tiny SAM 2 (Hiera, random weights) through the whole protocol: the label-efficiency sweep scores AutoSAM, the
linear head and LoRA on it and zero-shot SAM 2 with boxes, on phantoms of another anatomy than ACDC's (two classes,
isotropic voxels); and a cache or model of SAM 2 used with another encoder is refused naming both."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest


def _tiny_sam2():
  from autosam_jax.models.config import SamConfig
  from autosam_jax.models.encoders.hiera import HieraConfig

  # 64 px: a 16 x 16 first-stage grid (two 8 x 8 windows a side), 8 x 8, 4 x 4 (the embedding), 2 x 2.
  return SamConfig(encoder_family="hiera", image_size=64, resize="square", prompt_embed_dim=64, decoder_mlp_dim=128,
                   use_high_res_features=True, pred_obj_scores=True, iou_prediction_use_sigmoid=True,
                   dynamic_multimask_via_stability=True,
                   hiera=HieraConfig(embed_dim=16, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                                     window_spec=(8, 4, 4, 2), window_pos_embed_bkg_spatial_size=(4, 4)))


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
  from autosam_jax.data.shapes import write_shapes_dataset
  from autosam_jax.experiment.demo import write_random_sam

  root = tmp_path_factory.mktemp("sam2")
  weights = write_random_sam(root / "sam2-tiny", seed=4, config=_tiny_sam2())
  write_shapes_dataset(root / "data", num_cases=5, class_names=["lesion", "organ"], seed=2, spacing=(1.0, 1.0, 1.0),
                       shape=(40, 48, 8), voxel_order=(2, 0, 1))
  config = {"data": str(root / "data"), "encoders": {"sam2": str(weights)},
            "methods": ["autosam", "linear", "lora", "zero_shot_box"], "mode": "improved", "tr_sizes": [1],
            "num_folds": 2, "folds": [0], "val_patients": 1, "views": 0, "dtype": "fp32",
            "train": {"epochs": 1, "learning_rate": 3e-3, "plateau_start_epoch": 1},
            "method_train": {"autosam": {"joint": True}}}
  (root / "sweep.py").write_text(f"def get_config():\n  return {config!r}\n")
  from autosam_jax.cli import main

  code = main(["sweep", "--config", str(root / "sweep.py"), "--out", str(root / "out"), "--no-progress"])
  return root, weights, code


def test_the_sweep_scores_every_method_on_sam2(sweep_run):
  root, weights, code = sweep_run
  assert code == 0
  results = json.loads((root / "out" / "results.json").read_text())
  cells = {cell["method"]: cell for cell in results["cells"]}
  assert sorted(cells) == ["autosam", "linear", "lora", "zero_shot_box"]
  for cell in cells.values():
    assert cell["encoder"] == "sam2" and set(cell["official"]["dice"]) == {"lesion", "organ", "mean"}
    assert all(0 <= v <= 1 for v in cell["official"]["dice"].values())
  assert "LoRA + AutoSAM head (sam2)" in (root / "out" / "results.md").read_text()
  # The caches were computed by the Hiera encoder on SAM 2's square inputs: the embedding grid is 64 / 16.
  from autosam_jax.features.cache import FeatureCache

  cache = FeatureCache(root / "out" / "cache" / "sam2-improved")
  assert cache.manifest["depends_on"]["sam_config"]["encoder_family"] == "hiera"
  assert cache.manifest["depends_on"]["preprocess"]["resize"] == "square"
  assert cache[0]["embedding"].shape == (4, 4, 64)
  # ... with SAM 2's high-resolution maps beside the embedding, which the AutoSAM head built from its decoder adds.
  assert cache.manifest["feature_maps"] == ["embedding", "high_res"]
  assert cache[0]["high_res_0"].shape == (16, 16, 8) and cache[0]["high_res_1"].shape == (8, 8, 16)
  import jax.numpy as jnp

  from autosam_jax import load_sam
  from autosam_jax.train.loop import load_head

  head, _ = load_head(next((root / "out" / "runs" / "autosam").rglob("final_model")), load_sam(weights))
  assert head.uses_high_res
  item = cache[0]
  embedding = jnp.asarray(item["embedding"], jnp.float32)[None]
  high_res = [jnp.asarray(item[f"high_res_{k}"], jnp.float32)[None] for k in (0, 1)]
  with_maps = np.asarray(head(embedding, high_res))
  without = np.asarray(head(embedding, [jnp.zeros_like(m) for m in high_res]))
  assert with_maps.shape == (1, 16, 16, 3) and np.abs(with_maps - without).max() > 1e-4


def test_a_sam2_cache_is_refused_with_other_weights(sweep_run, tiny_weights):
  """The sweep's SAM 2 cache given with a SAM ViT's weights: one line naming both encoders."""
  from autosam_jax.errors import DataError
  from autosam_jax.evaluation.predict import check_cache_matches
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.models.loading import read_config
  from autosam_jax.models.trained import read_train_config

  root, _, _ = sweep_run
  cache = FeatureCache(root / "out" / "cache" / "sam2-improved")
  train_config = read_train_config(next((root / "out" / "runs" / "linear").rglob("final_model")))
  with pytest.raises(DataError, match=r"computed with Hiera \(SAM 2; width 16, stages 1-1-2-1\) at 64 px, "
                                      r"--weights holds SAM ViT"):
    check_cache_matches(cache.manifest["depends_on"], train_config, read_config(tiny_weights), "cache")


def test_predict_with_the_sam2_autosam_head_matches_its_evaluation(sweep_run, tiny_weights, tmp_path):
  """`predict` on a NIfTI runs the Hiera encoder and the head with its high-resolution maps, as the evaluation did
  from the cache (float32 both ways): the same labels. The model with another encoder's weights is refused."""
  import nibabel as nib

  from autosam_jax.data.errors import DataError
  from autosam_jax.evaluation.predict import predict

  root, weights, _ = sweep_run
  run = next((root / "out" / "runs" / "autosam").rglob("final_model")).parent
  image = root / "data" / "imagesTr" / "case_002_0000.nii.gz"
  written = predict(run / "final_model", weights, image, tmp_path / "predicted")
  predicted = np.asarray(nib.load(written[0]).dataobj)
  evaluated = np.asarray(nib.load(run / "eval" / "predictions" / "case_002.nii.gz").dataobj)
  assert predicted.shape == nib.load(image).shape
  np.testing.assert_array_equal(predicted, evaluated)
  with pytest.raises(DataError, match=r"holds SAM ViT .* but .* was trained on Hiera \(SAM 2; width 16"):
    predict(run / "final_model", tiny_weights, image, tmp_path / "refused")
  assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("values, message", [
    ({"use_high_res_features": False}, "use_high_res_features must be true for encoder_family 'hiera'"),
    ({"image_size": 1000}, "image_size (--image-size) 1000 is not a multiple of the Hiera trunk's total stride 32"),
    ({"image_size": 96, "window_spec": (16, 4, 4, 2)}, "first-stage grid of 24 tokens, not a multiple of the first "
                                                        "window 16"),
    ({"encoder_family": "sam_vit", "hiera": None}, "use_high_res_features, pred_obj_scores, iou_prediction_use_sigmoid, "
                                                   "dynamic_multimask_via_stability, resize belong to SAM 2's"),
])
def test_sam2_configs_no_model_can_be_built_from_are_refused(values, message):
  """One line naming the field, before any layer is built."""
  import dataclasses

  from autosam_jax.models.config import SamConfig, SamConfigError

  base = dataclasses.asdict(_tiny_sam2()) | {"hiera": _tiny_sam2().hiera, "image_size": 1024}
  if "window_spec" in values:
    values = dict(values)
    values["hiera"] = dataclasses.replace(base["hiera"], window_spec=values.pop("window_spec"))
  with pytest.raises(SamConfigError) as refused:
    SamConfig(**(base | values))
  assert message in str(refused.value) and "\n" not in str(refused.value)
