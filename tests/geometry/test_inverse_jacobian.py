"""Field inversion and the Jacobian of the whole transform, against hand-made fields with known answers and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwcnet import geometry

from rwcnet.evaluation import metrics
from rwcnet.synthetic import random_deformation

SHAPE = (40, 36, 32)


def _rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    skew = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * skew + (1 - np.cos(angle)) * skew @ skew


def _inner(shape, margin: int) -> tuple:
    return (0,) + tuple(slice(margin, n - margin) for n in shape)


def _check_errors(errors: torch.Tensor) -> None:
    values = errors.flatten().double().numpy()
    assert np.median(values) < 0.1 and np.quantile(values, 0.95) < 0.5, (np.median(values), np.quantile(values, 0.95))


def test_inverse_of_a_smooth_field_holds_in_both_directions():
    field = random_deformation(SHAPE, (1.0, 1.0, 1.0), magnitude_mm=4.0, smoothness_mm=10.0, seed=3).double()
    inverse = geometry.invert_field(field)
    assert inverse.max_residual < 1e-2 and inverse.iterations < 100
    # fixed side: u(x) + v(x + u(x)), where x + u(x) stays inside the grid
    forward = geometry.compose(field, inverse.field)
    reach = geometry.identity_grid(SHAPE, dtype=torch.float64) + field
    inside = ((reach >= 0) & (reach <= torch.tensor(SHAPE).view(1, 3, 1, 1, 1) - 1)).all(dim=1)
    _check_errors(forward.norm(dim=1)[inside])
    # moving side: v(y) + u(y + v(y)), where the inverse is defined
    backward = geometry.compose(inverse.field, field).norm(dim=1)
    _check_errors(backward[~inverse.undefined])
    assert inverse.undefined_fraction < 0.15


def test_inverse_flags_points_whose_preimage_is_outside_the_grid():
    field = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    field[:, 0] = 5.0  # x -> x + 5 along axis 0: moving slices 0..4 have no preimage
    inverse = geometry.invert_field(field)
    torch.testing.assert_close(inverse.field, -field)
    assert inverse.undefined_fraction == pytest.approx(5 / SHAPE[0])
    assert bool(inverse.undefined[0, :5].all()) and not bool(inverse.undefined[0, 5:].any())


def test_inverse_flags_a_folded_region():
    shape = (24, 24, 24)
    coords = geometry.identity_grid(shape, dtype=torch.float64)
    centre = torch.tensor(shape, dtype=torch.float64).view(1, 3, 1, 1, 1) / 2
    bump = torch.exp(-((coords - centre) ** 2).sum(dim=1, keepdim=True) / (2 * 4.0**2))
    field = torch.zeros_like(coords)
    field[:, 0:1] = 12.0 * bump  # slope up to 12 * 0.6 / 4 > 1 along axis 0: the transform folds
    assert float(geometry.jacobian_determinant(field).min()) < 0
    inverse = geometry.invert_field(field, iterations=30)
    assert inverse.iterations == 30 and inverse.undefined_fraction > 0.001
    assert float(inverse.residual[~inverse.undefined].max()) < 0.5


def test_inverse_on_the_moving_grid_maps_moving_voxels_back_through_physical_space():
    fixed_affine = np.diag([1.2, 1.0, 1.5, 1.0])
    fixed_affine[:3, 3] = [-20.0, -15.0, -25.0]
    moving_affine = np.eye(4)
    moving_affine[:3, :3] = _rotation([1, 2, 3], 10.0) @ np.diag([1.0, 1.3, 1.1])
    moving_affine[:3, 3] = [-18.0, -22.0, -20.0]
    moving_shape = (38, 34, 40)
    field = random_deformation(SHAPE, (1.2, 1.0, 1.5), magnitude_mm=3.0, smoothness_mm=12.0, seed=5).double()
    inverse = geometry.invert_field_on_moving_grid(field, torch.from_numpy(fixed_affine),
                                                   torch.from_numpy(moving_affine), moving_shape)
    # fixed voxel x -> moving voxel y = A_mov^-1 A_fix (x + u(x)) -> fixed voxel A_fix^-1 A_mov (y + v(y)) == x
    points = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(4, n - 4, 3.0) for n in SHAPE], indexing="ij"), -1)
                              .reshape(1, -1, 3))
    moved = (points + geometry.sample_field(field, points))[0].numpy()
    to_moving = np.linalg.inv(moving_affine) @ fixed_affine
    y = moved @ to_moving[:3, :3].T + to_moving[:3, 3]
    inside = np.all((y >= 0) & (y <= np.array(moving_shape) - 1), axis=1)
    y = torch.from_numpy(y[inside])[None]
    back = (y + geometry.sample_field(inverse.field, y))[0].numpy()
    to_fixed = np.linalg.inv(to_moving)
    recovered = back @ to_fixed[:3, :3].T + to_fixed[:3, 3]
    errors = np.linalg.norm(recovered - points[0].numpy()[inside], axis=1)
    assert inside.mean() > 0.5
    assert np.median(errors) < 0.1 and np.quantile(errors, 0.95) < 0.5


def test_jacobian_of_a_linear_field_is_its_determinant_everywhere():
    matrix = _rotation([1, -1, 2], 20.0) @ np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.05], [0.0, 0.0, 1.1]])
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)
    field = coords @ (matrix - np.eye(3)).T + np.array([3.0, -2.0, 1.0])
    det, stats = metrics.jacobian_statistics(field)
    assert det.dtype == np.float32 and det.shape == SHAPE  # full grid, not cropped
    np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-5)
    assert stats["min"] == pytest.approx(np.linalg.det(matrix), rel=1e-5)
    assert stats["std_log_det"] < 1e-5 and stats["folded_fraction"] == 0.0
    assert stats["sdlogj"] < 1e-6


def test_jacobian_statistics_of_a_quadratic_field_match_numpy_gradient():
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)
    field = np.zeros(SHAPE + (3,))
    field[..., 0] = -0.04 * (coords[..., 0] - 10.0) ** 2  # d/dx0 = -0.08 (x0 - 10): det = 1 - 0.08 (x0 - 10)
    field[..., 1] = 0.02 * coords[..., 1] * coords[..., 2] / 10
    det, stats = metrics.jacobian_statistics(field)
    grads = np.stack([np.stack(np.gradient(field[..., c]), 0) for c in range(3)], 0) + np.eye(3)[:, :, None, None, None]
    reference = np.linalg.det(np.moveaxis(grads, (0, 1), (-2, -1)))
    np.testing.assert_allclose(det, reference, rtol=1e-5, atol=1e-6)
    interior = 1.0 - 0.08 * (np.arange(1, SHAPE[0] - 1) - 10.0)  # exact away from the one-sided border rows
    np.testing.assert_allclose(det[1:-1, 0, 0], interior, rtol=1e-6)
    assert stats["folded_fraction"] == pytest.approx(np.count_nonzero(reference <= 0) / reference.size)
    assert stats["folded_fraction"] > 0.3  # 1 - 0.08 (x0 - 10) <= 0 from x0 = 22.5 on
    assert stats["std_log_det"] == pytest.approx(np.log(reference[reference > 0]).std(), rel=1e-5)
    assert stats["min"] == pytest.approx(reference.min(), rel=1e-5)
    assert stats["max"] == pytest.approx(reference.max(), rel=1e-5)
    assert stats["sdlogj"] == pytest.approx(metrics.sdlogj(metrics.jacobian_det(field)))
