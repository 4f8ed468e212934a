"""The on-disk feature cache: shards of embeddings with their head targets, and a manifest of what they depend on.

CACHE_DIR/
  manifest.json          format, what the features depend on, the ordered item list, shard size; "complete" once
                         every shard is written
  shards/NNNNN.emb.npy   (n, h, w, C) embeddings, bfloat16 (stored as its uint16 bit pattern) or float32; in an
                         input cache (depends_on kind "sam_inputs") the (n, S, S, 3) encoder inputs, in an image
                         cache (kind "images") the (n, T, T, 3) model images
  shards/NNNNN.hr0.npy   SAM 2's high-resolution maps (n, 4h, 4w, C/8) and (n, 2h, 2w, C/4), stored as the embeddings,
  shards/NNNNN.hr1.npy   where the encoder returns them (the manifest's "feature_maps" then lists "high_res")
  shards/NNNNN.tgt.npy   (n, T, T) uint8 head targets
  shards/NNNNN.val.npy   (n, T, T) bool, target pixels that hold image (all true in faithful mode)
  shards/NNNNN.done      JSON with each file's SHA-256; written last, so a shard counts only once it is whole
                         (a record that is damaged, or whose files are gone, counts as a shard not yet written)

Every file is written under a temporary name and renamed into place, so a kill at any moment leaves either a whole
shard or none. Items are (case, slice, view); view 0 is the exact embedding of the clean slice, views 1..K are
augmented copies of labeled training slices.
"""

from __future__ import annotations

import threading
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import ml_dtypes
import numpy as np

from autosam_jax.atomic import atomic_write_bytes, atomic_write_json
from autosam_jax.data.errors import DataError
from autosam_jax.outputs import LOCK_NAME, file_digest

FORMAT = "autosam-jax/feature-cache"
VERSION = 1
_PARTS = ("emb", "tgt", "val")
HIGH_RES_PARTS = ("hr0", "hr1")
# The parts holding feature maps (stored in the cache's storage dtype, 3 dimensions past the rows).
_MAP_PARTS = ("emb",) + HIGH_RES_PARTS


def parts_of(manifest: dict[str, Any]) -> tuple[str, ...]:
  """The files of each shard of a cache with this manifest."""
  return _PARTS + (HIGH_RES_PARTS if "high_res" in manifest.get("feature_maps", ()) else ())


def _npy_bytes(array: np.ndarray) -> bytes:
  import io

  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


_HEX = frozenset("0123456789abcdef")
_ITEM_KEYS = {"case_id": str, "patient_id": str, "slice_index": int, "view": int}


def _int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def manifest_problem(manifest: Any) -> str | None:
  """What makes a parsed manifest.json unusable (wrong type, a missing or malformed field), or None."""
  if not isinstance(manifest, dict):
    return f"a JSON {type(manifest).__name__}, not an object"
  if manifest.get("format") != FORMAT:
    return f"format is {manifest.get('format')!r}, not {FORMAT!r}"
  if manifest.get("version") != VERSION:
    return f"format version {manifest.get('version')!r}, this code reads version {VERSION}"
  depends_on = manifest.get("depends_on")
  if not isinstance(depends_on, dict):
    return "no depends_on record"
  if "views" in depends_on and not (_int(depends_on["views"]) and depends_on["views"] >= 0):
    return f"depends_on.views is {depends_on['views']!r}"
  if "view_patients" in depends_on and not (isinstance(depends_on["view_patients"], list)
                                            and all(isinstance(p, str) for p in depends_on["view_patients"])):
    return "depends_on.view_patients is not a list of patient ids"
  maps = manifest.get("feature_maps", ["embedding"])
  if not isinstance(maps, list) or not set(maps) <= {"embedding", "high_res"} or "embedding" not in maps:
    return f"feature_maps is {maps!r}"
  if manifest.get("storage_dtype") not in ("bfloat16", "float32"):
    return f"storage_dtype is {manifest.get('storage_dtype')!r}"
  shard_size = manifest.get("shard_size")
  if not _int(shard_size) or shard_size < 1:
    return f"shard_size is {shard_size!r}"
  if not isinstance(manifest.get("complete", False), bool):
    return f"complete is {manifest.get('complete')!r}"
  items = manifest.get("items")
  if not isinstance(items, list):
    return "no items list" if items is None else f"items is a {type(items).__name__}, not a list"
  for index, item in enumerate(items):
    if not isinstance(item, dict) or any(not isinstance(item.get(k), t) or isinstance(item.get(k), bool)
                                         for k, t in _ITEM_KEYS.items()):
      return f"item {index} is not a {{case_id, patient_id, slice_index, view}} record: {str(item)[:60]}"
  if "num_items" in manifest and manifest["num_items"] != len(items):
    return f"num_items is {manifest['num_items']!r} but {len(items)} items are listed"
  return None


def _read_json(path: Path) -> tuple[Any, str | None]:
  """(the parsed contents, None), or (None, why the file cannot be read as JSON)."""
  try:
    return json.loads(path.read_bytes().decode()), None
  except OSError as err:
    return None, f"unreadable: {err.strerror or err}"
  except UnicodeDecodeError:
    return None, "not text"
  except json.JSONDecodeError as err:
    return None, f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"


def read_manifest(path: Path, *, damaged: str, foreign: str) -> dict[str, Any]:
  """The manifest; a DataError naming the file if it is another program's (`foreign`: what to do then) or damaged
  (`damaged`: what to do then)."""
  manifest, problem = _read_json(path)
  if problem is None and isinstance(manifest, dict) and manifest.get("format") != FORMAT:
    raise DataError(f"{path}: not an autosam-jax feature cache (format {str(manifest.get('format'))[:40]!r}); "
                    f"{foreign}")
  problem = problem or manifest_problem(manifest)
  if problem:
    raise DataError(f"{path}: damaged cache manifest ({problem}); {damaged}")
  return manifest


def read_shard_record(path: Path, parts: tuple[str, ...] = _PARTS) -> tuple[dict[str, str] | None, str | None]:
  """(the SHA-256 of each of a shard's files, None) from its .done record, or (None, what is wrong with it)."""
  record, problem = _read_json(path)
  if problem:
    return None, problem
  if not isinstance(record, dict):
    return None, f"a JSON {type(record).__name__}, not an object"
  for part in parts:
    digest = record.get(part)
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
      return None, f"no SHA-256 for the {part} file"
  return {part: record[part] for part in parts}, None


def work_items(volumes, view_patients: set[str], views: int, strong_views: int = 0,
               strong_patients: set[str] = frozenset()) -> list[dict[str, Any]]:
  """The items of a cache of `volumes` (case id -> Volume), in (case, view, slice) order: every slice's clean view 0,
  and `views` augmented views (1..views) and `strong_views` photometric views (-1..-strong_views, for
  semi-supervised training) more of the slices of `view_patients`; `strong_patients` (scans without labels) get the
  strong views only."""
  items = []
  for case_id, volume in volumes.items():
    extra = volume.patient_id in view_patients
    strong = extra or volume.patient_id in strong_patients
    for view in [*range(1 + (views if extra else 0)), *(range(-1, -strong_views - 1, -1) if strong else ())]:
      for z in range(volume.image.shape[2]):
        items.append({"case_id": case_id, "patient_id": volume.patient_id, "frame": volume.frame, "slice_index": z,
                      "view": view})
  return items


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
  keys = sorted(set(old) | set(new))
  changed = [k for k in keys if old.get(k) != new.get(k)]
  return ", ".join(f"{k} (cache: {str(old.get(k))[:60]}, now: {str(new.get(k))[:60]})" for k in changed[:3])


class CacheWriter:
  """Creates or resumes a cache for the given inputs; refuses a cache made from other inputs."""

  def __init__(self, cache_dir: str | os.PathLike, depends_on: dict[str, Any], items: Sequence[dict[str, Any]],
               shard_size: int, storage_dtype: str, clean_up: bool = True,
               feature_maps: Sequence[str] = ("embedding",)):
    self.cache_dir = Path(cache_dir)
    self.shard_dir = self.cache_dir / "shards"
    self.items = list(items)
    self.shard_size = shard_size
    self.storage_dtype = storage_dtype
    manifest_path = self.cache_dir / "manifest.json"
    self.manifest = {"format": FORMAT, "version": VERSION, "depends_on": depends_on, "storage_dtype": storage_dtype,
                     "shard_size": shard_size, "num_items": len(self.items), "items": self.items, "complete": False}
    if tuple(feature_maps) != ("embedding",):  # a cache of the embedding alone is written as before maps had names
      self.manifest["feature_maps"] = list(feature_maps)
    self.parts = parts_of(self.manifest)
    if manifest_path.exists():
      # The manifest is written whole (renamed into place) before any shard, so a damaged one was damaged from
      # outside: what the shards beside it were computed from is unknown, and nothing here is redone or deleted.
      existing = read_manifest(manifest_path, foreign="choose another --out",
                               damaged="write the cache into a new --out, or delete this cache directory and rerun")
      comparable = {k: existing.get(k) for k in ("depends_on", "storage_dtype", "shard_size", "items",
                                                 "feature_maps")}
      wanted = {k: self.manifest.get(k) for k in comparable}
      if comparable != wanted:
        detail = describe_difference(existing.get("depends_on") or {}, depends_on) or "its item list or shard layout"
        raise DataError(f"{self.cache_dir}: a feature cache built from other inputs ({detail}); delete it or choose "
                        "another --out")
      self.manifest["complete"] = existing.get("complete", False)
    else:
      if self.cache_dir.is_dir():
        # A cache is written into a new folder; a first run killed before its manifest was in place leaves no more
        # than shards/, temporary files and the lock file (autosam_jax.outputs.OutputLock) of its writer.
        temporary = lambda p: p.name.startswith(".") and p.name.endswith(".tmp")
        foreign = sorted(p.name for p in self.cache_dir.iterdir()
                         if p.name not in ("shards", LOCK_NAME) and not temporary(p))
        if self.shard_dir.is_dir():
          foreign += sorted(f"shards/{p.name}" for p in self.shard_dir.iterdir() if not temporary(p))
        if foreign:
          shown = ", ".join(foreign[:4]) + (" ..." if len(foreign) > 4 else "")
          raise DataError(f"{self.cache_dir}: is not empty ({shown}) and holds no feature cache (no manifest.json); "
                          "choose a new or empty --out")
      self.cache_dir.mkdir(parents=True, exist_ok=True)
    self.shard_dir.mkdir(parents=True, exist_ok=True)
    if clean_up:  # temporary files left by a killed run (only one process may do this, before the others start)
      for stale in self.shard_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    if not manifest_path.exists():
      atomic_write_json(manifest_path, self.manifest, indent=None)

  @property
  def num_shards(self) -> int:
    return -(-len(self.items) // self.shard_size)

  def shard_items(self, shard: int) -> list[dict[str, Any]]:
    return self.items[shard * self.shard_size:(shard + 1) * self.shard_size]

  def shard_done(self, shard: int) -> bool:
    """The shard is whole: its record is readable and its files are there.

    A damaged record (or a record whose files are gone) counts as work not yet done, and the shard is computed and
    written again. That is safe: the shard's files are this cache's own (named by the shard, in its shards/ folder),
    what they hold follows from the manifest's inputs (which a resumed run has just matched), each file is replaced
    by a rename and the record comes last, so a rerun never leaves half a shard, and no other file is touched."""
    prefix = self.shard_dir / f"{shard:05d}"
    digests, _ = read_shard_record(prefix.with_name(prefix.name + ".done"), self.parts)
    return digests is not None and all(prefix.with_name(f"{prefix.name}.{part}.npy").is_file() for part in self.parts)

  def write_shard(self, shard: int, embeddings: np.ndarray, targets: np.ndarray, valid: np.ndarray,
                  high_res: Sequence[np.ndarray] = ()) -> None:
    expected = len(self.shard_items(shard))
    if not len(embeddings) == len(targets) == len(valid) == expected:
      raise ValueError(f"shard {shard}: {len(embeddings)} embeddings for {expected} items")
    if len(high_res) != len(self.parts) - len(_PARTS) or any(len(m) != expected for m in high_res):
      raise ValueError(f"shard {shard}: {len(high_res)} high-resolution maps for a cache of parts {self.parts}")
    store = lambda maps: maps.astype(ml_dtypes.bfloat16).view(np.uint16) if self.storage_dtype == "bfloat16" \
        else maps.astype(np.float32)
    digests = {}
    arrays = (store(embeddings), targets.astype(np.uint8), valid.astype(bool), *(store(m) for m in high_res))
    for part, array in zip(self.parts, arrays):
      path = self.shard_dir / f"{shard:05d}.{part}.npy"
      atomic_write_bytes(path, _npy_bytes(np.ascontiguousarray(array)))
      digests[part] = file_digest(path)
    atomic_write_json(self.shard_dir / f"{shard:05d}.done", digests)

  def finalize(self) -> None:
    missing = [s for s in range(self.num_shards) if not self.shard_done(s)]
    if missing:
      raise RuntimeError(f"{self.cache_dir}: shards {missing[:5]} are not written yet")
    self.manifest["complete"] = True
    atomic_write_json(self.cache_dir / "manifest.json", self.manifest, indent=None)


class FeatureCache:
  """Read access to a complete cache: a random-access data source (len, getitem) for grain.

  Shards are memory-mapped, so reading costs no more host memory than the items actually touched. With
  `verify=True` (the default) every shard's SHA-256 is checked against its record before use.
  """

  def __init__(self, cache_dir: str | os.PathLike, expected_depends_on: dict[str, Any] | None = None,
               verify: bool = True):
    self.cache_dir = Path(cache_dir)
    manifest_path = self.cache_dir / "manifest.json"
    if not manifest_path.is_file():
      raise DataError(f"{manifest_path}: missing; run autosam-jax precompute first")
    self.manifest = read_manifest(
        manifest_path, foreign="give a folder written by autosam-jax precompute (or image-cache)",
        damaged="the cache cannot be used; write it again into a new directory (autosam-jax precompute or image-cache)")
    if not self.manifest.get("complete"):
      raise DataError(f"{self.cache_dir}: incomplete feature cache; rerun the same precompute command to finish it")
    if expected_depends_on is not None and self.manifest["depends_on"] != expected_depends_on:
      raise DataError(f"{self.cache_dir}: built from other inputs: "
                      f"{describe_difference(self.manifest['depends_on'], expected_depends_on)}; give the cache of "
                      "these inputs, or precompute one into a new folder")
    self.items: list[dict[str, Any]] = self.manifest["items"]
    self.shard_size: int = self.manifest["shard_size"]
    self.bfloat16 = self.manifest["storage_dtype"] == "bfloat16"
    self.parts = parts_of(self.manifest)
    self.feature_maps: tuple[str, ...] = tuple(self.manifest.get("feature_maps", ["embedding"]))
    self._arrays: dict[int, tuple[np.ndarray, ...]] = {}
    self._layout: tuple[int, tuple] | None = None  # the shard every shard's layout is compared with, and its layout
    self._verify = verify
    # grain reads from several threads. Opening a shard once under a lock also keeps np.load's header parsing
    # (ast.literal_eval) single-threaded: CPython 3.11's parser can fail with "AST constructor recursion depth
    # mismatch" when two threads parse at once.
    self._open_lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.items)

  def _shard(self, shard: int):
    if shard in self._arrays:
      return self._arrays[shard]
    with self._open_lock:
      return self._open_shard(shard)

  def _open_shard(self, shard: int):
    if shard not in self._arrays:
      shard_dir = self.cache_dir / "shards"
      done = shard_dir / f"{shard:05d}.done"
      if not done.is_file():
        raise DataError(f"{done}: missing; the cache is damaged, rerun precompute into a new directory")
      digests, problem = read_shard_record(done, self.parts)
      if problem:
        raise DataError(f"{done}: damaged shard record ({problem}); rerun the command that wrote the cache (it "
                        "computes damaged shards again) or write a new cache into a new directory")
      arrays = []
      for part in self.parts:
        path = shard_dir / f"{shard:05d}.{part}.npy"
        if not path.is_file():
          raise DataError(f"{path}: missing; the cache is damaged, rerun precompute into a new directory")
        if self._verify and file_digest(path) != digests[part]:
          raise DataError(f"{path}: contents do not match the checksum recorded when it was written; the cache is "
                          "corrupted, rerun precompute into a new directory")
        try:
          arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))
        except ValueError as err:
          raise DataError(f"{path}: unreadable shard ({err})") from None
      self._check_shapes(shard, arrays)
      self._arrays[shard] = tuple(arrays)
    return self._arrays[shard]

  def _check_shapes(self, shard: int, arrays: list[np.ndarray]) -> None:
    """A shard's arrays have the rows its items need and the shapes and types of the cache's other shards: a file
    replaced together with its checksum record (a matching checksum) is refused here, naming it, rather than failing
    later as an IndexError or a batch of mixed shapes."""
    rows = len(self.items[shard * self.shard_size:(shard + 1) * self.shard_size])
    if self._layout is None:
      # (shape past the rows, dtype) of each part, which every shard shares: shard 0's (its headers only: reading
      # them costs no hashing), or this shard's if shard 0 cannot be read
      reference, source = arrays, shard
      if shard != 0:
        try:
          reference = [np.load(self.cache_dir / "shards" / f"00000.{part}.npy", mmap_mode="r", allow_pickle=False)
                       for part in self.parts]
          source = 0
        except (OSError, ValueError):
          pass
      maps = np.dtype(np.uint16 if self.bfloat16 else np.float32)
      tgt = reference[1]

      def layout(part: str, array: np.ndarray) -> tuple[tuple[int, ...], np.dtype]:
        if part in _MAP_PARTS:
          return array.shape[1:], maps
        return tgt.shape[1:], np.dtype(np.uint8 if part == "tgt" else bool)  # the valid mask is the target's shape

      self._layout = (source, tuple(layout(part, array) for part, array in zip(self.parts, reference)))
    source, expected = self._layout
    for part, array, (tail, dtype) in zip(self.parts, arrays, expected):
      dims = 3 if part in _MAP_PARTS else 2
      if array.shape != (rows, *tail) or array.dtype != dtype or len(tail) != dims:
        path = self.cache_dir / "shards" / f"{shard:05d}.{part}.npy"
        shape = (rows, *tail) if len(tail) == dims else f"({rows}, h, w{', channels' if dims == 3 else ''})"
        where = f" as in shard {source:05d}" if source != shard else ""
        raise DataError(f"{path}: holds an array of {array.dtype} {array.shape}, not {dtype} {shape}{where} (the "
                        f"manifest lists {rows} items in it); the cache is damaged, write it again into a new "
                        "directory (autosam-jax precompute or image-cache) or delete it")

  def check_files(self) -> None:
    """Every shard's files are present, its record readable and its arrays of the shapes its items need (only the
    arrays' headers are read, nothing is hashed): a damaged cache is refused before a run starts."""
    shard_dir = self.cache_dir / "shards"
    for shard in range(-(-len(self.items) // self.shard_size)):
      for name in [f"{shard:05d}.done"] + [f"{shard:05d}.{part}.npy" for part in self.parts]:
        if not (shard_dir / name).is_file():
          raise DataError(f"{shard_dir / name}: missing; the cache is damaged, rerun precompute into a new directory")
      done = shard_dir / f"{shard:05d}.done"
      _, problem = read_shard_record(done, self.parts)
      if problem:
        raise DataError(f"{done}: damaged shard record ({problem}); rerun the command that wrote the cache (it "
                        "computes damaged shards again) or write a new cache into a new directory")
      arrays = []
      for part in self.parts:
        path = shard_dir / f"{shard:05d}.{part}.npy"
        try:
          arrays.append(np.load(path, mmap_mode="r", allow_pickle=False))  # the header only: the data is mapped
        except ValueError as err:
          raise DataError(f"{path}: unreadable shard ({err})") from None
      self._check_shapes(shard, arrays)

  def verify(self) -> None:
    """Reads and checks every shard now (otherwise each is checked on first access)."""
    for shard in range(-(-len(self.items) // self.shard_size)):
      self._shard(shard)

  def __getitem__(self, index: int) -> dict[str, Any]:
    shard, offset = divmod(int(index), self.shard_size)
    embeddings, targets, valid, *high_res = self._shard(shard)
    as_maps = lambda stored: stored.view(ml_dtypes.bfloat16) if self.bfloat16 else stored
    item = self.items[index]
    out = {"embedding": as_maps(np.asarray(embeddings[offset])), "target": np.asarray(targets[offset]),
           "valid": np.asarray(valid[offset]), "patient_id": item["patient_id"], "case_id": item["case_id"],
           "slice_index": item["slice_index"], "view": item["view"]}
    for k, maps in enumerate(high_res):  # SAM 2's, where the cache holds them
      out[f"high_res_{k}"] = as_maps(np.asarray(maps[offset]))
    return out

  def indices(self, patients: Iterable[str], views: Iterable[int] = (0,)) -> np.ndarray:
    """Item indices of the given patients' slices with the given views."""
    patients, views = set(patients), set(views)
    absent = sorted(patients - {it["patient_id"] for it in self.items})
    if absent:  # a cache of some patients only (the sweep's: those its folds use)
      raise DataError(f"{self.cache_dir / 'manifest.json'}: holds no slices of patient(s) {', '.join(absent[:5])}"
                      f"{' ...' if len(absent) > 5 else ''}; it was computed for other patients, precompute a cache "
                      "of every patient (or of these)")
    return np.asarray([i for i, it in enumerate(self.items) if it["patient_id"] in patients and it["view"] in views],
                      np.int64)


def open_cache(stack, out_dir: Path, depends_on: dict[str, Any], items: list[dict[str, Any]], shard_size: int,
               storage_dtype: str, feature_maps: Sequence[str] = ("embedding",)) -> CacheWriter:
  """The `CacheWriter` of `out_dir`, once every input is checked, with the folder locked (`OutputLock`) for the rest
  of `stack` (a contextlib.ExitStack): one process at a time writes a cache.

  A cache of other inputs, a damaged manifest or a folder of other files is refused before the lock, so a refused
  command changes nothing. An existing cache is checked, then locked, then its killed run's temporary files are
  removed; a new cache's folder is made by the lock. Under jax.distributed only process 0 calls this."""
  from autosam_jax.outputs import OutputLock

  def writer(clean_up: bool) -> CacheWriter:
    return CacheWriter(out_dir, depends_on, items, shard_size, storage_dtype, clean_up=clean_up,
                       feature_maps=feature_maps)

  if (out_dir / "manifest.json").exists():
    writer(False)  # checks the existing manifest against these inputs, writing nothing
  elif out_dir.is_dir() and any(p.name != "shards" and not p.name.startswith(".") for p in out_dir.iterdir()):
    writer(False)  # a folder of other files: refused (nothing written)
  stack.enter_context(OutputLock(out_dir))
  return writer(True)


def cache_label_table(cache: FeatureCache):
  """The label table (`autosam_jax.data.labels.LabelTable`) a cache records; caches written before tables existed
  are refused."""
  from autosam_jax.data.labels import table_of_record

  where = cache.cache_dir / "manifest.json"
  table = table_of_record(cache.manifest["depends_on"], "labels", where)
  if table is None:
    raise DataError(f"{where}: records no label table (a cache from an older version); compute the cache again "
                    "into a new directory")
  return table
