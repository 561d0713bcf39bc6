"""The whole transform written for ITK/ANTs, and its inverse: round trips through SimpleITK against rwcnet's own warp."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import SimpleITK as sitk

from rwcnet.affine import matrix_about, rotation_matrix, write_itk_transform
from rwcnet.commands.apply import warp_image
from rwcnet.exports import (compose_affine, inverse_array, inverse_errors, inverse_field, residual_field,
                            write_itk_inverse, write_itk_transform_field)
from rwcnet.geometry.grids import Grid, sampling_field
from rwcnet.data.formats import Image, _to_sitk, write_image

FIXED_SHAPE = (36, 32, 28)
MOVING_SHAPE = (40, 34, 30)


def _grid(spacing, axis, degrees, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(axis, degrees) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def _blobs(shape, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(shape)
    return (scipy.ndimage.gaussian_filter(noise, 3.0) * 100.0 + 50.0).astype(np.float32)


@pytest.fixture(scope="module")
def pair():
    """A fixed and a moving image on two oblique grids, an affine T and the whole transform (affine + smooth warp)."""
    fixed = Image(_blobs(FIXED_SHAPE, 0), _grid((1.2, 1.0, 1.4), (1, 0, 1), 10.0, (-21.0, -16.0, -19.0)))
    moving = Image(_blobs(MOVING_SHAPE, 1), _grid((1.0, 1.1, 1.2), (0, 1, 2), -8.0, (-20.0, -18.0, -17.0)))
    centre = fixed.affine[:3, :3] @ (np.array(FIXED_SHAPE) / 2) + fixed.affine[:3, 3]
    matrix = matrix_about(rotation_matrix((1, 2, -1), 7.0) @ np.diag([1.05, 0.97, 1.0]), centre, (2.0, -1.5, 1.0))
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in FIXED_SHAPE], indexing="ij"), axis=-1)
    warp = np.stack([1.2 * np.sin(x[..., 1] / 6.0), 0.9 * np.cos(x[..., 2] / 7.0), 1.0 * np.sin(x[..., 0] / 5.0)], -1)
    return fixed, moving, matrix, compose_affine(warp.astype(np.float32), fixed, matrix)


def _inside(fixed: Image, moving: Image, field: np.ndarray, margin: float = 1.5) -> np.ndarray:
    """Fixed voxels whose sample point lies well inside the moving grid (ITK pads with 0 there, rwcnet repeats)."""
    sampling, _ = sampling_field(field, Grid.of(fixed, "fixed"), moving, "moving")
    reach = np.indices(fixed.shape).transpose(1, 2, 3, 0) + sampling
    return np.all((reach > margin) & (reach < np.array(moving.shape) - 1 - margin), axis=-1)


def _rwcnet_warp(fixed: Image, moving: Image, field: np.ndarray) -> np.ndarray:
    sampling, _ = sampling_field(field, Grid.of(fixed, "fixed"), moving, "moving")
    return warp_image(moving.array, sampling)


def _sitk_warp(fixed: Image, moving: Image, transform: sitk.Transform) -> np.ndarray:
    reference, image = _to_sitk(fixed.array, fixed.affine), _to_sitk(moving.array, moving.affine)
    return np.transpose(sitk.GetArrayFromImage(sitk.Resample(image, reference, transform, sitk.sitkLinear)), (2, 1, 0))


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".h5"])
def test_the_whole_transform_warps_in_simpleitk_as_in_rwcnet(tmp_path, pair, suffix):
    fixed, moving, matrix, field = pair
    path = tmp_path / f"transform{suffix}"
    write_itk_transform_field(path, field, fixed, matrix)
    if suffix == ".h5":
        transform = sitk.ReadTransform(str(path))
        assert transform.GetName() == "CompositeTransform"
    else:
        transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path)))
    inside = _inside(fixed, moving, field)
    assert inside.mean() > 0.5
    ours, theirs = _rwcnet_warp(fixed, moving, field)[inside], _sitk_warp(fixed, moving, transform)[inside]
    assert np.corrcoef(ours, theirs)[0, 1] >= 0.999
    assert np.abs(ours - theirs).max() < 0.02 * np.ptp(ours)


def test_the_affine_file_and_the_composite_share_the_affine_part(tmp_path, pair):
    fixed, moving, matrix, field = pair
    write_itk_transform(tmp_path / "affine.txt", matrix)
    write_itk_transform_field(tmp_path / "all.h5", field, fixed, matrix)
    affine = sitk.ReadTransform(str(tmp_path / "affine.txt"))
    composite = sitk.CompositeTransform(sitk.ReadTransform(str(tmp_path / "all.h5")))
    assert composite.GetNumberOfTransforms() == 2
    first = composite.GetNthTransform(0)
    probe = (3.0, -7.0, 11.0)
    np.testing.assert_allclose(first.TransformPoint(probe), affine.TransformPoint(probe), atol=1e-6)
    residual = residual_field(field, fixed, matrix)
    assert np.abs(residual).max() < 2.0 < np.abs(field).max()  # the field holds the warp, the affine the rest


def test_inverse_undoes_the_whole_transform_both_ways_and_in_simpleitk(tmp_path, pair):
    fixed, moving, matrix, field = pair
    found = inverse_field(field, fixed, moving)
    inverse = inverse_array(found)
    assert inverse.shape == MOVING_SHAPE + (3,)
    undefined = found.undefined[0].numpy()
    assert 0.0 < undefined.mean() < 0.5  # the moving box reaches past the fixed one
    fixed_mask = np.zeros(FIXED_SHAPE, bool)
    fixed_mask[6:-6, 6:-6, 6:-6] = True
    moving_mask = np.zeros(MOVING_SHAPE, bool)
    moving_mask[8:-8, 8:-8, 8:-8] = True
    errors = inverse_errors(field, inverse, fixed, moving, fixed_mask, moving_mask, undefined)
    assert errors["fixed_median_vox"] < 0.1 and errors["fixed_p95_vox"] < 0.5, errors
    assert errors["moving_median_vox"] < 0.1 and errors["moving_p95_vox"] < 0.5, errors
    for suffix in (".nii.gz", ".h5"):
        write_itk_transform_field(tmp_path / f"forward{suffix}", field, fixed, matrix)
        write_itk_inverse(tmp_path / f"inverse{suffix}", inverse, moving)
    forward = sitk.ReadTransform(str(tmp_path / "forward.h5"))
    backward = sitk.DisplacementFieldTransform(sitk.ReadImage(str(tmp_path / "inverse.nii.gz")))
    composite_backward = sitk.ReadTransform(str(tmp_path / "inverse.h5"))
    lps = np.diag([-1.0, -1.0, 1.0])
    for voxel in np.argwhere(moving_mask & ~undefined)[::997]:
        point = tuple(float(v) for v in lps @ (moving.affine[:3, :3] @ voxel + moving.affine[:3, 3]))
        for transform in (backward, composite_backward):
            np.testing.assert_allclose(forward.TransformPoint(transform.TransformPoint(point)), point, atol=0.2)


@pytest.mark.parametrize("suffix", [".nii.gz", ".h5", "affine.txt", "affine.mat"])
def test_ants_applies_the_exported_transforms_as_rwcnet_does(tmp_path, pair, suffix):
    """antsApplyTransforms (through antspyx, where it is installed) reads each export as rwcnet means it."""
    ants = pytest.importorskip("ants")
    fixed, moving, matrix, field = pair
    if suffix.startswith("affine"):
        path = tmp_path / suffix
        write_itk_transform(path, matrix)
        field = compose_affine(np.zeros(FIXED_SHAPE + (3,), np.float32), fixed, matrix)
    else:
        path = tmp_path / f"transform{suffix}"
        write_itk_transform_field(path, field, fixed, matrix)
    write_image(tmp_path / "fixed.nii.gz", fixed.array, fixed)
    write_image(tmp_path / "moving.nii.gz", moving.array, moving)
    warped = ants.apply_transforms(fixed=ants.image_read(str(tmp_path / "fixed.nii.gz")),
                                   moving=ants.image_read(str(tmp_path / "moving.nii.gz")),
                                   transformlist=[str(path)], interpolator="linear").numpy()
    inside = _inside(fixed, moving, field)
    ours = _rwcnet_warp(fixed, moving, field)[inside]
    assert np.corrcoef(ours, warped[inside])[0, 1] >= 0.999
