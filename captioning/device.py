"""The machine a workflow runs on: which torch device, its CPU's name, and this process's peak memory."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

from captioning.console import InvalidValue


def cpu_name() -> str:
    """The CPU's model name as Linux reports it (/proc/cpuinfo), else what the platform module knows."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None or "auto" -> cuda if available, else cpu. Raises ValueError for unknown or unavailable devices."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InvalidValue(f"unknown device {device!r} ({str(err).splitlines()[0]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidValue(f"device {device!r} requested but CUDA is not available; use cpu")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InvalidValue(f"device {device!r} requested but MPS is not available; use cpu")
    return dev


def peak_rss_mib() -> float | None:
    """This process's peak resident memory in MiB, or None where it cannot be measured
    (``ru_maxrss`` is KiB on Linux, bytes on macOS; on Windows psutil's peak working set)."""
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil
        except ImportError:
            return None
        peak = getattr(psutil.Process().memory_info(), "peak_wset", None)
        return None if peak is None else round(peak / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)
