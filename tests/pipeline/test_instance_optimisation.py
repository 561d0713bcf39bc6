"""Instance optimisation: recovers known smooth fields on textured phantoms, honours masks and its parameters."""

from __future__ import annotations

import pydantic
import pytest
import torch

from rwcnet.geometry import identity_grid, warp
from rwcnet.instance_optimisation import IO_PRESETS, IOConfig, diffusion_loss, instance_optimise, io_config, smooth_field

N = 48
INNER = (slice(None), slice(None), slice(8, -8), slice(8, -8), slice(8, -8))


pytestmark = pytest.mark.usefixtures("one_thread")


def _phantom(shape=(N, N, N), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, *(n // 4 for n in shape)), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)


def _bump(shape=(N, N, N), centre=None, amplitude=2.0, sigma=8.0) -> torch.Tensor:
    """A smooth Gaussian bump field ``(1, 3, *shape)`` peaking at ``amplitude·(1, 0.5, −1)`` voxels."""
    grid = identity_grid(shape)
    centre = torch.tensor(centre if centre is not None else [(n - 1) / 2 for n in shape]).view(1, 3, 1, 1, 1)
    bump = amplitude * torch.exp(-((grid - centre) ** 2).sum(1, keepdim=True) / (2 * sigma**2))
    return torch.cat([bump, 0.5 * bump, -bump], dim=1)


def _epe(field, true, region=INNER) -> float:
    return float((field - true)[region].norm(dim=1).mean())


def test_recovers_a_smooth_bump_and_lowers_the_loss():
    moving = _phantom()
    true = _bump()
    fixed = warp(moving, true)
    losses = []
    field = instance_optimise(fixed, moving, progress=lambda step, total, loss: losses.append((step, total, loss)))
    assert field.shape == (1, 3, N, N, N)
    assert [s for s, _, _ in losses] == list(range(1, 81)) and losses[0][1] == 80
    assert losses[-1][2] < 0.6 * losses[0][2]
    assert _epe(field, true) < 0.4 * _epe(torch.zeros_like(true), true)


def test_zero_iterations_returns_the_init_or_zero():
    moving = _phantom((16, 16, 16))
    init = _bump((16, 16, 16))
    assert torch.equal(instance_optimise(moving, moving, init, iterations=0), init)
    assert torch.equal(instance_optimise(moving, moving, iterations=0), torch.zeros(1, 3, 16, 16, 16))


def test_sizes_not_multiple_of_the_grid_spacing():
    shape = (33, 30, 35)
    moving = _phantom(shape, seed=3)
    true = torch.tensor([1.5, -1.0, 0.5]).view(1, 3, 1, 1, 1).expand(1, 3, *shape)
    field = instance_optimise(warp(moving, true), moving, iterations=60, lam=0.5)
    assert field.shape == (1, 3, *shape)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8), slice(8, -8))
    assert _epe(field, true, inner) < 0.3 * _epe(torch.zeros_like(true), true, inner)


def test_outside_the_fixed_mask_the_images_do_not_drive_the_field():
    moving = _phantom()
    centre = [36.0, 23.5, 23.5]
    true = _bump(centre=centre, sigma=5.0)
    fixed = warp(moving, true)
    mask = torch.zeros(1, 1, N, N, N)
    mask[:, :, :20] = 1
    free = instance_optimise(fixed, moving)
    masked = instance_optimise(fixed, moving, fixed_mask=mask)
    peak = (slice(None), slice(None), slice(33, 40), slice(20, 28), slice(20, 28))
    true_peak = float(true[peak].norm(dim=1).mean())
    assert float(free[peak].norm(dim=1).mean()) > 0.5 * true_peak
    assert float(masked[peak].norm(dim=1).mean()) < 0.3 * true_peak


def test_deterministic():
    moving = _phantom((24, 24, 24))
    fixed = warp(moving, _bump((24, 24, 24), sigma=5.0))
    first = instance_optimise(fixed, moving, iterations=10)
    assert torch.equal(first, instance_optimise(fixed, moving, iterations=10))


def test_presets_and_overrides():
    assert (IO_PRESETS["brain"].lam, IO_PRESETS["brain"].iterations) == (1.25, 80)
    assert (IO_PRESETS["lung"].lam, IO_PRESETS["lung"].iterations) == (0.65, 50)
    assert io_config("lung", iterations=7).model_dump() == {**IO_PRESETS["lung"].model_dump(), "iterations": 7}
    custom = IOConfig(iterations=3, lam=0.1)
    assert io_config(custom) is custom
    with pytest.raises(ValueError, match="unknown instance-optimisation preset"):
        io_config("heart")
    with pytest.raises(pydantic.ValidationError):
        IOConfig(iterations=-1)


def test_bad_shapes_are_refused():
    image = _phantom((16, 16, 16))
    with pytest.raises(ValueError, match="moving"):
        instance_optimise(image, _phantom((16, 16, 20)))
    with pytest.raises(ValueError, match="init_field"):
        instance_optimise(image, image, torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match="fixed_mask"):
        instance_optimise(image, image, fixed_mask=torch.ones(8, 8, 8))


def test_smoothing_equals_three_zero_padded_average_pools():
    field = torch.randn(1, 3, 9, 12, 7, generator=torch.Generator().manual_seed(0))
    expected = field
    for _ in range(3):
        expected = torch.nn.functional.avg_pool3d(expected, 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(smooth_field(field), expected, atol=1e-6, rtol=0)


def test_smoothing_and_regulariser_against_hand_computed_values():
    field = torch.zeros(1, 3, 9, 9, 9)
    field[0, 0, 4, 4, 4] = 27.0**3
    smoothed = smooth_field(field)
    # three 3-box means of a spike: the separable triangle-of-boxes kernel (1, 3, 6, 7, 6, 3, 1) per axis
    kernel = torch.tensor([1.0, 3, 6, 7, 6, 3, 1])
    expected = kernel.view(7, 1, 1) * kernel.view(1, 7, 1) * kernel.view(1, 1, 7)
    torch.testing.assert_close(smoothed[0, 0, 1:8, 1:8, 1:8], expected)
    ramp = identity_grid((4, 5, 6)) * torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1, 1)
    # forward differences: along axis 0 channel 0 is 1, along axis 1 channel 1 is 2 (means over 3 channels)
    torch.testing.assert_close(diffusion_loss(ramp), torch.tensor(1.0 / 3 + 4.0 / 3))
