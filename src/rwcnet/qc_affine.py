"""Quality-control picture of the affine pre-alignment: fixed/moving checkerboards before and after it.

:func:`affine_qc_figure` writes a PNG with two rows (the moving image on the fixed grid before the affine, i.e.
through the scanners' geometry alone, and after it) and three orthogonal slices through the grid's centre.
Each panel alternates square tiles of the fixed and the moving image, each scaled to its own 1st-99th
percentile, so misplaced edges show as breaks at the tile borders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rwcnet.errors import InputError
from rwcnet.outputs import atomic_output
from rwcnet.qc import PANEL_INCHES, _orient, _window

TILES = 8  # tiles across the longer side of a slice


def checkerboard(first: np.ndarray, second: np.ndarray, tiles: int = TILES) -> np.ndarray:
    """A 2-D slice whose square tiles alternate between ``first`` and ``second`` (same shape)."""
    size = max(1, round(max(first.shape) / tiles))
    rows, columns = np.indices(first.shape)
    return np.where(((rows // size) + (columns // size)) % 2 == 0, first, second)


def _scaled(volume: np.ndarray) -> np.ndarray:
    low, high = _window([volume[::2, ::2, ::2]])
    return np.clip((volume.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def affine_qc_figure(path: str | Path, fixed: np.ndarray, before: np.ndarray, after: np.ndarray, *,
                     affine: np.ndarray | None = None, title: str = "", dpi: int = 100) -> None:
    """Write the affine QC picture to ``path`` (.png), atomically.

    ``fixed``, ``before`` (moving resampled onto the fixed grid without the affine) and ``after`` (with it):
    ``(I, J, K)`` arrays on the fixed grid; ``affine``: the fixed image's voxel->RAS, to show anatomical planes.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"{path}: the affine QC picture is written as PNG; give a file name ending in .png")
    volumes = [_scaled(np.asarray(v)) for v in (fixed, before, after)]
    shape = volumes[0].shape
    spacing = np.linalg.norm(affine[:3, :3], axis=0) if affine is not None else np.ones(3)
    view = _orient(volumes, np.zeros(shape + (3,), np.float32), spacing, tuple(n // 2 for n in shape), affine)
    figure = Figure(figsize=(PANEL_INCHES * 3, PANEL_INCHES * 2 + 0.8), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    figure.subplots_adjust(left=0.08, right=0.99, top=0.86, bottom=0.02, wspace=0.05, hspace=0.08)
    for row, (moving, name) in enumerate(((view.images[1], "before affine"), (view.images[2], "after affine"))):
        for axis in range(3):
            b, c = (a for a in range(3) if a != axis)
            index = view.point[axis]
            board = checkerboard(np.take(view.images[0], index, axis=axis), np.take(moving, index, axis=axis))
            ax = axes[row, axis]
            ax.imshow(board.T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest",
                      aspect=view.spacing[c] / view.spacing[b])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(view.planes[axis], fontsize=9)
        axes[row, 0].set_ylabel(name, fontsize=9)
    figure.suptitle(("checkerboard of fixed and moving\n" + title).strip(), fontsize=10)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
