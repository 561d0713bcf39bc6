"""Keypoints in world coordinates: CSV files with a header, as 3D Slicer-like tools and ANTs write them.

A world CSV has a header naming at least ``x,y,z`` (any order, any further columns: ANTs'
``antsApplyTransformsToPoints`` files are ``x,y,z,t`` in LPS mm). The coordinates are RAS or LPS
millimetres as the user says; every other column is carried through unchanged, so an ANTs file
comes back as it went in. Voxel CSVs without a header (Learn2Reg) are :func:`rwcnet.io.read_keypoints`'.
"""

from __future__ import annotations

import csv
import io as text_io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwcnet.errors import InputError
from rwcnet.outputs import atomic_output

COORDINATE_SYSTEMS = ("voxel", "ras", "lps")
_LPS = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS, its own inverse


@dataclass
class WorldPoints:
    """Points read from a world CSV: ``ras`` ``(N, 3)`` mm, and the table they came from (header, rows as text)."""

    ras: np.ndarray
    header: list[str]
    rows: list[list[str]]
    columns: tuple[int, int, int]  # where x, y, z are
    system: str  # "ras" or "lps"


def read_world_points(path: str | Path, system: str) -> WorldPoints:
    """Read a world-coordinate CSV (header with x,y,z) in ``system`` ``ras`` or ``lps``; :class:`InputError` if malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: keypoint file not found")
    try:
        table = [row for row in csv.reader(text_io.StringIO(path.read_text())) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable keypoint CSV ({error})") from error
    if not table:
        raise InputError(f"{path}: keypoint file holds no points")
    header = [cell.strip() for cell in table[0]]
    names = [cell.lower() for cell in header]
    if not all(axis in names for axis in "xyz"):
        raise InputError(f"{path}: a world-coordinate keypoint CSV needs a header naming x,y,z (found "
                         f"{','.join(header)[:80]!r}); voxel indices without a header need --keypoints-coords voxel")
    columns = tuple(names.index(axis) for axis in "xyz")
    points = []
    for number, row in enumerate(table[1:], start=2):
        try:
            values = [float(row[c]) for c in columns]
        except (ValueError, IndexError):
            values = [float("nan")]
        if len(values) != 3 or not np.all(np.isfinite(values)):
            raise InputError(f"{path}, line {number}: expected numbers in columns x,y,z, found {','.join(row)[:80]!r}")
        points.append(values)
    if not points:
        raise InputError(f"{path}: keypoint file holds no points")
    coordinates = np.array(points, dtype=np.float64)
    ras = coordinates * _LPS if system == "lps" else coordinates
    return WorldPoints(ras, header, [list(row) for row in table[1:]], columns, system)  # type: ignore[arg-type]


def write_world_points(path: str | Path, points: WorldPoints, ras: np.ndarray) -> None:
    """Write ``ras`` ``(N, 3)`` mm in the table of ``points`` (same header, system and other columns), atomically."""
    coordinates = np.asarray(ras, np.float64) * (_LPS if points.system == "lps" else 1.0)
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(points.header)
    for row, values in zip(points.rows, coordinates):
        row = list(row)
        for column, value in zip(points.columns, values):
            row[column] = f"{value:.6f}"
        writer.writerow(row)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(buffer.getvalue())
