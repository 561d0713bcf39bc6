"""``rwcnet apply``: warp moving images and label maps, and move keypoints, with a Learn2Reg field.

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
from rwcnet.data.formats import NIFTI_SUFFIXES, WRITABLE_ITK_SUFFIXES, Image, read_field, read_image, read_keypoints, write_image
from rwcnet.outputs import atomic_output, check_output_folder, check_outputs, written_together
from rwcnet.points import read_world_points, write_world_points

INVERSE_TOLERANCE = 0.01  # voxels: largest accepted |x + u(x) - p| of an inverted keypoint


class LabelMethod(str, Enum):
    """How label maps are warped."""

    onehot = "onehot"
    nearest = "nearest"


class PointCoordinates(str, Enum):
    """How the keypoint CSV gives its points."""

    voxel = "voxel"
    ras = "ras"
    lps = "lps"


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


def moving_files(values: list[str], labels: bool) -> list[tuple[Path, bool]]:
    """``--moving`` values ``FILE`` or ``FILE:labels`` as ``(path, is a label map)``; ``labels`` marks them all."""
    files = []
    for value in values:
        as_labels = labels
        if value.lower().endswith(":labels"):
            value, as_labels = value[: -len(":labels")], True
        files.append((Path(value), as_labels))
    return files


def _output_paths(files: list[tuple[Path, bool]], output: Path | None, output_dir: Path | None) -> list[Path]:
    """Where each warped file goes: ``--output`` for one file, else ``--output-dir`` / the moving file's name."""
    if output is not None and output_dir is not None:
        raise InputError("give --output (one moving file) or --output-dir (any number), not both")
    if output_dir is None:
        if len(files) > 1:
            raise InputError(f"{len(files)} --moving files need --output-dir (each is written there under its name)")
        return [output] if output is not None else []
    check_output_folder(output_dir)
    outputs = [output_dir / path.name for path, _ in files]
    for (path, _), target in zip(files, outputs):
        if path.resolve() == target.resolve():
            raise InputError(f"{target}: --output-dir would overwrite the moving file itself; choose another folder")
    return outputs


def _warp_file(path: Path, as_labels: bool, displacement: np.ndarray, fixed_grid: Grid | None,
               label_method: LabelMethod) -> tuple[np.ndarray, Image, str, list[str]]:
    """One moving file warped onto the fixed grid: the array, the grid to write it on, how it was done, notes."""
    moving_image = read_image(path)
    sampling, physical_note = sampling_field(displacement, fixed_grid, moving_image, "moving image")
    notes = []
    if fixed_grid is not None:
        reference, source = fixed_grid.reference(), fixed_grid.source
    else:
        reference, source = moving_image, f"the header of {path}"
        notes.append(f"no fixed grid given (--fixed, or a field header with a real affine): {path} is taken to "
                     "lie on the fixed grid, and the field indexes its voxels (the Learn2Reg rule)")
    if physical_note is not None:
        notes.append(physical_note)
    if as_labels:
        try:
            warped = warp_label_map(moving_image.array, sampling, label_method.value)
        except ValueError as error:
            raise InputError(f"{path}: {error}; drop --labels (or :labels) to warp it as an image") from error
        how = f"label map, {label_method.value}"
    else:
        warped = warp_image(moving_image.array, sampling)
        how = "trilinear"
    rule = "through physical space" if physical_note is not None else "voxel rule"
    return warped, reference, f"({how}, {rule}, {warped.dtype}; geometry from {source})", notes


def _move_world_points(path: Path, coordinates: PointCoordinates, displacement: np.ndarray, fixed_grid: Grid | None,
                       space: PointSpace):
    """World keypoints (RAS or LPS mm) moved through the field; returns the table, the moved RAS points, the residual."""
    if fixed_grid is None:
        raise InputError(f"{path}: keypoints in {coordinates.value.upper()} mm need the fixed grid: give --fixed (or a "
                         "field whose NIfTI header has a real affine)")
    table = read_world_points(path, coordinates.value)
    to_voxels = np.linalg.inv(fixed_grid.affine)
    voxels = table.ras @ to_voxels[:3, :3].T + to_voxels[:3, 3]
    moved, residual = move_keypoints(voxels, displacement, space.value)
    return table, moved @ fixed_grid.affine[:3, :3].T + fixed_grid.affine[:3, 3], residual


def apply(
    field: Path = typer.Option(..., "--field", help="Learn2Reg displacement field (X,Y,Z,3), voxels of the fixed grid "
                               "(.nii.gz, .nii or .npz)."),
    moving: list[str] | None = typer.Option(None, "--moving", help="Moving image to warp, FILE or FILE:labels for a "
                                               "label map; repeat it for several files (with --output-dir). Each file "
                                               "on another grid than the fixed one is sampled through physical space."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Warped image of a single --moving (.nii.gz, "
                                          ".nii, .mha, .nrrd)."),
    output_dir: Path | None = typer.Option(None, "--output-dir", help="Folder for the warped files, each under its "
                                              "moving file's name (created if missing)."),
    labels: bool = typer.Option(False, "--labels", help="Every --moving file is a label map: warp it label-aware, "
                                "keep its type."),
    label_method: LabelMethod = typer.Option(LabelMethod.onehot, "--label-method", help="Label warping: onehot "
                                             "(trilinear per label, then argmax) or nearest (as the Learn2Reg "
                                             "scorer)."),
    keypoints: Path | None = typer.Option(None, "--keypoints", help="Keypoint CSV (see --keypoints-coords)."),
    keypoints_coords: PointCoordinates = typer.Option(PointCoordinates.voxel, "--keypoints-coords", help="voxel: "
                                                      "i,j,k indices, no header (Learn2Reg); ras or lps: mm with a "
                                                      "header naming x,y,z, other columns kept (ANTs' points CSV "
                                                      "x,y,z,t is lps). World points need the fixed grid."),
    keypoints_space: PointSpace = typer.Option(PointSpace.moving, "--keypoints-space", help="Side of --keypoints: "
                                               "moving (mapped to the fixed side by inverting the field) or fixed "
                                               "(mapped to the moving side, p + u(p))."),
    keypoints_output: Path | None = typer.Option(None, "--keypoints-output", help="Moved keypoints, same CSV "
                                                    "format."),
    fixed: Path | None = typer.Option(None, "--fixed", help="Fixed image: the fixed (output) grid; the field must "
                                         "fit it."),
) -> None:
    """Warp images and label maps and move keypoints with a Learn2Reg displacement field.

    The warped images are written on the fixed grid, taken from --fixed when
    given, else from the field's own NIfTI header when it has one (an identity
    or code-0 header counts as none; .npz has none). A moving image with that
    grid's shape and affine (within 1e-3 mm) is indexed by the field (the
    Learn2Reg rule); one on another grid is sampled through physical space,
    at A_mov^-1 A_fix (x + u(x)). With no fixed grid at all the moving image
    must have the field's shape and its header gives the output geometry.
    """
    files = moving_files(moving or [], labels)
    if files and output is None and output_dir is None:
        raise InputError("--moving needs --output (one file) or --output-dir")
    if not files and (output is not None or output_dir is not None):
        raise InputError(f"{'--output' if output is not None else '--output-dir'} needs --moving")
    _paired(keypoints, keypoints_output, "--keypoints", "--keypoints-output")
    if not files and keypoints is None:
        raise InputError("nothing to do: give --moving and --output (or --output-dir), and/or --keypoints and "
                         "--keypoints-output")
    if labels and not files:
        raise InputError("--labels needs --moving (the label map) and --output")
    outputs = _output_paths(files, output, output_dir)
    check_outputs(*[(path, NIFTI_SUFFIXES + WRITABLE_ITK_SUFFIXES, "the warped image") for path in outputs],
                  (keypoints_output, (".csv",), "keypoints (CSV)"))

    displacement = read_field(field)
    grid_shape = displacement.shape[:3]
    fixed_grid: Grid | None = Grid.of(read_image(fixed), f"--fixed {fixed}") if fixed is not None else None
    if fixed_grid is None:
        fixed_grid = field_header_grid(field, grid_shape)
    else:
        check_field_fits(displacement.shape, fixed_grid, field)
    images = [(target, *_warp_file(path, as_labels, displacement, fixed_grid, label_method))
              for (path, as_labels), target in zip(files, outputs)]
    points_result = None
    if keypoints is not None and keypoints_output is not None:
        target = "fixed" if keypoints_space is PointSpace.moving else "moving"
        if keypoints_coords is PointCoordinates.voxel:
            points = read_keypoints(keypoints)
            _check_points(points, grid_shape, keypoints, keypoints_space.value)
            moved, residual = move_keypoints(points, displacement, keypoints_space.value)
            write_points = lambda: _write_keypoints(keypoints_output, moved)  # noqa: E731
            where = f"{target} grid"
        else:
            table, moved, residual = _move_world_points(keypoints, keypoints_coords, displacement, fixed_grid,
                                                        keypoints_space)
            write_points = lambda: write_world_points(keypoints_output, table, moved)  # noqa: E731
            where = f"{target} side, {keypoints_coords.value.upper()} mm"
        if residual > INVERSE_TOLERANCE:
            typer.echo(f"warning: the field is not invertible at some keypoints of {keypoints} (largest residual "
                       f"{residual:.3g} voxels); the field may fold there", err=True)
        points_result = (write_points, f"wrote {keypoints_output} ({len(moved)} keypoints on the {where})")
    with written_together():
        for target, warped, reference, _, _ in images:
            write_image(target, warped, reference)
        if points_result is not None:
            points_result[0]()
    for target, _, _, how, notes in images:
        typer.echo(f"wrote {target} {how}")
        for note in notes:
            typer.echo(f"note: {note}", err=True)
    if points_result is not None:
        typer.echo(points_result[1])
