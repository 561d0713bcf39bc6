"""Local correlation volume between fixed and (warped) moving features (SPEC §2 step 3).

For every integer shift ``d = (d0, d1, d2)`` in ``[-r, r]^3`` the output has one
channel, in the order d0 outermost, d2 innermost::

    k = ((d0 + r) * (2r + 1) + (d1 + r)) * (2r + 1) + (d2 + r)

Moving values outside the volume are zero (zero padding). Two kinds:

* ``"dot"`` (the paper, default): ``corr[k](x) = sum_c F_f[c](x) * F_m[c](x + d) / sqrt(C)``
  (a similarity: larger = better match).
* ``"sad"`` (the reference code's option): ``corr[k](x) = box( sum_c |F_f[c](x) - F_m[c](x + d)| )``
  where ``box`` is the 3x3x3 mean filter, stride 1, zero padding, ``count_include_pad=True``
  (always divided by 27, so border voxels see the zeros). It is kept as the reference has it:
  a cost, larger = worse match. With ``count_include_pad=True`` the box filter is symmetric,
  so its adjoint (used in the backward pass) is the same filter.

Both are custom autograd functions (the reference code's no-gradient defect is fixed: the
gradient reaches both inputs). They never build a ``(2r+1)^3 x C x volume`` tensor: the forward
pads the moving features once and writes each shift into a preallocated output; only the two
inputs are saved; the backward accumulates both gradients in place, shift by shift. On CPU the
volume is processed in slabs of a few x-slices, looping over all shifts inside a slab, so that
the slab's features and gradients stay in cache; features are handled channels-last there
(measured fastest, see ``benchmarks/correlation_cost.py``). On CUDA the whole volume is one slab.
The CPU path issues thousands of small parallel ops: when other processes share the cores,
run with ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is imported), otherwise OpenMP threads
spin at every op and the cost grows several-fold.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

Tensor = torch.Tensor

KINDS = ("dot", "sad")
# Elements (C * slab voxels) per CPU slab: about 1 MB of float32 features per slab.
_CPU_SLAB_ELEMENTS = 1 << 18
# Shift channels box-filtered together in the "sad" kind.
_BOX_CHANNELS = 7


def shift_offsets(radius: int) -> list[tuple[int, int, int]]:
    """The ``(2r+1)^3`` shifts ``(d0, d1, d2)`` in output-channel order (d0 outermost)."""
    span = range(-radius, radius + 1)
    return [(d0, d1, d2) for d0 in span for d1 in span for d2 in span]


def soft_argmax(cost: Tensor, radius: int, kind: str, temperature: Tensor | float = 1.0) -> Tensor:
    """Expected shift ``(B, 3, X, Y, Z)`` (voxels) under ``softmax(±cost / temperature)`` over the shifts.

    ``cost`` is a correlation volume ``(B, (2r+1)^3, X, Y, Z)`` of :func:`local_correlation`;
    ``"dot"`` is a similarity (softmax of ``cost``), ``"sad"`` a cost (softmax of ``-cost``).
    """
    offsets = torch.tensor(shift_offsets(radius), dtype=cost.dtype, device=cost.device)  # (K, 3)
    logits = cost if kind == "dot" else -cost
    weights = torch.softmax(logits / temperature, dim=1)
    return torch.einsum("bkxyz,kc->bcxyz", weights, offsets)


def _slabs(fixed: Tensor) -> Iterator[tuple[int, int]]:
    """Ranges ``[x0, x1)`` of x-slices to process together (whole volume on non-CPU devices)."""
    size_x = fixed.shape[2]
    if fixed.device.type != "cpu":
        yield 0, size_x
        return
    per_slice = fixed.shape[0] * fixed.shape[1] * fixed.shape[3] * fixed.shape[4]
    step = max(1, _CPU_SLAB_ELEMENTS // max(per_slice, 1))
    for x0 in range(0, size_x, step):
        yield x0, min(size_x, x0 + step)


def _layout(tensor: Tensor) -> Tensor:
    """Channels-last copy on CPU (fastest there), unchanged elsewhere."""
    if tensor.device.type == "cpu":
        return tensor.contiguous(memory_format=torch.channels_last_3d)
    return tensor.contiguous()


def _box(volume: Tensor, out: Tensor) -> Tensor:
    """3x3x3 mean filter per channel of ``volume`` into ``out`` (may be ``volume`` itself).

    Zero padding, count_include_pad=True (always divided by 27). Done separably as sums of
    neighbouring slices on a few channels at a time, so temporaries stay small and in cache
    (several times faster than ``avg_pool3d`` on CPU).
    """
    for c0 in range(0, volume.shape[1], _BOX_CHANNELS):
        part = volume[:, c0 : c0 + _BOX_CHANNELS]
        for dim in (2, 3, 4):
            size = part.shape[dim]
            summed = part.clone()
            summed.narrow(dim, 1, size - 1).add_(part.narrow(dim, 0, size - 1))
            summed.narrow(dim, 0, size - 1).add_(part.narrow(dim, 1, size - 1))
            part = summed
        torch.div(part, 27.0, out=out[:, c0 : c0 + _BOX_CHANNELS])
    return out


def _shift_views(padded: Tensor, x0: int, x1: int, radius: int, spatial: tuple[int, int, int]) -> list[Tensor]:
    """Views ``(B, C, x1-x0, Y, Z)`` of the padded features at ``x + d``, fixed voxels ``[x0, x1)``.

    One ``as_strided`` per shift (cheaper than chained slicing in the hot loop); channel order
    as :func:`shift_offsets`. Works for any tensor laid out like ``padded`` (e.g. its gradient).
    """
    _, _, sx, sy, sz = padded.stride()
    size = (padded.shape[0], padded.shape[1], x1 - x0, spatial[1], spatial[2])
    base = padded.storage_offset() + x0 * sx
    span = range(2 * radius + 1)
    offsets = [base + a * sx + b * sy + c * sz for a in span for b in span for c in span]
    return [padded.as_strided(size, padded.stride(), offset) for offset in offsets]


def _prepare(fixed: Tensor, moving: Tensor, radius: int, scale: float) -> tuple[Tensor, Tensor]:
    """Fixed features times ``scale`` and the zero-padded moving features, both in the fast layout."""
    fixed_l = _layout(fixed * scale if scale != 1.0 else fixed)
    return fixed_l, _layout(F.pad(moving, (radius,) * 6))


def _unpad(padded: Tensor, radius: int, spatial: tuple[int, int, int]) -> Tensor:
    """Inner (unpadded) part of a padded volume, as a contiguous tensor."""
    r = radius
    return padded[:, :, r : r + spatial[0], r : r + spatial[1], r : r + spatial[2]].contiguous()


class _DotCorrelation(torch.autograd.Function):
    """Dot-product correlation over sqrt(C); see the module docstring."""

    @staticmethod
    def forward(ctx: FunctionCtx, fixed: Tensor, moving: Tensor, radius: int) -> Tensor:
        spatial = tuple(fixed.shape[2:])
        fixed_l, padded = _prepare(fixed, moving, radius, 1.0 / math.sqrt(fixed.shape[1]))
        out = fixed.new_empty((fixed.shape[0], (2 * radius + 1) ** 3, *spatial))
        for x0, x1 in _slabs(fixed):
            fixed_slab, out_slab = fixed_l[:, :, x0:x1], out[:, :, x0:x1]
            product = torch.empty_like(fixed_slab)
            for k, moving_slab in enumerate(_shift_views(padded, x0, x1, radius, spatial)):
                torch.sum(torch.mul(fixed_slab, moving_slab, out=product), dim=1, out=out_slab[:, k])
        ctx.save_for_backward(fixed, moving)
        ctx.radius = radius
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        fixed, moving = ctx.saved_tensors
        radius, spatial = ctx.radius, tuple(fixed.shape[2:])
        scale = 1.0 / math.sqrt(fixed.shape[1])
        fixed_l, padded = _prepare(fixed, moving, radius, scale)
        grad_out = grad_out.contiguous()
        grad_fixed = torch.zeros_like(fixed_l) if ctx.needs_input_grad[0] else None
        grad_padded = torch.zeros_like(padded) if ctx.needs_input_grad[1] else None
        for x0, x1 in _slabs(fixed):
            fixed_slab, grad_slab = fixed_l[:, :, x0:x1], grad_out[:, :, x0:x1]
            moving_views = _shift_views(padded, x0, x1, radius, spatial)
            grad_views = _shift_views(grad_padded, x0, x1, radius, spatial) if grad_padded is not None else None
            for k, moving_slab in enumerate(moving_views):
                grad_k = grad_slab[:, k : k + 1]
                if grad_fixed is not None:  # dL/dF_f(x) += g_d(x) F_m(x + d) / sqrt(C)
                    grad_fixed[:, :, x0:x1].addcmul_(grad_k, moving_slab)
                if grad_views is not None:  # dL/dF_m(x + d) += g_d(x) F_f(x) / sqrt(C)
                    grad_views[k].addcmul_(grad_k, fixed_slab)
        grad_fixed = grad_fixed.mul_(scale).contiguous() if grad_fixed is not None else None
        grad_moving = _unpad(grad_padded, radius, spatial) if grad_padded is not None else None
        return grad_fixed, grad_moving, None


class _SadCorrelation(torch.autograd.Function):
    """Box-filtered sum of absolute differences (a cost); see the module docstring."""

    @staticmethod
    def forward(ctx: FunctionCtx, fixed: Tensor, moving: Tensor, radius: int) -> Tensor:
        spatial = tuple(fixed.shape[2:])
        fixed_l, padded = _prepare(fixed, moving, radius, 1.0)
        raw = fixed.new_empty((fixed.shape[0], (2 * radius + 1) ** 3, *spatial))
        for x0, x1 in _slabs(fixed):
            fixed_slab, raw_slab = fixed_l[:, :, x0:x1], raw[:, :, x0:x1]
            difference = torch.empty_like(fixed_slab)
            for k, moving_slab in enumerate(_shift_views(padded, x0, x1, radius, spatial)):
                torch.sum(torch.sub(fixed_slab, moving_slab, out=difference).abs_(), dim=1, out=raw_slab[:, k])
        ctx.save_for_backward(fixed, moving)
        ctx.radius = radius
        return _box(raw, out=raw)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        fixed, moving = ctx.saved_tensors
        radius, spatial = ctx.radius, tuple(fixed.shape[2:])
        fixed_l, padded = _prepare(fixed, moving, radius, 1.0)
        # The box filter is self-adjoint: filter the incoming gradient, then treat the raw SAD.
        grad_raw = _box(grad_out, out=torch.empty_like(grad_out, memory_format=torch.contiguous_format))
        grad_fixed = torch.zeros_like(fixed_l) if ctx.needs_input_grad[0] else None
        grad_padded = torch.zeros_like(padded) if ctx.needs_input_grad[1] else None
        for x0, x1 in _slabs(fixed):
            fixed_slab, grad_slab = fixed_l[:, :, x0:x1], grad_raw[:, :, x0:x1]
            moving_views = _shift_views(padded, x0, x1, radius, spatial)
            grad_views = _shift_views(grad_padded, x0, x1, radius, spatial) if grad_padded is not None else None
            signed = torch.empty_like(fixed_slab)
            for k, moving_slab in enumerate(moving_views):
                torch.sub(fixed_slab, moving_slab, out=signed).sign_()
                grad_k = grad_slab[:, k : k + 1]
                if grad_fixed is not None:  # dL/dF_f(x) += g_d(x) sign(F_f(x) - F_m(x + d))
                    grad_fixed[:, :, x0:x1].addcmul_(signed, grad_k)
                if grad_views is not None:  # dL/dF_m(x + d) -= g_d(x) sign(F_f(x) - F_m(x + d))
                    grad_views[k].addcmul_(signed, grad_k, value=-1.0)
        grad_fixed = grad_fixed.contiguous() if grad_fixed is not None else None
        grad_moving = _unpad(grad_padded, radius, spatial) if grad_padded is not None else None
        return grad_fixed, grad_moving, None


def local_correlation(fixed_features: Tensor, moving_features: Tensor, radius: int, kind: str = "dot") -> Tensor:
    """Correlation volume ``(B, (2r+1)^3, X, Y, Z)`` of features ``(B, C, X, Y, Z)`` over shifts in ``[-r, r]^3``.

    ``kind`` is ``"dot"`` (similarity, dot product over sqrt(C)) or ``"sad"`` (cost, box-filtered
    sum of absolute differences). Shifts are in voxels of the feature grid; channel order is given
    by :func:`shift_offsets`. Differentiable with respect to both feature tensors.
    """
    if kind not in KINDS:
        raise ValueError(f"correlation kind must be one of {KINDS}, got {kind!r}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"correlation radius must be a non-negative int, got {radius!r}")
    if fixed_features.dim() != 5 or fixed_features.shape != moving_features.shape:
        raise ValueError(
            "fixed and moving features must both be (B, C, X, Y, Z) of the same shape, got "
            f"{tuple(fixed_features.shape)} and {tuple(moving_features.shape)}"
        )
    if fixed_features.dtype != moving_features.dtype or fixed_features.device != moving_features.device:
        raise ValueError(
            "fixed and moving features must share dtype and device, got "
            f"{fixed_features.dtype}/{fixed_features.device} and {moving_features.dtype}/{moving_features.device}"
        )
    function = _DotCorrelation if kind == "dot" else _SadCorrelation
    return function.apply(fixed_features, moving_features, radius)


class Correlation(nn.Module):
    """Module form of :func:`local_correlation` with a fixed ``radius`` and ``kind``."""

    def __init__(self, radius: int, kind: str = "dot") -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"correlation kind must be one of {KINDS}, got {kind!r}")
        self.radius = radius
        self.kind = kind

    @property
    def channels(self) -> int:
        """Number of output channels, ``(2r+1)^3``."""
        return (2 * self.radius + 1) ** 3

    def forward(self, fixed_features: Tensor, moving_features: Tensor) -> Tensor:
        """``(B, C, X, Y, Z)`` twice -> ``(B, (2r+1)^3, X, Y, Z)``."""
        return local_correlation(fixed_features, moving_features, self.radius, self.kind)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, kind={self.kind!r}"
