"""Memory estimates before large allocations: a request that cannot fit is one error line, not an out-of-memory kill."""

from __future__ import annotations

from autosam_jax.data.errors import DataError


def available_bytes() -> int | None:
  """Memory this machine can still give (MemAvailable of /proc/meminfo; free pages elsewhere); None if unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  import os

  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, AttributeError):
    return None


def human(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1024 or unit == "TB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return f"{n:.1f} TB"


def require_memory(needed: int, what: str, fix: str) -> None:
  """Raises DataError "<what>: needs about N but M is available; <fix>" when `needed` bytes cannot fit."""
  available = available_bytes()
  if available is not None and needed > available:
    raise DataError(f"{what}: needs about {human(needed)} of memory but {human(available)} is available; {fix}")
