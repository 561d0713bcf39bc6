"""Masks and keypoints read off an image: the lung mask of a thorax CT, keypoints sampled inside a mask.

Used by ``rwcnet register`` (lung masks for CT without given masks) and by the
semi-synthetic pair generator (:mod:`rwcnet.synthetic`). Arrays are ``(X, Y, Z)``
in array order; keypoints are voxel indices.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

Tensor = torch.Tensor


def lung_mask(ct_hu, spacing_mm: Sequence[float], *, axis: int = 2, threshold_hu: float = -400.0,
              closing_mm: float = 3.0) -> np.ndarray:
    """Lung mask of a thorax CT in Hounsfield units ``(X, Y, Z)``; returns a bool array of that shape.

    Air below ``threshold_hu``; components touching the volume faces across
    the two in-plane axes (all but the cranio-caudal ``axis``, so a trachea
    cut at the top or bottom is kept) are outside the body and dropped; the
    largest remaining component is kept, and the second largest too when it
    has at least 30% of the largest's volume (two separate lungs). Each kept
    component is closed with a ball of radius ``closing_mm`` and its holes
    (vessels, airway walls) filled in 3D and slice by slice along ``axis``.
    """
    ct = np.asarray(ct_hu.detach().cpu() if isinstance(ct_hu, Tensor) else ct_hu)
    if ct.ndim != 3:
        raise ValueError(f"lung_mask needs a 3D CT, got shape {ct.shape}")
    labelled, count = ndimage.label(ct < threshold_hu)
    result = np.zeros(ct.shape, dtype=bool)
    if count == 0:
        return result
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    sizes[0] = 0
    for face_axis in (a for a in range(3) if a != axis):
        for index in (0, -1):
            sizes[np.unique(np.take(labelled, index, axis=face_axis))] = 0
    order = np.argsort(sizes)[::-1]
    keep = [int(label) for label in order[:2] if sizes[label] > 0]
    if len(keep) == 2 and sizes[keep[1]] < 0.3 * sizes[keep[0]]:
        keep = keep[:1]
    radii = [max(1, int(round(closing_mm / s))) for s in spacing_mm]
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    ball = sum((g / r) ** 2 for g, r in zip(grid, radii)) <= 1.0
    boxes = ndimage.find_objects(labelled)
    for label in keep:
        box = tuple(slice(max(s.start - r - 1, 0), min(s.stop + r + 1, n))
                    for s, r, n in zip(boxes[label - 1], radii, ct.shape))
        component = np.pad(labelled[box] == label, [(r + 1, r + 1) for r in radii])
        component = ndimage.binary_fill_holes(ndimage.binary_closing(component, ball))
        for index in range(component.shape[axis]):
            plane = [slice(None)] * 3
            plane[axis] = index
            component[tuple(plane)] = ndimage.binary_fill_holes(component[tuple(plane)])
        inner = tuple(slice(r + 1, c - r - 1) for r, c in zip(radii, component.shape))
        result[box] |= component[inner]
    return result


def sample_keypoints(mask, n: int, *, seed: int = 0, min_distance: float = 0.0) -> np.ndarray:
    """Up to ``n`` voxel positions inside ``mask`` (``(X, Y, Z)``, or with leading size-1 dims), at least
    ``min_distance`` voxels apart; returns ``(M, 3)`` float64 voxel indices, ``M <= n``.

    Voxels are visited in a seeded random order and taken greedily when far
    enough from those already taken (at most ``100 n`` visits), so fewer than
    ``n`` come back only when the mask cannot hold more at that distance.
    """
    array = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask, dtype=bool)
    array = array.reshape(array.shape[-3:])
    candidates = np.argwhere(array)
    if len(candidates) == 0:
        raise ValueError("cannot sample keypoints: the mask is empty")
    rng = np.random.default_rng(seed)
    if min_distance <= 0:
        chosen = rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)
        return candidates[chosen].astype(np.float64)
    cells: dict[tuple[int, int, int], list[np.ndarray]] = {}
    taken: list[np.ndarray] = []
    limit = min_distance**2
    for index in rng.permutation(len(candidates))[: 100 * n]:
        point = candidates[index]
        cell = tuple(int(c) for c in point // min_distance)
        near = (cells.get((cell[0] + i, cell[1] + j, cell[2] + k), ())
                for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1))
        if any(((point - other) ** 2).sum() < limit for group in near for other in group):
            continue
        cells.setdefault(cell, []).append(point)
        taken.append(point)
        if len(taken) == n:
            break
    return np.asarray(taken, dtype=np.float64).reshape(-1, 3)
