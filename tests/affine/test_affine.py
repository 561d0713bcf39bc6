"""Rigid/affine registration against known transforms; ITK files against SimpleITK's own reader and resampler."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import SimpleITK as sitk
import torch

from rwcnet import geometry
from rwcnet.affine import (affine_field, initial_transform, matrix_about, point_errors, read_itk_transform,
                           register_affine, resample_moving, rotation_matrix, write_itk_transform)
from rwcnet.affine.transforms import foreground_points
from rwcnet.errors import InputError
from rwcnet.geometry.resample import resample_image
from rwcnet.data.formats import Image, _to_sitk

nilearn_datasets = pytest.importorskip("nilearn.datasets")


@pytest.fixture(scope="module")
def template() -> Image:
    """The MNI152 brain resampled to a 48^3 grid of 3 mm voxels (nilearn's packaged 2 mm template)."""
    mni = nilearn_datasets.load_mni152_template(resolution=2)
    source = Image(scipy.ndimage.gaussian_filter(np.asarray(mni.get_fdata(), np.float32), 0.6), mni.affine)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-70.5, -88.5, -52.5]  # the brain's centre near the middle of the grid
    return resample_image(source, Image(np.zeros((48, 48, 48), np.float32), affine))


def _moved(fixed: Image, truth: np.ndarray, pad: int) -> Image:
    """A moving image whose content at ``T p`` is the fixed content at ``p``, on the fixed grid padded by ``pad``."""
    shift = np.eye(4)
    shift[:3, 3] = -pad
    affine = fixed.affine @ shift
    padded = np.pad(fixed.array, pad)
    to_source = np.linalg.inv(affine) @ np.linalg.inv(truth) @ affine
    array = scipy.ndimage.affine_transform(padded, to_source[:3, :3], offset=to_source[:3, 3], order=1)
    return Image(array.astype(np.float32), affine)


def _random_rigid(seed: int, centre: np.ndarray, degrees: float = 30.0, shift_mm: float = 30.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=3)
    return matrix_about(rotation_matrix(direction, degrees * rng.uniform(0.6, 1.0)), centre,
                        rng.normal(size=3) / np.sqrt(3) * shift_mm * rng.uniform(0.6, 1.0))


@pytest.mark.parametrize("seed, metric", [(0, "mind"), (1, "mind"), (2, "ncc"), (3, "mi")])
def test_oblique_rotations_and_shifts_are_recovered_to_below_a_millimetre(template, seed, metric):
    points = foreground_points(template, 0.1)
    truth = _random_rigid(seed, points.mean(0))
    moving = _moved(template, truth, pad=8)
    result = register_affine(template, moving, transform="rigid", metric=metric, seed=seed)
    errors = point_errors(result.matrix, truth, points)
    assert point_errors(result.initial, truth, points).mean() > 10.0
    assert errors.mean() < 1.0 and errors.max() < 2.0, (errors.mean(), errors.max())


def test_scale_and_shear_are_recovered_by_the_affine_stage(template):
    points = foreground_points(template, 0.1)
    linear = rotation_matrix([1, 1, 0], 10.0) @ np.array([[1.12, 0.08, 0.0], [0.0, 0.93, 0.06], [0.05, 0.0, 1.05]])
    truth = matrix_about(linear, points.mean(0), [6.0, -4.0, 5.0])
    moving = _moved(template, truth, pad=8)
    rigid = register_affine(template, moving, transform="rigid")
    affine = register_affine(template, moving, transform="affine")
    assert point_errors(rigid.matrix, truth, points).mean() > 2.0
    errors = point_errors(affine.matrix, truth, points)
    assert errors.mean() < 1.0, errors.mean()


def test_masks_keep_the_search_on_the_masked_structure(template):
    points = foreground_points(template, 0.1)
    truth = _random_rigid(4, points.mean(0), degrees=15.0, shift_mm=10.0)
    moving = _moved(template, truth, pad=8)
    clutter = moving.array.copy()
    clutter[:20, :20, :] = 1.0  # a bright block the fixed image lacks, outside the moving mask
    mask_fixed = Image((template.array > 0.1).astype(np.uint8), template.affine)
    mask_moving = Image((_moved(template, truth, pad=8).array > 0.1).astype(np.uint8), moving.affine)
    mask_moving.array[:20, :20, :] = 0
    result = register_affine(template, Image(clutter, moving.affine), transform="rigid", fixed_mask=mask_fixed,
                             moving_mask=mask_moving)
    assert point_errors(result.matrix, truth, points).mean() < 1.0


def test_affine_field_and_resampling_agree_with_each_other_on_both_grids(template):
    truth = _random_rigid(5, foreground_points(template, 0.1).mean(0), degrees=20.0, shift_mm=8.0)
    moving = _moved(template, truth, pad=4)
    by_scipy = resample_moving(moving, truth, template).array
    field = affine_field(truth, template, moving.affine)
    tensor = torch.from_numpy(np.moveaxis(field, -1, 0))[None].double()
    by_torch = geometry.warp(torch.from_numpy(moving.array).double()[None, None], tensor)[0, 0].numpy()
    np.testing.assert_allclose(by_torch, by_scipy, atol=1e-4)
    # on the fixed grid the field is in fixed voxels: x + u(x) = A_fix^-1 T A_fix x
    voxel = np.array([10.0, 20.0, 30.0])
    expected = np.linalg.inv(template.affine) @ truth @ template.affine @ np.append(voxel, 1.0)
    np.testing.assert_allclose(voxel + affine_field(truth, template)[10, 20, 30], expected[:3], atol=1e-4)


@pytest.mark.parametrize("suffix", [".txt", ".tfm", ".mat"])
def test_itk_transform_files_warp_like_rwcnet_through_simpleitk(tmp_path, suffix):
    rng = np.random.default_rng(7)
    fixed_affine = np.eye(4)
    fixed_affine[:3, :3] = rotation_matrix([0.3, 1.0, -0.5], 25.0) @ np.diag([1.5, -1.0, 1.2])  # oblique, flipped
    fixed_affine[:3, 3] = [-20.0, 15.0, -18.0]
    moving_affine = np.diag([1.1, 1.3, 0.9, 1.0])
    moving_affine[:3, 3] = [-25.0, -20.0, -15.0]
    moving_array = scipy.ndimage.gaussian_filter(rng.random((40, 36, 42)), 2.0).astype(np.float32)
    fixed, moving = Image(np.zeros((32, 34, 30), np.float32), fixed_affine), Image(moving_array, moving_affine)
    truth = matrix_about(rotation_matrix([1, -2, 1], 8.0) @ np.diag([1.05, 0.97, 1.02]), [0.0, 0.0, 0.0], [2, -1, 3])
    path = tmp_path / f"affine{suffix}"
    write_itk_transform(path, truth)
    np.testing.assert_allclose(read_itk_transform(path), truth, atol=1e-9)
    transform = sitk.ReadTransform(str(path))
    by_sitk = sitk.Resample(_to_sitk(moving_array, moving_affine), _to_sitk(fixed.array, fixed_affine), transform,
                            sitk.sitkLinear, -1.0)
    by_sitk = np.transpose(sitk.GetArrayFromImage(by_sitk), (2, 1, 0))
    field = torch.from_numpy(np.moveaxis(affine_field(truth, fixed, moving_affine), -1, 0))[None].double()
    ours = geometry.warp(torch.from_numpy(moving_array).double()[None, None], field)[0, 0].numpy()
    inside = by_sitk != -1.0
    assert inside.mean() > 0.3
    assert np.corrcoef(by_sitk[inside], ours[inside])[0, 1] >= 0.999
    np.testing.assert_allclose(by_sitk[inside], ours[inside], atol=1e-4)


def test_an_euler_transform_from_another_tool_is_read_as_its_matrix(tmp_path):
    euler = sitk.Euler3DTransform((10.0, -5.0, 3.0), 0.1, -0.2, 0.3, (4.0, 5.0, -6.0))
    path = tmp_path / "rigid.tfm"
    sitk.WriteTransform(euler, str(path))
    matrix = read_itk_transform(path)
    point_lps = np.array([12.0, -30.0, 40.0])
    moved_lps = np.array(euler.TransformPoint(tuple(point_lps)))
    flip = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(matrix[:3, :3] @ (point_lps * flip) + matrix[:3, 3], moved_lps * flip, atol=1e-9)


def test_an_fsl_matrix_and_other_files_are_refused_with_a_clear_error(tmp_path):
    fsl = tmp_path / "flirt.mat"
    fsl.write_text("1 0 0 2\n0 1 0 -3\n0 0 1 1\n0 0 0 1\n")
    with pytest.raises(InputError, match="FSL"):
        read_itk_transform(fsl)
    junk = tmp_path / "junk.txt"
    junk.write_text("not a transform\n")
    with pytest.raises(InputError, match="not a readable ITK transform"):
        read_itk_transform(junk)
    with pytest.raises(InputError, match="not found"):
        read_itk_transform(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="format"):
        write_itk_transform(tmp_path / "out.xfm", np.eye(4))
    assert not (tmp_path / "out.xfm").exists()


def test_the_simpleitk_engine_recovers_the_same_transform(template):
    points = foreground_points(template, 0.1)
    truth = _random_rigid(6, points.mean(0), degrees=20.0, shift_mm=15.0)
    result = register_affine(template, _moved(template, truth, pad=8), transform="rigid", metric="mi", engine="sitk")
    assert point_errors(result.matrix, truth, points).mean() < 1.0
    with pytest.raises(InputError, match="MIND"):
        register_affine(template, template, metric="mind", engine="sitk")


def test_the_moments_start_follows_a_turn_too_large_for_the_centre_of_mass_start(template):
    points = foreground_points(template, 0.1)
    truth = matrix_about(rotation_matrix([1, 2, -1], 70.0), points.mean(0), [5.0, -5.0, 5.0])
    moving = _moved(template, truth, pad=12)
    com = initial_transform(template, moving, "com")
    moments = initial_transform(template, moving, "moments")
    assert point_errors(com, truth, points).mean() > 40.0
    assert point_errors(moments, truth, points).mean() < 2.0  # a rigidly moved copy has the same principal axes
    result = register_affine(template, moving, transform="rigid", init="moments")
    assert point_errors(result.matrix, truth, points).mean() < 1.0
