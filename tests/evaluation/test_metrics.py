"""Learn2Reg scores against hand-made cases with known answers and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from rwcnet.evaluation import metrics

SHAPE = (32, 30, 28)


def cube(offset=(0, 0, 0), side: int = 12, start=(8, 8, 8), shape=SHAPE) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    box = tuple(slice(s + o, s + o + side) for s, o in zip(start, offset))
    labels[box] = 1
    return labels


def constant_field(vector, shape=SHAPE) -> np.ndarray:
    return np.broadcast_to(np.asarray(vector, np.float64), shape + (3,)).copy()


def affine_field(matrix: np.ndarray, shape=SHAPE) -> np.ndarray:
    """u(x) = (A - I) x: x + u(x) is the linear map A (voxels)."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    return grid @ (matrix - np.eye(3)).T


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 3])
def test_translated_cube_dice_hd95_and_recovery(axis: int, shift: int) -> None:
    offset = [0, 0, 0]
    offset[axis] = shift
    fixed, moving = cube(), cube(tuple(offset))
    zero = metrics.score_case(constant_field([0, 0, 0]), fixed, moving, [1])
    assert zero["dice"] == pytest.approx(1 - shift / 12)  # overlap (12-s)*12^2 of 12^3 each
    assert zero["hd95"] == pytest.approx(shift)
    recovered = metrics.score_case(constant_field(offset), fixed, moving, [1])
    assert recovered["dice"] == pytest.approx(1.0)
    assert recovered["hd95"] == pytest.approx(0.0)


def test_warp_labels_nearest_is_an_integer_shift_with_zero_outside() -> None:
    labels = np.random.default_rng(0).integers(0, 5, SHAPE)
    warped = metrics.warp_labels_nearest(labels, constant_field([2, 0, -1]))
    assert warped.dtype == labels.dtype
    np.testing.assert_array_equal(warped[:-2, :, 1:], labels[2:, :, :-1])
    assert not warped[-2:].any() and not warped[:, :, 0].any()


def test_tre_of_a_translation_is_shift_times_spacing() -> None:
    rng = np.random.default_rng(1)
    fixed_kp = rng.uniform(6, 20, size=(20, 3))
    moving_kp = fixed_kp + np.array([2.0, 0.0, -1.0])
    spacing = (1.5, 2.0, 2.5)
    zero = metrics.tre(constant_field([0, 0, 0]), fixed_kp, moving_kp, spacing)
    np.testing.assert_allclose(zero, math.hypot(2 * 1.5, 1 * 2.5))
    exact = metrics.tre(constant_field([2.0, 0.0, -1.0]), fixed_kp, moving_kp, spacing)
    np.testing.assert_allclose(exact, 0.0, atol=1e-9)
    case = metrics.score_case(constant_field([0, 0, 0]), fixed_kp=fixed_kp, moving_kp=moving_kp, spacing=spacing)
    assert case["tre"] == pytest.approx(math.hypot(3.0, 2.5))
    assert len(case["tre_per_point"]) == 20


def test_affine_field_has_its_determinant_everywhere() -> None:
    matrix = np.array([[1.2, 0.1, 0.0], [0.05, 0.9, 0.2], [0.1, 0.0, 1.1]])
    det = metrics.jacobian_det(affine_field(matrix))
    assert det.shape == tuple(n - 4 for n in SHAPE)
    np.testing.assert_allclose(det, np.linalg.det(matrix), rtol=1e-12)
    assert metrics.sdlogj(det) == pytest.approx(0.0, abs=1e-12)
    assert metrics.folding_fraction(det) == 0.0


def test_reflection_folds_every_voxel_and_keeps_sdlogj_zero() -> None:
    det = metrics.jacobian_det(affine_field(np.diag([-1.0, 1.0, 1.0])))
    np.testing.assert_allclose(det, -1.0)
    assert metrics.folding_fraction(det) == 1.0
    assert metrics.sdlogj(det) == pytest.approx(0.0, abs=1e-12)  # log(-1 + 3) everywhere


def test_jacobian_and_sdlogj_match_numpy_gradient_on_a_smooth_field() -> None:
    rng = np.random.default_rng(2)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(SHAPE), 3) for _ in range(3)], axis=-1)
    field *= 4 / np.abs(field).max()
    gradients = np.stack([np.stack(np.gradient(field[..., c]), axis=-1) for c in range(3)], axis=-2)
    brute = np.linalg.det(gradients + np.eye(3))[2:-2, 2:-2, 2:-2]
    det = metrics.jacobian_det(field)
    np.testing.assert_allclose(det, brute, atol=1e-10)
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:20, 4:25, 6:18] = 1
    inside = mask[2:-2, 2:-2, 2:-2] > 0
    log_det = np.log(np.clip(brute + 3, 1e-9, 1e9))
    assert metrics.sdlogj(det) == pytest.approx(log_det.std())
    assert metrics.sdlogj(det, mask) == pytest.approx(log_det[inside].std())
    assert metrics.folding_fraction(det) == pytest.approx(np.mean(brute <= 0))


def test_labels_with_known_overlap_and_nan_rule() -> None:
    fixed = np.zeros(SHAPE, np.int32)
    moving = np.zeros(SHAPE, np.int32)
    fixed[0:10, 0:10, 0:10] = 1
    moving[5:15, 0:10, 0:10] = 1  # overlap 500 of 1000 + 1000
    fixed[20:24, 20:24, 20:24] = 2  # absent in moving: NaN
    moving[20:24, 0:4, 20:24] = 3  # absent in fixed: NaN
    fixed[26:30, 20:24, 20:24] = 4
    moving[26:30, 20:24, 20:24] = 4  # present in both, pushed out of the image: Dice 0, HD95 inf
    field = np.zeros(SHAPE + (3,))
    field[26:30, 20:24, 20:24, 0] = 100.0
    warped = metrics.warp_labels_nearest(moving, field)
    dice = metrics.dice_per_label(fixed, warped, [1, 2, 3, 4], moving)
    np.testing.assert_allclose(dice, [0.5, np.nan, np.nan, 0.0])
    hd95 = metrics.hd95_per_label(fixed, warped, [1, 2, 3, 4], moving)
    assert np.isnan(hd95[1]) and np.isnan(hd95[2]) and hd95[3] == np.inf
    assert hd95[0] == pytest.approx(5.0)
    case = metrics.score_case(field, fixed, moving, [1, 2, 3, 4], compute_hd95=False)
    assert case["dice"] == pytest.approx(0.25)
    assert math.isnan(case["dice_per_label"]["2"]) and "hd95" not in case
    all_absent = metrics.dice_per_label(fixed, warped, [7, 8])
    assert np.isnan(all_absent).all()


def test_default_labels_are_every_nonzero_value() -> None:
    fixed, moving = cube(), cube((1, 0, 0))
    moving[0, 0, 0] = 5
    case = metrics.score_case(constant_field([0, 0, 0]), fixed, moving, compute_hd95=False)
    assert set(case["dice_per_label"]) == {"1", "5"}
    assert math.isnan(case["dice_per_label"]["5"])


def test_aggregate_matches_numpy_quantiles() -> None:
    rng = np.random.default_rng(4)
    cases = [{"dice": d, "hd95": h, "sdlogj": s, "folding_fraction": f, "tre": t}
             for d, h, s, f, t in rng.random((7, 5))]
    result = metrics.aggregate(cases)
    for metric, quantile in (("dice", 0.3), ("hd95", 0.3), ("sdlogj", 0.7), ("tre", 0.7), ("folding_fraction", 0.7)):
        values = np.array([c[metric] for c in cases])
        assert result[metric]["mean"] == pytest.approx(values.mean())
        assert result[metric]["std"] == pytest.approx(values.std(ddof=0))
        assert result[metric]["30"] == pytest.approx(np.quantile(values, quantile))
        assert result[metric]["n"] == 7
    partial = metrics.aggregate([{"dice": 0.5, "tre": 1.0}, {"dice": 0.7}])
    assert set(partial) == {"dice"}
    assert metrics.aggregate([]) == {}


def test_bad_shapes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="X, Y, Z, 3"):
        metrics.jacobian_det(np.zeros((8, 8, 8, 2)))
    with pytest.raises(ValueError, match="too small"):
        metrics.jacobian_det(np.zeros((4, 8, 8, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dice_per_label(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), [1])
    with pytest.raises(ValueError, match="equal N"):
        metrics.tre(np.zeros((8, 8, 8, 3)), np.zeros((3, 3)), np.zeros((4, 3)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        metrics.score_case(np.zeros((8, 8, 8, 3)), fixed_kp=np.zeros((3, 3)), moving_kp=np.zeros((3, 3)))
