"""Orbax checkpoints of a training run: the train state (params, optimizer state, step) plus a JSON of everything
else needed to continue exactly (epoch, data-iterator state, scheduler, best score, config)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class RunCheckpoints:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager`: atomic saves, the last `keep` kept, latest restored."""

  def __init__(self, directory: str | os.PathLike, keep: int = 2):
    import orbax.checkpoint as ocp

    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state: Any, step: int | None = None,
              required: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """The newest checkpoint (or `step`'s). A damaged newest one (truncated or corrupt files, a killed copy) is
    reported in one warning line and the one before it is used; the damaged ones are then deleted, so the run writes
    its steps again. If none can be read, a DataError names the folder. `required`: keys the JSON metadata must have
    (a checkpoint without them is damaged)."""
    import sys

    import orbax.checkpoint as ocp

    from autosam_jax.data.errors import DataError
    from autosam_jax.faults import restore_or_raise

    steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
    damaged = []
    for candidate in steps:
      def restore():
        restored = self.manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        meta = restored.meta
        if not isinstance(meta, dict) or not set(required) <= set(meta):
          raise ValueError("its metadata is incomplete")
        return restored.state, meta
      try:
        result = restore_or_raise(restore, ValueError)
      except ValueError as err:
        print(f"warning: {self.directory / str(candidate)}: damaged checkpoint ({err}); "
              + ("trying the one before it" if candidate != steps[-1] else "no earlier checkpoint"), file=sys.stderr)
        damaged.append(candidate)
        continue
      for bad in damaged:  # newer than the one restored: rewritten as the run goes on
        self.manager.delete(bad)
      self.manager.reload()
      return result
    raise DataError(f"{self.directory}: no checkpoint can be read (the newest are damaged: steps {damaged}); "
                    "train again into a new output folder")

  def close(self) -> None:
    self.manager.close()
