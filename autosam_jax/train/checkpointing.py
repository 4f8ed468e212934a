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

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    import orbax.checkpoint as ocp

    step = self.manager.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                   meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def close(self) -> None:
    self.manager.close()
