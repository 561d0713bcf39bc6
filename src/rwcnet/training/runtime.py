"""Training runtime: signals that checkpoint before exiting, processes (torchrun), RNG states, checkpoint files.

SIGINT/SIGTERM raise :class:`TrainingInterrupted` between Python operations
(after the current torch operation), except inside :meth:`Signals.critical`
sections (the optimiser step and its bookkeeping, checkpoint writing), where
they are deferred to the section's end; so the state saved on interruption is
always that of the last completed step.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rwcnet.errors import InputError
from rwcnet.outputs import atomic_output
from rwcnet.training.config import TrainingConfig

FORMAT = "rwcnet-checkpoint"
#: Config entries that may change between a run and its resumption (they do not change the result).
_RESUMABLE_CHANGES = {"threads", "print_every", "report", "checkpoint_every"}


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was written (``signum`` tells which signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"training interrupted by signal {signum}; checkpoint written")
        self.signum = signum


class Signals:
    """Turns SIGINT/SIGTERM into :class:`TrainingInterrupted`, deferred while inside :meth:`critical`."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._critical = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "Signals":
        if _main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        self.pending = signum
        if not self._critical:
            raise TrainingInterrupted(signum)

    @contextlib.contextmanager
    def critical(self):
        """A section a signal does not interrupt; a signal received inside it is raised at its end."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self.pending is not None:
            raise TrainingInterrupted(self.pending)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@dataclass
class Distributed:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[Distributed, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on GPU); pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return Distributed(rank, world, local_rank), device


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states, as tensors and plain values (loadable with ``weights_only``)."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def comparable(config: TrainingConfig) -> dict:
    """The parts of a config that a resumed run must share with its checkpoint (not threads, paths, cadence)."""
    data = config.model_dump(mode="json")
    for key in _RESUMABLE_CHANGES:
        data.pop(key)
    for key in ("dataset", "num_workers", "cache_images"):
        data["data"].pop(key)
    if data["data"].get("synthmorph"):
        for key in ("labels", "cache"):
            data["data"]["synthmorph"].pop(key)
    if data["data"].get("teacher"):
        data["data"]["teacher"].pop("cache")
    return data


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint (a dict of tensors and plain values) atomically."""
    with atomic_output(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)


def load_checkpoint(path: Path, config: TrainingConfig) -> dict[str, Any]:
    """Read a checkpoint; :class:`InputError` when unreadable or made with a config that changes the result."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a corrupt file
        raise InputError(f"{path}: not a readable training checkpoint ({error.__class__.__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not an rwcnet training checkpoint")
    if comparable(TrainingConfig.model_validate(payload["config"])) != comparable(config):
        raise InputError(f"{path}: the checkpoint was made with another training config; resume with the same config")
    return payload
