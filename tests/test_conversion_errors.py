"""Bad checkpoints and output directories: one clear line naming the file, exit code 2, nothing left behind."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_CONFIGS
from autosam_jax.cli import main

NAME = "dim64-win5-pad"


@pytest.fixture
def good_checkpoint(meta_checkpoints):
  _, path = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  return path


def _run(capsys, *argv):
  code = main(["convert", *(str(a) for a in argv)])
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


def _listing(folder):
  return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_overwrite_replaces_only_an_earlier_conversion(capsys, tmp_path, good_checkpoint):
  """--overwrite replaces a folder convert wrote; a folder of the user's, one holding the checkpoint itself (OUT
  given as the checkpoint's folder or '.'), a conversion with the user's files added and a symbolic link are each
  refused in one line, with everything left as it was."""
  import os
  import shutil

  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "keep.txt").write_text("mine")
  code, err = _run(capsys, good_checkpoint, mine)
  assert code == 2 and "already exists" in err
  code, err = _run(capsys, good_checkpoint, mine, "--overwrite")
  assert code == 2 and "was not written by autosam-jax convert" in err and str(mine) in err, err
  assert (mine / "keep.txt").read_text() == "mine"

  source = tmp_path / "source"
  source.mkdir()
  checkpoint = Path(shutil.copy(good_checkpoint, source / "sam.pth"))
  before = _listing(source)
  for out in (source, "."):
    cwd = os.getcwd()
    os.chdir(source)
    try:
      code, err = _run(capsys, checkpoint, out, "--overwrite")
    finally:
      os.chdir(cwd)
    assert code == 2 and "holds the input" in err and "sam.pth" in err, err
    assert _listing(source) == before

  out = tmp_path / "converted"
  assert _run(capsys, good_checkpoint, out)[0] == 0
  (out / "notes.txt").write_text("the user's notes")
  code, err = _run(capsys, good_checkpoint, out, "--overwrite")
  assert code == 2 and "notes.txt" in err and (out / "notes.txt").exists(), err
  (out / "notes.txt").unlink()
  link = tmp_path / "link"
  link.symlink_to(out)
  code, err = _run(capsys, good_checkpoint, link, "--overwrite")
  assert code == 2 and "symbolic link" in err and link.is_symlink(), err
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

  assert _run(capsys, good_checkpoint, out, "--overwrite")[0] == 0  # an earlier conversion: replaced
  assert (out / "config.json").is_file() and (out / "checksums.json").is_file()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_converted_weights_with_flipped_bytes_are_refused_at_load(capsys, tmp_path, good_checkpoint):
  """checksums.json is written with the weights and verified at load: 64 flipped bytes of a parameter file, a
  changed config.json or a missing checksum record are each one error naming the file."""
  from autosam_jax import CheckpointError, load_sam

  out = tmp_path / "converted"
  assert _run(capsys, good_checkpoint, out)[0] == 0
  load_sam(out)
  data_files = sorted(p for p in (out / "params").rglob("*") if p.is_file() and p.stat().st_size > 1000)
  target = data_files[0]
  original = target.read_bytes()
  damaged = bytearray(original)
  middle = len(damaged) // 2
  damaged[middle:middle + 64] = bytes(b ^ 0xFF for b in damaged[middle:middle + 64])
  target.write_bytes(bytes(damaged))
  with pytest.raises(CheckpointError, match="checksum mismatch") as caught:
    load_sam(out)
  assert str(target) in str(caught.value)
  target.write_bytes(original)
  load_sam(out)
  config = (out / "config.json").read_text()
  (out / "config.json").write_text(config.replace('"window_size": 5', '"window_size": 6'))
  with pytest.raises(CheckpointError, match="config.json: checksum mismatch"):
    load_sam(out)
  (out / "config.json").write_text(config)
  (out / "checksums.json").unlink()
  with pytest.raises(CheckpointError, match="checksums.json: missing"):
    load_sam(out)


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
