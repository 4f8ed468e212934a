"""SAM itself, prompted from the ground truth (a box or a point per class present), on a split's test patients: the
paper's zero-shot baseline (paper-protocol 1d), in its faithful form (the normalisation bug of paper-protocol 6.5
included) and an improved one. Scored as `evaluate` scores a model. The command and the two modes:
`autosam_jax/commands/zero_shot.py`."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autosam_jax.data.errors import DataError

PROMPTS = ("box", "point")
MODES = ("faithful", "improved")
BOX_MARGIN = 1


# ---------------------------------------------------------------------------------------------------------------------
# Prompts from a ground-truth slice


def box_prompt(mask: np.ndarray, margin: int = BOX_MARGIN) -> np.ndarray:
  """(x0, y0, x1, y1) float32: the tight box of a 2D mask widened by `margin` pixels on each side.

  Coordinates are pixel indices (x = column, y = row), as the official `get_box` returns them, which SAM's prompt
  encoder then shifts to pixel centres. The official scan leaves a box that touches the border at -1 or H + 1; here it
  is clipped to the image (0 .. H - 1), which changes nothing for a heart away from the border.
  """
  mask = np.asarray(mask, bool)
  if mask.ndim != 2 or not mask.any():
    raise ValueError(f"box_prompt needs a non-empty 2D mask, got shape {mask.shape} with {int(mask.sum())} pixels")
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  h, w = mask.shape
  return np.array([max(cols[0] - margin, 0), max(rows[0] - margin, 0), min(cols[-1] + margin, w - 1),
                   min(rows[-1] + margin, h - 1)], np.float32)


def point_prompt(mask: np.ndarray) -> np.ndarray:
  """(x, y) float32: the mask pixel nearest the mask's centre of mass.

  For a compact blob that is the pixel holding the centre of mass. The centre of mass of a ring (the myocardium) lies
  in the hole, on the LV cavity, and a point there would prompt the wrong structure; the nearest pixel of the ring
  itself is on the class. Ties go to the first pixel in row-major order, so the point is deterministic.
  """
  mask = np.asarray(mask, bool)
  if mask.ndim != 2 or not mask.any():
    raise ValueError(f"point_prompt needs a non-empty 2D mask, got shape {mask.shape} with {int(mask.sum())} pixels")
  rows, cols = np.nonzero(mask)
  centre_row, centre_col = rows.mean(), cols.mean()
  nearest = int(np.argmin((rows - centre_row) ** 2 + (cols - centre_col) ** 2))
  return np.array([cols[nearest], rows[nearest]], np.float32)


def slice_prompts(labels: np.ndarray, prompt: str, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """One prompt slot per foreground class (`classes`, the dataset's label values) of a 2D label slice.

  (prompts, present): (K, 4) boxes or (K, 2) points in the label's pixel frame for K classes; present: (K,) bool.
  Absent classes get a dummy
  prompt, so every slice decodes the same number of prompt sets (one compilation); SAM decodes prompt sets
  independently, and the dummies' masks are discarded.
  """
  make = box_prompt if prompt == "box" else point_prompt
  present = np.array([np.any(labels == c) for c in classes])
  prompts = np.zeros((len(classes), 4 if prompt == "box" else 2), np.float32)
  for k, c in enumerate(classes):
    if present[k]:
      prompts[k] = make(labels == c)
  return prompts, present


def combine_masks(logits: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
  """(..., H, W, K) per-class mask logits (-inf for unprompted classes) -> (..., H, W) uint8 labels `classes`.

  Masks are logits > 0; uncovered pixels are background and overlaps go to the lowest class, as the official argmax
  over [background, class 1, class 2, ...] 0/1 masks resolves them.
  """
  masks = np.asarray(logits) > 0
  if masks.shape[-1] != len(classes):
    raise ValueError(f"{masks.shape[-1]} mask channels for {len(classes)} classes {classes}")
  labels = np.zeros(masks.shape[:-1], np.uint8)
  for k in reversed(range(len(classes))):
    labels[masks[..., k]] = classes[k]
  return labels


# ---------------------------------------------------------------------------------------------------------------------
# SAM on a volume's slices


def check_options(mode: str, prompt: str, batch_size: int, flags: bool = False) -> None:
  """Refuses an unknown mode or prompt and a batch size below 1, naming the option (as a command-line flag)."""
  name = (lambda option: f"--{option.replace('_', '-')}") if flags else (lambda option: option.replace("_", " "))
  if mode not in MODES:
    raise DataError(f"{name('mode')} must be one of {MODES}, got {mode!r}")
  if prompt not in PROMPTS:
    raise DataError(f"{name('prompt')} must be one of {PROMPTS}, got {prompt!r}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise DataError(f"{name('batch_size')} must be positive, got {batch_size!r}")


def check_memory(config, batch_size: int, num_classes: int, native_pixels: int, flags: bool = False) -> None:
  """Refuses, before anything is allocated, a batch of slices whose arrays cannot fit in this machine's memory.

  An estimate from the sizes alone (a lower bound: the encoder's own activations come on top), per slice: its
  encoder input (S x S x 3 float32) and the model image it comes from, its embedding (h x w x C float32) and one copy
  per prompted class for the decoder, and each class's mask logits at SAM's low resolution, on the target grid and
  on the native slice (`native_pixels`, the largest), on the device and on the host."""
  from autosam_jax.memory import require_memory

  image_bytes = config.image_size * config.image_size * 3 * 4
  embedding_bytes = config.image_embedding_size ** 2 * config.prompt_embed_dim * 4
  mask_bytes = ((4 * config.image_embedding_size) ** 2 * 2 + native_pixels) * 4
  needed = batch_size * (2 * image_bytes + (1 + num_classes) * embedding_bytes + 2 * num_classes * mask_bytes)
  option = "--batch-size" if flags else "batch size"
  require_memory(needed, f"{option} {batch_size}", f"choose a smaller {option}")


@dataclasses.dataclass
class VolumeSegmentation:
  """One volume segmented slice by slice.

  For K foreground classes: target_logits: (Z, T, T, K) per-class mask logits on the target grid (faithful: 224;
  improved: SAM's low-resolution output, which is the improved target grid), -inf where the class was not prompted.
  native_logits: (Z, rows, cols, K) the same mapped by SAM's `postprocess_masks` to the native slice. present: (Z, K)
  the prompted classes. prompts: (Z, K, 4) or (Z, K, 2) in the encoder's input frame. target_labels: (Z, T, T) and
  native_labels: (X, Y, Z), uint8.
  """

  target_logits: np.ndarray
  native_logits: np.ndarray
  present: np.ndarray
  prompts: np.ndarray
  target_labels: np.ndarray
  native_labels: np.ndarray


class ZeroShotSegmenter:
  """SAM with ground-truth prompts, batched over slices.

  The encoder runs on `batch_size` slices at a time, the last batch padded by repeating its last slice, so it is
  compiled once; the decoder takes every slice's K prompt slots as one flat batch of prompt sets, also compiled
  once; only the resize back to a volume's native grid is compiled per native shape.
  """

  def __init__(self, sam, *, classes: tuple[int, ...], mode: str = "faithful", prompt: str = "box",
               batch_size: int = 4):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from autosam_jax.models.encoders import encoder_features

    check_options(mode, prompt, batch_size)
    self.mode, self.prompt, self.batch_size = mode, prompt, batch_size
    self.classes = tuple(int(c) for c in classes)  # one prompt slot per foreground class of the dataset
    if not self.classes:
      raise ValueError("zero-shot segmentation needs at least one foreground class")
    self.config = sam.config
    graphdef, self._state = nnx.split(sam)
    slots = len(self.classes)

    @functools.partial(jax.jit, static_argnames=("normalise",))
    def encode(state, images, normalise):
      model = nnx.merge(graphdef, state)
      # faithful: `Sam.preprocess` applied to [0, 1] images, i.e. the official normalisation bug (paper-protocol 6.5)
      return encoder_features(model.image_encoder, model.preprocess(images) if normalise else images)

    @jax.jit
    def decode(state, features, prompts):
      model = nnx.merge(graphdef, state)
      repeated = jax.tree.map(lambda a: jnp.repeat(a, slots, axis=0), features)
      batch = features["embedding"].shape[0]
      flat = prompts.reshape(batch * slots, -1)
      if prompt == "box":
        sparse, dense = model.prompt_encoder(None, flat, None)
      else:
        sparse, dense = model.prompt_encoder((flat[:, None], jnp.ones((flat.shape[0], 1), jnp.int32)), None, None)
      low_res, _ = model.mask_decoder(repeated["embedding"], model.prompt_encoder.get_dense_pe(), sparse, dense,
                                      False, high_res=repeated.get("high_res"))
      return low_res[..., 0].reshape(batch, slots, *low_res.shape[1:3]).transpose(0, 2, 3, 1)

    @functools.partial(jax.jit, static_argnames=("input_size", "output_size"))
    def upscale(state, low_res, input_size, output_size):
      return nnx.merge(graphdef, state).postprocess_masks(low_res, input_size, output_size)

    self._encode, self._decode, self._upscale = encode, decode, upscale

  def _frames(self, geometry) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the grid the prompts are computed on, the encoder's input size before padding)."""
    if self.mode == "faithful":
      size = self.config.image_size
      return tuple(geometry.target_shape), (size, size)
    return tuple(geometry.native_shape), tuple(geometry.model_shape)

  def segment(self, pre, native_labels: np.ndarray, on_batch: Callable[[int], Any] | None = None) -> VolumeSegmentation:
    """Segments every slice of a preprocessed volume (`preprocess_volume` in this segmenter's mode, with labels).

    native_labels: the (X, Y, Z) ground truth on the native grid, which improved mode prompts from. on_batch(n) is
    called after each batch with the number of slices done (a progress bar).
    """
    import jax.numpy as jnp

    from autosam_jax.data.preprocess import encoder_input

    geometry = pre.geometry
    if geometry.mode != self.mode:
      raise ValueError(f"the volume was preprocessed in {geometry.mode!r} mode, the segmenter runs in {self.mode!r}")
    if geometry.encoder_size != self.config.image_size:
      raise ValueError(f"the volume was preprocessed for a {geometry.encoder_size} encoder, SAM takes "
                       f"{self.config.image_size}")
    prompt_grid, input_size = self._frames(geometry)
    prompt_labels = pre.targets if self.mode == "faithful" else np.asarray(native_labels).transpose(2, 0, 1)
    if prompt_labels is None or tuple(prompt_labels.shape[1:]) != prompt_grid:
      raise ValueError(f"prompts need labels on the {prompt_grid} grid")
    prompts, present = zip(*(slice_prompts(labels, self.prompt, self.classes) for labels in prompt_labels))
    # The resize into the encoder frame: `ResizeLongestSide.apply_boxes/apply_coords` when the resize is
    # ResizeLongestSide's (always in faithful mode; improved mode keeps the physical aspect ratio, so with square
    # pixels it is the same).
    scale = np.array([input_size[1] / prompt_grid[1], input_size[0] / prompt_grid[0]], np.float32)
    prompts = np.stack(prompts) * np.tile(scale, 2 if self.prompt == "box" else 1)
    present = np.stack(present)

    num_slices = len(pre.images)
    target_size = tuple(geometry.target_shape)
    target_logits, native_logits = [], []
    for start in range(0, num_slices, self.batch_size):
      stop = min(start + self.batch_size, num_slices)
      index = np.minimum(np.arange(start, start + self.batch_size), num_slices - 1)  # pad by repeating the last
      inputs = encoder_input(pre.images[index], geometry)
      embeddings = self._encode(self._state, inputs, normalise=self.mode == "faithful")
      low_res = self._decode(self._state, embeddings, jnp.asarray(prompts[index]))
      if self.mode == "faithful":
        target = self._upscale(self._state, low_res, input_size=input_size, output_size=target_size)
      else:
        if low_res.shape[1:3] != target_size:
          raise ValueError(f"SAM's {low_res.shape[1]}-pixel masks do not match the {target_size} target grid")
        target = low_res
      native = self._upscale(self._state, low_res, input_size=input_size, output_size=tuple(geometry.native_shape))
      target_logits.append(np.asarray(target)[:stop - start])
      native_logits.append(np.asarray(native)[:stop - start])
      if on_batch is not None:
        on_batch(stop - start)
    absent = ~present[:, None, None, :]
    target_logits = np.where(absent, -np.inf, np.concatenate(target_logits)).astype(np.float32)
    native_logits = np.where(absent, -np.inf, np.concatenate(native_logits)).astype(np.float32)
    native = np.ascontiguousarray(combine_masks(native_logits, self.classes).transpose(1, 2, 0))
    return VolumeSegmentation(target_logits, native_logits, present, prompts.astype(np.float32),
                              combine_masks(target_logits, self.classes), native)


# ---------------------------------------------------------------------------------------------------------------------
# The command


def zero_shot(weights_dir: str | Path, source_dir: str | Path, tfds_dir: str | Path, splits_file: str | Path,
              out_dir: str | Path, *, fold: str | None = None, prompt: str = "box", mode: str = "faithful",
              batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
  """Segments and scores the split's test patients; returns {"report", "table"} and writes them to `out_dir`.

  Everything is checked (arguments, weights, split, that the data holds every test patient) before the model runs,
  so a DataError or CheckpointError leaves `out_dir` untouched. Then `out_dir` is locked (OUT/.lock, one command at a
  time writes it; another is refused, naming the holder's pid) to the end, and nothing is written into it until every
  patient is scored.
  """
  import contextlib

  with contextlib.ExitStack() as stack:  # holds OUT's lock, once taken, to the end
    return _zero_shot(weights_dir, source_dir, tfds_dir, splits_file, out_dir, fold=fold, prompt=prompt, mode=mode,
                      batch_size=batch_size, progress=progress, stack=stack)


def _zero_shot(weights_dir, source_dir, tfds_dir, splits_file, out_dir, *, fold, prompt, mode, batch_size, progress,
               stack) -> dict[str, Any]:
  import jax

  from autosam_jax.atomic import atomic_write_bytes, atomic_write_json
  from autosam_jax.data.preprocess import PreprocessConfig, preprocess_volume
  from autosam_jax.data.splits import select_split
  from autosam_jax.data.volumes import load_volumes
  from autosam_jax.evaluation.evaluate import score_patient, summary_table
  from autosam_jax.evaluation.metrics import summarize
  from autosam_jax.evaluation.predict import label_nifti_bytes
  from autosam_jax.models.loading import load_sam, read_config
  from autosam_jax.outputs import check_folder, check_output_path

  check_options(mode, prompt, batch_size, flags=True)
  weights_dir, source_dir, splits_file = Path(weights_dir), Path(source_dir), Path(splits_file)
  out_dir = check_output_path(out_dir)
  check_folder(tfds_dir, "--tfds-dir")
  sam_config = read_config(weights_dir)  # fails fast, before the dataset build, on a directory that is not weights
  split = select_split(splits_file, fold)
  volumes, fingerprint, table, _ = load_volumes(source_dir, Path(tfds_dir))
  classes = table.foreground
  native_pixels = max((v.image.shape[0] * v.image.shape[1] for v in volumes.values()), default=0)
  check_memory(sam_config, batch_size, len(classes), native_pixels, flags=True)
  frames = sorted({v.frame for v in volumes.values() if v.frame})
  cases: dict[str, list[str]] = {}
  for case_id, volume in volumes.items():
    cases.setdefault(volume.patient_id, []).append(case_id)
  missing = [p for p in split.test if p not in cases]
  if missing:
    raise DataError(f"{splits_file}: test patients of split {split.name!r} not in {source_dir}: "
                    f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
  sam = load_sam(weights_dir)
  from autosam_jax.models.encoders import set_attention
  set_attention(sam.image_encoder, "auto", frozen=True)  # nothing is differentiated: cuDNN's attention where it applies
  config = PreprocessConfig.for_encoder(mode, sam.config)
  segmenter = ZeroShotSegmenter(sam, classes=tuple(classes), mode=mode, prompt=prompt, batch_size=batch_size)
  from autosam_jax.outputs import OutputLock

  stack.enter_context(OutputLock(out_dir, take=jax.process_index() == 0))  # everything checked

  bar = None
  if progress:
    from tqdm import tqdm
    total = sum(volumes[c].image.shape[2] for p in split.test for c in cases[p])
    bar = tqdm(total=total, unit="slice", desc=f"SAM zero-shot ({prompt}, {mode})", dynamic_ncols=True)
  patients: dict[str, Any] = {}
  official_results, standard_results, predictions = [], [], {}
  try:
    for patient_id in split.test:
      target_labels, targets, native = {}, {}, {}
      for case_id in sorted(cases[patient_id]):
        volume = volumes[case_id]
        pre = preprocess_volume(volume.image, volume.spacing, volume.label, config, name=case_id)
        result = segmenter.segment(pre, volume.label, on_batch=None if bar is None else bar.update)
        target_labels[case_id], native[case_id] = result.target_labels, result.native_labels
        targets[case_id] = pre.targets
      score = score_patient(patient_id, target_labels, targets, volumes, config, classes, native_predictions=native,
                            ignore=table.ignore)
      predictions.update(score.native)
      official_results.append(score.official)
      standard_results += list(score.standard.values())
      patients[patient_id] = {
          "official": score.official.to_dict(),
          "standard": {case_id: {"frame": volumes[case_id].frame, **result.to_dict()}
                       for case_id, result in score.standard.items()}}
  finally:
    if bar is not None:
      bar.close()

  summary = summarize(official_results + standard_results)
  report = {"method": "sam_zero_shot", "prompt": prompt, "mode": mode, "prompt_source": "ground truth",
            "weights": str(weights_dir), "data": str(source_dir), "dataset_fingerprint": fingerprint,
            "split": split.name, "test_patients": list(split.test), "labels": table.to_dict(),
            "classes": table.foreground_names, "sam_config": json.loads(sam.config.to_json()),
            "preprocess": config.to_dict(), "summary": summary, "patients": patients}
  for case_id, labels in predictions.items():
    atomic_write_bytes(out_dir / "predictions" / f"{case_id}.nii.gz",
                       label_nifti_bytes(volumes[case_id].to_stored(labels), volumes[case_id].affine))
  atomic_write_json(out_dir / "metrics.json", report)
  summary_md = summary_table(summary, table.foreground_names, frames)
  heading = f"SAM zero-shot, {prompt} prompts from the ground truth, {mode} mode, split {split.name}"
  atomic_write_bytes(out_dir / "metrics.md", f"{heading}\n\n{summary_md}\n".encode())
  return {"report": report, "table": summary_md}
