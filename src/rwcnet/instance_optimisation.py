"""Instance optimisation (IO): refine a displacement field for one image pair with Adam on MIND-SSC features.

This is the Adam stage of ConvexAdam (SPEC §6). The MIND features of both
images are averaged onto a grid ``s`` times coarser (``s`` = grid spacing,
2 by default); the field is a parameter on that same grid, initialised from
a given field (resized with :func:`rwcnet.geometry.resize_field`) or zero.
Each Adam step (learning rate 1) smooths the parameter with three 3³ box
means (zero padding, as ``avg_pool3d(3, 1, 1)``; computed as banded matrix
products), warps the coarse moving features with it (outside the volume
the features count as zero) and minimises

    loss = mean_x Σ_c (F_m(x + u(x)) − F_f(x))²  +  λ Σ_axes mean (forward difference of u)²

(the data term is ConvexAdam's "mean over the 12 channels × 12"; with a
fixed mask it is the mean over the mask). The smoothed parameter, brought
back to full resolution trilinearly, is the result. Fields are pull-back
displacements in voxels of the fixed grid, ``(1, 3, X, Y, Z)``.

Differences from the official ``convexAdam`` code, on purpose: warping uses
exact voxel coordinates (the official normalisation stretches the field by
``n/(n−1)``), volumes whose size is not a multiple of the grid spacing are
padded instead of having their last voxels dropped, and the returned field
is the smoothed parameter after the last step (the official one returns it
from before that step). No randomness is involved: the same inputs give the
same field on the same device.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from rwcnet.geometry import forward_difference_means, identity_grid, resize_field, resize_volume, sample
from rwcnet.geometry.filters import apply_axis_matrices, box_half_kernel, filter_matrix
from rwcnet.geometry.layout import crop, pad_to_multiple
from rwcnet.mind import fill_outside_mask, mind_ssc
from rwcnet.presets import Presets

Tensor = torch.Tensor
#: ``progress(step, total, loss)`` is called after every Adam step.
Progress = Callable[[int, int, float], None]


class IOConfig(BaseModel):
    """Parameters of instance optimisation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    iterations: int = Field(80, ge=0, description="Adam steps; 0 returns the initial field unchanged")
    lam: float = Field(1.25, ge=0, description="weight of the diffusion regulariser")
    grid_spacing: int = Field(2, ge=1, description="the field and features live on a grid this many voxels apart")
    lr: float = Field(1.0, gt=0, description="Adam learning rate (coarse-grid voxels)")
    mind_radius: int = Field(1, ge=0, description="MIND-SSC patch radius")
    mind_dilation: int = Field(2, ge=1, description="MIND-SSC neighbour distance")


#: Presets: brain (MR, λ 1.25, 80 steps, the official command-line default) and lung (CT, λ 0.65, 50 steps).
IO_PRESETS: Presets[IOConfig] = Presets("instance-optimisation", {
    "brain": IOConfig(iterations=80, lam=1.25),
    "lung": IOConfig(iterations=50, lam=0.65),
})


def io_config(preset: Literal["brain", "lung"] | IOConfig = "brain", **overrides) -> IOConfig:
    """The :class:`IOConfig` of a preset name (or a given config) with the non-``None`` ``overrides`` applied."""
    return IO_PRESETS.resolve(preset, **overrides)


def as_volume(array: Tensor | np.ndarray, name: str, *, device=None) -> Tensor:
    """An image or mask ``(X, Y, Z)`` or ``(1, 1, X, Y, Z)`` (tensor or array) as a float32 tensor ``(1, 1, X, Y, Z)``."""
    tensor = torch.as_tensor(array)
    if tensor.dim() == 3:
        tensor = tensor[None, None]
    if tensor.dim() != 5 or tensor.shape[:2] != (1, 1):
        raise ValueError(f"{name}: expected a volume (X, Y, Z) or (1, 1, X, Y, Z), got shape {tuple(tensor.shape)}")
    return tensor.to(device=device if device is not None else tensor.device, dtype=torch.float32)


def smooth_field(field: Tensor) -> Tensor:
    """Three 3³ box means with zero padding (ConvexAdam's smoothing of the parameter grid) of ``(B, C, X, Y, Z)``.

    The same as ``avg_pool3d(3, stride=1, padding=1)`` applied three times,
    computed as one banded matrix product per axis (:func:`rwcnet.geometry.filters.filter_matrix`;
    much faster on CPU, forward and backward, than nine shifted-sum passes).
    """
    x, y, z = (_triple_box_matrix(n, field.device, field.dtype) for n in field.shape[2:])
    # z.mT: the matrix is symmetric but for rounding, and this keeps the product order of the fields
    # registered before (Adam with learning rate 1 turns rounding differences into visible ones)
    return apply_axis_matrices(field, [x, y, z.mT])


@functools.lru_cache(maxsize=16)
def _triple_box_matrix(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The ``n × n`` matrix of three zero-padded 3-box means along an axis; made once per size (every Adam step uses it)."""
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable by autograd later
        return filter_matrix(n, box_half_kernel(1), border="zeros", repeats=3, device=device, dtype=dtype)


def diffusion_loss(field: Tensor) -> Tensor:
    """Σ over the three axes of the mean squared forward difference of ``field`` ``(B, 3, X, Y, Z)``."""
    return sum(forward_difference_means(field, "l2"))


@torch.no_grad()
def mind_pair(
    fixed: Tensor,
    moving: Tensor,
    *,
    radius: int = 1,
    dilation: int = 2,
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MIND-SSC features ``(1, 12, X, Y, Z)`` of fixed and moving ``(1, 1, X, Y, Z)``; masked images are filled outside first."""
    if fixed_mask is not None:
        fixed = fill_outside_mask(fixed, fixed_mask)
    if moving_mask is not None:
        moving = fill_outside_mask(moving, moving_mask)
    return mind_ssc(fixed, radius, dilation), mind_ssc(moving, radius, dilation)


def pool_features(features: Tensor, spacing: int) -> Tensor:
    """Average ``(1, C, X, Y, Z)`` features (sizes multiples of ``spacing``) onto the grid ``spacing`` times coarser."""
    return resize_volume(features, tuple(n // spacing for n in features.shape[2:]))


def optimise_on_grid(
    fixed: Tensor,
    moving: Tensor,
    init_field: Tensor | None,
    config: IOConfig,
    *,
    weight: Tensor | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Adam on features already pooled to the grid of ``config.grid_spacing`` ``s``: ``(1, C, X', Y', Z')``.

    ``init_field`` and the result are full-resolution fields ``(1, 3, s·X',
    s·Y', s·Z')`` in voxels. ``weight`` ``(1, 1, X', Y', Z')`` (e.g. the pooled
    fixed mask) weighs the data term per coarse voxel; ``None`` weighs all equally.
    """
    spacing = config.grid_spacing
    coarse_shape = tuple(fixed.shape[2:])
    shape = tuple(n * spacing for n in coarse_shape)
    if init_field is None:
        init_field = torch.zeros((1, 3, *shape), device=fixed.device)
    if config.iterations == 0:
        return init_field
    with torch.no_grad():
        identity = identity_grid(coarse_shape, device=fixed.device)
        voxels = float(math.prod(coarse_shape))
        root_weight = None if weight is None else weight.sqrt()
        weighted_fixed = None if weight is None else fixed * root_weight
        total_weight = None if weight is None else weight.sum().clamp_min(1e-12)
        start = resize_field(init_field.float().to(fixed.device), coarse_shape)
    parameter = torch.nn.Parameter(start.clone())
    optimiser = torch.optim.Adam([parameter], lr=config.lr)
    for step in range(config.iterations):
        optimiser.zero_grad(set_to_none=True)
        field = smooth_field(parameter)
        warped = sample(moving, identity + field, padding_mode="zeros")
        if root_weight is None:
            data = F.mse_loss(warped, fixed, reduction="sum") / voxels
        else:
            data = F.mse_loss(warped * root_weight, weighted_fixed, reduction="sum") / total_weight
        loss = data + config.lam * diffusion_loss(field)
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(step + 1, config.iterations, float(loss.detach()))
    with torch.no_grad():
        return resize_field(smooth_field(parameter), shape)


def instance_optimise(
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    init_field: Tensor | None = None,
    *,
    preset: Literal["brain", "lung"] | IOConfig = "brain",
    iterations: int | None = None,
    lam: float | None = None,
    grid_spacing: int | None = None,
    lr: float | None = None,
    fixed_mask: Tensor | np.ndarray | None = None,
    moving_mask: Tensor | np.ndarray | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Refine ``init_field`` (or a zero field) for fixed/moving images on one grid; returns ``(1, 3, X, Y, Z)`` voxels.

    ``fixed``, ``moving`` (and masks) are ``(X, Y, Z)`` or ``(1, 1, X, Y, Z)``;
    ``init_field`` is ``(1, 3, X, Y, Z)`` in voxels on the fixed grid. The
    preset's parameters are replaced by the keyword arguments that are not
    ``None``. With masks, each image is filled outside its mask before MIND
    (as ConvexAdam does) and the data term counts only voxels inside the
    fixed mask. Runs on the device of ``fixed``.
    """
    config = io_config(preset, iterations=iterations, lam=lam, grid_spacing=grid_spacing, lr=lr)
    fixed_t, moving_t, masks = prepare_inputs(fixed, moving, fixed_mask, moving_mask)
    device = fixed_t.device
    shape = tuple(fixed_t.shape[2:])
    if init_field is not None:
        if tuple(init_field.shape) != (1, 3, *shape):
            raise ValueError(f"init_field: expected shape {(1, 3, *shape)}, got {tuple(init_field.shape)}")
        init_field = init_field.to(device=device, dtype=torch.float32)
    if config.iterations == 0:
        return init_field if init_field is not None else torch.zeros((1, 3, *shape), device=device)
    features_fixed, features_moving = mind_pair(
        fixed_t, moving_t, radius=config.mind_radius, dilation=config.mind_dilation, fixed_mask=masks[0], moving_mask=masks[1]
    )
    spacing = config.grid_spacing
    fixed_coarse = pool_features(pad_to_multiple(features_fixed, spacing), spacing)
    moving_coarse = pool_features(pad_to_multiple(features_moving, spacing), spacing)
    del features_fixed, features_moving
    weight = extent_weight(shape, masks[0], device, multiple=spacing, spacing=spacing)
    init = None if init_field is None else pad_to_multiple(init_field, spacing)
    field = optimise_on_grid(fixed_coarse, moving_coarse, init, config, weight=weight, progress=progress)
    return crop(field, shape)


def extent_weight(shape: Sequence[int], mask: Tensor | None, device, *, multiple: int, spacing: int) -> Tensor | None:
    """Data-term weight on the coarse grid: the fixed mask (or ones) inside the image, zero in the padding.

    The volume of ``shape`` is padded to a multiple of ``multiple`` and
    averaged by ``spacing``. ``None`` when every voxel counts fully (no mask, no padding).
    """
    if mask is None and all(n % multiple == 0 for n in shape):
        return None
    inside = torch.ones((1, 1, *shape), device=device) if mask is None else (mask != 0).float()
    return pool_features(pad_to_multiple(inside, multiple, mode="zeros"), spacing)


def prepare_inputs(
    fixed: Tensor | np.ndarray,
    moving: Tensor | np.ndarray,
    fixed_mask: Tensor | np.ndarray | None,
    moving_mask: Tensor | np.ndarray | None,
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """Images and masks as float32 ``(1, 1, X, Y, Z)`` on the device of ``fixed``; ``ValueError`` if a shape differs."""
    fixed_t = as_volume(fixed, "fixed")
    shape = tuple(fixed_t.shape[2:])
    others = []
    for volume, name in ((moving, "moving"), (fixed_mask, "fixed_mask"), (moving_mask, "moving_mask")):
        tensor = None if volume is None else as_volume(volume, name, device=fixed_t.device)
        if tensor is not None and tuple(tensor.shape[2:]) != shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape[2:])} differs from the fixed image's {shape}")
        others.append(tensor)
    return fixed_t, others[0], others[1:]
