"""A method's own train state: `core.fit` takes the pytree `Method.initial_state` makes, steps, checkpoints and resumes
all of it, not only {params, opt_state, step} (what a teacher-student method needs: the teacher's weights beside the
student's)."""

from __future__ import annotations

import dataclasses

import numpy as np

from autosam_jax.train import core


@dataclasses.dataclass(frozen=True)
class _TeacherProgram(core.StepProgram):
  """Least squares on y = 3x; the state's "teacher" follows the student as an exponential moving average."""

  def optimizer(self, learning_rate):
    import optax

    from autosam_jax.train.schedules import injected_optimizer
    return injected_optimizer(optax.identity(), learning_rate)

  def loss(self, params, frozen, batch):
    import jax.numpy as jnp
    return jnp.sum(batch["weight"] * (params["w"] * batch["x"] - batch["y"]) ** 2) / jnp.sum(batch["weight"]), {}

  def __call__(self, state, frozen, batch):
    import jax

    new_state, metrics = super().__call__(state, frozen, batch)
    teacher = jax.tree.map(lambda t, s: 0.5 * t + 0.5 * s, state["teacher"], new_state["params"])
    return {**new_state, "teacher": teacher}, metrics


class _TeacherMethod(core.Method):
  program = _TeacherProgram()
  diverged = "loss"

  def __init__(self):
    self.params = {"w": np.float32(0.0)}
    self.config = {"method": "teacher-test"}
    self.padding = {"x": np.float32(0), "y": np.float32(0), "weight": np.float32(0)}
    self.xs = np.linspace(-1, 1, 8).astype(np.float32)

  def initial_state(self, tx):
    return {**super().initial_state(tx), "teacher": {"w": np.float32(0.0)}}

  def epoch_order(self, epoch):
    return np.random.default_rng(epoch).permutation(len(self.xs))

  def example(self, index):
    x = self.xs[index]
    return {"x": x, "y": np.float32(3 * x), "weight": np.float32(1)}

  def learning_rate(self, epoch, step):
    return 0.3

  def end_epoch(self, end):
    return {"kind": "epoch", "epoch": end.epoch, "step": end.step, "loss": float(np.mean(end.losses))}, True

  def finish(self, state, frozen, last):
    import jax
    return {"state": jax.device_get(state)}


def test_a_methods_own_state_is_stepped_checkpointed_and_resumed(tmp_path):
  where = core.placement(4)
  options = core.LoopOptions(epochs=3, batch_size=4, progress=False, checkpoint_every_steps=1)
  whole = core.fit(_TeacherMethod(), tmp_path / "whole", options, where)["state"]
  assert 2.0 < float(whole["params"]["w"]) < 3.1
  assert 0.5 < float(whole["teacher"]["w"]) < float(whole["params"]["w"])  # it lags behind the student
  stopped = core.fit(_TeacherMethod(), tmp_path / "resumed", dataclasses.replace(options, stop_after_steps=3), where)
  assert stopped == {"stopped_at_step": 3}
  resumed = core.fit(_TeacherMethod(), tmp_path / "resumed", options, where)["state"]
  assert int(resumed["step"]) == int(whole["step"]) == 6
  np.testing.assert_array_equal(resumed["teacher"]["w"], whole["teacher"]["w"])
  np.testing.assert_array_equal(resumed["params"]["w"], whole["params"]["w"])
