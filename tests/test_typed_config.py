"""The typed config loader's naming rules: a field's `kind` names its type in the refusal, in place of the hint's."""

from __future__ import annotations

import dataclasses

import pytest

from autosam_jax.errors import DataError
from autosam_jax.typed_config import TypedConfig, option


@dataclasses.dataclass(frozen=True)
class Paths(TypedConfig):
  OPTIONS = "paths"

  root: str = option("", kind="a path (text)")
  names: dict[str, str] = option(default_factory=dict, kind="a dict of name -> path, e.g. {'a': 'a.pth'}")
  count: int = option(1, at_least=1, kind="a whole number")


@pytest.mark.parametrize("values,message", [
    ({"root": 3}, "root must be a path (text), got int 3"),
    ({"names": ["a"]}, "names must be a dict of name -> path, e.g. {'a': 'a.pth'}, got list ['a']"),
    ({"names": {"a": 1}}, "names must be a dict of name -> path, e.g. {'a': 'a.pth'}, got dict {'a': 1}"),
    ({"count": True}, "count must be a whole number, got bool True"),
    ({"count": 0}, "count must be a positive integer, got 0")])  # the range rule is unchanged by kind
def test_kind_names_the_type_in_the_refusal(values, message):
  with pytest.raises(DataError) as refused:
    Paths.from_dict(values, source="p.py")
  assert str(refused.value) == f"p.py: {message}"


def test_kind_changes_nothing_that_is_accepted():
  paths = Paths.from_dict({"root": "data", "names": {"a": "a.pth"}, "count": 2}, source="p.py")
  assert paths == Paths(root="data", names={"a": "a.pth"}, count=2) and Paths.from_dict(paths.to_dict()) == paths
