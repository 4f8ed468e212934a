"""Patient-level, seeded train/val/test splits and the JSON files that record them.

Every split is made at the patient level (both frames of a patient land in the same part) from a seeded shuffle of the
*sorted* patient ids, so the result depends only on the set of ids and the seed, never on directory listing order.

- `official_split`: the official protocol (`create_splits.py:create_acdc_folds`): train int(0.7 N), val int(0.15 N),
  test the rest. The official code draws five unseeded shuffles whose test sets overlap; here one seed gives one
  split, and the seed is recorded in it.
- `cross_validation_splits`: disjoint test folds that partition the patients (the fix for the official overlap), each
  with a validation part carved from the rest.

`Split.train` keeps the seeded order, and `Split.labeled(k)` is its first k patients, so the labeled sets are nested
(k=1 within k=2 within ...), as `tr_size` is in the official code.

File formats (JSON, written atomically):
- one split: `{"format": "autosam-jax/split", "version": 1, "name": ..., "seed": ..., "train": [...], "val": [...],
  "test": [...]}`. Files written by hand need only `train`, `val` and `test`; `seed` may be null.
- several splits (e.g. the folds of a cross-validation): `{"format": "autosam-jax/splits", "version": 1,
  "splits": [<one split>, ...]}`, written by `save_splits` and read by `load_splits` (which also reads one-split
  files) or by `Split.from_json(path, name=...)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from autosam_jax.atomic import atomic_write_json
from autosam_jax.data.errors import DataError

SPLIT_FORMAT = "autosam-jax/split"
SPLITS_FORMAT = "autosam-jax/splits"
FORMAT_VERSION = 1

_PARTS = ("train", "val", "test")
_SPLIT_KEYS = frozenset(("format", "version", "name", "seed") + _PARTS)
_SPLITS_KEYS = frozenset(("format", "version", "splits"))


def _preview(ids: Iterable[str], limit: int = 5) -> str:
  """A short, one-line rendering of a list of patient ids (error messages must stay on one line)."""
  ids = sorted(ids)
  shown = ", ".join(repr(i) for i in ids[:limit])
  return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _duplicates(ids: Sequence[str]) -> list[str]:
  seen, dup = set(), set()
  for i in ids:
    (dup if i in seen else seen).add(i)
  return sorted(dup)


def _split_problem(train: Sequence[str], val: Sequence[str], test: Sequence[str],
                   known_patients: Iterable[str] | None = None) -> str | None:
  """The first thing wrong with a split's parts, as one line, or None."""
  parts = {"train": train, "val": val, "test": test}
  if not train:
    return "the train part is empty"
  if not test:
    return "the test part is empty"
  for part, ids in parts.items():
    dup = _duplicates(ids)
    if dup:
      return f"patients listed twice in {part}: {_preview(dup)}"
  for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
    both = set(parts[a]) & set(parts[b])
    if both:
      return f"patients in both {a} and {b}: {_preview(both)}"
  if known_patients is not None:
    unknown = set(train).union(val, test) - set(known_patients)
    if unknown:
      return f"patients not in the dataset: {_preview(unknown)}"
  return None


@dataclasses.dataclass(frozen=True)
class Split:
  """One patient-level split. `train` is in the seeded order that `labeled` takes prefixes of; `seed` is None only
  for hand-written split files."""

  name: str
  seed: int | None
  train: tuple[str, ...]
  val: tuple[str, ...]
  test: tuple[str, ...]

  def __post_init__(self):
    # Accept any sequence but store tuples, so a Split is immutable and hashable.
    for part in _PARTS:
      object.__setattr__(self, part, tuple(getattr(self, part)))
    problem = _split_problem(self.train, self.val, self.test)
    if problem:
      raise DataError(f"split {self.name!r}: {problem}")

  @property
  def patients(self) -> tuple[str, ...]:
    return self.train + self.val + self.test

  def labeled(self, tr_size: int) -> list[str]:
    """The `tr_size` labeled training patients: the first `tr_size` of `train`, so smaller sets nest in larger ones."""
    if isinstance(tr_size, bool) or not isinstance(tr_size, (int, np.integer)) or tr_size < 1:
      raise DataError(f"split {self.name!r}: tr_size must be a positive integer, got {tr_size!r}")
    if tr_size > len(self.train):
      raise DataError(f"split {self.name!r}: tr_size {tr_size} is larger than the training set, which has "
                      f"{len(self.train)} patients")
    return list(self.train[:tr_size])

  def to_dict(self) -> dict[str, Any]:
    return {"format": SPLIT_FORMAT, "version": FORMAT_VERSION, "name": self.name, "seed": self.seed,
            "train": list(self.train), "val": list(self.val), "test": list(self.test)}

  @classmethod
  def from_dict(cls, data: Any, where: str, default_name: str = "split",
                known_patients: Iterable[str] | None = None) -> Split:
    """Builds a split from parsed JSON, checking everything; errors start with `where` (the file, and the entry)."""
    if not isinstance(data, dict):
      raise DataError(f"{where}: a split must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _SPLIT_KEYS)
    if unknown:
      raise DataError(f"{where}: unknown keys {unknown}; a split has {sorted(_SPLIT_KEYS)}")
    missing = [k for k in _PARTS if k not in data]
    if missing:
      raise DataError(f"{where}: missing keys {missing}")
    if "format" in data and data["format"] != SPLIT_FORMAT:
      raise DataError(f"{where}: format is {data['format']!r}, expected {SPLIT_FORMAT!r}")
    if "version" in data and data["version"] != FORMAT_VERSION:
      raise DataError(f"{where}: version is {data['version']!r}, this code reads version {FORMAT_VERSION}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
      raise DataError(f"{where}: name must be a non-empty string, got {name!r}")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
      raise DataError(f"{where}: seed must be an integer or null, got {seed!r}")
    for part in _PARTS:
      ids = data[part]
      if not isinstance(ids, list):
        raise DataError(f"{where}: {part} must be a list of patient ids, got {type(ids).__name__}")
      bad = [i for i in ids if not isinstance(i, str) or not i]
      if bad:
        raise DataError(f"{where}: {part} holds entries that are not non-empty strings: {bad[:5]!r}")
    # Checked before construction so that the message names the file rather than the split.
    problem = _split_problem(data["train"], data["val"], data["test"], known_patients)
    if problem:
      raise DataError(f"{where}: {problem}")
    return cls(name=name, seed=seed, train=data["train"], val=data["val"], test=data["test"])

  def to_json(self, path: str | os.PathLike) -> Path:
    """Writes this split to `path` atomically (a reader never sees half a file)."""
    return atomic_write_json(path, self.to_dict())

  @classmethod
  def from_json(cls, path: str | os.PathLike, known_patients: Iterable[str] | None = None,
                name: str | None = None) -> Split:
    """Reads a one-split file, or the split called `name` from a several-split file; every problem (schema, unknown
    keys, types, duplicates, overlaps, patients not in `known_patients`) is a DataError naming the file."""
    splits = load_splits(path, known_patients)
    if name is None:
      if len(splits) > 1:
        raise DataError(f"{path}: holds {len(splits)} splits ({', '.join(s.name for s in splits)}); "
                        "say which one by name")
      return splits[0]
    for split in splits:
      if split.name == name:
        return split
    raise DataError(f"{path}: no split named {name!r}; it holds {', '.join(s.name for s in splits)}")


def save_splits(splits: Sequence[Split], path: str | os.PathLike) -> Path:
  """Writes several splits (e.g. cross-validation folds) to one JSON file, atomically."""
  names = [s.name for s in splits]
  dup = _duplicates(names)
  if dup:
    raise DataError(f"{path}: split names must be unique, repeated: {dup}")
  return atomic_write_json(path, {"format": SPLITS_FORMAT, "version": FORMAT_VERSION,
                                   "splits": [s.to_dict() for s in splits]})


def load_splits(path: str | os.PathLike, known_patients: Iterable[str] | None = None) -> list[Split]:
  """Reads a one-split or several-split file (see the module docstring) and checks every split in it."""
  if known_patients is not None:
    known_patients = frozenset(known_patients)
  try:
    text = Path(path).read_text()
  except FileNotFoundError:
    raise DataError(f"{path}: split file not found") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read the split file ({e})") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  default_name = Path(path).name.removesuffix(".json")
  if not (isinstance(data, dict) and "splits" in data):
    return [Split.from_dict(data, str(path), default_name, known_patients)]
  unknown = sorted(set(data) - _SPLITS_KEYS)
  if unknown:
    raise DataError(f"{path}: unknown keys {unknown}; a several-split file has {sorted(_SPLITS_KEYS)}")
  if data.get("format", SPLITS_FORMAT) != SPLITS_FORMAT:
    raise DataError(f"{path}: format is {data['format']!r}, expected {SPLITS_FORMAT!r}")
  if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
    raise DataError(f"{path}: version is {data['version']!r}, this code reads version {FORMAT_VERSION}")
  entries = data["splits"]
  if not isinstance(entries, list) or not entries:
    raise DataError(f"{path}: splits must be a non-empty list of split objects")
  splits = [Split.from_dict(entry, f"{path} (split {i})", f"{default_name}-{i}", known_patients)
            for i, entry in enumerate(entries)]
  dup = _duplicates([s.name for s in splits])
  if dup:
    raise DataError(f"{path}: split names must be unique, repeated: {dup}")
  return splits


def _sorted_unique(patient_ids: Iterable[str]) -> list[str]:
  ids = list(patient_ids)
  bad = [i for i in ids if not isinstance(i, str) or not i]
  if bad:
    raise DataError(f"patient ids must be non-empty strings, got {bad[:5]!r}")
  dup = _duplicates(ids)
  if dup:
    raise DataError(f"patient ids listed twice: {_preview(dup)}")
  return sorted(ids)


def _check_seed(seed: Any) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f"split seed must be a non-negative integer, got {seed!r}")
  return int(seed)


def _shuffled(ids: Sequence[str], rng: np.random.Generator) -> list[str]:
  return [ids[i] for i in rng.permutation(len(ids))]


def official_split(patient_ids: Iterable[str], seed: int) -> Split:
  """The official 70/15/15 protocol from one seeded shuffle: train int(0.7 N), val int(0.15 N), test the rest.

  The sizes use the official float expressions (so N=90 gives 62 train, as the official code would), and val may
  be empty for very small N.
  """
  seed = _check_seed(seed)
  ids = _sorted_unique(patient_ids)
  n = len(ids)
  num_train, num_val = int(0.7 * n), int(0.15 * n)
  if num_train < 1 or n - num_train - num_val < 1:
    raise DataError(f"the official split needs at least 2 patients for non-empty train and test parts, got {n}")
  order = _shuffled(ids, np.random.default_rng(seed))
  return Split(name=f"official-seed{seed}", seed=seed, train=order[:num_train],
               val=order[num_train:num_train + num_val], test=order[num_train + num_val:])


def cross_validation_splits(patient_ids: Iterable[str], num_folds: int = 5, seed: int = 0,
                            val_fraction: float = 0.15) -> list[Split]:
  """`num_folds` splits whose test parts are disjoint and together cover every patient.

  Test folds come from one seeded shuffle (sizes differ by at most one). From each fold's remaining patients,
  int(val_fraction * N) of all N patients (15 of 100, as in the official protocol) go to validation, chosen by a
  shuffle seeded with (seed, fold); the rest, in that shuffled order, is the training part that `labeled` takes
  prefixes of. All folds record `seed`; fold k's inner shuffle is `np.random.default_rng([seed, k])`.
  """
  seed = _check_seed(seed)
  ids = _sorted_unique(patient_ids)
  n = len(ids)
  if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or not 2 <= num_folds <= n:
    raise DataError(f"num_folds must be an integer from 2 to the number of patients ({n}), got {num_folds!r}")
  if not 0 <= val_fraction < 1:
    raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
  num_val = int(val_fraction * n)
  order = _shuffled(ids, np.random.default_rng(seed))
  folds = np.array_split(np.arange(n), num_folds)
  splits = []
  for k, fold in enumerate(folds):
    test = [order[i] for i in fold]
    in_test = set(test)
    rest = _shuffled([p for p in order if p not in in_test], np.random.default_rng([seed, k]))
    if len(rest) - num_val < 1:
      raise DataError(f"fold {k} has {len(rest)} non-test patients, too few for {num_val} validation patients "
                      "and a training part; lower val_fraction or num_folds")
    splits.append(Split(name=f"cv{num_folds}-seed{seed}-fold{k}", seed=seed, train=rest[num_val:],
                        val=rest[:num_val], test=test))
  return splits


DESCRIPTION = """Write patient-level splits of a NIfTI dataset to JSON.

  autosam-jax make-splits ~/data/ACDC --protocol official --seed 0 --out splits/official.json
  autosam-jax make-splits ~/data/ACDC --protocol cv --folds 5 --seed 0 --out splits/cv5.json

official: one 70/15/15 train/val/test split (the paper's protocol, with the seed recorded).
cv: K folds whose test parts partition the patients, each with a validation part carved from its training part.
tr_size k always means the first k patients of a split's seeded training order, so smaller sets nest in larger."""


def add_arguments(parser) -> None:
  from pathlib import Path as _Path

  parser.add_argument("data_dir", type=_Path, help="ACDC or nnU-Net NIfTI folder (its patients are read from it)")
  parser.add_argument("--protocol", choices=["official", "cv"], default="cv")
  parser.add_argument("--folds", type=int, default=5, help="folds for --protocol cv (default 5)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", type=_Path, required=True, help="JSON file to write")


def run(args) -> int:
  import sys

  from autosam_jax.data.validate import validate

  try:
    patients = validate(args.data_dir).patient_ids
    if args.protocol == "official":
      splits = [official_split(patients, args.seed)]
    else:
      splits = cross_validation_splits(patients, args.folds, args.seed)
    save_splits(splits, args.out)
  except DataError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  for split in splits:
    print(f"{split.name}: train {len(split.train)}, val {len(split.val)}, test {len(split.test)}")
  print(f"wrote {args.out}")
  return 0


def select_split(path: str | os.PathLike, name: str | None = None) -> Split:
  """The split called `name` in a split file (the first when None); an unknown name is an error listing the names."""
  splits = load_splits(path)
  split = splits[0] if name is None else next((s for s in splits if s.name == name), None)
  if split is None:
    raise DataError(f"{path}: no split named {name!r}; it holds {[s.name for s in splits]}")
  return split
