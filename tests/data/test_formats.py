"""Tests of rwcnet.data.formats against nibabel, SimpleITK and hand-made geometry."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from rwcnet.errors import InputError
from rwcnet.geometry import warp
from rwcnet.geometry.resample import resample_image, same_grid
from rwcnet.data.formats import (
    Image,
    read_field,
    read_image,
    read_itk_field,
    read_keypoints,
    write_field,
    write_image,
    write_itk_field,
)

SPACING = (1.2, 0.8, 2.0)


def oblique_affine(spacing=SPACING, origin=(12.5, -30.0, 7.25), rotvec=(0.2, -0.35, 0.5)) -> np.ndarray:
    """Voxel->RAS affine with a rotation, a flip of the second axis and non-isotropic spacing."""
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix() @ np.diag([1.0, -1.0, 1.0]) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def smooth_blobs(shape, seed=0) -> np.ndarray:
    """A smooth positive test volume: a sum of Gaussian blobs."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    volume = np.zeros(shape)
    for _ in range(12):
        centre = rng.uniform(0.2, 0.8, 3) * np.array(shape)
        width = rng.uniform(2.5, 5.0)
        volume += rng.uniform(0.5, 1.0) * np.exp(-np.sum((grid - centre) ** 2, axis=-1) / (2 * width**2))
    return volume


def smooth_field(shape, magnitude, seed=1) -> np.ndarray:
    """A smooth random displacement field (X, Y, Z, 3) in voxels, max |component| = magnitude."""
    rng = np.random.default_rng(seed)
    field = np.stack([scipy.ndimage.gaussian_filter(rng.standard_normal(shape), 4.0) for _ in range(3)], axis=-1)
    return field * (magnitude / np.abs(field).max())


@pytest.fixture
def oblique_image() -> Image:
    rng = np.random.default_rng(3)
    return Image(rng.integers(-1000, 1000, size=(9, 8, 7)).astype(np.int16), oblique_affine())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".nrrd"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_image_round_trip_keeps_array_dtype_and_affine(tmp_path: Path, oblique_image: Image, suffix, dtype):
    array = oblique_image.array.astype(dtype)
    path = tmp_path / f"image{suffix}"
    write_image(path, array, oblique_image)
    back = read_image(path)
    assert back.array.dtype == array.dtype
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, oblique_image.affine, atol=1e-5)
    np.testing.assert_allclose(back.spacing, SPACING, atol=1e-6)
    assert back.path == path
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_ras_lps_conversion_matches_nibabel_coordinates(tmp_path: Path, oblique_image: Image):
    nifti = tmp_path / "by_nibabel.nii.gz"
    nib.Nifti1Image(oblique_image.array, oblique_image.affine).to_filename(nifti)
    mha = tmp_path / "by_sitk.mha"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(mha))  # SimpleITK's own NIfTI->LPS conversion
    voxel = (3, 5, 2)
    ras = nib.affines.apply_affine(nib.load(nifti).affine, voxel)
    lps = np.array(sitk.ReadImage(str(mha)).TransformIndexToPhysicalPoint(voxel))
    np.testing.assert_allclose(lps * [-1, -1, 1], ras, atol=1e-4)

    from_mha = read_image(mha)
    np.testing.assert_array_equal(from_mha.array, oblique_image.array)
    np.testing.assert_allclose(nib.affines.apply_affine(from_mha.affine, voxel), ras, atol=1e-4)

    written = tmp_path / "by_rwcnet.nrrd"
    write_image(written, oblique_image.array, read_image(nifti))
    itk_image = sitk.ReadImage(str(written))
    assert itk_image.GetPixel(voxel) == oblique_image.array[voxel]
    np.testing.assert_allclose(np.array(itk_image.TransformIndexToPhysicalPoint(voxel)) * [-1, -1, 1], ras, atol=1e-4)


def test_nifti_writing_keeps_reference_codes(tmp_path: Path, oblique_image: Image):
    source = nib.Nifti1Image(oblique_image.array, oblique_image.affine)
    source.set_sform(oblique_image.affine, code=2)
    source.set_qform(oblique_image.affine, code=1)
    source.to_filename(tmp_path / "ref.nii.gz")
    reference = read_image(tmp_path / "ref.nii.gz")
    write_image(tmp_path / "out.nii.gz", (reference.array > 0), reference)
    header = nib.load(tmp_path / "out.nii.gz").header
    assert (int(header["sform_code"]), int(header["qform_code"])) == (2, 1)
    assert header.get_data_dtype() == np.uint8


def test_trailing_singleton_axis_is_squeezed(tmp_path: Path):
    array = np.ones((6, 5, 4, 1), np.float32)
    nib.Nifti1Image(array, np.eye(4)).to_filename(tmp_path / "single_frame.nii.gz")
    assert read_image(tmp_path / "single_frame.nii.gz").shape == (6, 5, 4)


def _bad_image(tmp_path: Path, case: str) -> Path:
    if case == "missing":
        return tmp_path / "missing.nii.gz"
    if case in ("text.nii.gz", "text.mha"):
        path = tmp_path / case
        path.write_text("this is not an image\n")
        return path
    if case == "unknown.png":
        path = tmp_path / case
        path.write_bytes(b"\x89PNG")
        return path
    arrays = {
        "two_d.nii.gz": np.ones((6, 5), np.float32),
        "one_slice.nii.gz": np.ones((6, 5, 1), np.float32),
        "four_d.nii.gz": np.ones((6, 5, 4, 2), np.float32),
        "nan.nii.gz": np.where(np.arange(120).reshape(6, 5, 4) == 7, np.nan, 1.0).astype(np.float32),
    }
    path = tmp_path / case
    if case == "inf.mha":
        array = np.ones((6, 5, 4))
        array[1, 2, 3] = np.inf
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    elif case == "two_d.nrrd":
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 5), np.float32)), str(path))
    else:
        nib.Nifti1Image(arrays[case], np.eye(4)).to_filename(path)
    return path


@pytest.mark.parametrize(
    "case, problem",
    [
        ("missing", "not found"),
        ("text.nii.gz", "not a readable"),
        ("text.mha", "not a readable"),
        ("unknown.png", "unknown image format"),
        ("two_d.nii.gz", "2D"),
        ("two_d.nrrd", "2D"),
        ("one_slice.nii.gz", "single slice"),
        ("four_d.nii.gz", "4D"),
        ("nan.nii.gz", "NaN"),
        ("inf.mha", "infinite"),
    ],
)
def test_bad_images_raise_input_error_naming_the_file(tmp_path: Path, case: str, problem: str):
    path = _bad_image(tmp_path, case)
    with pytest.raises(InputError, match=re.escape(path.name)) as error:
        read_image(path)
    assert problem in str(error.value)


@pytest.mark.parametrize("suffix", [".nii.gz", ".npz"])
def test_field_round_trip(tmp_path: Path, oblique_image: Image, suffix: str):
    field = smooth_field(oblique_image.shape, 2.0).astype(np.float32)
    path = tmp_path / f"disp_0001_0002{suffix}"
    write_field(path, field, oblique_image)
    np.testing.assert_array_equal(read_field(path, expected_shape=oblique_image.shape), field)
    if suffix == ".nii.gz":
        np.testing.assert_allclose(nib.load(path).affine, oblique_image.affine, atol=1e-5)


def test_field_npz_with_a_single_other_key(tmp_path: Path):
    field = np.arange(4 * 3 * 2 * 3, dtype=np.float64).reshape(4, 3, 2, 3)
    np.savez(tmp_path / "named.npz", displacement=field)
    result = read_field(tmp_path / "named.npz")
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, field)


@pytest.mark.parametrize("case", ["wrong_shape", "channels_first", "nan", "missing", "two_keys", "itk_5d"])
def test_bad_fields_raise_input_error_naming_the_file(tmp_path: Path, oblique_image: Image, case: str):
    good = np.zeros((*oblique_image.shape, 3), np.float32)
    path = tmp_path / f"{case}.npz"
    if case == "wrong_shape":
        np.savez(path, np.zeros((5, 5, 5, 3), np.float32))
    elif case == "channels_first":
        np.savez(path, np.moveaxis(good, -1, 0))
    elif case == "nan":
        good[1, 1, 1, 2] = np.nan
        np.savez(path, good)
    elif case == "two_keys":
        np.savez(path, a=good, b=good)
    elif case == "itk_5d":
        path = tmp_path / "itk_5d.nii.gz"
        write_itk_field(path, good, oblique_image)
    with pytest.raises(InputError, match=re.escape(path.name)) as error:
        read_field(path, expected_shape=oblique_image.shape)
    if case == "wrong_shape":
        assert "(5, 5, 5, 3)" in str(error.value) and str(oblique_image.shape + (3,)) in str(error.value)


def test_keypoints_csv_and_nii_gz_quirk(tmp_path: Path):
    (tmp_path / "case_0001_0000.csv").write_text("1.5,2,3\n\n10,20.25,30\n")
    expected = np.array([[1.5, 2, 3], [10, 20.25, 30]])
    np.testing.assert_array_equal(read_keypoints(tmp_path / "case_0001_0000.csv"), expected)
    np.testing.assert_array_equal(read_keypoints(tmp_path / "case_0001_0000.nii.gz"), expected)


@pytest.mark.parametrize("text, line", [("1,2,3\n4,5\n", 2), ("x,y,z\n1,2,3\n", 1), ("1,2,3\n4,5,nan\n", 2)])
def test_malformed_keypoints_name_file_and_line(tmp_path: Path, text: str, line: int):
    path = tmp_path / "points.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=rf"points\.csv, line {line}:"):
        read_keypoints(path)
    with pytest.raises(InputError, match="absent.csv"):
        read_keypoints(tmp_path / "absent.csv")


def test_resample_image_reproduces_a_linear_function_of_physical_position():
    image_affine = oblique_affine()
    shape = (30, 34, 20)
    centre = nib.affines.apply_affine(image_affine, (np.array(shape) - 1) / 2)
    reference_affine = oblique_affine(spacing=(1.0, 1.1, 1.3), rotvec=(-0.3, 0.1, 0.2), origin=(0, 0, 0))
    reference_shape = (16, 14, 12)
    reference_affine[:3, 3] = centre - reference_affine[:3, :3] @ ((np.array(reference_shape) - 1) / 2)

    def linear(points: np.ndarray) -> np.ndarray:
        return points @ np.array([0.3, -0.2, 0.7]) + 5.0

    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    image = Image(linear(nib.affines.apply_affine(image_affine, index)).astype(np.float64), image_affine)
    reference = Image(np.zeros(reference_shape, np.float32), reference_affine)
    resampled = resample_image(image, reference, order=1)
    assert same_grid(resampled, reference) and not same_grid(image, reference)
    ref_index = np.stack(np.meshgrid(*[np.arange(n) for n in reference_shape], indexing="ij"), axis=-1)
    inside = np.all((np.abs(nib.affines.apply_affine(np.linalg.inv(image_affine) @ reference_affine, ref_index)
                            - (np.array(shape) - 1) / 2) < (np.array(shape) - 1) / 2), axis=-1)
    assert inside.mean() > 0.9
    expected = linear(nib.affines.apply_affine(reference_affine, ref_index))
    np.testing.assert_allclose(resampled.array[inside], expected[inside], atol=1e-6)


def test_resample_labels_by_a_known_voxel_shift(oblique_image: Image):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 5, size=oblique_image.shape).astype(np.uint8)
    shift = np.array([2, -1, 3])
    moved_affine = oblique_image.affine.copy()
    moved_affine[:3, 3] += oblique_image.affine[:3, :3] @ shift  # image voxel x sits at reference voxel x + shift
    resampled = resample_image(Image(labels, moved_affine), oblique_image, order=0)
    assert resampled.array.dtype == np.uint8
    np.testing.assert_array_equal(resampled.array[2:, :-1, 3:], labels[:-2, 1:, :-3])
    assert not resampled.array[:2].any()


@pytest.mark.parametrize("offset", [1e-9, -1e-9])
def test_resample_labels_keeps_the_border_under_rounding_noise(oblique_image: Image, offset: float):
    # a reference grid a rounding error away from the label grid: every voxel, border faces included, keeps its
    # label (scipy >= 1.17's mode="constant" sends a coordinate 1e-12 outside [0, n - 1] to 0)
    labels = np.random.default_rng(6).integers(1, 5, size=oblique_image.shape).astype(np.uint8)
    nudged = oblique_image.affine.copy()
    nudged[:3, 3] += oblique_image.affine[:3, :3] @ np.full(3, offset)
    resampled = resample_image(Image(labels, oblique_image.affine), Image(labels, nudged), order=0)
    np.testing.assert_array_equal(resampled.array, labels)


def test_resample_labels_fills_zero_only_beyond_half_a_voxel(oblique_image: Image):
    labels = np.random.default_rng(7).integers(1, 5, size=oblique_image.shape).astype(np.uint8)
    size = labels.shape[0]
    for shift in (0.4, 0.6, -0.4, -0.6):
        moved = oblique_image.affine.copy()
        moved[:3, 3] += oblique_image.affine[:3, 0] * shift  # reference voxel i samples label voxel i + shift
        resampled = resample_image(Image(labels, oblique_image.affine), Image(labels, moved), order=0).array
        nearest = np.rint(np.arange(size) + shift).astype(int)  # brute force: the nearest label voxel, 0 outside
        inside = (nearest >= 0) & (nearest < size)
        expected = np.where(inside[:, None, None], labels[np.clip(nearest, 0, size - 1)], 0)
        np.testing.assert_array_equal(resampled, expected)
        assert resampled.all() == (abs(shift) < 0.5)


def test_itk_displacement_field_matches_rwcnet_warp(tmp_path: Path):
    shape = (40, 36, 30)
    fixed = Image(np.zeros(shape, np.float32), oblique_affine())
    moving = smooth_blobs(shape).astype(np.float32)
    field = smooth_field(shape, 3.0)

    write_image(tmp_path / "moving.mha", moving, fixed)
    write_image(tmp_path / "fixed.nrrd", fixed.array, fixed)
    write_itk_field(tmp_path / "field.nii.gz", field, fixed)
    header = nib.load(tmp_path / "field.nii.gz").header
    assert header.get_intent()[0] == "vector" and header.get_data_shape() == (*shape, 1, 3)  # what ANTs reads

    itk_field = sitk.Cast(sitk.ReadImage(str(tmp_path / "field.nii.gz")), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(itk_field)
    itk_moving, itk_fixed = (sitk.ReadImage(str(tmp_path / name)) for name in ("moving.mha", "fixed.nrrd"))
    itk_warped = sitk.Resample(itk_moving, itk_fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    itk_array = np.transpose(sitk.GetArrayFromImage(itk_warped), (2, 1, 0))

    ours = warp(torch.from_numpy(moving.astype(np.float64))[None, None],
                torch.from_numpy(field).permute(3, 0, 1, 2)[None])[0, 0].numpy()
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    target = index + field
    inside = np.all((target > 1) & (target < np.array(shape) - 2), axis=-1)
    inside[:3], inside[-3:], inside[:, :3], inside[:, -3:], inside[:, :, :3], inside[:, :, -3:] = [False] * 6
    assert inside.mean() > 0.5
    correlation = np.corrcoef(itk_array[inside], ours[inside])[0, 1]
    assert correlation > 0.999
    np.testing.assert_allclose(itk_array[inside], ours[inside], atol=1e-4 * moving.max())
    no_warp = np.corrcoef(itk_array[inside], moving[inside])[0, 1]
    assert no_warp < 0.99, "the test field is too small to tell directions apart"


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
def test_itk_field_round_trip_and_grid_check(tmp_path: Path, oblique_image: Image, suffix: str):
    field = smooth_field(oblique_image.shape, 2.5)
    path = tmp_path / f"field{suffix}"
    write_itk_field(path, field, oblique_image)
    np.testing.assert_allclose(read_itk_field(path, oblique_image), field, atol=1e-5)
    other = Image(oblique_image.array, oblique_affine(origin=(0.0, 0.0, 0.0)), Path("other.nii.gz"))
    with pytest.raises(InputError, match=re.escape(path.name)):
        read_itk_field(path, other)
