"""Fine-scale refinement: greedy-style gradient descent on local NCC (or MIND) down to full resolution.

Runs after the network (and/or instance optimisation) on the working grid. The
field it returns is ``init + r``: the initial field plus a residual ``r`` that
is optimised coarse to fine (``levels``: downsampling factors, e.g. 4, 2, 1;
images brought to a level by area averaging, or as greedy by a Gaussian of
σ = ``pyramid_sigma`` × factor then resampling). At every level each iteration

1. samples the moving image (and its gradient) at ``x + init(x) + r(x)``;
2. computes the gradient of the similarity with respect to the displacement:
   for local NCC (``(2ρ+1)³`` windows, the squared correlation per window, or
   as greedy its value signed by the covariance, averaged over windows inside
   the fixed mask) exactly, from box sums, with the moving image's gradient
   taken from central differences or, as greedy, from its trilinear
   interpolant; for MIND-SSC the negative gradient of the feature SSD;
3. smooths it with a Gaussian (``sigma_update``, voxels of the level), times a
   gain with its largest vector capped at ``step`` voxels, adds ``momentum`` times
   the level's previous update (heavy ball), adds it to ``r`` (or composes it
   with the field);
4. smooths ``r`` (or the whole field) with a Gaussian (``sigma_field``).

This is the scheme of greedy (Yushkevich et al.) with its default smoothing
(1.732 and 0.7071 voxels), step (1 voxel) and NCC window (5³); ``compose``,
``scale_step`` and ``smooth_total`` make it greedy's update, and with
``ncc_signed`` and ``interpolant_gradient`` the NCC gradient matches greedy
1.4's own (``greedy -metric -og``: correlation 0.97-0.98 per component inside
a real brain pair, same scale; ``benchmarks/greedy_gradient.py``).
Filters are :class:`rwcnet.geometry.filters.SeparableFilter` (shifted sums into buffers, slab by slab, windows
clipped to the volume). Fields are pull-back displacements in voxels of the working grid, ``(1, 3, X, Y, Z)``;
images ``(1, 1, X, Y, Z)``. Updates are composed into the level's buffers, with no temporaries per iteration.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from rwcnet.geometry import identity_grid, resize_field, resize_volume, sample
from rwcnet.geometry.filters import SeparableFilter, box_half_kernel, gaussian_half_kernel
from rwcnet.geometry.grids import coarse_voxel_map
from rwcnet.instance_optimisation import mind_pair
from rwcnet.presets import Presets

Tensor = torch.Tensor
#: ``progress(step, total, similarity)`` after every iteration (steps counted over all levels).
Progress = Callable[[int, int, float], None]
#: Windows whose fixed variance is below this fraction of the fixed image's variance are flat: they do not count.
FLAT = 1e-3


class RefineConfig(BaseModel):
    """Parameters of the fine-scale refinement."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    levels: tuple[int, ...] = Field((4, 2, 1), description="downsampling factor of each level, coarse to fine")
    iterations: tuple[int, ...] = Field((100, 50, 20), description="iterations at each level")
    ncc_radius: int = Field(2, ge=1, description="local NCC window half-width (voxels of the level)")
    ncc_signed: bool = Field(False, description="maximise sign(cov)·ncc² per window (greedy): anticorrelated windows "
                                                "are pushed to correlate instead of being rewarded as by ncc²")
    interpolant_gradient: bool = Field(False, description="NCC: the moving image's gradient is that of its trilinear "
                                                          "interpolant at each sample point (greedy), not central differences sampled")
    pyramid_sigma: float = Field(0.0, ge=0, description="Gaussian σ (× the level's factor, fine voxels) smoothing the "
                                                          "images before they are resampled to a coarser level (greedy: 0.5); 0: area averaging")
    sigma_update: float = Field(1.732, ge=0, description="Gaussian smoothing of each update (voxels of the level)")
    sigma_field: float = Field(0.7071, ge=0, description="Gaussian smoothing of the field after each update")
    smooth_total: bool = Field(False, description="smooth the whole field (initial + residual), as greedy does, not the residual alone")
    step: float = Field(1.0, gt=0, description="largest update per iteration (voxels of the level)")
    scale_step: bool = Field(False, description="scale every update so its largest vector is exactly ``step`` (greedy), not only cap it")
    momentum: float = Field(0.0, ge=0, lt=1, description="heavy-ball momentum: each level's update is the capped step plus "
                                                          "this times the previous update (0: plain gradient steps)")
    compose: bool = Field(False, description="compose each update with the field, u <- δ + u∘(id + δ) (greedy), instead of adding it")
    gain_ncc: float = Field(1.0, gt=0, description="NCC: update = gain × smoothed gradient of Σ ncc (voxels), capped at step")
    gain_mind: float = Field(0.2, gt=0, description="MIND: update = gain × smoothed gradient of −½ Σ SSD, capped at step (docs/results.md)")
    mind_radius: int = Field(1, ge=0, description="MIND-SSC patch radius")
    mind_dilation: int = Field(2, ge=1, description="MIND-SSC neighbour distance")
    contrast_threshold: float = Field(0.3, description="auto metric: NCC when the foreground correlation reaches this")
    mask_margin: int = Field(0, ge=0, description="widen both masks by this many voxels (a cube) first, so that windows "
                                                 "and points just outside a mask, at the organ's edge, still count")


#: Presets by modality, like the instance-optimisation presets (docs/results.md has the measurements behind them).
#: brain: greedy's update smoothing, composed updates (additive ones folded 0.33 % of the real pair's voxels)
#: and greedy's NCC gradient (signed ncc², the interpolant's image gradient: Dice 0.7401 against 0.7331 from the
#: network's field). Momentum 0.5 at 100/50/24 iterations with σ_field 1.17 gives what 200/100/40 without momentum
#: and σ_field 0.85 gave (default chain, real pair: Dice 0.7455 against 0.7459, SDlogJ 0.0821 against 0.0820,
#: greedy 0.7425; ten semi-synthetic brains: EPE 0.1883 against 0.1882 mm, greedy 0.2100) in 65 % of the time.
#: lung: greedy's defaults with additive updates and the unsigned ncc², masks widened by 5 voxels (breathing pairs
#: from a zero field: TRE 0.246 mm against 0.285 with the masks as given; the lung's edge carries the motion).
REFINE_PRESETS: Presets[RefineConfig] = Presets("refinement", {
    "brain": RefineConfig(compose=True, iterations=(100, 50, 24), sigma_field=1.17, momentum=0.5, ncc_signed=True,
                          interpolant_gradient=True),
    "lung": RefineConfig(mask_margin=5),
})


def refine_config(preset: str | RefineConfig = "brain", **overrides) -> RefineConfig:
    """The :class:`RefineConfig` of a preset name (or a given config) with the non-``None`` ``overrides`` applied."""
    config = REFINE_PRESETS.resolve(preset, **overrides)
    if len(config.levels) != len(config.iterations):
        raise ValueError(f"refinement: {len(config.levels)} levels but {len(config.iterations)} iteration counts")
    return config


def flat_levels(fixed: Tensor, moving: Tensor, weight: Tensor | None = None) -> tuple[float, float]:
    """``(flat, eps)`` of :func:`local_ncc`: ``FLAT ×`` the fixed image's variance, ``FLAT² ×`` the moving one's.

    With ``weight`` (the fixed mask), the variances are taken where it is positive (the moving
    image's too when it lies on the same grid).
    """
    whole_fixed, whole_moving = float(fixed.var()), float(moving.var())
    if weight is not None and bool((weight > 0).any()):
        inside = weight > 0
        fixed = fixed[inside]
        moving = moving[inside] if moving.shape == inside.shape else moving
    # a flat masked region falls back to the whole image's variance (else every window would count and divide by ~0)
    return FLAT * (float(fixed.var()) or whole_fixed) + 1e-30, FLAT**2 * (float(moving.var()) or whole_moving) + 1e-30


def local_ncc(fixed: Tensor, warped: Tensor, radius: int = 2, *, weight: Tensor | None = None,
              flat: float | None = None, eps: float | None = None) -> Tensor:
    """Mean over windows of the squared local correlation of two ``(1, 1, X, Y, Z)`` volumes (windows clipped to the volume).

    Per voxel ``x`` over the ``(2ρ+1)³`` window: ``cov² / (var_f (var_w + eps))`` where
    ``var_f > flat``, else 0 (defaults: :func:`flat_levels`). Gating on the fixed image
    alone keeps identical windows a stationary point up to ``eps / var_w`` and never
    switches a window on or off while the moving side moves. ``weight`` (e.g. the fixed
    mask) weighs the windows. A scalar in [0, 1].
    """
    default_flat, default_eps = flat_levels(fixed, warped, weight)
    flat = default_flat if flat is None else flat
    eps = default_eps if eps is None else eps
    box = SeparableFilter(box_half_kernel(radius), fixed.shape[2:], 5, device=fixed.device, dtype=fixed.dtype)
    terms = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], 1)
    means = box(terms, torch.empty_like(terms))
    mf, mw, mff, mww, mfw = means.unbind(1)
    var_f = mff - mf * mf
    ncc = torch.where(var_f > flat, (mfw - mf * mw) ** 2 / (var_f.clamp_min(flat) * ((mww - mw * mw).clamp_min(0) + eps)), 0)
    if weight is None:
        return ncc.mean()
    return (ncc * weight[:, 0]).sum() / weight.sum().clamp_min(1e-12)


def foreground_correlation(fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> float:
    """Pearson correlation of two volumes over the fixed mask, or where the fixed image is above its mean."""
    inside = (mask > 0) if mask is not None else fixed > fixed.mean()
    a, b = fixed[inside].double(), warped[inside].double()
    if a.numel() < 2:
        return 1.0
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / ((a * a).sum().sqrt() * (b * b).sum().sqrt()).clamp_min(1e-12))


class _Level:
    """Buffers and constant terms of one resolution level."""

    def __init__(self, fixed: Tensor, moving: Tensor, base: Tensor, weight: Tensor | None, moving_mask: Tensor | None,
                 metric: str, config: RefineConfig, moving_map: np.ndarray | None = None):
        shape = tuple(fixed.shape[2:])
        device = fixed.device
        self.metric, self.weight, self.fixed = metric, weight, fixed
        self.to_moving = None if moving_map is None else torch.as_tensor(moving_map, dtype=torch.float32, device=device)
        self.base, self.smooth_total, self.compose, self.scale_step = base, config.smooth_total, config.compose, config.scale_step
        with torch.no_grad():
            self.identity = identity_grid(shape, device=device)
            self.origin = self.identity + base  # x + init(x), voxels of the level
            self.interpolant_gradient = metric == "ncc" and config.interpolant_gradient
            if metric == "ncc" and not self.interpolant_gradient:  # the moving image and its gradient, sampled together
                stack = [moving, *torch.gradient(moving, dim=(2, 3, 4))]
            else:
                stack = [moving]
            if moving_mask is not None:
                stack.append(moving_mask)
            self.moving = torch.cat(stack, 1)
        self.has_moving_mask = moving_mask is not None
        self.coords = torch.empty(1, 3, *shape, device=device)
        self.points = self.coords if self.to_moving is None else torch.empty(1, 3, *shape, device=device)
        self.force = torch.empty(1, 3, *shape, device=device)
        self.smoothed = torch.empty(1, 3, *shape, device=device)
        self.momentum = config.momentum
        self.velocity = torch.zeros(1, 3, *shape, device=device) if config.momentum > 0 else None  # the last update
        self.update_filter = SeparableFilter(gaussian_half_kernel(config.sigma_update), shape, 3, device=device)
        self.field_filter = SeparableFilter(gaussian_half_kernel(config.sigma_field), shape, 3, device=device)
        if metric == "ncc":
            self.signed = config.ncc_signed
            self.box = SeparableFilter(box_half_kernel(config.ncc_radius), shape, 4, device=device)
            self.stats = torch.empty(1, 4, *shape, device=device)
            self.terms = torch.empty(1, 4, *shape, device=device)
            self.mf = self.box(fixed, torch.empty_like(fixed))
            flat, self.eps = flat_levels(fixed, moving, weight)
            var_f = self.box(fixed * fixed, torch.empty_like(fixed)) - self.mf**2
            self.structured = (var_f > flat).float()  # windows that count (see local_ncc)
            self.var_f = var_f.clamp_min_(flat)
            self.counts = self.box.window_weights()  # voxels per window

    def similarity_gradient(self, residual: Tensor) -> tuple[Tensor, float]:
        """The gradient of the similarity with respect to the displacement (into ``self.force``) and the similarity."""
        torch.add(self.origin, residual, out=self.coords)
        if self.interpolant_gradient:
            return self.force, self._interpolant_ncc_gradient()
        sampled = sample(self.moving, self._moving_points(self.coords, self.points))
        if self.metric == "ncc":
            value = self._ncc_gradient(sampled[:, :1], sampled[:, 1:4])
            if self.to_moving is not None:  # the image gradient is per moving voxel: back to fixed voxels (chain rule)
                forces = self.force.view(3, -1)
                forces.copy_(self.to_moving[:, :3].t() @ forces)
        else:
            value = self._mind_gradient(sampled[:, :-1] if self.has_moving_mask else sampled)
        if self.has_moving_mask:
            self.force.mul_(sampled[:, -1:])
        return self.force, value

    def _moving_points(self, coords: Tensor, out: Tensor | None = None) -> Tensor:
        """Working-grid voxel points ``(1, 3, X, Y, Z)`` as voxels of the moving image's own grid (``out`` when given)."""
        if self.to_moving is None:
            return coords
        linear, shift, flat = self.to_moving[:, :3], self.to_moving[:, 3:], coords.reshape(3, -1)
        if out is None:  # differentiable (the interpolant gradient)
            return torch.addmm(shift, linear, flat).view_as(coords)
        torch.addmm(shift, linear, flat, out=out.view(3, -1))
        return out

    def _interpolant_ncc_gradient(self) -> float:
        """NCC force with the gradient of the trilinear sampling itself: back-propagating ``d Σ ncc / d warped``
        through the sampling of the moving image gives ``d Σ ncc / d warped · ∇(interpolant)`` at every point."""
        with torch.enable_grad():
            coords = self.coords.detach().requires_grad_(True)
            sampled = sample(self.moving, self._moving_points(coords))
            derivative, value = self.ncc_derivative(sampled[:, :1].detach())
            if self.has_moving_mask:  # points outside the moving mask do not pull; the mask itself is not differentiated
                derivative = torch.cat([derivative * sampled[:, -1:].detach(), torch.zeros_like(derivative)], 1)
            (force,) = torch.autograd.grad(sampled, coords, grad_outputs=derivative)
        self.force.copy_(force)
        return value

    def _ncc_gradient(self, warped: Tensor, warped_gradient: Tensor) -> float:
        derivative, value = self.ncc_derivative(warped)
        torch.mul(warped_gradient, derivative, out=self.force)
        return value

    def ncc_derivative(self, warped: Tensor) -> tuple[Tensor, float]:
        """``d Σ_x ncc_x / d warped`` ``(1, 1, X, Y, Z)`` (exact, windows clipped as in :func:`local_ncc`) and ``local_ncc``.

        The derivative is of the *sum* over windows (weighted by the fixed
        mask), so its size per voxel does not depend on the volume's size.

        With window means ``m`` over ``n_x`` voxels, ``a = cov/(var_f (var_w + eps))``,
        ``b = cov²/(var_f (var_w + eps)²)`` (both 0 in flat windows): ``d ncc_x / d w(y) = 2/n_x (a_x (f(y) − m_f) − b_x (w(y) − m_w))``
        for ``y`` in window ``x``; summing over the windows that hold ``y`` is
        one more box sum.
        """
        f, stats, terms = self.fixed, self.stats, self.terms
        torch.cat([warped, warped * warped, f * warped], 1, out=terms[:, :3])
        means = self.box(terms[:, :3], stats[:, :3])
        mw, mww, mfw = means[:, 0:1], means[:, 1:2], means[:, 2:3]
        cov = mfw - self.mf * mw
        var_w = (mww - mw * mw).clamp_min_(0).add_(self.eps)
        a = cov / (self.var_f * var_w) * (self.structured * torch.sign(cov) if self.signed else self.structured)
        ncc = a * cov
        b = ncc / var_w
        total = float(ncc.numel()) if self.weight is None else self.weight.sum().clamp_min(1e-12)
        value = (ncc.sum() if self.weight is None else (ncc * self.weight).sum()) / total
        scale = 2.0 / self.counts
        if self.weight is not None:
            scale = scale * self.weight
        a, b = a * scale, b * scale
        torch.cat([a, a * self.mf, b, b * mw], 1, out=terms)
        sums = self.box(terms, stats)  # window means; times n_y below gives the window sums
        derivative = (f * sums[:, 0:1] - sums[:, 1:2] - warped * sums[:, 2:3] + sums[:, 3:4]) * self.counts
        return derivative, float(value)

    def _mind_gradient(self, warped: Tensor) -> float:
        residual = self.fixed - warped
        if self.weight is not None:
            residual = residual * self.weight
        for axis, derivative in enumerate(torch.gradient(warped, dim=(2, 3, 4))):
            torch.sum(residual * derivative, dim=1, keepdim=True, out=self.force[:, axis : axis + 1])
        return -float(residual.pow(2).mean())

    def step(self, residual: Tensor, step: float, gain: float) -> float:
        """One greedy iteration on ``residual`` (in place); returns the similarity before it."""
        force, value = self.similarity_gradient(residual)
        self.update_filter(force, self.smoothed)
        largest = float(self.smoothed.square().sum(1).max().sqrt())
        if largest > 0:
            self.smoothed.mul_(step / largest if self.scale_step else min(gain, step / largest))
        update = self.smoothed
        if self.velocity is not None:  # δ_t = capped step + μ δ_{t-1}
            update = self.velocity.mul_(self.momentum).add_(self.smoothed)
        if self.compose:  # base + r <- δ + (base + r)∘(id + δ), i.e. :func:`rwcnet.geometry.compose` into the buffers
            composed = sample(residual.add_(self.base), torch.add(self.identity, update, out=self.coords))
            torch.add(update, composed, out=residual).sub_(self.base)
        else:
            residual.add_(update)
        if self.smooth_total:
            residual.add_(self.base)
            self.field_filter(residual, self.smoothed)
            torch.sub(self.smoothed, self.base, out=residual)
        else:
            self.field_filter(residual, self.smoothed)
            residual.copy_(self.smoothed)
        return value


def pyramid_level(volume: Tensor, shape: Sequence[int], factor: int, sigma: float) -> Tensor:
    """``volume`` ``(1, C, X, Y, Z)`` on a level's grid ``shape``: area averaging when ``sigma`` is 0, else greedy's
    pyramid: a Gaussian of σ = ``sigma × factor`` fine voxels, then trilinear resampling at the coarse voxel centres."""
    if sigma <= 0 or tuple(shape) == tuple(volume.shape[2:]):
        return resize_volume(volume, shape)
    smoothing = SeparableFilter(gaussian_half_kernel(sigma * factor), volume.shape[2:], volume.shape[1],
                                device=volume.device, dtype=volume.dtype)
    smoothed = smoothing(volume, torch.empty_like(volume))
    return F.interpolate(smoothed, size=tuple(shape), mode="trilinear", align_corners=False)


def widen_mask(mask: Tensor, margin: int) -> Tensor:
    """``(1, 1, X, Y, Z)`` mask (nonzero inside) widened by ``margin`` voxels along each axis (a cube), as 0/1 floats."""
    inside = (mask > 0).float()
    if margin <= 0:
        return inside
    width = 2 * margin + 1
    for axis in range(3):  # a cube is separable: one 1-D maximum per axis
        kernel, padding = [1, 1, 1], [0, 0, 0]
        kernel[axis], padding[axis] = width, margin
        inside = F.max_pool3d(inside, tuple(kernel), stride=1, padding=tuple(padding))
    return inside


def choose_metric(requested: str, modality: str, fixed: Tensor, warped: Tensor, mask: Tensor | None,
                  threshold: float) -> tuple[str, str]:
    """``ncc`` or ``mind`` for ``requested`` (``auto``, ``ncc``, ``mind``); returns it and a note saying why."""
    if requested in ("ncc", "mind"):
        return requested, f"refinement metric {requested} (as requested)"
    if requested != "auto":
        raise ValueError(f"unknown refinement metric {requested!r}; use auto, ncc or mind")
    if modality == "ct":
        return "ncc", "refinement metric ncc (CT pairs share one contrast)"
    correlation = foreground_correlation(fixed, warped, mask)
    metric = "ncc" if correlation >= threshold else "mind"
    return metric, f"refinement metric {metric} (foreground intensity correlation {correlation:.2f}, threshold {threshold:g})"


@torch.no_grad()
def refine(
    fixed: Tensor,
    moving: Tensor,
    init_field: Tensor | None = None,
    *,
    config: RefineConfig | str = "brain",
    metric: Literal["ncc", "mind"] = "ncc",
    fixed_mask: Tensor | None = None,
    moving_mask: Tensor | None = None,
    moving_map: np.ndarray | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Refine ``init_field`` (or zero) for ``fixed``/``moving`` ``(1, 1, X, Y, Z)``; returns ``(1, 3, X, Y, Z)`` fixed voxels.

    Without ``moving_map`` both images lie on one grid. With it (``(3, 4)``,
    :func:`rwcnet.geometry.grids.voxel_map`: fixed voxel -> voxel of ``moving``), ``moving``
    and its mask stay on their own grid and every iteration samples them at the mapped
    points: the image is interpolated once, not resampled onto the fixed grid first
    (a pre-aligned CT pair resampled first lost 0.16 mm TRE: the second interpolation blurs).
    Masks (nonzero inside; the fixed mask on the fixed grid, the moving one on the
    moving image's): the similarity counts only windows centred inside the fixed mask,
    and only points that land inside the moving mask pull on the field.
    """
    config = refine_config(config)
    shape = tuple(fixed.shape[2:])
    device = fixed.device
    init = torch.zeros(1, 3, *shape, device=device) if init_field is None else init_field.to(device, torch.float32)
    features = mind_pair(fixed, moving, radius=config.mind_radius, dilation=config.mind_dilation, fixed_mask=fixed_mask,
                         moving_mask=moving_mask) if metric == "mind" else (fixed.float(), moving.float())
    total, done = sum(config.iterations), 0
    residual = None
    moving_shape = tuple(moving.shape[2:])
    fixed_mask, moving_mask = (None if mask is None else widen_mask(mask, config.mask_margin) for mask in (fixed_mask, moving_mask))
    for factor, iterations in zip(config.levels, config.iterations):
        level_shape = tuple(max(1, round(n / factor)) for n in shape)
        moving_level = tuple(max(1, round(n / factor)) for n in moving_shape)
        residual = torch.zeros(1, 3, *level_shape, device=device) if residual is None else resize_field(residual, level_shape)
        weight = None if fixed_mask is None else resize_volume((fixed_mask > 0).float(), level_shape)
        moving_weight = None if moving_mask is None else resize_volume((moving_mask > 0).float(), moving_level)
        level_map = None if moving_map is None else coarse_voxel_map(moving_map, shape, level_shape, moving_shape, moving_level)
        level = _Level(pyramid_level(features[0], level_shape, factor, config.pyramid_sigma),
                       pyramid_level(features[1], moving_level, factor, config.pyramid_sigma),
                       resize_field(init, level_shape), weight, moving_weight, metric, config, level_map)
        for _ in range(iterations):
            value = level.step(residual, config.step, config.gain_ncc if metric == "ncc" else config.gain_mind)

            done += 1
            if progress is not None:
                progress(done, total, value)
        del level
    if residual is None:
        return init
    return init + resize_field(residual, shape)
