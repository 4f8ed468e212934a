"""Memory estimates before large allocations: a request that cannot fit is one error line, not an out-of-memory kill."""

from __future__ import annotations

from autosam_jax.errors import DataError


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


def size_text(num_bytes: float) -> str:
  """A byte count for messages: '1.1 KiB', '2.0 GiB'."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(num_bytes) < 1024 or unit == "TiB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  raise AssertionError("unreachable")


def require_memory(needed: int, what: str, fix: str) -> None:
  """Raises DataError "<what>: needs about N but M is available; <fix>" when `needed` bytes cannot fit."""
  available = available_bytes()
  if available is not None and needed > available:
    raise DataError(f"{what}: needs about {size_text(needed)} of memory but {size_text(available)} is available; "
                    f"{fix}")
