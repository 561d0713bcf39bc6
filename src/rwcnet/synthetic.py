"""Semi-synthetic registration pairs: known smooth deformations, intensity changes, keypoints through them.

Every warp, composition and point mapping goes through :mod:`rwcnet.geometry`,
so the ground truth follows the conventions of the rest of rwcnet: a field is
a ``(1, 3, X, Y, Z)`` pull-back displacement in voxels on the fixed grid, and
a pair satisfies ``moving(x + u_gt(x)) ≈ fixed(x)``. Deformations are made in
millimetres (``spacing_mm`` per array axis) and returned in voxels.
Everything is seeded: the same seed gives the same result on any device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from rwcnet import geometry
from rwcnet.geometry.layout import field_array
from rwcnet.masks import sample_keypoints

Tensor = torch.Tensor
log = logging.getLogger(__name__)


def _radius(sigma: float) -> int:
    return int(math.ceil(3.0 * sigma)) if sigma > 0 else 0


def _blur(volume: Tensor, sigma_voxels: Sequence[float], *, valid: bool = False) -> Tensor:
    """Separable Gaussian blur of ``(B, C, X, Y, Z)``, sigma in voxels per axis.

    ``valid=True`` convolves without padding (each axis shrinks by twice the
    kernel radius ``ceil(3 sigma)``); otherwise the border is replicated.
    """
    channels = volume.shape[1]
    for axis, sigma in enumerate(sigma_voxels):
        radius = _radius(sigma)
        if radius == 0:
            continue
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        size = [1, 1, 1]
        size[axis] = 2 * radius + 1
        weight = (kernel / kernel.sum()).to(volume).view(1, 1, *size).expand(channels, 1, *size).contiguous()
        if not valid:
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
            volume = F.pad(volume, pad, mode="replicate")
        volume = F.conv3d(volume, weight, groups=channels)
    return volume


def _mm_view(spacing_mm: Sequence[float], like: Tensor) -> Tensor:
    return torch.as_tensor(list(spacing_mm), dtype=like.dtype, device=like.device).view(1, 3, 1, 1, 1)


def _max_mm(field: Tensor, spacing_mm: Sequence[float]) -> float:
    """Largest displacement length in mm of a voxel field ``(1, 3, X, Y, Z)``."""
    return float((field * _mm_view(spacing_mm, field)).norm(dim=1).max())


def _bspline_upsample(coarse: Tensor, shape: Sequence[int]) -> Tensor:
    """Cubic B-spline field ``(B, C, *shape)`` from control points ``(B, C, a, b, c)``.

    The control points span one more control spacing than the output on
    each side (so every output voxel has its full support); the output corners
    sit on the second and second-to-last control points. The result is twice
    continuously differentiable, without the kinks of trilinear upsampling.
    """
    out = coarse
    for axis, n in enumerate(shape):
        count = coarse.shape[2 + axis]
        t = 1.0 + torch.arange(n, dtype=torch.float64) * (count - 3) / max(n - 1, 1)
        x = (t[:, None] - torch.arange(count, dtype=torch.float64)[None]).abs()
        weight = torch.where(x < 1, 2.0 / 3.0 - x**2 + x**3 / 2, torch.where(x < 2, (2 - x).clamp_min(0) ** 3 / 6, 0.0))
        out = torch.tensordot(out, weight.to(coarse), dims=([2 + axis], [1])).movedim(-1, 2 + axis)
    return out


def _smooth_noise(shape, spacing_mm, smoothness_mm: float, generator: torch.Generator, device, dtype) -> Tensor:
    """White noise smoothed by a Gaussian of std ``smoothness_mm``: ``(1, 3, *shape)``, unscaled.

    The noise is drawn on a coarse grid of spacing ``smoothness_mm / 2`` (on the
    CPU, in float64, so it is the same on every device), blurred there and
    brought to the image grid by cubic B-splines.
    """
    extent = [(n - 1) * s for n, s in zip(shape, spacing_mm)]
    coarse = [max(2, int(round(e / (smoothness_mm / 2.0))) + 1) for e in extent]
    sigma = [smoothness_mm * (c - 1) / e if e > 0 else 0.0 for c, e in zip(coarse, extent)]
    padded = [c + 2 + 2 * _radius(s) for c, s in zip(coarse, sigma)]
    noise = torch.randn((1, 3, *padded), generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return _bspline_upsample(_blur(noise, sigma, valid=True), shape)


def _smooth_volume(volume: Tensor, sigma_mm: float, spacing_mm: Sequence[float]) -> Tensor:
    """Gaussian blur of ``(B, C, X, Y, Z)`` with std ``sigma_mm``, computed on an area-averaged coarser grid."""
    factor = max(1, int(min(sigma_mm / s for s in spacing_mm) // 2))
    coarse = [max(1, math.ceil(n / factor)) for n in volume.shape[2:]]
    small = F.adaptive_avg_pool3d(volume, coarse)
    small = _blur(small, [sigma_mm * c / (n * s) for c, n, s in zip(coarse, volume.shape[2:], spacing_mm)])
    return F.interpolate(small, size=tuple(volume.shape[2:]), mode="trilinear", align_corners=False)


def _invertible(field: Tensor, spacing_mm: Sequence[float], min_jacobian: float) -> Tensor:
    """Return ``field`` if its Jacobian determinant exceeds ``min_jacobian`` everywhere.

    Otherwise the field is taken as a stationary velocity, integrated by
    scaling and squaring and rescaled so that its largest displacement (mm)
    stays the same; if that still folds, the velocity is shrunk until it does not.
    """
    if not 0.0 <= min_jacobian < 1.0:
        raise ValueError(f"min_jacobian must be in [0, 1), not {min_jacobian}")
    det = float(geometry.jacobian_determinant(field).min())
    if det > min_jacobian:
        log.info("deformation: min det J %.3f, max displacement %.2f mm", det, _max_mm(field, spacing_mm))
        return field
    target = _max_mm(field, spacing_mm)
    velocity = field
    for _ in range(3):
        velocity = velocity * (target / max(_max_mm(geometry.integrate_velocity(velocity), spacing_mm), 1e-12))
    field = geometry.integrate_velocity(velocity)
    det = float(geometry.jacobian_determinant(field).min())
    while det <= min_jacobian:
        velocity = 0.8 * velocity
        field = geometry.integrate_velocity(velocity)
        det = float(geometry.jacobian_determinant(field).min())
        log.warning("deformation folded; velocity scaled down to %.2f mm", _max_mm(field, spacing_mm))
    log.info("deformation (integrated velocity): min det J %.3f, max displacement %.2f mm",
             det, _max_mm(field, spacing_mm))
    return field


def coarse_grid(shape: Sequence[int], spacing_mm: Sequence[float], factor: int) -> tuple[list[int], list[float]]:
    """A grid about ``factor`` times coarser over the same extent (at least 2 voxels per axis): its shape and spacing
    (mm). Deformations are generated there and brought back with :func:`rwcnet.geometry.resize_field`."""
    coarse = [max(2, math.ceil(n / factor)) for n in shape]
    return coarse, [s * n / c for s, n, c in zip(spacing_mm, shape, coarse)]


def random_deformation(shape: Sequence[int], spacing_mm: Sequence[float], *, magnitude_mm: float,
                       smoothness_mm: float, seed: int = 0, min_jacobian: float = 0.1,
                       device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A smooth random invertible deformation: ``(1, 3, *shape)`` pull-back field in voxels.

    Gaussian-smoothed white noise (std ``smoothness_mm``) scaled so that the
    **largest** displacement length is ``magnitude_mm``. Where that field's
    Jacobian determinant would drop to ``min_jacobian`` or below, it is used as a
    stationary velocity and integrated (:func:`geometry.integrate_velocity`),
    keeping the largest displacement; the min det J is logged.
    """
    shape = tuple(int(n) for n in shape)
    if magnitude_mm <= 0:
        return torch.zeros((1, 3, *shape), device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    noise_mm = _smooth_noise(shape, spacing_mm, smoothness_mm, generator, device, dtype)
    field = noise_mm / _mm_view(spacing_mm, noise_mm)
    field = field * (magnitude_mm / _max_mm(field, spacing_mm))
    return _invertible(field, spacing_mm, min_jacobian)


def breathing_deformation(shape: Sequence[int], spacing_mm: Sequence[float], *, amplitude_mm: float = 15.0,
                          axis: int = 2, towards: str = "+", ap_axis: int = 1, lung_mask=None,
                          expansion: float = 0.2, variation: float = 0.1, seed: int = 0,
                          min_jacobian: float = 0.1, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A breathing-like pull-back field ``(1, 3, *shape)`` in voxels, smooth and invertible.

    ``axis`` is the cranio-caudal array axis and ``towards`` the direction
    of the feet along it: ``"+"`` when the index grows towards the feet (an
    ``I`` in the orientation code, e.g. LPI as in the shared lung CT), ``"-"``
    for an ``S`` (e.g. RAS). The cranio-caudal displacement is
    proportional to ``smoothstep(t) * w`` with its largest value
    ``amplitude_mm``; ``t`` goes from 0 at the lung apex to 1 at the lung base
    (the whole axis without ``lung_mask``), and ``w`` = 0.5 + 0.5 x the lung
    mask blurred by 15 mm and divided by its maximum (1 without a mask). It
    points towards the head, so warping an end-exhale image by it moves the
    diaphragm towards the feet (an inhale-like image); a negative
    ``amplitude_mm`` reverses the motion (exhale-like: the diaphragm rises and
    the chest contracts). Along ``ap_axis`` the
    chest expands by up to ``expansion * amplitude_mm`` at its ends, and a
    random smooth field of largest displacement ``variation * amplitude_mm``
    (smoothness 40 mm) is added. Folding is removed as in :func:`random_deformation`.
    """
    if towards not in ("+", "-"):
        raise ValueError(f"towards must be '+' or '-', not {towards!r}")
    if axis == ap_axis:
        raise ValueError("the cranio-caudal axis and the anterior-posterior axis must differ")
    shape = tuple(int(n) for n in shape)
    n = shape[axis]
    lo, hi = 0, n - 1
    mask = None
    if lung_mask is not None:
        mask = np.asarray(lung_mask.cpu() if isinstance(lung_mask, Tensor) else lung_mask, dtype=bool).reshape(shape)
        rows = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        if rows.size:
            lo, hi = int(rows.min()), int(rows.max())
    position = torch.arange(n, dtype=torch.float64)
    t = (position - lo) if towards == "+" else (hi - position)
    t = (t / max(hi - lo, 1)).clamp(0.0, 1.0)
    profile = (t * t * (3.0 - 2.0 * t)).to(device=device, dtype=dtype)
    view = [1, 1, 1]
    view[axis] = n
    profile = profile.view(1, 1, *view)
    weight = torch.ones((1, 1, *shape), device=device, dtype=dtype)
    if mask is not None and mask.any():
        blurred = _smooth_volume(torch.as_tensor(mask, device=device, dtype=dtype)[None, None], 15.0, spacing_mm)
        weight = 0.5 + 0.5 * blurred / blurred.max()
    ap = torch.linspace(-1.0, 1.0, shape[ap_axis], device=device, dtype=dtype)
    ap_view = [1, 1, 1]
    ap_view[ap_axis] = shape[ap_axis]
    sign = 1.0 if towards == "+" else -1.0
    field_mm = torch.zeros((1, 3, *shape), device=device, dtype=dtype)
    shape_cc = profile * weight
    field_mm[:, axis] = (-sign * amplitude_mm * shape_cc / shape_cc.max().clamp_min(1e-12))[:, 0]
    field_mm[:, ap_axis] = (-expansion * amplitude_mm * profile * ap.view(1, 1, *ap_view))[:, 0]
    field = field_mm / _mm_view(spacing_mm, field_mm)
    field = field + random_deformation(shape, spacing_mm, magnitude_mm=variation * abs(amplitude_mm), smoothness_mm=40.0,
                                       seed=seed, min_jacobian=min_jacobian, device=device, dtype=dtype)
    return _invertible(field, spacing_mm, min_jacobian)


def intensity_perturbation(image: Tensor, *, bias_strength: float = 0.1, gamma_range: tuple[float, float] = (0.8, 1.25),
                           noise_std: float = 0.01, seed: int = 0) -> Tensor:
    """Bias field, gamma and noise on an image ``(..., X, Y, Z)``; returns a float tensor of the same shape.

    The image is mapped to [0, 1] by its min and max, raised to a gamma drawn
    log-uniformly from ``gamma_range``, multiplied by ``exp(b)`` with ``b`` a
    smooth field (cubic B-spline on 6^3 random control points) of largest ``|b|`` =
    ``bias_strength``, given Gaussian noise of std ``noise_std`` (fraction of
    the range), clipped to [0, 1] and mapped back, so the original min..max
    range is kept.
    """
    image = image if image.is_floating_point() else image.float()
    lo, hi = image.min(), image.max()
    if not bool(hi > lo):
        return image.clone()
    generator = torch.Generator().manual_seed(seed)
    low, high = math.log(gamma_range[0]), math.log(gamma_range[1])
    gamma = math.exp(low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64)))
    spatial = tuple(image.shape[-3:])
    coarse = torch.randn((1, 1, 6, 6, 6), generator=generator, dtype=torch.float64).to(image)
    bias = _bspline_upsample(coarse, spatial)
    bias = bias * (bias_strength / bias.abs().max().clamp_min(1e-12))
    noise = torch.randn(image.shape, generator=generator, dtype=torch.float64).to(image)
    unit = ((image - lo) / (hi - lo)) ** gamma
    unit = (unit * torch.exp(bias).view(spatial) + noise_std * noise).clamp(0.0, 1.0)
    return unit * (hi - lo) + lo


class IntensitySettings(BaseModel):
    """Parameters of :func:`intensity_perturbation` (also the ``intensity`` section of a training config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bias_strength: float = Field(0.1, ge=0)
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise_std: float = Field(0.01, ge=0)


@dataclass
class SyntheticPair:
    """A pair with known truth: ``moving(x + field(x)) ≈ fixed(x)`` on the fixed grid.

    Images ``(1, 1, X, Y, Z)`` float, labels the input's integer dtype, masks
    bool, keypoints ``(N, 3)`` float64 voxel indices with
    ``moving_keypoints ≈ fixed_keypoints + field(fixed_keypoints)``, field
    ``(1, 3, X, Y, Z)`` voxels. ``inverse_residual`` is the largest residual (voxels)
    of whatever inversion was needed (0 when none was).
    """

    fixed: Tensor
    moving: Tensor
    field: Tensor
    warped_role: str
    min_jacobian: float
    inverse_residual: float
    fixed_labels: Tensor | None = None
    moving_labels: Tensor | None = None
    fixed_mask: Tensor | None = None
    moving_mask: Tensor | None = None
    fixed_keypoints: Tensor | None = None
    moving_keypoints: Tensor | None = None

    def field_l2r(self) -> np.ndarray:
        """The field in the Learn2Reg layout ``(X, Y, Z, 3)`` float32 (voxels, fixed grid)."""
        return field_array(self.field).astype(np.float32)


def _as_volume(array, *, dtype=None, device=None) -> Tensor:
    """``(X, Y, Z)`` or ``(1, 1, X, Y, Z)`` array or tensor to a ``(1, 1, X, Y, Z)`` tensor."""
    tensor = torch.as_tensor(np.asarray(array) if not isinstance(array, Tensor) else array, device=device)
    if tensor.dim() == 3:
        tensor = tensor[None, None]
    if tensor.dim() != 5 or tensor.shape[:2] != (1, 1):
        raise ValueError(f"expected a (X, Y, Z) or (1, 1, X, Y, Z) volume, got shape {tuple(tensor.shape)}")
    return tensor if dtype is None else tensor.to(dtype)


def make_pair(image, *, labels=None, mask=None, keypoints=None, n_keypoints: int = 0, keypoint_distance: float = 3.0,
              deformation: Tensor | None = None, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
              warped_role: str = "moving", intensity: IntensitySettings | None = None,
              label_method: str = "nearest", seed: int = 0) -> SyntheticPair:
    """Make a registration pair from one image and a known deformation ``phi`` (the ground truth).

    ``phi`` is ``deformation`` (``(1, 3, X, Y, Z)`` voxels) or, when None,
    ``random_deformation(shape, spacing_mm, magnitude_mm=5, smoothness_mm=20, seed=seed)``.
    The returned field is always ``phi``:

    * ``warped_role="fixed"``: fixed = image∘(id + phi), moving = image;
      then ``moving(x + phi(x)) = fixed(x)`` exactly.
    * ``warped_role="moving"``: fixed = image, moving = image∘(id + v) with
      ``v`` the inverse of ``phi`` (:func:`rwcnet.geometry.invert_field`, residual reported);
      then ``moving(x + phi(x)) ≈ fixed(x)``.

    Labels and masks go through the same warp (labels by ``label_method``,
    masks nearest). ``keypoints`` ``(N, 3)`` are voxel points on the input
    image, which is the unwarped copy: for ``"moving"`` they are the fixed
    keypoints and the moving ones are ``k + phi(k)``; for ``"fixed"`` they
    are the moving keypoints and the fixed ones are found by
    :func:`geometry.invert_points`. Without ``keypoints``, ``n_keypoints``
    fixed keypoints are sampled in the fixed mask (whole grid without one),
    ``keypoint_distance`` voxels apart. ``intensity`` perturbs the warped copy.
    """
    volume = _as_volume(image)
    volume = volume if volume.dtype == torch.float64 else volume.float()
    shape = tuple(volume.shape[2:])
    if deformation is None:
        deformation = random_deformation(shape, spacing_mm, magnitude_mm=5.0, smoothness_mm=20.0, seed=seed,
                                         device=volume.device, dtype=volume.dtype)
    if tuple(deformation.shape) != (1, 3, *shape):
        raise ValueError(f"deformation has shape {tuple(deformation.shape)}, expected {(1, 3, *shape)}")
    field = deformation.to(volume)
    residual = 0.0
    if warped_role == "fixed":
        warp_field = field
    elif warped_role == "moving":
        inverse = geometry.invert_field(field)
        warp_field, residual = inverse.field, float(inverse.residual.max())
    else:
        raise ValueError(f"warped_role must be 'fixed' or 'moving', not {warped_role!r}")

    warped = geometry.warp(volume, warp_field)
    if intensity is not None:
        warped = intensity_perturbation(warped, **intensity.model_dump(), seed=seed + 1)
    label_map = None if labels is None else _as_volume(labels, device=volume.device)
    mask_map = None if mask is None else _as_volume(mask, dtype=torch.uint8, device=volume.device)
    warped_labels = None if label_map is None else geometry.warp_labels(label_map, warp_field, method=label_method)
    warped_mask = None if mask_map is None else geometry.warp_labels(mask_map, warp_field).bool()
    mask_bool = None if mask_map is None else mask_map.bool()
    if warped_role == "fixed":
        fixed, moving, fixed_labels, moving_labels = warped, volume, warped_labels, label_map
        fixed_mask, moving_mask = warped_mask, mask_bool
    else:
        fixed, moving, fixed_labels, moving_labels = volume, warped, label_map, warped_labels
        fixed_mask, moving_mask = mask_bool, warped_mask

    field64 = field.double()
    fixed_points = moving_points = None
    if keypoints is not None:
        points = torch.as_tensor(np.asarray(keypoints, dtype=np.float64), device=volume.device).reshape(1, -1, 3)
        if warped_role == "moving":
            fixed_points, moving_points = points, geometry.transform_points(points, field64)
        else:
            fixed_points, moving_points = geometry.invert_points(points, field64), points
            point_residual = (geometry.transform_points(fixed_points, field64) - points).norm(dim=-1).max()
            residual = max(residual, float(point_residual))
    elif n_keypoints > 0:
        region = fixed_mask[0, 0] if fixed_mask is not None else torch.ones(shape, dtype=torch.bool)
        sampled = sample_keypoints(region, n_keypoints, seed=seed, min_distance=keypoint_distance)
        fixed_points = torch.as_tensor(sampled, device=volume.device)[None]
        moving_points = geometry.transform_points(fixed_points, field64)

    return SyntheticPair(
        fixed=fixed, moving=moving, field=field, warped_role=warped_role,
        min_jacobian=float(geometry.jacobian_determinant(field).min()), inverse_residual=residual,
        fixed_labels=fixed_labels, moving_labels=moving_labels, fixed_mask=fixed_mask, moving_mask=moving_mask,
        fixed_keypoints=None if fixed_points is None else fixed_points[0],
        moving_keypoints=None if moving_points is None else moving_points[0],
    )
