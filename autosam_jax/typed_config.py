"""Frozen dataclass configs built from plain values: a config file's get_config(), `--set NAME=VALUE` overrides
(`config_files`), a JSON record of a run. Every refusal is one line naming where the values came from and the field.

  @dataclasses.dataclass(frozen=True)
  class RunConfig(TypedConfig):
    OPTIONS = "training"                                      # "unknown training option(s) ...", "training config: ..."
    epochs: int = option(10, at_least=1)
    learning_rate: float = option(1e-3, above=0, finite=True)  # an int is taken (as a float)
    scheduler: str = option("plateau", choices=("plateau", "cosine"))
    sizes: tuple[int, ...] = option((1, 2), at_least=1)       # a list is taken as a tuple; rules apply to each item
    tag: str | None = None

    def check(self):                                           # rules between fields, after the per-field ones
      if self.tag == "":
        raise self.refusal("tag must not be empty; leave it out")

  RunConfig.from_dict({"epochs": 3}, source="cfg.py")          # cfg.py: unknown names, types, ranges, choices
  RunConfig.from_file(Path("cfg.py"), ["epochs=3"])            # get_config() of cfg.py, then --set epochs=3
  RunConfig(epochs=0)                                          # the same checks: "training config: epochs must ..."

Types are strict: bool is not an int (`epochs=True` is a mistake, not one epoch), an int is accepted for a float,
lists for tuples, None only for `X | None`. The field rules (`option`) are checked at construction, so
`dataclasses.replace` and direct construction are refused the same way as a config file.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import types
import typing
from typing import Any, ClassVar, Mapping

from autosam_jax.errors import DataError

_RULE = "autosam_jax.typed_config"
# Where the values being checked came from (a config file, "--set", a JSON record); set by from_dict.
_source: contextvars.ContextVar[str | None] = contextvars.ContextVar("typed_config_source", default=None)


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field's value must satisfy beyond its type; for a tuple field, each item."""
  choices: tuple[Any, ...] | None = None
  at_least: float | None = None
  above: float | None = None
  below: float | None = None
  at_most: float | None = None
  finite: bool = False
  shown: str | None = None  # the field's name in messages, e.g. "decoder_num_heads (--decoder-num-heads)"
  kind: str | None = None  # what its type is called in messages, e.g. "a path (text)"; default: from the type hint
  needed: str = ""  # for a field without a default: what it is, in the message when it is missing


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **rule) -> Any:
  """A dataclass field with a `Rule` (choices=, at_least=, above=, below=, at_most=, finite=, shown=, kind=,
  needed=)."""
  return dataclasses.field(default=default, default_factory=default_factory, metadata={_RULE: Rule(**rule)})


def rule_of(field: dataclasses.Field) -> Rule:
  return field.metadata.get(_RULE, Rule())


class TypedConfig:
  """Base of a frozen dataclass config: field types and rules checked at construction, `from_dict` and `to_dict`.

  OPTIONS names the options in messages; ERROR is the exception raised (one line: "<source>: <field> <problem>");
  UNKNOWN is the refusal of unknown names. Subclasses put rules between fields in `check`, raising
  `self.refusal(text)`; conversions of their own (paths, spellings) go in a `from_dict` that calls this one.
  """

  OPTIONS: ClassVar[str] = "config"
  ERROR: ClassVar[type[Exception]] = DataError
  # The refusal of unknown names ({options}: OPTIONS, {unknown} and {known}: sorted lists of names).
  UNKNOWN: ClassVar[str] = "unknown {options} option(s) {unknown}; known: {known}"

  def __post_init__(self):
    hints = _hints(type(self))
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      conformed = _checked(value, hints[field.name], rule_of(field), field.name, self)
      if conformed is not value:
        object.__setattr__(self, field.name, conformed)  # a list as its tuple, an int as its float
    self.check()

  def check(self) -> None:
    """Rules between fields; raise `self.refusal(...)`."""

  @classmethod
  def source_text(cls) -> str:
    return _source.get() or f"{cls.OPTIONS} config"

  def refusal(self, text: str) -> Exception:
    """The error for `text` ("<field> must ...; <fix>"), prefixed with where the values came from."""
    return type(self).ERROR(f"{self.source_text()}: {text}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], source: str = "config"):
    """The config of `values` (names as the fields'); unknown names, missing required ones, wrong types and values
    outside a field's rule are refused in one line beginning with `source`."""
    if not isinstance(values, Mapping):
      raise cls.ERROR(f"{source}: expected a dict of {cls.OPTIONS} options, got {_shown_value(values)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
      raise cls.ERROR(f"{source}: " + cls.UNKNOWN.format(options=cls.OPTIONS, unknown=unknown, known=sorted(fields)))
    for name, field in fields.items():
      required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
      if required and name not in values:
        needed = rule_of(field).needed
        raise cls.ERROR(f"{source}: the {cls.OPTIONS} config needs {name!r}" + (f" ({needed})" if needed else ""))
    with sourced(source):
      return cls(**values)

  @classmethod
  def from_file(cls, path, overrides=()):
    """The options of a Python config file's get_config() (None: the defaults), then each `--set NAME=VALUE`
    override (a Python literal, else the text); refusals name the file ("<file> with --set" once overridden)."""
    from autosam_jax.config_files import apply_overrides, read_config_file

    values = read_config_file(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    if overrides:
      source += " with --set"
    return cls.from_dict(apply_overrides(values, list(overrides)), source=source)


@contextlib.contextmanager
def sourced(source: str):
  """Configs constructed inside name `source` in their refusals (as `from_dict` does)."""
  token = _source.set(source)
  try:
    yield
  finally:
    _source.reset(token)


@functools.cache
def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _checked(value: Any, hint: Any, rule: Rule, name: str, config: TypedConfig) -> Any:
  shown = rule.shown or name
  ok, conformed = _conform(value, hint)
  if not ok:
    raise config.refusal(f"{shown} must be {rule.kind or _describe(hint)}, got {_shown_value(value)}")
  if isinstance(conformed, tuple) and _is_sequence(hint):
    problems = [p for p in map(lambda item: _against_rule(item, rule), conformed) if p]
    if problems:
      raise config.refusal(f"{shown}: every item must {problems[0]}, got {list(conformed)}")
    return conformed
  problem = _against_rule(conformed, rule)
  if problem:
    raise config.refusal(f"{shown} must {problem}, got {value!r}")
  return conformed


def _against_rule(value: Any, rule: Rule) -> str | None:
  """What `value` fails of `rule` ("be one of ...", "be a positive integer"), or None."""
  if value is None:
    return None
  if rule.choices is not None and value not in rule.choices:
    return f"be one of {', '.join(map(str, rule.choices))}"
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return None
  failed = Rule(at_least=rule.at_least if rule.at_least is not None and not value >= rule.at_least else None,
                above=rule.above if rule.above is not None and not value > rule.above else None,
                below=rule.below if rule.below is not None and not value < rule.below else None,
                at_most=rule.at_most if rule.at_most is not None and not value <= rule.at_most else None,
                finite=rule.finite)
  if (failed.at_least, failed.above, failed.below, failed.at_most) == (None,) * 4 and (math.isfinite(value) or
                                                                                       not rule.finite):
    return None
  return f"be {_range_text(failed, isinstance(value, int))}"  # only the limits it fails


def _range_text(rule: Rule, integer: bool) -> str:
  limits = []
  if rule.at_least is not None:
    limits.append("positive" if integer and rule.at_least == 1 else f"{_number(rule.at_least)} or more")
  if rule.above is not None:
    limits.append("positive" if rule.above == 0 else f"above {_number(rule.above)}")
  if rule.below is not None:
    limits.append(f"below {_number(rule.below)}")
  if rule.at_most is not None:
    limits.append(f"{_number(rule.at_most)} or less")
  kind = "an integer" if integer else ("a finite number" if rule.finite else "a number")
  if integer and limits == ["positive"]:
    return "a positive integer"
  return ", ".join([kind, " and ".join(limits)]) if limits else kind


def _number(value: float) -> str:
  """2**63 rather than 9223372036854775808."""
  if isinstance(value, int) and value >= 2 ** 16 and value & (value - 1) == 0:
    return f"2**{value.bit_length() - 1}"
  return f"{value:g}" if isinstance(value, float) else str(value)


def _shown_value(value: Any) -> str:
  text = repr(value)
  return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _is_sequence(hint: Any) -> bool:
  return typing.get_origin(hint) is tuple or any(typing.get_origin(h) is tuple for h in _members(hint))


def _members(hint: Any) -> tuple[Any, ...]:
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    return typing.get_args(hint)
  return ()


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
  """(whether `value` is of type `hint`, the value as the field holds it)."""
  if hint is Any:
    return True, value
  if hint is None or hint is type(None):
    return value is None, value
  members = _members(hint)
  if members:
    for member in members:
      ok, conformed = _conform(value, member)
      if ok:
        return True, conformed
    return False, value
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is tuple:
    if not isinstance(value, (list, tuple)):
      return False, value
    item_hints = (args[0],) * len(value) if len(args) == 2 and args[1] is Ellipsis else args
    if args and len(item_hints) != len(value):
      return False, value
    items = [_conform(v, h) for v, h in zip(value, item_hints)] if args else [(True, v) for v in value]
    return all(ok for ok, _ in items), tuple(v for _, v in items)
  if origin in (dict, Mapping):
    if not isinstance(value, Mapping):
      return False, value
    if not args:
      return True, dict(value)
    keys, values = [_conform(k, args[0]) for k in value], [_conform(v, args[1]) for v in value.values()]
    if not all(ok for ok, _ in keys + values):
      return False, value
    return True, {k: v for (_, k), (_, v) in zip(keys, values)}
  if hint is bool:
    return isinstance(value, bool), value
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool), value
  if hint is float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number, float(value) if number and not isinstance(value, float) else value
  if isinstance(hint, type) and issubclass(hint, TypedConfig) and isinstance(value, Mapping):
    return True, hint.from_dict(value, source=_source.get() or hint.OPTIONS)  # a section of its own, checked by it
  if isinstance(hint, type):
    return isinstance(value, hint), value
  return True, value  # a type this loader does not check (a Literal, a Protocol): the field's own check() does


def _describe(hint: Any) -> str:
  if hint is None or hint is type(None):
    return "None"
  members = _members(hint)
  if members:
    return " or ".join(_describe(m) for m in members)
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is tuple:
    if len(args) == 2 and args[1] is Ellipsis:
      return f"a list of {_describe(args[0])}"
    return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})" if args else "a list"
  if origin in (dict, Mapping):
    return f"a dict of {_describe(args[0])} -> {_describe(args[1])}" if args else "a dict"
  if hint is Any:
    return "any value"
  return getattr(hint, "__name__", str(hint))
