"""``register --report OUT.json``: what a run did, how long each step took and how much memory it needed.

:class:`StageMeter` is a ``on_stage`` callback for :func:`rwcnet.register.register`: each call closes the running
step and opens the next. A step's peak memory is the process's resident-set high-water mark during that step
(Linux: ``VmHWM``, reset at each step through ``/proc/self/clear_refs``; elsewhere the peak so far, marked
``peak_rss_scope: "process so far"``), and on CUDA the peak of ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from rwcnet.outputs import atomic_output

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``echo 5 > /proc/self/clear_refs``); whether it worked."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident set (MiB): ``VmHWM`` since the last reset, else the process's ``ru_maxrss``."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class StageMeter:
    """Seconds and peak memory of each named step; call it with the next step's name, then :meth:`finish`."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._name: str | None = None
        self._start = 0.0
        self.per_step = _reset_peak_rss()

    def __call__(self, name: str) -> None:
        self._close()
        self._name, self._start = name, time.perf_counter()
        if self.per_step:
            _reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def _close(self) -> None:
        if self._name is None:
            return
        step = {"name": self._name, "seconds": round(time.perf_counter() - self._start, 4),
                "peak_rss_mb": round(_peak_rss_mb(), 1)}
        if torch.cuda.is_available():
            step["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.steps.append(step)
        self._name = None

    def finish(self) -> list[dict]:
        """Close the running step; returns every step's record."""
        self._close()
        return self.steps


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def build_report(*, steps: list[dict], inputs: dict[str, Path | None], per_step_memory: bool, seed: int,
                 affine: np.ndarray | None = None, jacobian: dict | None = None, inverse: dict | None = None,
                 notes: list[str] | None = None) -> dict:
    """The report's content: the command line, versions, input hashes, steps, affine (RAS and ITK LPS), statistics."""
    from rwcnet import __version__
    from rwcnet.affine.transforms import to_itk

    report: dict = {
        "command_line": sys.argv,
        "versions": {"rwcnet": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "SimpleITK": _version("SimpleITK"), "nibabel": _version("nibabel"),
                     "python": platform.python_version()},
        "seed": seed,
        "inputs": {name: {"path": str(path), "sha256": sha256(path)} for name, path in inputs.items()
                   if path is not None},
        "steps": steps,
        "peak_rss_scope": "step" if per_step_memory else "process so far",
    }
    if affine is not None:
        report["affine"] = {"ras_fixed_to_moving": np.asarray(affine).tolist(),
                            "itk_lps_fixed_to_moving": to_itk(affine).tolist()}
    if jacobian is not None:
        report["jacobian"] = jacobian
    if inverse is not None:
        report["inverse"] = inverse
    if notes:
        report["notes"] = notes
    return report


def write_report(path: str | Path, report: dict) -> None:
    """Write the report as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
