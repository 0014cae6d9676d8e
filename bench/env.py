"""What a benchmark number was measured on: machine, package versions, date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path

PACKAGES = ("torch", "transformers", "onnxruntime", "tokenizers", "numpy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """CPUs this process may run on (a container's cgroup share, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    from training.tracking import package_versions

    return {"python": platform.python_version(), **package_versions(PACKAGES)}


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": cpu_count(), "ram_gb": ram_gb(), "os": f"{platform.system()} "
            f"{platform.release()}", "python_executable": sys.executable}


def load_average() -> float | None:
    """The 1-minute load average (runnable processes): above the core count, timings are contended."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def describe(m: dict) -> str:
    ram = f", {m['ram_gb']} GB RAM" if m.get("ram_gb") else ""
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores{ram} ({m.get('os', '?')})"
