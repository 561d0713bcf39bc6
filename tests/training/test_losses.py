"""Losses against independent computations: numpy, brute-force windows, scipy sampling, closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from rwcnet.geometry import identity_grid, warp
from rwcnet.losses import (
    LOSS_PRESETS,
    LossConfig,
    dice_loss,
    feature_ssd,
    gradient_regulariser,
    local_ncc,
    loss_config,
    mind_ssd,
    mse,
    sequence_loss,
    sequence_weights,
    total_loss,
    tre_loss,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _volume(shape=(10, 9, 8), seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.from_numpy(_rng(seed).random((1, 1, *shape))).to(dtype)


def _brute_ncc_map(a: np.ndarray, b: np.ndarray, window: int, eps: float) -> np.ndarray:
    """Per-voxel NCC over the window clipped to the volume, by explicit loops."""
    half = window // 2
    out = np.zeros_like(a)
    for i, j, k in np.ndindex(a.shape):
        sl = tuple(slice(max(c - half, 0), c + half + 1) for c in (i, j, k))
        wa, wb = a[sl], b[sl]
        cov = np.mean(wa * wb) - wa.mean() * wb.mean()
        out[i, j, k] = cov / np.sqrt((wa.var() + eps) * (wb.var() + eps))
    return out


def test_mse_against_numpy_with_and_without_mask():
    a, b = _volume(seed=1), _volume(seed=2)
    mask = torch.from_numpy(_rng(3).random((1, 1, 10, 9, 8)) > 0.5)
    diff = (a - b).numpy() ** 2
    assert mse(a, b).item() == pytest.approx(diff.mean(), rel=1e-12)
    assert mse(a, b, mask).item() == pytest.approx(diff[mask.numpy()].mean(), rel=1e-12)


@pytest.mark.parametrize("window", [3, 5])
def test_local_ncc_matches_brute_force_windows(window):
    a, b = _volume((7, 6, 5), seed=4), _volume((7, 6, 5), seed=5)
    b = 0.5 * a + b  # partially correlated
    expected = 1.0 - _brute_ncc_map(a[0, 0].numpy(), b[0, 0].numpy(), window, 1e-5).mean()
    assert local_ncc(a, b, window).item() == pytest.approx(expected, abs=1e-10)


def test_local_ncc_perfect_for_self_and_affine_intensity_copy():
    a = _volume((12, 11, 10), seed=6)
    assert local_ncc(a, a, 5).item() == pytest.approx(0.0, abs=1e-3)
    assert local_ncc(a, 2.5 * a + 0.7, 5).item() == pytest.approx(0.0, abs=1e-3)
    assert local_ncc(a, -a, 5).item() == pytest.approx(2.0, abs=1e-3)
    assert local_ncc(a, _volume((12, 11, 10), seed=7), 5).item() > 0.5


def test_local_ncc_is_differentiable_and_rejects_even_window():
    a = _volume((5, 5, 4), seed=8).requires_grad_(True)
    b = _volume((5, 5, 4), seed=9)
    (grad,) = torch.autograd.grad(local_ncc(a, b, 3), a)
    step = 1e-6
    for index in [(0, 0, 0, 0, 0), (0, 0, 2, 3, 1), (0, 0, 4, 4, 3)]:
        plus, minus = a.detach().clone(), a.detach().clone()
        plus[index] += step
        minus[index] -= step
        numeric = (local_ncc(plus, b, 3) - local_ncc(minus, b, 3)).item() / (2 * step)
        assert grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    with pytest.raises(ValueError, match="odd"):
        local_ncc(a, b, 4)


def test_mind_ssd_invariance_and_gradient():
    a = _volume((12, 12, 12), seed=10, dtype=torch.float32)
    b = _volume((12, 12, 12), seed=11, dtype=torch.float32)
    assert mind_ssd(a, a).item() == pytest.approx(0.0, abs=1e-10)
    assert mind_ssd(3.0 * a + 1.0, a).item() == pytest.approx(0.0, abs=1e-5)
    warped = a.clone().requires_grad_(True)
    loss = mind_ssd(warped, b)
    loss.backward()
    assert loss.item() > 0.01 and warped.grad.abs().sum() > 0


def test_feature_ssd_sums_channels():
    a = torch.from_numpy(_rng(12).random((2, 12, 4, 4, 4)))
    b = torch.from_numpy(_rng(13).random((2, 12, 4, 4, 4)))
    expected = ((a - b).numpy() ** 2).sum(axis=1).mean()
    assert feature_ssd(a, b).item() == pytest.approx(expected, rel=1e-12)


def _blocks(shape=(12, 12, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    """Two label maps with labels 1 and 2 of known overlap (label 3 only in the moving map)."""
    moving = torch.zeros((1, 1, *shape), dtype=torch.int64)
    fixed = torch.zeros_like(moving)
    moving[..., 0:6, 0:6, 0:6] = 1  # 216 voxels
    fixed[..., 3:9, 0:6, 0:6] = 1  # 216 voxels, 108 shared
    moving[..., 8:12, 8:12, 8:12] = 2  # 64 voxels
    fixed[..., 8:12, 8:12, 10:12] = 2  # 32 voxels, all shared
    moving[..., 0:2, 10:12, 0:2] = 3
    return moving, fixed


def test_dice_loss_closed_forms():
    moving, fixed = _blocks()
    zero = torch.zeros((1, 3, 12, 12, 12), dtype=torch.float64)
    assert dice_loss(fixed, fixed, zero).item() == pytest.approx(0.0, abs=1e-12)
    expected = 1.0 - (2 * 108 / 432 + 2 * 32 / 96) / 2  # label 3 is absent from the fixed map
    assert dice_loss(moving, fixed, zero).item() == pytest.approx(expected, abs=1e-12)
    assert dice_loss(moving, fixed, zero, labels=[1]).item() == pytest.approx(0.5, abs=1e-12)
    disjoint = torch.zeros_like(fixed)
    disjoint[..., 6:12, 6:12, 0:6] = 1
    assert dice_loss(moving, disjoint, zero).item() == pytest.approx(1.0, abs=1e-12)


def test_dice_loss_integer_shift_matches_nearest_and_gradients():
    moving, fixed = _blocks()
    field = torch.zeros((1, 3, 12, 12, 12), dtype=torch.float64)
    field[:, 0] = -3.0  # warped(x) = moving(x - 3), border repeated
    shifted = warp(moving.double(), field, mode="nearest").long()
    loss = dice_loss(moving, fixed, field)
    assert loss.item() == pytest.approx(dice_loss(shifted, fixed, torch.zeros_like(field)).item(), abs=1e-12)
    assert dice_loss(moving, fixed, field, reference_compat=True).item() == pytest.approx(loss.item(), abs=1e-12)

    noisy = (0.3 * torch.from_numpy(_rng(14).standard_normal((1, 3, 12, 12, 12)))).requires_grad_(True)
    (grad,) = torch.autograd.grad(dice_loss(moving, fixed, noisy), noisy)
    assert grad.abs().sum() > 0
    (grad_ref,) = torch.autograd.grad(dice_loss(moving, fixed, noisy, reference_compat=True), noisy, allow_unused=True)
    assert grad_ref is None or grad_ref.abs().sum() == 0


def test_dice_loss_chunked_checkpoint_equals_single_pass():
    moving, fixed = _blocks()
    base = 0.3 * torch.from_numpy(_rng(15).standard_normal((1, 3, 12, 12, 12)))
    one = base.clone().requires_grad_(True)
    many = base.clone().requires_grad_(True)
    loss_one = dice_loss(moving, fixed, one)
    loss_many = dice_loss(moving, fixed, many, chunk=1)
    loss_one.backward()
    loss_many.backward()
    assert loss_many.item() == pytest.approx(loss_one.item(), abs=1e-12)
    torch.testing.assert_close(many.grad, one.grad)


def test_dice_loss_batch_means_over_samples_with_labels():
    moving, fixed = _blocks()
    moving2 = torch.cat([moving, torch.zeros_like(moving)])  # second sample has no label in common
    fixed2 = torch.cat([fixed, fixed])
    zero = torch.zeros((2, 3, 12, 12, 12), dtype=torch.float64)
    assert dice_loss(moving2, fixed2, zero).item() == pytest.approx(dice_loss(moving, fixed, zero[:1]).item(), abs=1e-12)
    assert dice_loss(torch.zeros_like(fixed), fixed, zero[:1]).item() == 0.0


def test_tre_of_translation_and_against_scipy_trilinear():
    spacing = (1.5, 2.0, 0.5)
    shift = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    field = shift.view(1, 3, 1, 1, 1).expand(1, 3, 8, 9, 10).clone()
    points = torch.from_numpy(_rng(16).random((1, 20, 3)) * 7)
    expected = float(np.linalg.norm(shift.numpy() * np.array(spacing)))
    assert tre_loss(field, points, points, spacing).item() == pytest.approx(expected, rel=1e-12)
    assert tre_loss(field, points, points + shift, spacing).item() == pytest.approx(0.0, abs=1e-12)
    assert tre_loss(field, points, points, spacing, scale=4.0).item() == pytest.approx(4 * expected, rel=1e-12)

    random_field = torch.from_numpy(_rng(17).standard_normal((1, 3, 8, 9, 10)))
    moving_points = torch.from_numpy(_rng(18).random((1, 20, 3)) * 7)
    u = np.stack([map_coordinates(random_field[0, c].numpy(), points[0].numpy().T, order=1) for c in range(3)], axis=1)
    residual = (points[0].numpy() + u - moving_points[0].numpy()) * np.array(spacing)
    assert tre_loss(random_field, points, moving_points, spacing).item() == pytest.approx(
        np.linalg.norm(residual, axis=1).mean(), rel=1e-10
    )


def test_gradient_regulariser_linear_and_constant_fields():
    gradient = torch.from_numpy(_rng(19).standard_normal((3, 3)))
    coords = identity_grid((6, 7, 8), dtype=torch.float64)
    linear = torch.einsum("ca,baxyz->bcxyz", gradient, coords) + 5.0
    assert gradient_regulariser(linear, "l1").item() == pytest.approx(gradient.abs().sum().item() / 9, rel=1e-12)
    assert gradient_regulariser(linear, "l2").item() == pytest.approx((gradient**2).sum().item() / 9, rel=1e-12)
    constant = torch.full((1, 3, 6, 7, 8), 2.5, dtype=torch.float64)
    assert gradient_regulariser(constant, "l1").item() == 0.0
    with pytest.raises(ValueError):
        gradient_regulariser(constant, "l3")


def test_sequence_weights_and_loss():
    assert sequence_weights(3, 0.8) == pytest.approx([0.64, 0.8, 1.0])
    losses = [torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.5)]
    assert sequence_loss(losses, 0.5).item() == pytest.approx(0.25 * 2 + 0.5 * 1 + 0.5)
    with pytest.raises(ValueError):
        sequence_loss([])


def test_presets_and_config_overrides():
    assert LossConfig() == LOSS_PRESETS["oasis"]
    nlst = loss_config("nlst")
    assert (nlst.mse, nlst.tre, nlst.dice, nlst.regulariser, nlst.regulariser_kind) == (10.0, 1.0, 0.0, 0.1, "l1")
    assert loss_config("oasis", sequence_gamma=0.8).sequence_gamma == 0.8
    with pytest.raises(ValueError):
        loss_config("nope")
    with pytest.raises(ValueError, match="odd"):
        LossConfig(ncc_window=4)


def test_total_loss_warps_moving_and_skips_or_raises():
    shape = (12, 12, 12)
    fixed = _volume(shape, seed=20)
    moving = torch.roll(fixed, shifts=2, dims=2)  # moving(x) = fixed(x - 2): field +2 along axis 0 undoes it
    field = torch.zeros((1, 3, *shape), dtype=torch.float64)
    field[:, 0] = 2.0
    interior = torch.zeros_like(fixed)
    interior[..., 0:10, :, :] = 1.0
    config = LossConfig(dice=0.0)
    loss, terms = total_loss(config, fixed=fixed, moving=moving, field=field, mask=interior)
    assert terms["mse"] == pytest.approx(0.0, abs=1e-20) and terms["regulariser"] == 0.0
    assert set(terms) == {"mse", "regulariser", "total"} and loss.item() == pytest.approx(0.0, abs=1e-20)

    with pytest.raises(ValueError, match="dice.*fixed_labels, moving_labels"):
        total_loss(LOSS_PRESETS["oasis"], fixed=fixed, moving=moving, field=field)
    with pytest.raises(ValueError, match="tre.*spacing"):
        points = torch.zeros((1, 4, 3), dtype=torch.float64)
        total_loss(LOSS_PRESETS["nlst"], fixed=fixed, moving=moving, field=field, fixed_keypoints=points, moving_keypoints=points)


def test_total_loss_weighted_sum_and_sequence():
    moving_labels, fixed_labels = _blocks()
    fixed = fixed_labels.double() / 3
    moving = moving_labels.double() / 3
    fields = [(0.2 * k * torch.from_numpy(_rng(21).standard_normal((1, 3, 12, 12, 12)))).requires_grad_(True) for k in (1, 2)]
    points = torch.from_numpy(_rng(22).random((1, 5, 3)) * 10)
    config = LossConfig(mse=10, ncc=0.5, ncc_window=3, mind=0.2, dice=1, tre=0.3, regulariser=0.1, regulariser_kind="l2")
    inputs = dict(fixed=fixed, moving=moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                  fixed_keypoints=points, moving_keypoints=points, spacing=(1.0, 1.0, 2.0), stage_factor=2)
    loss, terms = total_loss(config, field=fields, **inputs)
    warped = warp(moving, fields[1])
    expected = {
        "mse": mse(warped, fixed).item(),
        "ncc": local_ncc(warped, fixed, 3).item(),
        "mind": mind_ssd(warped, fixed).item(),
        "dice": dice_loss(moving_labels, fixed_labels, fields[1]).item(),
        "tre": tre_loss(fields[1], points, points, (1.0, 1.0, 2.0), scale=2).item(),
        "regulariser": gradient_regulariser(fields[1], "l2").item(),
    }
    for name, value in expected.items():
        assert terms[name] == pytest.approx(value, rel=1e-10)
    last = sum(getattr(config, name) * value for name, value in expected.items())
    assert loss.item() == pytest.approx(last, rel=1e-10)
    loss.backward()
    assert fields[0].grad is None and fields[1].grad.abs().sum() > 0

    sequence_config = loss_config(config, sequence_gamma=0.5)
    seq_loss, _ = total_loss(sequence_config, field=fields, **inputs)
    first, _ = total_loss(config, field=fields[0], **inputs)
    assert seq_loss.item() == pytest.approx(0.5 * first.item() + last, rel=1e-10)
