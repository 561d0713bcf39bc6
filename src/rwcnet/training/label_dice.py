"""Differentiable Dice of soft one-hot label maps warped by a field, across grids (SynthMorph-style training).

Label maps here are *soft one-hot* tensors ``(B, M, ...)``: channel ``c`` is
the fraction of a voxel covered by class ``c`` (background is what the
channels leave uncovered). They may live on a grid ``ratio`` times coarser
than the field's (labels synthesised at 1/2 resolution, loss at full
resolution on a patch): voxels are cell-centred, so field voxel ``x`` sits at
label voxel ``(x + 0.5) / ratio − 0.5``, and labels are sampled trilinearly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rwcnet import geometry

Tensor = torch.Tensor


def _label_coords(points: Tensor, ratio: int) -> Tensor:
    return points if ratio == 1 else (points + 0.5) / ratio - 0.5


def _grid_points(field: Tensor, origin: Sequence[int]) -> Tensor:
    points = geometry.identity_grid(field.shape[2:], device=field.device, dtype=field.dtype)
    if any(origin):
        points = points + torch.tensor(list(origin), device=field.device, dtype=field.dtype).view(1, 3, 1, 1, 1)
    return points


def warp_onehot(onehot: Tensor, field: Tensor, *, origin: Sequence[int] = (0, 0, 0), ratio: int = 1) -> Tensor:
    """Moving soft labels ``(B, M, X', Y', Z')`` warped by a pull-back ``field`` ``(B, 3, X, Y, Z)``: ``(B, M, X, Y, Z)``.

    ``field`` is in voxels of a grid ``ratio`` times finer than the labels'
    grid and may cover a box of it starting at voxel ``origin`` (of the fine
    grid). Trilinear, border values outside: differentiable in the field.
    """
    coords = _grid_points(field, origin) + field
    return geometry.sample(onehot.to(field.dtype), _label_coords(coords, ratio))


def fixed_onehot(onehot: Tensor, shape: Sequence[int], *, origin: Sequence[int] = (0, 0, 0), ratio: int = 1) -> Tensor:
    """Fixed soft labels ``(B, M, X', Y', Z')`` on a box ``shape`` of the ``ratio`` times finer grid at ``origin``."""
    if ratio == 1:
        box = tuple(slice(o, o + n) for o, n in zip(origin, shape))
        return onehot[(slice(None), slice(None), *box)]
    points = geometry.identity_grid(shape, device=onehot.device, dtype=onehot.dtype)
    points = points + torch.tensor(list(origin), device=onehot.device, dtype=onehot.dtype).view(1, 3, 1, 1, 1)
    return geometry.sample(onehot, _label_coords(points, ratio))


def soft_dice(warped: Tensor, fixed: Tensor, *, min_volume: float = 1.0) -> Tensor:
    """Mean soft Dice ``2 Σ w·f / (Σ w + Σ f)`` over the classes of two soft label maps ``(B, M, ...)``.

    Per sample, the mean runs over the classes whose fixed volume is at
    least ``min_volume`` voxels (a class absent from a training patch does
    not count), then over the samples that have one; 1 for identical maps.
    Returns a scalar tensor (0 when no class qualifies).
    """
    if warped.shape != fixed.shape:
        raise ValueError(f"soft_dice: shapes differ: {tuple(warped.shape)} and {tuple(fixed.shape)}")
    dims = tuple(range(2, warped.dim()))
    volume = fixed.sum(dim=dims)
    dice = 2.0 * (warped * fixed).sum(dim=dims) / (warped.sum(dim=dims) + volume).clamp_min(1e-6)
    present = (volume >= min_volume).to(dice.dtype)
    counts = present.sum(dim=1)
    if not bool((counts > 0).any()):
        return warped.sum() * 0.0
    per_sample = (dice * present).sum(dim=1) / counts.clamp_min(1.0)
    return per_sample[counts > 0].mean()


def hard_dice(warped: Tensor, fixed: Tensor) -> tuple[float, list[float]]:
    """Dice of the most likely class per voxel (background where the channels cover under half): mean and per class.

    ``warped`` and ``fixed`` are soft label maps ``(1, M, ...)``; the mean runs
    over the classes present in the fixed map (NaN entries for the others).
    """
    def labels(onehot: Tensor) -> Tensor:
        background = 1.0 - onehot.sum(dim=1, keepdim=True)
        return torch.cat([background, onehot], dim=1).argmax(dim=1)

    moving_labels, fixed_labels = labels(warped), labels(fixed)
    scores = []
    for index in range(1, warped.shape[1] + 1):
        a, b = moving_labels == index, fixed_labels == index
        total = int(a.sum()) + int(b.sum())
        scores.append(2.0 * int((a & b).sum()) / total if int(b.sum()) else float("nan"))
    present = [s for s in scores if s == s]
    return (sum(present) / len(present) if present else float("nan")), scores
