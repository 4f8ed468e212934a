"""The `autosam-jax` command: a registry of the modules in `autosam_jax/commands/`, each imported only when its
command runs (or its help is asked for), so `autosam-jax --help` loads no JAX."""

from __future__ import annotations

import argparse
import importlib
import sys

from autosam_jax.commands import COMMANDS


def _chosen(argv: list[str]) -> str | None:
  """The command named in `argv` (its first word that is not an option), if it is a known one."""
  word = next((a for a in argv if not a.startswith("-")), None)
  return word if word in COMMANDS else None


class Parser(argparse.ArgumentParser):
  """argparse's parser, but a bad command line is one line, `error: <problem>; see autosam-jax <command> --help`,
  exit code 2, as every other refusal (argparse prints its usage block, several lines, before the error). The
  commands' parsers are of this class too (add_subparsers makes them of their parent's class)."""

  help_prog: str | None = None  # the command whose help an error points to (the top-level parser sees some errors)

  def error(self, message: str):
    self.exit(2, f"error: {' '.join(message.split())}; see {self.help_prog or self.prog} --help\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
  """The parser; only the command `argv` names (every command when `argv` is None) gets its arguments."""
  parser = Parser(prog="autosam-jax", description="SAM adaptation for medical images in JAX/Flax.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  chosen = None if argv is None else _chosen(argv)
  if chosen is not None:  # an option of the command it does not know is reported by the top-level parser
    parser.help_prog = f"autosam-jax {chosen}"
  for name, (module_name, help_text) in COMMANDS.items():
    if argv is not None and name != chosen:
      commands.add_parser(name, help=help_text)
      continue
    module = importlib.import_module(f"autosam_jax.commands.{module_name}")
    sub = commands.add_parser(name, help=help_text, description=module.DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    sub.set_defaults(run=module.run)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns its exit code (the errors of `autosam_jax.errors` as one line, see `faults`)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser(argv).parse_args(argv)
  from autosam_jax.faults import run_command

  return run_command(args.run, args)


def entry() -> None:
  """The `autosam-jax` executable: `main`, then exit with its code. After SIGINT/SIGTERM (the line is printed, every
  file closed or cleaned up) the process ends at once: the interpreter's shutdown would otherwise join threads that
  XLA and the data pipeline still run, which can crash it."""
  code = main()
  if code in (128 + 2, 128 + 15):
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  entry()
