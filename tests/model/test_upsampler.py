"""Convex upsampling (RAFT's learned upsampling in 3D) against a per-voxel brute force and invariants."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from rwcnet.model.update import ConvexUpsampler


def _brute_force(upsampler: ConvexUpsampler, field: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Each fine voxel: softmax(mask/4) over the 27 replicate-padded coarse neighbours, times the factor."""
    s = upsampler.factor
    b, c, x, y, z = field.shape
    logits = upsampler.mask(hidden).view(b, 27, s, s, s, x, y, z) * 0.25
    padded = F.pad(field, (1,) * 6, mode="replicate")
    out = torch.zeros(b, c, x * s, y * s, z * s, dtype=field.dtype)
    for i, j, k, a, bb, cc in itertools.product(range(x), range(y), range(z), range(s), range(s), range(s)):
        weights = torch.softmax(logits[:, :, a, bb, cc, i, j, k], dim=1)  # (b, 27)
        neighbours = torch.stack(
            [padded[:, :, i + di, j + dj, k + dk] for di in range(3) for dj in range(3) for dk in range(3)], dim=2
        )  # (b, c, 27)
        out[:, :, i * s + a, j * s + bb, k * s + cc] = s * (neighbours * weights[:, None]).sum(-1)
    return out


@pytest.mark.parametrize("planes_per_slab", [None, 1, 2])  # whole volume; one plane; uneven slabs (2 + 1)
def test_matches_brute_force_and_passes_gradients(planes_per_slab):
    torch.manual_seed(0)
    upsampler = ConvexUpsampler(hidden=5, channels=6, factor=2).double()
    if planes_per_slab is not None:  # bytes of the mask weights of one X plane: batch 2, 27 * 2^3 channels, 4×2, float64
        upsampler.slab_bytes = planes_per_slab * 2 * 27 * 8 * 4 * 2 * 8
    field = torch.randn(2, 3, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 5, 3, 4, 2, dtype=torch.float64)
    fine = upsampler(field, hidden)
    torch.testing.assert_close(fine, _brute_force(upsampler, field.detach(), hidden))
    fine.square().sum().backward()
    assert field.grad is not None and field.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in upsampler.parameters())


def test_constant_field_stays_constant_in_finer_voxels():
    torch.manual_seed(1)
    upsampler = ConvexUpsampler(hidden=4, channels=4, factor=2)
    field = torch.tensor([1.5, -0.25, 3.0]).view(1, 3, 1, 1, 1).expand(1, 3, 4, 5, 3).contiguous()
    fine = upsampler(field, torch.randn(1, 4, 4, 5, 3))
    expected = (2 * field[:, :, :1, :1, :1]).expand_as(fine)
    torch.testing.assert_close(fine, expected)
