"""Imports go downward only: the import graph of `autosam_jax` and `weights_conversion`, read from the source with
`ast`, has no cycle and respects the layers.

  base (autosam_jax/*.py: errors, faults, atomic, outputs, ...)   imports no subpackage
  models, data                                                    know nothing of each other or of anything above
  weights_conversion                                              models and base only
  features (data, models)
  train (features, data, models)        evaluation (features, data, models)       neither imports the other
  experiment                                                      everything but the commands
  commands, cli                                                   the command line, on top

Every import counts, at module level or inside a function: a cycle through module-level imports breaks importing,
and a function-level import that points upward ties a lower layer to a higher one all the same."""

from __future__ import annotations

import ast
import dataclasses
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("autosam_jax", "weights_conversion")
SUBPACKAGES = ("models", "data", "features", "train", "evaluation", "experiment", "commands")

# What each group may not import (groups: the subpackages of autosam_jax, "base", "weights_conversion").
FORBIDDEN = {
    "base": {*SUBPACKAGES, "cli", "weights_conversion"},
    "models": {"data", "features", "train", "evaluation", "experiment", "commands", "cli", "weights_conversion"},
    "data": {"models", "features", "train", "evaluation", "experiment", "commands", "cli", "weights_conversion"},
    "weights_conversion": {"data", "features", "train", "evaluation", "experiment", "commands", "cli"},
    "features": {"train", "evaluation", "experiment", "commands", "cli"},
    "train": {"evaluation", "experiment", "commands", "cli"},
    "evaluation": {"train", "experiment", "commands", "cli"},
    "experiment": {"commands", "cli"},
}
# Loaded by the command line only when a command runs: `autosam-jax --help` must not pay for them.
HEAVY = {"jax", "jaxlib", "flax", "numpy", "optax", "orbax", "tensorflow", "tensorflow_datasets", "grain", "torch",
         "scipy", "nibabel", "ml_dtypes", "matplotlib"}

# Imports that break the rules above until code that only its owners may change has moved: (importer, imported
# module) -> (the names it may take from there, what must change). An entry that no longer exists fails
# `test_allowed_edges_still_exist`: delete it then.
ALLOWED: dict[tuple[str, str], tuple[set[str], str]] = {}  # (source, target) -> (names, why): none now


@dataclasses.dataclass(frozen=True)
class Edge:
  source: str
  target: str
  module_level: bool
  where: str  # file:line
  names: tuple[str, ...] = ()  # what `from ... import` takes from the target; () for a whole module

  def __str__(self) -> str:
    return f"{self.source} -> {self.target} ({'module level' if self.module_level else 'in a function'}, {self.where})"


def find_modules(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
  """Module name -> file, for every module of the packages (a package is its __init__.py)."""
  modules = {}
  for package in packages:
    for path in sorted((root / package).rglob("*.py")):
      if "__pycache__" in path.parts:
        continue
      parts = list(path.relative_to(root).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts.pop()
      modules[".".join(parts)] = path
  return modules


def _lazy_exports(tree: ast.Module, package: str) -> dict[str, str]:
  """A package's `_EXPORTS = {name: module}` (the names its __getattr__ imports on first use), as full names."""
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
      try:
        exports = ast.literal_eval(node.value)
      except ValueError:
        return {}
      return {name: module if module.startswith(PACKAGES) else f"{package}.{module}"
              for name, module in exports.items()}
  return {}


def _imports(tree: ast.Module, module: str, is_package: bool):
  """(imported name, names taken from it or None, module level, line) for every import statement and every
  `importlib.import_module("constant")` call, at any depth."""
  package = module if is_package else module.rpartition(".")[0]
  found = []

  def visit(node, module_level: bool):
    for child in ast.iter_child_nodes(node):
      level = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((alias.name, None, level, child.lineno) for alias in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          parts = package.split(".")
          parts = parts[:len(parts) - (child.level - 1)]
          base = ".".join(parts + ([child.module] if child.module else []))
        found.append((base, [alias.name for alias in child.names], level, child.lineno))
      elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == "import_module"
            and child.args and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
        found.append((child.args[0].value, None, level, child.lineno))
      visit(child, level)

  visit(tree, True)
  return found


@dataclasses.dataclass(repr=False)
class ImportGraph:
  modules: dict[str, Path]
  edges: list[Edge]  # between modules of the packages
  external: dict[str, list[tuple[str, bool, str]]]  # module -> (top-level name of an outside import, level, where)

  def __repr__(self) -> str:
    return f"ImportGraph({len(self.modules)} modules, {len(self.edges)} edges)"


def build_graph(root: Path = ROOT, packages=PACKAGES) -> ImportGraph:
  modules = find_modules(root, packages)
  trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
  exports = {name: _lazy_exports(tree, name) for name, tree in trees.items() if modules[name].name == "__init__.py"}

  def resolve(name: str) -> str | None:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  edges, external = [], {}
  for name, tree in trees.items():
    is_package = modules[name].name == "__init__.py"
    for imported, names, module_level, line in _imports(tree, name, is_package):
      where = f"{modules[name].relative_to(root)}:{line}"
      if not imported.startswith(packages):
        external.setdefault(name, []).append((imported.partition(".")[0], module_level, where))
        continue
      targets: dict[str, list[str]] = {}  # target module -> the names taken from it
      for taken in names or [None]:
        if taken is not None and f"{imported}.{taken}" in modules:
          targets.setdefault(f"{imported}.{taken}", [])
        elif taken is not None and taken in exports.get(imported, {}):
          targets.setdefault(resolve(exports[imported][taken]), []).append(taken)
        else:
          targets.setdefault(resolve(imported), []).extend([taken] if taken else [])
      edges += [Edge(name, target, module_level, where, tuple(taken)) for target, taken in targets.items()
                if target is not None and target != name]
  return ImportGraph(modules, edges, external)


def find_cycle(edges) -> list | None:
  """A cycle among `edges` as the list of its edges, or None (depth-first search, in a stable order)."""
  outgoing: dict[str, list] = {}
  for edge in edges:
    outgoing.setdefault(edge.source, []).append(edge)
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list = []

  def visit(node: str):
    state[node] = 1
    for edge in outgoing.get(node, ()):
      if state.get(edge.target) == 1:
        start = next((i for i, e in enumerate(path) if e.source == edge.target), len(path))
        return path[start:] + [edge]
      if edge.target not in state:
        path.append(edge)
        cycle = visit(edge.target)
        if cycle:
          return cycle
        path.pop()
    state[node] = 2
    return None

  for node in sorted(outgoing):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def group(module: str) -> str:
  """The layer a module belongs to: a subpackage of autosam_jax, "base", "cli", "weights_conversion" or "entry"."""
  parts = module.split(".")
  if parts[0] == "weights_conversion":
    return "entry" if parts[-1] == "__main__" else "weights_conversion"
  if len(parts) == 1:
    return "base"
  if parts[1] in SUBPACKAGES:
    return parts[1]
  return "cli" if parts[1] == "cli" else "base"


def allowed(edge: Edge) -> bool:
  names, _ = ALLOWED.get((edge.source, edge.target), (set(), ""))
  return bool(edge.names) and set(edge.names) <= names


def layer_violations(graph: ImportGraph) -> list[str]:
  problems = []
  for edge in graph.edges:
    if allowed(edge):
      continue
    if group(edge.target) in FORBIDDEN.get(group(edge.source), ()):
      problems.append(f"{edge}: {group(edge.source)} may not import {group(edge.target)}")
  return problems


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
  return build_graph()


def test_the_graph_is_read_from_every_module(graph):
  for module in ("autosam_jax.cli", "autosam_jax.models.heads", "autosam_jax.data.volumes",
                 "autosam_jax.features.precompute", "autosam_jax.train.loop", "weights_conversion.convert"):
    assert module in graph.modules
  edges = {(e.source, e.target, e.module_level) for e in graph.edges}
  assert ("autosam_jax.models.unet", "autosam_jax.models.init", True) in edges  # module level
  assert ("autosam_jax.features.images", "autosam_jax.data.volumes", False) in edges  # inside a function
  assert ("autosam_jax.cli", "autosam_jax.commands", True) in edges
  assert all(e.target in graph.modules for e in graph.edges)


def test_no_import_cycle(graph):
  edges = [e for e in graph.edges if not allowed(e)]
  cycle = find_cycle(edges)
  if cycle:
    pytest.fail("import cycle:\n  " + "\n  ".join(map(str, cycle)), pytrace=False)


def test_imports_follow_the_layers(graph):
  problems = layer_violations(graph)
  if problems:
    pytest.fail("imports that point upward:\n  " + "\n  ".join(problems), pytrace=False)


def test_allowed_edges_still_exist(graph):
  edges = {(e.source, e.target) for e in graph.edges if allowed(e)}
  stale = [f"{a} -> {b}" for a, b in ALLOWED if (a, b) not in edges]
  assert not stale, f"fixed, so delete from ALLOWED in {Path(__file__).name}: {stale}"


def test_only_the_command_line_uses_argparse_or_the_commands(graph):
  problems = []
  for module in graph.modules:
    if group(module) in ("commands", "cli", "entry"):
      continue
    problems += [f"{module} imports argparse ({where})" for name, _, where in graph.external.get(module, ())
                 if name == "argparse"]
    problems += [str(e) for e in graph.edges if e.source == module and group(e.target) in ("commands", "cli")]
  assert not problems, "\n".join(problems)


def test_the_command_line_imports_nothing_heavy_at_module_level(graph):
  problems = []
  for module in graph.modules:
    if group(module) not in ("commands", "cli"):
      continue
    problems += [f"{module} imports {name} at module level ({where})"
                 for name, module_level, where in graph.external.get(module, ()) if module_level and name in HEAVY]
    problems += [str(e) for e in graph.edges
                 if e.source == module and e.module_level and group(e.target) not in ("commands", "cli")]
  assert not problems, "\n".join(problems)


def test_a_cycle_is_found(tmp_path):
  """The checks themselves: a cycle through a function-level import, and an upward import, in a small package."""
  package = tmp_path / "autosam_jax"
  (package / "data").mkdir(parents=True)
  (package / "models").mkdir()
  (package / "__init__.py").write_text("")
  (package / "data" / "__init__.py").write_text("")
  (package / "models" / "__init__.py").write_text('_EXPORTS = {"Net": "net"}\n')
  (package / "data" / "a.py").write_text("from autosam_jax.data import b\n")
  (package / "data" / "b.py").write_text("def f():\n  from . import c\n")
  (package / "data" / "c.py").write_text("import autosam_jax.data.a\nfrom autosam_jax.models import Net\n")
  (package / "models" / "net.py").write_text("")
  found = build_graph(tmp_path, ("autosam_jax",))
  cycle = find_cycle(found.edges)
  assert cycle is not None and [e.source for e in cycle] == ["autosam_jax.data.a", "autosam_jax.data.b",
                                                              "autosam_jax.data.c"]
  assert [e.module_level for e in cycle] == [True, False, True]
  assert layer_violations(found) == [f"autosam_jax.data.c -> autosam_jax.models.net (module level, "
                                     f"{Path('autosam_jax/data/c.py')}:2): data may not import models"]
  (package / "data" / "b.py").write_text("")
  assert find_cycle(build_graph(tmp_path, ("autosam_jax",)).edges) is None


def test_importing_the_command_line_loads_no_jax():
  code = "import autosam_jax.cli; import sys; assert 'jax' not in sys.modules, 'jax'; assert 'numpy' not in sys.modules"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


def test_help_is_fast():
  """A loose bound: the help of a command line that imported JAX (or TFDS) would take several seconds."""
  times = []
  for _ in range(3):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "autosam_jax.cli", "--help"], cwd=ROOT, capture_output=True,
                            text=True)
    times.append(time.perf_counter() - start)
    assert result.returncode == 0 and "usage: autosam-jax" in result.stdout, result.stderr
  assert statistics.median(times) < 1.0, f"autosam-jax --help took {times} s"
