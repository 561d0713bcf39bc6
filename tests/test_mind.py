"""MIND-SSC against a brute-force per-voxel computation, scipy, and its invariances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rwcnet.geometry.filters import box_filter
from rwcnet.mind import fill_outside_mask, mind_ssc


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on the shared 2-core machine, two threads per test process are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _brute_force_mind(image: np.ndarray, radius: int, dilation: int) -> np.ndarray:
    """MIND-SSC by its definition, voxel by voxel, in float64 (channel order: orthogonal pairs of the offsets below)."""
    offsets = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    pairs = [(a, b) for a, b in itertools.combinations(offsets, 2) if np.dot(a, b) == 0]
    shape = np.array(image.shape)

    def value(p):
        return image[tuple(np.clip(p, 0, shape - 1))]

    distances = np.zeros((len(pairs), *image.shape))
    for c, (a, b) in enumerate(pairs):
        for x in itertools.product(*(range(n) for n in image.shape)):
            total = 0.0
            for box in itertools.product(range(-radius, radius + 1), repeat=3):
                q = np.clip(np.add(x, box), 0, shape - 1)
                total += (value(q + dilation * np.array(a)) - value(q + dilation * np.array(b))) ** 2
            distances[(c, *x)] = total / (2 * radius + 1) ** 3
    distances -= distances.min(axis=0)
    variance = distances.mean(axis=0)
    variance = np.clip(variance, variance.mean() * 0.001, variance.mean() * 1000)
    return np.exp(-distances / variance)


def _phantom(shape, seed=0, margin=0) -> torch.Tensor:
    """Smooth random texture ``(1, 1, *shape)``, zero within ``margin`` voxels of the border."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, *(max(2, n // 4) for n in shape)), generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)
    if margin:
        inside = torch.zeros_like(image)
        inside[..., margin:-margin, margin:-margin, margin:-margin] = 1
        image = image * inside
    return image


@pytest.mark.parametrize("differentiable", [False, True])  # in-place path (no autograd) and the autograd path
def test_mind_equals_brute_force_on_a_tiny_volume(differentiable):
    rng = np.random.default_rng(1)
    image = rng.random((6, 5, 7))
    expected = _brute_force_mind(image, radius=1, dilation=2)
    tensor = torch.from_numpy(image).float()[None, None].requires_grad_(differentiable)
    features = mind_ssc(tensor)
    np.testing.assert_allclose(features[0].detach().numpy(), expected, atol=2e-5)
    if differentiable:
        features.square().sum().backward()
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_mind_shape_range_and_batching():
    images = torch.cat([_phantom((20, 18, 16), seed=s) for s in (0, 1)])
    features = mind_ssc(images)
    assert features.shape == (2, 12, 20, 18, 16) and features.dtype == torch.float32
    assert float(features.min()) > 0 and float(features.max()) <= 1
    for b in range(2):
        torch.testing.assert_close(features[b : b + 1], mind_ssc(images[b : b + 1]))


def test_identical_images_give_identical_features():
    image = _phantom((16, 16, 16))
    torch.testing.assert_close(mind_ssc(image), mind_ssc(image.clone()), rtol=0, atol=0)


def test_integer_shift_of_the_image_shifts_the_features():
    image = _phantom((32, 32, 32), margin=8)
    shift = (3, -2, 4)
    shifted = torch.roll(image, shifts=shift, dims=(2, 3, 4))
    torch.testing.assert_close(mind_ssc(shifted), torch.roll(mind_ssc(image), shifts=shift, dims=(2, 3, 4)), atol=1e-5, rtol=0)


def test_mind_is_invariant_to_affine_intensity_changes():
    image = _phantom((20, 20, 20))
    torch.testing.assert_close(mind_ssc(3.0 * image + 5.0), mind_ssc(image), atol=1e-4, rtol=0)


def test_constant_image_gives_ones():
    assert torch.equal(mind_ssc(torch.full((1, 1, 8, 8, 8), 0.3)), torch.ones(1, 12, 8, 8, 8))


def test_fill_outside_mask_removes_the_mask_edge_and_keeps_the_inside():
    grid = torch.stack(torch.meshgrid(*(torch.arange(24.0),) * 3, indexing="ij"))
    ball = (((grid - 11.5) ** 2).sum(0) < 8.0**2).float()[None, None]
    texture = 1.0 + 0.1 * _phantom((24, 24, 24))
    image = ball * texture
    filled = fill_outside_mask(image, ball)
    eroded = box_filter(ball, 1, border="replicate") > 0.9
    assert torch.equal(filled[eroded], image[eroded])
    assert float(filled.min()) >= float(texture.min()) - 1e-6
    assert float(filled.max()) <= float(texture.max()) + 1e-6
