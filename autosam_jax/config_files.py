"""Python config files (a `get_config()` returning a dict of options) and `--set NAME=VALUE` overrides, read the same
way by every command that takes them; any problem is a DataError naming the file or the override."""

from __future__ import annotations

import ast
import contextlib
import runpy
from pathlib import Path
from typing import Any

from autosam_jax.errors import DataError

# The longest `--set NAME=VALUE`: far more than any option's value (a list of patient ids) needs.
MAX_OVERRIDE_CHARS = 10_000


def read_config_file(path: str | Path) -> dict[str, Any]:
  """The dict `get_config()` of a Python file returns."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such config file")
  with _signals_as_interrupted():
    try:
      namespace = runpy.run_path(str(path))
    except Exception as err:  # a config is user code: any failure in it is bad input, reported in one line
      raise DataError(f"{path}: cannot run the config file ({type(err).__name__}: {_first_line(err)})") from None
    except (SystemExit, KeyboardInterrupt) as err:
      raise _escape(path, "running the config file", err) from None
  get_config = namespace.get("get_config")
  if not callable(get_config):
    raise DataError(f"{path}: defines no get_config()")
  with _signals_as_interrupted():
    try:
      values = get_config()
    except Exception as err:
      raise DataError(f"{path}: get_config() failed ({type(err).__name__}: {_first_line(err)})") from None
    except (SystemExit, KeyboardInterrupt) as err:
      raise _escape(path, "get_config()", err) from None
  if not isinstance(values, dict):
    raise DataError(f"{path}: get_config() returned {type(values).__name__}, not a dict of options")
  return dict(values)


@contextlib.contextmanager
def _signals_as_interrupted():
  """A Ctrl-C while a config file runs arrives as `faults.Interrupted`, whatever the caller's SIGINT handler (under
  `faults.run_command` it already does): any other KeyboardInterrupt then came from the file's own code."""
  import signal
  import threading

  from autosam_jax.faults import raise_interrupted

  if threading.current_thread() is not threading.main_thread() or \
      signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    yield
    return
  signal.signal(signal.SIGINT, raise_interrupted)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _escape(path: Path, where: str, err: BaseException) -> BaseException:
  """What a config file's sys.exit() or `raise KeyboardInterrupt` becomes: the file's error, as the command would
  otherwise end with the exit code the file chose (0: nothing done, reported as success) or report a Ctrl-C nobody
  pressed. A real Ctrl-C (`faults.Interrupted`) stays an interruption."""
  from autosam_jax.faults import Interrupted

  if isinstance(err, Interrupted):
    return err
  if isinstance(err, SystemExit):
    return DataError(f"{path}: {where} called sys.exit({err.code!r}); a config file only defines get_config(), "
                     "remove the exit")
  return DataError(f"{path}: {where} raised KeyboardInterrupt; a config file only defines get_config(), remove the "
                   "raise")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
  """`NAME=VALUE` strings applied to a copy of `values`; VALUE is a Python literal, else taken as text."""
  values = dict(values)
  for override in overrides:
    if len(override) > MAX_OVERRIDE_CHARS:  # parsing a pathological one exhausts memory (MemoryError)
      raise DataError(f"--set {override[:30]!r}...: {len(override):,} characters, more than the "
                      f"{MAX_OVERRIDE_CHARS:,} a --set may have; put long values in a config file (--config)")
    name, equals, text = override.partition("=")
    if not equals or not name.strip():
      raise DataError(f"--set {override!r}: expected NAME=VALUE")
    try:
      values[name.strip()] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      values[name.strip()] = text
    except (MemoryError, RecursionError):  # nesting too deep for the parser, even within the length limit
      raise DataError(f"--set {override[:30]!r}{'...' if len(override) > 30 else ''}: the value is nested too "
                      "deeply to parse; put it in a config file (--config)") from None
  return values


def _first_line(err: BaseException) -> str:
  text = str(err).strip()
  return text.splitlines()[0] if text else "no message"
