"""Affine transforms in physical space: building them, applying them, and ITK/ANTs transform files.

rwcnet's convention: an affine is a 4x4 matrix ``T`` (float64) that maps a **fixed** physical point to the
corresponding **moving** physical point, both in RAS millimetres (``[q, 1] = T @ [p, 1]``). Warping the
moving image by ``T`` samples it at ``T p`` for every fixed point ``p`` (a pull-back, like a Learn2Reg field).

ITK and ANTs store the same direction (fixed -> moving, what ``antsApplyTransforms -r fixed -i moving -t``
applies) in LPS millimetres: ``T_LPS = F T F`` with ``F = diag(-1, -1, 1, 1)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from rwcnet.errors import InputError
from rwcnet.geometry.grids import voxel_map
from rwcnet.geometry.resample import resample_image
from rwcnet.data.formats import Image, _sitk_message
from rwcnet.outputs import atomic_output

_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse
TRANSFORM_SUFFIXES = (".txt", ".tfm", ".mat")
_LINEARITY_TOLERANCE_MM = 1e-4


def rotation_matrix(axis, degrees: float) -> np.ndarray:
    """3x3 rotation by ``degrees`` about ``axis`` (any length, RAS), right-handed (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    skew = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * skew + (1.0 - np.cos(angle)) * skew @ skew


def matrix_about(linear: np.ndarray, centre, translation=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 ``T`` with ``T p = linear (p - centre) + centre + translation`` (mm)."""
    centre = np.asarray(centre, dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = centre + np.asarray(translation, dtype=np.float64) - linear @ centre
    return matrix


def to_itk(matrix: np.ndarray) -> np.ndarray:
    """rwcnet's RAS fixed->moving 4x4 to ITK's LPS fixed->moving 4x4 (and back: the map is its own inverse)."""
    return _FLIP @ np.asarray(matrix, dtype=np.float64) @ _FLIP


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 ``matrix`` to points ``(N, 3)`` (mm); returns ``(N, 3)``."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def point_errors(estimate: np.ndarray, truth: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Distance (mm) between where two affines put each point ``(N, 3)`` (mm): ``(N,)``."""
    return np.linalg.norm(transform_points(estimate, points) - transform_points(truth, points), axis=1)


def foreground_points(image: Image, threshold: float | None = None, step: int = 1) -> np.ndarray:
    """RAS mm points ``(N, 3)`` of every ``step``-th voxel whose value exceeds ``threshold`` (default 0)."""
    threshold = 0.0 if threshold is None else threshold
    index = np.argwhere(image.array[::step, ::step, ::step] > threshold) * step
    return transform_points(image.affine, index)


def affine_field(matrix: np.ndarray, fixed: Image, moving_affine: np.ndarray | None = None) -> np.ndarray:
    """The affine as a Learn2Reg field ``(X, Y, Z, 3)`` float32 on ``fixed``'s grid.

    Without ``moving_affine``: in fixed voxels, ``u(x) = A_fix^-1 T A_fix x - x`` (the Learn2Reg convention:
    the moving image resampled onto the fixed grid is sampled at ``x + u(x)``). With it: in voxels of a moving
    image on its own grid, ``u(x) = A_mov^-1 T A_fix x - x``.
    """
    target = fixed.affine if moving_affine is None else np.asarray(moving_affine, dtype=np.float64)
    mapping = voxel_map(fixed.affine, target, matrix)
    axes = [np.arange(n, dtype=np.float64) for n in fixed.shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return (grid @ (mapping[:, :3] - np.eye(3)).T + mapping[:, 3]).astype(np.float32)


def resample_moving(moving: Image, matrix: np.ndarray, reference: Image, order: int = 1) -> Image:
    """``moving`` sampled at ``T p`` for every voxel ``p`` of ``reference``'s grid (order 1 linear, 0 labels)."""
    moved = Image(moving.array, np.linalg.inv(matrix) @ moving.affine, moving.path, moving.header)
    return resample_image(moved, reference, order=order)


def write_itk_transform(path: str | Path, matrix: np.ndarray) -> None:
    """Write ``T`` as an ITK ``AffineTransform_double_3_3`` (.txt/.tfm text, .mat ITK MATLAB), atomically.

    The file maps fixed LPS points to moving LPS points: what ``antsApplyTransforms -r fixed -i moving -t``
    and ``sitk.Resample(moving, fixed, sitk.ReadTransform(path))`` apply.
    """
    path = Path(path)
    if not path.name.lower().endswith(TRANSFORM_SUFFIXES):
        raise InputError(f"{path}: cannot write an affine transform in this format; use .txt, .tfm or .mat")
    itk = to_itk(matrix)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in itk[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in itk[:3, 3]))
    with atomic_output(path) as tmp:
        sitk.WriteTransform(transform, str(tmp))


def _fsl_like(path: Path) -> bool:
    """Whether the file is a bare text matrix (FSL FLIRT's 4x4, or any 3x4/4x4 table of numbers)."""
    try:
        text = path.read_bytes()[:4096].decode("ascii")
    except UnicodeDecodeError:
        return False
    try:
        values = [float(token) for token in text.split()]
    except ValueError:
        return False
    return len(values) in (12, 16)


def read_itk_transform(path: str | Path) -> np.ndarray:
    """Read an ITK/ANTs linear transform file (.txt, .tfm, ITK MATLAB .mat) as rwcnet's RAS 4x4 ``T``.

    Any linear ITK transform works (affine, Euler, versor, similarity, a composite of them). A bare 4x4 text
    matrix (FSL FLIRT) is refused: its voxel-scaled convention needs both images to interpret.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: transform file not found")
    if not path.is_file():
        raise InputError(f"{path}: transform file is not a file")
    if _fsl_like(path):
        raise InputError(f"{path}: a bare text matrix (an FSL FLIRT .mat?) is not an ITK transform; convert it with "
                         "c3d_affine_tool -ref fixed -src moving FILE -fsl2ras -oitk OUT.txt")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        reason = _sitk_message(error)
        raise InputError(f"{path}: not a readable ITK transform ({reason})") from error
    itk = linear_matrix(transform)
    if itk is None:
        raise InputError(f"{path}: {transform.GetName()} is not a linear transform; an affine is needed here")
    return to_itk(itk)


def linear_matrix(transform: sitk.Transform) -> np.ndarray | None:
    """The LPS 4x4 of a SimpleITK transform found by mapping probe points, or ``None`` when it is not linear."""
    probes = np.array([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0],
                       [37.0, -55.0, 81.0], [-90.0, 64.0, -23.0]])
    images = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in probes])
    itk = np.eye(4)
    itk[:3, 3] = images[0]
    itk[:3, :3] = (images[1:4] - images[0]).T / 100.0
    if np.abs(transform_points(itk, probes) - images).max() > _LINEARITY_TOLERANCE_MM:
        return None
    return itk
