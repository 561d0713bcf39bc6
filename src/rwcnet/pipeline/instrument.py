"""The one record of a registration's progress: stages, steps, seconds, peak memory, notes and warnings.

Every method of the chain reports through an :class:`Instrumentation`; the
command's progress display (:class:`rwcnet.progress.StageProgress`, through
the ``on_stage``/``on_step`` callbacks), the result of
:func:`rwcnet.register.register` and the benchmarks all read the same one.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

#: ``on_stage(name)``: a stage starts (the one before ends).
StageCallback = Callable[[str], None]
#: ``on_step(done, total, value)``: ``done`` of ``total`` steps of the current stage are finished.
StepCallback = Callable[[int, int, float], None]


def peak_memory_gb(device: torch.device | None = None) -> float:
    """Peak memory so far in GB: CUDA's allocator peak on a CUDA device, else the process's peak resident set (VmHWM)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.nan


class Instrumentation:
    """Progress (stage, step, total), seconds and peak memory per stage, and the notes and warnings of a run.

    ``seconds[key]`` and ``peak_gb[key]`` are filled by :meth:`timed`; ``steps[stage]`` holds the last
    ``(done, total)`` reported by :meth:`step`. On CPU the peak is the process's high-water mark at the
    end of the stage (it never goes down); on CUDA it is reset at the start of each timed stage.
    """

    def __init__(self, on_stage: StageCallback | None = None, on_step: StepCallback | None = None,
                 device: torch.device | None = None) -> None:
        self.on_stage, self.on_step, self.device = on_stage, on_step, device
        self.seconds: dict[str, float] = {}
        self.peak_gb: dict[str, float] = {}
        self.steps: dict[str, tuple[int, int]] = {}
        self.notes: list[str] = []
        self.warnings: list[str] = []  # one line each; the command prints them as "warning: ..."
        self.stage_name: str | None = None

    def stage(self, name: str) -> None:
        """A stage named ``name`` starts (shown by the progress display; not timed on its own)."""
        self.stage_name = name
        if self.on_stage is not None:
            self.on_stage(name)

    def step(self, done: int, total: int, value: float = math.nan) -> None:
        """``done`` of ``total`` steps of the current stage are finished; ``value`` is e.g. the loss."""
        self.steps[self.stage_name or ""] = (done, total)
        if self.on_step is not None:
            self.on_step(done, total, value)

    @contextmanager
    def timed(self, key: str, stage: str | None = None) -> Iterator[None]:
        """Time the block as ``seconds[key]`` (and its peak memory as ``peak_gb[key]``); announce ``stage`` first."""
        if stage is not None:
            self.stage(stage)
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[key] = time.perf_counter() - start
            self.peak_gb[key] = peak_memory_gb(self.device)
