"""Intensity normalisation presets, shared by training and registration.

* ``mr``: min-max to [0, 1] over the image (the shared brains and OASIS are
  already in [0, 1], so this leaves them unchanged).
* ``ct``: a Hounsfield window clipped to [0, 1]: ``window`` (default,
  -1000..600 HU, air to dense tissue, what the lungs need) or ``paper``
  (-4000..16000, the range the RWCNet paper normalises NLST with).

:func:`invert_contrast` makes the contrast-inverted test image the issues and benchmarks use.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from rwcnet.errors import InputError

Modality = Literal["mr", "ct"]
CT_RANGES: dict[str, tuple[float, float]] = {"window": (-1000.0, 600.0), "paper": (-4000.0, 16000.0)}


def scale_intensity(array: np.ndarray, low: float, high: float, *, clip: bool) -> np.ndarray:
    """``(I − low) / (high − low)`` as float32, clipped to [0, 1] when ``clip`` (a window)."""
    scaled = (np.asarray(array, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0) if clip else scaled


def normalise(array: np.ndarray, modality: str, *, ct_range: str = "window") -> np.ndarray:
    """Map intensities of an ``(X, Y, Z)`` image to [0, 1] for ``modality`` ``mr`` or ``ct``; float32."""
    data = np.asarray(array, dtype=np.float32)
    if modality == "mr":
        low, high = float(data.min()), float(data.max())
        return (data - low) / (high - low) if high > low else np.zeros_like(data)
    if modality == "ct":
        if ct_range not in CT_RANGES:
            raise InputError(f"unknown CT intensity range {ct_range!r}; use one of {', '.join(CT_RANGES)}")
        low, high = CT_RANGES[ct_range]
        return scale_intensity(data, low, high, clip=True)
    raise InputError(f"unknown modality {modality!r}; use 'mr' or 'ct'")


def invert_contrast(array: np.ndarray) -> np.ndarray:
    """``where(m > 0, max(m[m > 0]) − m, 0)`` as float32: the head's contrast inverted, the background kept at 0."""
    data = np.asarray(array, dtype=np.float32)
    inside = data > 0
    if not inside.any():
        return np.zeros_like(data)
    return np.where(inside, data[inside].max() - data, 0).astype(np.float32)
