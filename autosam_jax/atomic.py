"""Writing files so that a reader (or a rerun after a kill) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  """Writes to a temporary sibling, flushes it to disk, then renames it over `path`."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> Path:
  return atomic_write_bytes(path, (json.dumps(data, indent=indent) + "\n").encode())
