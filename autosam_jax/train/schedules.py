"""Learning-rate control across epochs, on the host (it acts once per epoch)."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class ReduceLROnPlateau:
  """PyTorch's ReduceLROnPlateau (threshold_mode 'rel', cooldown 0, min_lr 0): multiply the learning rate by
  `factor` after `patience` epochs without an improvement larger than `threshold` (relative)."""

  mode: str = "min"
  factor: float = 0.1
  patience: int = 10
  threshold: float = 1e-4
  scale: float = 1.0
  best: float = math.inf
  bad_epochs: int = 0

  def __post_init__(self):
    if self.mode not in ("min", "max"):
      raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
    if self.best == math.inf and self.mode == "max":
      self.best = -math.inf

  def _better(self, value: float) -> bool:
    if self.mode == "min":
      return value < self.best * (1.0 - self.threshold)
    return value > self.best * (1.0 + self.threshold)

  def step(self, value: float) -> float:
    """Records one epoch's metric; returns the learning-rate scale to use from now on."""
    if self._better(value):
      self.best, self.bad_epochs = value, 0
    else:
      self.bad_epochs += 1
    if self.bad_epochs > self.patience:
      self.scale *= self.factor
      self.bad_epochs = 0
    return self.scale

  def state_dict(self) -> dict:
    return dataclasses.asdict(self)
