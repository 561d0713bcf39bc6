"""Which grid is the fixed grid, and how a field samples a moving image or label map on any grid.

The rule (SPEC §4, ``docs/conventions.md``), shared by ``apply``, ``evaluate`` and ``register``:

* the fixed grid comes from the fixed image, fixed labels, fixed mask or dataset; a field's own
  NIfTI header is used only when nothing else gives a grid, and an identity or code-0 header
  never counts;
* a field must have the fixed grid's shape, else the command stops naming both shapes;
* a moving image or label map with the fixed grid's shape and affine (corners within
  :data:`GRID_TOLERANCE_MM`) is indexed by the field directly: the official Learn2Reg voxel rule;
* otherwise it is sampled at moving voxel ``A_mov^-1 A_fix (x + u(x))``, through physical space
  (:func:`rwcnet.geometry.moving_voxel_field`), and the command says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from rwcnet.errors import InputError
from rwcnet.geometry.fields import moving_voxel_field
from rwcnet.geometry.layout import field_array, field_tensor
from rwcnet.data.formats import NIFTI_SUFFIXES, Image, read_image

GRID_TOLERANCE_MM = 1e-3
PHYSICAL = "physical space"
VOXEL = "voxel (official)"


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` ``(X, Y, Z)``, voxel->RAS ``affine`` (mm), and where it came from (for messages)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    source: str
    header: nib.Nifti1Header | None = None

    @classmethod
    def of(cls, image: Image, source: str) -> Grid:
        return cls(image.shape, image.affine, source, image.header)

    def reference(self) -> Image:
        """A geometry-only :class:`Image` on this grid (for writing an output on it)."""
        return Image(np.broadcast_to(np.zeros((), np.uint8), self.shape), self.affine, None, self.header)


def corner_distance_mm(shape: tuple[int, ...], affine_a: np.ndarray, affine_b: np.ndarray) -> float:
    """Largest distance (mm) between where two affines put the 8 corner voxels of a grid of ``shape``."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    return float(np.linalg.norm((corners @ (np.asarray(affine_a) - np.asarray(affine_b)).T)[:, :3], axis=1).max())


def grid_difference(image: Image | Grid, grid: Grid) -> str | None:
    """Why ``image`` is not on ``grid`` (shape, or affine offset in mm), or ``None`` when it is."""
    if tuple(image.shape) != tuple(grid.shape):
        return f"shape {tuple(image.shape)} vs {tuple(grid.shape)}"
    offset = corner_distance_mm(grid.shape, image.affine, grid.affine)
    return f"same shape, affine {offset:.3g} mm apart" if offset > GRID_TOLERANCE_MM else None


def image_grid(path: Path, source: str) -> Grid:
    """The grid of an image file; a 3D NIfTI header is read without the voxel data (else :func:`read_image` checks)."""
    if path.name.lower().endswith(NIFTI_SUFFIXES) and path.is_file():
        try:
            loaded = nib.load(str(path))
        except Exception:  # a corrupt file: read_image names the problem
            loaded = None
        if loaded is not None and len(loaded.shape) == 3:
            return Grid(tuple(int(n) for n in loaded.shape), np.asarray(loaded.affine, np.float64), source)
    return Grid.of(read_image(path), source)


def field_header_grid(path: Path, shape: tuple[int, int, int]) -> Grid | None:
    """The fixed grid from a NIfTI field's header, or ``None`` when the field has no usable geometry.

    A header with neither qform nor sform code, or with the identity affine
    (the placeholder many Learn2Reg submissions carry), has none; so has a .npz field.
    """
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return None
    header = nib.load(str(path)).header
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    if (int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0) or np.allclose(affine, np.eye(4)):
        return None
    return Grid(tuple(shape), affine, f"the header of {path}")


def common_grid(images: list[tuple[Image, str]]) -> Grid | None:
    """The grid shared by the fixed-side ``(image, source)`` pairs; :class:`InputError` when two differ."""
    if not images:
        return None
    grid = Grid.of(*images[0])
    for image, source in images[1:]:
        difference = grid_difference(image, grid)
        if difference is not None:
            raise InputError(f"{image.path or source}: {source} is on another grid than {grid.source} ({difference}); "
                             "the fixed-side files must share one grid")
    return grid


def check_field_fits(field_shape: tuple[int, ...], grid: Grid, field_path: Path) -> None:
    """A field ``(X, Y, Z, 3)`` must lie on the fixed grid; otherwise :class:`InputError` naming both shapes."""
    if tuple(field_shape[:3]) != tuple(grid.shape):
        raise InputError(f"{field_path}: displacement field of shape {tuple(field_shape[:3])} does not fit the fixed "
                         f"grid of shape {tuple(grid.shape)} ({grid.source}); a Learn2Reg field lies on the fixed grid")


def sampling_field(field: np.ndarray, grid: Grid | None, moving: Image, what: str) -> tuple[np.ndarray, str | None]:
    """The field that samples ``moving``: ``(X, Y, Z, 3)`` in ``moving``'s voxels, and a note when not the field itself.

    ``field`` is ``(X, Y, Z, 3)`` in voxels of the fixed ``grid``. On the
    fixed grid (or with no fixed grid known and the field's shape) the field
    itself is returned with no note (the official voxel rule); on another grid
    the field through physical space (see the module docstring). Without a
    fixed grid, a moving side of another shape is an :class:`InputError`.
    """
    name = moving.path or what
    if grid is None:
        if moving.shape == field.shape[:3]:
            return field, None
        raise InputError(f"{name}: {what} has shape {moving.shape} and the displacement field {field.shape[:3]}; "
                         "with no fixed grid given (a fixed image, fixed labels, or a field header with a real affine) "
                         "it cannot be sampled through physical space")
    difference = grid_difference(moving, grid)
    if difference is None:
        return field, None
    moved = moving_voxel_field(field_tensor(field, torch.float64), torch.from_numpy(grid.affine), torch.from_numpy(moving.affine))
    note = (f"{name} ({what}) is not on the fixed grid of {grid.source} ({difference}): sampled through {PHYSICAL} "
            "at A_mov^-1 A_fix (x + u(x))")
    return field_array(moved), note


def orientation_matrix(orientation: str) -> np.ndarray:
    """Columns: the RAS unit vector of each array axis of an orientation code such as ``"LIA"``."""
    direction = np.zeros((3, 3))
    for axis, (ras_axis, sign) in enumerate(nib.orientations.axcodes2ornt(tuple(orientation))):
        direction[int(ras_axis), axis] = sign
    return direction


def working_grid(fixed: Image, spacing: float | list[float], orientation: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An axis-aligned grid in ``orientation`` (e.g. ``"LIA"``) at ``spacing`` mm covering the fixed image's box.

    Returns its voxel-to-RAS affine and shape.
    """
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    direction = orientation_matrix(orientation)
    corners = np.array([[i, j, k, 1.0] for i in (0, fixed.shape[0] - 1) for j in (0, fixed.shape[1] - 1) for k in (0, fixed.shape[2] - 1)])
    points = (fixed.affine @ corners.T)[:3]
    projected = direction.T @ points  # mm along each working axis
    low, high = projected.min(axis=1), projected.max(axis=1)
    shape = tuple(int(np.ceil((h - l) / s - 1e-6)) + 1 for l, h, s in zip(low, high, spacing))
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = direction @ low
    return affine, shape  # type: ignore[return-value]


def voxel_map(fixed_affine: np.ndarray, moving_affine: np.ndarray, matrix: np.ndarray | None = None) -> np.ndarray:
    """``(3, 4)`` float64: fixed voxel ``x`` -> moving voxel ``A_mov^-1 T A_fix x`` (``T``: fixed->moving RAS mm, identity if None)."""
    transform = np.eye(4) if matrix is None else np.asarray(matrix, dtype=np.float64)
    return (np.linalg.inv(np.asarray(moving_affine, np.float64)) @ transform @ np.asarray(fixed_affine, np.float64))[:3]


def coarse_voxel_map(mapping: np.ndarray, fixed_shape, fixed_coarse, moving_shape, moving_coarse) -> np.ndarray:
    """A voxel map between two grids (``(3, 4)``, :func:`voxel_map`) re-expressed between coarser grids of the same extents.

    Grids are cell-centred as :func:`rwcnet.geometry.resize_volume` makes them: coarse voxel ``i`` of an
    axis shrunk by ``s = fine size / coarse size`` is fine voxel ``s (i + ½) − ½``.
    """
    scale_fixed = np.asarray(fixed_shape, np.float64) / np.asarray(fixed_coarse, np.float64)
    scale_moving = np.asarray(moving_shape, np.float64) / np.asarray(moving_coarse, np.float64)
    linear, shift = np.asarray(mapping, np.float64)[:, :3], np.asarray(mapping, np.float64)[:, 3]
    coarse_linear = linear * scale_fixed[None, :] / scale_moving[:, None]
    coarse_shift = (linear @ ((scale_fixed - 1) / 2) + shift - (scale_moving - 1) / 2) / scale_moving
    return np.concatenate([coarse_linear, coarse_shift[:, None]], axis=1)
