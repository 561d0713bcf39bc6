"""Fold repair: smooth a displacement field locally where ``x + u(x)`` folds, until it folds nowhere.

A registration field can fold in a few voxels (the Jacobian determinant of ``x + u(x)`` at or below
zero; instance optimisation's Adam steps leave ~0.1 % on a brain pair). :func:`repair_folds` removes
them with the least change it can: inside a small neighbourhood of each folded voxel it replaces the
field by its Gaussian-smoothed self, repeatedly, and nowhere else. The determinant is the one the
Learn2Reg scorer uses (central differences of ``u`` in voxels, plus the identity), so "no folds" here
means no folds in the official count. The work is done tile by tile (each with a halo wide enough for
the filter and the differences), so its cost follows the number of folded places, not the volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rwcnet.geometry.fields import jacobian_determinant
from rwcnet.geometry.filters import gaussian_half_kernel, separable_filter

Tensor = torch.Tensor
#: Determinants at or below this count as folded for the repair (a margin above the scorer's 0).
FOLD_THRESHOLD = 0.01


@dataclass(frozen=True)
class FoldRepairReport:
    """What :func:`repair_folds` did: voxels at or below the threshold before and after, smoothing passes, tiles."""

    folded_before: int
    folded_after: int
    passes: int
    tiles: int


def _tile_boxes(corner: Tensor, tile: int, halo: int, reach: int, shape: tuple[int, ...]):
    """For the tile at ``corner`` (tile indices): its box with ``halo``, the tile inside that box, and the part of
    the box that may change (all but ``reach`` voxels at the box's faces that are not faces of the volume)."""
    outer, inner, editable = [], [], []
    for index, size in zip(corner.tolist(), shape):
        start, stop = index * tile, min(size, (index + 1) * tile)
        low, high = max(0, start - halo), min(size, stop + halo)
        outer.append(slice(low, high))
        inner.append(slice(start - low, stop - low))
        editable.append(slice(0 if low == 0 else reach, (high - low) - (0 if high == size else reach)))
    return tuple(outer), tuple(inner), tuple(editable)


def repair_folds(field: Tensor, *, threshold: float = FOLD_THRESHOLD, sigma: float = 1.0, radius: int = 1, tile: int = 32,
                 tile_passes: int = 20, max_passes: int = 500) -> tuple[Tensor, FoldRepairReport]:
    """``field`` ``(1, 3, X, Y, Z)`` (voxels) with every Jacobian determinant above ``threshold``, changed only near folds.

    Each pass, in every tile that still has a determinant at or below ``threshold``, the field within
    ``radius`` voxels of those places is replaced by a Gaussian (``sigma`` voxels, replicated border)
    of itself (at most ``tile_passes`` per visit). Tiles are visited until none is left or after
    ``max_passes`` passes in all; the result may then keep some folds (``FoldRepairReport.folded_after``).
    The input is not modified.
    """
    if field.dim() != 5 or field.shape[:2] != (1, 3):
        raise ValueError(f"expected a field (1, 3, X, Y, Z), got {tuple(field.shape)}")
    kernel = gaussian_half_kernel(sigma)
    reach = len(kernel)  # voxels a smoothed value reads on each side, plus one
    halo = radius + reach  # every voxel within ``radius`` of the tile can change
    shape = tuple(field.shape[2:])
    folded = jacobian_determinant(field)[0] <= threshold
    before = int(folded.sum())
    if before == 0:
        return field, FoldRepairReport(0, 0, 0, 0)
    field = field.clone()
    passes, visited = 0, set()
    with torch.no_grad():
        while passes < max_passes:
            corners = torch.unique(torch.nonzero(folded) // tile, dim=0)
            if corners.shape[0] == 0:
                break
            for corner in corners:
                visited.add(tuple(corner.tolist()))
                outer, inner, editable = _tile_boxes(corner, tile, halo, reach, shape)
                box = field[(slice(None), slice(None), *outer)]
                check = torch.zeros(box.shape[2:], dtype=torch.bool, device=field.device)
                check[inner] = True
                change = torch.zeros_like(check)
                change[editable] = True
                for _ in range(tile_passes):
                    bad = (jacobian_determinant(box)[0] <= threshold) & check
                    if passes >= max_passes or not bad.any():
                        break
                    near = F.max_pool3d(bad[None, None].float(), 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
                    box = torch.where(near & change, separable_filter(box, kernel, border="replicate"), box)
                    passes += 1
                field[(slice(None), slice(None), *outer)] = box
            folded = jacobian_determinant(field)[0] <= threshold
    return field, FoldRepairReport(before, int(folded.sum()), passes, len(visited))
