"""Which samples each optimiser step gets, per process, and who makes them (the main process or workers).

Sample ``step * batch + j`` of a phase goes to process ``j // (batch / N)``
of ``N``, so an N-process run sees the same samples as a one-process run;
samples themselves are pure functions of their index
(:meth:`rwcnet.training.data.TrainingData.sample`).
"""

from __future__ import annotations

from typing import Iterator

import torch

from rwcnet.errors import InputError
from rwcnet.training.config import PhaseConfig
from rwcnet.training.data import Sample, TrainingData


def sample_indices(step: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """Indices of the samples that process ``rank`` of ``world_size`` handles at optimiser step ``step`` (0-based)."""
    if batch_size % world_size:
        raise InputError(f"batch_size {batch_size} must be a multiple of the number of processes {world_size}")
    local = batch_size // world_size
    return [step * batch_size + rank * local + j for j in range(local)]


class _SampleSet(torch.utils.data.Dataset):
    """Map-style view ``index -> Sample`` of one phase, for a DataLoader with worker processes."""

    def __init__(self, data: TrainingData, phase_index: int, phase: PhaseConfig, downsample: int) -> None:
        self.data, self.phase_index, self.phase, self.downsample = data, phase_index, phase, downsample

    def __getitem__(self, index: int) -> Sample:
        return self.data.sample(self.phase_index, self.phase, self.downsample, index)

    def __len__(self) -> int:
        return (self.phase.steps + 1) * self.phase.batch_size


def _identity(item):
    return item


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def iterate_steps(data: TrainingData, phase_index: int, phase: PhaseConfig, downsample: int, start: int,
                  rank: int = 0, world_size: int = 1) -> Iterator[list[Sample]]:
    """The local samples of each step from ``start`` to the end of the phase.

    With ``num_workers == 0`` they are made in the calling process, one step
    ahead of nothing (no prefetch); otherwise a DataLoader's worker processes
    (one thread each) make them in the background, in the same order.
    """
    steps = range(start, phase.steps)
    if data.data.num_workers == 0:
        for step in steps:
            yield [data.sample(phase_index, phase, downsample, i) for i in sample_indices(step, phase.batch_size, rank, world_size)]
        return
    order = [i for step in steps for i in sample_indices(step, phase.batch_size, rank, world_size)]
    loader = torch.utils.data.DataLoader(
        _SampleSet(data, phase_index, phase, downsample), batch_size=None, sampler=order,
        num_workers=data.data.num_workers, collate_fn=_identity, worker_init_fn=_worker_init,
    )
    local = phase.batch_size // world_size
    batch: list[Sample] = []
    for sample in loader:
        batch.append(sample)
        if len(batch) == local:
            yield batch
            batch = []
