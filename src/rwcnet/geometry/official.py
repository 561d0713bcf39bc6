"""The samplers of the official Learn2Reg scorer (scipy), so that rwcnet's scores match it digit for digit.

Fields are numpy ``(X, Y, Z, 3)`` pull-back displacements in voxels of the moving grid laid on the fixed grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def warp_labels_official(moving_labels: np.ndarray, field: np.ndarray, mode: str = "constant") -> np.ndarray:
    """``moving_labels`` ``(X', Y', Z')`` at ``x + u(x)``: nearest neighbour (``map_coordinates(order=0)``), float64 field.

    ``mode="constant"`` is the scorer's (0 for any point outside ``[0, n - 1]``); ``"grid-constant"``
    keeps the border label up to half a voxel outside. Returns ``(X, Y, Z)`` of the labels' dtype.
    """
    axes = [np.arange(n, dtype=np.float64) for n in field.shape[:3]]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0) + np.moveaxis(field, -1, 0)
    warped = ndimage.map_coordinates(np.asarray(moving_labels, dtype=np.float64), coords, order=0, mode=mode)
    return warped.astype(np.asarray(moving_labels).dtype)


def field_at_points_cubic(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``u`` at voxel points ``(N, 3)`` of the fixed grid by cubic splines, zero outside (the scorer's TRE); ``(N, 3)``."""
    return np.stack([ndimage.map_coordinates(field[..., c], points.T, order=3, mode="constant") for c in range(3)], axis=1)
