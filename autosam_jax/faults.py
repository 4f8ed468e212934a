"""Kill points and disk-full handling.

Kill points are named places in the writing code where a fault test makes the process die exactly as a SIGKILL from
outside would, so the test can choose in advance where a run is interrupted:

  AUTOSAM_JAX_KILL_AT=convert.params_staged autosam-jax convert ...      # dies at the first hit
  AUTOSAM_JAX_KILL_AT=build.example:40 autosam-jax build-dataset ...     # dies at the 40th hit

Unset (always, outside tests), `kill_point` costs one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading

from autosam_jax.errors import DISK_FULL_EXIT, AutosamError

ENV = "AUTOSAM_JAX_KILL_AT"
SIGNAL_ENV = "AUTOSAM_JAX_KILL_SIGNAL"
_hits: dict[str, int] = {}

# errno values meaning "the disk (or the quota, or the file-size limit) is full"
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "File too large")


def kill_point(name: str) -> None:
  """Dies here (SIGKILL) at the chosen hit; AUTOSAM_JAX_KILL_SIGNAL=INT or TERM sends that signal instead, as a
  Ctrl-C or a batch scheduler's stop would arrive at this point."""
  spec = os.environ.get(ENV)
  if not spec:
    return
  target, _, count = spec.partition(":")
  if target != name:
    return
  _hits[name] = _hits.get(name, 0) + 1
  if _hits[name] == int(count or 1):
    signum = getattr(signal, "SIG" + os.environ.get(SIGNAL_ENV, "KILL"))
    handler = None if signum == signal.SIGKILL else signal.getsignal(signum)
    if callable(handler) and threading.current_thread() is threading.main_thread():
      # The signal's Python handler, run here and now, as the signal arriving at this point runs it. (A signal sent
      # with os.kill reaches Python's handler only at a later check of the main thread, which a loaded machine can
      # put after the rest of the run.)
      handler(signum, sys._getframe())
      return
    os.kill(os.getpid(), signum)


class Interrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM arrived: raised in the main thread wherever it was, so every `finally` and every atomic
  writer's clean-up runs; the command then prints one line and exits 128 + the signal's number."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def raise_interrupted(signum, frame):
  raise Interrupted(signum)


INTERRUPT_TEXT = "interrupted; rerun the same command to resume (finished work is kept)"


def disk_full(err: BaseException) -> str | None:
  """If `err` (or an exception it was raised from) says the disk is full, one line saying so; else None.

  Python's own writes raise OSError with ENOSPC/EDQUOT/EFBIG; tensorstore (under orbax) and TFDS wrap the same
  failure in their own exceptions, so their messages are searched too."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno in DISK_FULL:
      where = f"{err.filename}: " if err.filename else ""
      return f"{where}{err.strerror or os.strerror(err.errno)}"
    text = str(err)
    for marker in _DISK_FULL_TEXT:
      if marker in text:
        paths = re.findall(r'"(/[^"]+)"', text)  # tensorstore quotes the file it failed to write last
        return f"{paths[-1]}: {marker}" if paths else marker
    err = err.__cause__ or err.__context__
  return None


_quiet = False  # run_command's log filters are installed


def _unraisable(info) -> None:
  """sys.unraisablehook of the commands: drops the noise of orbax's aborted work, passes everything else on."""
  import sys

  if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
    return
  # After a failed restore (a checkpoint of another architecture: already reported in one line), orbax's pending
  # read coroutines are closed when collected, and each turns the GeneratorExit into an exception of its own.
  code = getattr(info.object, "cr_code", None)
  closed = info.exc_value is not None and isinstance(info.exc_value.__cause__ or info.exc_value.__context__,
                                                     GeneratorExit)
  if code is not None and "orbax" in code.co_filename and closed:
    return
  sys.__unraisablehook__(info)


def restore_or_raise(restore, error):
  """`restore()`, or `error(reason)` raised with the first line of what went wrong.

  Before raising, what the failed orbax restore left unfinished (its read coroutines) is collected, so their
  tracebacks meet the commands' hook here rather than surface later, after the error line or inside whatever runs
  next."""
  import gc

  try:
    return restore()
  except Exception as err:  # noqa: BLE001 - any failure of the restore is the file's problem, in one line
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  gc.collect()
  raise error(reason)


def close_progress_bars() -> None:
  """Closes every tqdm bar still open (an exception that ended a command may have left its bar open): a bar's last
  text ends without a newline, so the error line printed next would start inside it. Closed, a bar keeps its last
  state on a line of its own."""
  import sys

  module = sys.modules.get("tqdm.std")  # never imported here: no bar was ever made if tqdm was not
  if module is None:
    return
  for bar in list(getattr(module.tqdm, "_instances", ())):
    try:
      bar.close()
    except Exception:  # noqa: BLE001 - a bar that cannot be closed must not hide the error line that follows
      pass


def run_command(run, args) -> int:
  """`run(args)`, with every error of `autosam_jax.errors` printed as `error: <message>` and its exit code returned,
  SIGINT/SIGTERM as one line (exit 130/143) and a full disk as one line (exit 4), never a traceback.

  When a write fails, orbax logs the tensorstore error (which the one line repeats), asyncio logs each failed write
  task, and orbax's other pending writes finish against a closed event loop, each printing an "Event loop is closed"
  traceback (or are never awaited, a warning at shutdown); log records about a full disk and that noise are silenced
  for the rest of the process, as are the tracebacks of orbax's read coroutines closed after a failed restore."""
  import logging
  import sys
  import warnings

  class DropDiskFull(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
      if record.exc_info and record.exc_info[1] is not None and disk_full(record.exc_info[1]):
        return False
      return not any(marker in record.getMessage() for marker in _DISK_FULL_TEXT)

  global _quiet
  if not _quiet:  # once per process, kept to its end: some of the noise comes at interpreter shutdown
    for name in ("absl", "asyncio"):  # asyncio: "Task exception was never retrieved" for each failed write
      logging.getLogger(name).addFilter(DropDiskFull())
    _quiet = True
  sys.unraisablehook = _unraisable  # again on every call: a host process (a test runner) may have swapped it
  import threading

  handlers = {}
  if threading.current_thread() is threading.main_thread():
    for signum in (signal.SIGINT, signal.SIGTERM):
      handlers[signum] = signal.signal(signum, raise_interrupted)
  try:
    return run(args)
  except AutosamError as err:
    close_progress_bars()
    print(f"error: {err}", file=sys.stderr)
    return err.exit_code
  except KeyboardInterrupt as err:
    close_progress_bars()
    signum = getattr(err, "signum", signal.SIGINT)
    print(f"error: {signal.Signals(signum).name}: {INTERRUPT_TEXT}", file=sys.stderr)
    return 128 + signum
  except Exception as err:  # noqa: BLE001 - only a full disk becomes a message; anything else propagates
    problem = disk_full(err)
    if problem is None:
      raise
    if not problem.startswith("/"):  # the failed write named no file: name the command's output
      where = next((getattr(args, name) for name in ("out", "out_dir", "output") if getattr(args, name, None)), None)
      problem = f"{os.path.abspath(where)}: {problem}" if where else problem
    # orbax's write coroutines that never ran are collected at interpreter shutdown, each with a RuntimeWarning
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    close_progress_bars()
    print(f"error: disk full while writing: {problem}; free some space (or write elsewhere) and rerun: finished "
          "work is kept and the rerun goes on from it", file=sys.stderr)
    return DISK_FULL_EXIT
  finally:
    for signum, handler in handlers.items():
      signal.signal(signum, handler)


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True
