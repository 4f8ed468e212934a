"""The frozen SAM encoder run once over a dataset, its embeddings stored in a feature cache (`features/cache.py`).

Every slice gets its clean embedding (view 0); the training patients' slices also get K augmented views, seeded per
item, and S strong views (photometric only, views -1..-S: what semi-supervised training's student sees of a slice
whose clean features give the teacher's pseudo-labels). With store "inputs" the cache holds the encoder's inputs instead (an input cache, for LoRA runs). The encoder
is jitted with the batch sharded over the "data" mesh; host preprocessing of the next batch overlaps the device's
work, and each batch is read back once the next one is dispatched. Resumable shard by shard; under jax.distributed
each process takes every P-th shard.
The command and its options: `autosam_jax/commands/precompute.py`."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from autosam_jax.data.errors import DataError
from autosam_jax.models.loading import weights_digest
from autosam_jax.outputs import check_folder, check_output_path


@dataclasses.dataclass(frozen=True)
class PrecomputeOptions:
  mode: str = "faithful"
  views: int = 0
  strong_views: int = 0  # photometric views per training slice, for semi-supervised training (train/semi.py)
  dtype: str = "bfloat16"  # encoder matmuls and cache storage
  batch_size: int = 8
  seed: int = 0
  shard_size: int = 64
  # embeddings: the frozen encoder's output (what the heads train on); inputs: the encoder's inputs themselves, the
  # preprocessed (and augmented) slices, for training with the encoder in the loop (LoRA): kind "sam_inputs".
  store: str = "embeddings"


# What the options are called where the user gave them: on precompute's command line, or in a sweep config.
OPTION_NAMES = {"batch_size": "--batch-size", "shard_size": "--shard-size", "views": "--views",
                "strong_views": "--strong-views", "out": "--out",
                "tfds_dir": "--tfds-dir"}


def _count_items(volumes, view_patients: set[str], views: int) -> int:
  return sum(v.image.shape[2] * (1 + (views if v.patient_id in view_patients else 0)) for v in volumes.values())


def strong_views_text(config, options: PrecomputeOptions, num_slices: int) -> str:
  """What the strong views add to the cache, e.g. "strong views (semi-supervised): 4 of each of 120 training slices
  = 480 slices: 2.0 GiB"."""
  from autosam_jax.memory import size_text

  shapes = [(config.image_size, config.image_size, 3)] if options.store == "inputs" else \
      [s for maps in config.feature_shapes().values() for s in maps]
  per_item = sum(h * w * c for h, w, c in shapes) * (2 if options.dtype == "bfloat16" else 4)
  count = options.strong_views * num_slices
  return (f"strong views (semi-supervised): {options.strong_views} of each of {num_slices} training slices = {count} "
          f"slices: {size_text(per_item * count)}")


# Bytes of one work item in memory and in the manifest (its dict, its JSON text, the JSON of the whole manifest).
ITEM_BYTES = 1024


def check_memory(config, options: PrecomputeOptions, batch_size: int, num_items: int,
                 names: dict[str, str] = OPTION_NAMES) -> None:
  """Refuses, before anything is allocated, a batch or a shard that cannot fit in this machine's memory.

  An estimate from the sizes alone (a lower bound: the encoder's own activations come on top): two batches of
  encoder inputs (batch_size x S x S x 3 float32) in flight, the one on the device and the next one prepared, each
  held as a list of slices and as one stacked array; two batches' embeddings (batch_size x h x w x C float32) on the
  device (the one being read back and the next one) and one on the host; and a shard's embeddings, kept until the
  shard is whole, then joined and converted for writing (3 copies)."""
  from autosam_jax.memory import require_memory

  image_bytes = config.image_size * config.image_size * 3 * 4
  # every named map the encoder returns (SAM 2's high-resolution maps hold 3x the embedding's values)
  embedding_bytes = 4 * sum(h * w * c for shapes in config.feature_shapes().values() for h, w, c in shapes)
  if options.store == "inputs":  # the stored item is the encoder input
    embedding_bytes = image_bytes
  batch = batch_size * (4 * image_bytes + 3 * embedding_bytes)
  shard = 3 * min(options.shard_size, num_items) * embedding_bytes
  if batch >= shard:
    option, value = names["batch_size"], options.batch_size
  else:
    option, value = names["shard_size"], options.shard_size
  require_memory(batch + shard, f"{option} {value}", f"choose a smaller {option}")


def cached_maps_text(config, options: PrecomputeOptions, num_items: int) -> str:
  """What each cached slice holds and what the cache will take, e.g. "embedding 64x64x256 + high_res 256x256x32,
  128x128x64 = 6.0 MiB per slice in bfloat16; 120 slices: 720 MiB"."""
  from autosam_jax.memory import size_text

  if options.store == "inputs":
    shapes = {"input": [(config.image_size, config.image_size, 3)]}
  else:
    shapes = config.feature_shapes()
  values = sum(h * w * c for maps in shapes.values() for h, w, c in maps)
  per_item = values * (2 if options.dtype == "bfloat16" else 4)
  maps = " + ".join(f"{name} " + ", ".join(f"{h}x{w}x{c}" for h, w, c in m) for name, m in shapes.items())
  return f"{maps} = {size_text(per_item)} per slice in {options.dtype}; {num_items} slices: " \
         f"{size_text(per_item * num_items)}"


class _Preparer:
  """Host side: preprocesses volumes (once each), draws augmented views, builds encoder inputs per batch."""

  def __init__(self, volumes, preprocess_config, augment_config, seed: int):
    from autosam_jax.data.augment import AugmentConfig

    self.volumes = volumes
    self.preprocess_config = preprocess_config
    self.augment_config = augment_config
    self.strong_config = AugmentConfig.photometric()
    self.seed = seed
    self._cache: dict[str, Any] = {}

  def _volume(self, case_id: str):
    from autosam_jax.data.preprocess import preprocess_volume

    if case_id not in self._cache:
      if len(self._cache) > 8:
        self._cache.pop(next(iter(self._cache)))
      v = self.volumes[case_id]
      self._cache[case_id] = preprocess_volume(v.image, v.spacing, v.label, self.preprocess_config, name=case_id)
    return self._cache[case_id]

  def _view(self, item, pre):
    """(model image, target) of one item; view 0 is the clean slice."""
    import jax

    from autosam_jax.data.augment import augment_batch
    from autosam_jax.data.preprocess import improved_targets

    z = item["slice_index"]
    if item["view"] == 0:
      return pre.images[z], pre.targets[z]
    if item["view"] < 0:  # a strong view: intensity only, so the clean slice's target (and pseudo-labels) fit it
      key = jax.random.fold_in(jax.random.key(self.seed),
                               zlib.crc32(f"{item['case_id']}/{z}/strong{-item['view']}".encode()))
      image, _ = augment_batch(key, pre.images[z][None] / 255.0, np.zeros((1, *pre.images[z].shape[:2]), np.int32),
                               self.strong_config)
      return np.asarray(image[0]) * 255.0, pre.targets[z]
    key = jax.random.fold_in(jax.random.key(self.seed),
                             zlib.crc32(f"{item['case_id']}/{z}/{item['view']}".encode()))
    if self.preprocess_config.mode == "faithful":
      image, target = augment_batch(key, pre.images[z][None], pre.targets[z][None].astype(np.int32),
                                    self.augment_config)
      return np.asarray(image[0]), np.asarray(target[0]).astype(np.uint8)
    # improved: augment the native slice with its native label, then map the label to the target grid
    volume = self.volumes[item["case_id"]]
    image, label = augment_batch(key, pre.images[z][None] / 255.0, volume.label[:, :, z][None].astype(np.int32),
                                 self.augment_config)
    target = improved_targets(np.asarray(label[0]).astype(np.uint8)[:, :, None], pre.geometry)[0]
    return np.asarray(image[0]) * 255.0, target

  def batch(self, items: list[dict[str, Any]], batch_size: int):
    """Encoder inputs (batch_size, S, S, 3) (padded by repeating the last item), targets and validity masks."""
    import jax.numpy as jnp

    from autosam_jax.data.preprocess import encoder_input

    groups: dict[Any, list[np.ndarray]] = {}  # one encoder_input call per geometry (all of a batch in faithful mode)
    targets, valid, order = [], [], []
    for item in items:
      pre = self._volume(item["case_id"])
      image, target = self._view(item, pre)
      geometry_key = pre.geometry.model_shape if pre.geometry.mode == "improved" else "faithful"
      groups.setdefault(geometry_key, (pre.geometry, []))[1].append(image)
      order.append((geometry_key, len(groups[geometry_key][1]) - 1))
      targets.append(target)
      valid.append(pre.target_valid)
    encoded = {k: encoder_input(np.stack(images), geometry) for k, (geometry, images) in groups.items()}
    inputs = [encoded[k][i] for k, i in order]
    inputs += [inputs[-1]] * (batch_size - len(inputs))
    return jnp.stack(inputs), np.stack(targets), np.stack(valid)


def precompute(source_dir: str | Path, weights_dir: str | Path, out_dir: str | Path, *, tfds_dir: str | Path,
               options: PrecomputeOptions = PrecomputeOptions(), view_patients: set[str] | None = None,
               progress: bool = True, option_names: dict[str, str] | None = None,
               splits_file: str | Path | None = None, patients: set[str] | None = None,
               unlabeled_dir: str | Path | None = None) -> dict[str, Any]:
  """Computes (or finishes) the cache; returns a summary (items, seconds, images/s, bytes).

  `unlabeled_dir`: a folder of scans without labels (`data/scans.read_unlabeled`), cached with their strong views
  for semi-supervised training (which then learns from them too); recorded in the manifest with its files' digests.

  `patients`: only their slices (the sweep's: the patients its folds and training-set sizes use), recorded in the
  manifest; None: every patient's.

  The patients that get `options.views` augmented views: `view_patients`, or those some split of `splits_file`
  trains on (views need one of the two).

  `option_names` renames options in error messages (see OPTION_NAMES), for callers whose users set them elsewhere
  (the sweep's config). One process at a time writes OUT_DIR (OUT_DIR/.lock, taken once every input is checked)."""
  import contextlib

  with contextlib.ExitStack() as stack:  # holds OUT_DIR's lock, once taken, to the end
    return _precompute(source_dir, weights_dir, out_dir, tfds_dir=tfds_dir, options=options,
                       view_patients=view_patients, progress=progress, option_names=option_names, stack=stack,
                       splits_file=splits_file, patients=patients, unlabeled_dir=unlabeled_dir)


def _precompute(source_dir, weights_dir, out_dir, *, tfds_dir, options, view_patients, progress, option_names,
                stack, splits_file, patients, unlabeled_dir) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from autosam_jax.data.augment import AugmentConfig
  from autosam_jax.data.preprocess import PreprocessConfig
  from autosam_jax.data.volumes import load_volumes
  from autosam_jax.faults import kill_point
  from autosam_jax.features.cache import CacheWriter, open_cache, work_items
  from autosam_jax.models.loading import load_sam, read_config
  from autosam_jax.parallel import all_gather_objects, barrier, local_data_mesh

  names = {**OPTION_NAMES, **(option_names or {})}
  check_options(options, names)
  source_dir, weights_dir = Path(source_dir), Path(weights_dir)
  out_dir = check_output_path(out_dir, names["out"])
  check_folder(tfds_dir, names["tfds_dir"])
  if splits_file is not None:
    from autosam_jax.data.splits import load_splits
    view_patients = {p for split in load_splits(splits_file) for p in split.train}
  elif (options.views or options.strong_views) and view_patients is None:
    option = names["views"] if options.views else names["strong_views"]
    raise DataError(f"{option} needs --splits: only training patients get augmented views")
  config = read_config(weights_dir)
  preprocess_config = PreprocessConfig.for_encoder(options.mode, config)
  augment_config = AugmentConfig.for_mode(options.mode)
  process, num_processes = jax.process_index(), jax.process_count()
  if process != 0:
    barrier("autosam_jax.precompute.dataset_built")  # process 0 builds the TFDS dataset; the others then read it
  volumes, fingerprint, labels, references = load_volumes(source_dir, Path(tfds_dir), names["tfds_dir"])
  if process == 0:
    barrier("autosam_jax.precompute.dataset_built")
  view_patients = set(view_patients or ()) if options.views or options.strong_views else set()
  unknown = sorted(view_patients - {v.patient_id for v in volumes.values()})
  if unknown:
    raise DataError(f"{source_dir}: patients {unknown[:5]} of the split file are not in the dataset")
  if patients is not None:
    unknown = sorted(set(patients) - {v.patient_id for v in volumes.values()})
    if unknown or not patients:
      raise DataError(f"{source_dir}: patients {unknown[:5]} to encode are not in the dataset" if unknown else
                      f"{source_dir}: an empty set of patients to encode")
    volumes = {key: volume for key, volume in volumes.items() if volume.patient_id in patients}
    view_patients &= set(patients)
  extra: dict[str, Any] = {}
  if unlabeled_dir is not None:
    from autosam_jax.data.scans import read_unlabeled

    option = names.get("unlabeled_dir", "--unlabeled")
    if not options.strong_views:
      raise DataError(f"{option} {unlabeled_dir}: unlabeled scans are cached for semi-supervised training, which "
                      f"learns from their strong views; give {names['strong_views']} (e.g. 4) too")
    extra = read_unlabeled(unlabeled_dir, references)
    volumes = {**volumes, **extra}
  if options.views or options.strong_views:
    from autosam_jax.memory import require_memory
    option = names["views"] if options.views else names["strong_views"]
    require_memory(_count_items(volumes, view_patients, options.views + options.strong_views) * ITEM_BYTES,
                   f"{option} {options.views or options.strong_views}", f"choose fewer {option}")
  items = work_items(volumes, view_patients, options.views, options.strong_views, strong_patients=set(extra))
  inputs_only = options.store == "inputs"
  depends_on = {**({"kind": "sam_inputs"} if inputs_only else {}), "weights_sha256": weights_digest(weights_dir),
                "sam_config": json.loads(config.to_json()),
                "preprocess": preprocess_config.to_dict(), "dataset_fingerprint": fingerprint,
                "views": options.views, "view_patients": sorted(view_patients), "seed": options.seed,
                "augment": augment_config.to_dict() if options.views else None, "dtype": options.dtype,
                "labels": labels.to_dict(), "orientation_references": references,
                **({"strong_views": options.strong_views,
                    "strong_augment": AugmentConfig.photometric().to_dict()} if options.strong_views else {}),
                **({"unlabeled": _unlabeled_record(unlabeled_dir, extra)} if extra else {}),
                **({"patients": sorted(patients)} if patients is not None else {})}
  # The weights are loaded before the cache directory is created: unusable weights leave nothing behind.
  mesh = local_data_mesh()
  devices = mesh.devices.ravel()
  batch_size = -(-options.batch_size // len(devices)) * len(devices)
  check_memory(config, options, batch_size, len(items), names)
  feature_maps = ("embedding",) if inputs_only else config.feature_names
  encoder_dtype = jnp.bfloat16 if options.dtype == "bfloat16" else None
  if inputs_only:  # no encoder runs; the weights a LoRA run will adapt are checked whole (and digested above)
    from autosam_jax.checksums import verify_checksums
    from autosam_jax.errors import CheckpointError
    verify_checksums(weights_dir, CheckpointError,
                     f"convert the SAM weights again (autosam-jax convert CHECKPOINT {weights_dir})")
  else:
    sam = load_sam(weights_dir, encoder_dtype=encoder_dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    from autosam_jax.models.encoders import set_attention
    set_attention(sam.image_encoder, "auto", frozen=True)  # a forward only: cuDNN's attention on CUDA in bf16
  # Process 0 checks the folder, locks it and clears temporary files before the others open the cache; every process
  # learns its outcome, so a refusal stops them all (instead of leaving them at a barrier).
  refusal = None
  if process == 0:
    try:
      writer = open_cache(stack, out_dir, depends_on, items, options.shard_size, options.dtype, feature_maps)
    except DataError as err:
      refusal = err
  reason = all_gather_objects(None if refusal is None else str(refusal))[0]
  if refusal is not None:
    raise refusal
  if reason is not None:
    raise DataError(reason)
  if process != 0:
    writer = CacheWriter(out_dir, depends_on, items, options.shard_size, options.dtype, clean_up=False,
                         feature_maps=feature_maps)
  todo = [s for s in range(writer.num_shards) if s % num_processes == process and not writer.shard_done(s)]
  data_sharding = NamedSharding(mesh, PartitionSpec("data"))
  if inputs_only:
    state, encode = None, lambda state, images: (images,)
  else:
    graphdef, state = nnx.split(sam.image_encoder)

    from autosam_jax.models.encoders import encoder_features

    @jax.jit
    def encode(state, images):
      features = encoder_features(nnx.merge(graphdef, state), images)
      return (features["embedding"], *features.get("high_res", ()))

  preparer = _Preparer(volumes, preprocess_config, augment_config, options.seed)
  batches: list[tuple[int, list[dict[str, Any]]]] = []
  for shard in todo:
    shard_items = writer.shard_items(shard)
    for start in range(0, len(shard_items), batch_size):
      batches.append((shard, shard_items[start:start + batch_size]))

  total = sum(len(b) for _, b in batches)
  bar = None
  if progress and total and process == 0:  # every input checked and the cache opened: what it will hold
    import sys
    print(f"caching {cached_maps_text(config, options, len(items))}", file=sys.stderr, flush=True)
    if options.strong_views:
      strong = sum(1 for it in items if it["view"] < 0) // options.strong_views
      print(f"  of which {strong_views_text(config, options, strong)}", file=sys.stderr, flush=True)
  if progress and total:
    from tqdm import tqdm
    bar = tqdm(total=total, unit="slice", desc=f"encoding ({len(todo)} shards to write)", dynamic_ncols=True)
  start_time = time.perf_counter()
  pending: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}

  def collect(shard, items, maps, targets, valid) -> None:
    """A dispatched batch read back, and its shard written once whole. `maps`: the embeddings, then SAM 2's
    high-resolution maps where the encoder returns them."""
    maps = [np.asarray(m)[:len(items)] for m in maps]
    pending.setdefault(shard, []).append((maps[0], targets, valid, *maps[1:]))
    if sum(len(p[0]) for p in pending[shard]) == len(writer.shard_items(shard)):
      parts = pending.pop(shard)
      whole = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
      writer.write_shard(shard, *whole[:3], high_res=whole[3:])
      kill_point("precompute.shard")  # the shard is whole: its files and its .done record are in place
    if bar is not None:
      bar.update(len(items))

  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    prepared = [pool.submit(preparer.batch, items, batch_size) for _, items in batches[:1]]
    in_flight = None
    for i, (shard, items) in enumerate(batches):
      inputs, targets, valid = prepared[0].result()
      prepared = [pool.submit(preparer.batch, batches[i + 1][1], batch_size)] if i + 1 < len(batches) else []
      embeddings = encode(state, jax.device_put(inputs, data_sharding))
      # The previous batch is read back only once this one is dispatched: the device encodes while the host copies
      # and writes, instead of waiting for each read.
      if in_flight is not None:
        collect(*in_flight)
      in_flight = (shard, items, embeddings, targets, valid)
    if in_flight is not None:
      collect(*in_flight)
  seconds = time.perf_counter() - start_time
  if bar is not None:
    bar.close()
  barrier("autosam_jax.precompute.shards_written")
  if process == 0:
    writer.finalize()
  size = sum(p.stat().st_size for p in (out_dir / "shards").glob("*.npy"))
  return {"items": len(writer.items), "computed": total, "seconds": seconds,
          "images_per_second": total / seconds if seconds > 0 and total else 0.0, "bytes": size,
          "shards": writer.num_shards, "devices": len(devices), "processes": num_processes}


def _unlabeled_record(folder, volumes) -> dict[str, Any]:
  """What the cache's unlabeled scans were made from: the folder, and each patient's file digest."""
  from autosam_jax.outputs import file_digest

  folder = Path(folder)
  files = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()
           and p.name.endswith((".nii", ".nii.gz"))}
  return {"folder": str(folder.absolute()), "files": files, "patients": sorted(volumes)}


def check_options(options: PrecomputeOptions, names: dict[str, str] = OPTION_NAMES) -> None:
  """Refuses a count or size out of range (or not an integer), naming the option as the user gave it."""
  for field, least in (("batch_size", 1), ("shard_size", 1), ("views", 0), ("strong_views", 0), ("seed", 0)):
    value = getattr(options, field)
    name = names.get(field, f"--{field.replace('_', '-')}")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
      raise DataError(f"{name} must be {'a positive integer' if least else 'an integer, 0 or more'}, got {value!r}")
  if options.seed >= 2 ** 63:  # jax.random.key takes a 64-bit signed seed
    raise DataError(f"{names.get('seed', '--seed')} must be below 2**63, got {options.seed}")
  if options.mode not in ("faithful", "improved"):
    raise DataError(f"mode must be 'faithful' or 'improved', got {options.mode!r}")
  if options.dtype not in ("bfloat16", "float32"):
    raise DataError(f"dtype must be 'bfloat16' or 'float32', got {options.dtype!r}")
  if options.store not in ("embeddings", "inputs"):
    raise DataError(f"store must be 'embeddings' or 'inputs', got {options.store!r}")
