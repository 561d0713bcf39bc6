"""Training records: a JSONL log (one JSON object a line), a progress display with ETA, and plots of the curves.

Every record has ``kind`` (``train``, ``validation``, ``event``), the
schedule ``phase`` index, the network ``stage`` (1-based) and ``step``
(optimiser steps done in that phase). Train records hold the loss terms and
the step time in seconds; validation records the held-out metrics.

The log is appended a line at a time (a crash can leave at most a partial
last line, which :func:`read_log` skips); on ``--resume`` it is rewritten
atomically without the records made after the checkpoint, so that the log
of an interrupted and resumed run reads like an uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from rwcnet.errors import InputError
from rwcnet.outputs import atomic_output
from rwcnet.progress import clock


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL log; a partial last line (from a crash) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: training log not found")
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise InputError(f"{path}: line {number} is not JSON ({error})") from error
        if isinstance(record, dict):
            records.append(record)
    return records


class TrainLog:
    """Appends records to ``path`` (JSONL) and, when TensorBoard is installed, to ``tensorboard/`` beside it."""

    def __init__(self, path: Path, *, tensorboard: bool = True) -> None:
        self.path = path
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # TensorBoard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self._writer = SummaryWriter(str(path.parent / "tensorboard"))

    def truncate(self, keep) -> None:
        """Rewrite the log atomically with only the records for which ``keep(record)`` is true."""
        if not self.path.is_file():
            return
        records = [r for r in read_log(self.path) if keep(r)]
        with atomic_output(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None and "global_step" in record:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name not in ("phase", "stage", "step", "global_step"):
                    self._writer.add_scalar(f"{record['kind']}/{name}", value, record["global_step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Progress:
    """A progress bar with ETA on a terminal (rich), else a plain line every ``every`` steps on stderr."""

    def __init__(self, total: int, done: int, *, enabled: bool = True, every: int = 10) -> None:
        self.total, self.done, self.every = total, done, every
        self.enabled = enabled
        self._start, self._start_done = time.monotonic(), done
        self._bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
            )
            self._task = self._bar.add_task("training", total=total, completed=done)
            self._bar.start()

    def update(self, description: str) -> None:
        """One more step done; ``description`` is shown beside the bar (or on the plain line)."""
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=description)
            return
        if self.done % self.every == 0 or self.done == self.total:
            rate = (time.monotonic() - self._start) / max(self.done - self._start_done, 1)
            eta = rate * (self.total - self.done)
            print(f"[{self.done}/{self.total}] {description} | {rate:.1f} s/step, ETA {clock(eta)}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _series(records: Iterable[dict[str, Any]], kind: str, name: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for record in records:
        if record.get("kind") == kind and isinstance(record.get(name), (int, float)):
            xs.append(int(record["global_step"]))
            ys.append(float(record[name]))
    return xs, ys


def _smooth(values: list[float], width: int) -> list[float]:
    """Trailing moving average over ``width`` values."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= width:
            total -= values[index - width]
        out.append(total / min(index + 1, width))
    return out


def plot_log(log_path: str | Path, output: str | Path, *, smooth: int = 20) -> list[str]:
    """Plot the curves of a training log to a PNG; returns the names of the plotted series.

    Left: the training loss and its terms against the global step (trailing
    mean over ``smooth`` steps, log scale). Right: the validation metrics.
    Phase boundaries are dotted vertical lines.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train_names = sorted({k for r in records if r.get("kind") == "train" for k, v in r.items()
                          if isinstance(v, (int, float)) and k not in ("phase", "stage", "step", "global_step", "seconds", "lr")})
    val_names = sorted({k for r in records if r.get("kind") == "validation" for k, v in r.items()
                        if isinstance(v, (int, float)) and k not in ("phase", "stage", "step", "global_step", "seconds")})
    if not train_names and not val_names:
        raise InputError(f"{log_path}: no training or validation records to plot")
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    plotted = []
    for name in train_names:
        xs, ys = _series(records, "train", name)
        if xs:
            left.plot(xs, _smooth(ys, smooth), label=name, linewidth=1)
            plotted.append(f"train/{name}")
    for name in val_names:
        xs, ys = _series(records, "validation", name)
        if xs:
            right.plot(xs, ys, marker="o", label=name, linewidth=1)
            plotted.append(f"validation/{name}")
    boundaries = sorted({int(r["global_step"]) - int(r["step"]) for r in records
                         if r.get("kind") == "train" and int(r.get("phase", 0)) > 0})
    for axis, title in ((left, f"training (mean of {smooth} steps)"), (right, "validation")):
        for x in boundaries:
            axis.axvline(x, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("step")
        axis.set_title(title)
        if axis.lines:
            axis.legend(fontsize=8)
            if all(y > 0 for line in axis.lines for y in line.get_ydata() if isinstance(y, float)):
                axis.set_yscale("log")
    figure.tight_layout()
    with atomic_output(output) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    return plotted
