"""Array layout of volumes and fields: ``(X, Y, Z, 3)`` <-> ``(1, 3, X, Y, Z)``, padding to a multiple, shift tables.

Files and scores hold a field as numpy ``(X, Y, Z, 3)`` (Learn2Reg); the torch code as
``(1, 3, X, Y, Z)``. Both are pull-back displacements in voxels of the fixed grid.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def field_tensor(field: np.ndarray, dtype: torch.dtype | None = None, device=None) -> Tensor:
    """A numpy field ``(X, Y, Z, 3)`` as torch ``(1, 3, X, Y, Z)`` (its dtype kept unless ``dtype`` is given)."""
    tensor = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(field), 3, 0)))[None]
    return tensor.to(device=device, dtype=dtype or tensor.dtype)


def field_array(field: Tensor | np.ndarray) -> np.ndarray:
    """A field as numpy ``(X, Y, Z, 3)``: torch ``(1, 3, X, Y, Z)`` or ``(3, X, Y, Z)`` converted, numpy checked.

    Keeps the dtype; raises ``ValueError`` for any other shape.
    """
    if isinstance(field, torch.Tensor):
        tensor = field.detach()
        if tensor.dim() == 5 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() != 4 or tensor.shape[0] != 3:
            raise ValueError(f"torch field of shape {tuple(field.shape)}; expected (1, 3, X, Y, Z)")
        return tensor.permute(1, 2, 3, 0).cpu().numpy()
    array = np.asarray(field)
    if array.ndim != 4 or array.shape[3] != 3:
        raise ValueError(f"field of shape {array.shape}; expected (X, Y, Z, 3)")
    return array


def pad_to_multiple(volume: Tensor, multiple: int, *, mode: str = "replicate") -> Tensor:
    """Pad ``(B, C, X, Y, Z)`` at the high end of each axis to a multiple of ``multiple`` voxels.

    ``mode`` is ``replicate`` (the border repeated) or ``zeros``; undone by :func:`crop`.
    """
    pad = []
    for n in reversed(volume.shape[2:]):
        pad += [0, (-n) % multiple]
    if not any(pad):
        return volume
    if mode == "zeros":
        return F.pad(volume, pad)
    return F.pad(volume, pad, mode=mode)


def crop(volume: Tensor, shape: Sequence[int]) -> Tensor:
    """The first ``shape`` voxels of each axis of ``(B, C, X, Y, Z)`` (undoes :func:`pad_to_multiple`)."""
    x, y, z = shape
    return volume[:, :, :x, :y, :z]


def integer_shifts(radius: int) -> list[tuple[int, int, int]]:
    """All integer shifts ``(d0, d1, d2)`` in ``[−r, r]³``, ``d0`` outermost (the order of correlation channels)."""
    span = range(-radius, radius + 1)
    return list(itertools.product(span, span, span))
