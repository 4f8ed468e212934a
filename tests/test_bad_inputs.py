"""Malformed inputs at every entry point of `autosam-jax`.

The project's standard for bad input: exactly one `error: ...` line on stderr that names the offending file (or option)
and the problem, exit code 2, no Python traceback, and nothing written (the output path does not exist afterwards, or
is unchanged if it existed). Each case below builds one malformed input from valid phantoms, a tiny converted SAM, a
tiny feature cache and a tiny trained linear head (all made once for the module), runs the command in-process through
`autosam_jax.cli.main` and checks every part of that rule. Inputs already tested at the same entry point elsewhere
(test_validate, test_conversion_errors, test_evaluate_predict, test_train, test_sweep, test_zero_shot) are not repeated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import traceback
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import TINY_CONFIGS

NAME = "dim64-win5-pad"
# A SAM whose image embedding has 128 channels (the one above has 256): a head trained on one cannot load on the other.
OTHER_NAME = "dim48-win4-nopad-smalldecoder"
GOOD_TRAIN_CONFIG = ("def get_config():\n"
                     "  return {'head': 'linear', 'variant': 'faithful', 'epochs': 1, 'batch_size': 4}\n")


# ---------------------------------------------------------------- shared set-up (once for the module)


@pytest.fixture(scope="module")
def world(tiny_world, other_weights, meta_checkpoints, tmp_path_factory):
  """The tiny world (tests/conftest.py: a synthetic ACDC folder of 3 patients, its TFDS build and feature cache, a
  split file, a trained linear head), a short test image, the Meta checkpoint the tiny SAM was converted from, and a
  SAM of another architecture."""
  root = tmp_path_factory.mktemp("bad_inputs")
  source = nib.load(tiny_world.acdc / "patient003" / "patient003_frame01.nii.gz")
  (root / "images").mkdir()
  phantom = root / "images" / "phantom.nii.gz"
  nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:, :, :2], source.affine, source.header), phantom)
  (root / "train_config.py").write_text(GOOD_TRAIN_CONFIG)
  _, meta_checkpoint = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  return SimpleNamespace(root=root, acdc=tiny_world.acdc, tfds=tiny_world.tfds, cache=tiny_world.cache,
                         split=tiny_world.split, weights=tiny_world.weights, run=tiny_world.run,
                         model=tiny_world.model, phantom=phantom, config=root / "train_config.py",
                         meta_checkpoint=meta_checkpoint, other_weights=other_weights)


@pytest.fixture(scope="module")
def other_weights(meta_checkpoints, tmp_path_factory):
  """A converted SAM of another architecture (128-channel embeddings)."""
  from weights_conversion import convert

  _, checkpoint = meta_checkpoints(OTHER_NAME, TINY_CONFIGS[OTHER_NAME])
  weights, _ = convert(checkpoint, tmp_path_factory.mktemp("other_weights") / "converted")
  return Path(weights)


# ---------------------------------------------------------------- the rule


@dataclasses.dataclass
class Refusal:
  """A command line that must be refused: `named` must appear in the error line (with every fragment of `problem`),
  and every path of `outputs` must be left as it was (absent, or with the same contents)."""
  argv: list[str]
  named: str
  outputs: list[Path]
  problem: tuple[str, ...] = ()


def _snapshot(path: Path):
  if not path.exists():
    return None
  if path.is_file():
    return path.read_bytes()
  return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else "dir" for p in sorted(path.rglob("*"))}


def _leftovers(path: Path) -> list[str]:
  """Temporary siblings (.NAME.partial-*, .NAME.*.tmp) a refused command must not leave behind."""
  if not path.parent.is_dir():
    return []
  return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def assert_refused(capsys, refusal: Refusal) -> None:
  from autosam_jax.cli import main

  capsys.readouterr()
  before = {path: _snapshot(path) for path in refusal.outputs}
  problems = []
  try:
    code = main([str(a) for a in refusal.argv])
  except SystemExit as exit_:
    code = exit_.code
  except Exception as err:  # noqa: BLE001 -- what a user would see as a traceback
    code = None
    frames = traceback.extract_tb(err.__traceback__)
    problems.append(f"uncaught {type(err).__name__}: {' '.join(str(err).split())[:300]} (raised at "
                    f"{Path(frames[-1].filename).name}:{frames[-1].lineno}; the user gets a traceback)")
  err_text = capsys.readouterr().err
  lines = err_text.strip().splitlines()
  if code is not None and code != 2:
    problems.append(f"exit code {code!r}, expected 2")
  if "Traceback (most recent call last)" in err_text:
    problems.append("a traceback on stderr")
  if code is not None:
    if len(lines) != 1:
      problems.append(f"{len(lines)} lines on stderr, expected exactly one: {lines[:4]}")
    elif not lines[0].startswith("error: "):
      problems.append(f"the stderr line does not start with 'error: ': {lines[0]!r}")
    else:
      for fragment in (refusal.named, *refusal.problem):
        if fragment not in lines[0]:
          problems.append(f"{fragment!r} is not in the error line {lines[0]!r}")
  for path, old in before.items():
    new = _snapshot(path)
    if new != old:
      state = "created" if old is None else "changed"
      listing = sorted(new)[:6] if isinstance(new, dict) else ""
      problems.append(f"{path} was {state} by a refused command {listing}")
    leftovers = _leftovers(path)
    if leftovers:
      problems.append(f"temporary files left beside {path}: {leftovers}")
  assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- helpers to break things


def _copy_acdc(world, tmp_path) -> Path:
  return Path(shutil.copytree(world.acdc, tmp_path / "acdc"))


def _image(acdc: Path, patient: str = "patient002", frame: int = 1) -> Path:
  return acdc / patient / f"{patient}_frame{frame:02d}.nii.gz"


def _label(acdc: Path, patient: str = "patient002", frame: int = 1) -> Path:
  return acdc / patient / f"{patient}_frame{frame:02d}_gt.nii.gz"


def _resave(path: Path, transform) -> Path:
  """Rewrites a NIfTI file after `transform(data, affine, zooms) -> (data, affine, zooms)`."""
  from autosam_jax.data.synthetic import save_nifti

  volume = nib.load(path)
  data, affine, zooms = transform(np.asanyarray(volume.dataobj), volume.affine.copy(), volume.header.get_zooms())
  save_nifti(path, data, affine, tuple(float(z) for z in zooms))
  return path


def _shape_mismatch(acdc: Path) -> Path:
  return _resave(_label(acdc), lambda data, affine, zooms: (data[:-4], affine, zooms))


def _label_seven(acdc: Path) -> Path:
  def insert(data, affine, zooms):
    data = data.copy()
    data[3, 4, 0] = 7
    return data, affine, zooms
  return _resave(_label(acdc), insert)


def _spacing_mismatch(acdc: Path) -> Path:
  def wider(data, affine, zooms):  # pixdim and the sform both: a label whose header contradicts itself is refused
    affine[:3, 0] *= 1.1            # for that, before its spacing is compared with the image's
    return data, affine, (zooms[0] * 1.1, zooms[1], zooms[2])
  return _resave(_label(acdc), wider)


def _truncate(path: Path, keep: float = 0.5) -> Path:
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  return path


def _write_image(path: Path, data: np.ndarray, like: Path) -> Path:
  """Saves `data` with the affine of the image `like`."""
  nib.save(nib.Nifti1Image(data, nib.load(like).affine), path)
  return path


def _predict(world, image: Path, out: Path) -> list:
  return ["predict", "--model", world.model, "--weights", world.weights, "--input", image, "--output", out]


def _precompute(world, data: Path, out: Path, tfds: Path, *extra) -> list:
  return ["precompute", "--data", data, "--tfds-dir", tfds, "--weights", world.weights, "--out", out, "--dtype",
          "fp32", "--shard-size", "32", *extra]


def _train(world, out: Path, *, config=None, cache=None, splits=None, tr_size="1", extra=()) -> list:
  return ["train", "--config", config or world.config, "--cache", cache or world.cache, "--weights", world.weights,
          "--splits", splits or world.split, "--tr-size", tr_size, "--out", out, *extra]


def _evaluate(world, out: Path, *, cache=None, splits=None) -> list:
  return ["evaluate", "--model", world.model, "--weights", world.weights, "--cache", cache or world.cache, "--data",
          world.acdc, "--tfds-dir", world.tfds, "--splits", splits or world.split, "--out", out]


def _cache_copy(world, tmp_path, name: str = "cache") -> Path:
  return Path(shutil.copytree(world.cache, tmp_path / name))


def _py(tmp_path, name: str, text: str) -> Path:
  path = tmp_path / name
  path.write_text(text)
  return path


def _split_file(tmp_path, name: str, train, val, test) -> Path:
  path = tmp_path / name
  path.write_text(json.dumps({"name": "hand", "seed": None, "train": list(train), "val": list(val),
                              "test": list(test)}))
  return path


# ---------------------------------------------------------------- NIfTI files


def nan_image_to_predict(world, tmp_path):
  data = np.asarray(nib.load(world.phantom).dataobj, np.float32)
  image = _write_image(tmp_path / "nan.nii.gz", np.full_like(data, np.nan), world.phantom)
  return Refusal(_predict(world, image, tmp_path / "out"), image.name, [tmp_path / "out"], ("NaN or Inf",))


def image_2d_to_predict(world, tmp_path):
  image = _write_image(tmp_path / "flat.nii.gz", np.asarray(nib.load(world.phantom).dataobj)[:, :, 0],
                       world.phantom)
  return Refusal(_predict(world, image, tmp_path / "out"), image.name, [tmp_path / "out"], ("2D volume",))


def image_4d_to_predict(world, tmp_path):
  data = np.asarray(nib.load(world.phantom).dataobj)
  image = _write_image(tmp_path / "cine.nii.gz", np.stack([data, data, data], axis=-1), world.phantom)
  return Refusal(_predict(world, image, tmp_path / "out"), image.name, [tmp_path / "out"], ("4D volume",))


def nan_voxel_spacing_to_predict(world, tmp_path):
  import struct

  # nibabel replaces a zero or negative pixdim when it loads a file, but passes NaN through
  image = _write_image(tmp_path / "nan_spacing.nii", np.asarray(nib.load(world.phantom).dataobj), world.phantom)
  content = bytearray(image.read_bytes())
  content[80:84] = struct.pack("<f", float("nan"))  # pixdim[1] of the NIfTI-1 header
  image.write_bytes(bytes(content))
  return Refusal(_predict(world, image, tmp_path / "out"), image.name, [tmp_path / "out"], ("voxel spacing",))


def not_a_nifti_file_to_predict(world, tmp_path):
  image = tmp_path / "scan.png"
  image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
  return Refusal(_predict(world, image, tmp_path / "out"), image.name, [tmp_path / "out"], ("not a NIfTI file",))


def empty_input_folder_to_predict(world, tmp_path):
  folder = tmp_path / "scans"
  folder.mkdir()
  (folder / "notes.txt").write_text("no images here\n")
  return Refusal(_predict(world, folder, tmp_path / "out"), folder.name, [tmp_path / "out"], ("no .nii",))


def output_is_the_input_folder_to_predict(world, tmp_path):
  folder = tmp_path / "scans"
  folder.mkdir()
  image = Path(shutil.copy(world.phantom, folder / "phantom.nii.gz"))
  return Refusal(_predict(world, folder, folder), image.name, [folder], ("overwrite",))


def label_shape_mismatch_to_build_dataset(world, tmp_path):
  label = _shape_mismatch(_copy_acdc(world, tmp_path))
  return Refusal(["build-dataset", "acdc", tmp_path / "acdc", "--data-dir", tmp_path / "tfds"], str(label),
                 [tmp_path / "tfds"], ("label shape",))


def label_value_7_to_build_dataset(world, tmp_path):
  label = _label_seven(_copy_acdc(world, tmp_path))
  return Refusal(["build-dataset", "acdc", tmp_path / "acdc", "--data-dir", tmp_path / "tfds"], str(label),
                 [tmp_path / "tfds"], ("unexpected label values 7",))


def empty_folder_to_build_dataset(world, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  return Refusal(["build-dataset", "acdc", empty, "--data-dir", tmp_path / "tfds"], str(empty), [tmp_path / "tfds"],
                 ("empty",))


def label_shape_mismatch_to_precompute(world, tmp_path):
  label = _shape_mismatch(_copy_acdc(world, tmp_path))
  return Refusal(_precompute(world, tmp_path / "acdc", tmp_path / "cache", tmp_path / "tfds"), str(label),
                 [tmp_path / "cache", tmp_path / "tfds"], ("label shape",))


def label_value_7_to_precompute(world, tmp_path):
  label = _label_seven(_copy_acdc(world, tmp_path))
  return Refusal(_precompute(world, tmp_path / "acdc", tmp_path / "cache", tmp_path / "tfds"), str(label),
                 [tmp_path / "cache", tmp_path / "tfds"], ("unexpected label values 7",))


def spacing_mismatch_to_precompute(world, tmp_path):
  label = _spacing_mismatch(_copy_acdc(world, tmp_path))
  return Refusal(_precompute(world, tmp_path / "acdc", tmp_path / "cache", tmp_path / "tfds"), str(label),
                 [tmp_path / "cache", tmp_path / "tfds"], ("voxel spacing",))


def truncated_image_to_make_splits(world, tmp_path):
  image = _truncate(_image(_copy_acdc(world, tmp_path), "patient003"))
  out = tmp_path / "splits.json"
  out.write_text('{"kept": "an earlier file"}\n')  # an existing output must stay as it was
  return Refusal(["make-splits", tmp_path / "acdc", "--protocol", "cv", "--folds", "3", "--out", out], str(image),
                 [out], ("truncated or corrupt",))


def truncated_label_to_image_cache(world, tmp_path):
  label = _truncate(_label(_copy_acdc(world, tmp_path), "patient001"))
  return Refusal(["image-cache", "--data", tmp_path / "acdc", "--tfds-dir", tmp_path / "tfds", "--out",
                  tmp_path / "images"], str(label), [tmp_path / "images", tmp_path / "tfds"], ("truncated or corrupt",))


def nifti_file_to_validate(world, tmp_path):
  image = _image(world.acdc)
  return Refusal(["validate", image], str(image), [], ("is a file",))


NIFTI_CASES = {f.__name__.replace("_", "-"): f for f in (
    nan_image_to_predict, image_2d_to_predict, image_4d_to_predict, nan_voxel_spacing_to_predict,
    not_a_nifti_file_to_predict, empty_input_folder_to_predict, output_is_the_input_folder_to_predict,
    label_shape_mismatch_to_build_dataset, label_value_7_to_build_dataset, empty_folder_to_build_dataset,
    label_shape_mismatch_to_precompute, label_value_7_to_precompute, spacing_mismatch_to_precompute,
    truncated_image_to_make_splits, truncated_label_to_image_cache, nifti_file_to_validate)}


@pytest.mark.parametrize("case", list(NIFTI_CASES))
def test_bad_nifti_input(world, tmp_path, capsys, case):
  assert_refused(capsys, NIFTI_CASES[case](world, tmp_path))


# ---------------------------------------------------------------- checkpoints and converted weights


def truncated_meta_pth_to_convert(world, tmp_path):
  checkpoint = tmp_path / "sam_truncated.pth"
  checkpoint.write_bytes(world.meta_checkpoint.read_bytes()[:world.meta_checkpoint.stat().st_size // 3])
  return Refusal(["convert", checkpoint, tmp_path / "converted"], checkpoint.name, [tmp_path / "converted"],
                 ("truncated or corrupt",))


def sam2_hiera_checkpoint_to_convert(world, tmp_path):
  import torch

  # SAM 2's image encoder is a Hiera trunk with an FPN neck: image_encoder.* keys, but no ViT blocks of SAM's shape.
  checkpoint = tmp_path / "sam2_hiera_tiny.pt"
  torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7),
                        "image_encoder.trunk.blocks.0.attn.qkv.weight": torch.zeros(288, 96),
                        "image_encoder.neck.convs.0.conv.weight": torch.zeros(256, 768, 1, 1),
                        "sam_mask_decoder.iou_token.weight": torch.zeros(1, 256)}}, checkpoint)
  return Refusal(["convert", checkpoint, tmp_path / "converted"], checkpoint.name, [tmp_path / "converted"])


def list_of_tensors_to_convert(world, tmp_path):
  import torch

  checkpoint = tmp_path / "tensors.pth"
  torch.save([torch.zeros(3, 3), torch.ones(2)], checkpoint)
  return Refusal(["convert", checkpoint, tmp_path / "converted"], checkpoint.name, [tmp_path / "converted"],
                 ("not a state dict",))


def truncated_safetensors_to_convert(world, tmp_path):
  from safetensors.numpy import save_file

  checkpoint = tmp_path / "model.safetensors"
  save_file({"image_encoder.patch_embed.proj.weight": np.zeros((64, 3, 16, 16), np.float32)}, str(checkpoint))
  _truncate(checkpoint, 0.6)
  return Refusal(["convert", checkpoint, tmp_path / "converted"], checkpoint.name, [tmp_path / "converted"],
                 ("truncated or corrupt",))


def decoder_heads_not_dividing_to_convert(world, tmp_path):
  # 7 heads cannot split the decoder's 256 channels
  return Refusal(["convert", world.meta_checkpoint, tmp_path / "converted", "--decoder-num-heads", "7"],
                 "--decoder-num-heads", [tmp_path / "converted"], (world.meta_checkpoint.name,))


def weights_without_params_to_precompute(world, tmp_path):
  weights = Path(shutil.copytree(world.weights, tmp_path / "weights"))
  shutil.rmtree(weights / "params")
  argv = _precompute(world, world.acdc, tmp_path / "cache", world.tfds)
  argv[argv.index("--weights") + 1] = weights
  return Refusal(argv, str(weights / "params"), [tmp_path / "cache"], ("missing",))


def weights_without_params_to_predict(world, tmp_path):
  weights = Path(shutil.copytree(world.weights, tmp_path / "weights"))
  shutil.rmtree(weights / "params")
  argv = _predict(world, world.phantom, tmp_path / "out")
  argv[argv.index("--weights") + 1] = weights
  return Refusal(argv, str(weights / "params"), [tmp_path / "out"], ("missing",))


def weights_without_params_to_zero_shot(world, tmp_path):
  weights = Path(shutil.copytree(world.weights, tmp_path / "weights"))
  shutil.rmtree(weights / "params")
  return Refusal(["zero-shot", "--weights", weights, "--data", world.acdc, "--tfds-dir", world.tfds, "--splits",
                  world.split, "--out", tmp_path / "out"], str(weights / "params"), [tmp_path / "out"], ("missing",))


def weights_of_another_sam_to_predict(world, tmp_path):
  argv = _predict(world, world.phantom, tmp_path / "out")
  argv[argv.index("--weights") + 1] = world.other_weights
  # The model records the encoder (and the digest of the weights) its cache was computed with: refused before any
  # restore, naming both encoders.
  return Refusal(argv, world.model.name, [tmp_path / "out"],
                 ("holds SAM ViT (width 48, depth 4) at 256 px", "was trained on SAM ViT (width 64, depth 2)"))


def run_directory_instead_of_model_to_predict(world, tmp_path):
  argv = _predict(world, world.phantom, tmp_path / "out")
  argv[argv.index("--model") + 1] = world.run
  return Refusal(argv, str(world.run / "train_config.json"), [tmp_path / "out"], ("final_model",))


CHECKPOINT_CASES = {f.__name__.replace("_", "-"): f for f in (
    truncated_meta_pth_to_convert, sam2_hiera_checkpoint_to_convert, list_of_tensors_to_convert,
    truncated_safetensors_to_convert, decoder_heads_not_dividing_to_convert, weights_without_params_to_precompute,
    weights_without_params_to_predict, weights_without_params_to_zero_shot, weights_of_another_sam_to_predict,
    run_directory_instead_of_model_to_predict)}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint(world, tmp_path, capsys, case):
  assert_refused(capsys, CHECKPOINT_CASES[case](world, tmp_path))


# ---------------------------------------------------------------- config files and options


def unknown_key_in_train_config(world, tmp_path):
  config = _py(tmp_path, "typo.py",
               "def get_config():\n  return {'head': 'linear', 'epochs': 1, 'learnin_rate': 1e-3}\n")
  return Refusal(_train(world, tmp_path / "run", config=config), config.name, [tmp_path / "run"], ("learnin_rate",))


def wrong_type_in_train_config(world, tmp_path):
  config = _py(tmp_path, "words.py", "def get_config():\n  return {'head': 'linear', 'epochs': 'ten'}\n")
  return Refusal(_train(world, tmp_path / "run", config=config), config.name, [tmp_path / "run"],
                 ("epochs must be int",))


def train_config_without_get_config(world, tmp_path):
  config = _py(tmp_path, "no_function.py", "CONFIG = {'head': 'linear', 'epochs': 1}\n")
  return Refusal(_train(world, tmp_path / "run", config=config), config.name, [tmp_path / "run"], ("get_config",))


def syntax_error_in_train_config(world, tmp_path):
  config = _py(tmp_path, "broken.py", "def get_config():\n  return {'head': 'linear', 'epochs': 1\n")
  return Refusal(_train(world, tmp_path / "run", config=config), config.name, [tmp_path / "run"])


def get_config_returning_nothing(world, tmp_path):
  config = _py(tmp_path, "no_return.py", "def get_config():\n  values = {'head': 'linear', 'epochs': 1}\n")
  return Refusal(_train(world, tmp_path / "run", config=config), config.name, [tmp_path / "run"])


def set_without_a_value_to_train(world, tmp_path):
  # `--set epochs` (no '=') is refused by pretrain-simclr and sweep as "--set 'epochs': expected NAME=VALUE"
  return Refusal(_train(world, tmp_path / "run", extra=("--set", "epochs")), "--set", [tmp_path / "run"],
                 ("epochs",))


def syntax_error_in_sweep_config(world, tmp_path):
  config = _py(tmp_path, "sweep_broken.py", "def get_config():\n  return {'data': %r, 'methods': ['unet']]\n"
               % str(world.acdc))
  return Refusal(["sweep", "--config", config, "--out", tmp_path / "sweep"], config.name, [tmp_path / "sweep"])


def unknown_method_in_sweep_config(world, tmp_path):
  config = _py(tmp_path, "sweep_typo.py", "def get_config():\n  return {'data': %r, 'methods': ['unet', 'resnet50'], "
               "'tr_sizes': [1]}\n" % str(world.acdc))
  return Refusal(["sweep", "--config", config, "--out", tmp_path / "sweep"], config.name, [tmp_path / "sweep"],
                 ("resnet50",))


def wrong_type_in_sweep_config(world, tmp_path):
  config = _py(tmp_path, "sweep_words.py", "def get_config():\n  return {'data': %r, 'methods': ['unet'], "
               "'num_folds': 'five'}\n" % str(world.acdc))
  return Refusal(["sweep", "--config", config, "--out", tmp_path / "sweep"], config.name, [tmp_path / "sweep"],
                 ("num_folds",))


def wrong_type_in_simclr_config(world, tmp_path):
  config = _py(tmp_path, "simclr_words.py", "def get_config():\n  return {'epochs': 'ten'}\n")
  return Refusal(["pretrain-simclr", "--config", config, "--cache", world.cache, "--splits", world.split, "--out",
                  tmp_path / "simclr"], config.name, [tmp_path / "simclr"], ("epochs",))


def keyboard_interrupt_in_train_config(world, tmp_path):
  # raised by the file's code, not a Ctrl-C: the file's error (a real Ctrl-C: test_faults)
  config = _py(tmp_path, "interrupting.py", "raise KeyboardInterrupt\n")
  return Refusal(_train(world, tmp_path / "run", config=config), config.name, [tmp_path / "run"],
                 ("KeyboardInterrupt",))


def keyboard_interrupt_in_get_config(world, tmp_path):
  config = _py(tmp_path, "interrupting.py", "def get_config():\n  raise KeyboardInterrupt('stop')\n")
  return Refusal(_train(world, tmp_path / "run", config=config), config.name, [tmp_path / "run"],
                 ("get_config()", "KeyboardInterrupt"))


def sys_exit_0_in_train_config(world, tmp_path):
  # without the check `train` ended with exit code 0, having trained nothing
  config = _py(tmp_path, "exiting.py", "import sys\nsys.exit(0)\n")
  return Refusal(_train(world, tmp_path / "run", config=config), config.name, [tmp_path / "run"], ("sys.exit(0)",))


def sys_exit_in_get_config_of_sweep(world, tmp_path):
  config = _py(tmp_path, "exiting.py", "import sys\ndef get_config():\n  sys.exit('no sweep today')\n")
  return Refusal(["sweep", "--config", config, "--out", tmp_path / "sweep"], config.name, [tmp_path / "sweep"],
                 ("sys.exit('no sweep today')",))


def over_long_set_value_to_train(world, tmp_path):
  # 100,000 characters: parsing such a value as a Python literal raised MemoryError
  return Refusal(_train(world, tmp_path / "run", extra=("--set", "epochs=" + "-" * 99_999 + "1")), "--set",
                 [tmp_path / "run"], ("100,007 characters", "config file"))


def deeply_nested_set_value_to_train(world, tmp_path):
  return Refusal(_train(world, tmp_path / "run", extra=("--set", "epochs=" + "-" * 9_000 + "1")), "--set",
                 [tmp_path / "run"], ("nested too deeply",))


CONFIG_CASES = {f.__name__.replace("_", "-"): f for f in (
    unknown_key_in_train_config, wrong_type_in_train_config, train_config_without_get_config,
    syntax_error_in_train_config, get_config_returning_nothing, set_without_a_value_to_train,
    syntax_error_in_sweep_config, unknown_method_in_sweep_config, wrong_type_in_sweep_config,
    wrong_type_in_simclr_config, keyboard_interrupt_in_train_config, keyboard_interrupt_in_get_config,
    sys_exit_0_in_train_config, sys_exit_in_get_config_of_sweep, over_long_set_value_to_train,
    deeply_nested_set_value_to_train)}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(world, tmp_path, capsys, case):
  assert_refused(capsys, CONFIG_CASES[case](world, tmp_path))


# ---------------------------------------------------------------- split files


def split_naming_a_missing_patient_to_train(world, tmp_path):
  splits = _split_file(tmp_path, "gone.json", ["patient042"], ["patient002"], ["patient003"])
  return Refusal(_train(world, tmp_path / "run", splits=splits), "patient042", [tmp_path / "run"])


def tr_size_zero_to_train(world, tmp_path):
  return Refusal(_train(world, tmp_path / "run", tr_size="0"), "tr_size", [tmp_path / "run"], ("positive",))


def patient_in_train_and_test_to_train(world, tmp_path):
  splits = _split_file(tmp_path, "overlap.json", ["patient001", "patient003"], ["patient002"], ["patient003"])
  return Refusal(_train(world, tmp_path / "run", splits=splits), splits.name, [tmp_path / "run"],
                 ("patient003", "train and test"))


def malformed_json_split_to_evaluate(world, tmp_path):
  splits = _py(tmp_path, "broken.json", '{"train": ["patient001"], "val": [], "test": ["patient003"],}')
  return Refusal(_evaluate(world, tmp_path / "eval", splits=splits), splits.name, [tmp_path / "eval"],
                 ("not valid JSON",))


def malformed_json_split_to_precompute(world, tmp_path):
  splits = _py(tmp_path, "broken.json", '{"train": ["patient001"]')
  return Refusal(_precompute(world, world.acdc, tmp_path / "cache", world.tfds, "--views", "1", "--splits", splits),
                 splits.name, [tmp_path / "cache"], ("not valid JSON",))


def unknown_fold_to_zero_shot(world, tmp_path):
  return Refusal(["zero-shot", "--weights", world.weights, "--data", world.acdc, "--tfds-dir", world.tfds, "--splits",
                  world.split, "--fold", "fold7", "--out", tmp_path / "out"], "fold7", [tmp_path / "out"],
                 (world.split.name,))


def more_folds_than_patients_to_make_splits(world, tmp_path):
  return Refusal(["make-splits", world.acdc, "--protocol", "cv", "--folds", "9", "--out", tmp_path / "cv.json"],
                 "folds", [tmp_path / "cv.json"], ("9",))


SPLIT_CASES = {f.__name__.replace("_", "-"): f for f in (
    split_naming_a_missing_patient_to_train, tr_size_zero_to_train, patient_in_train_and_test_to_train,
    malformed_json_split_to_evaluate, malformed_json_split_to_precompute, unknown_fold_to_zero_shot,
    more_folds_than_patients_to_make_splits)}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_bad_split(world, tmp_path, capsys, case):
  assert_refused(capsys, SPLIT_CASES[case](world, tmp_path))


# ---------------------------------------------------------------- datasets, caches and runs


def cache_of_other_weights_to_evaluate(world, tmp_path):
  """The cache's manifest records the SHA-256 of the checkpoint its embeddings came from; here it is that of another
  checkpoint of the same architecture (what a cache computed from other weights records)."""
  cache = _cache_copy(world, tmp_path, "cache_other_weights")
  manifest = json.loads((cache / "manifest.json").read_text())
  manifest["depends_on"]["weights_sha256"] = "0" * 64
  (cache / "manifest.json").write_text(json.dumps(manifest))
  return Refusal(_evaluate(world, tmp_path / "eval", cache=cache), cache.name, [tmp_path / "eval"])


def cache_missing_a_shard_file_to_train(world, tmp_path):
  cache = _cache_copy(world, tmp_path)
  (cache / "shards" / "00000.emb.npy").unlink()
  return Refusal(_train(world, tmp_path / "run", cache=cache), "00000.emb.npy", [tmp_path / "run"], ("missing",))


def cache_missing_a_shard_file_to_evaluate(world, tmp_path):
  cache = _cache_copy(world, tmp_path)
  # the test patient (patient003) has the last items, in the last shard
  last = sorted((cache / "shards").glob("*.emb.npy"))[-1]
  last.unlink()
  return Refusal(_evaluate(world, tmp_path / "eval", cache=cache), last.name, [tmp_path / "eval"], ("missing",))


def incomplete_cache_to_train(world, tmp_path):
  cache = _cache_copy(world, tmp_path)
  manifest = json.loads((cache / "manifest.json").read_text())
  (cache / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
  return Refusal(_train(world, tmp_path / "run", cache=cache), cache.name, [tmp_path / "run"], ("incomplete",))


def sam_feature_cache_to_pretrain_simclr(world, tmp_path):
  return Refusal(["pretrain-simclr", "--cache", world.cache, "--splits", world.split, "--out", tmp_path / "simclr",
                  "--set", "epochs=1"], str(world.cache), [tmp_path / "simclr"], ("image cache",))


def shard_size_zero_to_precompute(world, tmp_path):
  argv = _precompute(world, world.acdc, tmp_path / "cache", world.tfds)
  argv[argv.index("--shard-size") + 1] = "0"
  return Refusal(argv, "--shard-size", [tmp_path / "cache"], ("positive",))


def batch_size_zero_to_precompute(world, tmp_path):
  return Refusal(_precompute(world, world.acdc, tmp_path / "cache", world.tfds, "--batch-size", "0"), "--batch-size",
                 [tmp_path / "cache"], ("positive",))


def output_path_is_a_file_to_synth_acdc(world, tmp_path):
  out = tmp_path / "phantoms"
  out.write_text("a file of the user's\n")
  return Refusal(["synth-acdc", out, "--patients", "1"], out.name, [out], ("already exists",))


def missing_checkpoint_to_demo(world, tmp_path):
  checkpoint = tmp_path / "sam_vit_b_01ec64.pth"
  return Refusal(["demo", "--out", tmp_path / "demo", "--checkpoint", checkpoint, "--no-progress"], checkpoint.name,
                 [tmp_path / "demo"], ("not found",))


def users_folder_to_demo(world, tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("the user's notes\n")
  return Refusal(["demo", "--out", out, "--no-progress"], str(out), [out], ("is not empty (notes.txt)",))


def _replace_shard_part(cache: Path, name: str, array: np.ndarray) -> Path:
  """Replaces a shard file by `array` and records its checksum, as a damaged copy with a matching record would be."""
  from autosam_jax.outputs import file_digest

  path = cache / "shards" / name
  np.save(path, array)
  record = cache / "shards" / f"{name.split('.')[0]}.done"
  record.write_text(json.dumps({**json.loads(record.read_text()), name.split(".")[1]: file_digest(path)}))
  return path


def shard_with_rows_missing_to_train(world, tmp_path):
  cache = _cache_copy(world, tmp_path)
  shard = cache / "shards" / "00000.emb.npy"
  path = _replace_shard_part(cache, shard.name, np.load(shard)[:3])  # an IndexError at the 4th item before
  return Refusal(_train(world, tmp_path / "run", cache=cache), str(path), [tmp_path / "run"],
                 ("(3, ", "damaged", "new directory"))


def shard_with_other_channels_to_evaluate(world, tmp_path):
  cache = _cache_copy(world, tmp_path)
  last = sorted((cache / "shards").glob("*.emb.npy"))[-1]  # the test patient's slices
  embeddings = np.load(last)
  path = _replace_shard_part(cache, last.name, np.ascontiguousarray(embeddings[..., :embeddings.shape[-1] // 2]))
  return Refusal(_evaluate(world, tmp_path / "eval", cache=cache), str(path), [tmp_path / "eval"],
                 ("as in shard 00000", "damaged"))


def out_is_a_file_to_demo(world, tmp_path):
  out = _py(tmp_path, "demo", "a file of the user's\n")
  return Refusal(["demo", "--out", out, "--no-progress"], str(out), [out], ("is a file, not a folder",))


DATA_CASES = {f.__name__.replace("_", "-"): f for f in (
    cache_of_other_weights_to_evaluate, cache_missing_a_shard_file_to_train, cache_missing_a_shard_file_to_evaluate,
    incomplete_cache_to_train, sam_feature_cache_to_pretrain_simclr, shard_size_zero_to_precompute,
    batch_size_zero_to_precompute, output_path_is_a_file_to_synth_acdc, missing_checkpoint_to_demo,
    users_folder_to_demo, shard_with_rows_missing_to_train, shard_with_other_channels_to_evaluate,
    out_is_a_file_to_demo)}


@pytest.fixture
def restore_jax_cache_options():
  """`demo` points JAX's persistent compilation cache at its output folder; the other tests must not inherit that."""
  import jax

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {name: getattr(jax.config, name) for name in names}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_or_cache(world, tmp_path, capsys, restore_jax_cache_options, case):
  assert_refused(capsys, DATA_CASES[case](world, tmp_path))


# ---------------------------------------------------------------- outputs, integrity and misuse


def _hf_folder(world, tmp_path, index_text: str | None) -> Path:
  """A Hugging Face model folder: one shard and (if given) model.safetensors.index.json with `index_text`."""
  from safetensors.numpy import save_file

  folder = tmp_path / "hf_model"
  folder.mkdir()
  save_file({"vision_encoder.patch_embed.projection.weight": np.zeros((64, 3, 16, 16), np.float32)},
            str(folder / "model-00001-of-00001.safetensors"))
  if index_text is not None:
    (folder / "model.safetensors.index.json").write_text(index_text)
  return folder


def malformed_hf_index_to_convert(world, tmp_path):
  folder = _hf_folder(world, tmp_path, '{"weight_map": {"a": ')
  return Refusal(["convert", folder, tmp_path / "converted"], "model.safetensors.index.json", [tmp_path / "converted"],
                 ("unreadable",))


def hf_index_without_weight_map_to_convert(world, tmp_path):
  folder = _hf_folder(world, tmp_path, '{"metadata": {"total_size": 10}}')
  return Refusal(["convert", folder, tmp_path / "converted"], "model.safetensors.index.json", [tmp_path / "converted"],
                 ("no weight_map",))


def hf_index_naming_a_missing_shard_to_convert(world, tmp_path):
  folder = _hf_folder(world, tmp_path, json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
  return Refusal(["convert", folder, tmp_path / "converted"], "model-00002-of-00002.safetensors",
                 [tmp_path / "converted"], ("missing",))


def hf_index_is_a_list_to_convert(world, tmp_path):
  folder = _hf_folder(world, tmp_path, "[]")
  return Refusal(["convert", folder, tmp_path / "converted"], "model.safetensors.index.json", [tmp_path / "converted"],
                 ("not a JSON object",))


def overwrite_of_the_checkpoints_folder_to_convert(world, tmp_path):
  folder = tmp_path / "downloads"
  folder.mkdir()
  checkpoint = Path(shutil.copy(world.meta_checkpoint, folder / "sam.pth"))
  return Refusal(["convert", checkpoint, folder, "--overwrite"], str(folder), [folder], ("holds the input",))


def overwrite_of_a_users_folder_to_convert(world, tmp_path):
  folder = tmp_path / "results"
  folder.mkdir()
  (folder / "notes.txt").write_text("the user's notes")
  return Refusal(["convert", world.meta_checkpoint, folder, "--overwrite"], str(folder), [folder],
                 ("was not written by autosam-jax convert",))


def converted_weights_with_flipped_bytes_to_predict(world, tmp_path):
  weights = Path(shutil.copytree(world.weights, tmp_path / "weights"))
  target = max((p for p in (weights / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
  target.write_bytes(bytes(data))
  argv = _predict(world, world.phantom, tmp_path / "out")
  argv[argv.index("--weights") + 1] = weights
  return Refusal(argv, str(target), [tmp_path / "out"], ("checksum mismatch",))


def model_with_a_changed_config_to_predict(world, tmp_path):
  model = Path(shutil.copytree(world.model, tmp_path / "model"))
  config = json.loads((model / "train_config.json").read_text())
  (model / "train_config.json").write_text(json.dumps({**config, "seed": 5}))
  argv = _predict(world, world.phantom, tmp_path / "out")
  argv[argv.index("--model") + 1] = model
  return Refusal(argv, str(model / "train_config.json"), [tmp_path / "out"], ("checksum mismatch",))


def out_is_a_file_to_train(world, tmp_path):
  out = _py(tmp_path, "run", "a file of the user's\n")
  return Refusal(_train(world, out), str(out), [out], ("is a file, not a folder",))


def out_is_a_file_to_evaluate(world, tmp_path):
  out = _py(tmp_path, "eval", "a file of the user's\n")
  return Refusal(_evaluate(world, out), str(out), [out], ("is a file, not a folder",))


def output_is_a_file_to_predict(world, tmp_path):
  out = _py(tmp_path, "labels", "a file of the user's\n")
  return Refusal(_predict(world, world.phantom, out), str(out), [out], ("is a file, not a folder",))


def out_is_a_users_folder_to_train(world, tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "metrics.jsonl").write_text("the user's own log\n")
  return Refusal(_train(world, out), str(out), [out], ("is not empty", "metrics.jsonl"))


def linear_head_on_an_image_cache_to_train(world, tmp_path):
  cache = _cache_copy(world, tmp_path)
  manifest = json.loads((cache / "manifest.json").read_text())
  manifest["depends_on"]["kind"] = "images"  # what an image cache records
  (cache / "manifest.json").write_text(json.dumps(manifest))
  return Refusal(_train(world, tmp_path / "run", cache=cache), str(cache), [tmp_path / "run"], ("model images",))


def unet_on_a_feature_cache_to_train(world, tmp_path):
  config = _py(tmp_path, "unet.py", "def get_config():\n  return {'head': 'unet', 'epochs': 1}\n")
  return Refusal(_train(world, tmp_path / "run", config=config), str(world.cache), [tmp_path / "run"],
                 ("SAM embeddings", "image-cache"))


def negative_seed_to_train(world, tmp_path):
  return Refusal(_train(world, tmp_path / "run", extra=("--set", "seed=-1")), "seed", [tmp_path / "run"],
                 ("0 or more",))


def negative_learning_rate_to_train(world, tmp_path):
  return Refusal(_train(world, tmp_path / "run", extra=("--set", "learning_rate=-1")), "learning_rate",
                 [tmp_path / "run"], ("positive",))


def unknown_scheduler_to_train(world, tmp_path):
  return Refusal(_train(world, tmp_path / "run", extra=("--set", "scheduler='step'")), "scheduler",
                 [tmp_path / "run"], ("plateau_train_loss",))


def bool_for_epochs_to_train(world, tmp_path):
  return Refusal(_train(world, tmp_path / "run", extra=("--set", "epochs=True")), "epochs", [tmp_path / "run"],
                 ("must be int",))


def negative_checkpoint_every_steps_to_train(world, tmp_path):
  return Refusal(_train(world, tmp_path / "run", extra=("--set", "checkpoint_every_steps=-1")),
                 "checkpoint_every_steps", [tmp_path / "run"], ("0 or more",))


def int_for_a_bool_to_train(world, tmp_path):
  return Refusal(_train(world, tmp_path / "run", extra=("--set", "joint=1")), "joint", [tmp_path / "run"],
                 ("must be bool",))


def run_of_other_inputs_to_train(world, tmp_path):
  """world.run was trained on patient001 with other options: reused with another config, refused naming it."""
  run = Path(shutil.copytree(world.run, tmp_path / "run"))
  return Refusal(_train(world, run, extra=("--set", "epochs=2")), str(run), [run], ("another config.epochs",))


RELIABILITY_CASES = {f.__name__.replace("_", "-"): f for f in (
    malformed_hf_index_to_convert, hf_index_without_weight_map_to_convert, hf_index_naming_a_missing_shard_to_convert,
    hf_index_is_a_list_to_convert, overwrite_of_the_checkpoints_folder_to_convert,
    overwrite_of_a_users_folder_to_convert, converted_weights_with_flipped_bytes_to_predict,
    model_with_a_changed_config_to_predict, out_is_a_file_to_train, out_is_a_file_to_evaluate,
    output_is_a_file_to_predict, out_is_a_users_folder_to_train, linear_head_on_an_image_cache_to_train,
    unet_on_a_feature_cache_to_train, negative_seed_to_train, negative_learning_rate_to_train,
    unknown_scheduler_to_train, bool_for_epochs_to_train, negative_checkpoint_every_steps_to_train,
    int_for_a_bool_to_train, run_of_other_inputs_to_train)}


@pytest.mark.parametrize("case", list(RELIABILITY_CASES))
def test_bad_output_integrity_or_option(world, tmp_path, capsys, case):
  assert_refused(capsys, RELIABILITY_CASES[case](world, tmp_path))


# ---------------------------------------------------------------- outputs in folders that cannot be written


@pytest.fixture
def read_only(tmp_path, monkeypatch):
  """A folder this process may not create files in (mode 0555). Root writes whatever the mode, so when the tests run
  as root, os.access is made to answer for this folder as it does for any other user: the commands' checks see a
  read-only folder, and a write they did not check for would still succeed, and show as a change to the folder."""
  folder = tmp_path / "read_only"
  folder.mkdir()
  folder.chmod(0o555)
  if os.geteuid() == 0:
    real_access = os.access

    def access(path, mode, *args, **kwargs):
      if mode & os.W_OK and os.path.abspath(path) == str(folder):
        return False
      return real_access(path, mode, *args, **kwargs)
    monkeypatch.setattr(os, "access", access)
  yield folder
  folder.chmod(0o755)


def _sweep_config_file(world, tmp_path) -> Path:
  values = {"data": str(world.acdc), "encoders": {"tiny": str(world.weights)}, "methods": ["linear"], "tr_sizes": [1],
            "num_folds": 3, "folds": [0], "dtype": "fp32", "val_patients": 0, "train": {"epochs": 1}}
  return _py(tmp_path, "sweep_config.py", f"def get_config():\n  return {values!r}\n")


# command -> its command line writing `out` (a path inside the read-only folder)
UNWRITABLE_OUTPUTS = {
    "precompute": lambda world, tmp_path, out: _precompute(world, world.acdc, out, world.tfds),
    "image-cache": lambda world, tmp_path, out: ["image-cache", "--data", world.acdc, "--tfds-dir", world.tfds,
                                                 "--out", out],
    "train": lambda world, tmp_path, out: _train(world, out),
    "pretrain-simclr": lambda world, tmp_path, out: ["pretrain-simclr", "--cache", world.cache, "--splits",
                                                     world.split, "--out", out],
    "evaluate": lambda world, tmp_path, out: _evaluate(world, out),
    "predict": lambda world, tmp_path, out: _predict(world, world.phantom, out),
    "zero-shot": lambda world, tmp_path, out: ["zero-shot", "--weights", world.weights, "--data", world.acdc,
                                               "--tfds-dir", world.tfds, "--splits", world.split, "--out", out],
    "export-merged": lambda world, tmp_path, out: ["export-merged", world.model, "--weights", world.weights, "--out",
                                                   out],
    "make-splits": lambda world, tmp_path, out: ["make-splits", world.acdc, "--folds", "3", "--out",
                                                 out.with_suffix(".json")],
    "synth-acdc": lambda world, tmp_path, out: ["synth-acdc", out, "--patients", "1"],
    "convert": lambda world, tmp_path, out: ["convert", world.meta_checkpoint, out],
    "build-dataset": lambda world, tmp_path, out: ["build-dataset", "acdc", world.acdc, "--tfds-dir", out],
    "sweep": lambda world, tmp_path, out: ["sweep", "--config", _sweep_config_file(world, tmp_path), "--out", out,
                                           "--no-progress"],
    "demo": lambda world, tmp_path, out: ["demo", "--out", out, "--no-progress"],
}


@pytest.mark.parametrize("command", list(UNWRITABLE_OUTPUTS))
def test_output_in_a_read_only_folder(world, tmp_path, capsys, read_only, restore_jax_cache_options, command):
  out = read_only / "out"
  argv = UNWRITABLE_OUTPUTS[command](world, tmp_path, out)
  assert_refused(capsys, Refusal(argv, str(read_only), [read_only], ("not writable",)))


def test_read_only_run_folder_to_train(world, tmp_path, capsys, read_only):
  """An existing output folder that cannot be written (a run to resume, here a new empty one) is refused too."""
  assert_refused(capsys, Refusal(_train(world, read_only), str(read_only), [read_only], ("not writable",)))


def test_overwrite_in_a_read_only_folder_to_convert(world, tmp_path, capsys, monkeypatch):
  """--overwrite moves the old output aside in the folder above it: that folder must be writable too."""
  parent = tmp_path / "weights"
  earlier = Path(shutil.copytree(world.weights, parent / "converted"))
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode, *args, **kwargs: False if (
      mode & os.W_OK and os.path.abspath(path) == str(parent)) else real_access(path, mode, *args, **kwargs))
  assert_refused(capsys, Refusal(["convert", world.meta_checkpoint, earlier, "--overwrite"], str(parent),
                                 [earlier], ("not writable",)))


# ---------------------------------------------------------------- batches larger than the data or the memory


def _available_for(rows: int, world) -> int:
  """Memory for the host side of `rows`-row training batches of the world's cache, and little more."""
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.train.core import PREFETCH_BATCHES
  from autosam_jax.train.loop import example_bytes

  return 2 * (PREFETCH_BATCHES + 2) * rows * example_bytes(FeatureCache(world.cache), 0)


def test_batch_larger_than_the_data_runs_as_big_as_the_data(world, tmp_path, monkeypatch):
  """batch_size=100000 on a few slices: the loop runs (and allocates) batches of the data's size, not of 100000 rows
  (on 244 slices of model images, 27 GB), and the memory check counts those; the run records the batch_size given.
  The training itself is left out (`fit` replaced): only what it is handed is checked."""
  from flax import nnx

  from autosam_jax import load_sam, memory
  from autosam_jax.features.cache import FeatureCache
  from autosam_jax.models.heads import build_head
  from autosam_jax.train import core
  from autosam_jax.train.loop import TrainConfig, train
  from tests.conftest import WORLD_HEAD, WORLD_SPLIT

  cache = FeatureCache(world.cache)
  labeled, val = list(WORLD_SPLIT["train"]), list(WORLD_SPLIT["val"])
  rows = max(len(cache.indices(labeled)), len(cache.indices(val)))
  handed = {}
  monkeypatch.setattr(core, "fit", lambda method, out_dir, options, where: handed.update(
      options=options, where=where, config=method.train_config) or {"stopped_at_step": 0})
  monkeypatch.setattr(memory, "available_bytes", lambda: _available_for(rows, world))
  make = lambda config: build_head(config.head, config.num_classes, variant=config.variant,
                                   sam=load_sam(world.weights), rngs=nnx.Rngs(config.seed))
  train(TrainConfig(**{**WORLD_HEAD, "batch_size": 100_000}), world.cache, make, tmp_path / "run", labeled, val,
        progress=False)
  assert handed["options"].batch_size == rows < 100_000
  assert handed["where"].batch_size < 2 * rows  # the batch on the devices: rounded up to the device count
  assert handed["config"].batch_size == 100_000
  assert json.loads((tmp_path / "run" / "run.json").read_text())["identity"]["config"]["batch_size"] == 100_000


def test_batch_that_cannot_fit_in_memory_to_train(world, tmp_path, capsys, monkeypatch):
  """A batch within the data's size that the memory cannot hold is still refused before anything is allocated."""
  from autosam_jax import memory

  monkeypatch.setattr(memory, "available_bytes", lambda: _available_for(1, world))
  assert_refused(capsys, Refusal(_train(world, tmp_path / "run", extra=("--set", "batch_size=4")), "batch size 4",
                                 [tmp_path / "run"], ("of memory", "choose a smaller batch_size")))
