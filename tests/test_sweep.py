"""The label-efficiency sweep through its CLI: a tiny SAM, a head, the UNet and zero-shot SAM, tr_size 1 and 2, one
fold; killed after its first finished cell and rerun, it redoes nothing that was finished; one sweep at a time."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autosam_jax.data.errors import DataError
from tests.conftest import TINY_CONFIGS, assert_refused_while_in_use

NAME = "dim64-win5-pad"
METHODS = ["linear", "unet", "zero_shot_box"]


def _config_file(root: Path, checkpoint: Path) -> Path:
  values = {"data": str(root / "acdc"), "encoders": {"tiny": str(checkpoint)}, "methods": METHODS,
            "mode": "faithful", "tr_sizes": [1, 2], "num_folds": 2, "folds": [0], "dtype": "fp32",
            # the faithful protocol validates on nothing it needs, and tr_size 2 needs both non-test patients
            "val_patients": 0,
            "train": {"epochs": 1, "learning_rate": 5e-3, "plateau_start_epoch": 1},
            "method_train": {"unet": {"unet_base_channels": 8}}, "image_size": 112, "image_spacing": 2.5}
  path = root / "sweep_config.py"
  path.write_text(f"def get_config():\n  return {values!r}\n")
  return path


@pytest.fixture(scope="module")
def setup(meta_checkpoints, tmp_path_factory):
  from autosam_jax.data.synthetic import write_synthetic_acdc

  root = tmp_path_factory.mktemp("sweep")
  _, checkpoint = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  write_synthetic_acdc(root / "acdc", 4, seed=5)
  return root, _config_file(root, checkpoint)


def _sweep_command(config: Path, out: Path) -> list[str]:
  return [sys.executable, "-m", "autosam_jax.cli", "sweep", "--config", str(config), "--out", str(out),
          "--no-progress"]


def _environment() -> dict[str, str]:
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_sweep_killed_after_a_cell_resumes_without_redoing_it(setup, capsys):
  from autosam_jax import faults
  from autosam_jax.cli import main

  root, config = setup
  out = root / "out"
  # Killed (SIGKILL) right after the first cell's record is written: exactly that cell is finished.
  env = {**_environment(), faults.ENV: "sweep.cell:1"}
  killed = subprocess.run(_sweep_command(config, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=600)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  cells_dir = out / "cells"
  finished = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in cells_dir.glob("*.json")}
  assert list(finished) == ["linear--tiny--tr1--cv2-seed0-fold0.json"]
  first = json.loads(next(iter(finished.values()))[1])
  first_metrics = out / first["run_dir"] / "metrics.jsonl"
  first_metrics_state = (first_metrics.stat().st_mtime_ns, first_metrics.read_text())

  capsys.readouterr()
  assert main(_sweep_command(config, out)[3:]) == 0, capsys.readouterr().err[-3000:]
  stdout = capsys.readouterr().out
  # Finished cells are skipped, untouched, and so are their runs.
  for name, (mtime, text) in finished.items():
    assert (cells_dir / name).stat().st_mtime_ns == mtime and (cells_dir / name).read_text() == text
  assert (first_metrics.stat().st_mtime_ns, first_metrics.read_text()) == first_metrics_state
  assert "5 cells, 1 already finished" in stdout

  # Another sweep while one writes the folder (a lock is per open file, so one this process holds counts as
  # another's): one line naming the holder, exit code 2, nothing changed.
  assert_refused_while_in_use(capsys, out, _sweep_command(config, out)[3:])

  results = json.loads((out / "results.json").read_text())
  assert results["finished"] == results["total"] == 5  # linear x 2, unet x 2, zero-shot x 1
  cells = {(c["method"], c["tr_size"]) for c in results["cells"]}
  assert cells == {("linear", 1), ("linear", 2), ("unet", 1), ("unet", 2), ("zero_shot_box", 0)}
  for cell in results["cells"]:
    assert cell["fold"] == "cv2-seed0-fold0" and cell["mode"] == "faithful"
    for convention in ("official", "standard"):
      assert set(cell[convention]["dice"]) == {"RV", "MYO", "LV", "mean"}
      assert set(cell[convention]["hd95"]) == {"RV", "MYO", "LV", "mean"}
      assert 0 <= cell[convention]["dice"]["mean"] <= 1
    # each figure is the one its own evaluation wrote
    report = json.loads((out / cell["run_dir"] / "eval" / "metrics.json").read_text())
    assert cell["official"]["dice"]["mean"] == report["summary"]["official"]["overall"]["dice"]["value"]

  table = (out / "results.md").read_text()
  assert "| method | 1 labeled | 2 labeled |" in table
  # which weights made the figures (the checkpoint the sweep converted), and over how many test patients
  assert not results["weights"]["tiny"]["random"] and results["weights"]["tiny"]["source"].endswith("sam.pth")
  assert f"SAM weights: tiny = converted from {results['weights']['tiny']['source']}." in table
  assert "2 test patients." in table
  for row in ("| Linear head (tiny) |", "| UNet (scratch) |", "| SAM zero-shot, GT boxes (tiny) † |"):
    assert row in table
  assert (out / "dice_vs_labels.png").stat().st_size > 1000
  assert not list(out.rglob("*.partial-*")) and not list(out.rglob(".*.tmp*"))

  # The UNet baselines ran on the configured grid (112 x 112 of 2.5 mm), and their models record it for `predict`.
  assert (out / "cache" / "images-faithful-112px-2.5mm" / "manifest.json").is_file()
  unet = next(c for c in results["cells"] if c["method"] == "unet" and c["tr_size"] == 2)
  recorded = json.loads((out / unet["run_dir"] / "final_model" / "preprocess.json").read_text())
  assert (recorded["slice_size"], recorded["target_spacing"]) == (112, [2.5, 2.5])


def test_sweep_refuses_a_changed_config_and_bad_options(setup, capsys):
  from autosam_jax.cli import main

  root, config = setup
  out = root / "refused"
  out.mkdir()
  (out / "sweep_config.json").write_text(json.dumps({"data": "elsewhere", "mode": "improved"}))
  assert main(["sweep", "--config", str(config), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "other settings" in err[0] and "data" in err[0] and "mode" in err[0]

  for number, (override, words) in enumerate((
      (["--set", "methods=['autosam', 'resnet']"], "unknown method"),
      (["--set", "tr_sizes=[1, 9]"], "tr_size 9 is larger than the training set"),
      (["--set", "image_size=100"], "multiple of 16"),
      (["--set", "val_patients=1.5"], "val_patients: 1.5 is neither a count nor a fraction"),
      (["--set", "mode=improved"], "split cv2-seed0-fold0 of"),  # the linear head's improved variant needs validation
      (["--set", "colour=1"], "unknown sweep option"))):
    fresh = root / f"bad-{number}"
    assert main(["sweep", "--config", str(config), "--out", str(fresh), *override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (fresh / "cells").exists() and not (fresh / "runs").exists()


def test_improved_methods_need_validation_patients_and_zero_shot_does_not(tmp_path):
  from autosam_jax.experiment.sweep import SweepConfig, prepare_splits

  patients = [f"patient{i:03d}" for i in range(1, 7)]
  improved = {"data": "acdc", "encoders": {"tiny": "sam.pth"}, "mode": "improved", "tr_sizes": [1], "num_folds": 5}
  splits, _ = prepare_splits(SweepConfig.from_dict(improved | {"methods": ["linear"]}, "c.py"), tmp_path, patients)
  assert [len(s.val) for s in splits] == [1] * 5  # the default share keeps one on six patients
  none = improved | {"val_patients": 0}
  with pytest.raises(DataError) as info:
    prepare_splits(SweepConfig.from_dict(none | {"methods": ["linear", "unet", "zero_shot_box"]}, "c.py"), tmp_path,
                   patients)
  message = str(info.value)
  assert message.startswith(f"split cv5-seed0-fold0 of {tmp_path / 'splits.json'} has no validation patients")
  assert "set val_patients to 1 (or more)" in message and "(methods linear train in the improved variant)" in message
  assert not list(tmp_path.iterdir())  # refused before anything was written
  # zero-shot cells train nothing and the UNet baselines train faithfully: no validation needed
  splits, _ = prepare_splits(SweepConfig.from_dict(none | {"methods": ["unet", "simclr", "zero_shot_point"]}, "c.py"),
                             tmp_path, patients)
  assert [len(s.val) for s in splits] == [0] * 5
  # a split file of the config's own: the fix is to remake it
  from autosam_jax.data.splits import Split
  own = Split(name="mine", seed=None, train=patients[:4], val=[], test=patients[4:]).to_json(tmp_path / "own.json")
  with pytest.raises(DataError, match=rf"split mine of {own} has no .* make the split file with --val-patients 1"):
    prepare_splits(SweepConfig.from_dict(improved | {"methods": ["autosam"], "splits": str(own)}, "c.py"), tmp_path,
                   patients)


@pytest.mark.parametrize("value,stored", [(1, 1), ("2", 2), (0.3, 0.3), ("0.15", 0.15)])
def test_val_patients_option_of_the_sweep(value, stored):
  from autosam_jax.experiment.sweep import SweepConfig

  config = SweepConfig.from_dict({"data": "acdc", "methods": ["unet"], "val_patients": value}, "c.py")
  assert config.val_patients == stored and type(config.val_patients) is type(stored)
  assert SweepConfig.from_dict({"data": "acdc", "methods": ["unet"]}, "c.py").val_patients == 0.15
  with pytest.raises(DataError, match=r"^c.py: val_patients: -1 is a negative count"):
    SweepConfig.from_dict({"data": "acdc", "methods": ["unet"], "val_patients": -1}, "c.py")


def test_sweep_config_rules_hold_however_it_is_made(tmp_path):
  """The option rules apply to a config constructed or replaced in code as to one read from a file: a bool is not a
  count, a method or mode outside the choices is refused, whichever way it comes."""
  import dataclasses

  from autosam_jax.experiment.sweep import SweepConfig, load_sweep_config

  config = SweepConfig.from_dict({"data": "acdc", "methods": ["unet"]}, "c.py")
  for change, message in [({"num_folds": True}, "num_folds must be int, got bool True"),
                          ({"tr_sizes": (True, 2)}, "tr_sizes must be a list of int, got tuple (True, 2)"),
                          ({"methods": ("unet", "resnet")}, "unknown method(s) ['resnet']; choose from"),
                          ({"mode": "better"}, "mode must be one of faithful, improved, got 'better'"),
                          ({"image_spacing": 0}, "image_spacing must be a finite number, positive, got 0")]:
    with pytest.raises(DataError) as refused:
      dataclasses.replace(config, **change)
    assert str(refused.value).startswith(f"sweep config: {message}"), str(refused.value)
  with pytest.raises(DataError, match=r"^c.py: split_seed must be int, got bool False$"):
    SweepConfig.from_dict({"data": "acdc", "methods": ["unet"], "split_seed": False}, "c.py")
  with pytest.raises(DataError, match=r"^c.py: unknown method\(s\) \['resnet'\]; choose from \['autosam', "):
    SweepConfig.from_dict({"data": "acdc", "methods": ["resnet"]}, "c.py")
  # paths given as Path objects are recorded as text; --set overrides are named in the refusal
  assert SweepConfig.from_dict({"data": tmp_path, "methods": ["unet"]}, "c.py").data == str(tmp_path)
  file = tmp_path / "sweep.py"
  file.write_text("def get_config():\n  return {'data': 'acdc', 'methods': ['unet']}\n")
  assert load_sweep_config(file, ["num_folds=3"]).num_folds == 3
  with pytest.raises(DataError, match=rf"^{re.escape(str(file))} with --set: num_folds must be an integer, 2 or more, "
                                     r"got 1$"):
    load_sweep_config(file, ["num_folds=1"])


def test_cells_without_an_encoder_leave_it_out_of_their_names(tmp_path):
  from autosam_jax.experiment.sweep import Cell

  unet, linear = Cell("unet", "-", 1, "f0"), Cell("linear", "vit_b", 2, "f0")
  assert (unet.cell_id, linear.cell_id) == ("unet--tr1--f0", "linear--vit_b--tr2--f0")  # not unet-----tr1--f0
  assert unet.run_dir(tmp_path) == tmp_path / "runs" / "unet" / "f0" / "tr1"  # no folder named "-"
  assert linear.run_dir(tmp_path) == tmp_path / "runs" / "linear" / "vit_b" / "f0" / "tr2"


def _record(method: str, encoder: str, tr_size: int, fold: str, dice: float) -> dict:
  figures = {"dice": {"RV": dice, "mean": dice}, "hd95": {"RV": 3.0, "mean": 3.0}}
  return {"method": method, "encoder": encoder, "tr_size": tr_size, "fold": fold, "mode": "improved",
          "test_patients": ["patient003", "patient004"], "official": figures, "standard": figures,
          "run_dir": f"runs/{method}/{encoder}/{fold}/tr{tr_size}"}


def test_reports_name_the_sam_weights_the_test_set_and_draw_error_bars_only_over_folds(tmp_path, monkeypatch):
  """results.md and the plot's title say which SAM weights made the figures (random ones are "not pretrained") and
  how many test patients they are over; one fold draws plain lines (no error bar in the legend), several draw bars."""
  from matplotlib.axes import Axes

  from autosam_jax.experiment.sweep import describe_weights, plot_dice_vs_labels, results_table, weights_text

  random_sam, real_sam = tmp_path / "demo-sam", tmp_path / "vit_b"
  for folder, info in ((random_sam, {"source": "random initialisation, seed 0 (autosam-jax demo)",
                                     "source_format": "random"}),
                       (real_sam, {"source": "/models/sam_vit_b_01ec64.pth", "source_format": "meta_pth"})):
    folder.mkdir()
    (folder / "conversion.json").write_text(json.dumps(info))
  weights = describe_weights({"sam": random_sam, "vit_b": real_sam})
  assert weights["sam"]["random"] and not weights["vit_b"]["random"]
  assert weights_text(weights) == ("SAM weights: sam = random initialisation, seed 0 (autosam-jax demo), not "
                                   "pretrained; vit_b = converted from /models/sam_vit_b_01ec64.pth")
  assert weights_text(weights, short=True) == ("SAM weights: sam = random weights, not pretrained; "
                                               "vit_b = sam_vit_b_01ec64.pth")

  one_fold = [_record("linear", "sam", t, "f0", 0.3 + 0.1 * t) for t in (1, 2)] + [_record("unet", "-", 1, "f0", 0.8)]
  table = results_table(one_fold, (1, 2), ["RV"], weights=weights)
  assert "2 test patients." in table and weights_text(weights) + "." in table

  drawn = {"errorbar": 0, "titles": []}
  monkeypatch.setattr(Axes, "errorbar", lambda self, *a, **k: drawn.__setitem__("errorbar", drawn["errorbar"] + 1))
  original_title = Axes.set_title
  monkeypatch.setattr(Axes, "set_title", lambda self, text, **k: (drawn["titles"].append(text),
                                                                    original_title(self, text, **k))[1])
  plot_dice_vs_labels(one_fold, (1, 2), tmp_path / "one.png", ["RV"], weights)
  assert drawn["errorbar"] == 0 and (tmp_path / "one.png").stat().st_size > 1000
  assert drawn["titles"] == ["Mean Dice against labeled volumes: 2 test patients, 1 fold\n"
                             + weights_text(weights, short=True)]
  two_folds = one_fold + [_record("linear", "sam", t, "f1", 0.2 + 0.1 * t) for t in (1, 2)]
  plot_dice_vs_labels(two_folds, (1, 2), tmp_path / "two.png", ["RV"], weights)
  assert drawn["errorbar"] == 1  # the linear head's two folds; the UNet's single fold stays a plain line
  assert drawn["titles"][-1].startswith("Mean Dice against labeled volumes: 2 test patients per fold, 2 folds\n")


def test_overlay_crop_and_slice_dice():
  from autosam_jax.experiment.demo import crop_box, slice_dice

  truth = np.zeros((100, 80), np.int16)
  truth[40:50, 30:36] = 1
  prediction = np.zeros_like(truth)
  prediction[45:60, 30:36] = 2
  prediction[0, 0] = 1  # a stray pixel far away: it does not undo the crop
  rows, columns = crop_box([truth, prediction])
  assert (rows.start, rows.stop) == (40 - 8, 60 + 8) and (columns.start, columns.stop) == (30 - 8, 36 + 8)
  assert crop_box([np.zeros_like(truth)]) == (slice(0, 100), slice(0, 80))
  assert slice_dice(truth, truth, [1, 2]) == 1.0  # class 2 is in neither: left out of the mean
  assert slice_dice(prediction, truth, [1, 2]) == pytest.approx(np.mean([0.0, 0.0]))
  assert slice_dice(np.zeros_like(truth), np.zeros_like(truth), [1, 2]) is None


def _fake_demo(folder: Path, unet: tuple[float, float]) -> Path:
  """A finished default demo's records, as `autosam-jax demo` leaves them, with made-up figures."""
  from autosam_jax.experiment.demo import demo_weights, sweep_config

  folder.mkdir(parents=True)
  checkpoint, name = demo_weights("auto", None)  # the default demo's SAM (LiteMedSAM where it is installed)
  (folder / "demo_config.json").write_text(json.dumps(sweep_config(folder, checkpoint, encoder_name=name)))
  cells = [_record(m, name if m != "unet" else "-", t, "cv5-seed0-fold0", d)
           for m, figures in (("autosam", (0.3, 0.25)), ("cnn", (0.1, 0.2)), ("linear", (0.33, 0.34)), ("unet", unet))
           for t, d in zip((1, 2), figures)]
  (folder / "results.json").write_text(json.dumps({"cells": cells, "finished": 8, "total": 8}))
  return folder


def test_check_readme_compares_the_demo_table_and_rewrites_it(tmp_path, capsys):
  from experiments.check_readme import main

  readme = tmp_path / "README.md"
  table = ["| method | official, 1 labeled | official, 2 labeled | standard, 1 labeled | standard, 2 labeled |",
           "|---|---:|---:|---:|---:|", "| AutoSAM | 0.300 | 0.250 | 0.300 | 0.250 |",
           "| CNN head | 0.100 | 0.200 | 0.100 | 0.200 |", "| Linear head | 0.330 | 0.340 | 0.330 | 0.340 |",
           "| UNet (scratch) | 0.707 | 0.860 | 0.707 | 0.860 |"]
  readme.write_text("# x\n\n## The demo\n\ntext\n\n" + "\n".join(table) + "\n\nafter\n")
  same = _fake_demo(tmp_path / "same", (0.707, 0.86))
  assert main([str(same), "--readme", str(readme)]) == 0
  capsys.readouterr()
  changed = _fake_demo(tmp_path / "changed", (0.854, 0.898))
  assert main([str(changed), "--readme", str(readme)]) == 1
  out = capsys.readouterr().out.strip().splitlines()
  assert out == ["README.md demo table, row 6: README has '| UNet (scratch) | 0.707 | 0.860 | 0.707 | 0.860 |', "
                 "the demo gives '| UNet (scratch) | 0.854 | 0.898 | 0.854 | 0.898 |'"]
  assert main([str(changed), "--readme", str(readme), "--write"]) == 0
  assert readme.read_text() == ("# x\n\n## The demo\n\ntext\n\n" + "\n".join(table[:-1])
                                + "\n| UNet (scratch) | 0.854 | 0.898 | 0.854 | 0.898 |\n\nafter\n")
  assert main([str(changed), "--readme", str(readme)]) == 0
  # a demo with other settings than the default is not the README's
  config = json.loads((changed / "demo_config.json").read_text())
  (changed / "demo_config.json").write_text(json.dumps({**config, "mode": "faithful"}))
  capsys.readouterr()
  assert main([str(changed), "--readme", str(readme)]) == 2
  assert "other settings than the default (mode)" in capsys.readouterr().err
