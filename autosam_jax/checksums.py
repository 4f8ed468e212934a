"""SHA-256 checksums of saved folders (converted weights, trained models), written at save time and verified at load,
so flipped or truncated bytes are one error line naming the file instead of a model that quietly computes garbage.

FOLDER/checksums.json: {"algorithm": "sha256", "files": {relative path: hex digest}} over the files that loading
reads. Within a process a verified file is not hashed again unless its size or modification time changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from autosam_jax.outputs import file_digest

NAME = "checksums.json"
_verified: dict[tuple[str, int, int], str] = {}


def _files(folder: Path, parts: tuple[str, ...]) -> list[Path]:
  found = []
  for part in parts:
    path = folder / part
    found += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
  return found


def write_checksums(folder: str | os.PathLike, parts: tuple[str, ...]) -> None:
  """Writes FOLDER/checksums.json for the files of `parts` (files or subfolders of FOLDER)."""
  from autosam_jax.atomic import atomic_write_json

  folder = Path(folder)
  files = {str(p.relative_to(folder)): file_digest(p) for p in _files(folder, parts)}
  atomic_write_json(folder / NAME, {"algorithm": "sha256", "files": files})


def verify_checksums(folder: str | os.PathLike, error: Callable[[str], Exception], redo: str) -> None:
  """Raises `error(message)` naming the first file that is missing or differs from FOLDER/checksums.json; `redo` is
  the fix to print (e.g. "convert the weights again")."""
  folder = Path(folder)
  record_file = folder / NAME
  try:
    record = json.loads(record_file.read_text())
    files = record["files"]
    if not isinstance(files, dict) or record.get("algorithm") != "sha256":
      raise ValueError("not a checksum record")
  except FileNotFoundError:
    raise error(f"{record_file}: missing (written by an older version, or not by autosam-jax); {redo}") from None
  except (OSError, ValueError, KeyError, TypeError) as err:
    raise error(f"{record_file}: unreadable ({type(err).__name__}: {err}); {redo}") from None
  for name, expected in sorted(files.items()):
    path = folder / name
    try:
      stat = path.stat()
    except FileNotFoundError:
      raise error(f"{path}: missing; the folder is incomplete, {redo}") from None
    key = (str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if _verified.get(key) != expected:
      if file_digest(path) != expected:
        raise error(f"{path}: checksum mismatch (the file was changed or damaged after it was written); {redo}")
      _verified[key] = expected
