"""Local correlation volume: forward against a numpy brute force, gradients against autograd per shift."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwcnet.model import correlation
from rwcnet.model.correlation import local_correlation, shift_offsets


@pytest.fixture(params=["whole", "one_slice_slabs"])
def slabs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run once with the default CPU slabs (whole tiny volume) and once with one x-slice per slab."""
    if request.param == "one_slice_slabs":
        monkeypatch.setattr(correlation, "_CPU_SLAB_ELEMENTS", 1)


def _features(shape: tuple[int, ...], seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    fixed = torch.randn(shape, generator=generator, dtype=dtype)
    moving = torch.randn(shape, generator=generator, dtype=dtype)
    return fixed, moving


def _numpy_brute_force(fixed: np.ndarray, moving: np.ndarray, radius: int, kind: str) -> np.ndarray:
    """Triple loop over shifts and voxels, zero outside the moving volume; box filter by its definition."""
    batch, channels, sx, sy, sz = fixed.shape
    n = 2 * radius + 1
    raw = np.zeros((batch, n**3, sx, sy, sz))
    for b in range(batch):
        for d0 in range(-radius, radius + 1):
            for d1 in range(-radius, radius + 1):
                for d2 in range(-radius, radius + 1):
                    k = ((d0 + radius) * n + (d1 + radius)) * n + (d2 + radius)
                    for x in range(sx):
                        for y in range(sy):
                            for z in range(sz):
                                p, q, s = x + d0, y + d1, z + d2
                                inside = 0 <= p < sx and 0 <= q < sy and 0 <= s < sz
                                m = moving[b, :, p, q, s] if inside else np.zeros(channels)
                                f = fixed[b, :, x, y, z]
                                if kind == "dot":
                                    raw[b, k, x, y, z] = np.dot(f, m) / math.sqrt(channels)
                                else:
                                    raw[b, k, x, y, z] = np.abs(f - m).sum()
    if kind == "dot":
        return raw
    boxed = np.zeros_like(raw)
    for x in range(sx):
        for y in range(sy):
            for z in range(sz):
                window = raw[:, :, max(x - 1, 0) : x + 2, max(y - 1, 0) : y + 2, max(z - 1, 0) : z + 2]
                boxed[:, :, x, y, z] = window.sum(axis=(2, 3, 4)) / 27.0
    return boxed


def _torch_per_shift(fixed: torch.Tensor, moving: torch.Tensor, radius: int, kind: str) -> torch.Tensor:
    """Plain autograd version: one slice of the zero-padded moving features per shift."""
    padded = F.pad(moving, (radius,) * 6)
    sx, sy, sz = fixed.shape[2:]
    channels = []
    for d0, d1, d2 in shift_offsets(radius):
        a, b, c = d0 + radius, d1 + radius, d2 + radius
        shifted = padded[:, :, a : a + sx, b : b + sy, c : c + sz]
        if kind == "dot":
            channels.append((fixed * shifted).sum(1) / math.sqrt(fixed.shape[1]))
        else:
            channels.append((fixed - shifted).abs().sum(1))
    out = torch.stack(channels, 1)
    if kind == "sad":
        out = F.avg_pool3d(out, 3, stride=1, padding=1, count_include_pad=True)
    return out


@pytest.mark.parametrize("kind", ["dot", "sad"])
@pytest.mark.parametrize("radius", [1, 2])
def test_forward_matches_numpy_brute_force(kind: str, radius: int, slabs: None) -> None:
    fixed, moving = _features((1, 4, 6, 7, 8), seed=radius)
    got = local_correlation(fixed, moving, radius, kind)
    expected = _numpy_brute_force(fixed.numpy(), moving.numpy(), radius, kind)
    assert got.shape == (1, (2 * radius + 1) ** 3, 6, 7, 8)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["dot", "sad"])
def test_batch_two_odd_sizes_float32(kind: str, slabs: None) -> None:
    fixed, moving = _features((2, 3, 5, 3, 7), seed=7, dtype=torch.float32)
    got = local_correlation(fixed, moving, 2, kind)
    assert got.shape == (2, 125, 5, 3, 7) and got.dtype == torch.float32
    expected = _numpy_brute_force(fixed.double().numpy(), moving.double().numpy(), 2, kind)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    for b in range(2):
        single = local_correlation(fixed[b : b + 1], moving[b : b + 1], 2, kind)
        torch.testing.assert_close(got[b : b + 1], single)


def test_channel_order_and_zero_shift() -> None:
    """Channel k holds shift shift_offsets(r)[k]; identical inputs: dot = |f|^2/sqrt(C) at d = 0."""
    fixed, _ = _features((1, 4, 6, 7, 8), seed=3)
    assert shift_offsets(1)[0] == (-1, -1, -1) and shift_offsets(1)[1] == (-1, -1, 0)
    assert shift_offsets(1)[3] == (-1, 0, -1) and shift_offsets(1)[9] == (0, -1, -1)
    corr = local_correlation(fixed, fixed, 1, "dot")
    torch.testing.assert_close(corr[:, 13], (fixed**2).sum(1) / 2.0)
    moving = torch.roll(fixed, shifts=1, dims=4)  # m(x + (0, 0, 1)) = f(x) away from the last z-slice
    corr = local_correlation(fixed, moving, 1, "dot")
    k = shift_offsets(1).index((0, 0, 1))
    torch.testing.assert_close(corr[:, k, :, :, :-1], (fixed**2).sum(1)[..., :-1] / 2.0)


@pytest.mark.parametrize("kind", ["dot", "sad"])
@pytest.mark.parametrize("radius", [1, 2])
def test_gradients_match_per_shift_autograd(kind: str, radius: int, slabs: None) -> None:
    fixed, moving = _features((2, 3, 5, 6, 7), seed=11 + radius)
    generator = torch.Generator().manual_seed(5)
    weights = torch.randn((2, (2 * radius + 1) ** 3, 5, 6, 7), generator=generator, dtype=torch.float64)
    grads = []
    for function in (local_correlation, _torch_per_shift):
        f = fixed.clone().requires_grad_(True)
        m = moving.clone().requires_grad_(True)
        (function(f, m, radius, kind) * weights).sum().backward()
        grads.append((f.grad, m.grad))
    (gf, gm), (ef, em) = grads
    torch.testing.assert_close(gf, ef, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gm, em, rtol=1e-10, atol=1e-10)
    assert gf.abs().sum() > 0 and gm.abs().sum() > 0


@pytest.mark.parametrize("size_z", [6, 12, 23])
def test_dot_over_several_z_blocks_matches_per_shift_autograd(size_z: int) -> None:
    """The dot kind works on z-blocks of 2(2r+1) voxels: whole blocks, several blocks, a padded last block."""
    fixed, moving = _features((1, 3, 4, 3, size_z), seed=size_z)
    weights = torch.randn((1, 27, 4, 3, size_z), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for function in (local_correlation, _torch_per_shift):
        f, m = fixed.clone().requires_grad_(True), moving.clone().requires_grad_(True)
        out = function(f, m, 1, "dot")
        (out * weights).sum().backward()
        results.append((out.detach(), f.grad, m.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["dot", "sad"])
def test_gradcheck(kind: str, slabs: None) -> None:
    fixed, moving = _features((1, 2, 3, 4, 3), seed=21)
    fixed.requires_grad_(True)
    moving.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, m: local_correlation(f, m, 1, kind), (fixed, moving), fast_mode=True)


def test_gradient_to_one_input_only() -> None:
    fixed, moving = _features((1, 3, 4, 5, 6), seed=4)
    moving.requires_grad_(True)
    local_correlation(fixed, moving, 1, "dot").sum().backward()
    assert moving.grad is not None and moving.grad.abs().sum() > 0
    fixed.requires_grad_(True)
    moving.grad = None
    local_correlation(fixed, moving.detach(), 1, "sad").sum().backward()
    assert fixed.grad is not None and fixed.grad.abs().sum() > 0


def test_bad_arguments_are_refused() -> None:
    fixed, moving = _features((1, 2, 4, 4, 4), seed=0)
    with pytest.raises(ValueError, match="kind"):
        local_correlation(fixed, moving, 1, "ncc")
    with pytest.raises(ValueError, match="radius"):
        local_correlation(fixed, moving, -1)
    with pytest.raises(ValueError, match="same shape"):
        local_correlation(fixed, moving[:, :1], 1)
    with pytest.raises(ValueError, match="dtype"):
        local_correlation(fixed, moving.float(), 1)


@pytest.mark.parametrize("kind", ["dot", "sad"])
def test_singleton_axis_and_radius_zero(kind: str) -> None:
    fixed, moving = _features((1, 3, 1, 4, 5), seed=9)
    got = local_correlation(fixed, moving, 1, kind)
    np.testing.assert_allclose(got.numpy(), _numpy_brute_force(fixed.numpy(), moving.numpy(), 1, kind), atol=1e-12)
    got = local_correlation(fixed, moving, 0, kind)
    np.testing.assert_allclose(got.numpy(), _numpy_brute_force(fixed.numpy(), moving.numpy(), 0, kind), atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["dot", "sad"])
def test_cuda_matches_cpu(kind: str) -> None:
    fixed, moving = _features((2, 3, 5, 6, 7), seed=13)
    results = []
    for device in ("cpu", "cuda"):
        f = fixed.to(device).requires_grad_(True)
        m = moving.to(device).requires_grad_(True)
        out = local_correlation(f, m, 2, kind)
        (out * torch.arange(out.numel(), device=device, dtype=out.dtype).view_as(out).sin()).sum().backward()
        results.append([t.cpu() for t in (out, f.grad, m.grad)])
    for cpu_tensor, cuda_tensor in zip(*results):
        torch.testing.assert_close(cuda_tensor, cpu_tensor)


@pytest.mark.parametrize("slab_planes", [None, 1, 3])  # whole volume; one X plane per slab; uneven slabs (3 + 1)
def test_soft_argmax_recovers_the_best_shift_and_is_a_weighted_mean(slab_planes, monkeypatch):
    from rwcnet.model import correlation
    from rwcnet.model.correlation import shift_offsets, soft_argmax

    if slab_planes is not None:  # values in one X plane of the (2, 125, 4, 3, 5) cost below
        monkeypatch.setattr(correlation, "_READOUT_SLAB_ELEMENTS", slab_planes * 2 * 125 * 3 * 5)
    torch.manual_seed(0)
    radius = 2
    offsets = torch.tensor(shift_offsets(radius), dtype=torch.float64)
    cost = torch.randn(2, len(offsets), 4, 3, 5, dtype=torch.float64)
    expected = torch.einsum("bkxyz,kc->bcxyz", torch.softmax(cost / 0.7, dim=1), offsets)
    torch.testing.assert_close(soft_argmax(cost, radius, "dot", 0.7), expected)
    torch.testing.assert_close(soft_argmax(-cost, radius, "sad", 0.7), expected)  # a cost: smaller is better
    temperature = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    leaf = cost.clone().requires_grad_(True)
    soft_argmax(leaf, radius, "dot", temperature).pow(2).sum().backward()
    reference = cost.clone().requires_grad_(True)
    reference_temperature = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    torch.einsum("bkxyz,kc->bcxyz", torch.softmax(reference / reference_temperature, dim=1), offsets).pow(2).sum().backward()
    torch.testing.assert_close(leaf.grad, reference.grad)
    torch.testing.assert_close(temperature.grad, reference_temperature.grad)
    peaked = torch.zeros(1, len(offsets), 2, 2, 2, dtype=torch.float64)
    best = shift_offsets(radius).index((1, -2, 0))
    peaked[:, best] = 50.0
    torch.testing.assert_close(soft_argmax(peaked, radius, "dot"), torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, 2, 2, 2))
