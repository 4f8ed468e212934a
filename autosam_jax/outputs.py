"""Output folders: what a command may write into, replace or resume, and one process at a time in each.

- `check_output_path`: an --out that is an existing file (or a symbolic link), or that this process may not write
  (`check_writable`), is refused before any work.
- `check_replaceable`: `--overwrite` replaces only an earlier output of the same command, recognised by its marker
  file and its known entries, and never a folder that holds one of the command's inputs.
- `OutputLock`: an advisory lock (flock) on OUT/.lock held while a command writes there; the kernel releases it when
  the process ends however it ends, so the lock of a dead process is simply taken over.
- `claim_run`: a resumable run folder records its identity (what it was made from) in run.json; a rerun with another
  identity is refused naming the field that differs, and a folder the command did not write is never written into.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from autosam_jax.errors import DataError

LOCK_NAME = ".lock"
RUN_RECORD = "run.json"


def check_folder(path: str | os.PathLike, option: str) -> Path:
  """A folder a command writes into (and may create): a file at `path`, or at the nearest existing folder above it,
  is one error line before any work, rather than a traceback at the first write."""
  path = Path(path).expanduser()
  if path.exists() and not path.is_dir():
    raise DataError(f"{path}: exists and is a file, not a folder; choose another {option}")
  for parent in path.absolute().parents:
    if parent.exists():
      if not parent.is_dir():
        raise DataError(f"{parent}: is a file, not a folder; choose another {option}")
      break
  return path


def check_writable(path: str | os.PathLike, option: str) -> None:
  """The folder writing `path` creates entries in (`path` itself if it is a folder, else the nearest existing folder
  above it) lets this process create files there: a read-only folder is one error line before any work, rather than
  a PermissionError (or a read-only file system's error) at the first write, after minutes of work."""
  path = Path(path).expanduser().absolute()
  folder = path if path.is_dir() else next((p for p in path.parents if p.exists()), None)
  if folder is not None and folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
    raise DataError(f"{folder}: not writable (no permission to create files in it, or a read-only file system); "
                    f"choose another {option}, or get write access to this folder")


def check_output_path(path: str | os.PathLike, option: str = "--out") -> Path:
  """An output folder: as `check_folder`; it may be a link to a folder, but not a link to nothing; it (or the folder
  it is to be made in) must be writable."""
  path = Path(path).expanduser()
  if path.is_symlink() and not path.exists():
    raise DataError(f"{path}: is a symbolic link to nothing ({os.path.realpath(path)}); remove the link or choose "
                    f"another {option}")
  check_folder(path, option)
  check_writable(path, option)
  return path


def _inside(path: Path, folder: Path) -> bool:
  path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
  return path == folder or folder in path.parents


def check_replaceable(out: str | os.PathLike, *, marker: str, entries: Iterable[str],
                      inputs: Iterable[str | os.PathLike], command: str, option: str = "--overwrite") -> None:
  """Refuses to replace `out` unless it is an earlier output of `command`: it holds `marker`, nothing but `entries`
  (and the command's own hidden files), and none of `inputs`. Nothing is checked when `out` does not exist."""
  out = check_output_path(out, "output folder")
  if not out.exists():
    return
  check_writable(out.absolute().parent, "output folder")  # replacing renames `out` aside, in the folder above it
  if out.is_symlink():  # replacing renames the link, not the folder: give the folder itself
    raise DataError(f"{out}: is a symbolic link; {option} replaces real folders only, give the folder it points to "
                    f"({os.path.realpath(out)})")
  for source in inputs:
    if _inside(Path(source), out):
      raise DataError(f"{out}: holds the input {source}; {option} would delete it, write to another folder")
  if not (out / marker).is_file():
    raise DataError(f"{out}: was not written by autosam-jax {command} (no {marker}); {option} replaces only an "
                    "earlier output of the same command, choose another folder")
  foreign = sorted(p.name for p in out.iterdir() if p.name not in set(entries) and not p.name.startswith("."))
  if foreign:
    shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
    raise DataError(f"{out}: holds files autosam-jax {command} did not write ({shown}); {option} would delete them, "
                    "move them away or choose another folder")


class OutputLock:
  """`with OutputLock(folder):` one process at a time writes `folder`; another gets one line naming the holder.

  The folder is created if needed (call it once everything is checked). Under jax.distributed only process 0 takes
  the lock: the others write the same folder as part of one run."""

  def __init__(self, folder: str | os.PathLike, *, take: bool = True):
    self.folder = Path(folder)
    self.take = take
    self._fd: int | None = None

  def __enter__(self) -> "OutputLock":
    if not self.take:
      return self
    import fcntl

    self.folder.mkdir(parents=True, exist_ok=True)
    path = self.folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise DataError(f"{self.folder}: in use by another process (pid {holder}); wait for it to finish, or choose "
                      "another output folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing releases the flock; the file stays (removing it would race a waiting process)
      self._fd = None


def file_digest(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    found = []
    for key in sorted(set(old) | set(new)):
      found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    return found
  return [] if old == new else [prefix.rstrip(".")]


def _short(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def claim_run(folder: str | os.PathLike, command: str, identity: dict[str, Any], *, write: bool = True) -> bool:
  """Records `identity` in FOLDER/run.json for a new run, or checks it against the recorded one; True if resuming.

  A folder with files but no run.json was not made by this command: it is refused rather than written into. Call it
  holding the folder's `OutputLock`; `write=False` only checks."""
  from autosam_jax.atomic import atomic_write_json

  folder = Path(folder)
  record_file = folder / RUN_RECORD
  identity = json.loads(json.dumps(identity))  # the form it has once read back (tuples as lists)
  if record_file.is_file():
    try:
      record = json.loads(record_file.read_text())
      if not isinstance(record, dict) or not isinstance(record.get("identity"), dict):
        raise ValueError("not a run record")
    except (OSError, ValueError) as err:
      raise DataError(f"{record_file}: unreadable ({type(err).__name__}: {err}); the run folder is damaged, choose "
                      "another output folder") from None
    if record.get("command") != command:
      raise DataError(f"{folder}: holds a run of autosam-jax {record.get('command')}, not of {command}; choose "
                      "another output folder")
    changed = _differences(record["identity"], identity)
    if changed:
      field = changed[0]
      old, new = record["identity"], identity
      for part in field.split("."):
        old = old.get(part) if isinstance(old, dict) else None
        new = new.get(part) if isinstance(new, dict) else None
      more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
      raise DataError(f"{folder}: holds a run with another {field}{more}: {_short(old)} there, {_short(new)} now; "
                      "rerun with the same inputs to resume it, or choose another output folder")
    return True
  if folder.is_dir():
    foreign = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)
    if foreign:
      shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
      raise DataError(f"{folder}: is not empty ({shown}) and holds no {RUN_RECORD} of autosam-jax {command}; choose "
                      "a new or empty output folder")
  if write:
    atomic_write_json(record_file, {"command": command, "identity": identity})
  return False


def take_output(stack, folder: str | os.PathLike, command: str, identity: dict[str, Any], *, main: bool = True) -> bool:
  """Once every input is checked: locks `folder` for the rest of `stack` (a contextlib.ExitStack) and claims it
  for this run (`claim_run`); True if it resumes a run of the same identity. Other processes of a jax.distributed
  run (`main` False) neither lock nor write: they wait at a barrier for process 0."""
  from autosam_jax.parallel import all_gather_objects

  resumed, refusal = False, None
  if main:
    try:
      claim_run(folder, command, identity, write=False)  # a foreign or other run's folder: refused before the lock
      stack.enter_context(OutputLock(folder))
      resumed = claim_run(folder, command, identity)
    except DataError as err:
      refusal = err
  # every process learns process 0's outcome, so a refusal stops them all (instead of leaving them at a barrier)
  resumed, reason = all_gather_objects((resumed, None if refusal is None else str(refusal)))[0]
  if refusal is not None:
    raise refusal
  if reason is not None:
    raise DataError(reason)
  return resumed
