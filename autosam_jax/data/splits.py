"""Patient-level, seeded train/val/test splits and the JSON files that record them.

Every split is made at the patient level (both frames of a patient land in the same part) from a seeded shuffle of the
*sorted* patient ids, so the result depends only on the set of ids and the seed, never on directory listing order.

- `official_split`: the official protocol (`create_splits.py:create_acdc_folds`): train int(0.7 N), val int(0.15 N),
  test the rest. The official code draws five unseeded shuffles whose test sets overlap; here one seed gives one
  split, and the seed is recorded in it.
- `cross_validation_splits`: disjoint test folds that partition the patients (the fix for the official overlap), each
  with a validation part carved from the rest.

Both take the validation part as `val_patients`: a count (an int >= 0) or a fraction of all N patients (a float in
(0, 1); default 0.15, the official share). A fraction keeps at least one validation patient whenever train and test
can still keep one each: int(0.15 N) is 0 below 7 patients, and the improved protocol (plateau and best model on
validation Dice) needs one; `require_validation_patients` refuses a split without them for it.

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


def check_split_file_path(path: str | os.PathLike, option: str = "--out") -> Path:
  """A split file to write: a folder at `path`, or a file where a folder above it should be, is one error line before
  any work (rather than a traceback when the file is written)."""
  path = Path(path).expanduser()
  if path.is_dir():
    raise DataError(f"{path}: is a folder, not a file; give the split file's path (e.g. {path / 'splits.json'}) as "
                    f"{option}")
  above = next((parent for parent in path.absolute().parents if parent.exists()), None)
  if above is not None and not above.is_dir():
    raise DataError(f"{above}: is a file, not a folder; choose another {option}")
  from autosam_jax.outputs import check_writable

  check_writable(path, option)
  return path


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


DEFAULT_VAL_PATIENTS = 0.15  # the official validation share
_VAL_PATIENTS_FIX = ("give a count (a whole number >= 0, e.g. 1) or a fraction of the patients (between 0 and 1, "
                     "e.g. 0.15)")


def parse_val_patients(value: Any, where: str = "val_patients") -> int | float:
  """A validation count (int >= 0) or fraction (float in (0, 1)), from a number or from text such as "1" or "0.15";
  anything else is a DataError starting with `where` (the option), so the CLI and the sweep name their own option."""
  if isinstance(value, str):
    text = value.strip()
    try:
      value = int(text)
    except ValueError:
      try:
        value = float(text)
      except ValueError:
        raise DataError(f"{where}: {value!r} is not a number; {_VAL_PATIENTS_FIX}") from None
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    if value < 0:
      raise DataError(f"{where}: {value} is a negative count; {_VAL_PATIENTS_FIX}")
    return int(value)
  if isinstance(value, (float, np.floating)):
    if not 0 < value < 1:
      raise DataError(f"{where}: {value!r} is neither a count nor a fraction in (0, 1); {_VAL_PATIENTS_FIX}")
    return float(value)
  raise DataError(f"{where}: {value!r} is not a number; {_VAL_PATIENTS_FIX}")


def _num_val(val_patients: int | float, num_patients: int, room: int) -> int:
  """How many validation patients `val_patients` means for `num_patients`, where `room` is the most that still leaves
  train and test one patient each: a count as given, a fraction int(fraction * N) (the official expression) but at
  least one when there is room (int(0.15 N) is 0 below 7 patients)."""
  val_patients = parse_val_patients(val_patients)
  if isinstance(val_patients, int):
    return val_patients
  return max(int(val_patients * num_patients), min(1, room))


def require_validation_patients(split: Split, source: str | os.PathLike,
                                fix: str = "make the splits with --val-patients 1 (or more)") -> None:
  """Refuses a split with no validation patients for the improved protocol, before anything is written: without them
  its plateau never steps and no best model is saved, so the run would quietly be another protocol. `source` (the
  split file) and `fix` go into the one-line message."""
  if not split.val:
    raise DataError(f"split {split.name} of {source} has no validation patients, which the improved protocol needs "
                    f"(plateau and best model on validation Dice); {fix}")


def official_split(patient_ids: Iterable[str], seed: int, val_patients: int | float = DEFAULT_VAL_PATIENTS) -> Split:
  """The official 70/15/15 protocol from one seeded shuffle: train int(0.7 N), val int(0.15 N), test the rest.

  The sizes use the official float expressions (so N=90 gives 62 train, as the official code would). `val_patients`
  (count or fraction, see the module docstring) sets the validation part; where int(0.7 N) training patients and
  the validation part would leave no test patient, train shrinks so that test keeps one (3 patients: 1/1/1).
  """
  seed = _check_seed(seed)
  ids = _sorted_unique(patient_ids)
  n = len(ids)
  if n < 2:
    raise DataError(f"the official split needs at least 2 patients for non-empty train and test parts, got {n}")
  num_val = _num_val(val_patients, n, room=n - 2)
  if num_val > n - 2:
    raise DataError(f"the official split of {n} patients has no room for {num_val} validation patient(s) besides a "
                    "training and a test patient; lower val_patients (--val-patients)")
  num_train = min(int(0.7 * n), n - num_val - 1)
  order = _shuffled(ids, np.random.default_rng(seed))
  return Split(name=f"official-seed{seed}", seed=seed, train=order[:num_train],
               val=order[num_train:num_train + num_val], test=order[num_train + num_val:])


def cross_validation_splits(patient_ids: Iterable[str], num_folds: int = 5, seed: int = 0,
                            val_patients: int | float = DEFAULT_VAL_PATIENTS) -> list[Split]:
  """`num_folds` splits whose test parts are disjoint and together cover every patient.

  Test folds come from one seeded shuffle (sizes differ by at most one). From each fold's remaining patients,
  `val_patients` go to validation (a count, or a fraction of all N patients: int(0.15 N), 15 of 100 as in the
  official protocol, but at least one when every fold has room for it), chosen by a shuffle seeded with (seed, fold);
  the rest, in that shuffled order, is the training part that `labeled` takes prefixes of. Every fold has the same
  number of validation patients. All folds record `seed`; fold k's inner shuffle is `np.random.default_rng([seed, k])`.
  """
  seed = _check_seed(seed)
  ids = _sorted_unique(patient_ids)
  n = len(ids)
  if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or not 2 <= num_folds <= n:
    raise DataError(f"num_folds must be an integer from 2 to the number of patients ({n}), got {num_folds!r}")
  order = _shuffled(ids, np.random.default_rng(seed))
  folds = np.array_split(np.arange(n), num_folds)
  num_val = _num_val(val_patients, n, room=n - max(len(fold) for fold in folds) - 1)
  splits = []
  for k, fold in enumerate(folds):
    test = [order[i] for i in fold]
    in_test = set(test)
    rest = _shuffled([p for p in order if p not in in_test], np.random.default_rng([seed, k]))
    if len(rest) - num_val < 1:
      raise DataError(f"fold {k} has {len(rest)} non-test patients, too few for {num_val} validation patients "
                      "and a training part; lower val_patients (--val-patients) or the number of folds")
    splits.append(Split(name=f"cv{num_folds}-seed{seed}-fold{k}", seed=seed, train=rest[num_val:],
                        val=rest[:num_val], test=test))
  return splits


def select_split(path: str | os.PathLike, name: str | None = None) -> Split:
  """The split called `name` in a split file (the first when None); an unknown name is an error listing the names."""
  splits = load_splits(path)
  split = splits[0] if name is None else next((s for s in splits if s.name == name), None)
  if split is None:
    raise DataError(f"{path}: no split named {name!r}; it holds {[s.name for s in splits]}")
  return split


def make_splits(data_dir: str | os.PathLike, protocol: str, folds: int, seed: int, val_patients: Any,
                out: str | os.PathLike) -> list[Split]:
  """Splits of the patients found in `data_dir` (`protocol` "official" or "cv"), saved to `out`. `val_patients` is
  a count or a fraction (see `parse_val_patients`); it and `out` are checked before the dataset is read."""
  from autosam_jax.data.validate import validate

  val_patients = parse_val_patients(val_patients, "--val-patients")
  check_split_file_path(out)
  patients = validate(data_dir).patient_ids
  if protocol == "official":
    splits = [official_split(patients, seed, val_patients)]
  else:
    splits = cross_validation_splits(patients, folds, seed, val_patients)
  save_splits(splits, out)
  return splits
