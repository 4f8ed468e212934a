"""The one error type for bad user data."""


class DataError(Exception):
  """A problem with the user's data; the message is one line that names the file and the problem (and the fix).

  Command-line entry points print it as `error: <message>` and exit with code 2.
  """
