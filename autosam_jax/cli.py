"""The `autosam-jax` command."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
  from weights_conversion import cli as convert_cli

  parser = argparse.ArgumentParser(prog="autosam-jax", description="SAM adaptation for medical images in JAX/Flax.")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  convert = commands.add_parser("convert", help="convert Meta or Hugging Face SAM weights to a Flax checkpoint",
                                description=convert_cli.DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
  convert_cli.add_arguments(convert)
  convert.set_defaults(run=convert_cli.run)

  parity = commands.add_parser("parity-demo", help="convert a random SAM checkpoint and print parity with Meta's code",
                               description="Builds Meta's SAM with random weights, saves it as Meta does, converts "
                               "it and prints the largest differences between Meta's and our outputs.")
  from experiments import parity_demo
  parity_demo.add_arguments(parity)
  parity.set_defaults(run=parity_demo.run)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
