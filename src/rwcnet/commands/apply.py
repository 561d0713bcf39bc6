"""``rwcnet apply``: warp a moving image or label map, and move keypoints, with a Learn2Reg field.

The field is ``(X, Y, Z, 3)`` in voxels on the fixed grid, a pull-back: the
warped moving image is ``m(x + u(x))`` (``docs/conventions.md``). A moving image
on the fixed grid is indexed by the field directly (the Learn2Reg rule); one on
another grid is sampled through physical space (:mod:`rwcnet.grids`).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import numpy as np
import torch
import typer

from rwcnet.errors import InputError
from rwcnet.geometry import invert_points, transform_points, warp, warp_labels
from rwcnet.geometry.grids import Grid, check_field_fits, field_header_grid, sampling_field
from rwcnet.geometry.layout import field_tensor
from rwcnet.data.formats import NIFTI_SUFFIXES, WRITABLE_ITK_SUFFIXES, read_field, read_image, read_keypoints, write_image
from rwcnet.outputs import atomic_output, check_outputs, written_together

INVERSE_TOLERANCE = 0.01  # voxels: largest accepted |x + u(x) - p| of an inverted keypoint


class LabelMethod(str, Enum):
    """How label maps are warped."""

    onehot = "onehot"
    nearest = "nearest"


class PointSpace(str, Enum):
    """The grid the input keypoints are given on."""

    moving = "moving"
    fixed = "fixed"


def warp_image(array: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Warp a moving image ``(I, J, K)`` trilinearly by a field ``(X, Y, Z, 3)`` (voxels); ``(X, Y, Z)``, dtype kept.

    Computed in float64 (border values repeated outside the moving grid);
    integer images are rounded and clipped to their type's range.
    """
    moving = torch.from_numpy(np.asarray(array, dtype=np.float64))[None, None]
    warped = warp(moving, field_tensor(field, torch.float64))[0, 0].numpy()
    if array.dtype.kind == "b":
        return warped >= 0.5
    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        warped = np.clip(np.rint(warped), info.min, info.max)
    return warped.astype(array.dtype)


def warp_label_map(array: np.ndarray, field: np.ndarray, method: str = "onehot") -> np.ndarray:
    """Warp a label map ``(I, J, K)`` by a field ``(X, Y, Z, 3)``: ``"onehot"`` (trilinear + argmax) or ``"nearest"``.

    Returns ``(X, Y, Z)`` of the input's dtype holding only input label
    values. Raises ``ValueError`` when the values are not whole numbers.
    """
    values = np.rint(array) if array.dtype.kind == "f" else array
    if array.dtype.kind == "f" and not np.array_equal(values, array):
        raise ValueError("holds non-integer values, so it is not a label map")
    labels = torch.from_numpy(values.astype(np.int64))[None, None]
    warped = warp_labels(labels, field_tensor(field, torch.float32), method=method)[0, 0].numpy()
    return warped.astype(array.dtype)


def move_keypoints(points: np.ndarray, field: np.ndarray, space: str = "moving") -> tuple[np.ndarray, float]:
    """Move keypoints ``(N, 3)`` (voxel indices) through a field ``(X, Y, Z, 3)``.

    ``space="fixed"``: fixed-grid points to the moving grid, ``p + u(p)``.
    ``space="moving"``: moving-grid points to the fixed grid, solving
    ``x + u(x) = p`` by fixed-point iteration. Returns the points and the
    largest residual ``|x + u(x) - p|`` in voxels (0 for the forward map).
    """
    tensor = field_tensor(field, torch.float64)
    source = torch.from_numpy(np.asarray(points, dtype=np.float64))[None]
    if space == "fixed":
        return transform_points(source, tensor)[0].numpy(), 0.0
    if space != "moving":
        raise ValueError(f"unknown keypoint space {space!r}; use 'moving' or 'fixed'")
    fixed = invert_points(source, tensor, iterations=100)
    residual = float((transform_points(fixed, tensor) - source).norm(dim=-1).max())
    return fixed[0].numpy(), residual


def _check_points(points: np.ndarray, shape: tuple[int, int, int], path: Path, grid: str) -> None:
    """Refuse keypoints outside the grid: they are not voxel indices of that image."""
    outside = np.flatnonzero(np.any((points < -0.5) | (points > np.array(shape) - 0.5), axis=1))
    if outside.size:
        row = int(outside[0])
        raise InputError(f"{path}: {outside.size} keypoint(s) lie outside the {grid} grid of shape {shape}, "
                         f"first on row {row + 1}: {tuple(points[row])}; keypoints must be voxel indices (i, j, k) "
                         "in array order")


def _write_keypoints(path: Path, points: np.ndarray) -> None:
    """Write ``(N, 3)`` voxel indices as a CSV that :func:`rwcnet.data.formats.read_keypoints` reads, atomically."""
    with atomic_output(path) as tmp:
        np.savetxt(tmp, points, fmt="%.6f", delimiter=",")


def _paired(first: Path | None, second: Path | None, first_name: str, second_name: str) -> None:
    if (first is None) != (second is None):
        given, missing = (first_name, second_name) if second is None else (second_name, first_name)
        raise InputError(f"{given} needs {missing}")


def apply(
    field: Path = typer.Option(..., "--field", help="Learn2Reg displacement field (X,Y,Z,3), voxels of the fixed grid "
                               "(.nii.gz, .nii or .npz)."),
    moving: Path | None = typer.Option(None, "--moving", help="Moving image (or label map with --labels) to warp; "
                                       "on another grid than the fixed one it is sampled through physical space."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Warped image (.nii.gz, .nii, .mha, .nrrd)."),
    labels: bool = typer.Option(False, "--labels", help="--moving is a label map: warp it label-aware, keep its type."),
    label_method: LabelMethod = typer.Option(LabelMethod.onehot, "--label-method", help="Label warping: onehot "
                                             "(trilinear per label, then argmax) or nearest (as the Learn2Reg "
                                             "scorer)."),
    keypoints: Path | None = typer.Option(None, "--keypoints", help="Keypoint CSV (i,j,k voxel indices, no header)."),
    keypoints_space: PointSpace = typer.Option(PointSpace.moving, "--keypoints-space", help="Grid of --keypoints: "
                                               "moving (mapped to the fixed grid by inverting the field) or fixed "
                                               "(mapped to the moving grid, p + u(p))."),
    keypoints_output: Path | None = typer.Option(None, "--keypoints-output", help="Moved keypoints, same CSV format."),
    fixed: Path | None = typer.Option(None, "--fixed", help="Fixed image: the fixed (output) grid; the field must "
                                      "fit it."),
) -> None:
    """Warp an image or label map and move keypoints with a Learn2Reg displacement field.

    The warped image is written on the fixed grid, taken from --fixed when
    given, else from the field's own NIfTI header when it has one (an identity
    or code-0 header counts as none; .npz has none). A moving image with that
    grid's shape and affine (within 1e-3 mm) is indexed by the field (the
    Learn2Reg rule); one on another grid is sampled through physical space,
    at A_mov^-1 A_fix (x + u(x)). With no fixed grid at all the moving image
    must have the field's shape and its header gives the output geometry.
    """
    _paired(moving, output, "--moving", "--output")
    _paired(keypoints, keypoints_output, "--keypoints", "--keypoints-output")
    if moving is None and keypoints is None:
        raise InputError("nothing to do: give --moving and --output, and/or --keypoints and --keypoints-output")
    if labels and moving is None:
        raise InputError("--labels needs --moving (the label map) and --output")
    check_outputs((output, NIFTI_SUFFIXES + WRITABLE_ITK_SUFFIXES, "the warped image"),
                  (keypoints_output, (".csv",), "keypoints (CSV)"))

    displacement = read_field(field)
    grid_shape = displacement.shape[:3]
    fixed_grid: Grid | None = Grid.of(read_image(fixed), f"--fixed {fixed}") if fixed is not None else None
    if fixed_grid is None:
        fixed_grid = field_header_grid(field, grid_shape)
    else:
        check_field_fits(displacement.shape, fixed_grid, field)
    image_result = points_result = None
    notes = []
    if moving is not None and output is not None:
        moving_image = read_image(moving)
        sampling, physical_note = sampling_field(displacement, fixed_grid, moving_image, "moving image")
        if fixed_grid is not None:
            reference, source = fixed_grid.reference(), fixed_grid.source
        else:
            reference, source = moving_image, f"the header of {moving}"
            notes.append(f"no fixed grid given (--fixed, or a field header with a real affine): {moving} is taken to "
                         "lie on the fixed grid, and the field indexes its voxels (the Learn2Reg rule)")
        if physical_note is not None:
            notes.append(physical_note)
        if labels:
            try:
                warped = warp_label_map(moving_image.array, sampling, label_method.value)
            except ValueError as error:
                raise InputError(f"{moving}: {error}; drop --labels to warp it as an image") from error
            how = f"label map, {label_method.value}"
        else:
            warped = warp_image(moving_image.array, sampling)
            how = "trilinear"
        rule = "through physical space" if physical_note is not None else "voxel rule"
        image_result = (warped, reference, f"wrote {output} ({how}, {rule}, {warped.dtype}; geometry from {source})")
    if keypoints is not None and keypoints_output is not None:
        points = read_keypoints(keypoints)
        _check_points(points, grid_shape, keypoints, keypoints_space.value)
        moved, residual = move_keypoints(points, displacement, keypoints_space.value)
        if residual > INVERSE_TOLERANCE:
            typer.echo(f"warning: the field is not invertible at some keypoints of {keypoints} (largest residual "
                       f"{residual:.3g} voxels); the field may fold there", err=True)
        target = "fixed" if keypoints_space is PointSpace.moving else "moving"
        points_result = (moved, f"wrote {keypoints_output} ({len(moved)} keypoints on the {target} grid)")
    with written_together():
        if image_result is not None and output is not None:
            write_image(output, image_result[0], image_result[1])
        if points_result is not None and keypoints_output is not None:
            _write_keypoints(keypoints_output, points_result[0])
    if image_result is not None:
        typer.echo(image_result[2])
        for note in notes:
            typer.echo(f"note: {note}", err=True)
    if points_result is not None:
        typer.echo(points_result[1])
