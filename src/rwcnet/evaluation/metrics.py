"""Learn2Reg scores, computed the way the current official evaluation script does.

All functions work on numpy arrays and never touch the model, so a score
depends only on the field file and the ground truth:

* a displacement field is ``(X, Y, Z, 3)`` on the fixed grid, in voxels,
  channel ``c`` along array axis ``c``, pull-back (``m(x + u(x))``);
* label maps are integer arrays ``(X, Y, Z)``; keypoints ``(N, 3)`` voxel
  indices in array order; spacings are millimetres per voxel.

What is copied from the official scorer on purpose (SPEC §4):

* moving labels are warped with ``map_coordinates(order=0)`` (zero outside);
* a label absent from the fixed or the (unwarped) moving label map scores
  NaN for Dice and HD95; a label present in both that the field pushes out
  of the image scores Dice 0 and HD95 ``inf``; the case score is the nanmean;
* HD95 is in voxels (spacing ignored), the maximum of the two directed 95th
  percentiles of surface-to-surface distances, the surface elements being
  the voxel corners whose 2x2x2 cell is mixed, each weighted by the area of
  its marching-cubes surface;
* the Jacobian uses central differences ``[-0.5, 0, 0.5]`` with zero padding,
  plus identity, cropped by 2 voxels on every side; SDlogJ is the standard
  deviation of ``log(clip(det + 3, 1e-9, 1e9))`` (the ``+3`` quirk), inside
  the fixed mask when the evaluation is masked (voxels ``> 0``; the official
  code keeps voxels equal to 1, the same for a binary mask);
* TRE samples ``u`` at the fixed keypoints with cubic ``map_coordinates``
  (zero outside) and measures ``|(k_fix + u - k_mov) * spacing|`` in mm;
* aggregates over cases are ``np.mean``, ``np.std`` (population) and a "30"
  value: the 0.3 quantile for Dice and HD95, the 0.7 quantile for TRE and
  SDlogJ (and for the folding fraction, which the official script does not
  aggregate).

Not official: the fraction of folded voxels (``det <= 0`` without the
``+3``, over the cropped grid); the official ``num_foldings`` is counted
after the ``+3`` and clipping and is therefore always 0.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from rwcnet.geometry import jacobian_determinant
from rwcnet.geometry.layout import field_tensor
from rwcnet.geometry.official import field_at_points_cubic, warp_labels_official
from rwcnet.evaluation.surface_distance import robust_hausdorff

JACOBIAN_CROP = 2
SDLOGJ_OFFSET = 3.0
CASE_METRICS = ("dice", "hd95", "sdlogj", "folding_fraction", "tre")
UPPER_QUANTILE_METRICS = frozenset({"sdlogj", "tre", "folding_fraction"})


def _as_field(field: np.ndarray) -> np.ndarray:
    """Check a displacement field ``(X, Y, Z, 3)`` and return it as float64."""
    field = np.asarray(field)
    if field.ndim != 4 or field.shape[-1] != 3:
        raise ValueError(f"a displacement field must have shape (X, Y, Z, 3), not {field.shape}")
    return field.astype(np.float64, copy=False)


def _nanmean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN (without a warning) when every value is NaN or there are none."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0 or np.all(np.isnan(array)):
        return float("nan")
    return float(np.nanmean(array))


def warp_labels_nearest(moving_labels: np.ndarray, field: np.ndarray, mode: str = "constant") -> np.ndarray:
    """Warp a moving label map with a pull-back field, nearest neighbour, 0 outside.

    ``moving_labels`` is ``(X', Y', Z')``, ``field`` ``(X, Y, Z, 3)`` in voxels
    of the moving grid laid on the fixed grid; returns ``(X, Y, Z)`` labels of
    the moving map's dtype. The default ``mode="constant"`` is exactly how the
    official scorer warps them (0 for any point outside ``[0, n - 1]``);
    ``"grid-constant"`` keeps the border label up to half a voxel outside.
    """
    return warp_labels_official(moving_labels, _as_field(field), mode)


def _presence(labels_map: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Whether each label value occurs in ``labels_map``: bool array ``(len(labels),)``."""
    present = np.unique(labels_map)
    return np.isin(np.asarray(labels), present)


def _per_label(
    score: Callable[[np.ndarray, np.ndarray], float],
    fixed_labels: np.ndarray,
    moving_labels_warped: np.ndarray,
    labels: Sequence[int],
    moving_labels: np.ndarray | None,
) -> np.ndarray:
    """``score(fixed == label, warped == label)`` for each label; NaN where :func:`dice_per_label` says."""
    if fixed_labels.shape != moving_labels_warped.shape:
        raise ValueError(f"label maps differ in shape: {fixed_labels.shape} and {moving_labels_warped.shape}")
    reference = moving_labels_warped if moving_labels is None else moving_labels
    valid = _presence(fixed_labels, labels) & _presence(reference, labels)
    scores = np.full(len(labels), np.nan)
    for index, label in enumerate(labels):
        if valid[index]:
            scores[index] = score(fixed_labels == label, moving_labels_warped == label)
    return scores


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks."""
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def dice_per_label(
    fixed_labels: np.ndarray,
    moving_labels_warped: np.ndarray,
    labels: Sequence[int],
    moving_labels: np.ndarray | None = None,
) -> np.ndarray:
    """Dice of each label between the fixed and the warped moving label maps: ``(len(labels),)``.

    A label absent from ``fixed_labels`` or from the unwarped ``moving_labels``
    is NaN (the official rule); when ``moving_labels`` is not given, presence
    is judged on the warped map instead.
    """
    return _per_label(_dice, fixed_labels, moving_labels_warped, labels, moving_labels)


def hd95_per_label(
    fixed_labels: np.ndarray,
    moving_labels_warped: np.ndarray,
    labels: Sequence[int],
    moving_labels: np.ndarray | None = None,
) -> np.ndarray:
    """HD95 of each label in voxels: ``(len(labels),)``, with the same NaN rule as :func:`dice_per_label`."""
    return _per_label(robust_hausdorff, fixed_labels, moving_labels_warped, labels, moving_labels)


def jacobian_det(field: np.ndarray) -> np.ndarray:
    """Jacobian determinant of ``x + u(x)``: ``(X-4, Y-4, Z-4)``, the official way.

    Central differences ``[-0.5, 0, 0.5]`` with zeros outside, plus identity,
    cropped by 2 voxels on every side (so the padding never shows).
    """
    field = _as_field(field)
    if min(field.shape[:3]) <= 2 * JACOBIAN_CROP:
        raise ValueError(f"field of shape {field.shape} is too small for the cropped Jacobian")
    crop = (slice(JACOBIAN_CROP, -JACOBIAN_CROP),) * 3
    jac = np.empty((3, 3) + tuple(n - 2 * JACOBIAN_CROP for n in field.shape[:3]))
    for axis in range(3):
        kernel = np.array([-0.5, 0.0, 0.5]).reshape([3 if a == axis else 1 for a in range(3)])
        for component in range(3):
            gradient = ndimage.correlate(field[..., component], kernel, mode="constant", cval=0.0)
            jac[component, axis] = gradient[crop] + (1.0 if component == axis else 0.0)
    return (
        jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
        - jac[0, 1] * (jac[1, 0] * jac[2, 2] - jac[1, 2] * jac[2, 0])
        + jac[0, 2] * (jac[1, 0] * jac[2, 1] - jac[1, 1] * jac[2, 0])
    )


def _cropped_mask(mask: np.ndarray | None, det: np.ndarray) -> np.ndarray | None:
    """The fixed mask cropped like the Jacobian, as bool, or None for unmasked."""
    if mask is None:
        return None
    cropped = np.asarray(mask)[(slice(JACOBIAN_CROP, -JACOBIAN_CROP),) * 3] > 0
    if cropped.shape != det.shape:
        raise ValueError(f"mask of shape {np.asarray(mask).shape} does not match the field's grid")
    return cropped


def sdlogj(det: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Std of ``log(clip(det + 3, 1e-9, 1e9))`` over the cropped grid, or inside ``mask`` (full fixed grid)."""
    log_det = np.log(np.clip(det + SDLOGJ_OFFSET, 1e-9, 1e9))
    region = _cropped_mask(mask, det)
    values = log_det if region is None else log_det[region]
    return float(values.std()) if values.size else float("nan")


def folding_fraction(det: np.ndarray) -> float:
    """Fraction of voxels of the cropped grid with ``det <= 0`` (no ``+3``)."""
    return float(np.count_nonzero(det <= 0) / det.size)


def jacobian_statistics(field: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Jacobian determinant of the whole transform ``x + u(x)`` on the full grid, and its statistics.

    ``field`` ``(X, Y, Z, 3)`` is in fixed voxels (affine part included), so the determinant is the local
    volume ratio of the physical map whatever the spacing. Returns the determinant ``(X, Y, Z)`` float32
    from central differences (one-sided at the border, not cropped:
    :func:`rwcnet.geometry.jacobian_determinant`) and ``sdlogj`` (the official score, cropped, ``+3``,
    inside ``mask`` when given), ``std_log_det`` (std of ``log det`` over ``det > 0``, no ``+3``),
    ``folded_fraction`` (share of ``det <= 0``), ``min`` and ``max``; all but ``sdlogj`` over the full grid,
    or inside ``mask`` when given.
    """
    field = _as_field(field)
    det = jacobian_determinant(field_tensor(field))[0].numpy()
    values = det if mask is None else det[np.asarray(mask) > 0]
    positive = values[values > 0]
    statistics = {
        "sdlogj": sdlogj(jacobian_det(field), mask),
        "std_log_det": float(np.log(positive).std()) if positive.size else float("nan"),
        "folded_fraction": float(np.count_nonzero(values <= 0) / max(values.size, 1)),
        "min": float(values.min()) if values.size else float("nan"),
        "max": float(values.max()) if values.size else float("nan"),
    }
    return det.astype(np.float32), statistics


def tre(field: np.ndarray, fixed_kp: np.ndarray, moving_kp: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Target registration error of each keypoint pair in mm: ``(N,)``.

    ``u`` is sampled at the fixed keypoints (voxel indices ``(N, 3)``) with
    cubic interpolation (zero outside), and the error is
    ``|(k_fix + u(k_fix) - k_mov) * spacing|``.
    """
    field = _as_field(field)
    fixed_kp = np.atleast_2d(np.asarray(fixed_kp, dtype=np.float64))
    moving_kp = np.atleast_2d(np.asarray(moving_kp, dtype=np.float64))
    if fixed_kp.shape != moving_kp.shape or fixed_kp.shape[-1] != 3:
        raise ValueError(f"keypoints must be two (N, 3) arrays of equal N, not {fixed_kp.shape} and {moving_kp.shape}")
    displacement = field_at_points_cubic(field, fixed_kp)
    return np.linalg.norm((fixed_kp + displacement - moving_kp) * np.asarray(spacing, dtype=np.float64), axis=1)


def score_case(
    field: np.ndarray,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    labels: Sequence[int] | None = None,
    fixed_kp: np.ndarray | None = None,
    moving_kp: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    fixed_mask: np.ndarray | None = None,
    *,
    compute_hd95: bool = True,
    label_field: np.ndarray | None = None,
) -> dict[str, Any]:
    """All scores of one registration: a dict of floats plus per-label and per-point details.

    Always ``sdlogj`` and ``folding_fraction``; ``dice``, ``dice_per_label``
    (and ``hd95``, ``hd95_per_label``) when both label maps are given (labels
    default to every non-zero value in either map); ``tre`` and
    ``tre_per_point`` when both keypoint sets and ``spacing`` are given.
    ``fixed_mask`` restricts SDlogJ (masked evaluation). ``label_field``
    ``(X, Y, Z, 3)``, in voxels of moving labels on another grid (see
    :func:`rwcnet.grids.sampling_field`), samples them through physical space
    (nearest, ``grid-constant``) instead of the official voxel rule.
    """
    field = _as_field(field)
    det = jacobian_det(field)
    result: dict[str, Any] = {"sdlogj": sdlogj(det, fixed_mask), "folding_fraction": folding_fraction(det)}
    if fixed_labels is not None and moving_labels is not None:
        if fixed_labels.shape != field.shape[:3]:
            raise ValueError(f"fixed labels of shape {fixed_labels.shape} do not match the field {field.shape}")
        if labels is None:
            labels = [int(v) for v in np.union1d(np.unique(fixed_labels), np.unique(moving_labels)) if v != 0]
        if label_field is None:
            warped = warp_labels_nearest(moving_labels, field)
        else:
            warped = warp_labels_nearest(moving_labels, label_field, mode="grid-constant")
        dice = dice_per_label(fixed_labels, warped, labels, moving_labels)
        result["dice"] = _nanmean(dice)
        result["dice_per_label"] = {str(int(label)): float(v) for label, v in zip(labels, dice)}
        if compute_hd95:
            hd95 = hd95_per_label(fixed_labels, warped, labels, moving_labels)
            result["hd95"] = _nanmean(hd95)
            result["hd95_per_label"] = {str(int(label)): float(v) for label, v in zip(labels, hd95)}
    if fixed_kp is not None and moving_kp is not None:
        if spacing is None:
            raise ValueError("TRE needs the voxel spacing in mm")
        errors = tre(field, fixed_kp, moving_kp, spacing)
        result["tre"] = float(errors.mean())
        result["tre_per_point"] = [float(v) for v in errors]
    return result


def aggregate(cases: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, std and "30" value of each scalar metric over cases, as the official script computes them.

    Only metrics present in every case are aggregated. NaN or ``inf`` case
    values propagate, as with ``np.mean``. The "30" value is the 0.7
    quantile for TRE, SDlogJ and the folding fraction (lower is better) and
    the 0.3 quantile for Dice and HD95 (as the official code does).
    """
    result: dict[str, dict[str, float]] = {}
    if not cases:
        return result
    for metric in CASE_METRICS:
        if not all(metric in case for case in cases):
            continue
        values = np.array([float(case[metric]) for case in cases], dtype=np.float64)
        quantile = 0.7 if metric in UPPER_QUANTILE_METRICS else 0.3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result[metric] = {
                "mean": float(values.mean()),
                "std": float(values.std()),
                "30": float(np.quantile(values, quantile)),
                "n": int(values.size),
            }
    return result
