"""Writing files so that a reader (or a rerun after a kill) sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


_umask: int | None = None


def file_mode() -> int:
  """The mode a plain `open(path, "w")` would give a new file under this process's umask (0644 for umask 022)."""
  global _umask
  if _umask is None:  # read once: os.umask can only be read by setting it, which is not thread-safe
    _umask = os.umask(0o022)
    os.umask(_umask)
  return 0o666 & ~_umask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  """Writes to a temporary sibling, flushes it to disk, then renames it over `path`. The file gets the mode of the
  process umask (mkstemp's private 0600 would stay on it), so colleagues can read shared outputs."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    os.fchmod(fd, file_mode())
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


def remove_stale_staging(target: Path) -> None:
  """Deletes what a killed writer of the folder `target` left beside it: `.NAME.partial-PID-*` (an unfinished
  output) and `.NAME.old-PID` (the previous output, moved aside while being replaced), for processes no longer
  alive. If the kill came after the old output was moved aside but before the new one was in place, the old one is
  put back."""
  from autosam_jax.faults import pid_alive

  target = Path(target)
  for path in sorted(target.parent.glob(f".{target.name}.*-*")):
    match = re.fullmatch(rf"\.{re.escape(target.name)}\.(partial|old)-(\d+)(-.*)?", path.name)
    if match is None or pid_alive(int(match.group(2))):
      continue
    if match.group(1) == "old" and not target.exists():
      path.rename(target)
    else:
      shutil.rmtree(path, ignore_errors=True)


def staging_dir(target: Path) -> Path:
  """A new empty folder `.NAME.partial-PID-RANDOM` beside `target`, to be filled and renamed to `target`; what
  killed writers of `target` left there is deleted first."""
  target = Path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  remove_stale_staging(target)
  # mkdir, not mkdtemp: mkdtemp's private 0700 mode would stay on the renamed output folder.
  staging = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
  staging.mkdir()
  return staging


def remove_settled(path: Path, attempts: int = 20) -> None:
  """Deletes a folder that a failed orbax save may still be adding to: after a write error, tensorstore's pending
  operations can create directories for a moment after the error is raised."""
  for _ in range(attempts):
    shutil.rmtree(path, ignore_errors=True)
    time.sleep(0.05)
    if not path.exists():
      return


def replace_dir(staging: Path, target: Path, kill_point_name: str | None = None) -> None:
  """Renames the finished `staging` folder to `target`. An existing `target` is first renamed aside to
  `.NAME.old-PID` and deleted after; a kill in between leaves it there, and `remove_stale_staging` puts it back."""
  target = Path(target)
  if not target.exists():
    Path(staging).rename(target)
    return
  old = target.with_name(f".{target.name}.old-{os.getpid()}")
  target.rename(old)
  if kill_point_name:
    from autosam_jax.faults import kill_point
    kill_point(kill_point_name)
  Path(staging).rename(target)
  shutil.rmtree(old)


def write_dir(target: str | os.PathLike, fill, kill_point_name: str | None = None) -> Path:
  """Writes the folder `target` whole or not at all: `fill(staging)` fills a staging folder beside it, which is then
  renamed into place (`replace_dir`); if `fill` fails, the staging folder is deleted and the old `target` kept."""
  target = Path(target).absolute()
  staging = staging_dir(target)
  try:
    fill(staging)
    replace_dir(staging, target, kill_point_name)
  except BaseException:
    remove_settled(staging)
    raise
  return target
