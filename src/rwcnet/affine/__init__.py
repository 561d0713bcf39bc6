"""Rigid -> affine pre-alignment of two images in physical space, and the affine transform toolkit.

``register_affine(fixed, moving)`` returns an :class:`AffineResult` whose ``matrix`` is the 4x4 ``T`` (float64)
mapping a fixed physical point to the moving one, RAS mm (see :mod:`rwcnet.affine.transforms` for the
convention and the ITK/ANTs files). Each image stays on its own grid; masks are honoured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field as dataclass_field

import numpy as np

from rwcnet.affine.engine import METRICS, centre_of_mass, optimise_affine
from rwcnet.affine.sitk_engine import SITK_METRICS, sitk_affine
from rwcnet.affine.transforms import (affine_field, matrix_about, point_errors, read_itk_transform, resample_moving,
                                      rotation_matrix, to_itk, write_itk_transform)
from rwcnet.errors import InputError
from rwcnet.data.formats import Image

__all__ = ["AffineResult", "register_affine", "initial_transform", "affine_field", "matrix_about", "point_errors",
           "read_itk_transform", "resample_moving", "rotation_matrix", "to_itk", "write_itk_transform"]

TRANSFORMS = ("rigid", "affine")
INITS = ("com", "moments", "identity")
ENGINES = ("torch", "sitk")
#: ``(kind, level mm, Adam steps)`` of the torch engine, chosen by benchmarks/affine_robustness.py.
_RIGID = [("rigid", 6.0, 40), ("rigid", 6.0, 40), ("rigid", 3.0, 30)]
STAGES = {"rigid": _RIGID, "affine": _RIGID + [("affine", 3.0, 40)]}


@dataclass
class AffineResult:
    """``matrix`` 4x4 (fixed RAS mm -> moving RAS mm), the initial one, how it was found, per-stage records."""

    matrix: np.ndarray
    initial: np.ndarray
    transform: str
    metric: str
    engine: str
    seconds: float
    stages: list[dict] = dataclass_field(default_factory=list)

    def itk_matrix(self) -> np.ndarray:
        """The same transform in ITK/ANTs' LPS convention (fixed -> moving)."""
        return to_itk(self.matrix)


def _principal_axes(image: Image, mask: Image | None) -> np.ndarray:
    """Unit principal axes (columns, RAS, by increasing second moment) of the intensity above the minimum."""
    weights = image.array.astype(np.float64) - float(image.array.min())
    if mask is not None:
        weights = weights * (mask.array > 0)
    step = max(1, int(round(np.cbrt(weights.size / 2e5))))
    weights = weights[::step, ::step, ::step]
    index = np.argwhere(weights > 0) * step
    values = weights[weights > 0]
    points = index @ image.affine[:3, :3].T
    centred = points - (values[:, None] * points).sum(0) / values.sum()
    _, vectors = np.linalg.eigh((values[:, None] * centred).T @ centred)
    return vectors


def initial_transform(fixed: Image, moving: Image, init: str = "com", fixed_mask: Image | None = None,
                      moving_mask: Image | None = None) -> np.ndarray:
    """Start of the search: ``identity``, ``com`` (centres of mass matched) or ``moments`` (also principal axes).

    For ``moments`` the sign of each axis pair is chosen to give the rotation nearest to the identity, so
    scans turned by less than 90 degrees start from the right side.
    """
    if init not in INITS:
        raise InputError(f"unknown affine initialisation {init!r}; use one of {', '.join(INITS)}")
    if init == "identity":
        return np.eye(4)
    fixed_centre, moving_centre = centre_of_mass(fixed, fixed_mask), centre_of_mass(moving, moving_mask)
    rotation = np.eye(3)
    if init == "moments":
        axes_fixed, axes_moving = _principal_axes(fixed, fixed_mask), _principal_axes(moving, moving_mask)
        candidates = []
        for signs in ([1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]):
            candidate = axes_moving @ np.diag(signs) @ axes_fixed.T
            if np.linalg.det(candidate) < 0:
                candidate = axes_moving @ np.diag(-np.array(signs)) @ axes_fixed.T
            candidates.append(candidate)
        rotation = max(candidates, key=np.trace)
    return matrix_about(rotation, fixed_centre, moving_centre - fixed_centre)


def register_affine(fixed: Image, moving: Image, *, transform: str = "affine", metric: str = "mind",
                    init: str | np.ndarray = "com", fixed_mask: Image | None = None,
                    moving_mask: Image | None = None, engine: str = "torch", seed: int = 0) -> AffineResult:
    """Rigid, then (``transform="affine"``) affine registration of ``moving`` to ``fixed``, each on its own grid.

    Args:
        transform: ``rigid`` (6 parameters) or ``affine`` (12).
        metric: ``mind`` (MIND-SSC, the default: MR, CT, contrast changes), ``ncc`` (global) or ``mi``.
        init: ``com``, ``moments``, ``identity``, or a 4x4 fixed->moving RAS matrix to start from.
        fixed_mask, moving_mask: nonzero = inside, each on its image's grid.
        engine: ``torch`` (rwcnet's own) or ``sitk`` (SimpleITK's ImageRegistrationMethod; ``mi``/``ncc``).
        seed: draws the sample points.
    """
    if transform not in TRANSFORMS:
        raise InputError(f"unknown linear transform {transform!r}; use rigid or affine")
    if metric not in METRICS:
        raise InputError(f"unknown affine metric {metric!r}; use one of {', '.join(METRICS)}")
    if engine not in ENGINES:
        raise InputError(f"unknown affine engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "sitk" and metric not in SITK_METRICS:
        raise InputError(f"affine metric {metric!r} with the SimpleITK engine: it has no MIND; use mi or ncc there")
    start = time.perf_counter()
    if isinstance(init, str):
        initial = initial_transform(fixed, moving, init, fixed_mask, moving_mask)
    else:
        initial = np.asarray(init, dtype=np.float64)
    if engine == "torch":
        matrix, stages = optimise_affine(fixed, moving, initial, stages=STAGES[transform], metric=metric,
                                         fixed_mask=fixed_mask, moving_mask=moving_mask, seed=seed)
    else:
        matrix, stages = sitk_affine(fixed, moving, initial, transform=transform, metric=metric,
                                     fixed_mask=fixed_mask, moving_mask=moving_mask, seed=seed), []
    return AffineResult(matrix, initial, transform, metric, engine, time.perf_counter() - start, stages)
