"""Dice and HD95 of a trained model on a split's test patients, under the official and the standard convention.

Slices are predicted from the cache's clean embeddings (or images, for the UNet), reassembled into volumes, and scored
over the dataset's own label table; predictions are written as NIfTI on each file's own grid. The conventions and
the outputs are described with the command: `autosam_jax/commands/evaluate.py`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from autosam_jax.data.errors import DataError
from autosam_jax.evaluation.metrics import VolumeResult, evaluate_volume, summarize


@dataclasses.dataclass
class PatientScore:
  official: VolumeResult
  standard: dict[str, VolumeResult]  # by case (frame)
  native: dict[str, np.ndarray]  # (X, Y, Z) uint8 predictions by case


def score_patient(patient_id: str, predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                  volumes: dict[str, Any], preprocess_config, classes: dict[int, str],
                  native_predictions: dict[str, np.ndarray] | None = None, ignore: int | None = None) -> PatientScore:
  """Scores one patient from its frames' target-grid predictions, on the dataset's classes ({value: name}).

  predictions: per case, (Z, T, T, C) logits or (Z, T, T) labels on the target grid; targets: per case, the cache's
  (Z, T, T) targets. The official stack is every frame's slices in case order (ED before ES in ACDC's naming).
  `native_predictions` replaces the mapping back to the native grid (to check the scoring on the ground truth).
  `ignore`: the dataset's ignore label (`LabelTable.ignore`), whose pixels no score counts.
  """
  from autosam_jax.data.preprocess import preprocess_volume
  from autosam_jax.evaluation.predict import native_labels

  cases = sorted(predictions)
  official_pred, official_true, standard, native = [], [], {}, {}
  for case_id in cases:
    volume = volumes[case_id]
    geometry = preprocess_volume(volume.image, volume.spacing, None, preprocess_config, name=case_id).geometry
    rows, cols = geometry.target_valid_shape  # improved mode: the padding beyond the image is no prediction
    labels = predictions[case_id]
    if np.issubdtype(labels.dtype, np.floating):
      labels = labels.argmax(-1)
    official_pred.append(np.asarray(labels, np.uint8)[:, :rows, :cols])
    official_true.append(np.asarray(targets[case_id], np.uint8)[:, :rows, :cols])
    pred_native = native_labels(predictions[case_id], geometry) if native_predictions is None \
        else np.asarray(native_predictions[case_id], np.uint8)
    native[case_id] = pred_native
    standard[case_id] = evaluate_volume(pred_native, volume.label, tuple(float(s) for s in volume.spacing),
                                        classes=classes, convention="standard", case_id=case_id, ignore=ignore)
  official = evaluate_volume(np.concatenate(official_pred), np.concatenate(official_true), classes=classes,
                             convention="official", case_id=patient_id, ignore=ignore)
  return PatientScore(official, standard, native)


def _cached_cases(cache, patient_id: str, volumes: dict[str, Any]) -> dict[str, list[int]]:
  """Cache indices of each of the patient's cases, in slice order, checked to cover every slice."""
  by_case: dict[str, list[tuple[int, int]]] = {}
  for index in cache.indices([patient_id], views=(0,)):
    item = cache.items[int(index)]
    by_case.setdefault(item["case_id"], []).append((item["slice_index"], int(index)))
  if not by_case:
    raise DataError(f"{cache.cache_dir}: holds no slices of test patient {patient_id}")
  cases = {}
  for case_id, entries in sorted(by_case.items()):
    entries.sort()
    if case_id not in volumes:
      raise DataError(f"{cache.cache_dir}: case {case_id} is not in the dataset given with --data")
    expected = volumes[case_id].image.shape[2]
    if [z for z, _ in entries] != list(range(expected)):
      raise DataError(f"{cache.cache_dir}: case {case_id} has cached slices {[z for z, _ in entries][:8]} but its "
                      f"volume has {expected}")
    cases[case_id] = [i for _, i in entries]
  return cases


def evaluate(model_dir: Path, weights_dir: Path | None, cache_dir: Path, source_dir: Path, tfds_dir: Path,
             splits_file: Path, out_dir: Path, *, fold: str | None = None, batch_size: int = 8, volumes=None) -> dict[str, Any]:
  """Predicts and scores the split's test patients; writes OUT/metrics.json, metrics.md and predictions/.

  volumes: `load_volumes(source_dir, tfds_dir)` when the caller already has it (a sweep evaluates many cells).
  The model, the cache and the dataset must share one label table; the scores are over exactly its classes."""
  import contextlib

  from autosam_jax.outputs import check_output_path

  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise DataError(f"--batch-size must be positive, got {batch_size}")
  check_output_path(out_dir)
  with contextlib.ExitStack() as stack:  # holds OUT's lock, once taken, to the end
    return _evaluate(model_dir, weights_dir, cache_dir, source_dir, tfds_dir, splits_file, out_dir, fold=fold,
                     batch_size=batch_size, volumes=volumes, stack=stack)


def _evaluate(model_dir, weights_dir, cache_dir, source_dir, tfds_dir, splits_file, out_dir, *, fold, batch_size,
              volumes, stack) -> dict[str, Any]:
  import jax

  from autosam_jax.atomic import atomic_write_bytes, atomic_write_json
  from autosam_jax.data.splits import select_split
  from autosam_jax.data.volumes import load_volumes
  from autosam_jax.evaluation.predict import (check_cache_matches, label_nifti_bytes, load_model, make_head_forward,
                                             preprocess_config_from_manifest, read_model_record)
  from autosam_jax.features.cache import FeatureCache, cache_label_table
  from autosam_jax.models.loading import read_config, weights_digest
  from autosam_jax.parallel import all_gather_objects, barrier

  process, num_processes = jax.process_index(), jax.process_count()
  split = select_split(splits_file, fold)
  if not split.test:
    raise DataError(f"{splits_file}: split {split.name!r} has no test patients")
  cache = FeatureCache(cache_dir)
  depends_on = cache.manifest["depends_on"]
  labels = read_model_record(model_dir)["labels"]  # before the slow loads: a model of other classes fails fast
  cache_labels = cache_label_table(cache)
  labels.check_same(cache_labels, model_dir, "the model", f"the cache {cache_dir}")
  _, head, train_config = load_model(Path(model_dir), None if weights_dir is None else Path(weights_dir), encoder=False)
  sam_config = digest = None
  if train_config.head != "unet":
    sam_config, digest = read_config(weights_dir), weights_digest(Path(weights_dir))
  check_cache_matches(depends_on, train_config, sam_config, str(Path(cache_dir) / "manifest.json"), digest)
  preprocess_config = preprocess_config_from_manifest(depends_on)
  if volumes is None:
    if process != 0:
      barrier("autosam_jax.evaluate.dataset_built")  # process 0 builds the TFDS dataset if needed, then the others
    volumes = load_volumes(Path(source_dir), Path(tfds_dir))
    if process == 0:
      barrier("autosam_jax.evaluate.dataset_built")
  volumes, fingerprint, data_labels, _ = volumes
  if depends_on.get("dataset_fingerprint") not in (None, fingerprint):
    raise DataError(f"{cache_dir}: the cache was computed from other data than {source_dir}; give the --data it was "
                    "computed from, or precompute a cache of this data")
  labels.check_same(data_labels, model_dir, "the model", f"the dataset {source_dir}")
  classes = labels.foreground
  frames = sorted({v.frame for v in volumes.values() if v.frame})
  forward = make_head_forward(head, preprocess_config.target_size, batch_size)

  for patient_id in split.test:  # every process checks the whole split before any writes
    _cached_cases(cache, patient_id, volumes)
  cache.check_files()
  from autosam_jax.outputs import file_digest, take_output

  # What the scores were made from: another evaluation is refused in this folder (its metrics would be replaced).
  identity = {"model": str(Path(model_dir).absolute()),
              "model_checksums_sha256": file_digest(Path(model_dir) / "checksums.json"),
              "cache": {"path": str(Path(cache_dir).absolute()),
                        "manifest_sha256": file_digest(Path(cache_dir) / "manifest.json")},
              "data": str(Path(source_dir).absolute()), "weights_sha256": digest,
              "split": {"file_sha256": file_digest(splits_file), "name": split.name}}
  take_output(stack, out_dir, "evaluate", identity, main=process == 0)
  scores: dict[str, tuple[VolumeResult, dict[str, tuple[str, VolumeResult]]]] = {}
  predictions_dir = Path(out_dir) / "predictions"
  for patient_id in split.test[process::num_processes]:
    cases = _cached_cases(cache, patient_id, volumes)
    logits, targets = {}, {}
    for case_id, indices in cases.items():
      items = [cache[i] for i in indices]
      maps = {"embedding": np.stack([np.asarray(it["embedding"], np.float32) for it in items])}
      if "high_res_0" in items[0]:  # SAM 2's high-resolution maps, for a head that adds them
        maps["high_res"] = [np.stack([np.asarray(it[f"high_res_{k}"], np.float32) for it in items]) for k in (0, 1)]
      logits[case_id] = forward(maps)
      targets[case_id] = np.stack([it["target"] for it in items])
    score = score_patient(patient_id, logits, targets, volumes, preprocess_config, classes, ignore=labels.ignore)
    for case_id, predicted in score.native.items():
      volume = volumes[case_id]  # scored in canonical order, written in the file's own voxel order and affine
      atomic_write_bytes(predictions_dir / f"{case_id}.nii.gz",
                         label_nifti_bytes(volume.to_stored(predicted), volume.affine))
    scores[patient_id] = (score.official, {case_id: (volumes[case_id].frame, result)
                                           for case_id, result in score.standard.items()})
  for part in all_gather_objects(scores):  # in a single process: this process's scores
    scores.update(part)
  patients: dict[str, Any] = {}
  official_results, standard_results = [], []
  for patient_id in split.test:
    official, standard = scores[patient_id]
    official_results.append(official)
    standard_results += [result for _, result in standard.values()]
    patients[patient_id] = {
        "official": official.to_dict(),
        "standard": {case_id: {"frame": frame, **result.to_dict()} for case_id, (frame, result) in standard.items()}}
  summary = summarize(official_results + standard_results)
  report = {"model": str(model_dir), "cache": str(cache_dir), "data": str(source_dir), "split": split.name,
            "test_patients": list(split.test), "labels": labels.to_dict(), "classes": labels.foreground_names,
            "train_config": train_config.to_dict(), "preprocess": preprocess_config.to_dict(), "summary": summary,
            "patients": patients}
  table = summary_table(summary, labels.foreground_names, frames)
  if process == 0:
    atomic_write_json(Path(out_dir) / "metrics.json", report)
    cases = case_table(patients, labels.foreground_names)  # in the file only: the command prints the summary
    atomic_write_bytes(Path(out_dir) / "metrics.md", f"{table}\n\n{cases}\n".encode())
  barrier("autosam_jax.evaluate.written")
  return {"report": report, "table": table}


def _fmt(value: float | None, digits: int) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def summary_table(summary: dict[str, Any], class_names: list[str], frames: list[str] = ()) -> str:
  """Markdown table: a row per class of the dataset (`class_names`, its foreground) and their mean; Dice and HD95
  under each convention. `frames`: the frame names when patients have several (ACDC's ED, ES), else empty."""
  official, standard = summary.get("official"), summary.get("standard")
  columns = []
  if official:
    columns += [("official", "dice", "Dice (official)"), ("official", "hd95", f"HD95 (official, {official['units']})")]
  if standard:
    columns += [("standard", "dice", "Dice (standard)"), ("standard", "hd95", f"HD95 (standard, {standard['units']})")]
  lines = ["| class | " + " | ".join(c[2] for c in columns) + " |", "|---|" + "---:|" * len(columns)]
  for name in list(class_names) + ["mean"]:
    cells = []
    for convention, metric, _ in columns:
      part = summary[convention]
      entry = part["overall"][metric] if name == "mean" else part["classes"].get(name, {}).get(metric, {})
      cells.append(_fmt(entry.get("value"), 4 if metric == "dice" else 2))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  notes = []
  stacked = f"each one volume of its {'+'.join(frames)} slices" if frames else "each case one volume"
  unit = "frame" if frames else "case"
  if official:
    notes.append(f"official: mean over {official['n_cases']} {'patient' if frames else 'case'}(s), {stacked} on the "
                 "model's target grid; HD95 in voxels of that grid (medpy), Dice 1 / HD95 0 for empty masks.")
  if standard:
    excluded = {m: standard["overall"][m]["n_excluded"] for m in ("dice", "hd95")}
    apart = f" ({' and '.join(frames)} apart)" if frames else ""
    notes.append(f"standard: mean over {standard['n_cases']} {unit}(s){apart} on the native grid; HD95 in "
                 f"mm (MONAI); values undefined for empty masks left out (Dice: {excluded['dice']}, HD95: "
                 f"{excluded['hd95']} class-{unit} values).")
  notes += _convention_gaps(summary, class_names)
  return "\n".join(lines) + "\n\n" + "\n".join(notes)


# Mean Dice of a class under the two conventions further apart than this gets a note on where each was measured.
CONVENTION_GAP = 0.05


def _convention_gaps(summary: dict[str, Any], class_names: list[str]) -> list[str]:
  """A note naming the classes whose mean Dice differs by more than CONVENTION_GAP between the conventions, and the
  grids behind the difference (empty masks, the other cause, are in the notes before it)."""
  official, standard = summary.get("official"), summary.get("standard")
  if not official or not standard:
    return []
  gaps = []
  for name in class_names:
    a = official["classes"].get(name, {}).get("dice", {}).get("value")
    b = standard["classes"].get(name, {}).get("dice", {}).get("value")
    if a is not None and b is not None and abs(a - b) > CONVENTION_GAP:
      gaps.append(f"{name} ({a:.4f} official, {b:.4f} standard)")
  if not gaps:
    return []
  return [f"Dice differs by more than {CONVENTION_GAP} between the conventions for {', '.join(gaps)}: official "
          "Dice counts pixels of the model's grid (the slices resampled for the model), standard Dice voxels of "
          "the scans' native grid (the prediction mapped back to each file), and they treat empty masks apart (see "
          "above)."]


def case_table(patients: dict[str, Any], class_names: list[str]) -> str:
  """Markdown: a row per case of the report's `patients`: each patient's official volume (model grid), then each of
  its cases (frames) under the standard convention (native grid); Dice per class, their mean and mean HD95."""
  lines = ["### Per case", "", "| case | convention | " + " | ".join(class_names) + " | mean Dice | mean HD95 |",
           "|---|---|" + "---:|" * (len(class_names) + 2)]

  def row(case: str, convention: str, result: dict[str, Any]) -> str:
    dice = [_fmt(result["classes"].get(name, {}).get("dice", {}).get("value"), 4) for name in class_names]
    hd95 = result["mean"]["hd95"]["value"]
    units = "vox" if result["units"] == "voxel" else result["units"]
    return (f"| {case} | {convention} | " + " | ".join(dice) + f" | {_fmt(result['mean']['dice']['value'], 4)} | "
            + ("n/a" if hd95 is None else f"{hd95:.2f} {units}") + " |")

  for patient_id, patient in patients.items():
    lines.append(row(patient_id, "official, model grid", patient["official"]))
    for case_id, result in patient["standard"].items():
      frame = f", {result['frame']}" if result.get("frame") else ""
      lines.append(row(case_id, f"standard, native grid{frame}", result))
  return "\n".join(lines)
