"""The same rigid -> affine registration with SimpleITK's ImageRegistrationMethod (the comparator engine).

Set up like ANTs' rigid and affine stages: Mattes mutual information (32 bins) or correlation, random
sampling of a share of the voxels (seeded), linear interpolation, regular-step gradient descent with scales
from physical shifts, one shrink factor per level of about ``level`` mm with Gaussian smoothing of half a
level, a rigid (Euler) stage then an affine stage started from it. MIND is not available in SimpleITK.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from rwcnet.affine.transforms import linear_matrix, to_itk
from rwcnet.data.formats import Image, _to_sitk

SITK_METRICS = ("mi", "ncc")


def _levels(image: Image, levels_mm: tuple[float, ...]) -> tuple[list[int], list[float]]:
    spacing = float(np.min(image.spacing))
    shrink = [max(1, int(round(level / spacing))) for level in levels_mm]
    return shrink, [level / 2 if factor > 1 else 0.0 for level, factor in zip(levels_mm, shrink)]


def sitk_affine(fixed: Image, moving: Image, initial: np.ndarray, *, transform: str = "affine", metric: str = "mi",
                levels_mm: tuple[float, ...] = (4.0, 2.0), iterations: int = 100, sampling: float = 0.05,
                fixed_mask: Image | None = None, moving_mask: Image | None = None, seed: int = 0) -> np.ndarray:
    """Rigid (then affine) registration from the 4x4 ``initial``; returns ``T`` (fixed RAS mm -> moving RAS mm)."""
    if metric not in SITK_METRICS:
        raise ValueError(f"SimpleITK engine metric {metric!r}: use one of {', '.join(SITK_METRICS)} (no MIND there)")
    images = [_to_sitk(image.array.astype(np.float32), image.affine) for image in (fixed, moving)]
    shrink, sigmas = _levels(fixed, levels_mm)
    itk = to_itk(initial)
    start = sitk.Euler3DTransform()
    centre = np.array(images[0].TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in images[0].GetSize()]))
    start.SetCenter(tuple(centre))
    start.SetMatrix(tuple(_nearest_rotation(itk[:3, :3]).ravel()))
    start.SetTranslation(tuple(itk[:3, :3] @ centre + itk[:3, 3] - centre))
    stages = [start] if transform == "rigid" else [start, None]
    result = start
    for stage in stages:
        if stage is None:
            stage = sitk.AffineTransform(3)
            stage.SetCenter(tuple(centre))
            matrix = linear_matrix(result)
            stage.SetMatrix(tuple(matrix[:3, :3].ravel()))
            stage.SetTranslation(tuple(matrix[:3, :3] @ centre + matrix[:3, 3] - centre))
        method = sitk.ImageRegistrationMethod()
        if metric == "mi":
            method.SetMetricAsMattesMutualInformation(32)
        else:
            method.SetMetricAsCorrelation()
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(sampling, seed)
        if fixed_mask is not None:
            method.SetMetricFixedMask(_to_sitk((fixed_mask.array > 0).astype(np.uint8), fixed_mask.affine))
        if moving_mask is not None:
            method.SetMetricMovingMask(_to_sitk((moving_mask.array > 0).astype(np.uint8), moving_mask.affine))
        method.SetInterpolator(sitk.sitkLinear)
        method.SetOptimizerAsRegularStepGradientDescent(learningRate=levels_mm[0] / 2, minStep=1e-3,
                                                        numberOfIterations=iterations, relaxationFactor=0.7)
        method.SetOptimizerScalesFromPhysicalShift()
        method.SetShrinkFactorsPerLevel(shrink)
        method.SetSmoothingSigmasPerLevel(sigmas)
        method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        method.SetInitialTransform(stage, inPlace=True)
        method.Execute(images[0], images[1])
        result = stage
    return to_itk(linear_matrix(result))


def _nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation closest to a 3x3 matrix (polar decomposition)."""
    u, _, vt = np.linalg.svd(matrix)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        u[:, -1] *= -1
        rotation = u @ vt
    return rotation
