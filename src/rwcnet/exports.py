"""A registration's whole transform in the forms other tools read: ITK/ANTs files, its inverse, its Jacobian.

The whole transform is a Learn2Reg field ``u`` ``(X, Y, Z, 3)`` in voxels of the fixed grid (``A_fix``, voxel ->
RAS mm), affine included: fixed voxel ``x`` takes the moving image at physical point ``A_fix (x + u(x))``.
Its affine part, when there is one, is rwcnet's 4x4 ``T`` (fixed RAS mm -> moving RAS mm,
:mod:`rwcnet.affine.transforms`). ITK and ANTs read:

* a displacement field image (``.nii.gz``/``.nii``/``.mha``/``.nrrd``): the whole transform as LPS mm vectors on
  the fixed grid, fixed point ``p`` -> ``p + d(p)`` (``sitk.DisplacementFieldTransform(sitk.ReadImage(f))``,
  ``antsApplyTransforms -t f``);
* an ``.h5`` ITK CompositeTransform ``[affine, field]``: ITK applies the last one first, so the field is the
  deformable residual ``r`` with ``T (p + r(p))`` the whole map (``sitk.ReadTransform``, ``antsApplyTransforms``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from rwcnet.affine.transforms import to_itk, transform_points
from rwcnet.errors import InputError
from rwcnet.geometry import FieldInverse, invert_field_on_moving_grid, sample_field
from rwcnet.data.formats import NIFTI_SUFFIXES, WRITABLE_ITK_SUFFIXES, Image, _to_sitk, write_itk_field
from rwcnet.outputs import atomic_output

#: ``--itk-field``/``--itk-inverse`` endings: a displacement field image, or an ITK CompositeTransform.
ITK_TRANSFORM_SUFFIXES = NIFTI_SUFFIXES + WRITABLE_ITK_SUFFIXES + (".h5",)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _voxel_grid(shape) -> np.ndarray:
    axes = [np.arange(n, dtype=np.float64) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def compose_affine(field: np.ndarray, fixed: Image, matrix: np.ndarray) -> np.ndarray:
    """The whole transform of a deformable field applied after an affine's resampling: ``(X, Y, Z, 3)`` float32.

    ``field`` ``(X, Y, Z, 3)`` (fixed voxels) registers the moving image already resampled onto the fixed grid
    through ``T``; the result takes fixed voxel ``x`` to ``A_fix^-1 T A_fix (x + field(x))``.
    """
    voxel_map = np.linalg.inv(fixed.affine) @ np.asarray(matrix, np.float64) @ fixed.affine
    grid = _voxel_grid(fixed.shape)
    return (transform_points(voxel_map, grid + field) - grid).astype(np.float32)


def residual_field(field: np.ndarray, fixed: Image, matrix: np.ndarray) -> np.ndarray:
    """The deformable part ``r`` ``(X, Y, Z, 3)`` (fixed voxels) of a whole transform: ``x + r(x) = A_fix^-1 T^-1 A_fix (x + u(x))``."""
    undo = np.linalg.inv(fixed.affine) @ np.linalg.inv(np.asarray(matrix, np.float64)) @ fixed.affine
    grid = _voxel_grid(fixed.shape)
    return (transform_points(undo, grid + field) - grid).astype(np.float32)


def _displacement_transform(field: np.ndarray, reference: Image) -> sitk.DisplacementFieldTransform:
    """A SimpleITK DisplacementFieldTransform of a field ``(X, Y, Z, 3)`` in voxels on ``reference``'s grid."""
    vectors = np.asarray(field, np.float64) @ (_RAS_TO_LPS @ reference.affine[:3, :3]).T
    return sitk.DisplacementFieldTransform(_to_sitk(vectors, reference.affine, vector=True))


def _affine_transform(matrix: np.ndarray) -> sitk.AffineTransform:
    itk = to_itk(matrix)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in itk[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in itk[:3, 3]))
    return transform


def write_itk_transform_field(path: str | Path, field: np.ndarray, fixed: Image,
                              matrix: np.ndarray | None = None) -> None:
    """Write the whole transform ``field`` ``(X, Y, Z, 3)`` (fixed voxels, affine included) for ITK/ANTs, atomically.

    An image ending writes one displacement field (LPS mm, fixed grid). ``.h5`` writes an ITK CompositeTransform
    ``[affine T, deformable residual]`` (the identity affine when ``matrix`` is ``None``).
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(ITK_TRANSFORM_SUFFIXES):
        raise InputError(f"{path}: cannot write an ITK transform in this format; use {', '.join(ITK_TRANSFORM_SUFFIXES)}")
    if not name.endswith(".h5"):
        write_itk_field(path, field, fixed)
        return
    matrix = np.eye(4) if matrix is None else np.asarray(matrix, np.float64)
    composite = sitk.CompositeTransform([_affine_transform(matrix),
                                         _displacement_transform(residual_field(field, fixed, matrix), fixed)])
    with atomic_output(path) as tmp:
        sitk.WriteTransform(composite, str(tmp))


def inverse_field(field: np.ndarray, fixed: Image, moving: Image, **options) -> FieldInverse:
    """The inverse of a whole transform as a Learn2Reg field on ``moving``'s grid (moving voxels).

    For moving voxel ``y`` the fixed image is sampled at fixed voxel ``A_fix^-1 A_mov (y + v(y))``; found by
    :func:`rwcnet.geometry.invert_field_on_moving_grid` (fixed-point iteration, float64). The result's
    ``field`` is ``(1, 3, *moving.shape)``; ``undefined`` marks moving voxels with no preimage in the fixed grid.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(field, np.float64), -1, 0)))[None]
    return invert_field_on_moving_grid(tensor, torch.from_numpy(fixed.affine), torch.from_numpy(moving.affine),
                                       moving.shape, **options)


def inverse_array(inverse: FieldInverse) -> np.ndarray:
    """A :class:`FieldInverse`'s field as a Learn2Reg array ``(I, J, K, 3)`` float32 (moving voxels)."""
    return inverse.field[0].permute(1, 2, 3, 0).numpy().astype(np.float32)


def write_itk_inverse(path: str | Path, inverse: np.ndarray, moving: Image) -> None:
    """Write the inverse ``(I, J, K, 3)`` (moving voxels, on ``moving``'s grid) for ITK/ANTs, atomically.

    The transform maps moving point ``q`` to the fixed point where it came from, so ``sitk.Resample(fixed_labels,
    moving, transform, sitk.sitkNearestNeighbor)`` carries fixed labels onto the moving image. Image endings write
    a displacement field (LPS mm, moving grid); ``.h5`` a CompositeTransform holding that field.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(ITK_TRANSFORM_SUFFIXES):
        raise InputError(f"{path}: cannot write an ITK transform in this format; use {', '.join(ITK_TRANSFORM_SUFFIXES)}")
    if not name.endswith(".h5"):
        write_itk_field(path, inverse, moving)
        return
    with atomic_output(path) as tmp:
        sitk.WriteTransform(sitk.CompositeTransform([_displacement_transform(inverse, moving)]), str(tmp))


def format_jacobian(statistics: dict[str, float]) -> str:
    """One line of the Jacobian statistics, as the command prints them."""
    return (f"Jacobian: SDlogJ {statistics['sdlogj']:.4f} (official, +3), std log det {statistics['std_log_det']:.4f}, "
            f"folded {100 * statistics['folded_fraction']:.3f} %, min {statistics['min']:.3f}, "
            f"max {statistics['max']:.3f}")


def _sample(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear value of ``field`` ``(X, Y, Z, 3)`` at voxel points ``(N, 3)`` (border repeated): ``(N, 3)``."""
    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(field, np.float64), -1, 0)))[None]
    return sample_field(tensor, torch.from_numpy(np.asarray(points, np.float64))[None])[0].numpy()


def inverse_errors(field: np.ndarray, inverse: np.ndarray, fixed: Image, moving: Image,
                   fixed_mask: np.ndarray | None = None, moving_mask: np.ndarray | None = None,
                   undefined: np.ndarray | None = None) -> dict[str, float]:
    """How well ``inverse`` (moving grid, moving voxels) undoes ``field`` (fixed grid, fixed voxels), both ways.

    Fixed side, in fixed voxels over ``fixed_mask`` (default: all): ``|A_fix^-1 A_mov (y + v(y)) - x|`` with
    ``y = A_mov^-1 A_fix (x + u(x))``, i.e. ``u(x) + v(x + u(x))``. Moving side, in moving voxels over
    ``moving_mask``: ``v(y) + u(y + v(y))`` alike. Returns the median and 95th percentile of each.
    """
    to_moving = np.linalg.inv(moving.affine) @ fixed.affine
    to_fixed = np.linalg.inv(to_moving)
    result = {}
    for side, source, mask, there, back, to_there, to_back in (
            ("fixed", fixed, fixed_mask, field, inverse, to_moving, to_fixed),
            ("moving", moving, moving_mask, inverse, field, to_fixed, to_moving)):
        points = np.argwhere(np.ones(source.shape, bool) if mask is None else np.asarray(mask) > 0).astype(np.float64)
        reached = transform_points(to_there, points + _sample(there, points))
        returned = transform_points(to_back, reached + _sample(back, reached))
        errors = np.linalg.norm(returned - points, axis=1)
        result[f"{side}_median_vox"] = float(np.median(errors))
        result[f"{side}_p95_vox"] = float(np.quantile(errors, 0.95))
    return result
