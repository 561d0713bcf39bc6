"""The registration a user runs: images in, a Learn2Reg field (and the warped moving image) out.

:func:`register` checks the options, builds the chain of methods
(:mod:`rwcnet.pipeline`: by default the network on its working grid, instance
optimisation on MIND features and the fine-scale refinement, all on the fixed
grid), prepares the pair once, runs the chain and samples the original moving
image once through the final field (through physical space when it lay on
another grid). Progress, seconds, peak memory, notes and warnings go through
one :class:`rwcnet.pipeline.Instrumentation`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rwcnet import geometry
from rwcnet.errors import InputError
from rwcnet.data.formats import Image
from rwcnet.exports import compose_affine
from rwcnet.geometry.layout import field_array
from rwcnet.pipeline import Instrumentation, Settings, StageCallback, StepCallback, build_chain
from rwcnet.pipeline.method import chain_intensities, chain_names
from rwcnet.pipeline.pair import PreparedPair, prepare_pair, volume_tensor


@dataclass
class RegistrationResult:
    """The outcome on the fixed grid: ``field`` ``(X, Y, Z, 3)`` in fixed voxels (Learn2Reg), the warped moving image."""

    field: np.ndarray
    warped: np.ndarray  # the original moving image sampled once by the field (through physical space if off-grid)
    fixed: Image
    moving: Image  # the moving image on the fixed grid (resampled if it was elsewhere)
    seconds: dict[str, float] = dataclass_field(default_factory=dict)
    notes: list[str] = dataclass_field(default_factory=list)
    warnings: list[str] = dataclass_field(default_factory=list)  # one line each; the command prints them as "warning: ..."
    peak_gb: dict[str, float] = dataclass_field(default_factory=dict)  # per stage, see rwcnet.pipeline.Instrumentation
    affine: np.ndarray | None = None  # 4x4 fixed->moving RAS mm of the pre-alignment (included in ``field``)
    original_moving: Image | None = None  # the moving image as given, on its own grid


def pick_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; refuses ``cuda`` on a machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available on this machine")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def register(
    fixed: Image | str | Path,
    moving: Image | str | Path,
    *,
    fixed_mask: Image | str | Path | None = None,
    moving_mask: Image | str | Path | None = None,
    model: str | Path | None = "default",
    io: bool | None = None,
    io_iterations: int | None = None,
    modality: str = "mr",
    ct_range: str = "window",
    device: str = "auto",
    seed: int = 0,
    method: str | Sequence[str] = "rwcnet",
    refine: bool = True,
    refine_metric: str = "auto",
    refine_iterations: tuple[int, ...] | None = None,
    affine: bool = True,
    transform: str = "affine",
    affine_metric: str = "mind",
    init: str | Path | np.ndarray | None = None,
    affine_only: bool = False,
    repair_folds: bool = True,
    on_stage: StageCallback | None = None,
    on_step: StepCallback | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; returns the Learn2Reg field on the fixed grid and the warped image.

    ``method`` is a chain (``rwcnet``: network, instance optimisation, refinement; ``convexadam``:
    the in-package baseline, ``io=False`` switching its Adam stage off), a registered method's name, or a
    sequence of them (:mod:`rwcnet.pipeline`). ``io`` runs instance optimisation in the ``rwcnet`` chain;
    ``None`` (default) is the modality's choice: on for ``mr``, off for ``ct`` (on breathing pairs IO's field
    is a worse start for the refinement than the network's, docs/results.md). ``model`` is ``"default"`` (the modality's model), a
    shipped name (``"brain"``), a model file (RWCNet or LapIRN), or ``None`` for no network (also, with a
    note, when the shipped weights are absent); one trained on another modality runs with a warning.
    ``modality`` (``mr``/``ct``) picks the intensity normalisation (unless the model file records
    its own) and the IO/refinement presets (brain/lung; CT without masks gets lung masks).
    ``refine_metric`` is ``auto`` (NCC for CT or agreeing intensities, else MIND), ``ncc`` or
    ``mind``; ``refine_iterations`` per level overrides the preset's. Seeds torch with ``seed``.

    ``affine`` (on by default) pre-aligns the pair first (``rwcnet`` chain): ``transform`` ``rigid`` or
    ``affine``, ``affine_metric`` ``mind``/``ncc``/``mi``, starting from ``init`` (an ITK/ANTs transform file
    or a 4x4 fixed->moving RAS matrix; else the centres of mass). With ``affine=False`` an ``init`` is applied
    as it is. ``affine_only`` stops after it. The field holds the whole transform, affine included.
    ``repair_folds`` (on by default, last in the ``rwcnet`` chain) smooths the field locally wherever it
    folds (:func:`rwcnet.geometry.repair_folds`); a note reports how many voxels it changed.
    """
    names = ("affine",) if affine_only else chain_names(method)
    if affine_only and not affine and init is None:
        raise InputError("--affine-only needs the affine step (drop --no-affine) or an --init transform")
    settings = Settings.checked(model=model, io=io, io_iterations=io_iterations, modality=modality, ct_range=ct_range,
                                refine=refine, refine_metric=refine_metric, refine_iterations=refine_iterations,
                                device=pick_device(device), affine=affine, linear_transform=transform,
                                affine_metric=affine_metric, init_matrix=initial_matrix(init), seed=seed,
                                repair_folds=repair_folds)
    torch.manual_seed(seed)
    record = Instrumentation(on_stage, on_step, settings.device)
    start = time.perf_counter()
    with record.timed("read"):
        chain = build_chain(names, settings, record)
        intensities = chain_intensities(chain, settings, record)
        pair = prepare_pair(fixed, moving, fixed_mask, moving_mask, modality, settings.device, intensities, record)
    field = None
    for step in chain:
        with record.timed(step.key, step.stage):
            field = step.run(pair, field, record)
    record.stage("output")
    if pair.affine is not None:  # the whole transform: x -> A_fix^-1 T A_fix (x + u(x))
        deformable = np.zeros((*pair.shape, 3), np.float32) if field is None else \
            field[0].permute(1, 2, 3, 0).cpu().numpy()
        total = compose_affine(deformable, pair.fixed, pair.affine)
        field = torch.from_numpy(np.ascontiguousarray(np.moveaxis(total, -1, 0)))[None].to(pair.device)
    warped = warp_original(pair, field)
    record.seconds["total"] = time.perf_counter() - start
    field = torch.zeros(1, 3, *pair.shape) if field is None else field
    return RegistrationResult(field_array(field).astype(np.float32), warped, pair.fixed,
                              pair.moving, record.seconds, record.notes, record.warnings, record.peak_gb,
                              pair.affine, pair.original_moving)


def initial_matrix(init: str | Path | np.ndarray | None) -> np.ndarray | None:
    """``init`` as a 4x4 fixed->moving RAS matrix: read from an ITK/ANTs file (FSL refused), or taken as given."""
    if init is None:
        return None
    if isinstance(init, (str, Path)):
        from rwcnet.affine import read_itk_transform

        return read_itk_transform(init)
    matrix = np.asarray(init, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]) or abs(np.linalg.det(matrix)) < 1e-9:
        raise InputError(f"initial transform: expected an invertible 4x4 affine matrix, got shape {matrix.shape}")
    return matrix


def warp_original(pair: PreparedPair, field: torch.Tensor | None) -> np.ndarray:
    """The original moving image sampled once by ``field`` (fixed voxels), through physical space if off the fixed grid."""
    pair.release()
    sampling = torch.zeros(1, 3, *pair.shape, device=pair.device) if field is None else field.to(torch.float32)
    with torch.no_grad():
        if pair.original_moving is not pair.moving:
            sampling = geometry.moving_voxel_field(
                sampling, torch.from_numpy(pair.fixed.affine), torch.from_numpy(pair.original_moving.affine))
        return geometry.warp(volume_tensor(pair.original_moving.array, pair.device), sampling)[0, 0].cpu().numpy()
