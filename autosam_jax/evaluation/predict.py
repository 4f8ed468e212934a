"""NIfTI in, NIfTI out: a trained model segments images end to end (the encoder included, no cache).

Each scan is sliced along its through-plane axis in the canonical voxel order of its own header and the labels are
mapped back to the file's voxel order; every input is checked and the model loaded before anything is written. The
command and its naming rules: `autosam_jax/commands/predict.py`."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from autosam_jax.data.errors import DataError
from autosam_jax.models.trained import read_train_config

from autosam_jax.data.scans import input_cases, input_files  # the folders of scans predict takes


def make_head_forward(head, target_size: int, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """A function (N, h, w, C) embeddings -> (N, T, T, classes) float32 logits on the target grid; for a head that
  adds SAM 2's high-resolution maps (`uses_high_res`), the function takes {"embedding": ..., "high_res": [...]}.

  Jitted once: batches are padded to `batch_size` so the last one does not recompile. The logits are resized to the
  target grid exactly as in training (bilinear, no anti-aliasing: 256 -> 224 in faithful mode).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, state = nnx.split(head)
  uses_high_res = getattr(head, "uses_high_res", False)

  @jax.jit
  def forward(state, embedding, high_res):
    model = nnx.merge(graphdef, state)
    logits = model(embedding, high_res) if uses_high_res else model(embedding)
    if logits.shape[1] != target_size:
      logits = jax.image.resize(logits, (logits.shape[0], target_size, target_size, logits.shape[3]), "bilinear",
                                antialias=False)
    return logits.astype(jnp.float32)

  def run(features) -> np.ndarray:
    embeddings = features["embedding"] if isinstance(features, dict) else features
    high_res = features.get("high_res") if isinstance(features, dict) else None
    if uses_high_res and high_res is None:
      raise ValueError("this head adds SAM 2's high-resolution maps; give {'embedding': ..., 'high_res': [...]}")
    outputs = []
    for start in range(0, len(embeddings), batch_size):
      def batch(maps):
        chunk = np.asarray(maps[start:start + batch_size], np.float32)
        missing = batch_size - len(chunk)
        return np.concatenate([chunk, np.zeros((missing, *chunk.shape[1:]), chunk.dtype)]) if missing else chunk
      missing = batch_size - len(embeddings[start:start + batch_size])
      chunk_high_res = [batch(m) for m in high_res] if uses_high_res else None
      outputs.append(np.asarray(forward(state, batch(embeddings), chunk_high_res))[:batch_size - missing])
    return np.concatenate(outputs)

  return run


def native_labels(predictions: np.ndarray, geometry) -> np.ndarray:
  """(Z, T, T, C) logits or (Z, T, T) labels on the target grid -> (X, Y, Z) uint8 labels on the native grid.

  Logits are resized before the argmax (not labels after it), so class boundaries fall between native pixels where
  the scores cross rather than on the coarse target grid.
  """
  from autosam_jax.data.preprocess import to_native

  native = to_native(predictions, geometry)
  if np.issubdtype(native.dtype, np.floating):
    native = native.argmax(-1)
  return np.ascontiguousarray(native.astype(np.uint8).transpose(1, 2, 0))


def label_nifti_bytes(labels: np.ndarray, affine: np.ndarray, header=None, compressed: bool = True) -> bytes:
  """The bytes of a uint8 label NIfTI with the given geometry (header copied from the input when there is one)."""
  import nibabel as nib

  header = header.copy() if header is not None else None
  image = nib.Nifti1Image(np.asarray(labels, np.uint8), affine, header)
  image.header.set_data_dtype(np.uint8)
  # An input image's intensity scaling must not be applied to the labels.
  image.header.set_slope_inter(1.0, 0.0)
  data = image.to_bytes()
  return gzip.compress(data, compresslevel=6, mtime=0) if compressed else data


def preprocess_config_for(train_config, sam_config, cache_dir: Path | None, weights_digest: str | None = None,
                          model_dir: Path | None = None):
  """The PreprocessConfig the model was trained with: from the cache's manifest when given, else from the model's
  preprocess.json (written since models record it), else rebuilt from the defaults."""
  from autosam_jax.data.preprocess import PreprocessConfig

  saved = None if model_dir is None else Path(model_dir) / "preprocess.json"
  if cache_dir is None and saved is not None and saved.is_file():
    try:
      config = PreprocessConfig.from_dict(json.loads(saved.read_text()))
    except (OSError, ValueError, TypeError, DataError) as err:
      raise DataError(f"{saved}: unusable preprocessing record ({err}); retrain, or give --cache") from None
    if config.mode != train_config.variant:
      raise DataError(f"{saved}: records {config.mode} preprocessing for a {train_config.variant} model")
    if sam_config is not None and config.encoder_size != sam_config.image_size:
      raise DataError(f"{saved}: the model was trained with a {config.encoder_size}-pixel encoder input, but the "
                      f"given SAM takes {sam_config.image_size}; give the weights it was trained with")
    return config
  if cache_dir is None:
    if sam_config is None:  # the UNet: faithful model images, no encoder
      return PreprocessConfig(mode=train_config.variant)
    return PreprocessConfig.for_encoder(train_config.variant, sam_config)
  manifest_file = Path(cache_dir) / "manifest.json"
  try:
    depends_on = json.loads(manifest_file.read_text())["depends_on"]
  except FileNotFoundError:
    raise DataError(f"{manifest_file}: missing; --cache must be a feature cache (autosam-jax precompute)") from None
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise DataError(f"{manifest_file}: unreadable cache manifest ({type(err).__name__}: {err})") from None
  check_cache_matches(depends_on, train_config, sam_config, str(manifest_file), weights_digest)
  return preprocess_config_from_manifest(depends_on)


def preprocess_config_from_manifest(depends_on: dict[str, Any]):
  """The PreprocessConfig a cache was computed with."""
  from autosam_jax.data.preprocess import PreprocessConfig

  return PreprocessConfig.from_dict(depends_on["preprocess"])


def check_cache_matches(depends_on: dict[str, Any], train_config, sam_config, where: str,
                        weights_digest: str | None = None) -> None:
  """A cache made with another SAM or in another mode than the model would silently give wrong predictions; an image
  cache feeds only the UNet, an input cache only LoRA models, and a SAM feature cache only the frozen-encoder
  heads."""
  from autosam_jax.models.trained import cache_kind, kind_refusal

  refusal = kind_refusal(where, depends_on, train_config)
  if refusal is not None:
    raise refusal
  images = cache_kind(depends_on) == "images"
  if not images and depends_on.get("sam_config") != json.loads(sam_config.to_json()):
    raise DataError(f"{where}: the cache was computed with {encoder_name(depends_on.get('sam_config'))}, --weights "
                    f"holds {sam_config.family_name}; give the --weights it was computed with, or precompute again "
                    "with these")
  if not images and weights_digest and depends_on.get("weights_sha256") not in (None, "", weights_digest):
    raise DataError(f"{where}: the cache was computed from other SAM weights than --weights (same architecture, "
                    "other checkpoint); give the --weights it was computed with, or precompute again with these")
  mode = (depends_on.get("preprocess") or {}).get("mode")
  if mode != train_config.variant:
    raise DataError(f"{where}: the cache is in {mode!r} mode but the model was trained as {train_config.variant!r}")


def encoder_name(values: Any) -> str:
  """The encoder a recorded SamConfig (a cache's or a model's) describes, as people name it."""
  from autosam_jax.models.config import SamConfig

  try:
    return SamConfig.from_dict(values, source="record").family_name
  except (DataError, TypeError, ValueError):
    return "another SAM"


def read_model_record(model_dir: str | os.PathLike) -> dict[str, Any]:
  """model.json of a saved model, with its label table parsed ("labels" becomes a LabelTable); DataError if absent
  (a model saved before models recorded their classes) or unreadable."""
  from autosam_jax.data.labels import LabelTable

  if not Path(model_dir).is_dir():
    raise DataError(f"{model_dir}: no such model directory; give a run's final_model/ or best_model/")
  if not (Path(model_dir) / "train_config.json").is_file():
    raise DataError(f"{Path(model_dir) / 'train_config.json'}: missing; give a run's final_model/ or best_model/ "
                    "directory")
  path = Path(model_dir) / "model.json"
  if not path.is_file():
    raise DataError(f"{path}: missing (a model saved by an older version records no classes); train it again")
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise DataError(f"{path}: unreadable ({type(err).__name__}: {err}); train the model again") from None
  if not isinstance(record, dict):
    raise DataError(f"{path}: not a model record (a JSON object was expected); train the model again")
  record = dict(record)
  record["labels"] = LabelTable.from_dict(record.get("labels"), f"{path} (labels)")
  return record


def load_model(model_dir: Path, weights_dir: Path | None, encoder: bool):
  """(sam, head, train_config); DataError or CheckpointError (both one line naming the path) when unusable.

  `head` maps the items of the model's cache to logits: embeddings for a frozen-encoder head, model images for the
  UNet, encoder inputs for a LoRA model (its `AdaptedSam`). With `encoder`, `sam` is the SAM that makes the head's
  inputs from images, and `head` takes embeddings: for a LoRA model its encoder is the adapted one and `head` the
  model's head. A UNet needs no SAM: `weights_dir` is ignored for it and `sam` is None.

  A LoRA model is used unmerged, its factors beside the base weights: the forward its validation ran, in its dtype
  and with its attention. Merging (`models.lora.merge_lora`) would be cheaper, but in bf16 (or TF32) the merged
  kernel's rounding changes the update by a sizeable fraction of itself: another network than the one validated.
  A frozen SAM's encoder takes the attention precompute took ("auto" for a frozen forward), so that its embeddings
  are the cache's.
  """
  from autosam_jax.models.encoders import set_attention
  from autosam_jax.models.loading import load_sam, read_config, weights_digest
  from autosam_jax.models.trained import jnp_dtype, restore_head

  train_config = read_train_config(model_dir)
  record = read_model_record(model_dir)
  if record["labels"].num_classes != train_config.num_classes:
    raise DataError(f"{Path(model_dir) / 'model.json'}: records {record['labels'].num_classes} classes but "
                    f"train_config.json {train_config.num_classes}; the model directory is damaged, train it again")
  if train_config.head == "unet":
    return None, restore_head(model_dir, train_config, None), train_config
  if weights_dir is None:
    from autosam_jax.models.trained import a_head
    raise DataError(f"{model_dir}: {a_head(train_config.head)} needs --weights (the converted SAM it was trained with)")
  given = read_config(weights_dir)  # fails fast, before the (slow) restore, on a directory that is not weights
  trained_on = record.get("sam_config")
  if trained_on and trained_on != json.loads(given.to_json()):
    raise DataError(f"{weights_dir}: holds {given.family_name}, but {model_dir} was trained on "
                    f"{encoder_name(trained_on)}; give the converted weights it was trained with")
  if record.get("weights_sha256"):
    if weights_digest(Path(weights_dir)) not in ("", record["weights_sha256"]):
      raise DataError(f"{weights_dir}: other SAM weights than the ones {model_dir} was trained on (their SHA-256 "
                      "differs); give the converted weights the model's cache was computed with")
  # The encoder in the dtype the training embeddings were computed in: a head trained on bf16 features is applied to
  # bf16 features, not to slightly different fp32 ones.
  sam = load_sam(weights_dir, encoder_dtype=jnp_dtype(record.get("encoder_dtype")))
  head = restore_head(model_dir, train_config, sam)
  if train_config.lora:
    sam.image_encoder = head.encoder  # the restored model is a copy: sam's own encoder holds the initial factors
    if encoder:
      head = head.head
  else:
    set_attention(sam.image_encoder, "auto", frozen=True)
  if not encoder:
    sam = None
  return sam, head, train_config


def predict_volume(image: np.ndarray, spacing, sam, forward, config, batch_size: int, name: str,
                   orientation=None) -> np.ndarray:
  """(X, Y, Z) image -> (X, Y, Z) uint8 labels on the same grid, slicing along the last axis.

  With an `Orientation` (`autosam_jax.data.orientation`), `image` and `spacing` are in the stored voxel order: the
  volume is sliced in its canonical order, as the training data was, and the labels come back in the stored order.
  """
  if orientation is not None:
    labels = predict_volume(orientation.to_canonical(image), orientation.canonical_spacing(spacing), sam, forward,
                            config, batch_size, name)
    return np.ascontiguousarray(orientation.to_stored(labels))
  import jax.numpy as jnp

  from autosam_jax.data.preprocess import encoder_input, preprocess_volume

  pre = preprocess_volume(image, spacing, None, config, name=name)
  if sam is None:  # the UNet reads the model images themselves
    return native_labels(forward(pre.images), pre.geometry)
  parts: list[dict] = []
  for start in range(0, len(pre.images), batch_size):
    chunk = pre.images[start:start + batch_size]
    missing = batch_size - len(chunk)
    if missing:  # one encoder compilation per geometry, not one more for the last batch
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], missing, axis=0)])
    features = sam.encode(jnp.asarray(encoder_input(chunk, pre.geometry)))
    features = features if isinstance(features, dict) else {"embedding": features}  # SAM 2: its named maps
    parts.append({"embedding": np.asarray(features["embedding"])[:batch_size - missing],
                  "high_res": [np.asarray(m)[:batch_size - missing] for m in features.get("high_res", ())]})
  logits = forward({"embedding": np.concatenate([p["embedding"] for p in parts]),
                    "high_res": [np.concatenate(maps) for maps in zip(*(p["high_res"] for p in parts))] or None})
  return native_labels(logits, pre.geometry)


def predict(model_dir: Path, weights_dir: Path | None, inputs: Path, output_dir: Path, *, cache_dir: Path | None = None,
            batch_size: int = 4) -> list[Path]:
  """Writes one label map per input; returns the written paths. Raises DataError/CheckpointError before writing."""
  from autosam_jax.atomic import atomic_write_bytes
  from autosam_jax.data.nifti import read_nifti
  from autosam_jax.data.orientation import orientation_for
  from autosam_jax.data.preprocess import preprocess_volume

  if batch_size < 1:
    raise DataError(f"--batch-size must be positive, got {batch_size}")
  files = input_files(Path(inputs))
  cases = input_cases(files)
  output_dir = Path(output_dir)
  from autosam_jax.outputs import check_output_path
  check_output_path(output_dir, "--output")
  inputs_by_path = {f.resolve(): f for f in files}
  collisions = [inputs_by_path[(output_dir / c.output_name).resolve()] for c in cases
                if (output_dir / c.output_name).resolve() in inputs_by_path]
  if collisions:
    raise DataError(f"{collisions[0]}: --output would overwrite this input; choose another output folder")

  # New scans are cut in the frames the training data was cut in (recorded with the model), so a stack planned a few
  # degrees from the training scans is not segmented transposed or mirrored.
  references = read_model_record(model_dir).get("orientation_references")

  def read(path: Path):
    volume = read_nifti(path)
    return volume, orientation_for(volume.affine, volume.spacing, references, path)

  sam, head, train_config = load_model(Path(model_dir), None if weights_dir is None else Path(weights_dir),
                                       encoder=True)
  digest = None
  if sam is not None and cache_dir is not None:
    from autosam_jax.models.loading import weights_digest
    digest = weights_digest(Path(weights_dir))
  config = preprocess_config_for(train_config, None if sam is None else sam.config, cache_dir, digest, Path(model_dir))
  # Reading every file now (and again below, to keep memory to one volume) so a bad one anywhere writes nothing.
  for case in cases:
    volume, orientation = read(case.path)
    preprocess_volume(orientation.to_canonical(volume.data)[:, :, :1], orientation.canonical_spacing(volume.spacing),
                      None, config, name=str(case.path))
  forward = make_head_forward(head, config.target_size, batch_size)
  written = []
  for case in cases:
    volume, orientation = read(case.path)
    labels = predict_volume(volume.data, volume.spacing, sam, forward, config, batch_size, str(case.path),
                            orientation=orientation)
    out = output_dir / case.output_name
    atomic_write_bytes(out, label_nifti_bytes(labels, volume.affine, volume.header, out.name.endswith(".gz")))
    written.append(out)
  return written
