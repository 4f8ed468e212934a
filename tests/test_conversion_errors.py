"""Bad checkpoints and output directories: one clear line naming the file, exit code 2, nothing left behind."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import TINY_CONFIGS
from weights_conversion.cli import main as convert_main

NAME = "dim64-win5-pad"


@pytest.fixture
def good_checkpoint(meta_checkpoints):
  _, path = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  return path


def _run(capsys, *argv):
  code = convert_main([str(a) for a in argv])
  err = capsys.readouterr().err.strip()
  return code, err


def _assert_clean_failure(code, err, out_dir, *expected_fragments):
  assert code == 2
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for fragment in expected_fragments:
    assert fragment in lines[0], (fragment, lines[0])
  assert not out_dir.exists()
  leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")]
  assert not leftovers, leftovers


def _edited_checkpoint(good, tmp_path, edit):
  state = torch.load(good, weights_only=True)
  edit(state)
  path = tmp_path / "edited.pth"
  torch.save(state, path)
  return path


def test_missing_file(capsys, tmp_path):
  out = tmp_path / "out"
  _assert_clean_failure(*_run(capsys, tmp_path / "nope.pth", out), out, "nope.pth", "no such file")


def test_truncated_checkpoint(capsys, tmp_path, good_checkpoint):
  data = good_checkpoint.read_bytes()
  broken = tmp_path / "truncated.pth"
  broken.write_bytes(data[: len(data) // 2])
  out = tmp_path / "out"
  _assert_clean_failure(*_run(capsys, broken, out), out, "truncated.pth", "truncated or corrupt")


def test_garbage_file(capsys, tmp_path):
  junk = tmp_path / "junk.bin"
  junk.write_bytes(b"\x00\x01not a checkpoint" * 100)
  out = tmp_path / "out"
  _assert_clean_failure(*_run(capsys, junk, out), out, "junk.bin")


def test_empty_file(capsys, tmp_path):
  empty = tmp_path / "empty.pth"
  empty.touch()
  out = tmp_path / "out"
  _assert_clean_failure(*_run(capsys, empty, out), out, "empty.pth", "empty")


def test_not_a_sam_checkpoint(capsys, tmp_path):
  path = tmp_path / "resnet.pth"
  torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, path)
  out = tmp_path / "out"
  _assert_clean_failure(*_run(capsys, path, out), out, "resnet.pth", "no SAM image encoder")


def test_unknown_key_is_named(capsys, tmp_path, good_checkpoint):
  path = _edited_checkpoint(good_checkpoint, tmp_path,
                            lambda s: s.__setitem__("image_encoder.blocks.0.attn.extra_gate", torch.zeros(3)))
  out = tmp_path / "out"
  _assert_clean_failure(*_run(capsys, path, out), out, "edited.pth", "image_encoder.blocks.0.attn.extra_gate")


def test_missing_key_is_named(capsys, tmp_path, good_checkpoint):
  path = _edited_checkpoint(good_checkpoint, tmp_path, lambda s: s.pop("mask_decoder.iou_prediction_head.layers.1.bias"))
  out = tmp_path / "out"
  _assert_clean_failure(*_run(capsys, path, out), out, "edited.pth", "mask_decoder.iou_prediction_head.layers.1.bias")


def test_inconsistent_shape_is_named(capsys, tmp_path, good_checkpoint):
  path = _edited_checkpoint(good_checkpoint, tmp_path,
                            lambda s: s.__setitem__("image_encoder.blocks.1.mlp.lin2.weight", torch.zeros(64, 100)))
  out = tmp_path / "out"
  _assert_clean_failure(*_run(capsys, path, out), out, "edited.pth", "image_encoder.blocks.1.mlp")


def test_wrong_model_type(capsys, tmp_path, good_checkpoint):
  out = tmp_path / "out"
  _assert_clean_failure(*_run(capsys, good_checkpoint, out, "--model-type", "vit_b"), out, "not a vit_b checkpoint",
                        "encoder_embed_dim=64")


def test_existing_output_is_kept_unless_overwrite(capsys, tmp_path, good_checkpoint):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  code, err = _run(capsys, good_checkpoint, out)
  assert code == 2 and "already exists" in err and (out / "keep.txt").read_text() == "mine"
  code, _ = _run(capsys, good_checkpoint, out, "--overwrite")
  assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_command_line_exit_code_and_single_line(tmp_path):
  """The real entry point, as a user runs it."""
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "-m", "weights_conversion", str(tmp_path / "missing.pth"), str(out)],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.pth'}: no such file; give the path of "
                                                "a SAM checkpoint (.pth or .safetensors)"]
  assert not out.exists()


def test_load_sam_names_missing_directory(tmp_path):
  from autosam_jax import CheckpointError, load_sam

  with pytest.raises(CheckpointError, match="config.json: missing"):
    load_sam(tmp_path / "not-converted")


def test_autosam_jax_convert_command(capsys, tmp_path, good_checkpoint):
  """`autosam-jax convert` is the same tool: converts a good file, refuses a bad one with exit code 2."""
  from autosam_jax.cli import main

  out = tmp_path / "converted"
  assert main(["convert", str(good_checkpoint), str(out)]) == 0
  assert (out / "config.json").is_file() and (out / "params").is_dir()
  assert "converted" in capsys.readouterr().out
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"PK\x03\x04 broken zip")
  assert main(["convert", str(junk), str(tmp_path / "other")]) == 2
  assert "junk.pth" in capsys.readouterr().err and not (tmp_path / "other").exists()
