"""Shared by the peer scripts, which run in the peers' own environments (stdlib only, no rwcnet import)."""

from pathlib import Path


def peak_gb() -> float:
    """Peak resident memory of this process (``VmHWM``), GB; NaN where /proc is absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")
