"""Geometry of displacement fields: the one place where rwcnet warps, composes and resizes.

Conventions (see ``docs/conventions.md``):

* Volumes are torch tensors ``(B, C, X, Y, Z)`` in array (voxel) order.
* A displacement field ``u`` is ``(B, 3, X, Y, Z)`` on the *fixed* grid, in
  **voxels** of that grid; channel ``c`` is the displacement along array
  axis ``c``. It is a pull-back: the warped moving image is
  ``m(x + u(x))``.
* Points are ``(B, N, 3)`` voxel coordinates in array order.
* Voxel ``i`` of an axis of size ``n`` is sampled exactly (``align_corners``
  geometry for warping). Between two grids of different resolution the
  voxels are cell-centred (``align_corners=False``): voxel ``j`` of a grid
  ``s`` times coarser covers fine voxels ``s*j .. s*j+s-1``, which is what
  average pooling by ``s`` produces.

Everything works batched, for any size, in float32 or float64, on CPU or CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Tensor = torch.Tensor


def identity_grid(shape: Sequence[int], *, device=None, dtype=torch.float32) -> Tensor:
    """Voxel coordinates of a grid: ``(1, 3, *shape)``, channel ``c`` = index along axis ``c``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0).unsqueeze(0)


class _Normalise(torch.autograd.Function):
    """Voxel coordinates ``(B, D, ...)`` to grid_sample's ``(B, ..., D)`` in [-1, 1], last axis first.

    Each coordinate is written straight into its strided slot of the channel-last grid
    (``coords[:, c] * scale_c - 1``): the same numbers as ``(coords * scale - 1).movedim(1, -1).flip(-1)``,
    without the flip's copy (at 160×192×224 about 15 ms against 140 ms on 2 cores). The backward
    pass does the same in reverse.
    """

    @staticmethod
    def forward(ctx, coords: Tensor, scales: tuple[float, ...]) -> Tensor:
        ctx.scales = scales
        last = len(scales) - 1
        grid = torch.empty((coords.shape[0], *coords.shape[2:], len(scales)), device=coords.device, dtype=coords.dtype)
        for axis, scale in enumerate(scales):
            torch.mul(coords[:, axis], scale, out=grid[..., last - axis])
        return grid.sub_(1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        last = len(ctx.scales) - 1
        out = torch.empty((grad.shape[0], len(ctx.scales), *grad.shape[1:-1]), device=grad.device, dtype=grad.dtype)
        for axis, scale in enumerate(ctx.scales):
            torch.mul(grad[..., last - axis], scale, out=out[:, axis])
        return out, None


def _normalise(coords: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel coordinates ``(B, 3, ...)`` of a grid ``shape`` to grid_sample's ``(B, ..., 3)`` in [-1, 1], last axis first."""
    return _Normalise.apply(coords, tuple(2.0 / max(n - 1, 1) for n in shape))


def sample(volume: Tensor, coords: Tensor, *, mode: str = "bilinear", padding_mode: str = "border") -> Tensor:
    """Sample ``volume`` ``(B, C, X, Y, Z)`` at voxel coordinates ``coords`` ``(B, 3, *out)``.

    Returns ``(B, C, *out)``. ``mode`` is ``"bilinear"`` (trilinear in 3D) or
    ``"nearest"``; outside the volume the border value is repeated by default.
    """
    if coords.shape[0] != volume.shape[0] and coords.shape[0] == 1:
        coords = coords.expand(volume.shape[0], *coords.shape[1:])
    grid = _normalise(coords.to(volume.dtype), volume.shape[2:])
    return _grid_sample(volume, grid, mode, padding_mode)


def _grid_sample(volume: Tensor, grid: Tensor, mode: str, padding_mode: str) -> Tensor:
    """``F.grid_sample`` (``align_corners=True``) of ``(1, C, X, Y, Z)`` at ``grid`` ``(1, X', Y', Z', 3)``.

    torch's 3-D CPU kernel spreads work over the batch only, so a single volume runs on one
    core. On CPU the grid is cut along its first axis into one slab per thread, sampled as a
    batch of the same (expanded, not copied) volume, and the slabs are put back together:
    the same values, about twice as fast on 2 cores.
    """
    parts = min(torch.get_num_threads(), grid.shape[1])
    if volume.device.type != "cpu" or volume.shape[0] != 1 or grid.shape[0] != 1 or parts < 2:
        return F.grid_sample(volume, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    size = grid.shape[1]
    slab = -(-size // parts)
    extra = slab * parts - size
    padded = F.pad(grid, (0, 0, 0, 0, 0, 0, 0, extra)) if extra else grid  # extra rows sample the centre; cut below
    slabs = padded.view(parts, slab, *grid.shape[2:])
    out = F.grid_sample(volume.expand(parts, *volume.shape[1:]), slabs, mode=mode, padding_mode=padding_mode,
                        align_corners=True)
    channels = volume.shape[1]
    out = out.transpose(0, 1).reshape(1, channels, slab * parts, *grid.shape[2:4])
    return out if slab * parts == size else out[:, :, :size].contiguous()


def warp(
    image: Tensor,
    field: Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "border",
    origin: Sequence[int] = (0, 0, 0),
) -> Tensor:
    """Warp a moving volume ``(B, C, X', Y', Z')`` by a pull-back field ``(B, 3, X, Y, Z)``.

    ``field`` is in voxels of the moving grid's index space, laid out on the
    fixed grid (usually both grids are the same). Returns ``m(x + u(x))`` of
    shape ``(B, C, X, Y, Z)``. Warping by a zero field is the identity.
    ``origin`` places a field that covers only a box of the grid: its voxel 0
    is voxel ``origin`` of the image (patch-wise training and tiling).
    """
    coords = identity_grid(field.shape[2:], device=field.device, dtype=field.dtype) + field
    if any(origin):
        coords = coords + torch.tensor(origin, device=field.device, dtype=field.dtype).view(1, 3, 1, 1, 1)
    return sample(image, coords, mode=mode, padding_mode=padding_mode)


def warp_labels(labels: Tensor, field: Tensor, *, method: str = "nearest", num_classes: int | None = None) -> Tensor:
    """Warp an integer label map ``(B, 1, X, Y, Z)`` by a pull-back field; returns labels of the same dtype.

    ``method="nearest"`` takes the label of the nearest voxel (what the
    Learn2Reg scorer does); ``method="onehot"`` warps each label's indicator
    trilinearly and takes the argmax, which keeps thin structures better.
    Label values need not be contiguous.
    """
    if method == "nearest":
        # floor(x + 0.5) rounds half-voxel ties up, as scipy's map_coordinates(order=0) and the scorer do
        coords = torch.floor(identity_grid(field.shape[2:], device=field.device, dtype=field.dtype) + field + 0.5)
        warped = sample(labels.to(field.dtype), coords, mode="nearest")
        return warped.round().to(labels.dtype)
    if method != "onehot":
        raise ValueError(f"unknown label warping method {method!r}; use 'nearest' or 'onehot'")
    values = torch.unique(labels) if num_classes is None else torch.arange(num_classes, device=labels.device)
    coords = identity_grid(field.shape[2:], device=field.device, dtype=field.dtype) + field
    out_shape = (labels.shape[0], 1, *field.shape[2:])
    best = torch.full(out_shape, -1.0, device=field.device, dtype=field.dtype)
    result = torch.zeros(out_shape, device=labels.device, dtype=labels.dtype)
    chunk = max(1, 2**24 // max(1, field[0, 0].numel()))  # labels sampled together per grid_sample call
    for start in range(0, len(values), chunk):
        group = values[start : start + chunk]
        onehot = (labels == group.view(1, -1, 1, 1, 1).to(labels.dtype)).to(field.dtype)
        scores = sample(onehot, coords)
        score, index = scores.max(dim=1, keepdim=True)
        better = score > best
        best = torch.where(better, score, best)
        result = torch.where(better, group.to(labels.dtype)[index], result)
    return result


def sample_field(field: Tensor, points: Tensor) -> Tensor:
    """Trilinear value of ``field`` ``(B, 3, X, Y, Z)`` at voxel points ``(B, N, 3)``; returns ``(B, N, 3)``."""
    coords = points.to(field.dtype).transpose(1, 2).unsqueeze(-1).unsqueeze(-1)  # (B, 3, N, 1, 1)
    values = sample(field, coords)
    return values.squeeze(-1).squeeze(-1).transpose(1, 2)


def transform_points(points: Tensor, field: Tensor) -> Tensor:
    """Map fixed-grid points ``(B, N, 3)`` to the moving grid: ``p + u(p)`` (voxels)."""
    return points + sample_field(field, points)


def invert_points(points: Tensor, field: Tensor, *, iterations: int = 50) -> Tensor:
    """Map moving-grid points ``(B, N, 3)`` to the fixed grid: solve ``x + u(x) = p`` by fixed-point iteration."""
    estimate = points.clone().to(field.dtype)
    for _ in range(iterations):
        estimate = points - sample_field(field, estimate)
    return estimate


def compose(u_new: Tensor, u_old: Tensor, *, origin: Sequence[int] = (0, 0, 0)) -> Tensor:
    """Compose pull-back fields: ``u(x) = u_new(x) + u_old(x + u_new(x))`` (voxels, same grid).

    Warping by the result equals warping first by ``u_old`` and then the
    warped image by ``u_new``: ``m(x + u) = (m∘(id + u_old))∘(id + u_new)``.
    ``u_new`` may cover only a box of ``u_old``'s grid starting at ``origin``.
    """
    return u_new + warp(u_old, u_new, origin=origin)


def resize_field(field: Tensor, shape: Sequence[int]) -> Tensor:
    """Bring a field ``(B, 3, X, Y, Z)`` to another grid of the same extent, values rescaled.

    Both grids cover the same physical box with cell-centred voxels, so a
    grid ``s`` times finer has voxels ``s`` times smaller: the vectors are
    multiplied by ``new_size / old_size`` per axis. Trilinear interpolation
    when enlarging, area averaging when shrinking by an integer factor.
    """
    shape = tuple(int(n) for n in shape)
    old = field.shape[2:]
    if tuple(old) == shape:
        return field
    if all(o % n == 0 for o, n in zip(old, shape)):
        resized = F.adaptive_avg_pool3d(field, shape)
    else:
        resized = F.interpolate(field, size=shape, mode="trilinear", align_corners=False)
    scale = torch.tensor([n / o for n, o in zip(shape, old)], device=field.device, dtype=field.dtype)
    return resized * scale.view(1, 3, 1, 1, 1)


def resize_volume(volume: Tensor, shape: Sequence[int]) -> Tensor:
    """Resize an image ``(B, C, X, Y, Z)`` to ``shape``: area averaging when shrinking by an integer factor, else trilinear."""
    shape = tuple(int(n) for n in shape)
    old = volume.shape[2:]
    if tuple(old) == shape:
        return volume
    if all(o % n == 0 for o, n in zip(old, shape)):
        return F.adaptive_avg_pool3d(volume, shape)
    return F.interpolate(volume, size=shape, mode="trilinear", align_corners=False)


def spatial_gradient(field: Tensor) -> Tensor:
    """Central differences of a field ``(B, C, X, Y, Z)`` along each axis, one-sided at the borders.

    Returns ``(B, C, 3, X, Y, Z)``: entry ``[:, c, a]`` is ``d field_c / d x_a`` per voxel.
    """
    grads = []
    for axis in range(3):
        dim = axis + 2
        grads.append(torch.gradient(field, dim=dim)[0])
    return torch.stack(grads, dim=2)


def forward_difference_means(field: Tensor, kind: str = "l2") -> list[Tensor]:
    """Per axis, the mean ``|forward difference|`` (``l1``) or its square (``l2``) of ``(B, C, X, Y, Z)``: three scalars.

    The smoothness terms of the training regulariser and of instance optimisation's diffusion term.
    """
    if kind not in ("l1", "l2"):
        raise ValueError(f"unknown regulariser kind {kind!r}; use 'l1' or 'l2'")
    terms = []
    for dim in (2, 3, 4):
        difference = field.diff(dim=dim)
        terms.append(difference.abs().mean() if kind == "l1" else difference.pow(2).mean())
    return terms


def jacobian_determinant(field: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``x + u(x)`` for a field ``(B, 3, X, Y, Z)`` in voxels; ``(B, X, Y, Z)``.

    1 where the field is locally rigid, below 1 for compression, at or below
    0 where the transform folds.
    """
    jac = spatial_gradient(field)  # (B, 3, 3, X, Y, Z)
    eye = torch.eye(3, device=field.device, dtype=field.dtype).view(1, 3, 3, 1, 1, 1)
    (a, b, c), (d, e, f), (g, h, i) = [list(row.unbind(1)) for row in (jac + eye).unbind(1)]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def integrate_velocity(velocity: Tensor, steps: int = 7) -> Tensor:
    """Displacement of the flow of a stationary velocity field by scaling and squaring (voxels).

    ``velocity`` is ``(B, 3, X, Y, Z)``; the result is a diffeomorphic field
    for smooth velocities when ``steps`` is large enough.
    """
    field = velocity / (2**steps)
    for _ in range(steps):
        field = compose(field, field)
    return field


def resample_field(
    field: Tensor, source_affine: Tensor, target_affine: Tensor, target_shape: Sequence[int]
) -> Tensor:
    """Carry a pull-back field from one physical grid to another: vectors resampled, rotated and rescaled.

    ``field`` ``(B, 3, X, Y, Z)`` is in voxels of the source grid (voxel -> RAS
    mm by ``source_affine``, 4x4); the result ``(B, 3, *target_shape)`` is in
    voxels of the target grid. Both describe the same physical map
    ``p -> p + d(p)``, with ``d = A_source[:3, :3] @ u_source``; it assumes the
    moving image is resampled onto each grid alike (as ``register`` does).
    """
    source_affine = source_affine.to(field)
    target_affine = target_affine.to(field)
    to_source = torch.linalg.inv(source_affine) @ target_affine  # target voxel -> source voxel
    grid = identity_grid(target_shape, device=field.device, dtype=field.dtype)
    coords = torch.einsum("ij,bjxyz->bixyz", to_source[:3, :3], grid) + to_source[:3, 3].view(1, 3, 1, 1, 1)
    sampled = sample(field, coords)
    vectors = torch.linalg.inv(target_affine[:3, :3]) @ source_affine[:3, :3]
    return torch.einsum("ij,bjxyz->bixyz", vectors, sampled)


def moving_voxel_field(field: Tensor, fixed_affine: Tensor, moving_affine: Tensor) -> Tensor:
    """Re-express a pull-back field for a moving image on its own grid: ``(B, 3, X, Y, Z)`` in moving voxels.

    ``field`` ``(B, 3, X, Y, Z)`` is in voxels of the fixed grid (voxel -> RAS mm
    by ``fixed_affine``, 4x4). Fixed voxel ``x`` takes the moving image at the
    physical point ``A_fix (x + u(x))``, which is moving voxel
    ``A_mov^-1 A_fix (x + u(x))``; the result ``v`` is that minus ``x``, so that
    any sampler of ``m(x + v(x))`` (:func:`warp`, :func:`warp_labels`, the
    scorer's nearest neighbour) samples through physical space. The affine
    product is formed in float64.
    """
    to_moving = torch.linalg.inv(moving_affine.to(torch.float64)) @ fixed_affine.to(torch.float64)
    to_moving = to_moving.to(device=field.device, dtype=field.dtype)
    grid = identity_grid(field.shape[2:], device=field.device, dtype=field.dtype)
    mapped = torch.einsum("ij,bjxyz->bixyz", to_moving[:3, :3], grid + field) + to_moving[:3, 3].view(1, 3, 1, 1, 1)
    return mapped - grid


@dataclass
class FieldInverse:
    """The inverse of a pull-back field found by :func:`invert_field`, and where it is not defined.

    ``field`` ``(B, 3, *shape)``: ``v`` on the target grid, so that ``y + v(y)`` is the source-grid point ``x``
    with ``x + u(x) = y``. ``residual`` ``(B, *shape)``: ``|x + u(x) - y|`` for that ``x``, in target voxels.
    ``undefined`` ``(B, *shape)`` bool: no preimage found, either the iteration did not converge there
    (residual above ``undefined_residual``: folded or strongly compressed regions) or ``x`` lies outside
    the source grid (the point is not reached from it). ``iterations`` is how many updates were made.
    """

    field: Tensor
    residual: Tensor
    undefined: Tensor
    iterations: int

    @property
    def max_residual(self) -> float:
        """Largest residual over the points where the inverse is defined (voxels); 0 when none is."""
        defined = self.residual[~self.undefined]
        return float(defined.max()) if defined.numel() else 0.0

    @property
    def undefined_fraction(self) -> float:
        """Share of target-grid points where the inverse is undefined."""
        return float(self.undefined.float().mean())


def invert_field(
    field: Tensor,
    *,
    shape: Sequence[int] | None = None,
    iterations: int = 100,
    tol: float = 1e-3,
    undefined_residual: float = 0.5,
) -> FieldInverse:
    """Inverse of a pull-back field ``u`` ``(B, 3, X, Y, Z)`` by fixed-point iteration ``v(y) = -u(y + v(y))``.

    ``u`` maps source voxel ``x`` to target voxel ``x + u(x)``; the target grid has ``shape`` (the source
    grid's shape by default, the usual Learn2Reg case). The result ``v`` lies on the target grid and
    ``y + v(y)`` is in source voxels: then ``compose(v, u) ≈ 0`` where defined, ``warp(warp(m, u), v) ≈ m``.
    Iteration stops when the largest residual over the converging points is below ``tol`` voxels. It
    converges where ``u`` is a contraction locally (``|Du| < 1``); points where it does not, or whose
    preimage lies outside the source grid, are flagged in :attr:`FieldInverse.undefined`.
    """
    source_shape = tuple(field.shape[2:])
    target_shape = source_shape if shape is None else tuple(int(n) for n in shape)
    grid = identity_grid(target_shape, device=field.device, dtype=field.dtype)
    if target_shape == source_shape:
        inverse = -field
    else:
        inverse = torch.zeros(field.shape[0], 3, *target_shape, device=field.device, dtype=field.dtype)
    step = 0
    for step in range(iterations + 1):
        residual = inverse + sample(field, grid + inverse)
        distance = residual.norm(dim=1)
        converging = distance < undefined_residual
        worst = float(distance[converging].max()) if bool(converging.any()) else math.inf
        if worst < tol or step == iterations:
            break
        inverse = inverse - residual
    upper = torch.tensor(source_shape, device=field.device, dtype=field.dtype).view(1, 3, *(1,) * len(source_shape)) - 1
    reach = grid + inverse
    outside = ((reach < -0.5) | (reach > upper + 0.5)).any(dim=1)
    return FieldInverse(inverse, distance, outside | (distance >= undefined_residual), step)


def invert_field_on_moving_grid(
    field: Tensor, fixed_affine: Tensor, moving_affine: Tensor, moving_shape: Sequence[int], **options
) -> FieldInverse:
    """Inverse of a Learn2Reg field as a Learn2Reg field on the moving grid, in moving voxels.

    ``field`` ``(B, 3, X, Y, Z)`` is in fixed voxels on the fixed grid (``A_fix``, 4x4 voxel -> RAS mm): fixed voxel
    ``x`` takes the moving image at physical point ``A_fix (x + u(x))``. The result ``v`` ``(B, 3, *moving_shape)``
    takes the fixed image at fixed voxel ``A_fix^-1 A_mov (y + v(y))`` for moving voxel ``y`` (on one grid: the
    plain inverse). Residuals are in moving voxels; ``options`` go to :func:`invert_field`.
    """
    fixed_affine = fixed_affine.to(torch.float64)
    moving_affine = moving_affine.to(torch.float64)
    to_moving = moving_voxel_field(field, fixed_affine, moving_affine)  # x -> moving voxel x + w(x)
    found = invert_field(to_moving, shape=moving_shape, **options)  # y + r(y) = fixed voxel
    grid = identity_grid(moving_shape, device=field.device, dtype=field.dtype)
    to_moving_voxels = (torch.linalg.inv(moving_affine) @ fixed_affine).to(device=field.device, dtype=field.dtype)
    fixed_points = grid + found.field
    mapped = torch.einsum("ij,bjxyz->bixyz", to_moving_voxels[:3, :3], fixed_points)
    mapped = mapped + to_moving_voxels[:3, 3].view(1, 3, 1, 1, 1)
    return FieldInverse(mapped - grid, found.residual, found.undefined, found.iterations)
