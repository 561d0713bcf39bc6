"""Semi-synthetic pairs: invertible fields, inverse residual, carried labels/masks/keypoints; lung masks and keypoint sampling (rwcnet.masks)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import pdist

from rwcnet import geometry, masks, synthetic

SHAPE = (48, 48, 48)
SPACING = (1.5, 1.5, 1.5)


def _smooth_image(shape=SHAPE) -> torch.Tensor:
    """A smooth test image (1, 1, X, Y, Z) with structure along every axis."""
    x = np.indices(shape, dtype=np.float64) / np.array(shape)[:, None, None, None]
    image = np.sin(3 * x[0]) * np.cos(4 * x[1]) + np.sin(5 * x[2] + 1) + x[0] * x[2]
    return torch.as_tensor(image, dtype=torch.float32)[None, None]


def _blobs(shape=SHAPE) -> np.ndarray:
    """Three ball labels with non-contiguous values on background 0."""
    x = np.indices(shape)
    labels = np.zeros(shape, dtype=np.int64)
    for value, centre, radius in [(3, (15, 16, 20), 8), (8, (30, 30, 28), 10), (21, (20, 34, 12), 6)]:
        labels[((x - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= radius**2] = value
    return labels


def _mm(field: torch.Tensor, spacing=SPACING) -> torch.Tensor:
    return (field * torch.tensor(spacing, dtype=field.dtype).view(1, 3, 1, 1, 1)).norm(dim=1)


def _map_field(field: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Field at points by scipy (order 1), independent of geometry.sample_field: (N, 3)."""
    return np.stack([ndimage.map_coordinates(field[0, c].double().numpy(), points.T, order=1, mode="nearest")
                     for c in range(3)], axis=1)


@pytest.fixture(scope="module")
def random_field() -> torch.Tensor:
    return synthetic.random_deformation(SHAPE, (1.0, 1.5, 2.0), magnitude_mm=6.0, smoothness_mm=15.0, seed=3)


@pytest.fixture(scope="module")
def breathing_field() -> torch.Tensor:
    return synthetic.breathing_deformation(SHAPE, SPACING, amplitude_mm=15.0, axis=2, towards="+", seed=4)


def test_random_deformation_is_smooth_invertible_and_scaled(random_field):
    assert random_field.shape == (1, 3, *SHAPE) and random_field.dtype == torch.float32
    assert float(geometry.jacobian_determinant(random_field).min()) > 0.1
    assert float(_mm(random_field, (1.0, 1.5, 2.0)).max()) == pytest.approx(6.0, rel=1e-4)
    # smooth: displacement gradients (mm per mm) stay of the order magnitude / smoothness (white noise: ~ magnitude)
    spacing = torch.tensor([1.0, 1.5, 2.0])
    gradient_mm = geometry.spatial_gradient(random_field) * spacing.view(1, 3, 1, 1, 1, 1) / spacing.view(1, 1, 3, 1, 1, 1)
    assert float(gradient_mm.abs().max()) < 2 * 6.0 / 15.0


def test_random_deformation_integrates_a_velocity_when_it_would_fold():
    kwargs = dict(magnitude_mm=8.0, smoothness_mm=12.0, seed=1)
    strict = synthetic.random_deformation((24, 24, 24), (2.0, 2.0, 2.0), min_jacobian=0.6, **kwargs)
    assert float(geometry.jacobian_determinant(strict).min()) > 0.6
    assert 0.3 * 8.0 < float(_mm(strict, (2.0, 2.0, 2.0)).max()) <= 8.0 * 1.02


def test_random_deformation_is_seeded(random_field):
    again = synthetic.random_deformation(SHAPE, (1.0, 1.5, 2.0), magnitude_mm=6.0, smoothness_mm=15.0, seed=3)
    other = synthetic.random_deformation(SHAPE, (1.0, 1.5, 2.0), magnitude_mm=6.0, smoothness_mm=15.0, seed=4)
    assert torch.equal(random_field, again)
    assert not torch.allclose(random_field, other)
    assert not synthetic.random_deformation(SHAPE, SPACING, magnitude_mm=0.0, smoothness_mm=10.0).any()


def test_breathing_field_is_cranio_caudal_and_grows_towards_the_diaphragm(breathing_field):
    assert float(geometry.jacobian_determinant(breathing_field).min()) > 0.1
    mm = breathing_field * torch.tensor(SPACING).view(1, 3, 1, 1, 1)
    rms = mm.pow(2).mean(dim=(0, 2, 3, 4)).sqrt()
    assert rms[2] > 3 * rms[0] and rms[2] > 3 * rms[1]
    per_slice = mm[0, 2].mean(dim=(0, 1))  # mean cranio-caudal displacement per slice along axis 2
    quarters = [float(per_slice[i * 12:(i + 1) * 12].mean()) for i in range(4)]
    assert quarters[0] > quarters[1] > quarters[2] > quarters[3]  # increasingly towards the head (negative)
    assert abs(quarters[0]) < 2.0 and 10.0 < abs(quarters[3]) <= 15.0 * 1.1
    assert float(breathing_field.norm(dim=1).max() * 1.5) <= 15.0 * 1.2


def test_breathing_field_follows_axis_direction_and_lung_mask():
    shape = (40, 32, 36)
    reverse = synthetic.breathing_deformation(shape, SPACING, amplitude_mm=12.0, axis=0, towards="-", ap_axis=1)
    per_slice = reverse[0, 0].mean(dim=(1, 2)) * 1.5
    assert float(per_slice[:10].mean()) > 8.0 and abs(float(per_slice[-10:].mean())) < 2.0  # feet at index 0
    mask = np.zeros(shape, dtype=bool)
    mask[8:32, 6:26, 6:24] = True  # lungs span slices 6..23 of axis 2
    with_mask = synthetic.breathing_deformation(shape, SPACING, amplitude_mm=12.0, lung_mask=mask, variation=0.0)
    cc = with_mask[0, 2] * 1.5
    assert float(cc.abs().max()) == pytest.approx(12.0, rel=1e-3)
    assert float(cc[:, :, :6].abs().max()) < 0.1  # above the lung apex nothing moves
    assert float(cc[mask].abs().mean()) > float(cc[~mask].abs().mean())
    with pytest.raises(ValueError):
        synthetic.breathing_deformation(shape, SPACING, towards="up")


def _reads_inside(field: torch.Tensor) -> torch.Tensor:
    """Voxels x whose x + field(x) lies inside the grid (where warping by field reads real data): (1, 1, X, Y, Z)."""
    reach = geometry.identity_grid(field.shape[2:]) + field
    upper = torch.tensor(field.shape[2:]).view(1, 3, 1, 1, 1) - 1
    return ((reach >= 0) & (reach <= upper)).all(dim=1, keepdim=True)


def test_invert_field_composes_to_zero(breathing_field, random_field):
    image = _smooth_image()
    for field in (breathing_field, random_field):
        result = geometry.invert_field(field)
        inverse, residual = result.field, float(result.residual.max())
        assert residual < 0.05
        np.testing.assert_allclose(residual, geometry.compose(inverse, field).norm(dim=1).max(), rtol=1e-5)
        # the other side holds too, away from the border (where the inverse saw the field's border extension)
        margin = int(np.ceil(float(field.abs().max()))) + 1
        interior = (0,) + (slice(margin, -margin),) * 3
        assert float(geometry.compose(field, inverse).norm(dim=1)[interior].max()) < 0.05
        restored = geometry.warp(geometry.warp(image, field), inverse)
        inside = _reads_inside(inverse)
        assert inside.float().mean() > 0.7
        assert float((restored - image)[inside].abs().max()) < 0.05  # image range is about 5


@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_make_pair_ground_truth_aligns_moving_to_fixed(role, random_field):
    image = _smooth_image()
    labels = _blobs()
    pair = synthetic.make_pair(image, labels=labels, mask=labels > 0, n_keypoints=40, keypoint_distance=3.0,
                               deformation=random_field, warped_role=role, seed=5)
    assert pair.warped_role == role and torch.equal(pair.field, random_field)
    assert pair.min_jacobian > 0
    assert (pair.inverse_residual < 0.05) and (role == "moving" or pair.inverse_residual == 0.0)
    unwarped = pair.moving if role == "fixed" else pair.fixed
    assert torch.equal(unwarped, image)
    crop = (0, 0) + (slice(4, -4),) * 3
    aligned = geometry.warp(pair.moving, pair.field)
    corr = np.corrcoef(aligned[crop].flatten().numpy(), pair.fixed[crop].flatten().numpy())[0, 1]
    assert corr > 0.999
    before = np.corrcoef(pair.moving[crop].flatten().numpy(), pair.fixed[crop].flatten().numpy())[0, 1]
    assert before < corr

    aligned_labels = geometry.warp_labels(pair.moving_labels, pair.field)
    for value in (3, 8, 21):
        a, b = aligned_labels == value, pair.fixed_labels == value
        assert 2 * float((a & b).sum()) / float(a.sum() + b.sum()) > 0.9
    assert pair.fixed_mask.dtype == torch.bool and pair.moving_mask.dtype == torch.bool

    k_fix, k_mov = pair.fixed_keypoints.numpy(), pair.moving_keypoints.numpy()
    assert k_fix.shape == (40, 3) and pair.fixed_keypoints.dtype == torch.float64
    assert pair.fixed_mask[0, 0][tuple(k_fix.round().astype(int).T)].all()
    np.testing.assert_allclose(k_fix + _map_field(random_field, k_fix), k_mov, atol=1e-4)  # TRE of the truth ~ 0
    fixed_values = ndimage.map_coordinates(pair.fixed[0, 0].numpy(), k_fix.T, order=1)
    moving_values = ndimage.map_coordinates(pair.moving[0, 0].numpy(), k_mov.T, order=1)
    np.testing.assert_allclose(moving_values, fixed_values, atol=0.02)
    assert pair.field_l2r().shape == (*SHAPE, 3)


@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_make_pair_carries_given_keypoints(role, random_field):
    points = np.random.default_rng(6).uniform(8, 40, size=(25, 3))
    pair = synthetic.make_pair(_smooth_image(), keypoints=points, deformation=random_field, warped_role=role)
    given = pair.moving_keypoints if role == "fixed" else pair.fixed_keypoints
    np.testing.assert_array_equal(given.numpy(), points)  # the unwarped copy keeps the given points
    k_fix, k_mov = pair.fixed_keypoints.numpy(), pair.moving_keypoints.numpy()
    np.testing.assert_allclose(k_fix + _map_field(random_field, k_fix), k_mov, atol=1e-4)
    assert pair.inverse_residual < 0.05


def test_make_pair_default_deformation_and_intensity_are_seeded():
    image = _smooth_image((32, 32, 32))
    settings = synthetic.IntensitySettings(bias_strength=0.1, gamma_range=(0.8, 1.2), noise_std=0.01)
    first = synthetic.make_pair(image, spacing_mm=SPACING, intensity=settings, warped_role="fixed", seed=7)
    second = synthetic.make_pair(image, spacing_mm=SPACING, intensity=settings, warped_role="fixed", seed=7)
    third = synthetic.make_pair(image, spacing_mm=SPACING, intensity=settings, warped_role="fixed", seed=8)
    assert torch.equal(first.field, second.field) and torch.equal(first.fixed, second.fixed)
    assert not torch.allclose(first.field, third.field)
    assert float(_mm(first.field).max()) == pytest.approx(5.0, rel=1e-4)
    with pytest.raises(ValueError):
        synthetic.make_pair(image, warped_role="both")
    with pytest.raises(ValueError):
        synthetic.make_pair(image, deformation=torch.zeros((1, 3, 8, 8, 8)))


def test_intensity_perturbation_keeps_range_and_structure():
    image = _smooth_image((32, 32, 32)) * 100 - 20
    perturbed = synthetic.intensity_perturbation(image, bias_strength=0.2, gamma_range=(0.7, 1.4), noise_std=0.02, seed=1)
    assert perturbed.shape == image.shape and perturbed.dtype == image.dtype
    assert float(perturbed.min()) >= float(image.min()) - 1e-4 and float(perturbed.max()) <= float(image.max()) + 1e-4
    assert not torch.allclose(perturbed, image)
    assert np.corrcoef(perturbed.flatten().numpy(), image.flatten().numpy())[0, 1] > 0.9
    again = synthetic.intensity_perturbation(image, bias_strength=0.2, gamma_range=(0.7, 1.4), noise_std=0.02, seed=1)
    assert torch.equal(perturbed, again)
    identity = synthetic.intensity_perturbation(image, bias_strength=0.0, gamma_range=(1.0, 1.0), noise_std=0.0)
    torch.testing.assert_close(identity, image, atol=1e-4, rtol=0)
    ct = torch.full((8, 8, 8), -1000, dtype=torch.int16)
    ct[2:6] = 40
    assert synthetic.intensity_perturbation(ct).dtype == torch.float32


def _phantom(shape=(64, 56, 60), spacing=(2.0, 2.0, 2.5)):
    """Thorax phantom in HU: air -1000, body 0, two lungs -850 with vessels, a trachea and a gas bubble."""
    x = (np.indices(shape, dtype=np.float64) + 0.5) * np.array(spacing)[:, None, None, None]

    def ellipsoid(centre, radii):
        return (((x - np.array(centre)[:, None, None, None]) / np.array(radii)[:, None, None, None]) ** 2).sum(0) <= 1

    body = ellipsoid((64, 56, 75), (56, 44, 90))
    lungs = ellipsoid((40, 56, 70), (18, 28, 45)) | ellipsoid((88, 56, 70), (18, 28, 45))
    ct = np.where(body, 0.0, -1000.0)
    ct[lungs] = -850.0
    for centre in [(40, 56, 70), (88, 50, 60), (36, 60, 90)]:
        ct[ellipsoid(centre, (3, 3, 3))] = 40.0  # vessels: holes to fill
    ct[ellipsoid((64, 56, 135), (6, 6, 6))] = -900.0  # bowel gas below the lungs: dropped
    ct += np.random.default_rng(0).normal(0, 20, size=shape)
    return ct, lungs, spacing


def test_lung_mask_recovers_phantom_lungs():
    ct, lungs, spacing = _phantom()
    mask = masks.lung_mask(ct, spacing)
    assert mask.dtype == bool and mask.shape == ct.shape
    dice = 2 * (mask & lungs).sum() / (mask.sum() + lungs.sum())
    assert dice > 0.9
    assert ndimage.label(mask)[1] == 2
    assert not masks.lung_mask(np.zeros((8, 8, 8)), spacing).any()
    with pytest.raises(ValueError):
        masks.lung_mask(np.zeros((8, 8)), spacing)


def test_sample_keypoints_inside_mask_and_apart():
    mask = _blobs() > 0
    points = masks.sample_keypoints(mask, 60, seed=2, min_distance=4.0)
    assert points.shape == (60, 3) and points.dtype == np.float64
    assert mask[tuple(points.astype(int).T)].all()
    assert pdist(points).min() >= 4.0
    np.testing.assert_array_equal(points, masks.sample_keypoints(torch.as_tensor(mask)[None, None], 60, seed=2,
                                                                     min_distance=4.0))
    crowded = masks.sample_keypoints(np.ones((4, 4, 4), dtype=bool), 100, min_distance=2.0)
    assert 0 < len(crowded) < 100 and pdist(crowded).min() >= 2.0
    assert len(masks.sample_keypoints(mask, 10)) == 10
    with pytest.raises(ValueError):
        masks.sample_keypoints(np.zeros((4, 4, 4), dtype=bool), 5)


def test_lung_mask_of_shared_ct_has_a_plausible_volume(shared_data):
    path = shared_data / "lung" / "imagesTr" / "LUNG_0001_0000.nii.gz"
    if not path.exists():
        pytest.skip(f"no lung CT at {path}")
    image = nib.load(path)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    mask = masks.lung_mask(np.asarray(image.dataobj), spacing, axis=2)
    litres = mask.sum() * np.prod(spacing) / 1e6
    assert 2.0 < litres < 8.0
