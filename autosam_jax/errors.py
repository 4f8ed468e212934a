"""The errors a command reports in one line, each carrying its exit code.

Library functions raise these; `faults.run_command` (the one place that prints them) writes `error: <message>` to
stderr and exits with the error's code. The message names the file or option, the problem and the fix.

  exit 2  InputError (and DataError, CheckpointError, ConversionError): bad data, files, options or checkpoints
  exit 3  DivergedError (NonFiniteLossError): training produced a non-finite loss
  exit 4  a full disk (found by `faults.disk_full` on the OSError that a write raised)
  exit 130 / 143  SIGINT / SIGTERM (`faults.Interrupted`)
"""

from __future__ import annotations

INPUT_EXIT = 2
DIVERGED_EXIT = 3
DISK_FULL_EXIT = 4
INTERRUPTED_EXIT = 128 + 2  # SIGTERM gives 128 + 15


class AutosamError(Exception):
  """An error the user can act on; `exit_code` is the command's exit status."""
  exit_code = INPUT_EXIT


class DataError(AutosamError):
  """A problem with the user's data, files or options: one line naming the file (or option), the problem and the fix."""


InputError = DataError


class CheckpointError(DataError):
  """A converted-weights or model folder that cannot be used; the message names the path."""


class ConversionError(DataError):
  """A SAM checkpoint that cannot be converted, or an output folder convert may not write; names the file."""


class DivergedError(AutosamError):
  """Training produced a non-finite loss; the message names the step and what to change."""
  exit_code = DIVERGED_EXIT


NonFiniteLossError = DivergedError
