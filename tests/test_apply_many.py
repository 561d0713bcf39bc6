"""``rwcnet apply`` with several moving files on their own grids and world-coordinate keypoints, against SimpleITK."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
import SimpleITK as sitk

from cli_runner import run
from rwcnet.affine import matrix_about, rotation_matrix
from rwcnet.exports import compose_affine
from rwcnet.data.formats import Image, write_field, write_itk_field

FIXED_SHAPE = (30, 28, 24)


def _affine(spacing, axis, degrees, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation_matrix(axis, degrees) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


FIXED_AFFINE = _affine((1.2, 1.0, 1.3), (1, 0, 1), 8.0, (-18.0, -14.0, -15.0))
IMAGE_AFFINE = _affine((1.0, 1.1, 1.2), (0, 1, 2), -6.0, (-17.0, -16.0, -14.0))
LABEL_AFFINE = _affine((0.9, 0.9, 1.0), (1, 1, 0), 5.0, (-19.0, -15.0, -16.0))


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Files: a fixed image, a moving image and a label map on two other grids, a field (affine + warp), its ITK form."""
    folder = tmp_path_factory.mktemp("apply_many")
    rng = np.random.default_rng(4)
    fixed = Image(np.zeros(FIXED_SHAPE, np.float32), FIXED_AFFINE)
    _save(folder / "fixed.nii.gz", fixed.array, FIXED_AFFINE)
    image = (scipy.ndimage.gaussian_filter(rng.standard_normal((34, 30, 26)), 2.5) * 100).astype(np.float32)
    _save(folder / "image.nii.gz", image, IMAGE_AFFINE)
    labels = np.zeros((36, 34, 28), np.uint8)
    labels[5:20, 6:22, 4:18], labels[16:30, 12:28, 10:24], labels[8:14, 20:30, 18:26] = 2, 5, 9
    _save(folder / "labels.nii.gz", labels, LABEL_AFFINE)
    centre = FIXED_AFFINE[:3, :3] @ (np.array(FIXED_SHAPE) / 2) + FIXED_AFFINE[:3, 3]
    matrix = matrix_about(rotation_matrix((1, -1, 2), 6.0), centre, (1.5, -1.0, 2.0))
    x = np.indices(FIXED_SHAPE).transpose(1, 2, 3, 0).astype(np.float64)
    warp = np.stack([np.sin(x[..., 1] / 5.0), 0.8 * np.cos(x[..., 2] / 6.0), np.sin(x[..., 0] / 4.0)], -1)
    field = compose_affine(warp.astype(np.float32), fixed, matrix)
    write_field(folder / "field.nii.gz", field, fixed)
    write_itk_field(folder / "field_itk.nii.gz", field, fixed)
    return folder


def _sitk_resample(folder: Path, name: str, interpolator) -> np.ndarray:
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(folder / "field_itk.nii.gz")))
    result = sitk.Resample(sitk.ReadImage(str(folder / name)), sitk.ReadImage(str(folder / "fixed.nii.gz")), transform,
                           interpolator, 0.0, sitk.sitkFloat64)
    return np.transpose(sitk.GetArrayFromImage(result), (2, 1, 0))


def test_several_files_are_warped_in_one_call_each_through_physical_space(case, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run(monkeypatch, capsys, "apply", "--field", case / "field.nii.gz", "--fixed",
                          case / "fixed.nii.gz", "--moving", case / "image.nii.gz", "--moving",
                          f"{case / 'labels.nii.gz'}:labels", "--label-method", "nearest", "--output-dir", out)
    assert code == 0 and stdout.count("wrote ") == 2
    warped = np.asanyarray(nib.load(str(out / "image.nii.gz")).dataobj)
    reference = _sitk_resample(case, "image.nii.gz", sitk.sitkLinear)
    inside = reference != 0  # ITK pads outside the moving grid with 0, rwcnet repeats the border
    assert inside.mean() > 0.5
    assert np.corrcoef(warped[inside], reference[inside])[0, 1] >= 0.999
    labels = np.asanyarray(nib.load(str(out / "labels.nii.gz")).dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 2, 5, 9}
    assert np.mean(labels == _sitk_resample(case, "labels.nii.gz", sitk.sitkNearestNeighbor)) > 0.995
    # the single-file form writes the same image
    code, _, _ = run(monkeypatch, capsys, "apply", "--field", case / "field.nii.gz", "--fixed", case / "fixed.nii.gz",
                     "--moving", case / "image.nii.gz", "--output", tmp_path / "one.nii.gz")
    assert code == 0
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(tmp_path / "one.nii.gz")).dataobj), warped)


def test_ants_points_in_lps_move_like_simpleitk_and_come_back(case, tmp_path, monkeypatch, capsys):
    voxels = np.array([[5, 6, 7], [15, 14, 12], [22, 20, 18], [10, 21, 5.5]], np.float64)
    ras = voxels @ FIXED_AFFINE[:3, :3].T + FIXED_AFFINE[:3, 3]
    lps = ras * [-1, -1, 1]
    rows = "\n".join(f"{p[0]:.5f},{p[1]:.5f},{p[2]:.5f},0,{i}" for i, p in enumerate(lps))
    (tmp_path / "fixed_points.csv").write_text(f"x,y,z,t,label\n{rows}\n")
    code, stdout, _ = run(monkeypatch, capsys, "apply", "--field", case / "field.nii.gz", "--fixed",
                          case / "fixed.nii.gz", "--keypoints", tmp_path / "fixed_points.csv", "--keypoints-coords",
                          "lps", "--keypoints-space", "fixed", "--keypoints-output", tmp_path / "moving_points.csv")
    assert code == 0 and "LPS mm" in stdout
    lines = (tmp_path / "moving_points.csv").read_text().splitlines()
    assert lines[0] == "x,y,z,t,label" and [line.split(",")[3:] for line in lines[1:]] == [["0", str(i)] for i in
                                                                                          range(4)]
    moved = np.array([[float(v) for v in line.split(",")[:3]] for line in lines[1:]])
    transform = sitk.DisplacementFieldTransform(sitk.ReadImage(str(case / "field_itk.nii.gz")))
    expected = np.array([transform.TransformPoint(tuple(p)) for p in lps])
    np.testing.assert_allclose(moved, expected, atol=1e-3)
    code, _, _ = run(monkeypatch, capsys, "apply", "--field", case / "field.nii.gz", "--fixed", case / "fixed.nii.gz",
                     "--keypoints", tmp_path / "moving_points.csv", "--keypoints-coords", "lps",
                     "--keypoints-output", tmp_path / "back.csv")
    back = np.loadtxt(tmp_path / "back.csv", delimiter=",", skiprows=1)[:, :3]
    np.testing.assert_allclose(back, lps, atol=1e-2)


def test_world_points_without_a_header_or_a_fixed_grid_are_refused(case, tmp_path, monkeypatch, capsys):
    (tmp_path / "bare.csv").write_text("1,2,3\n")
    (tmp_path / "named.csv").write_text("x,y,z\n1,2,3\n")
    np.savez(tmp_path / "field.npz", arr_0=np.zeros(FIXED_SHAPE + (3,), np.float32))
    for points, field, message in (("bare.csv", case / "field.nii.gz", "needs a header naming x,y,z"),
                                   ("named.csv", tmp_path / "field.npz", "need the fixed grid")):
        code, _, stderr = run(monkeypatch, capsys, "apply", "--field", field, "--keypoints", tmp_path / points,
                              "--keypoints-coords", "ras", "--keypoints-output", tmp_path / "out.csv")
        assert code == 2 and message in stderr and not (tmp_path / "out.csv").exists()
    code, _, stderr = run(monkeypatch, capsys, "apply", "--field", case / "field.nii.gz", "--moving",
                          case / "image.nii.gz", "--moving", case / "labels.nii.gz", "--output", tmp_path / "o.nii.gz")
    assert code == 2 and "need --output-dir" in stderr
