"""Dice and HD95: the standard convention against MONAI, the official one against medpy and the paper's evaluate.py
semantics, both against hand-computed cases; then per-volume evaluation, summaries and their JSON form."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from medpy.metric import binary as medpy_binary
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy import ndimage

from autosam_jax.evaluation.metrics import (BOTH_EMPTY, OFFICIAL, OK, PRED_EMPTY, STANDARD, TRUE_EMPTY, MetricValue,
                                            VolumeResult, dice, dice_official, dice_standard, evaluate_volume, hd95,
                                            hd95_medpy, hd95_official, hd95_standard, summarize, surface,
                                            surface_distances)

CLASSES = {1: "RV", 2: "MYO", 3: "LV"}  # the phantoms' foreground; the metrics take any table

# (shape, spacing in the arrays' axis order, smoothing sigma): short-axis-like 3D with thick slices last, and 2D.
GRIDS = {
  "3d": ((40, 36, 8), (1.4, 1.4, 8.0), (3.0, 3.0, 1.0)),
  "2d": ((64, 52), (1.4, 0.9), (3.0, 3.0)),
}
CASES = [(grid, seed) for grid in GRIDS for seed in range(4)]


def smooth_field(shape, sigma, rng) -> np.ndarray:
  field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return field / field.std()


def blob_pair(grid: str, seed: int, fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
  """A ground-truth blob and a prediction that overlaps it imperfectly (its own threshold of a perturbed field)."""
  shape, _, sigma = GRIDS[grid]
  rng = np.random.default_rng(seed)
  field = smooth_field(shape, sigma, rng)
  # Seeds alternate between a close prediction and one that wanders far, so that both percentile regimes show up.
  noisy = field + (0.4 if seed % 2 else 1.2) * smooth_field(shape, sigma, rng)
  true = field > np.quantile(field, 1 - fraction)
  pred = noisy > np.quantile(noisy, 1 - fraction * rng.uniform(0.6, 1.4))
  return pred, true


def as_monai(mask: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(mask))[None, None]


def monai_dice(pred: np.ndarray, true: np.ndarray) -> float:
  metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
  return float(metric(as_monai(pred), as_monai(true))[0, 0])


def monai_hd95(pred: np.ndarray, true: np.ndarray, spacing) -> float:
  metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # MONAI warns on empty masks, which some cases are on purpose
    return float(metric(as_monai(pred), as_monai(true), spacing=spacing)[0, 0])


def paper_dice(pred: np.ndarray, label: np.ndarray) -> float:
  """evaluate.py's dice(), restated."""
  if pred.sum() + label.sum() == 0:
    return 1.0
  return 2.0 * np.logical_and(pred, label).sum() / (pred.sum() + label.sum())


def paper_hd(pred: np.ndarray, gt: np.ndarray) -> float:
  """evaluate.py's hd(), restated: medpy's hd95 without spacing, 0 when either is empty."""
  return medpy_binary.hd95(pred, gt) if pred.sum() > 0 and gt.sum() > 0 else 0.0


def same(a: float, b: float, rel: float = 1e-5) -> bool:
  if math.isnan(a) or math.isnan(b):
    return math.isnan(a) and math.isnan(b)
  return a == pytest.approx(b, rel=rel, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# Standard convention against MONAI


@pytest.mark.parametrize("grid,seed", CASES)
def test_standard_matches_monai_on_random_blobs(grid, seed):
  pred, true = blob_pair(grid, seed)
  spacing = GRIDS[grid][1]
  assert pred.any() and true.any() and (pred != true).any()
  assert dice(pred, true) == pytest.approx(monai_dice(pred, true), rel=1e-5)
  assert dice_standard(pred, true) == MetricValue(dice(pred, true), OK)
  expected = monai_hd95(pred, true, spacing)
  assert expected > 0
  assert hd95(pred, true, spacing) == pytest.approx(expected, rel=1e-5)
  assert hd95_standard(pred, true, spacing).value == pytest.approx(expected, rel=1e-5)
  # Without spacing MONAI measures in voxels too.
  assert hd95(pred, true) == pytest.approx(monai_hd95(pred, true, None), rel=1e-5)


@pytest.mark.parametrize("grid", GRIDS)
def test_standard_empty_cases_match_monai(grid):
  _, true = blob_pair(grid, 0)
  spacing = GRIDS[grid][1]
  empty = np.zeros_like(true)
  for pred, gt, status in [(empty, empty, BOTH_EMPTY), (empty, true, PRED_EMPTY), (true, empty, TRUE_EMPTY)]:
    d, h = dice_standard(pred, gt), hd95_standard(pred, gt, spacing)
    assert d.status == h.status == status
    assert same(d.value, monai_dice(pred, gt)), status
    assert same(h.value, monai_hd95(pred, gt, spacing)), status
  # MONAI: Dice is 0 for a missed structure but NaN (left out) for a false positive; HD95 is NaN for any empty mask.
  assert dice_standard(empty, true).value == 0.0 and dice_standard(empty, true).included
  assert math.isnan(dice_standard(true, empty).value) and math.isnan(hd95_standard(empty, true, spacing).value)


def test_hd95_takes_the_larger_directed_percentile_unlike_medpy():
  # In a one-row image every foreground pixel is surface. P = G plus one pixel 10 away. P->G: ten 0s and a 10, whose
  # 95th percentile interpolates to 5; G->P: all 0. MONAI takes max(5, 0) = 5; medpy pools 21 distances (twenty 0s)
  # and its 95th percentile is 0.
  true = np.zeros((1, 20), bool)
  true[0, :10] = True
  pred = true.copy()
  pred[0, 19] = True
  assert hd95(pred, true) == 5.0 == monai_hd95(pred, true, None)
  assert hd95(pred, true, (3.0, 0.5)) == 2.5 == pytest.approx(monai_hd95(pred, true, (3.0, 0.5)))
  assert hd95_medpy(pred, true) == 0.0 == medpy_binary.hd95(pred, true)
  assert hd95_official(pred, true) == MetricValue(0.0, OK)
  assert dice(pred, true) == pytest.approx(20 / 21)


def test_single_voxels_in_anisotropic_3d():
  true, pred = np.zeros((5, 5, 3), bool), np.zeros((5, 5, 3), bool)
  true[1, 1, 0] = True
  pred[4, 1, 2] = True  # 3 voxels along rows, 2 slices apart
  expected_mm = math.hypot(3 * 1.4, 2 * 8.0)
  assert hd95(pred, true, (1.4, 1.4, 8.0)) == pytest.approx(expected_mm)
  assert monai_hd95(pred, true, (1.4, 1.4, 8.0)) == pytest.approx(expected_mm, rel=1e-5)
  official = hd95_official(pred, true)
  assert official.status == OK and official.value == pytest.approx(math.hypot(3, 2))
  assert dice_official(pred, true) == MetricValue(0.0, OK)


def test_identical_masks():
  _, true = blob_pair("3d", 1)
  assert dice(true, true) == 1.0 and hd95(true, true, (1.4, 1.4, 8.0)) == 0.0 and hd95_medpy(true, true) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Surfaces, and the official convention against medpy and the paper's code


def test_surface_is_face_connected_erosion_xor():
  plus = np.zeros((5, 5), bool)
  plus[2, 1:4] = plus[1:4, 2] = True
  # The centre has all four face neighbours, so the connectivity-1 erosion keeps it: it is not surface. (With the
  # full 3x3 structure it would be.) Pixels on the array's border are surface: outside counts as background.
  expected = plus.copy()
  expected[2, 2] = False
  np.testing.assert_array_equal(surface(plus), expected)
  np.testing.assert_array_equal(surface(np.ones((3, 4), bool)), ~np.pad(np.ones((1, 2), bool), 1, constant_values=0))


@pytest.mark.parametrize("grid,seed", CASES)
def test_medpy_hd95_matches_medpy(grid, seed):
  pred, true = blob_pair(grid, seed)
  spacing = GRIDS[grid][1]
  assert hd95_medpy(pred, true) == pytest.approx(medpy_binary.hd95(pred, true), rel=1e-12)
  assert hd95_medpy(pred, true, spacing) == pytest.approx(medpy_binary.hd95(pred, true, voxelspacing=spacing),
                                                          rel=1e-12)
  assert dice_official(pred, true).value == pytest.approx(medpy_binary.dc(pred, true), rel=1e-12)
  # The directed distances themselves, both ways round.
  pred_to_true, true_to_pred = surface_distances(pred, true, spacing)
  assert pred_to_true.size == surface(pred).sum() and true_to_pred.size == surface(true).sum()
  assert max(pred_to_true.max(), true_to_pred.max()) == pytest.approx(
    medpy_binary.hd(pred, true, voxelspacing=spacing), rel=1e-12)


def test_official_empty_cases_by_hand():
  blob = np.zeros((4, 6, 6), bool)
  blob[1:3, 2:5, 1:4] = True
  empty = np.zeros_like(blob)
  assert dice_official(empty, empty) == MetricValue(1.0, BOTH_EMPTY)
  assert hd95_official(empty, empty) == MetricValue(0.0, BOTH_EMPTY)
  # An empty prediction gets a perfect HD95 of 0 (paper-protocol section 6, item 17), and Dice 0.
  assert dice_official(empty, blob) == MetricValue(0.0, PRED_EMPTY)
  assert hd95_official(empty, blob) == MetricValue(0.0, PRED_EMPTY)
  assert dice_official(blob, empty) == MetricValue(0.0, TRUE_EMPTY)
  assert hd95_official(blob, empty) == MetricValue(0.0, TRUE_EMPTY)
  with pytest.raises(ValueError):
    hd95_medpy(blob, empty)


def label_volume_pair(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Labels 0..3 from quantiles of a smooth field; the prediction from a perturbed field."""
  rng = np.random.default_rng(seed)
  sigma = (1.0,) + (3.0,) * (len(shape) - 1)
  field = smooth_field(shape, sigma, rng)
  noisy = field + 0.5 * smooth_field(shape, sigma, rng)
  cuts = [0.55, 0.7, 0.85]
  return np.digitize(noisy, np.quantile(noisy, cuts)), np.digitize(field, np.quantile(field, cuts))


def test_official_evaluation_matches_paper_test_acdc():
  # Three "patients" (ED+ES stacks) with every empty case: a missed class, a hallucinated one, one absent in both.
  patients = [label_volume_pair((12, 48, 48), seed) for seed in range(3)]
  patients[0][0][patients[0][0] == 1] = 0
  patients[1][1][patients[1][1] == 3] = 0
  patients[2][0][patients[2][0] == 2] = 0
  patients[2][1][patients[2][1] == 2] = 0
  results = [evaluate_volume(pred, true, classes=CLASSES, convention=OFFICIAL, case_id=f"p{i}")
             for i, (pred, true) in enumerate(patients)]
  summary = summarize(results)[OFFICIAL]

  class_dice, class_hd = [], []
  for label, name in [(1, "RV"), (2, "MYO"), (3, "LV")]:
    dices = [paper_dice(pred == label, true == label) for pred, true in patients]
    hds = [paper_hd(pred == label, true == label) for pred, true in patients]
    for r, d, h in zip(results, dices, hds):
      assert r.dice[name].value == pytest.approx(d, rel=1e-12) and r.hd95[name].value == pytest.approx(h, rel=1e-12)
    assert summary["classes"][name]["dice"]["value"] == pytest.approx(np.mean(dices), rel=1e-12)
    assert summary["classes"][name]["hd95"]["value"] == pytest.approx(np.mean(hds), rel=1e-12)
    class_dice.append(np.mean(dices))
    class_hd.append(np.mean(hds))
  assert summary["overall"]["dice"]["value"] == pytest.approx(np.mean(class_dice), rel=1e-12)  # the paper's DSC
  assert summary["overall"]["hd95"]["value"] == pytest.approx(np.mean(class_hd), rel=1e-12)  # and its HD
  assert summary["n_cases"] == 3 and summary["units"] == "voxel"
  # Nothing is left out under the official convention, but the empty cases are counted.
  assert summary["overall"]["hd95"]["n_excluded"] == 0
  assert summary["overall"]["hd95"]["status_counts"] == {OK: 6, BOTH_EMPTY: 1, PRED_EMPTY: 1, TRUE_EMPTY: 1}
  assert results[2].dice["MYO"] == MetricValue(1.0, BOTH_EMPTY)


# ----------------------------------------------------------------------------------------------------------------------
# Standard per-frame evaluation, summaries, JSON


def test_standard_evaluation_summary_and_json():
  spacing = (8.0, 1.4, 1.4)
  frames = [label_volume_pair((6, 40, 44), seed) for seed in range(10, 14)]
  frames[0][0][frames[0][0] == 1] = 0  # RV missed: Dice 0 counted, HD95 left out
  frames[1][1][frames[1][1] == 3] = 0  # LV absent from the truth: both left out
  names = [f"patient{i // 2}_{frame}" for i, frame in enumerate(["ED", "ES"] * 2)]
  results = [evaluate_volume(pred, true, spacing, classes=CLASSES, convention=STANDARD, case_id=name)
             for name, (pred, true) in zip(names, frames)]
  for r, (pred, true) in zip(results, frames):
    assert list(r.labels.items()) == [("RV", 1), ("MYO", 2), ("LV", 3)]
    for name, label in r.labels.items():
      assert same(r.dice[name].value, monai_dice(pred == label, true == label))
      assert same(r.hd95[name].value, monai_hd95(pred == label, true == label, spacing))
  assert results[0].dice["RV"] == MetricValue(0.0, PRED_EMPTY)
  assert results[0].mean("hd95").n_excluded == 1 and results[0].mean("dice").n_excluded == 0

  summary = summarize(results)
  assert list(summary) == [STANDARD]
  s = summary[STANDARD]
  assert s["n_cases"] == 4 and s["units"] == "mm"
  rv, lv = s["classes"]["RV"], s["classes"]["LV"]
  assert rv["dice"]["n_included"] == 4 and rv["hd95"]["n_included"] == 3 and rv["hd95"]["n_excluded"] == 1
  assert rv["hd95"]["value"] == pytest.approx(np.mean([r.hd95["RV"].value for r in results[1:]]))
  assert lv["dice"]["n_excluded"] == 1 and lv["dice"]["status_counts"][TRUE_EMPTY] == 1
  assert lv["dice"]["value"] == pytest.approx(np.mean([r.dice["LV"].value for i, r in enumerate(results) if i != 1]))
  assert s["overall"]["hd95"]["n_excluded"] == 2 and s["overall"]["dice"]["n_excluded"] == 1
  class_means = [s["classes"][name]["dice"]["value"] for name in ("RV", "MYO", "LV")]
  assert s["overall"]["dice"]["value"] == pytest.approx(np.mean(class_means))

  # Strict JSON (no NaN), and back: results and summaries survive it exactly.
  text = json.dumps([r.to_dict() for r in results], allow_nan=False)
  back = [VolumeResult.from_dict(d) for d in json.loads(text)]
  assert [b.to_dict() for b in back] == json.loads(text)
  assert math.isnan(back[1].hd95["LV"].value) and back[1].hd95["LV"].status == TRUE_EMPTY
  assert summarize(json.loads(text)) == summary
  json.dumps(summary, allow_nan=False)

  # Both conventions side by side stay apart.
  both = summarize(results + [evaluate_volume(*frames[2], classes=CLASSES, convention=OFFICIAL)])
  assert both[STANDARD] == s and both[OFFICIAL]["n_cases"] == 1


def test_input_checks():
  a = np.zeros((4, 4), bool)
  with pytest.raises(ValueError, match="shape"):
    dice(a, np.zeros((4, 5), bool))
  with pytest.raises(ValueError, match="entries"):
    hd95(a, a, (1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="positive"):
    hd95_standard(np.ones((4, 4)), np.ones((4, 4)), (1.0, 0.0))
  with pytest.raises(ValueError, match="voxels"):
    evaluate_volume(a, a, (1.0, 1.0), classes={1: "x"}, convention=OFFICIAL)
  with pytest.raises(ValueError, match="spacing"):
    evaluate_volume(a, a, classes={1: "x"}, convention=STANDARD)
  with pytest.raises(ValueError, match="convention"):
    evaluate_volume(a, a, classes={1: "x"}, convention="paper")
  with pytest.raises(ValueError, match="status"):
    MetricValue(1.0, "empty")
