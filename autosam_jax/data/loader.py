"""grain pipelines over slice data sources: seeded shuffling, deterministic order, resumable mid-epoch.

  source = builder.as_data_source(split="train")
  index = SliceIndex.build(source)
  for epoch in range(120):
    iterator = iter(slice_dataset(source, index.for_patients(split.labeled(2)), batch_size=4, seed=0, epoch=epoch))
    batch = next(iterator)
    state = iterator.get_state()      # store (epoch, state) with the checkpoint; set_state(state) resumes
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Sequence

import numpy as np


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class SliceIndex:
  """Which record of a data source belongs to which patient, case and slice (read once, then kept in memory)."""
  patient_ids: tuple[str, ...]
  case_ids: tuple[str, ...]
  slice_indices: tuple[int, ...]

  @classmethod
  def build(cls, source: Sequence[dict]) -> "SliceIndex":
    patients, cases, slices = [], [], []
    for i in range(len(source)):
      example = source[i]
      patients.append(_text(example["patient_id"]))
      cases.append(_text(example["case_id"]))
      slices.append(int(example["slice_index"]))
    return cls(tuple(patients), tuple(cases), tuple(slices))

  @property
  def patients(self) -> list[str]:
    return sorted(set(self.patient_ids))

  def for_patients(self, patients: Iterable[str]) -> np.ndarray:
    """Record indices of the given patients' slices, in (case, slice) order; unknown patients are an error."""
    wanted = set(patients)
    unknown = sorted(wanted - set(self.patient_ids))
    if unknown:
      from autosam_jax.data.errors import DataError
      raise DataError(f"patients {unknown} are not in the dataset (it has {len(self.patients)}: "
                      f"{', '.join(self.patients[:5])}...)")
    chosen = [i for i, p in enumerate(self.patient_ids) if p in wanted]
    return np.asarray(sorted(chosen, key=lambda i: (self.case_ids[i], self.slice_indices[i])), np.int64)


def _shuffle_seed(seed: int, epoch: int) -> int:
  return int(np.random.default_rng([seed, epoch]).integers(2**31))


def epoch_order(indices: Sequence[int], *, seed: int, epoch: int) -> np.ndarray:
  """`indices` in the order a shuffled `slice_dataset(source, indices, seed=seed, epoch=epoch)` visits them."""
  import grain

  dataset = grain.MapDataset.source(np.asarray(indices, np.int64)).shuffle(seed=_shuffle_seed(seed, epoch))
  return np.asarray([dataset[i] for i in range(len(dataset))], np.int64)


def slice_dataset(source: Sequence[dict], indices: Sequence[int], *, batch_size: int, seed: int, epoch: int = 0,
                  shuffle: bool = True, transform: Callable[[dict], dict] | None = None, drop_remainder: bool = False):
  """A grain IterDataset over one epoch of `source[indices]` in batches, shuffled from (seed, epoch).

  One epoch per dataset, as the official loop (drop_last=False: the last batch of an epoch may be smaller). The
  order is a pure function of (indices, seed, epoch), so runs with the same arguments see the same batches, and an
  iterator restored with `set_state` continues exactly where the saved one stopped.
  """
  import grain

  dataset = grain.MapDataset.source(np.asarray(indices, np.int64))
  if shuffle:
    dataset = dataset.shuffle(seed=_shuffle_seed(seed, epoch))
  dataset = dataset.map(lambda record: source[int(record)])
  if transform is not None:
    dataset = dataset.map(transform)
  return dataset.batch(batch_size, drop_remainder=drop_remainder).to_iter_dataset()
