"""Machine facts every benchmark records next to its numbers (CPU model, cores, RAM, library versions)."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_info(packages: Iterable[str], *, fallback: Callable[[str], str] | None = None) -> dict:
    """CPU, cores, RAM, Python, platform and the installed versions of ``packages``.

    Args:
        packages: distribution names to report.
        fallback: asked for a version when a package is not installed in the environment (else "not installed").
    """
    import psutil

    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = fallback(name) if fallback else "not installed"
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }
