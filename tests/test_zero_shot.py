"""SAM zero-shot with ground-truth prompts: parity with Meta's `Sam.forward` called as the official
`scripts/inference.py` calls it, the prompts themselves, and the command end to end on phantoms (one at a time per
output folder)."""

import json

import nibabel as nib
import numpy as np
import pytest

from autosam_jax.evaluation import zero_shot as zs
from tests.conftest import TINY_CONFIGS, assert_refused_while_in_use

NAME = "dim64-win5-pad"
SIZE = TINY_CONFIGS[NAME].image_size


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  from autosam_jax.data.splits import Split
  from autosam_jax.data.synthetic import write_synthetic_acdc

  root = tmp_path_factory.mktemp("zero_shot")
  write_synthetic_acdc(root / "acdc", 3, seed=11)
  Split(name="s", seed=0, train=("patient001",), val=("patient002",), test=("patient003",)).to_json(
      root / "split.json")
  return root


@pytest.fixture(scope="module")
def models(meta_checkpoints, tiny_weights):
  from autosam_jax import load_sam

  torch_sam, _ = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  return torch_sam, load_sam(tiny_weights)


@pytest.fixture(scope="module")
def volume(root):
  from autosam_jax.data.nifti import read_label, read_nifti

  stem = root / "acdc" / "patient003" / "patient003_frame01"
  image, label = read_nifti(f"{stem}.nii.gz"), read_label(f"{stem}_gt.nii.gz", (0, 1, 2, 3))
  return image.data, label.data, image.spacing


def _slices(pre, labels, z):
  """The volume restricted to slices `z` (keeps the CPU cost of a parity check to a few encoder calls)."""
  import dataclasses

  return dataclasses.replace(pre, images=pre.images[z], targets=pre.targets[z]), labels[:, :, z]


def _pick_slices(labels):
  """A slice with all three classes and one with fewer (towards the apex), so dummy prompt slots are exercised."""
  counts = [len(set(np.unique(labels[:, :, z])) - {0}) for z in range(labels.shape[2])]
  full, partial = counts.index(3), next(z for z, c in enumerate(counts) if 0 < c < 3)
  return [full, partial]


# ---------------------------------------------------------------------------------------------------------------------
# The reference: Meta's model driven exactly as the official script drives it.


def official_get_box(label):
  """`scripts/inference.py:get_box`, transcribed: (y1, x1, y2, x2) = (col0 - 1, row0 - 1, col1 + 1, row1 + 1)."""
  img = label
  x1, x2 = 0, img.shape[0]
  y1, y2 = 0, img.shape[1]
  for i in range(1, img.shape[0]):
    if img[i - 1].max() == 0 and img[i].max() > 0:
      x1 = i
      break
  for i in range(img.shape[0] - 2, 0, -1):
    if img[i + 1].max() == 0 and img[i].max() > 0:
      x2 = i
      break
  for j in range(1, img.shape[1]):
    if img[:, j - 1].max() == 0 and img[:, j].max() > 0:
      y1 = j
      break
  for j in range(img.shape[1] - 2, 0, -1):
    if img[:, j + 1].max() == 0 and img[:, j].max() > 0:
      y2 = j
      break
  return y1 - 1, x1 - 1, y2 + 1, x2 + 1


def reference_point(mask):
  """Centre of mass by scipy, then the nearest mask pixel by brute force: (x, y)."""
  from scipy import ndimage

  centre = np.array(ndimage.center_of_mass(mask))
  pixels = np.argwhere(mask)
  row, col = pixels[np.argmin(((pixels - centre) ** 2).sum(1))]
  return col, row


def official_combine(masks, classes, shape, num_classes=4):
  """`scripts/inference.py:get_mask`'s combination of 0/1 masks, then its argmax."""
  import torch

  mask = torch.zeros((num_classes, *shape))
  for k, m in zip(classes, masks):
    mask[k] = m
    mask[0] -= mask[k]
  bg = mask[0]
  bg[bg == 0] = 1
  bg[bg < 0] = 0
  mask[0] = bg
  return torch.argmax(mask, dim=0).numpy()


def meta_slice(torch_sam, image, label, prompt, output_sizes):
  """Meta's `Sam.forward` on one slice, one prompt per class present in `label` (whose frame is the original image).

  Returns the mask logits (N, H, W) at each of `output_sizes` (by Meta's `postprocess_masks`), the prompted classes,
  and the thresholded masks of `Sam.forward` at the label's size.
  """
  import torch

  from weights_conversion.meta_reference import import_segment_anything

  import_segment_anything()
  from segment_anything.utils.transforms import ResizeLongestSide

  resize = ResizeLongestSide(SIZE)
  original_size = tuple(label.shape)
  classes = [c for c in (1, 2, 3) if np.any(label == c)]
  record = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float(),
            "original_size": original_size}
  if prompt == "box":
    boxes = torch.tensor([official_get_box(np.where(label == c, label, 0)) for c in classes])
    record["boxes"] = resize.apply_boxes_torch(boxes, original_size)
  else:
    points = torch.tensor([[reference_point(label == c)] for c in classes])
    record["point_coords"] = resize.apply_coords_torch(points, original_size)
    record["point_labels"] = torch.ones(len(classes), 1, dtype=torch.int64)
  with torch.no_grad():
    out = torch_sam([record], multimask_output=False)[0]
    logits = [torch_sam.postprocess_masks(out["low_res_logits"], image.shape[:2], size)[:, 0].numpy()
              for size in output_sizes]
  return logits, classes, out["masks"][:, 0]


def official_input(image_224):
  """The official image path: (224, 224, 3) in [0, 1] -> `F.interpolate` to the encoder size, channels-last."""
  import torch
  import torch.nn.functional as F

  x = torch.from_numpy(np.ascontiguousarray(image_224.transpose(2, 0, 1)))[None]
  return F.interpolate(x, (SIZE, SIZE), mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)


def _assert_matches(ours_logits, ours_labels, ref_logits, classes, ref_labels):
  """Logits within 1e-3 of Meta's; label maps equal except where one of our logits is within round-off of 0."""
  mine = np.moveaxis(ours_logits[..., [c - 1 for c in classes]], -1, 0)
  np.testing.assert_allclose(mine, ref_logits, atol=1e-3, rtol=0)
  assert np.all(np.isneginf(ours_logits[..., [c - 1 for c in (1, 2, 3) if c not in classes]]))
  disagree = ours_labels != ref_labels
  assert np.all(np.min(np.abs(mine), axis=0)[disagree] < 1e-3), int(disagree.sum())
  assert disagree.mean() < 1e-3
  # not a degenerate comparison: each prompted class has foreground and background somewhere in the slice
  fg = (ref_logits > 0).mean(axis=(1, 2))
  assert np.all(fg > 0) and np.all(fg < 1), fg


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_faithful_matches_meta_as_the_official_script_runs_it(models, volume, prompt):
  from autosam_jax.data.preprocess import PreprocessConfig, preprocess_volume

  torch_sam, sam = models
  image, labels, spacing = volume
  config = PreprocessConfig(mode="faithful", encoder_size=SIZE)
  pre = preprocess_volume(image, spacing, labels, config)
  picked = _pick_slices(pre.targets.transpose(1, 2, 0))
  result = zs.ZeroShotSegmenter(sam, classes=(1, 2, 3), mode="faithful", prompt=prompt, batch_size=4)
  result = result.segment(*_slices(pre, labels, picked))
  assert result.target_logits.shape == (2, 224, 224, 3) and result.native_labels.shape == (*labels.shape[:2], 2)
  for i, z in enumerate(picked):
    target = pre.targets[z]
    (ref_logits, native_ref), classes, ref_masks = meta_slice(torch_sam, official_input(pre.images[z]), target,
                                                              prompt, [(224, 224), labels.shape[:2]])
    assert result.present[i].tolist() == [c in classes for c in (1, 2, 3)]
    _assert_matches(result.target_logits[i], result.target_labels[i], ref_logits, classes,
                    official_combine(ref_masks.float(), classes, (224, 224)))
    # the native grid: SAM's own postprocessing straight from the encoder frame to the native slice
    native_mine = np.moveaxis(result.native_logits[i][..., [c - 1 for c in classes]], -1, 0)
    np.testing.assert_allclose(native_mine, native_ref, atol=1e-3, rtol=0)


def test_improved_matches_meta_on_the_normalised_native_image(models, volume):
  """Improved mode: 0..255 input resized to the longer side, Meta's own normalisation and padding, native prompts."""
  import jax

  from autosam_jax.data.preprocess import PreprocessConfig, preprocess_volume

  torch_sam, sam = models
  image, labels, spacing = volume
  config = PreprocessConfig(mode="improved", encoder_size=SIZE, head_size=4 * sam.config.image_embedding_size)
  pre = preprocess_volume(image, spacing, labels, config)
  assert max(pre.geometry.model_shape) == SIZE and min(pre.geometry.model_shape) < SIZE  # padding is exercised
  picked = _pick_slices(labels)
  result = zs.ZeroShotSegmenter(sam, classes=(1, 2, 3), mode="improved", prompt="box", batch_size=4)
  result = result.segment(*_slices(pre, labels, picked))
  assert result.target_logits.shape == (2, *pre.geometry.target_shape, 3)
  for i, z in enumerate(picked):
    resized = np.asarray(jax.image.resize(pre.images[z], (*pre.geometry.model_shape, 3), "bilinear", antialias=True))
    (ref_logits,), classes, ref_masks = meta_slice(torch_sam, resized, labels[:, :, z], "box", [labels.shape[:2]])
    _assert_matches(result.native_logits[i], result.native_labels[:, :, i], ref_logits, classes,
                    official_combine(ref_masks.float(), classes, labels.shape[:2]))


# ---------------------------------------------------------------------------------------------------------------------
# Prompts


def test_box_has_a_one_pixel_margin_clipped_to_the_image():
  mask = np.zeros((20, 30), bool)
  mask[5:9, 10:16] = True  # rows 5..8, cols 10..15
  np.testing.assert_array_equal(zs.box_prompt(mask), [9, 4, 16, 9])
  assert tuple(zs.box_prompt(mask)) == official_get_box(mask.astype(np.uint8))
  corner = np.zeros((20, 30), bool)
  corner[0:3, 27:30] = True  # touches the top and right borders
  np.testing.assert_array_equal(zs.box_prompt(corner), [26, 0, 29, 3])
  with pytest.raises(ValueError):
    zs.box_prompt(np.zeros((4, 4), bool))


def test_point_of_a_ring_lies_on_the_ring():
  rows, cols = np.mgrid[:41, :41]
  radius = np.hypot(rows - 20.3, cols - 19.6)
  ring = (radius > 8) & (radius < 12)
  x, y = zs.point_prompt(ring)
  assert ring[int(y), int(x)]
  assert 8 <= np.hypot(y - 20.3, x - 19.6) <= 9.5  # on the inner edge, the ring pixel nearest the centre
  blob = radius < 5
  np.testing.assert_array_equal(zs.point_prompt(blob), [20, 20])  # the pixel holding the centre of mass


def test_slice_prompts_and_combination():
  labels = np.zeros((10, 10), np.uint8)
  labels[1:4, 1:4] = 3
  prompts, present = zs.slice_prompts(labels, "box", (1, 2, 3))
  assert present.tolist() == [False, False, True] and prompts.shape == (3, 4)
  np.testing.assert_array_equal(prompts[2], [0, 0, 4, 4])
  logits = np.full((2, 2, 3), -1.0)
  logits[0, 0] = [0.5, 2.0, -np.inf]  # RV and MYO overlap: the lower class wins
  logits[0, 1, 2] = 1e-6
  np.testing.assert_array_equal(zs.combine_masks(logits, (1, 2, 3)), [[1, 3], [0, 0]])
  # Another dataset's classes: two of them, one prompt slot each, labels written as its own values.
  two = np.zeros((10, 10), np.uint8)
  two[5:8, 2:6] = 2
  prompts, present = zs.slice_prompts(two, "box", (1, 2))
  assert present.tolist() == [False, True] and prompts.shape == (2, 4)
  np.testing.assert_array_equal(prompts[1], [1, 4, 6, 8])
  np.testing.assert_array_equal(zs.combine_masks(np.stack([np.full((2, 2), -1.0), np.full((2, 2), 3.0)], -1), (1, 2)),
                                [[2, 2], [2, 2]])
  with pytest.raises(ValueError, match="2 mask channels for 3 classes"):
    zs.combine_masks(np.zeros((2, 2, 2)), (1, 2, 3))


# ---------------------------------------------------------------------------------------------------------------------
# The command


def _main(argv):
  from autosam_jax.cli import main

  return main(["zero-shot", *argv])


def _args(root, weights, out, *extra):
  return ["--weights", str(weights), "--data", str(root / "acdc"), "--tfds-dir", str(root / "tfds"), "--splits",
          str(root / "split.json"), "--out", str(out), "--batch-size", "3", *extra]


@pytest.mark.parametrize("mode", ["faithful", "improved"])
def test_command_writes_metrics_and_predictions(root, tiny_weights, mode, capsys):
  from autosam_jax.data.nifti import read_label

  out = root / f"out-{mode}"
  assert _main(_args(root, tiny_weights, out, "--prompt", "box", "--mode", mode)) == 0
  assert "| mean |" in capsys.readouterr().out
  report = json.loads((out / "metrics.json").read_text())
  assert (report["method"], report["prompt"], report["mode"]) == ("sam_zero_shot", "box", mode)
  assert set(report["summary"]) == {"official", "standard"} and report["test_patients"] == ["patient003"]
  patient = report["patients"]["patient003"]
  assert sorted(f["frame"] for f in patient["standard"].values()) == ["ED", "ES"]
  grid = [224, 224] if mode == "faithful" else [4 * TINY_CONFIGS[NAME].image_embedding_size] * 2
  assert patient["official"]["shape"][1:] <= grid and patient["official"]["shape"][0] == sum(
      f["shape"][2] for f in patient["standard"].values())
  assert "| RV |" in (out / "metrics.md").read_text() and mode in (out / "metrics.md").read_text()
  for case_id in patient["standard"]:
    stem = root / "acdc" / "patient003" / case_id
    source = nib.load(f"{stem}.nii.gz")
    prediction = nib.load(out / "predictions" / f"{case_id}.nii.gz")
    assert prediction.shape == source.shape and prediction.get_data_dtype() == np.uint8
    np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
    predicted = np.asarray(prediction.dataobj)
    truth = read_label(f"{stem}_gt.nii.gz", (0, 1, 2, 3)).data
    assert predicted.any()
    if mode == "improved":  # prompted from the native labels: a class absent from a GT slice is never predicted
      for z in range(truth.shape[2]):
        assert set(np.unique(predicted[:, :, z])) <= set(np.unique(truth[:, :, z])) | {0}


def _assert_refused(capsys, args, named, out):
  assert _main(args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
  assert not out.exists()


def test_command_refuses_bad_inputs_and_writes_nothing(root, tiny_weights, tmp_path, capsys):
  not_weights = tmp_path / "not_weights"
  not_weights.mkdir()
  (not_weights / "sam.pth").write_bytes(b"\0" * 16)
  _assert_refused(capsys, _args(root, not_weights, tmp_path / "out"), str(not_weights), tmp_path / "out")
  from autosam_jax.data.splits import Split

  Split(name="gone", seed=0, train=("patient001",), val=(), test=("patient009",)).to_json(tmp_path / "gone.json")
  args = _args(root, tiny_weights, tmp_path / "out")
  args[args.index("--splits") + 1] = str(tmp_path / "gone.json")
  _assert_refused(capsys, args, "patient009", tmp_path / "out")


def test_command_refuses_a_folder_in_use_and_changes_nothing(root, tiny_weights, tmp_path, capsys):
  """Another zero-shot while the folder is in use (a lock is per open file, so one this process holds counts as
  another's): one line naming the holder, exit code 2, nothing written."""
  out = tmp_path / "out"
  out.mkdir()
  assert_refused_while_in_use(capsys, out, ["zero-shot", *_args(root, tiny_weights, out)])
  assert [p.name for p in out.iterdir()] == [".lock"]  # nothing written beside the lock the test took
