"""rwcnet's own rigid -> affine registration in torch: Adam over 6 then 12 parameters, multi-resolution.

At each level both images are averaged down to about ``level`` mm on their own grids (so each keeps its
orientation) and normalised to [0, 1] between their 1st and 99th percentiles. Up to ``points`` voxels of the
fixed foreground (the fixed mask, else intensity above 0.1 dilated by two voxels) are drawn once per level
(seeded); each Adam step maps them by the current ``T`` into the moving grid, samples the moving features
there (:func:`rwcnet.geometry.sample`, border repeated) and scores them against the fixed ones:

* ``mind``: mean squared difference of MIND-SSC descriptors (:func:`rwcnet.mind.mind_ssc`);
* ``ncc``: one minus the global normalised cross-correlation of the intensities;
* ``mi``: minus the mutual information of a Parzen-window (Gaussian) joint histogram of 32 bins.

A moving mask weights each point by its (linearly sampled) value. Each stage first reslices the moving image
into the fixed level's grid through the current ``T`` (see :func:`_resliced`) and finds a correction
``S p = R (I + D) (p - c) + c + t`` about the fixed centre of mass ``c`` (``T <- T S``): rotation vector and
``D`` are scaled by the foreground's radius so that every parameter moves points by about its value in mm, and
Adam's step falls from half the level's spacing to a fortieth (cosine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from rwcnet.geometry import identity_grid, sample
from rwcnet.data.formats import Image
from rwcnet.mind import mind_ssc

Tensor = torch.Tensor
METRICS = ("mind", "ncc", "mi")
_BINS = 32
_CORNERS = torch.tensor([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(8)])


@dataclass
class _Level:
    """One resolution of one image: features ``(1, C, X, Y, Z)``, intensities, voxel->RAS affine, mask."""

    features: Tensor
    intensity: Tensor
    affine: np.ndarray
    mask: Tensor | None

    @cached_property
    def foreground(self) -> Tensor:
        """Voxel indices ``(M, 3)`` of the foreground: the mask, else intensity above 0.1 dilated by two voxels."""
        if self.mask is not None:
            region = self.mask[0, 0] > 0.5
        else:
            region = F.max_pool3d((self.intensity > 0.1).float(), 5, stride=1, padding=2)[0, 0] > 0
        return torch.nonzero(region)

    @property
    def table(self) -> Tensor:
        """The features as ``(C, X*Y*Z)``, a view."""
        return self.features[0].reshape(self.features.shape[1], -1)


def _pooled(array: np.ndarray, affine: np.ndarray, spacing: np.ndarray, level_mm: float) -> tuple[Tensor, np.ndarray]:
    """Average ``array`` over blocks of about ``level_mm``; returns ``(1, 1, X', Y', Z')`` and its affine."""
    factors = [max(1, int(round(level_mm / s))) for s in spacing]
    volume = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    shape = [max(1, n // f) for n, f in zip(array.shape, factors)]
    volume = volume[:, :, : shape[0] * factors[0], : shape[1] * factors[1], : shape[2] * factors[2]]
    pooled = F.avg_pool3d(volume, kernel_size=factors, stride=factors)
    scale = np.eye(4)
    scale[:3, :3] = np.diag(factors)
    scale[:3, 3] = (np.array(factors) - 1) / 2.0  # coarse voxel j is the centre of fine voxels f j .. f j + f - 1
    return pooled, affine @ scale


def _features(intensity: Tensor, metric: str) -> Tensor:
    return mind_ssc(intensity, radius=1, dilation=1) if metric == "mind" else intensity


def _level(image: Image, mask: Image | None, level_mm: float, metric: str) -> _Level:
    """``image`` averaged to about ``level_mm`` on its own grid, normalised to [0, 1] (1st..99th percentile)."""
    pooled, affine = _pooled(image.array, image.affine, image.spacing, level_mm)
    low, high = torch.quantile(pooled.flatten()[:: max(1, pooled.numel() // 200_000)], torch.tensor([0.01, 0.99]))
    intensity = ((pooled - low) / (high - low).clamp_min(1e-6)).clamp(0.0, 1.0)
    coarse_mask = None
    if mask is not None:
        coarse_mask = _pooled((mask.array > 0).astype(np.float32), mask.affine, mask.spacing, level_mm)[0]
    return _Level(_features(intensity, metric), intensity, affine, coarse_mask)


def _resliced(moving: _Level, fixed: _Level, matrix: np.ndarray, metric: str) -> _Level:
    """The moving level sampled on the fixed level's grid at ``T p`` (zero outside), features computed there.

    MIND's channels follow the grid axes, so the features of a turned scan are compared only after it is
    resampled into the fixed frame; what is left to find is then a small correction.
    """
    to_moving = torch.from_numpy(np.linalg.inv(moving.affine) @ matrix @ fixed.affine).float()
    grid = identity_grid(fixed.intensity.shape[2:])
    coords = torch.einsum("ij,bjxyz->bixyz", to_moving[:3, :3], grid) + to_moving[:3, 3].view(1, 3, 1, 1, 1)
    intensity = sample(moving.intensity, coords, padding_mode="zeros")
    mask = None if moving.mask is None else sample(moving.mask, coords, padding_mode="zeros")
    return _Level(_features(intensity, metric), intensity, fixed.affine, mask)


def _fixed_points(level: _Level, points: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Fixed-side sample points: RAS mm ``(N, 3)`` float64 and their features ``(N, C)``."""
    index = level.foreground
    if index.shape[0] > points:
        index = index[torch.randperm(index.shape[0], generator=generator)[:points].sort().values]  # in memory order
    values = level.features[0][:, index[:, 0], index[:, 1], index[:, 2]].T
    affine = torch.from_numpy(level.affine)
    return index.double() @ affine[:3, :3].T + affine[:3, 3], values


def _loss(metric: str, fixed: Tensor, moving: Tensor, weight: Tensor | None) -> Tensor:
    """The dissimilarity of sampled features ``(N, C)``, weighted by ``(N,)`` (None: all 1): lower is better."""
    if weight is None:
        weight = fixed.new_ones(fixed.shape[0])
    total = weight.sum().clamp_min(1e-6)
    if metric == "mind":
        return (weight * (fixed - moving).square().mean(dim=1)).sum() / total
    f, m = fixed[:, 0], moving[:, 0]
    if metric == "ncc":
        fc = f - (weight * f).sum() / total
        mc = m - (weight * m).sum() / total
        covariance = (weight * fc * mc).sum()
        return 1.0 - covariance / ((weight * fc.square()).sum() * (weight * mc.square()).sum()).sqrt().clamp_min(1e-9)
    centres = torch.linspace(0.0, 1.0, _BINS, dtype=f.dtype)
    width = 1.0 / (_BINS - 1)
    wf = torch.softmax(-((f[:, None] - centres) / width).square() / 2, dim=1)
    wm = torch.softmax(-((m[:, None] - centres) / width).square() / 2, dim=1)
    joint = (wf * weight[:, None]).T @ wm / total
    marginal_f, marginal_m = joint.sum(dim=1, keepdim=True), joint.sum(dim=0, keepdim=True)
    return -(joint * (torch.log(joint + 1e-10) - torch.log(marginal_f @ marginal_m + 1e-10))).sum()


def _skew(vector: Tensor) -> Tensor:
    zero = vector.new_zeros(())
    return torch.stack([torch.stack([zero, -vector[2], vector[1]]), torch.stack([vector[2], zero, -vector[0]]),
                        torch.stack([-vector[1], vector[0], zero])])


def _rotation(vector: Tensor) -> Tensor:
    """The rotation ``exp([w]x)`` of a rotation vector ``w`` (radians; Rodrigues' formula, exact at ``w = 0``)."""
    angle_squared = vector.square().sum()
    small = angle_squared < 1e-12
    angle = torch.where(small, torch.ones_like(angle_squared), angle_squared).sqrt()
    sine = torch.where(small, 1.0 - angle_squared / 6, torch.sin(angle) / angle)
    cosine = torch.where(small, 0.5 - angle_squared / 24, (1.0 - torch.cos(angle)) / angle.square())
    skew = _skew(vector)
    return torch.eye(3, dtype=vector.dtype) + sine * skew + cosine * (skew @ skew)


class _Correction(torch.nn.Module):
    """``S p = R(w) (I + D) (p - c) + c + t`` from the identity; ``w``, ``D`` stored times ``radius``, ``t`` in mm."""

    def __init__(self, centre: np.ndarray, radius: float):
        super().__init__()
        self.register_buffer("centre", torch.from_numpy(np.asarray(centre, np.float64)))
        self.radius = float(radius)
        self.rotation = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.shear = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
        self.translation = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def linear(self) -> Tensor:
        rotation = _rotation(self.rotation / self.radius)
        return rotation @ (torch.eye(3, dtype=torch.float64) + self.shear / self.radius)

    def voxel_map(self, to_voxels: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, b)`` float32 with ``to_voxels @ S p = A (p - c) + b``: a point's offset from the centre -> voxels."""
        linear = to_voxels[:3, :3] @ self.linear()
        offset = to_voxels[:3, :3] @ (self.centre + self.translation) + to_voxels[:3, 3]
        return linear.float(), offset.float()

    def matrix(self) -> np.ndarray:
        with torch.no_grad():
            linear = self.linear()
            matrix = np.eye(4)
            matrix[:3, :3] = linear.numpy()
            matrix[:3, 3] = (self.centre + self.translation - linear @ self.centre).numpy()
        return matrix


class _Trilinear(torch.autograd.Function):
    """Trilinear values of a channels-first volume ``table`` ``(C, X*Y*Z)`` at voxels ``(N, 3)``; border repeated.

    One gather of the eight neighbours, corner-major, so that each corner's weighted values add up in
    contiguous ``(C, N)`` slabs: about three times as fast as ``grid_sample`` on scattered points of a
    12-channel volume. Differentiable in ``voxels`` only, with the derivative of the trilinear weights
    written out (about five times cheaper than autograd through the gather and products).
    """

    @staticmethod
    def forward(ctx, voxels: Tensor, table: Tensor, shape: tuple[int, int, int]) -> Tensor:
        upper = torch.tensor(shape, dtype=voxels.dtype) - 1
        inside = (voxels >= 0) & (voxels <= upper)  # where the border clamp does not hold the point
        voxels = torch.minimum(voxels.clamp_min(0.0), upper)
        base = torch.minimum(voxels.floor(), (upper - 1).clamp_min(0))
        fraction = voxels - base
        strides = torch.tensor([shape[1] * shape[2], shape[2], 1])
        start = (base.long() * strides).sum(1)
        corners = (_CORNERS.to(strides) @ strides).unsqueeze(1) + start  # (8, N); corner (i, j, k) = 4i + 2j + k
        rows = table.index_select(1, corners.flatten()).view(table.shape[0], 8, -1)  # (C, 8, N)
        # (2, N) per axis: the weight of the lower (1 - f) and of the upper (f) neighbour
        wx, wy, wz = torch.stack([1.0 - fraction, fraction]).unbind(2)
        weights = (wx[:, None, None] * (wy[:, None] * wz[None])[None]).reshape(8, -1)
        values = rows[:, 0] * weights[0]
        for corner in range(1, 8):
            values.addcmul_(rows[:, corner], weights[corner])
        ctx.save_for_backward(rows, wx, wy, wz, inside)
        return values.T

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        rows, wx, wy, wz, inside = ctx.saved_tensors
        along = (rows * grad_values.T[:, None]).sum(0).view(2, 2, 2, -1)  # d loss / d weight of each corner
        step_x, step_y, step_z = along[1] - along[0], along[:, 1] - along[:, 0], along[:, :, 1] - along[:, :, 0]
        grad_voxels = torch.stack([(step_x * (wy[:, None] * wz[None])).sum((0, 1)),
                                   (step_y * (wx[:, None] * wz[None])).sum((0, 1)),
                                   (step_z * (wx[:, None] * wy[None])).sum((0, 1))], dim=1)
        return grad_voxels * inside, None, None


def _trilinear(table: Tensor, shape: tuple[int, int, int], voxels: Tensor) -> Tensor:
    """:class:`_Trilinear`: ``(N, C)`` values of ``table`` ``(C, X*Y*Z)`` at voxels ``(N, 3)``, border repeated."""
    return _Trilinear.apply(voxels, table, shape)


def _sampled(level: _Level, table: Tensor, offsets: Tensor, linear: Tensor, offset: Tensor) -> tuple[Tensor, Tensor | None]:
    """Moving features ``(N, C)`` at voxels ``offsets @ linear.T + offset`` (``offsets`` ``(N, 3)``, see
    :meth:`_Correction.voxel_map`) and each point's weight ``(N,)`` from the moving mask (None without one)."""
    voxels = torch.addmm(offset, offsets, linear.T)
    shape = tuple(level.features.shape[2:])
    if table.shape[0] > 1:
        values = _trilinear(table, shape, voxels)
    else:  # one channel: grid_sample is the faster one
        values = sample(level.features, voxels.T[None, :, :, None, None])[0, :, :, 0, 0].T
    if level.mask is None:
        return values, None
    return values, sample(level.mask, voxels.T[None, :, :, None, None])[0, 0, :, 0, 0]


def centre_of_mass(image: Image, mask: Image | None = None) -> np.ndarray:
    """Intensity-weighted centre (RAS mm) of ``image`` above its minimum, inside ``mask`` when given."""
    weights = image.array.astype(np.float32) - np.float32(image.array.min())
    if mask is not None:
        weights = weights * (mask.array > 0)
    total = float(weights.sum(dtype=np.float64))
    if total <= 0:
        centre = (np.array(image.shape) - 1) / 2.0
    else:
        profiles = [weights.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.float64) for axis in range(3)]
        centre = np.array([profile @ np.arange(profile.size) for profile in profiles]) / total
    return image.affine[:3, :3] @ centre + image.affine[:3, 3]


class _Adam:
    """Adam (betas 0.9, 0.999) on a few parameters, with the step size given at each step; clears gradients."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.first = [torch.zeros_like(p) for p in parameters]
        self.second = [torch.zeros_like(p) for p in parameters]
        self.count = 0

    @torch.no_grad()
    def step(self, rate: float) -> None:
        self.count += 1
        for parameter, first, second in zip(self.parameters, self.first, self.second):
            first.mul_(0.9).add_(parameter.grad, alpha=0.1)
            second.mul_(0.999).addcmul_(parameter.grad, parameter.grad, value=0.001)
            denominator = (second / (1 - 0.999**self.count)).sqrt_().add_(1e-8)
            parameter.sub_(rate * first / (1 - 0.9**self.count) / denominator)
            parameter.grad = None


def optimise_affine(fixed: Image, moving: Image, initial: np.ndarray, *, stages: list[tuple[str, float, int]],
                    metric: str = "mind", fixed_mask: Image | None = None, moving_mask: Image | None = None,
                    points: int = 8_000, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """Refine the 4x4 ``initial`` (fixed RAS mm -> moving RAS mm) through ``stages`` of ``(kind, level_mm, steps)``.

    ``kind`` is ``rigid`` (rotation and translation) or ``affine`` (also scale and shear). Returns the matrix and
    one record per stage (kind, level, steps, final loss).
    """
    if metric not in METRICS:
        raise ValueError(f"unknown affine metric {metric!r}; use one of {', '.join(METRICS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few thousand points a step: threads only add synchronisation (10x slower when busy)
    try:
        return _optimise(fixed, moving, initial, stages, metric, fixed_mask, moving_mask, points, seed)
    finally:
        torch.set_num_threads(threads)


def _optimise(fixed: Image, moving: Image, initial: np.ndarray, stages: list[tuple[str, float, int]], metric: str,
              fixed_mask: Image | None, moving_mask: Image | None, points: int, seed: int) -> tuple[np.ndarray, list]:
    generator = torch.Generator().manual_seed(seed)
    centre = centre_of_mass(fixed, fixed_mask)
    matrix, records, cache = np.asarray(initial, np.float64), [], {}
    for kind, level_mm, steps in stages:
        if level_mm not in cache:
            cache[level_mm] = (_level(fixed, fixed_mask, level_mm, metric),
                               _level(moving, moving_mask, level_mm, metric))
        fixed_level, moving_level = cache[level_mm]
        resliced = _resliced(moving_level, fixed_level, matrix, metric)
        table = resliced.table
        fixed_points, fixed_values = _fixed_points(fixed_level, points, generator)
        radius = float((fixed_points - torch.from_numpy(centre)).square().sum(1).mean().sqrt())
        parameters = _Correction(centre, radius)
        trainable = [parameters.rotation, parameters.translation] + ([parameters.shear] if kind == "affine" else [])
        optimiser = _Adam(trainable)
        to_voxels = torch.from_numpy(np.linalg.inv(resliced.affine))
        offsets = (fixed_points - parameters.centre).float()
        for step in range(steps):
            values, weight = _sampled(resliced, table, offsets, *parameters.voxel_map(to_voxels))
            loss = _loss(metric, fixed_values, values, weight)
            loss.backward()
            rate = level_mm / 40 + (level_mm / 2 - level_mm / 40) * (1 + math.cos(math.pi * step / steps)) / 2
            optimiser.step(rate)
        matrix = matrix @ parameters.matrix()
        records.append({"kind": kind, "level_mm": level_mm, "steps": steps, "loss": float(loss.detach())})
    return matrix, records
