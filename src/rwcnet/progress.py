"""Progress of a registration's stages: a rich display on a terminal, plain lines in logs and pipes.

Each stage (reading, network, instance optimisation, output...) gets its
own line. A stage with steps (Adam iterations) shows ``done/total steps``,
the elapsed time and an ETA; a stage without steps shows its elapsed time
only. When stderr is not a terminal, plain lines are printed instead: the
stage's start, its steps at most every ``interval`` seconds (and the last
one), and its end with the time taken.
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text


def clock(seconds: float) -> str:
    """``H:MM:SS`` of a duration in seconds (``?`` when it is not finite)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Steps(ProgressColumn):
    """``12/80 steps, ETA 0:00:03`` for a stage with steps; nothing for one without."""

    def render(self, task: Task) -> Text:
        if task.total is None or not task.fields.get("counted"):
            return Text("")
        eta = "" if task.finished else f", ETA {clock(task.time_remaining or 0.0)}"
        return Text(f"{int(task.completed)}/{int(task.total)} steps{eta}")


class StageProgress:
    """Progress display for :func:`rwcnet.register.register`'s ``on_stage``/``on_step`` callbacks.

    Use as a context manager; :meth:`stage` starts a stage (ending the one
    before), :meth:`step` reports ``done`` of ``total`` steps of it.
    """

    def __init__(self, console: Console, *, interval: float = 5.0) -> None:
        self.console, self.interval = console, interval
        self._rich = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), _Steps(), TimeElapsedColumn(),
            console=console, transient=False,
        ) if console.is_terminal else None
        self._task = None
        self._name: str | None = None
        self._start = self._last_line = 0.0
        self._steps: tuple[int, int] | None = None

    def __enter__(self) -> "StageProgress":
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._end_stage()
        if self._rich is not None:
            self._rich.stop()

    def stage(self, name: str) -> None:
        """End the current stage and start ``name``."""
        self._end_stage()
        self._name, self._steps = name, None
        self._start = self._last_line = time.monotonic()
        if self._rich is not None:
            self._task = self._rich.add_task(name, total=None, counted=False)
        else:
            self.console.print(f"{name} ...", highlight=False)

    def step(self, done: int, total: int, loss: float = float("nan")) -> None:
        """``done`` of ``total`` steps of the current stage are finished (``loss`` is not shown)."""
        if self._name is None:
            self.stage("working")
        self._steps = (done, total)
        if self._rich is not None:
            self._rich.update(self._task, completed=done, total=total, counted=True)
            return
        now = time.monotonic()
        if done == total or now - self._last_line >= self.interval:
            elapsed = now - self._start
            eta = elapsed / done * (total - done) if done else 0.0
            self.console.print(f"{self._name}: {done}/{total} steps, {elapsed:.1f} s, ETA {clock(eta)}", highlight=False)
            self._last_line = now

    def _end_stage(self) -> None:
        if self._name is None:
            return
        seconds = time.monotonic() - self._start
        if self._rich is not None:
            if self._steps is None:
                self._rich.update(self._task, total=1, completed=1)
            self._rich.stop_task(self._task)
        else:
            steps = f"{self._steps[0]}/{self._steps[1]} steps, " if self._steps else ""
            self.console.print(f"{self._name}: done ({steps}{seconds:.1f} s)", highlight=False)
        self._name = None
