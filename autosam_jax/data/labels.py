"""The label table of a dataset: its classes' names and values, made once from the data and carried to every stage.

  table = LabelTable.from_dataset_json(path, dataset["labels"])   # nnU-Net v2 {"background": 0, "GM": 1, ...}
                                                                   # or v1 {"0": "background", "1": "GM", ...}
  table = ACDC_TABLE                                               # ACDC: 0 background, 1 RV, 2 MYO, 3 LV
  table.num_classes, table.foreground                              # 3, {1: "GM", 2: "WM"}

Values are consecutive integers from 0 (background), as nnU-Net requires, so a class's value is also its channel in
the models' logits and the label a prediction writes. nnU-Net v2's ignore label (a class named "ignore", which must
hold the highest value) marks unannotated pixels: it is no class of the models (no logit channel, never predicted),
its pixels carry no loss and are left out of every score, and it is no column of any report. The table is recorded as a plain {name: value} object (the v2
form of dataset.json) in the TFDS dataset's metadata, the cache manifest, each run and each saved model; every later
stage reads it from there and refuses data or models of another table, naming both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from autosam_jax.data.errors import DataError

IGNORE_NAME = "ignore"  # nnU-Net v2's name for the label of unannotated pixels

@dataclasses.dataclass(frozen=True)
class LabelTable:
  names: tuple[str, ...]  # names[v] is the class of label value v; names[0] is the background

  def __post_init__(self):
    names = tuple(self.names)
    object.__setattr__(self, "names", names)
    if len(names) < 2:
      raise ValueError(f"a label table needs the background and at least one class, got {list(names)}")
    if len(set(names)) != len(names):
      raise ValueError(f"class names must be distinct, got {list(names)}")
    if not all(isinstance(n, str) and n.strip() for n in names):
      raise ValueError(f"class names must be non-empty strings, got {list(names)}")
    if IGNORE_NAME in names[:-1]:
      raise ValueError(f"the {IGNORE_NAME!r} label must hold the highest value (nnU-Net's rule), got {list(names)}")
    if names[-1] == IGNORE_NAME and len(names) < 3:
      raise ValueError(f"a label table needs a class besides the background and {IGNORE_NAME!r}, got {list(names)}")

  @property
  def ignore(self) -> int | None:
    """The value of nnU-Net's ignore label (unannotated pixels: no loss, no score, never predicted), or None."""
    return len(self.names) - 1 if self.names[-1] == IGNORE_NAME else None

  @property
  def num_classes(self) -> int:
    """Background included, the ignore label not: the number of logit channels a model of this dataset has."""
    return len(self.names) - (self.ignore is not None)

  @property
  def values(self) -> tuple[int, ...]:
    """Every value a label file may hold (the ignore label's too)."""
    return tuple(range(len(self.names)))

  @property
  def foreground(self) -> dict[int, str]:
    """{value: name} of the classes that are scored (every class but the background and the ignore label)."""
    return {value: name for value, name in enumerate(self.names[:self.num_classes]) if value}

  @property
  def foreground_names(self) -> list[str]:
    return list(self.names[1:self.num_classes])

  def to_dict(self) -> dict[str, int]:
    return {name: value for value, name in enumerate(self.names)}

  def describe(self) -> str:
    return ", ".join(f"{value} {name}" + (" (not scored)" if value == self.ignore else "")
                     for value, name in enumerate(self.names))

  @classmethod
  def from_dict(cls, labels: Any, where: str) -> "LabelTable":
    """A recorded table ({name: value}); `where` names the record in the error."""
    return cls.from_dataset_json(where, labels)

  @classmethod
  def from_dataset_json(cls, where: Any, labels: Any) -> "LabelTable":
    """From dataset.json's "labels": v2 {name: value} or v1 {"value": name}; one-line DataError naming `where`."""
    if not isinstance(labels, Mapping) or not labels:
      raise DataError(f"{where}: no 'labels' object; add e.g. \"labels\": {{\"background\": 0, \"LV\": 1}}")
    if any(isinstance(value, (list, tuple)) for value in labels.values()):
      raise DataError(f"{where}: region-based labels (lists of values) are not supported; give each label one integer")
    if all(isinstance(value, int) and not isinstance(value, bool) for value in labels.values()):
      by_value = [(int(value), str(name)) for name, value in labels.items()]  # v2: name -> value
    elif all(isinstance(key, str) and key.strip().isdigit() and isinstance(name, str) for key, name in labels.items()):
      by_value = [(int(key), name) for key, name in labels.items()]  # v1: "value" -> name
    else:
      raise DataError(f"{where}: 'labels' must map names to integers (nnU-Net v2, {{\"background\": 0, \"LV\": 1}}) "
                      "or \"0\", \"1\", ... to names (v1, {\"0\": \"background\", \"1\": \"LV\"})")
    by_value.sort()
    values = [value for value, _ in by_value]
    if len(set(values)) != len(values):
      twice = sorted({v for v in values if values.count(v) > 1})
      raise DataError(f"{where}: label value(s) {twice} are given to more than one class; give each class its own "
                      "value")
    if values != list(range(len(values))):
      raise DataError(f"{where}: label values {values} are not consecutive from 0 (background); renumber the labels "
                      "0, 1, 2, ... as nnU-Net requires")
    if len(values) < 2:
      raise DataError(f"{where}: only the background is declared; add the classes to segment to 'labels'")
    if len(values) > 256:
      raise DataError(f"{where}: {len(values)} labels; at most 256 (uint8 label maps) are supported")
    names = [name for _, name in by_value]
    if len(set(names)) != len(names):
      raise DataError(f"{where}: class names {names} are not distinct; give each class its own name")
    if any(not name.strip() for name in names):
      raise DataError(f"{where}: a class has an empty name; name every class")
    if IGNORE_NAME in names[:-1]:
      raise DataError(f"{where}: the {IGNORE_NAME!r} label has the value {names.index(IGNORE_NAME)}, not the highest "
                      f"({len(names) - 1}); nnU-Net requires the ignore label to be the highest value: renumber it")
    if names[-1] == IGNORE_NAME and len(names) < 3:
      raise DataError(f"{where}: only the background and {IGNORE_NAME!r} are declared; add the classes to segment")
    return cls(tuple(names))

  def check_values(self, present: Iterable[int], where: Any) -> None:
    """Label values found in a file or cache must be classes of this table."""
    unexpected = sorted({int(v) for v in present} - set(self.values))
    if unexpected:
      shown = ", ".join(map(str, unexpected[:10])) + (" ..." if len(unexpected) > 10 else "")
      raise DataError(f"{where}: label values {shown} are not classes of this dataset ({self.describe()}); relabel "
                      "the data or declare the classes")

  def check_same(self, other: "LabelTable", where: Any, what: str, other_what: str) -> None:
    """Two stages of one experiment must use one table: e.g. a model trained on other classes than a cache holds."""
    if self != other:
      raise DataError(f"{where}: {what} has the classes {self.describe()} but {other_what} has {other.describe()}; "
                      "use files made from the same dataset")


ACDC_TABLE = LabelTable(("background", "RV", "MYO", "LV"))


def table_of_record(record: Mapping[str, Any], key: str, where: Any) -> LabelTable | None:
  """The table stored under `key` in a record (a manifest, a config), None when the record predates tables."""
  if key not in record or record[key] is None:
    return None
  return LabelTable.from_dict(record[key], f"{where} ({key})")
