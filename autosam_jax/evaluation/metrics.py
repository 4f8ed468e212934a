"""Dice and HD95 on label volumes, under two conventions that give different numbers for the same prediction.

``official`` is what the paper's `evaluate.py:test_acdc` computes (paper-protocol section 4, items 16-17 of section 6):
  - the volume is the per-patient stack of every ED and ES slice on the 224x224 grid, so Dice is "3D" over both frames;
  - Dice = 2|P and G| / (|P| + |G|), and 1 when both are empty;
  - HD95 = `medpy.metric.binary.hd95(P, G)` with no voxel spacing, so it is in voxels of that grid with the slice
    index as z, and it is 0 when P or G is empty (optimistic: an empty prediction scores a perfect HD95).

``standard`` follows MONAI (`DiceMetric(ignore_empty=True)`, `HausdorffDistanceMetric(percentile=95)`):
  - one volume per frame (ED and ES apart) at native resolution, HD95 in the units of the voxel spacing (mm);
  - Dice is NaN when the ground truth is empty (whatever the prediction), 0 when only the prediction is;
  - HD95 is NaN when either mask is empty (see `hd95` for why MONAI gives NaN and not inf);
  - every value carries a status, and means leave out the non-finite values and say how many they left out.

The two HD95s also differ when both masks are present: medpy takes the 95th percentile of both directed distance
sets pooled together, MONAI the larger of the two directed 95th percentiles. Both take the surface of a mask as the
mask minus its erosion by the face-connected (connectivity 1) structuring element, with outside the array counted as
background, and measure from each surface voxel to the nearest surface voxel of the other mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage

OFFICIAL = "official"
STANDARD = "standard"
CONVENTIONS = (OFFICIAL, STANDARD)
Convention = Literal["official", "standard"]

OK = "ok"
BOTH_EMPTY = "both_empty"
PRED_EMPTY = "pred_empty"
TRUE_EMPTY = "true_empty"
STATUSES = (OK, BOTH_EMPTY, PRED_EMPTY, TRUE_EMPTY)

METRICS = ("dice", "hd95")

SpacingLike = float | Sequence[float] | None


# ----------------------------------------------------------------------------------------------------------------------
# Masks, surfaces and distances


def _mask_pair(pred_mask: Any, true_mask: Any) -> tuple[np.ndarray, np.ndarray]:
  # Nonzero is foreground, as in medpy; for boolean masks this is also MONAI's reading.
  pred = np.asarray(pred_mask).astype(bool, copy=False)
  true = np.asarray(true_mask).astype(bool, copy=False)
  if pred.shape != true.shape:
    raise ValueError(f"prediction and ground truth differ in shape: {pred.shape} vs {true.shape}")
  if pred.ndim == 0:
    raise ValueError("masks need at least one dimension")
  return pred, true


def _normalize_spacing(spacing: SpacingLike, ndim: int) -> tuple[float, ...] | None:
  if spacing is None:
    return None
  values = (float(spacing),) * ndim if np.isscalar(spacing) else tuple(float(s) for s in spacing)
  if len(values) != ndim:
    raise ValueError(f"spacing {values} has {len(values)} entries for {ndim}-D masks")
  if not all(math.isfinite(s) and s > 0 for s in values):
    raise ValueError(f"spacing must be finite and positive, got {values}")
  return values


def emptiness_status(pred_mask: Any, true_mask: Any) -> str:
  """One of "ok", "both_empty", "pred_empty" (only the prediction is empty), "true_empty" (only the truth is)."""
  pred, true = _mask_pair(pred_mask, true_mask)
  pred_any, true_any = bool(pred.any()), bool(true.any())
  if pred_any and true_any:
    return OK
  if not pred_any and not true_any:
    return BOTH_EMPTY
  return PRED_EMPTY if not pred_any else TRUE_EMPTY


def surface(mask: Any) -> np.ndarray:
  """Mask XOR its erosion by the connectivity-1 structure, with outside the array as background.

  This is medpy's `__surface_distances` border (`binary_erosion(result, structure=generate_binary_structure(ndim, 1))`
  and XOR) and MONAI's `get_mask_edges` (`binary_erosion(seg) ^ seg` with scipy's default structure, which is the
  same cross; MONAI crops first, with a zero margin that does not change the erosion).
  """
  mask = np.asarray(mask).astype(bool, copy=False)
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask ^ ndimage.binary_erosion(mask, structure=structure, border_value=0)


def surface_distances(pred_mask: Any, true_mask: Any, spacing: SpacingLike = None) -> tuple[np.ndarray, np.ndarray]:
  """Directed surface distances (pred surface -> nearest true surface voxel, true surface -> nearest pred one).

  Distances are Euclidean, scaled per axis by `spacing` (None: 1 per voxel). Both masks must be non-empty.
  """
  pred, true = _mask_pair(pred_mask, true_mask)
  sampling = _normalize_spacing(spacing, pred.ndim)
  if not pred.any() or not true.any():
    raise ValueError(f"surface distances need two non-empty masks ({emptiness_status(pred, true)})")
  # Every surface voxel lies in the union's bounding box, and the erosion sees background just outside it either way,
  # so cropping changes no distance and spares distance transforms of mostly empty volumes.
  box = ndimage.find_objects((pred | true).astype(np.int8))[0]
  pred_surface, true_surface = surface(pred[box]), surface(true[box])
  # The EDT gives each nonzero voxel its distance to the nearest zero, so invert the target surface.
  pred_to_true = ndimage.distance_transform_edt(~true_surface, sampling=sampling)[pred_surface]
  true_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[true_surface]
  return pred_to_true, true_to_pred


# ----------------------------------------------------------------------------------------------------------------------
# Plain metrics


def dice(pred_mask: Any, true_mask: Any, empty_value: float = 1.0) -> float:
  """2|P and G| / (|P| + |G|); `empty_value` when both masks are empty (1.0 as in the paper's code and medpy's `dc`).

  For MONAI's `DiceMetric(ignore_empty=True)`, which is NaN whenever the ground truth is empty, use `dice_standard`.
  """
  pred, true = _mask_pair(pred_mask, true_mask)
  denominator = int(np.count_nonzero(pred)) + int(np.count_nonzero(true))
  if denominator == 0:
    return float(empty_value)
  return 2.0 * int(np.count_nonzero(pred & true)) / denominator


def hd95(pred_mask: Any, true_mask: Any, spacing: SpacingLike = None) -> float:
  """HD95 as MONAI's `HausdorffDistanceMetric(percentile=95)` (directed=False, euclidean) computes it.

  max(95th percentile of pred->true surface distances, 95th percentile of true->pred), each percentile with linear
  interpolation (`torch.quantile`'s default, the same as `np.percentile`'s), in the units of `spacing`.

  Empty masks give NaN, as in MONAI: with both empty there are no distances (`_compute_percentile_hausdorff_distance`
  returns NaN), and with one empty MONAI's `get_surface_distance` returns all-inf distances whose interpolated
  quantile is inf - inf = NaN. (Only the plain maximum, `percentile=None`, gives inf there.)
  """
  pred, true = _mask_pair(pred_mask, true_mask)
  spacing = _normalize_spacing(spacing, pred.ndim)  # checked even where empty masks would not use it
  if not pred.any() or not true.any():
    return math.nan
  pred_to_true, true_to_pred = surface_distances(pred, true, spacing)
  return float(max(np.percentile(pred_to_true, 95), np.percentile(true_to_pred, 95)))


def hd95_medpy(pred_mask: Any, true_mask: Any, spacing: SpacingLike = None) -> float:
  """HD95 as `medpy.metric.binary.hd95(result=pred, reference=true, voxelspacing=spacing)` computes it.

  The 95th percentile (linear, numpy's default) of both directed surface distance sets pooled together:
  `np.percentile(np.hstack((hd1, hd2)), 95)`. That is not MONAI's number: a few far-off voxels on one side may fall
  above the pooled 95th percentile yet not above that side's own. medpy raises on an empty mask, and so does this.
  """
  pred_to_true, true_to_pred = surface_distances(pred_mask, true_mask, spacing)
  return float(np.percentile(np.concatenate([pred_to_true, true_to_pred]), 95))


# ----------------------------------------------------------------------------------------------------------------------
# Values with a status


@dataclass(frozen=True)
class MetricValue:
  """A metric for one class of one case, with why it may not be a plain number.

  `value` is what the convention gives (NaN for the standard convention's empty cases); `status` says which masks
  were empty. A value is left out of means exactly when it is not finite.
  """

  value: float
  status: str = OK

  def __post_init__(self):
    if self.status not in STATUSES:
      raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

  @property
  def included(self) -> bool:
    return math.isfinite(self.value)

  def to_dict(self) -> dict[str, Any]:
    # JSON has no NaN or inf: write null, and keep the exact value as text so that `from_dict` gets it back.
    if self.included:
      return {"value": float(self.value), "status": self.status}
    return {"value": None, "status": self.status, "raw": str(float(self.value))}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> MetricValue:
    value = float(data["raw"]) if data["value"] is None else float(data["value"])
    return cls(value, data["status"])


def dice_official(pred_mask: Any, true_mask: Any) -> MetricValue:
  """The paper's Dice (`evaluate.py:dice`): 1 when both masks are empty, 0 when only one is."""
  status = emptiness_status(pred_mask, true_mask)
  return MetricValue(dice(pred_mask, true_mask, empty_value=1.0), status)


def hd95_official(pred_mask: Any, true_mask: Any) -> MetricValue:
  """The paper's HD95 (`evaluate.py:hd`): medpy's hd95 in voxels, and 0 when either mask is empty."""
  status = emptiness_status(pred_mask, true_mask)
  return MetricValue(hd95_medpy(pred_mask, true_mask) if status == OK else 0.0, status)


def dice_standard(pred_mask: Any, true_mask: Any) -> MetricValue:
  """MONAI's `DiceMetric(ignore_empty=True)`: NaN when the ground truth is empty, 0 when only the prediction is."""
  status = emptiness_status(pred_mask, true_mask)
  if status in (BOTH_EMPTY, TRUE_EMPTY):
    return MetricValue(math.nan, status)
  return MetricValue(dice(pred_mask, true_mask), status)


def hd95_standard(pred_mask: Any, true_mask: Any, spacing: SpacingLike) -> MetricValue:
  """MONAI's `HausdorffDistanceMetric(percentile=95)` with `spacing`: NaN when either mask is empty (see `hd95`)."""
  return MetricValue(hd95(pred_mask, true_mask, spacing), emptiness_status(pred_mask, true_mask))


# ----------------------------------------------------------------------------------------------------------------------
# Means that say what they left out


@dataclass(frozen=True)
class Aggregate:
  """Mean over the finite values; `value` is None when there are none."""

  value: float | None
  n_included: int
  n_excluded: int
  status_counts: dict[str, int]

  def to_dict(self) -> dict[str, Any]:
    return {"value": self.value, "n_included": self.n_included, "n_excluded": self.n_excluded,
            "status_counts": dict(self.status_counts)}


def aggregate(values: Iterable[MetricValue]) -> Aggregate:
  values = list(values)
  finite = [v.value for v in values if v.included]
  counts = {status: sum(v.status == status for v in values) for status in STATUSES}
  mean = float(np.mean(finite)) if finite else None
  return Aggregate(mean, len(finite), len(values) - len(finite), counts)


# ----------------------------------------------------------------------------------------------------------------------
# Label volumes


@dataclass(frozen=True)
class VolumeResult:
  """Per-class Dice and HD95 of one case: a patient's ED+ES stack (official) or one frame (standard)."""

  convention: str
  labels: dict[str, int]  # class name -> label value, in report order
  dice: dict[str, MetricValue]
  hd95: dict[str, MetricValue]
  units: str  # of HD95: "voxel", or those of the spacing (mm for ACDC)
  spacing: tuple[float, ...] | None
  shape: tuple[int, ...]
  case_id: str | None = None

  def mean(self, metric: str) -> Aggregate:
    """Mean over classes (the finite values only)."""
    return aggregate(self._values(metric).values())

  def _values(self, metric: str) -> dict[str, MetricValue]:
    if metric not in METRICS:
      raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    return self.dice if metric == "dice" else self.hd95

  def to_dict(self) -> dict[str, Any]:
    return {
      "case_id": self.case_id,
      "convention": self.convention,
      "units": self.units,
      "spacing": None if self.spacing is None else list(self.spacing),
      "shape": list(self.shape),
      "classes": {name: {"label": label, "dice": self.dice[name].to_dict(), "hd95": self.hd95[name].to_dict()}
                  for name, label in self.labels.items()},
      "mean": {metric: self.mean(metric).to_dict() for metric in METRICS},
    }

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> VolumeResult:
    classes = data["classes"]
    return cls(
      convention=data["convention"],
      labels={name: int(c["label"]) for name, c in classes.items()},
      dice={name: MetricValue.from_dict(c["dice"]) for name, c in classes.items()},
      hd95={name: MetricValue.from_dict(c["hd95"]) for name, c in classes.items()},
      units=data["units"],
      spacing=None if data["spacing"] is None else tuple(float(s) for s in data["spacing"]),
      shape=tuple(int(s) for s in data["shape"]),
      case_id=data.get("case_id"),
    )


def evaluate_volume(pred_labels: Any, true_labels: Any, spacing: SpacingLike = None, *,
                    classes: Mapping[int, str], convention: Convention, case_id: str | None = None,
                    ignore: int | None = None) -> VolumeResult:
  """Per-class Dice and HD95 of a predicted label volume against the true one.

  classes: {label value: name} of exactly the classes to score, the dataset's foreground
    (`LabelTable.foreground`); there is no default, so no dataset is scored with another one's classes.
  ignore: the value of nnU-Net's ignore label (`LabelTable.ignore`): where the ground truth holds it, neither the
    prediction nor the ground truth counts for any class (both read as background there), as nnU-Net scores.

  official: pass the patient's ED and ES slices stacked along one axis on the 224 grid (as the paper's `test()` does)
    and no spacing: HD95 is in voxels of whatever grid the arrays are on.
  standard: pass one frame at native resolution, and `spacing` in the arrays' axis order (e.g. (z, y, x) in mm).
  """
  if convention not in CONVENTIONS:
    raise ValueError(f"convention {convention!r} is not one of {CONVENTIONS}")
  pred_labels, true_labels = np.asarray(pred_labels), np.asarray(true_labels)
  if pred_labels.shape != true_labels.shape:
    raise ValueError(f"prediction and ground truth differ in shape: {pred_labels.shape} vs {true_labels.shape}")
  if convention == OFFICIAL:
    if spacing is not None:
      # The paper's numbers are in voxels of the resampled grid; a spacing here would silently make them something else.
      raise ValueError("the official convention measures HD95 in voxels: pass spacing=None")
    norm_spacing, units = None, "voxel"
  else:
    if spacing is None:
      raise ValueError("the standard convention needs the voxel spacing")
    norm_spacing, units = _normalize_spacing(spacing, pred_labels.ndim), "mm"
  names = list(classes.values())
  if len(set(names)) != len(names):
    raise ValueError(f"class names must be distinct: {names}")
  if ignore is not None:
    if ignore in classes:
      raise ValueError(f"the ignore label {ignore} cannot be a scored class")
    unannotated = true_labels == ignore
    pred_labels, true_labels = np.where(unannotated, 0, pred_labels), np.where(unannotated, 0, true_labels)

  dice_values, hd95_values = {}, {}
  for label, name in classes.items():
    pred, true = pred_labels == label, true_labels == label
    if convention == OFFICIAL:
      dice_values[name], hd95_values[name] = dice_official(pred, true), hd95_official(pred, true)
    else:
      dice_values[name], hd95_values[name] = dice_standard(pred, true), hd95_standard(pred, true, norm_spacing)
  return VolumeResult(convention=convention, labels={name: int(label) for label, name in classes.items()},
                      dice=dice_values, hd95=hd95_values, units=units, spacing=norm_spacing,
                      shape=tuple(pred_labels.shape), case_id=case_id)


def summarize(per_patient_results: Iterable[VolumeResult | Mapping[str, Any]]) -> dict[str, Any]:
  """Means over cases per class, and overall, separately for each convention present (results or their dicts).

  Per class: the mean over cases of the finite values, how many cases it used and left out, and how many cases had
  each emptiness status (under the official convention nothing is left out, but empty cases still count: their
  Dice of 1 or HD95 of 0 are in the mean). Overall: the mean of the class means, as the paper's `DSC` and `HD` are,
  over the classes that have one; its counts add up those of the classes.
  """
  by_convention: dict[str, list[VolumeResult]] = {}
  for result in per_patient_results:
    if not isinstance(result, VolumeResult):
      result = VolumeResult.from_dict(result)
    by_convention.setdefault(result.convention, []).append(result)

  summary: dict[str, Any] = {}
  for convention, results in by_convention.items():
    units = sorted({r.units for r in results})
    if len(units) != 1:
      raise ValueError(f"{convention} results mix HD95 units {units}")
    names: list[str] = []
    for r in results:
      names += [name for name in r.labels if name not in names]
    per_class: dict[str, dict[str, Any]] = {}
    overall: dict[str, Any] = {}
    for metric in METRICS:
      class_aggregates = {}
      for name in names:
        class_aggregates[name] = aggregate(r._values(metric)[name] for r in results if name in r.labels)
      class_means = [a.value for a in class_aggregates.values() if a.value is not None]
      overall[metric] = {
        "value": float(np.mean(class_means)) if class_means else None,
        "n_classes": len(class_means),
        "n_excluded": sum(a.n_excluded for a in class_aggregates.values()),
        "status_counts": {s: sum(a.status_counts[s] for a in class_aggregates.values()) for s in STATUSES},
      }
      for name, agg in class_aggregates.items():
        per_class.setdefault(name, {})[metric] = agg.to_dict()
    summary[convention] = {"n_cases": len(results), "units": units[0], "classes": per_class, "overall": overall}
  return summary
