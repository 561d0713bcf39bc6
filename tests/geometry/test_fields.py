"""geometry.py against scipy, brute force and fields with a known answer (affine fields, translations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from rwcnet import geometry

DTYPES = [torch.float32, torch.float64]
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def _random_field(shape, scale, seed, dtype=torch.float64, batch=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand((batch, 3, *shape), generator=generator, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)


def _affine_field(shape, matrix, offset, dtype=torch.float64):
    """``u(x) = A x + b`` on a grid: ``(1, 3, *shape)``."""
    grid = geometry.identity_grid(shape, dtype=torch.float64)[0].reshape(3, -1)
    values = torch.as_tensor(matrix, dtype=torch.float64) @ grid + torch.as_tensor(offset, dtype=torch.float64)[:, None]
    return values.reshape(1, 3, *shape).to(dtype)


def _smooth_field(shape, amplitude, seed, dtype=torch.float64):
    """A low-frequency field: a few sinusoids per channel, ``(1, 3, *shape)``."""
    rng = np.random.default_rng(seed)
    x = np.indices(shape, dtype=np.float64)
    channels = []
    for _ in range(3):
        k = rng.uniform(0.5, 1.5, size=3) * 2 * np.pi / np.array(shape)
        phase = rng.uniform(0, 2 * np.pi)
        channels.append(amplitude * np.sin((k[:, None, None, None] * x).sum(0) + phase))
    return torch.as_tensor(np.stack(channels)[None], dtype=dtype)


def test_identity_grid_is_voxel_indices():
    grid = geometry.identity_grid((3, 4, 5), dtype=torch.float64)
    assert grid.shape == (1, 3, 3, 4, 5)
    np.testing.assert_array_equal(grid[0].numpy(), np.indices((3, 4, 5)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_warp_matches_map_coordinates_order1(dtype):
    shape = (7, 9, 11)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((2, 2, 5, 8, 9), generator=generator, dtype=torch.float64).to(dtype)  # other grid than field
    field = _random_field(shape, 3.0, seed=1, dtype=dtype, batch=2)
    warped = geometry.warp(image, field)
    assert warped.shape == (2, 2, *shape) and warped.dtype == dtype
    coords = (geometry.identity_grid(shape, dtype=torch.float64) + field.double()).numpy()
    for b in range(2):
        for c in range(2):
            expected = ndimage.map_coordinates(image[b, c].double().numpy(), coords[b], order=1, mode="nearest")
            np.testing.assert_allclose(warped[b, c].double().numpy(), expected, atol=ATOL[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_field_is_identity(dtype):
    image = torch.rand((2, 1, 6, 7, 5), dtype=torch.float64).to(dtype)
    zero = torch.zeros((2, 3, 6, 7, 5), dtype=dtype)
    torch.testing.assert_close(geometry.warp(image, zero), image, atol=ATOL[dtype], rtol=0)
    labels = torch.randint(0, 50, (2, 1, 6, 7, 5))
    assert torch.equal(geometry.warp_labels(labels, zero), labels)
    assert torch.equal(geometry.warp_labels(labels, zero, method="onehot"), labels)


def test_warp_labels_nearest_matches_map_coordinates_order0():
    shape = (9, 8, 7)
    rng = np.random.default_rng(2)
    labels = rng.choice(np.array([0, 3, 7, 42, 1000]), size=(2, 1, *shape))
    field = _random_field(shape, 2.5, seed=3, batch=2)
    warped = geometry.warp_labels(torch.as_tensor(labels), field)
    assert warped.dtype == torch.int64
    coords = (geometry.identity_grid(shape, dtype=torch.float64) + field).numpy()
    for b in range(2):
        expected = ndimage.map_coordinates(labels[b, 0], coords[b], order=0, mode="nearest")
        np.testing.assert_array_equal(warped[b, 0].numpy(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_warp_labels_nearest_half_voxel_ties_match_map_coordinates(dtype):
    labels = torch.arange(8).view(1, 1, 8, 1, 1).expand(1, 1, 8, 2, 2).contiguous()
    field = torch.zeros((1, 3, 8, 2, 2), dtype=dtype)
    field[:, 0] = 0.5
    expected = ndimage.map_coordinates(np.arange(8), [np.arange(8) + 0.5], order=0, mode="nearest")
    np.testing.assert_array_equal(geometry.warp_labels(labels, field)[0, 0, :, 0, 0].numpy(), expected)


def test_warp_labels_onehot_is_argmax_of_trilinear_indicators():
    shape = (8, 9, 10)
    rng = np.random.default_rng(4)
    values = np.array([0, 2, 5, 9])  # not contiguous
    labels = ndimage.zoom(rng.choice(values, size=(4, 4, 5)), 2, order=0)[None, None]
    field = _random_field(shape, 2.0, seed=5)
    warped = geometry.warp_labels(torch.as_tensor(labels, dtype=torch.int32), field, method="onehot")
    assert warped.dtype == torch.int32
    coords = (geometry.identity_grid(shape, dtype=torch.float64) + field)[0].numpy()
    scores = np.stack([ndimage.map_coordinates((labels[0, 0] == v).astype(np.float64), coords, order=1, mode="nearest")
                       for v in values])
    np.testing.assert_array_equal(warped[0, 0].numpy(), values[np.argmax(scores, axis=0)])


def test_warp_labels_rejects_unknown_method():
    with pytest.raises(ValueError):
        geometry.warp_labels(torch.zeros((1, 1, 3, 3, 3), dtype=torch.int64), torch.zeros((1, 3, 3, 3, 3)), method="x")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_field_and_transform_points_match_scipy(dtype):
    shape = (6, 8, 7)
    field = _random_field(shape, 2.0, seed=6, dtype=dtype, batch=2)
    rng = np.random.default_rng(7)
    points = rng.uniform(-0.5, np.array(shape) - 0.5, size=(2, 20, 3))
    sampled = geometry.sample_field(field, torch.as_tensor(points))
    moved = geometry.transform_points(torch.as_tensor(points, dtype=dtype), field)
    assert sampled.shape == (2, 20, 3)
    for b in range(2):
        expected = np.stack([ndimage.map_coordinates(field[b, c].double().numpy(), points[b].T, order=1, mode="nearest")
                             for c in range(3)], axis=1)
        np.testing.assert_allclose(sampled[b].double().numpy(), expected, atol=ATOL[dtype] * 10)
        np.testing.assert_allclose(moved[b].double().numpy(), points[b] + expected, atol=ATOL[dtype] * 100)


def test_invert_points_inverts_transform_points():
    shape = (16, 16, 16)
    field = _smooth_field(shape, 0.5, seed=8)  # |grad u| < 1: the fixed-point iteration contracts
    points = torch.as_tensor(np.random.default_rng(9).uniform(3, 12, size=(1, 30, 3)))
    moved = geometry.transform_points(points, field)
    torch.testing.assert_close(geometry.invert_points(moved, field), points, atol=1e-6, rtol=0)


def test_compose_of_affine_fields_is_exact():
    shape = (12, 13, 14)
    a = np.array([[0.05, -0.02, 0.01], [0.03, -0.04, 0.02], [0.0, 0.02, 0.06]])
    b = np.array([[-0.03, 0.01, 0.0], [0.02, 0.05, -0.01], [0.01, 0.0, -0.02]])
    offset_a, offset_b = np.array([0.3, -0.2, 0.1]), np.array([-0.1, 0.2, 0.3])
    u_old, u_new = _affine_field(shape, a, offset_a), _affine_field(shape, b, offset_b)
    x = geometry.identity_grid(shape, dtype=torch.float64)[0].reshape(3, -1).numpy()
    y = x + b @ x + offset_b[:, None]
    expected = (b @ x + offset_b[:, None] + a @ y + offset_a[:, None]).reshape(3, *shape)
    inside = np.all((y >= 0) & (y <= np.array(shape)[:, None] - 1), axis=0).reshape(shape)
    composed = geometry.compose(u_new, u_old)[0].numpy()
    assert inside.mean() > 0.5
    np.testing.assert_allclose(composed[:, inside], expected[:, inside], atol=1e-10)


def test_compose_with_the_inverse_affine_is_zero():
    shape = (12, 12, 12)
    a = np.array([[0.06, -0.03, 0.02], [0.01, -0.05, 0.03], [0.02, 0.01, 0.04]])
    centre = (np.array(shape) - 1) / 2
    u = _affine_field(shape, a, -a @ centre)  # fixes the centre, so the map stays in the grid near it
    inv = np.linalg.inv(np.eye(3) + a) - np.eye(3)
    v = _affine_field(shape, inv, -inv @ centre)
    crop = (slice(None),) + (slice(2, -2),) * 3
    np.testing.assert_allclose(geometry.compose(v, u)[0][crop].numpy(), 0.0, atol=1e-10)
    np.testing.assert_allclose(geometry.compose(u, v)[0][crop].numpy(), 0.0, atol=1e-10)


def test_compose_equals_warping_twice_for_smooth_fields():
    shape = (24, 24, 24)
    u_old, u_new = _smooth_field(shape, 1.5, seed=10), _smooth_field(shape, 1.5, seed=11)
    x = np.indices(shape) / 24.0
    image = torch.as_tensor(np.sin(2 * x[0]) * np.cos(3 * x[1]) + x[2] ** 2)[None, None]
    twice = geometry.warp(geometry.warp(image, u_old), u_new)
    once = geometry.warp(image, geometry.compose(u_new, u_old))
    crop = (0, 0) + (slice(4, -4),) * 3
    assert float((twice - once)[crop].abs().max()) < 5e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_resize_field_of_constant_field_rescales_values(dtype):
    constant = torch.tensor([1.0, -2.0, 0.5], dtype=dtype).view(1, 3, 1, 1, 1).expand(1, 3, 8, 8, 8).contiguous()
    for shape, factor in [((16, 16, 16), (2, 2, 2)), ((4, 4, 4), (0.5, 0.5, 0.5)), ((16, 8, 4), (2, 1, 0.5)),
                          ((6, 10, 8), (0.75, 1.25, 1))]:
        resized = geometry.resize_field(constant, shape)
        assert resized.shape == (1, 3, *shape)
        expected = constant[:, :, :1, :1, :1] * torch.tensor(factor, dtype=dtype).view(1, 3, 1, 1, 1)
        torch.testing.assert_close(resized, expected.expand_as(resized), atol=ATOL[dtype], rtol=0)


def test_resize_field_of_linear_field_matches_cell_centred_formula():
    slope = np.array([0.3, -0.2, 0.1])
    field = _affine_field((8, 8, 8), np.diag(slope), [0.0, 0.0, 0.0])
    # shrink by 2 (area averaging): new voxel j is old position 2j + 0.5, vectors halved
    small = geometry.resize_field(field, (4, 4, 4))[0].numpy()
    j = np.indices((4, 4, 4), dtype=np.float64)
    np.testing.assert_allclose(small, slope[:, None, None, None] * (2 * j + 0.5) / 2, atol=1e-12)
    # enlarge by 2 (trilinear): new voxel j is old position (j + 0.5) / 2 - 0.5, vectors doubled (interior)
    large = geometry.resize_field(field, (16, 16, 16))[0].numpy()
    j = np.indices((16, 16, 16), dtype=np.float64)
    expected = slope[:, None, None, None] * ((j + 0.5) / 2 - 0.5) * 2
    inner = (slice(None),) + (slice(1, -1),) * 3
    np.testing.assert_allclose(large[inner], expected[inner], atol=1e-12)


def test_resize_volume_averages_blocks_and_keeps_constants():
    volume = torch.rand((1, 2, 8, 6, 4), dtype=torch.float64)
    pooled = geometry.resize_volume(volume, (4, 3, 2)).numpy()
    blocks = volume.numpy().reshape(1, 2, 4, 2, 3, 2, 2, 2).mean(axis=(3, 5, 7))
    np.testing.assert_allclose(pooled, blocks, atol=1e-12)
    constant = torch.full((1, 1, 5, 5, 5), 3.0, dtype=torch.float64)
    np.testing.assert_allclose(geometry.resize_volume(constant, (7, 9, 6)).numpy(), 3.0, atol=1e-12)


def test_spatial_gradient_matches_numpy_gradient():
    field = _random_field((5, 6, 7), 1.0, seed=12)
    grad = geometry.spatial_gradient(field)
    assert grad.shape == (1, 3, 3, 5, 6, 7)
    for c in range(3):
        for axis, expected in enumerate(np.gradient(field[0, c].numpy())):
            np.testing.assert_allclose(grad[0, c, axis].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_jacobian_determinant_of_affine_field(dtype):
    a = np.array([[0.1, 0.2, -0.05], [-0.1, 0.3, 0.02], [0.05, 0.0, -0.2]])
    field = _affine_field((6, 7, 8), a, [1.0, -2.0, 0.5], dtype=dtype)
    det = geometry.jacobian_determinant(field)
    assert det.shape == (1, 6, 7, 8) and det.dtype == dtype
    np.testing.assert_allclose(det.double().numpy(), np.linalg.det(np.eye(3) + a), atol=ATOL[dtype] * 10)
    folding = _affine_field((6, 7, 8), np.diag([-1.5, 0.0, 0.0]), [0.0, 0.0, 0.0], dtype=dtype)
    assert float(geometry.jacobian_determinant(folding).max()) < 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_integrate_velocity_zero_and_constant(dtype):
    zero = torch.zeros((2, 3, 6, 5, 4), dtype=dtype)
    assert torch.equal(geometry.integrate_velocity(zero), zero)
    velocity = torch.tensor([1.5, -0.7, 2.25], dtype=dtype).view(1, 3, 1, 1, 1).expand(2, 3, 6, 5, 4).contiguous()
    torch.testing.assert_close(geometry.integrate_velocity(velocity), velocity, atol=ATOL[dtype] * 10, rtol=0)


def test_integrate_velocity_of_smooth_field_is_invertible():
    velocity = _smooth_field((20, 20, 20), 1.5, seed=13)
    assert float(geometry.jacobian_determinant(velocity).min()) < 0  # the velocity itself as a displacement folds
    assert float(geometry.jacobian_determinant(geometry.integrate_velocity(velocity)).min()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_matches_cpu():
    image = torch.rand((1, 1, 9, 10, 11), dtype=torch.float64)
    field = _random_field((9, 10, 11), 2.0, seed=14)
    labels = torch.randint(0, 4, (1, 1, 9, 10, 11))
    cuda = torch.device("cuda")
    torch.testing.assert_close(geometry.warp(image.to(cuda), field.to(cuda)).cpu(), geometry.warp(image, field))
    assert torch.equal(geometry.warp_labels(labels.to(cuda), field.to(cuda)).cpu(), geometry.warp_labels(labels, field))
    torch.testing.assert_close(geometry.compose(field.to(cuda), field.to(cuda)).cpu(), geometry.compose(field, field))
    torch.testing.assert_close(geometry.jacobian_determinant(field.to(cuda)).cpu(), geometry.jacobian_determinant(field))


@pytest.mark.parametrize("size_x", [12, 13])  # even and uneven split into slabs
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_slab_parallel_sampling_equals_one_grid_sample(size_x, mode):
    torch.manual_seed(3)
    volume = torch.randn(1, 4, 9, 8, 7, dtype=torch.float64, requires_grad=True)
    coords = (geometry.identity_grid((size_x, 6, 5), dtype=torch.float64) * 0.6
              + 2.5 * torch.randn(1, 3, size_x, 6, 5, dtype=torch.float64)).requires_grad_()
    grid = geometry._normalise(coords, volume.shape[2:])
    expected = F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        got = geometry.sample(volume, coords, mode=mode, padding_mode="zeros")
    finally:
        torch.set_num_threads(threads)
    assert got.shape == expected.shape and got.is_contiguous()
    torch.testing.assert_close(got, expected)
    weights = torch.randn_like(expected)
    want = torch.autograd.grad((expected * weights).sum(), [volume, coords], allow_unused=True)
    have = torch.autograd.grad((got * weights).sum(), [volume, coords], allow_unused=True)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalised_grid_matches_the_flip_formula_exactly_with_its_gradient(dtype):
    shape = (9, 8, 7)
    coords = (geometry.identity_grid((5, 4, 6), dtype=dtype) + 3 * torch.randn(2, 3, 5, 4, 6, dtype=dtype)).requires_grad_()
    scale = torch.tensor([2.0 / (n - 1) for n in shape], dtype=dtype).view(1, 3, 1, 1, 1)
    expected = (coords * scale - 1.0).movedim(1, -1).flip(-1)
    got = geometry._normalise(coords, shape)
    assert torch.equal(got, expected) and got.is_contiguous()
    weights = torch.randn_like(expected)
    (want,) = torch.autograd.grad((expected * weights).sum(), coords)
    (have,) = torch.autograd.grad((got * weights).sum(), coords)
    torch.testing.assert_close(have, want)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda c: geometry._normalise(c, shape), (coords[:1, :, :2, :2, :2].detach().clone().requires_grad_(),))
