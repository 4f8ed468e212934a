"""Python config files (a `get_config()` returning a dict of options) and `--set NAME=VALUE` overrides, read the same
way by every command that takes them; any problem is a DataError naming the file or the override."""

from __future__ import annotations

import ast
import runpy
from pathlib import Path
from typing import Any

from autosam_jax.errors import DataError


def read_config_file(path: str | Path) -> dict[str, Any]:
  """The dict `get_config()` of a Python file returns."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path}: no such config file")
  try:
    namespace = runpy.run_path(str(path))
  except Exception as err:  # a config is user code: any failure in it is bad input, reported in one line
    raise DataError(f"{path}: cannot run the config file ({type(err).__name__}: {_first_line(err)})") from None
  get_config = namespace.get("get_config")
  if not callable(get_config):
    raise DataError(f"{path}: defines no get_config()")
  try:
    values = get_config()
  except Exception as err:
    raise DataError(f"{path}: get_config() failed ({type(err).__name__}: {_first_line(err)})") from None
  if not isinstance(values, dict):
    raise DataError(f"{path}: get_config() returned {type(values).__name__}, not a dict of options")
  return dict(values)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
  """`NAME=VALUE` strings applied to a copy of `values`; VALUE is a Python literal, else taken as text."""
  values = dict(values)
  for override in overrides:
    name, equals, text = override.partition("=")
    if not equals or not name.strip():
      raise DataError(f"--set {override!r}: expected NAME=VALUE")
    try:
      values[name.strip()] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      values[name.strip()] = text
  return values


def _first_line(err: BaseException) -> str:
  text = str(err).strip()
  return text.splitlines()[0] if text else "no message"
