"""The UNet baseline through the heads' training loop: image cache, on-the-fly augmentation, saved and reloaded."""

import dataclasses
import json

import numpy as np

from autosam_jax.train.loop import TrainConfig, train

# A narrow UNet (the official width is 64) so that two epochs on CPU stay fast.
CONFIG = TrainConfig(head="unet", variant="faithful", augment="faithful", epochs=2, batch_size=4,
                     learning_rate=5e-4, unet_base_channels=8)


def test_unet_trains_on_an_image_cache_with_augmentation(tmp_path):
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.data.splits import Split
  from autosam_jax.data.synthetic import write_synthetic_acdc
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.features.images import write_image_cache
  from autosam_jax.train.loop import build_model, load_head

  write_synthetic_acdc(tmp_path / "acdc", 3, seed=11)
  summary = write_image_cache(tmp_path / "acdc", tmp_path / "tfds", tmp_path / "cache", shard_size=16)
  cache = FeatureCache(tmp_path / "cache")
  assert len(cache) == summary["items"] and cache.manifest["depends_on"]["kind"] == "images"
  item = cache[0]
  assert item["embedding"].shape == (224, 224, 3) and item["embedding"].dtype == np.float32
  assert 0 <= item["embedding"].min() and item["embedding"].max() <= 1 and item["target"].shape == (224, 224)
  # Split parts must be disjoint, hence a third patient for the test part.
  split = Split(name="s", seed=0, train=("patient001",), val=("patient002",), test=("patient003",))

  out = tmp_path / "run"
  result = train(CONFIG, tmp_path / "cache", lambda config: build_model(config, None, rngs=nnx.Rngs(config.seed)), out,
                 split.labeled(1), list(split.val), progress=False)
  rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  epochs = [r for r in rows if r["kind"] == "epoch"]
  assert len(epochs) == 2
  assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "step")
  assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in epochs)
  assert result["model"] == str(out / "final_model") and (out / "final_model" / "train_config.json").is_file()

  model, config = load_head(out / "final_model", sam=None)
  assert config == dataclasses.replace(CONFIG, num_classes=4)  # the phantoms' background, RV, MYO, LV
  logits = model(jnp.asarray(item["embedding"][None]))
  assert logits.shape == (1, 224, 224, 4) and bool(jnp.all(jnp.isfinite(logits)))
