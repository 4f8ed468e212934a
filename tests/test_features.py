"""Feature cache: equal to a direct encoder call, kill and resume, stale and corrupted caches, one writer at a time
(precompute and image-cache). The same cache from 1 device, 4 devices and 2 processes: tests/test_distributed.py."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from autosam_jax.data.errors import DataError
from autosam_jax.features.cache import FeatureCache
from autosam_jax.features.precompute import PrecomputeOptions, precompute
from tests.conftest import assert_refused_while_in_use

OPTIONS = PrecomputeOptions(mode="faithful", views=1, dtype="float32", batch_size=4, seed=3, shard_size=8)


@pytest.fixture(scope="module")
def inputs(tiny_weights, tmp_path_factory):
  from autosam_jax.data.synthetic import write_synthetic_acdc

  root = tmp_path_factory.mktemp("features")
  write_synthetic_acdc(root / "acdc", 2, seed=5)
  return {"root": root, "weights": tiny_weights, "data": root / "acdc", "tfds": root / "tfds",
          "view_patients": {"patient001"}}


@pytest.fixture(scope="module")
def reference_cache(inputs):
  out = inputs["root"] / "reference"
  summary = precompute(inputs["data"], inputs["weights"], out, tfds_dir=inputs["tfds"], options=OPTIONS,
                       view_patients=inputs["view_patients"], progress=False)
  return out, summary


def _command(inputs, out, *extra):
  return [sys.executable, "-m", "autosam_jax.cli", "precompute", "--data", str(inputs["data"]), "--tfds-dir",
          str(inputs["tfds"]), "--weights", str(inputs["weights"]), "--out", str(out), "--dtype", "fp32",
          "--batch-size", str(OPTIONS.batch_size), "--seed", str(OPTIONS.seed), "--shard-size",
          str(OPTIONS.shard_size), "--views", str(OPTIONS.views), "--splits", str(inputs["splits"]), *extra]


@pytest.fixture(scope="module")
def split_file(inputs):
  from autosam_jax.data.splits import Split

  path = inputs["root"] / "split.json"
  Split(name="s", seed=0, train=("patient001",), val=(), test=("patient002",)).to_json(path)
  inputs["splits"] = path
  return path


def _all(cache_dir):
  cache = FeatureCache(cache_dir)
  return cache, [cache[i] for i in range(len(cache))]


def test_clean_views_equal_a_direct_encoder_call(reference_cache, inputs):
  import jax.numpy as jnp

  from autosam_jax import load_sam
  from autosam_jax.data.preprocess import PreprocessConfig, encoder_input, preprocess_volume
  from autosam_jax.data.volumes import load_volumes

  cache, items = _all(reference_cache[0])
  volumes = load_volumes(inputs["data"], inputs["tfds"]).volumes
  sam = load_sam(inputs["weights"])
  config = PreprocessConfig(mode="faithful", encoder_size=128, head_size=32)
  checked = 0
  for case_id in list(volumes)[:2]:
    v = volumes[case_id]
    pre = preprocess_volume(v.image, v.spacing, v.label, config)
    direct = np.asarray(sam.encode(encoder_input(pre.images, pre.geometry)))
    for item in items:
      if item["case_id"] == case_id and item["view"] == 0:
        np.testing.assert_allclose(item["embedding"], direct[item["slice_index"]], atol=2e-5, rtol=0)
        np.testing.assert_array_equal(item["target"], pre.targets[item["slice_index"]])
        checked += 1
  assert checked == sum(v.image.shape[2] for v in list(volumes.values())[:2])
  # Views: only the split's training patient has them, and they differ from the clean slice.
  assert {it["patient_id"] for it in items if it["view"] == 1} == {"patient001"}
  clean = {(it["case_id"], it["slice_index"]): it for it in items if it["view"] == 0}
  view = [it for it in items if it["view"] == 1][0]
  assert not np.allclose(view["embedding"], clean[(view["case_id"], view["slice_index"])]["embedding"])
  assert jnp.asarray(items[0]["embedding"]).shape == (8, 8, 256)


def test_rerun_computes_nothing_and_stale_cache_is_refused(reference_cache, inputs):
  out, first = reference_cache
  assert first["computed"] == first["items"] > 0
  again = precompute(inputs["data"], inputs["weights"], out, tfds_dir=inputs["tfds"], options=OPTIONS,
                     view_patients=inputs["view_patients"], progress=False)
  assert again["computed"] == 0
  other = PrecomputeOptions(**{**OPTIONS.__dict__, "seed": OPTIONS.seed + 1})
  with pytest.raises(DataError, match="seed"):
    precompute(inputs["data"], inputs["weights"], out, tfds_dir=inputs["tfds"], options=other,
               view_patients=inputs["view_patients"], progress=False)
  cache = FeatureCache(out)
  with pytest.raises(DataError, match="built from other inputs"):
    FeatureCache(out, expected_depends_on={**cache.manifest["depends_on"], "views": 7})


def test_corrupted_shard_is_detected(reference_cache, tmp_path):
  import shutil

  copy = tmp_path / "copy"
  shutil.copytree(reference_cache[0], copy)
  shard = copy / "shards" / "00001.emb.npy"
  data = bytearray(shard.read_bytes())
  data[-100] ^= 0xFF
  shard.write_bytes(bytes(data))
  cache = FeatureCache(copy)
  cache[0]  # shard 0 is intact
  with pytest.raises(DataError, match="00001.emb.npy"):
    cache[OPTIONS.shard_size]


def _listing(folder):
  """Every file under `folder` with its size and modification time: what a refused command must leave as it was."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_kill_and_resume_gives_the_same_cache(reference_cache, inputs, split_file, tmp_path):
  """Killed (SIGKILL) right after its second shard is whole: exactly those two shards are kept, and the rerun
  computes the others and nothing more."""
  from autosam_jax import faults

  out = tmp_path / "killed"
  assert reference_cache[1]["shards"] > 2, "the cache has too few shards to be killed in the middle"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", faults.ENV: "precompute.shard:2"}
  process = subprocess.run(_command(inputs, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, timeout=300)
  assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
  # two whole shards (three arrays and the record each) and no temporary file: the kill came between shards
  assert sorted(p.name for p in (out / "shards").iterdir()) == [
      f"{shard:05d}.{part}" for shard in (0, 1) for part in ("done", "emb.npy", "tgt.npy", "val.npy")]
  assert not json.loads((out / "manifest.json").read_text())["complete"]
  with pytest.raises(DataError, match="incomplete"):
    FeatureCache(out)

  resumed = precompute(inputs["data"], inputs["weights"], out, tfds_dir=inputs["tfds"], options=OPTIONS,
                       view_patients=inputs["view_patients"], progress=False)
  assert resumed["computed"] == resumed["items"] - 2 * OPTIONS.shard_size
  assert not list(out.glob("shards/.*"))  # no temporary files left
  _, expected = _all(reference_cache[0])
  _, got = _all(out)
  assert len(got) == len(expected)
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a["embedding"], b["embedding"])
    np.testing.assert_array_equal(a["target"], b["target"])


def test_a_cache_in_use_is_refused_and_left_as_it_is(reference_cache, inputs, split_file, capsys):
  """A second precompute into a cache another process writes (a lock is per open file, so a lock this process holds
  counts as another's): one line naming the holder, exit code 2, nothing changed."""
  assert_refused_while_in_use(capsys, reference_cache[0], _command(inputs, reference_cache[0])[3:])


def test_image_cache_interrupted_after_a_shard_resumes_and_refuses_a_second_writer(inputs, tmp_path, capsys,
                                                                                   kill_at):
  """Interrupted (SIGINT) right after its second shard: those two are kept; a second command while the folder is
  in use is refused and changes nothing; the rerun finishes it equal to an uninterrupted cache."""
  from autosam_jax.cli import main
  from autosam_jax.features.images import write_image_cache

  small = {"shard_size": 8, "slice_size": 32, "spacing": 8.0}
  reference = tmp_path / "reference"
  assert write_image_cache(inputs["data"], inputs["tfds"], reference, **small)["shards"] > 2
  out = tmp_path / "images"
  kill_at("image_cache.shard:2")
  with pytest.raises(KeyboardInterrupt):
    write_image_cache(inputs["data"], inputs["tfds"], out, **small)
  kill_at("nowhere")
  assert sorted(p.name for p in out.glob("shards/*.done")) == ["00000.done", "00001.done"]
  assert not list(out.glob("shards/.*"))
  argv = ["image-cache", "--data", str(inputs["data"]), "--tfds-dir", str(inputs["tfds"]), "--out", str(out),
          "--shard-size", "8", "--slice-size", "32", "--spacing", "8.0"]
  assert_refused_while_in_use(capsys, out, argv)
  assert main(argv) == 0
  _, expected = _all(reference)
  _, got = _all(out)
  assert len(got) == len(expected)
  for a, b in zip(expected, got):
    for key in ("embedding", "target", "valid"):
      np.testing.assert_array_equal(a[key], b[key])
