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
gradient reaches both inputs). They never build a ``(2r+1)^3 x C x volume`` tensor; only the
two inputs are saved for the backward pass.

* ``"dot"`` is bilinear, so it runs as batched matrix products: z-blocks of fixed features
  against the moving windows that cover their z-shifts, one ``bmm`` per in-plane shift
  (:class:`_Windows`); the backward pass uses the same products with the incoming gradient
  placed on the band. Dense products keep both cores busy and are far less sensitive to
  other processes than thousands of small elementwise ops.
* ``"sad"`` is not bilinear: the forward pads the moving features once and writes each shift
  into a preallocated output, and the backward accumulates both gradients in place, shift by
  shift. On CPU the volume is processed in slabs of a few x-slices, looping over all shifts
  inside a slab, so that the slab's features and gradients stay in cache. On CUDA the whole
  volume is one slab. This path issues thousands of small parallel ops: when other processes
  share the cores, run with
  ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is imported; rwcnet does so unless the user
  set it), otherwise OpenMP threads spin at every op and the cost grows several-fold.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

from torch.autograd.function import FunctionCtx, once_differentiable

from rwcnet.geometry.filters import box_filter
from rwcnet.geometry.layout import integer_shifts

Tensor = torch.Tensor

KINDS = ("dot", "sad")
# Elements (C * slab voxels) per CPU slab: about 1 MB of float32 features per slab.
_CPU_SLAB_ELEMENTS = 1 << 18
# Elements per CPU slab of the soft-argmax readout: 16 MB of float32 correlation (on 2 cores, slabs of
# 8-32 MB took 0.23-0.32 s at 125×80×96×112, the whole volume at once 0.29-0.66 s).
_READOUT_SLAB_ELEMENTS = 1 << 22
# Shift channels box-filtered together in the "sad" kind.
_BOX_CHANNELS = 7


def shift_offsets(radius: int) -> list[tuple[int, int, int]]:
    """The ``(2r+1)^3`` shifts ``(d0, d1, d2)`` in output-channel order (d0 outermost)."""
    return integer_shifts(radius)


def soft_argmax(cost: Tensor, radius: int, kind: str, temperature: Tensor | float = 1.0) -> Tensor:
    """Expected shift ``(B, 3, X, Y, Z)`` (voxels) under ``softmax(±cost / temperature)`` over the shifts.

    ``cost`` is a correlation volume ``(B, (2r+1)^3, X, Y, Z)`` of :func:`local_correlation`;
    ``"dot"`` is a similarity (softmax of ``cost``), ``"sad"`` a cost (softmax of ``-cost``).
    On CPU the softmax runs on slabs along X, so its temporaries stay small instead of
    two more copies of the correlation volume (430 MB each at 80×96×112 with radius 2).
    """
    offsets = torch.tensor(shift_offsets(radius), dtype=cost.dtype, device=cost.device).T  # (3, K)
    scale = (1.0 if kind == "dot" else -1.0) / temperature
    b, _, _, y, z = cost.shape
    parts = []
    for x0, x1 in _slabs(cost, _READOUT_SLAB_ELEMENTS):
        weights = torch.softmax(cost[:, :, x0:x1] * scale, dim=1)
        parts.append(torch.matmul(offsets, weights.flatten(2)).view(b, 3, x1 - x0, y, z))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _slabs(volume: Tensor, elements: int = _CPU_SLAB_ELEMENTS) -> Iterator[tuple[int, int]]:
    """Ranges ``[x0, x1)`` of x-slices of ``(B, C, X, Y, Z)`` holding about ``elements`` values each (whole volume off CPU)."""
    size_x = volume.shape[2]
    if volume.device.type != "cpu":
        yield 0, size_x
        return
    per_slice = volume.shape[0] * volume.shape[1] * volume.shape[3] * volume.shape[4]
    step = max(1, elements // max(per_slice, 1))
    for x0 in range(0, size_x, step):
        yield x0, min(size_x, x0 + step)


def _box(volume: Tensor, out: Tensor) -> Tensor:
    """3x3x3 mean filter per channel of ``volume`` into ``out`` (may be ``volume`` itself).

    Zero padding, count_include_pad=True (always divided by 27): :func:`rwcnet.geometry.filters.box_filter`
    on a few channels at a time, so temporaries stay small and in cache (several times faster than
    ``avg_pool3d`` on CPU).
    """
    for c0 in range(0, volume.shape[1], _BOX_CHANNELS):
        box_filter(volume[:, c0 : c0 + _BOX_CHANNELS], 1, out=out[:, c0 : c0 + _BOX_CHANNELS])
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


def _prepare(fixed: Tensor, moving: Tensor, radius: int) -> tuple[Tensor, Tensor]:
    """Contiguous fixed features and zero-padded moving features (channels first: with the few
    channels of the CPU preset, per-shift sums over channels run 2-3x faster than channels-last)."""
    return fixed.contiguous(), F.pad(moving, (radius,) * 6).contiguous()


def _unpad(padded: Tensor, radius: int, spatial: tuple[int, int, int]) -> Tensor:
    """Inner (unpadded) part of a padded volume, as a contiguous tensor."""
    r = radius
    return padded[:, :, r : r + spatial[0], r : r + spatial[1], r : r + spatial[2]].contiguous()


class _Windows:
    """The dot product as batched matrix products over z-blocks (shared by forward and backward).

    Channels-last features are cut into blocks of ``L`` voxels along z. For an in-plane shift
    ``(d0, d1)`` one ``bmm`` multiplies every fixed block ``(L, C)`` with the moving window
    ``(L + 2r, C)`` that covers its ``2r + 1`` z-shifts; the shifts are the band ``j = i + d2 + r``
    of the ``(L, L + 2r)`` product. With ``L = 2(2r + 1)`` about a third of the products are used,
    but dense matrix products run an order of magnitude faster than per-shift elementwise ops.
    """

    def __init__(self, fixed: Tensor, moving: Tensor, radius: int) -> None:
        batch, channels, sx, sy, sz = fixed.shape
        self.span = 2 * radius + 1
        self.block = 2 * self.span
        self.spatial = (sx, sy, sz)
        self.blocks = -(-sz // self.block)
        extra = self.blocks * self.block - sz  # pad z up to whole blocks (cropped from the output)
        scale = 1.0 / math.sqrt(channels)
        fixed_l = F.pad(fixed * scale, (0, extra)).permute(0, 2, 3, 4, 1).contiguous()
        self.fixed = fixed_l.view(-1, self.block, channels)  # (N, L, C)
        self.padded = F.pad(moving, (radius, radius + extra, radius, radius, radius, radius)).permute(0, 2, 3, 4, 1).contiguous()
        self.shape = (batch, sx, sy, self.blocks * self.block)

    def window(self, tensor: Tensor, d0: int, d1: int, rows: int, start: int = 0) -> Tensor:
        """View ``(B, X, Y, blocks, rows, C)`` of a padded channels-last tensor for shift ``(d0, d1)`` (0-based)."""
        s_b, s_x, s_y, s_z, s_c = tensor.stride()
        batch, sx, sy, _ = self.shape
        size = (batch, sx, sy, self.blocks, rows, tensor.shape[-1])
        stride = (s_b, s_x, s_y, self.block * s_z, s_z, s_c)
        return tensor.as_strided(size, stride, tensor.storage_offset() + d0 * s_x + d1 * s_y + start * s_z)

    def band(self, products: Tensor) -> Tensor:
        """The ``(N, L, 2r + 1)`` band ``products[n, i, i + k]`` of ``(N, L, L + 2r)`` products."""
        width = products.shape[-1]
        return products.as_strided((products.shape[0], self.block, self.span), (self.block * width, width + 1, 1))

    def shifts(self) -> Iterator[tuple[int, int, int]]:
        """``(d0, d1, first output channel)`` for every in-plane shift (0-based d)."""
        for d0 in range(self.span):
            for d1 in range(self.span):
                yield d0, d1, (d0 * self.span + d1) * self.span


class _DotCorrelation(torch.autograd.Function):
    """Dot-product correlation over sqrt(C) by batched matrix products; see :class:`_Windows`."""

    @staticmethod
    def forward(ctx: FunctionCtx, fixed: Tensor, moving: Tensor, radius: int) -> Tensor:
        windows = _Windows(fixed, moving, radius)
        batch, sx, sy, sz_blocks = windows.shape
        rows = windows.block + 2 * radius
        out = fixed.new_empty((batch, windows.span**3, *windows.spatial))
        sz = windows.spatial[2]
        for d0, d1, k0 in windows.shifts():
            moving_rows = windows.window(windows.padded, d0, d1, rows).reshape(-1, rows, fixed.shape[1])
            band = windows.band(torch.bmm(windows.fixed, moving_rows.transpose(1, 2)))
            band = band.reshape(batch, sx, sy, sz_blocks, windows.span)[:, :, :, :sz]
            out[:, k0 : k0 + windows.span].copy_(band.permute(0, 4, 1, 2, 3))
        ctx.save_for_backward(fixed, moving)
        ctx.radius = radius
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        fixed, moving = ctx.saved_tensors
        radius = ctx.radius
        windows = _Windows(fixed, moving, radius)
        batch, sx, sy, sz_blocks = windows.shape
        channels, span, block = fixed.shape[1], windows.span, windows.block
        rows = block + 2 * radius
        extra = sz_blocks - windows.spatial[2]
        grad_l = F.pad(grad_out, (0, extra)).permute(0, 2, 3, 4, 1)  # (B, X, Y, Z', K^3), zero on padded z
        banded = fixed.new_zeros((windows.fixed.shape[0], block, rows))  # band holds g_d(x); zero elsewhere
        band = windows.band(banded)
        grad_fixed = torch.zeros_like(windows.fixed) if ctx.needs_input_grad[0] else None
        grad_padded = torch.zeros_like(windows.padded) if ctx.needs_input_grad[1] else None
        for d0, d1, k0 in windows.shifts():
            band.copy_(grad_l[..., k0 : k0 + span].reshape(-1, block, span))
            if grad_fixed is not None:  # dL/dF_f(x) = sum_d g_d(x) F_m(x + d) / sqrt(C)
                moving_rows = windows.window(windows.padded, d0, d1, rows).reshape(-1, rows, channels)
                grad_fixed.baddbmm_(banded, moving_rows)
            if grad_padded is not None:  # dL/dF_m(x + d) = sum g_d(x) F_f(x) / sqrt(C)
                grad_rows = torch.bmm(banded.transpose(1, 2), windows.fixed).view(batch, sx, sy, -1, rows, channels)
                windows.window(grad_padded, d0, d1, block).add_(grad_rows[..., :block, :])
                windows.window(grad_padded, d0, d1, 2 * radius, start=block).add_(grad_rows[..., block:, :])
        result_fixed = result_moving = None
        if grad_fixed is not None:
            scaled = grad_fixed.view(batch, sx, sy, sz_blocks, channels)[:, :, :, : windows.spatial[2]]
            result_fixed = scaled.permute(0, 4, 1, 2, 3).mul(1.0 / math.sqrt(channels)).contiguous()
        if grad_padded is not None:
            r = radius
            inner = grad_padded[:, r : r + sx, r : r + sy, r : r + windows.spatial[2]]
            result_moving = inner.permute(0, 4, 1, 2, 3).contiguous()
        return result_fixed, result_moving, None


class _SadCorrelation(torch.autograd.Function):
    """Box-filtered sum of absolute differences (a cost); see the module docstring."""

    @staticmethod
    def forward(ctx: FunctionCtx, fixed: Tensor, moving: Tensor, radius: int) -> Tensor:
        spatial = tuple(fixed.shape[2:])
        fixed_l, padded = _prepare(fixed, moving, radius)
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
        fixed_l, padded = _prepare(fixed, moving, radius)
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
