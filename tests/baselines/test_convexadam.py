"""ConvexAdam: cost volume by brute force, coupled convex and inverse consistency on known fields, end to end on phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

from rwcnet.baselines.convexadam import (
    CONVEXADAM_PRESETS,
    convex_adam,
    convexadam_config,
    cost_volume,
    coupled_convex,
    inverse_consistency,
    shift_table,
)
from rwcnet.geometry import identity_grid, warp
from rwcnet.mind import mind_ssc

N = 48


pytestmark = pytest.mark.usefixtures("one_thread")


def _phantom(shape=(N, N, N), seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 1, *(n // 4 for n in shape)), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)


def _translation(vector, shape=(N, N, N)) -> torch.Tensor:
    return torch.tensor(vector, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *shape).contiguous()


def test_cost_volume_equals_brute_force():
    rng = np.random.default_rng(0)
    fixed = rng.random((4, 7, 6, 5)).astype(np.float32)
    moving = rng.random((4, 7, 6, 5)).astype(np.float32)
    radius = 2
    padded = np.pad(moving, [(0, 0)] + [(radius, radius)] * 3)
    got = cost_volume(torch.from_numpy(fixed)[None], torch.from_numpy(moving)[None], radius).numpy()
    for s, (a, b, c) in enumerate(shift_table(radius).long().tolist()):
        window = padded[:, radius + a : radius + a + 7, radius + b : radius + b + 6, radius + c : radius + c + 5]
        ssd = ((fixed - window) ** 2).sum(0)
        expected = uniform_filter(uniform_filter(ssd, 3, mode="constant"), 3, mode="constant")
        np.testing.assert_allclose(got[..., s], expected, atol=1e-5, err_msg=f"shift {(a, b, c)}")


def test_coupled_convex_finds_an_integer_shift_of_features():
    features = mind_ssc(_phantom((48, 48, 48)))[:, :, ::3, ::3, ::3].contiguous()
    shift = (2, -1, 1)
    fixed = torch.roll(features, shifts=tuple(-s for s in shift), dims=(2, 3, 4))
    field = coupled_convex(cost_volume(fixed, features, 3), 3)
    inner = field[0, :, 4:-4, 4:-4, 4:-4]  # away from the wrapped-around border
    torch.testing.assert_close(inner, torch.tensor(shift, dtype=torch.float32).view(3, 1, 1, 1).expand_as(inner))


def test_coupling_pulls_outliers_towards_the_neighbours():
    radius = 2
    shifts = shift_table(radius)
    target = torch.tensor([1.0, 0.0, -1.0])
    cost = ((shifts - target) ** 2).sum(1).expand(8, 8, 8, -1).clone()
    outlier = torch.tensor([-2.0, 2.0, 2.0])
    cost[4, 4, 4] = ((shifts - outlier) ** 2).sum(1) * 0.01  # weakly prefers a very different shift
    uncoupled = coupled_convex(cost, radius, couplings=())
    coupled = coupled_convex(cost, radius)
    centre = (0, slice(None), 4, 4, 4)
    assert float((uncoupled[centre] - target).norm()) > float((coupled[centre] - target).norm())
    torch.testing.assert_close(coupled[centre], target)


def test_inverse_consistency_keeps_an_exact_inverse_pair_and_repairs_a_wrong_one():
    shape = (24, 24, 24)
    grid = identity_grid(shape)
    bump = torch.exp(-((grid - 11.5) ** 2).sum(1, keepdim=True) / (2 * 5.0**2))
    forward = torch.cat([1.5 * bump, -bump, 0.5 * bump], dim=1)

    def inconsistency(u, v):
        return float((u + warp(v, u, padding_mode="zeros"))[..., 4:-4, 4:-4, 4:-4].abs().mean())

    before = inconsistency(forward, torch.zeros_like(forward))
    fixed_up, backward = inverse_consistency(forward, torch.zeros_like(forward), iterations=15)
    assert inconsistency(fixed_up, backward) < 0.1 * before
    translation = _translation([1.0, -2.0, 0.5], shape)
    kept, _ = inverse_consistency(translation, -translation, iterations=5)
    torch.testing.assert_close(kept[..., 6:-6, 6:-6, 6:-6], translation[..., 6:-6, 6:-6, 6:-6])


def test_recovers_an_integer_translation_of_a_textured_phantom():
    moving = _phantom()
    true = _translation([7.0, -5.0, 4.0])
    fixed = warp(moving, true)
    discrete = convex_adam(fixed, moving, io_iterations=0)
    field = convex_adam(fixed, moving)
    inner = (slice(None), slice(None), slice(10, -10), slice(10, -10), slice(10, -10))
    assert field.shape == (1, 3, N, N, N)
    epe = float((field - true)[inner].norm(dim=1).mean())
    assert epe < 0.5
    assert epe < float((discrete - true)[inner].norm(dim=1).mean())


def test_odd_sizes_and_the_lung_preset():
    shape = (41, 38, 45)
    moving = _phantom(shape, seed=4)
    true = _translation([3.0, 2.0, -3.0], shape)
    field = convex_adam(warp(moving, true), moving, preset="lung")
    assert field.shape == (1, 3, *shape)
    inner = (slice(None), slice(None), slice(10, -10), slice(10, -10), slice(10, -10))
    assert float((field - true)[inner].norm(dim=1).mean()) < 0.5


def test_masks_exclude_unrelated_content():
    moving = _phantom(seed=5)
    true = _translation([4.0, -3.0, 2.0])
    fixed = warp(moving, true)
    generator = torch.Generator().manual_seed(9)
    fixed[:, :, 32:] = torch.rand((1, 1, 16, N, N), generator=generator)  # content the moving image does not have
    mask = torch.zeros(1, 1, N, N, N)
    mask[:, :, :30] = 1
    masked = convex_adam(fixed, moving, fixed_mask=mask)
    region = (slice(None), slice(None), slice(8, 24), slice(8, -8), slice(8, -8))
    assert float((masked - true)[region].norm(dim=1).mean()) < 0.5
    with pytest.raises(ValueError, match="fixed_mask"):
        convex_adam(fixed, moving, fixed_mask=torch.ones(8, 8, 8))


def test_presets_and_overrides():
    lung = CONVEXADAM_PRESETS["lung"]
    assert (lung.grid_spacing, lung.disp_radius, lung.io.lam, lung.io.iterations) == (4, 6, 0.65, 50)
    brain = CONVEXADAM_PRESETS["brain"]
    assert (brain.grid_spacing, brain.disp_radius, brain.io.lam, brain.io.iterations) == (6, 4, 1.25, 80)
    changed = convexadam_config("brain", disp_radius=3, io_lam=0.5)
    assert (changed.disp_radius, changed.io.lam, changed.io.iterations) == (3, 0.5, 80)
    with pytest.raises(ValueError, match="unknown ConvexAdam preset"):
        convexadam_config("liver")


def test_steps_match_the_official_package():
    """Where it is installed, the official ``convexAdam`` code gives the same MIND and coupled-convex results."""
    official = pytest.importorskip("convexAdam.convex_adam_utils")
    image = _phantom((30, 28, 26))
    ours = mind_ssc(image)
    theirs = official.MINDSSC(image, 1, 2, device="cpu")
    order = [min(range(12), key=lambda j: float((ours[0, i] - theirs[0, j]).abs().max())) for i in range(12)]
    assert sorted(order) == list(range(12))
    torch.testing.assert_close(ours, theirs[:, order], atol=1e-5, rtol=0)

    fixed = ours[:, :, ::3, ::3, ::3].contiguous()
    moving = mind_ssc(_phantom((30, 28, 26), seed=1))[:, :, ::3, ::3, ::3].contiguous()
    radius = 2
    shape = tuple(fixed.shape[2:])
    cost, argmin = official.correlate(fixed, moving, radius, 1, shape, 12)
    size = 2 * radius + 1
    mesh = torch.nn.functional.affine_grid(
        radius * torch.eye(3, 4).unsqueeze(0), (1, 1, size, size, size), align_corners=True
    ).permute(0, 4, 1, 2, 3).reshape(3, -1, 1)
    expected = official.coupled_convex(cost, argmin, mesh, 1, shape)
    torch.testing.assert_close(coupled_convex(cost_volume(fixed, moving, radius), radius), expected)


def test_steps_match_the_official_package_fixture():
    """MIND, the discrete argmin and the coupled-convex result equal the official ``convexAdam`` 0.2.0's.

    The reference values were made once by ``tests/fixtures/make_convexadam_fixture.py`` with the
    official package, from a seeded 32³ pair moved by up to 5 voxels; this test runs without it.
    """
    reference = np.load(Path(__file__).parents[1] / "fixtures" / "convexadam_official.npz")
    assert str(reference["convexadam_version"]) == "0.2.0"
    spacing, radius = int(reference["grid_spacing"]), int(reference["radius"])
    fixed, moving = (torch.from_numpy(reference[k].astype(np.float32) / 255)[None, None] for k in ("fixed", "moving"))

    mind_fixed, mind_moving = mind_ssc(fixed), mind_ssc(moving)
    theirs = torch.from_numpy(reference["mind_fixed"].astype(np.float32))
    order = [min(range(12), key=lambda j: float((mind_fixed[0, i] - theirs[j]).abs().max())) for i in range(12)]
    assert sorted(order) == list(range(12))
    torch.testing.assert_close(mind_fixed[0], theirs[order], atol=1e-3, rtol=0)  # the fixture is float16

    pooled = [torch.nn.functional.avg_pool3d(m, spacing) for m in (mind_fixed, mind_moving)]
    cost = cost_volume(*pooled, radius)
    argmin = shift_table(radius)[cost.argmin(dim=-1)].permute(3, 0, 1, 2)
    expected_argmin = torch.from_numpy(reference["argmin_displacement"].astype(np.float32))
    assert expected_argmin.abs().amax() >= 2  # the pair does move
    assert torch.equal(argmin, expected_argmin)
    torch.testing.assert_close(coupled_convex(cost, radius)[0], torch.from_numpy(reference["coupled_convex"]), atol=1e-5, rtol=0)
