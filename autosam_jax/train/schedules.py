"""The learning rate: an injected hyperparameter of the optimizer state (so checkpoints carry it), set from the host
by the schedules (they act at most once per step: the plateau once per epoch, the cosines per epoch or per step).

  tx = injected_optimizer(optax.scale_by_adam(), learning_rate=5e-4)   # Adam whose rate lives in its state
  opt_state = with_learning_rate(opt_state, 5e-5)                      # what a schedule's decision does
  learning_rate_of(opt_state)                                          # the rate the next update uses
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def injected_optimizer(direction, learning_rate: float):
  """`direction` (e.g. optax.scale_by_adam()), then a step of -learning_rate along it, the rate held in the
  optimizer state (`optax.inject_hyperparams`) rather than compiled in, so a schedule changes it without recompiling
  and a checkpoint of the state carries it."""
  import optax

  def build(learning_rate):
    return optax.chain(direction, optax.scale_by_learning_rate(learning_rate))

  return optax.inject_hyperparams(build)(learning_rate=learning_rate)


def _injected(node: Any) -> bool:
  return isinstance(node, tuple) and hasattr(node, "hyperparams") and hasattr(node, "inner_state")


def learning_rate_of(opt_state) -> Any:
  """The learning-rate hyperparameter of the (first) injected optimizer in `opt_state`, as an array."""
  import jax

  for node in jax.tree.leaves(opt_state, is_leaf=_injected):
    if _injected(node) and "learning_rate" in node.hyperparams:
      return node.hyperparams["learning_rate"]
  raise ValueError("the optimizer state holds no injected learning_rate (build it with injected_optimizer)")


def with_learning_rate(opt_state, value):
  """`opt_state` with every injected learning_rate replaced by `value` (an array placed as the state is)."""
  import jax

  def replace(node):
    if _injected(node) and "learning_rate" in node.hyperparams:
      return node._replace(hyperparams={**node.hyperparams, "learning_rate": value})
    return node

  return jax.tree.map(replace, opt_state, is_leaf=_injected)


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
