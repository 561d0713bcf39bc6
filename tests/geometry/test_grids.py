"""Moving images and label maps on another grid than the fixed one: apply, evaluate and register.

The references are independent of rwcnet: SimpleITK resampling through physical
space (a displacement-field transform built here by hand), brute-force Dice, and
invariants (the same physical labels stored on two grids score the same).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from cli_runner import run
from l2r_fixture import SHAPE as L2R_SHAPE, save_field, write_unpaired
from rwcnet.cli import app

FIXED_SHAPE = (24, 22, 20)
MOVING_SHAPE = (28, 20, 26)
LPS = np.diag([-1.0, -1.0, 1.0])
runner = CliRunner()


def rotated_affine(rotvec, spacing, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_rotvec(rotvec).as_matrix() @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


FIXED_AFFINE = rotated_affine((0.1, -0.2, 0.15), (1.2, 1.0, 1.5), (-12.0, -10.0, -14.0))
MOVING_AFFINE = rotated_affine((-0.25, 0.1, 0.3), (1.0, 1.3, 1.1), (-15.0, -12.0, -13.0))


def ras_points(shape, affine) -> np.ndarray:
    """RAS mm position of every voxel: ``(*shape, 3)``."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def smooth_intensity(points: np.ndarray) -> np.ndarray:
    """A smooth function of physical position (mm)."""
    return (np.sin(points[..., 0] / 4.0) + np.cos(points[..., 1] / 5.0 + 0.5) * np.sin(points[..., 2] / 6.0)
            + np.exp(-np.sum((points - [2.0, -1.0, 3.0]) ** 2, axis=-1) / 40.0))


def physical_labels(points: np.ndarray) -> np.ndarray:
    """Labels 0..7 defined in physical space (mm)."""
    ball = np.linalg.norm(points - [1.0, 2.0, -1.0], axis=-1) < 7.0
    return ((points[..., 0] > 1.0) + 2 * ball + 4 * (points[..., 2] > 3.0)).astype(np.uint8)


def smooth_field(shape=FIXED_SHAPE, amplitude: float = 1.5) -> np.ndarray:
    """A smooth field ``(X, Y, Z, 3)`` in fixed voxels."""
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return np.stack([amplitude * np.sin(x[..., 1] / 5.0 + 0.3), amplitude * np.cos(x[..., 2] / 6.0) * 0.8,
                     amplitude * np.sin(x[..., 0] / 4.0 + x[..., 1] / 9.0)], axis=-1).astype(np.float32)


def save_itk(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``(I, J, K)`` on ``affine`` with SimpleITK (LPS geometry built here), e.g. as .mha."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    matrix = LPS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple((matrix / spacing).ravel()))
    image.SetOrigin(tuple(LPS @ affine[:3, 3]))
    sitk.WriteImage(image, str(path))
    return path


def itk_warp(moving_path: Path, fixed_path: Path, field: np.ndarray, interpolator) -> np.ndarray:
    """SimpleITK's ``m(p + d(p))`` on the fixed grid, ``d`` the field in LPS mm; ``(X, Y, Z)`` float64."""
    fixed, moving = sitk.ReadImage(str(fixed_path)), sitk.ReadImage(str(moving_path))
    vectors = field.astype(np.float64) @ (LPS @ FIXED_AFFINE[:3, :3]).T
    displacement = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(vectors, (2, 1, 0, 3))), isVector=True)
    displacement.CopyInformation(fixed)
    transform = sitk.DisplacementFieldTransform(displacement)
    warped = sitk.Resample(moving, fixed, transform, interpolator, 0.0, sitk.sitkFloat64)
    return np.transpose(sitk.GetArrayFromImage(warped), (2, 1, 0))


def inside_moving_grid(field: np.ndarray, margin: float) -> np.ndarray:
    """Fixed voxels whose sampled point lies inside the moving grid by ``margin`` voxels (hand-built affines)."""
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in FIXED_SHAPE], indexing="ij"), axis=-1)
    matrix = np.linalg.inv(MOVING_AFFINE) @ FIXED_AFFINE
    coords = (index + field) @ matrix[:3, :3].T + matrix[:3, 3]
    return np.all((coords >= margin) & (coords <= np.array(MOVING_SHAPE) - 1 - margin), axis=-1)


@pytest.fixture()
def pair(tmp_path: Path) -> dict[str, Path]:
    """A fixed grid, and a moving image and label map on their own rotated grid of another shape."""
    moving_points = ras_points(MOVING_SHAPE, MOVING_AFFINE)
    fixed_points = ras_points(FIXED_SHAPE, FIXED_AFFINE)
    nib.save(nib.Nifti1Image(smooth_field(), FIXED_AFFINE), str(tmp_path / "field.nii.gz"))
    return {
        "fixed": save_itk(tmp_path / "fixed.mha", smooth_intensity(fixed_points).astype(np.float32), FIXED_AFFINE),
        "fixed_labels": save_itk(tmp_path / "fixed_labels.mha", physical_labels(fixed_points), FIXED_AFFINE),
        "moving": save_itk(tmp_path / "moving.mha", smooth_intensity(moving_points).astype(np.float32), MOVING_AFFINE),
        "moving_labels": save_itk(tmp_path / "moving_labels.mha", physical_labels(moving_points), MOVING_AFFINE),
        "field": tmp_path / "field.nii.gz",
    }


def test_apply_samples_a_moving_image_on_its_own_grid_like_simpleitk(pair, tmp_path, monkeypatch, capsys) -> None:
    field = smooth_field()
    inside = inside_moving_grid(field, margin=0.01)
    assert inside.mean() > 0.5
    out = tmp_path / "warped.nii.gz"
    code, stdout, stderr = run(monkeypatch, capsys, "apply", "--field", pair["field"], "--moving", pair["moving"],
                               "--fixed", pair["fixed"], "-o", out)
    assert code == 0 and "through physical space" in stdout and "through physical space" in stderr
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, FIXED_AFFINE, atol=1e-5)
    expected = itk_warp(pair["moving"], pair["fixed"], field, sitk.sitkLinear)
    np.testing.assert_allclose(np.asanyarray(written.dataobj)[inside], expected[inside], atol=1e-5)

    labels_out = tmp_path / "warped_labels.nii.gz"
    code, _, _ = run(monkeypatch, capsys, "apply", "--field", pair["field"], "--moving", pair["moving_labels"],
                     "--fixed", pair["fixed"], "-o", labels_out, "--labels", "--label-method", "nearest")
    assert code == 0
    expected = itk_warp(pair["moving_labels"], pair["fixed"], field, sitk.sitkNearestNeighbor)
    inside = inside_moving_grid(field, margin=0.6)
    mismatch = np.asanyarray(nib.load(str(labels_out)).dataobj)[inside] != expected[inside]
    assert mismatch.mean() < 1e-3  # only exact nearest-neighbour ties, float32 vs float64 coordinates


def test_evaluate_scores_labels_on_a_rotated_grid_like_simpleitk(pair, tmp_path, monkeypatch, capsys) -> None:
    field = smooth_field()
    out = tmp_path / "scores.json"
    code, stdout, _ = run(monkeypatch, capsys, "evaluate", "--field", pair["field"], "--fixed-labels",
                          pair["fixed_labels"], "--moving-labels", pair["moving_labels"], "--no-hd95", "-o", out)
    assert code == 0 and "through physical space" in stdout
    case = json.loads(out.read_text())["cases"]["field"]
    assert case["label_sampling"] == "physical space"
    fixed = physical_labels(ras_points(FIXED_SHAPE, FIXED_AFFINE))
    warped = itk_warp(pair["moving_labels"], pair["fixed"], field, sitk.sitkNearestNeighbor).astype(np.uint8)
    for label in range(1, 8):
        a, b = fixed == label, warped == label
        if a.any():
            assert case["dice_per_label"][str(label)] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()),
                                                                       abs=2e-3)


def shifted_copy(labels: np.ndarray, affine: np.ndarray, shift, shape) -> tuple[np.ndarray, np.ndarray]:
    """The same physical labels on a grid whose voxel ``i`` is voxel ``i + shift`` of the original, of ``shape``."""
    shift = np.asarray(shift)
    out = np.zeros(shape, labels.dtype)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1) + shift
    valid = np.all((index >= 0) & (index < np.array(labels.shape)), axis=-1)
    out[valid] = labels[tuple(index[valid].T)]
    moved = affine.copy()
    moved[:3, 3] += affine[:3, :3] @ shift
    return out, moved


def interior_labels(shape, seed: int) -> np.ndarray:
    """Labels 1..3 (boxes and a ball, randomly placed) at least 6 voxels from every face."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    for label in (1, 2):
        low = rng.integers(6, 9, size=3)
        high = np.array(shape) - rng.integers(6, 12, size=3)
        labels[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = label
    labels[np.linalg.norm(index - (np.array(shape) / 2 + rng.uniform(-1, 1, 3)), axis=-1) < 3.5] = 3
    return labels


@pytest.mark.parametrize("shift, shape", [((3, -2, 1), FIXED_SHAPE), ((-4, 0, 2), (30, 22, 17))],
                         ids=["shifted-affine", "other-shape"])
def test_evaluate_gives_the_same_dice_for_the_same_labels_on_another_grid(tmp_path, monkeypatch, capsys, shift,
                                                                          shape) -> None:
    fixed_path, moving_path = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(interior_labels(FIXED_SHAPE, 0), FIXED_AFFINE), str(fixed_path))
    labels = interior_labels(FIXED_SHAPE, 1)
    nib.save(nib.Nifti1Image(labels, FIXED_AFFINE), str(moving_path))
    field_path = save_field(tmp_path / "field.npz", smooth_field(amplitude=1.2))
    elsewhere, affine = shifted_copy(labels, FIXED_AFFINE, shift, shape)
    assert np.array_equal(np.bincount(elsewhere.ravel())[1:], np.bincount(labels.ravel())[1:])  # nothing cut off
    nib.save(nib.Nifti1Image(elsewhere, affine), str(tmp_path / "elsewhere.nii.gz"))

    scores = []
    for path in (moving_path, tmp_path / "elsewhere.nii.gz"):
        out = tmp_path / "scores.json"
        code, stdout, _ = run(monkeypatch, capsys, "evaluate", "--field", field_path, "--fixed-labels", fixed_path,
                              "--moving-labels", path, "-o", out)
        assert code == 0
        scores.append(json.loads(out.read_text())["cases"]["field"])
    assert scores[0]["label_sampling"] == "voxel (official)"
    assert scores[1]["label_sampling"] == "physical space" and "through physical space" in stdout
    assert scores[0]["dice_per_label"] == scores[1]["dice_per_label"]
    assert scores[0]["hd95_per_label"] == scores[1]["hd95_per_label"]
    assert 0.2 < scores[0]["dice"] < 0.95  # a real test: the labels overlap only in part


def test_dataset_mode_keeps_the_official_rule_and_warns_when_affines_differ(tmp_path, monkeypatch, capsys) -> None:
    root = write_unpaired(tmp_path / "unp")
    fields = tmp_path / "fields"
    save_field(fields / "disp_0001_0002.nii.gz", smooth_field(L2R_SHAPE, amplitude=1.2))
    args = ("evaluate", "--dataset", root, "--displacements", fields, "--no-hd95", "-o", tmp_path / "m.json")
    code, _, stderr = run(monkeypatch, capsys, *args)
    assert code == 0 and "warning" not in stderr
    official = json.loads((tmp_path / "m.json").read_text())["cases"]["0001_0000<--0002_0000"]
    for folder in ("imagesTr", "labelsTr"):  # the same arrays, 5 mm away
        path = root / folder / "UNP_0002_0000.nii.gz"
        image = nib.load(str(path))
        moved = image.affine.copy()
        moved[0, 3] += 5.0
        nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), moved), str(path))
    code, _, stderr = run(monkeypatch, capsys, *args)
    case = json.loads((tmp_path / "m.json").read_text())["cases"]["0001_0000<--0002_0000"]
    assert code == 0 and "another grid" in stderr and "official voxel rule" in stderr
    assert case["dice_per_label"] == official["dice_per_label"] and case["label_sampling"] == "voxel (official)"
    assert any("5 mm apart" in w for w in case["warnings"])


@pytest.mark.parametrize(
    "command, message",
    [
        (("evaluate", "--field", "{tmp}/small.npz", "--fixed-labels", "{tmp}/labels.nii.gz", "--moving-labels",
          "{tmp}/labels.nii.gz"), ["(10, 9, 8)", "(20, 18, 16)", "small.npz"]),
        (("evaluate", "--field", "{tmp}/zero.npz", "--fixed-labels", "{tmp}/labels.nii.gz", "--moving-labels",
          "{tmp}/labels.nii.gz", "--fixed-image", "{tmp}/small.nii.gz"), ["(10, 9, 8)", "(20, 18, 16)"]),
        (("apply", "--field", "{tmp}/zero.npz", "--moving", "{tmp}/small.nii.gz", "-o", "{tmp}/out/w.nii.gz"),
         ["(10, 9, 8)", "(20, 18, 16)", "no fixed grid"]),
        (("apply", "--field", "{tmp}/identity.nii.gz", "--moving", "{tmp}/small.nii.gz", "-o", "{tmp}/out/w.nii.gz"),
         ["(10, 9, 8)", "(20, 18, 16)", "no fixed grid"]),
        (("apply", "--field", "{tmp}/zero.npz", "--moving", "{tmp}/labels.nii.gz", "--fixed", "{tmp}/small.nii.gz",
          "-o", "{tmp}/out/w.nii.gz"), ["(10, 9, 8)", "(20, 18, 16)", "zero.npz"]),
    ],
    ids=["evaluate-field-vs-labels", "evaluate-fixed-files-disagree", "apply-no-grid", "apply-identity-header",
         "apply-field-vs-fixed"],
)
def test_a_field_that_fits_no_grid_is_an_error_naming_the_shapes(tmp_path, monkeypatch, capsys, command,
                                                                  message) -> None:
    shape = (20, 18, 16)
    save_field(tmp_path / "zero.npz", np.zeros(shape + (3,), np.float32))
    save_field(tmp_path / "small.npz", np.zeros((10, 9, 8, 3), np.float32))
    nib.save(nib.Nifti1Image(np.zeros(shape + (3,), np.float32), np.eye(4)), str(tmp_path / "identity.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), np.diag([1.5, 1, 2, 1])), str(tmp_path / "labels.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((10, 9, 8), np.float32), np.diag([3.0, 2, 4, 1])), str(tmp_path / "small.nii.gz"))
    (tmp_path / "out").mkdir()
    code, stdout, stderr = run(monkeypatch, capsys, *(str(a).format(tmp=tmp_path) for a in command))
    assert code == 2 and stderr.startswith("error:")
    assert all(part in stderr for part in message), stderr
    assert "Dice" not in stdout and list((tmp_path / "out").iterdir()) == []


def test_register_warped_equals_apply_on_the_original_moving_image(pair, tmp_path) -> None:
    field, warped, applied = tmp_path / "disp.nii.gz", tmp_path / "warped.nii.gz", tmp_path / "applied.nii.gz"
    result = runner.invoke(app, ["register", "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]),
                                 "-o", str(field), "--warped", str(warped), "--model", "none", "--io-iters", "5",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert np.abs(nib.load(str(field)).get_fdata()).max() > 0.01  # the field is not zero
    result = runner.invoke(app, ["apply", "--field", str(field), "--moving", str(pair["moving"]), "-o", str(applied)])
    assert result.exit_code == 0, result.output
    moving = sitk.GetArrayFromImage(sitk.ReadImage(str(pair["moving"])))
    intensity_range = float(moving.max() - moving.min())
    difference = np.abs(nib.load(str(warped)).get_fdata() - nib.load(str(applied)).get_fdata()).max()
    assert difference <= 1e-4 * intensity_range


def test_coarse_voxel_map_agrees_with_area_averaged_grids():
    """A ramp that is linear in moving voxels stays linear under area averaging (cell centres), so sampling the coarse
    moving image through the coarse map must give the fine ramp at the fine position of each coarse fixed voxel."""
    from rwcnet.geometry import resize_volume
    from rwcnet.geometry.grids import coarse_voxel_map, voxel_map

    fixed_affine = np.diag([1.2, 1.0, 0.8, 1.0])
    moving_affine = np.array([[0.0, 1.5, 0.0, 3.0], [1.1, 0.0, 0.0, -2.0], [0.0, 0.0, 1.3, 1.0], [0, 0, 0, 1.0]])
    mapping = voxel_map(fixed_affine, moving_affine, np.array([[1, 0.1, 0, 2], [0, 1, 0, -1], [0, 0, 0.9, 0.5], [0, 0, 0, 1.0]]))
    fixed_shape, fixed_coarse, moving_shape, moving_coarse = (24, 20, 16), (6, 5, 4), (32, 28, 24), (8, 7, 6)
    weights = np.array([0.3, -0.2, 0.5])
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in moving_shape], indexing="ij"))
    ramp = torch.from_numpy(np.tensordot(weights, grid, axes=1))[None, None]
    coarse_ramp = resize_volume(ramp, moving_coarse)[0, 0].numpy()
    coarse = coarse_voxel_map(mapping, fixed_shape, fixed_coarse, moving_shape, moving_coarse)
    scale = np.array(fixed_shape) / np.array(fixed_coarse)
    for index in [(0, 0, 0), (5, 4, 3), (2, 3, 1), (4, 0, 2)]:
        fine_point = mapping[:, :3] @ (scale * (np.array(index) + 0.5) - 0.5) + mapping[:, 3]
        coarse_point = coarse[:, :3] @ np.array(index, dtype=np.float64) + coarse[:, 3]
        # the coarse ramp is linear too; evaluate it at the coarse point from its own samples
        slope = np.array([coarse_ramp[1, 0, 0] - coarse_ramp[0, 0, 0], coarse_ramp[0, 1, 0] - coarse_ramp[0, 0, 0],
                          coarse_ramp[0, 0, 1] - coarse_ramp[0, 0, 0]])
        assert coarse_ramp[0, 0, 0] + slope @ coarse_point == pytest.approx(weights @ fine_point, abs=1e-9)


def test_voxel_map_is_the_fixed_to_moving_voxel_transform():
    from rwcnet.geometry.grids import voxel_map

    fixed_affine, moving_affine = np.diag([2.0, 1.0, 1.0, 1.0]), np.diag([1.0, 1.0, 0.5, 1.0])
    moving_affine[:3, 3] = [1.0, 0.0, 0.0]
    shift = np.eye(4)
    shift[:3, 3] = [0.0, 2.0, 0.0]
    point = np.array([3.0, 4.0, 5.0, 1.0])
    expected = np.linalg.solve(moving_affine, shift @ fixed_affine @ point)[:3]
    np.testing.assert_allclose(voxel_map(fixed_affine, moving_affine, shift) @ point, expected)
