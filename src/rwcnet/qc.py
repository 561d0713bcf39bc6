"""Quality-control picture of one registration: slices, differences, deformation grid, Jacobian.

:func:`qc_figure` writes a PNG with three orthogonal slices (rows) through
one voxel and seven columns: fixed, moving, warped, ``|fixed - moving|``,
``|fixed - warped|``, the deformation grid and the Jacobian determinant.
Volumes are ``(I, J, K)`` arrays in NIfTI voxel order on the fixed grid; the
field is a Learn2Reg pull-back field ``(X, Y, Z, 3)`` in voxels (see
``docs/conventions.md``). Pixels are drawn with their true aspect from the
voxel spacing; with the image's affine, slices are turned to the nearest
anatomical orientation (sagittal, coronal, axial, superior/anterior up).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, TwoSlopeNorm
from matplotlib.figure import Figure

from rwcnet.errors import InputError
from rwcnet.geometry import jacobian_determinant
from rwcnet.geometry.layout import field_array
from rwcnet.outputs import atomic_output

COLUMNS = ("fixed", "moving", "warped", "|fixed − moving|", "|fixed − warped|", "deformation grid",
           "Jacobian determinant")
JACOBIAN_RANGE = (0.0, 2.0)  # colour scale of the determinant, centred at 1
FOLD_COLOUR = "#00d000"  # voxels with determinant <= 0
GRID_LINES = 24  # deformation-grid lines across the longer side of a slice
PANEL_INCHES = 2.1


@dataclass
class _Oriented:
    """The volumes as displayed: axis permutation/flips applied (views, no copies).

    ``images`` are fixed, moving, warped; ``components[c]`` is the displacement
    along displayed axis ``c`` in voxels; ``point`` is the slice voxel in the
    displayed axes; ``names`` name the displayed axes and ``planes[a]`` the
    slice normal to displayed axis ``a`` (with its index in the original array).
    """

    images: list[np.ndarray]
    components: list[np.ndarray]
    spacing: np.ndarray
    point: tuple[int, int, int]
    names: tuple[str, str, str]
    planes: tuple[str, str, str]


def _orient(images: list[np.ndarray], field: np.ndarray, spacing: np.ndarray, point: tuple[int, int, int],
            affine: np.ndarray | None) -> _Oriented:
    """Permute/flip the axes to the nearest RAS orientation when ``affine`` is given, else keep array order."""
    array_names = ("i", "j", "k")
    if affine is None:
        planes = tuple(f"{name}={p}" for name, p in zip(array_names, point))
        return _Oriented(images, [field[..., c] for c in range(3)], spacing, tuple(point), array_names, planes)
    ornt = nib.orientations.io_orientation(affine)
    shape = images[0].shape
    components: list[np.ndarray] = [np.empty(0)] * 3
    new_spacing = np.empty(3)
    new_point = [0, 0, 0]
    planes = ["", "", ""]
    for axis, (target, flip) in enumerate(ornt.astype(int)):
        view = nib.orientations.apply_orientation(field[..., axis], ornt)
        components[target] = -view if flip < 0 else view
        new_spacing[target] = spacing[axis]
        new_point[target] = point[axis] if flip > 0 else shape[axis] - 1 - point[axis]
        planes[target] = f"{('sagittal', 'coronal', 'axial')[target]} {array_names[axis]}={point[axis]}"
    oriented = [nib.orientations.apply_orientation(image, ornt) for image in images]
    return _Oriented(oriented, components, new_spacing, tuple(new_point), ("R", "A", "S"), tuple(planes))


def jacobian_slice(components: Sequence[np.ndarray], axis: int, index: int) -> np.ndarray:
    """Jacobian determinant of ``x + u(x)`` on one slice, equal to that slice of the whole volume's map.

    ``components`` are the three displacement components ``(X, Y, Z)`` in
    voxels; only the slab ``index-1 .. index+1`` along ``axis`` is used, which
    is all the central differences of :func:`rwcnet.geometry.jacobian_determinant` need.
    """
    size = components[0].shape[axis]
    low, high = max(index - 1, 0), min(index + 2, size)
    slab = np.stack([np.take(c, np.arange(low, high), axis=axis) for c in components])
    det = jacobian_determinant(torch.from_numpy(slab[None].astype(np.float64)))[0].numpy()
    return np.take(det, index - low, axis=axis)


def _window(slices: Sequence[np.ndarray]) -> tuple[float, float]:
    """Display range: 1st to 99th percentile of the values of the shown slices."""
    values = np.concatenate([s.ravel() for s in slices])
    low, high = (float(v) for v in np.percentile(values, [1.0, 99.0]))
    if high <= low:
        low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low, low + 1.0)


def _grid_segments(ub: np.ndarray, uc: np.ndarray) -> list[np.ndarray]:
    """Polylines of a regular grid in the slice plane, each point ``(b, c)`` moved to ``(b + u_b, c + u_c)``."""
    nb, nc = ub.shape
    step = max(1, round(max(nb, nc) / GRID_LINES))
    bs, cs = np.arange(nb, dtype=np.float64), np.arange(nc, dtype=np.float64)
    segments = [np.column_stack([b + ub[b, :], cs + uc[b, :]]) for b in range(0, nb, step)]
    segments += [np.column_stack([bs + ub[:, c], c + uc[:, c]]) for c in range(0, nc, step)]
    return segments


def _format_metrics(metrics: Mapping[str, object]) -> str:
    """``{"Dice": (0.61, 0.82), "SDlogJ": 0.07}`` to ``"Dice 0.61 → 0.82   SDlogJ 0.07"``."""
    def number(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)

    parts = []
    for name, value in metrics.items():
        if isinstance(value, (tuple, list)) and len(value) == 2:
            parts.append(f"{name} {number(value[0])} → {number(value[1])}")
        else:
            parts.append(f"{name} {number(value)}")
    return "   ".join(parts)


def qc_figure(
    path: str | Path,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    field: np.ndarray | torch.Tensor,
    *,
    spacing: Sequence[float] | None = None,
    title_metrics: Mapping[str, object] | None = None,
    point: Sequence[int] | None = None,
    affine: np.ndarray | None = None,
    dpi: int = 100,
) -> None:
    """Write the QC picture of a registration to ``path`` (.png), atomically.

    ``fixed``, ``moving``, ``warped``: ``(I, J, K)`` arrays on the fixed grid.
    ``field``: Learn2Reg pull-back field ``(X, Y, Z, 3)`` in voxels (or torch
    ``(1, 3, X, Y, Z)``). ``spacing``: voxel size in mm per array axis
    (default the affine's, else 1). ``title_metrics``: shown in the title, a
    value or a ``(before, after)`` pair per name, e.g. ``{"Dice": (0.6, 0.8),
    "TRE mm": 1.9, "SDlogJ": 0.07}``. ``point``: the voxel ``(i, j, k)`` the
    slices pass through (default the centre). ``affine``: voxel->RAS of the
    fixed image; with it slices are shown sagittal/coronal/axial.
    The deformation grid draws fixed-grid lines at ``x + u(x)`` (in-plane
    components); the Jacobian map is centred at 1 with folds (det <= 0) in green.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"{path}: the QC picture is written as PNG; give a file name ending in .png")
    field = field_array(field)
    images = [np.asarray(a) for a in (fixed, moving, warped)]
    shape = field.shape[:3]
    for name, image in zip(("fixed", "moving", "warped"), images):
        if image.shape != shape:
            raise ValueError(f"{name} image of shape {image.shape} does not match the field grid {shape}")
    if spacing is None:
        spacing = np.linalg.norm(affine[:3, :3], axis=0) if affine is not None else np.ones(3)
    spacing = np.asarray(spacing, dtype=np.float64)
    point = tuple(n // 2 for n in shape) if point is None else tuple(int(p) for p in point)
    if len(point) != 3 or not all(0 <= p < n for p, n in zip(point, shape)):
        raise ValueError(f"slice point {point} lies outside the grid {shape}")
    view = _orient(images, field, spacing, point, affine)

    rows = []
    for axis in range(3):
        b, c = (a for a in range(3) if a != axis)
        index = view.point[axis]
        slices = [np.take(image, index, axis=axis).astype(np.float32) for image in view.images]
        rows.append({
            "axes": (b, c),
            "images": slices,
            "before": np.abs(slices[0] - slices[1]),
            "after": np.abs(slices[0] - slices[2]),
            "ub": np.take(view.components[b], index, axis=axis),
            "uc": np.take(view.components[c], index, axis=axis),
            "det": jacobian_slice(view.components, axis, index),
            "label": f"{view.planes[axis]}\n→{view.names[b]}  ↑{view.names[c]}",
        })
    fixed_window = _window([r["images"][0] for r in rows])
    moving_window = _window([r["images"][1] for r in rows])
    diff_max = _window([r["before"] for r in rows])[1]
    fold_cmap = ListedColormap([FOLD_COLOUR])
    norm = TwoSlopeNorm(vmin=JACOBIAN_RANGE[0], vcenter=1.0, vmax=JACOBIAN_RANGE[1])

    figure = Figure(figsize=(PANEL_INCHES * len(COLUMNS), PANEL_INCHES * 3 + 1.3), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(3, len(COLUMNS))
    figure.subplots_adjust(left=0.04, right=0.995, top=0.86, bottom=0.14, wspace=0.06, hspace=0.12)
    for row, data in zip(axes, rows):
        b, c = data["axes"]
        shown = {"aspect": view.spacing[c] / view.spacing[b], "origin": "lower", "interpolation": "nearest"}
        row[0].imshow(data["images"][0].T, cmap="gray", vmin=fixed_window[0], vmax=fixed_window[1], **shown)
        row[1].imshow(data["images"][1].T, cmap="gray", vmin=moving_window[0], vmax=moving_window[1], **shown)
        row[2].imshow(data["images"][2].T, cmap="gray", vmin=moving_window[0], vmax=moving_window[1], **shown)
        diff_image = row[3].imshow(data["before"].T, cmap="magma", vmin=0.0, vmax=diff_max, **shown)
        row[4].imshow(data["after"].T, cmap="magma", vmin=0.0, vmax=diff_max, **shown)
        row[5].imshow(data["images"][0].T, cmap="gray", vmin=fixed_window[0], vmax=fixed_window[1], alpha=0.35,
                      **shown)
        row[5].add_collection(LineCollection(_grid_segments(data["ub"], data["uc"]), colors="#1f3fbf",
                                             linewidths=0.6))
        det_image = row[6].imshow(data["det"].T, cmap="RdBu_r", norm=norm, **shown)
        folds = data["det"] <= 0
        if folds.any():
            row[6].imshow(np.ma.masked_where(~folds, folds).T, cmap=fold_cmap, vmin=0, vmax=1, **shown)
        row[6].text(0.02, 0.02, f"folds: {int(folds.sum())}", transform=row[6].transAxes, fontsize=7,
                    color="black", backgroundcolor=(1, 1, 1, 0.6))
        for ax in row:
            ax.set_xlim(-0.5, data["ub"].shape[0] - 0.5)
            ax.set_ylim(-0.5, data["ub"].shape[1] - 0.5)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(data["label"], fontsize=8)
    for ax, title in zip(axes[0], COLUMNS):
        ax.set_title(title, fontsize=9)

    def colorbar(mappable, first: int, last: int, label: str, **kwargs) -> None:
        left, right = axes[-1, first].get_position().x0, axes[-1, last].get_position().x1
        cax = figure.add_axes((left, 0.07, right - left, 0.018))
        bar = figure.colorbar(mappable, cax=cax, orientation="horizontal", **kwargs)
        bar.ax.tick_params(labelsize=7)
        bar.set_label(label, fontsize=8)

    colorbar(diff_image, 3, 4, "absolute intensity difference", extend="max")
    colorbar(det_image, 6, 6, "det (folds ≤ 0 in green)", extend="both")
    title = f"slices through voxel (i, j, k) = {point}"
    if title_metrics:
        title = _format_metrics(title_metrics) + "\n" + title
    figure.suptitle(title, fontsize=11)
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
