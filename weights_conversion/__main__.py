"""`python -m weights_conversion CHECKPOINT OUT_DIR`: the same as `autosam-jax convert`."""

import sys

from autosam_jax.cli import main

sys.exit(main(["convert", *sys.argv[1:]]))
