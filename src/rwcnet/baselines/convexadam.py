"""ConvexAdam (Siebert, Hansen, Heinrich 2021): discrete coupled convex optimisation on MIND-SSC, then Adam.

The steps (SPEC §6), all on the fixed grid, fields in voxels, pull-back:

1. MIND-SSC features of both images (radius 1, dilation 2), averaged onto a
   grid ``g`` voxels apart (6 by default, 4 for lung).
2. Cost volume: for each integer shift ``d`` in ``[−h, h]³`` (coarse voxels;
   ``h`` = 4, 6 for lung), the SSD over channels between the fixed features
   and the moving features shifted by ``d`` (zero outside the volume),
   smoothed by two 3³ box means.
3. Coupled convex optimisation: the per-voxel argmin, smoothed (3³ box
   mean); then for each coupling θ in 0.003, 0.01, 0.03, 0.1, 0.3, 1 the
   argmin of ``cost(d) + θ‖d − ū‖²`` (``ū`` the current smoothed field),
   smoothed again.
4. Optionally the same from moving to fixed and 15 rounds of inverse
   consistency ``u ← ½(u − v∘(id + u))``, ``v ← ½(v − u∘(id + v))``.
5. The coarse field brought to full resolution (trilinear), then
   :mod:`rwcnet.instance_optimisation`'s Adam instance optimisation.

The cost volume is built one shift slab at a time, never as the
channels × shifts × voxels tensor, and the coupled argmin runs in
chunks of voxels. Sizes that are not a multiple of the grid spacings
are padded (border repeated) and the field cropped back (the official
code drops the last voxels of each axis from the coarse grid and then
stretches the coarse field over the whole image). Inverse consistency
and the Adam stage warp with exact voxel coordinates (the official code
normalises by ``(n−1)/2`` but samples with ``align_corners=False``, a
stretch by ``n/(n−1)``). Otherwise the steps are the official ones; the
cost volume and coupled-convex result agree with the official functions
to float precision (see ``tests/baselines/test_convexadam.py``).
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from rwcnet.geometry import resize_field, warp
from rwcnet.geometry.layout import crop, integer_shifts, pad_to_multiple
from rwcnet.geometry.filters import box_filter
from rwcnet.presets import Presets
from rwcnet.instance_optimisation import (
    IO_PRESETS,
    IOConfig,
    Progress,
    extent_weight,
    mind_pair,
    optimise_on_grid,
    pool_features,
    prepare_inputs,
)

Tensor = torch.Tensor
#: ``on_stage(name)`` is called when a stage starts.
StageCallback = Callable[[str], None]

#: Coupling weights of the six coupled convex steps (ConvexAdam's schedule).
COUPLINGS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


class ConvexAdamConfig(BaseModel):
    """Parameters of ConvexAdam. The MIND parameters are those of ``io``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    grid_spacing: int = Field(6, ge=1, description="spacing (voxels) of the discrete step's grid")
    disp_radius: int = Field(4, ge=0, description="largest shift searched per axis, in coarse voxels")
    couplings: tuple[float, ...] = Field(COUPLINGS, description="coupling weights of the convex steps")
    inverse_consistent: bool = Field(True, description="also solve moving→fixed and make both inverse consistent")
    ic_iterations: int = Field(15, ge=0, description="inverse-consistency rounds")
    io: IOConfig = Field(IO_PRESETS["brain"], description="the Adam instance optimisation afterwards")


#: Presets: brain (g 6, h 4, brain IO) and lung (g 4, h 6, lung IO).
CONVEXADAM_PRESETS: Presets[ConvexAdamConfig] = Presets("ConvexAdam", {
    "brain": ConvexAdamConfig(),
    "lung": ConvexAdamConfig(grid_spacing=4, disp_radius=6, io=IO_PRESETS["lung"]),
})


def convexadam_config(preset: Literal["brain", "lung"] | ConvexAdamConfig = "brain", **overrides) -> ConvexAdamConfig:
    """The config of a preset name (or a given config) with the non-``None`` ``overrides`` applied.

    Override keys are field names of :class:`ConvexAdamConfig`, or
    ``io_<name>`` for a field of its :class:`IOConfig` (``io_iterations``, ``io_lam``...).
    """
    base = preset if isinstance(preset, ConvexAdamConfig) else CONVEXADAM_PRESETS[preset]
    io_changes = {k[3:]: v for k, v in overrides.items() if k.startswith("io_")}
    changes = {k: v for k, v in overrides.items() if not k.startswith("io_")}
    if any(value is not None for value in io_changes.values()):
        changes["io"] = IO_PRESETS.resolve(base.io, **io_changes)
    return CONVEXADAM_PRESETS.resolve(base, **changes)


def shift_table(radius: int, *, device=None) -> Tensor:
    """All integer shifts in ``[−r, r]³`` as ``(S, 3)`` float32 (array order), ``S = (2r+1)³``, last axis fastest."""
    return torch.tensor(integer_shifts(radius), dtype=torch.float32, device=device)


@torch.no_grad()
def cost_volume(fixed: Tensor, moving: Tensor, radius: int) -> Tensor:
    """Smoothed SSD cost ``(X, Y, Z, S)`` of features ``(1, C, X, Y, Z)`` for the shifts of :func:`shift_table`.

    ``cost[x, s] = box(box(Σ_c (F_f(x) − F_m(x + d_s))²))`` with ``F_m`` zero
    outside the volume and ``box`` the zero-padded 3³ mean. Shifts are the
    last (contiguous) axis, which keeps the per-voxel argmins fast.
    """
    n = 2 * radius + 1
    shape = tuple(fixed.shape[2:])
    x, y, z = shape
    channels = fixed.shape[1]
    target = fixed[0].permute(1, 2, 3, 0).reshape(x * y, z, channels)
    padded = torch.nn.functional.pad(moving, (radius,) * 6)[0].permute(1, 2, 3, 0).contiguous()  # (X+2r, Y+2r, Z+2r, C)
    zp = padded.shape[2]
    moving_sq = padded.pow(2).sum(dim=3)
    msx, msy, msz = moving_sq.stride()
    fixed_sq = fixed[0].pow(2).sum(dim=0).unsqueeze(3)
    cost = torch.empty((x, y, z, n, n, n), dtype=fixed.dtype, device=fixed.device)
    for a in range(n):
        for b in range(n):
            # all products F_f(x,y,z)·F_m(x+a, y+b, z') at once, then the band z' = z + k
            window = padded[a : a + x, b : b + y].reshape(x * y, zp, channels)
            products = torch.bmm(target, window.transpose(1, 2))  # (X·Y, Z, Z+2r)
            band = products.as_strided((x * y, z, n), (z * zp, zp + 1, 1)).view(x, y, z, n)
            squares = moving_sq[a : a + x, b : b + y].as_strided((x, y, z, n), (msx, msy, msz, msz))
            ssd = (fixed_sq + squares).sub_(band, alpha=2.0)
            cost[:, :, :, a, b] = box_filter(box_filter(ssd, dims=(0, 1, 2)), dims=(0, 1, 2))
    return cost.view(x, y, z, n**3)


@torch.no_grad()
def coupled_convex(cost: Tensor, radius: int, couplings: tuple[float, ...] = COUPLINGS) -> Tensor:
    """Coupled convex optimisation of a cost volume ``(X, Y, Z, S)``; returns ``(1, 3, X, Y, Z)`` in coarse voxels.

    Starts from the smoothed per-voxel argmin; each coupling θ then takes
    ``argmin_s cost[s] + θ‖d_s − ū‖²`` per voxel and smooths the result
    (``‖ū‖²`` is the same for every shift and left out).
    """
    shifts = shift_table(radius, device=cost.device).to(cost.dtype)
    *shape, size = cost.shape
    flat = cost.view(-1, size)
    squared = shifts.pow(2).sum(dim=1)
    chunk = max(1, 2**22 // size)

    def smoothed(best: Tensor) -> Tensor:
        return box_filter(shifts[best].t().reshape(1, 3, *shape))

    best = flat.argmin(dim=1)
    field = smoothed(best)
    for theta in couplings:
        current = field.view(3, -1).t().contiguous()
        for start in range(0, flat.shape[0], chunk):
            stop = min(start + chunk, flat.shape[0])
            coupled = torch.addmm(flat[start:stop], current[start:stop], shifts.t(), alpha=-2.0 * theta)
            best[start:stop] = coupled.add_(squared, alpha=theta).argmin(dim=1)
        field = smoothed(best)
    return field


@torch.no_grad()
def inverse_consistency(forward: Tensor, backward: Tensor, iterations: int = 15) -> tuple[Tensor, Tensor]:
    """Make two fields ``(1, 3, X, Y, Z)`` (fixed→moving and moving→fixed, same grid) approximately inverse.

    Each round replaces both at once: ``u ← ½(u − v∘(id + u))``, ``v ← ½(v − u∘(id + v))``
    (outside the volume a field counts as zero).
    """
    for _ in range(iterations):
        forward, backward = (
            0.5 * (forward - warp(backward, forward, padding_mode="zeros")),
            0.5 * (backward - warp(forward, backward, padding_mode="zeros")),
        )
    return forward, backward


def discrete_field(fixed: Tensor, moving: Tensor, config: ConvexAdamConfig, on_stage: StageCallback | None = None) -> Tensor:
    """The discrete step on pooled features ``(1, C, X', Y', Z')``: returns ``(1, 3, X', Y', Z')`` in coarse voxels."""
    stage = on_stage or (lambda name: None)
    stage("cost volume")
    cost = cost_volume(fixed, moving, config.disp_radius)
    stage("coupled convex optimisation")
    forward = coupled_convex(cost, config.disp_radius, config.couplings)
    del cost
    if not config.inverse_consistent:
        return forward
    stage("backward cost volume")
    cost = cost_volume(moving, fixed, config.disp_radius)
    stage("backward coupled convex optimisation")
    backward = coupled_convex(cost, config.disp_radius, config.couplings)
    del cost
    stage("inverse consistency")
    return inverse_consistency(forward, backward, config.ic_iterations)[0]


def convex_adam(
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    *,
    preset: Literal["brain", "lung"] | ConvexAdamConfig = "brain",
    grid_spacing: int | None = None,
    disp_radius: int | None = None,
    inverse_consistent: bool | None = None,
    io_iterations: int | None = None,
    io_lam: float | None = None,
    fixed_mask: Tensor | np.ndarray | None = None,
    moving_mask: Tensor | np.ndarray | None = None,
    progress: Progress | None = None,
    on_stage: StageCallback | None = None,
) -> Tensor:
    """Register ``moving`` to ``fixed`` (same grid, ``(X, Y, Z)`` or ``(1, 1, X, Y, Z)``) with ConvexAdam.

    Returns the pull-back field ``(1, 3, X, Y, Z)`` in voxels on the fixed
    grid. Keyword parameters that are not ``None`` replace the preset's;
    ``io_iterations=0`` gives ConvexAdam without its Adam stage. With masks,
    each image is filled outside its mask before MIND (as the official
    code does) and the Adam data term counts only voxels inside the fixed
    mask. ``progress`` receives the Adam steps, ``on_stage`` the stage names.
    Runs on the device of ``fixed``.
    """
    config = convexadam_config(
        preset,
        grid_spacing=grid_spacing,
        disp_radius=disp_radius,
        inverse_consistent=inverse_consistent,
        io_iterations=io_iterations,
        io_lam=io_lam,
    )
    stage = on_stage or (lambda name: None)
    fixed_t, moving_t, masks = prepare_inputs(fixed, moving, fixed_mask, moving_mask)
    device = fixed_t.device
    shape = tuple(fixed_t.shape[2:])

    stage("MIND features")
    io = config.io
    features = mind_pair(
        fixed_t, moving_t, radius=io.mind_radius, dilation=io.mind_dilation, fixed_mask=masks[0], moving_mask=masks[1]
    )
    multiple = math.lcm(config.grid_spacing, io.grid_spacing)
    padded = [pad_to_multiple(f, multiple) for f in features]
    del features
    coarse = [pool_features(f, config.grid_spacing) for f in padded]
    fine = [pool_features(f, io.grid_spacing) for f in padded] if io.iterations > 0 else None
    padded_shape = tuple(padded[0].shape[2:])
    del padded

    field = resize_field(discrete_field(coarse[0], coarse[1], config, stage), padded_shape)
    if fine is not None:
        stage("instance optimisation")
        weight = extent_weight(shape, masks[0], device, multiple=multiple, spacing=io.grid_spacing)
        field = optimise_on_grid(fine[0], fine[1], field, io, weight=weight, progress=progress)
    return crop(field, shape)
