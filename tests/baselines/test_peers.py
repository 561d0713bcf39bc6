"""Classical peers: our reading of their transforms warps like their own tools do (skipped when a peer is not set up)."""

import numpy as np
import pytest
import torch

from rwcnet import geometry
from rwcnet.data.formats import Image
from rwcnet.baselines.peers import peer_python, run_peer
from rwcnet.synthetic import make_pair, random_deformation


def _pair() -> tuple[Image, Image]:
    """A smooth 40x36x32 image on a rotated, flipped, anisotropic grid, and a copy deformed by ~4 mm."""
    shape, spacing = (40, 36, 32), (1.2, 1.0, 1.5)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    image = sum(np.exp(-((grid - c[:, None, None, None]) ** 2).sum(0) / 0.08)
                for c in np.random.default_rng(0).uniform(-0.6, 0.6, (12, 3))).astype(np.float32)
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (10.0, -20.0, 5.0)
    phi = random_deformation(shape, spacing, magnitude_mm=4.0, smoothness_mm=15.0, seed=1)
    pair = make_pair(image, deformation=phi, spacing_mm=spacing, warped_role="moving")
    return Image(image, affine), Image(pair.moving[0, 0].numpy(), affine)


@pytest.mark.parametrize("peer", ["ants", "elastix", "greedy"])
def test_peer_field_warps_like_the_peer_tool(peer):
    if peer_python(peer) is None:
        pytest.skip(f"peer {peer} not set up (see rwcnet.baselines.peers)")
    fixed, moving = _pair()
    result = run_peer(peer, fixed, moving, threads=1)
    ours = geometry.warp(torch.from_numpy(moving.array)[None, None],
                         torch.from_numpy(result.field).permute(3, 0, 1, 2)[None])[0, 0].numpy()
    inner = (slice(4, -4),) * 3
    assert np.abs(result.field).max() > 0.5  # the peer really moved something
    difference = np.abs(ours[inner] - result.warped[inner]).max() / np.abs(result.warped[inner]).max()
    assert difference < 0.02
    before = np.corrcoef(moving.array[inner].ravel(), fixed.array[inner].ravel())[0, 1]
    after = np.corrcoef(ours[inner].ravel(), fixed.array[inner].ravel())[0, 1]
    assert after > before
