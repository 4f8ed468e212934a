"""Faults in conversion and dataset building: SIGKILL at kill points chosen in advance (AUTOSAM_JAX_KILL_AT), then a
rerun that must end with the uninterrupted output and no temporary files; a full disk (a file-size limit, so the
kernel fails the write) must give one line, exit code 4 and keep the previous output.

Training, precompute, the sweep and SimCLR have their kill tests beside their other tests (test_cli_runs.py,
test_train.py, test_features.py, test_sweep.py, test_simclr.py); test_cli_runs.py's linear head also reruns on a
full disk."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_CONFIGS, limited_file_size

NAME = "dim64-win5-pad"


def cli(*argv, kill_at: str | None = None, prefix: list[str] = ()) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "AUTOSAM_JAX_KILL_AT"}
  env["JAX_PLATFORMS"] = "cpu"
  if kill_at:
    env["AUTOSAM_JAX_KILL_AT"] = kill_at
  return subprocess.run([*prefix, sys.executable, "-m", "autosam_jax.cli", *map(str, argv)], env=env,
                        capture_output=True, text=True, timeout=300)


def in_process(*argv) -> int:
  """The same command in this process (for reruns: no interpreter and JAX start-up to pay)."""
  from autosam_jax.cli import main

  return main([str(a) for a in argv])


def hidden_leftovers(directory: Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def converted(out: Path) -> dict:
  """Everything a conversion wrote: its JSON files and every parameter array."""
  import jax
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(out.absolute() / "params")
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {"config": json.loads((out / "config.json").read_text()),
          "conversion": json.loads((out / "conversion.json").read_text()),
          "params": {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}}


def assert_same_conversion(a: dict, b: dict) -> None:
  assert a["config"] == b["config"] and a["conversion"] == b["conversion"]
  assert a["params"].keys() == b["params"].keys()
  for key in a["params"]:
    np.testing.assert_array_equal(a["params"][key], b["params"][key], err_msg=key)


@pytest.fixture(scope="module")
def conversion(meta_checkpoints, tmp_path_factory):
  _, checkpoint = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  root = tmp_path_factory.mktemp("conversion")
  from autosam_jax.cli import main

  assert main(["convert", str(checkpoint), str(root / "reference")]) == 0
  return {"checkpoint": checkpoint, "reference": converted(root / "reference")}


@pytest.mark.parametrize("point", ["convert.params_staged"])  # the old_moved_aside point: the test below
def test_conversion_killed_then_rerun(conversion, tmp_path, point):
  out = tmp_path / "weights"
  killed = cli("convert", conversion["checkpoint"], out, kill_at=point)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not out.exists() and hidden_leftovers(tmp_path), "the kill point was not inside the staging"
  assert in_process("convert", conversion["checkpoint"], out) == 0
  assert hidden_leftovers(tmp_path) == []
  assert_same_conversion(converted(out), conversion["reference"])


def test_conversion_killed_while_replacing_keeps_or_restores_the_old_output(conversion, tmp_path):
  """--overwrite moves the old output aside before renaming the new one in; killed in between, the old one is
  back in place before the rerun replaces it."""
  out = tmp_path / "weights"
  assert in_process("convert", conversion["checkpoint"], out) == 0
  info = json.loads((out / "conversion.json").read_text())
  (out / "conversion.json").write_text(json.dumps({**info, "marker": "old output"}))  # tells the old output apart
  killed = cli("convert", "--overwrite", conversion["checkpoint"], out, kill_at="convert.old_moved_aside")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert not out.exists()
  # A rerun that fails before writing (a missing checkpoint) still puts the old output back.
  assert in_process("convert", "--overwrite", tmp_path / "missing.pth", out) == 2
  assert json.loads((out / "conversion.json").read_text())["marker"] == "old output"
  assert in_process("convert", "--overwrite", conversion["checkpoint"], out) == 0
  assert hidden_leftovers(tmp_path) == [] and "marker" not in json.loads((out / "conversion.json").read_text())
  assert_same_conversion(converted(out), conversion["reference"])


def test_conversion_on_a_full_disk_keeps_the_previous_output(conversion, tmp_path):
  out = tmp_path / "weights"
  assert in_process("convert", conversion["checkpoint"], out) == 0
  before = converted(out)
  full = cli("convert", "--overwrite", conversion["checkpoint"], out, prefix=limited_file_size(200_000))
  assert full.returncode == 4
  lines = full.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: disk full while writing: ") and "File too large" in lines[0], \
      full.stderr[-3000:]
  assert hidden_leftovers(tmp_path) == []
  assert_same_conversion(converted(out), before)


def _examples(data_dir: Path) -> list[dict]:
  from autosam_jax.data.acdc import Acdc

  # Compared example by example: the record files' bytes differ between two uninterrupted builds in two
  # processes, while their examples and order do not.
  builder = Acdc(data_dir=str(data_dir), file_format="array_record")
  source = builder.as_data_source(split="train")
  return [source[i] for i in range(len(source))]


def test_dataset_build_killed_at_chosen_examples_then_rerun(tmp_path):
  from autosam_jax.data.acdc import build_acdc
  from autosam_jax.data.synthetic import write_synthetic_acdc

  write_synthetic_acdc(tmp_path / "acdc", 2, seed=5)
  build_acdc(tmp_path / "acdc", tmp_path / "reference")
  reference = _examples(tmp_path / "reference")
  assert len(reference) > 20
  for hit in (1, len(reference)):  # the first example, and the last before TFDS writes and renames the shards
    data_dir = tmp_path / f"killed-{hit}"
    killed = cli("build-dataset", "acdc", tmp_path / "acdc", "--data-dir", data_dir, kill_at=f"build.example:{hit}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list((data_dir / "acdc").glob("incomplete.*")), "the kill did not land inside TFDS's build"
    assert in_process("build-dataset", "acdc", tmp_path / "acdc", "--data-dir", data_dir) == 0
    assert not list((data_dir / "acdc").glob("incomplete.*"))
    examples = _examples(data_dir)
    assert len(examples) == len(reference)
    for got, want in zip(examples, reference):
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)


def test_an_error_after_an_open_progress_bar_starts_on_a_line_of_its_own(tmp_path, capsys):
  """A full disk while precompute's bar is drawn: the exception leaves the bar open, its text ending without a
  newline; the bar is closed before the error line, which would otherwise continue the bar's line."""
  import argparse
  import errno

  from tqdm import tqdm

  from autosam_jax.faults import run_command

  shard = tmp_path / "cache" / "shards" / "00001.emb.npy"

  def run(args):
    bar = tqdm(total=64, unit="slice", desc="encoding (2 shards to write)")
    bar.update(40)
    raise OSError(errno.ENOSPC, "No space left on device", str(shard))

  capsys.readouterr()
  assert run_command(run, argparse.Namespace(out=tmp_path / "cache")) == 4
  err = capsys.readouterr().err
  assert "40/64" in err  # the bar was drawn (and stays, closed, above the error)
  last = err.rstrip("\n").split("\n")[-1]  # a terminal starts a line at "\n" only ("\r" returns within it)
  assert last == (f"error: disk full while writing: {shard}: No space left on device; free some space (or write "
                  "elsewhere) and rerun: finished work is kept and the rerun goes on from it")


def test_ctrl_c_while_a_config_file_runs_is_an_interruption(tmp_path, capsys):
  """A config file's own `raise KeyboardInterrupt` is the file's error (test_bad_inputs); a real Ctrl-C arriving while
  it runs still ends the command as interrupted, exit code 130."""
  from autosam_jax.faults import INTERRUPT_TEXT

  config = tmp_path / "config.py"
  config.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C came now\n"
                    "def get_config():\n  return {}\n")
  capsys.readouterr()
  assert in_process("train", "--config", config, "--cache", tmp_path / "cache", "--splits", tmp_path / "splits.json",
                    "--tr-size", "1", "--out", tmp_path / "run") == 130
  assert capsys.readouterr().err.strip().splitlines() == [f"error: SIGINT: {INTERRUPT_TEXT}"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.py"]
