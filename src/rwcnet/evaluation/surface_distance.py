"""Robust Hausdorff distance between binary masks, the way the official Learn2Reg scorer measures it.

The surface elements of a mask are the voxel corners whose 2x2x2 cell is
mixed (some voxels inside, some outside); each is weighted by the area of
the marching-cubes surface through its cell. Distances are in voxels
(spacing ignored, as the official HD95). :func:`robust_hausdorff` is the
maximum of the two directed area-weighted percentiles.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

HD95_PERCENT = 95.0


_CELL_CORNERS = tuple((i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1))  # bit 4i+2j+k of a cell code


def _cell_components(corners: set[tuple[int, int, int]]) -> list[set[tuple[int, int, int]]]:
    """Connected groups of cube corners, two corners being connected when they share a cube edge."""
    groups: list[set[tuple[int, int, int]]] = []
    left = set(corners)
    while left:
        group, frontier = set(), [left.pop()]
        while frontier:
            corner = frontier.pop()
            group.add(corner)
            for other in list(left):
                if sum(a != b for a, b in zip(corner, other)) == 1:
                    left.discard(other)
                    frontier.append(other)
        groups.append(group)
    return groups


def _cut_polygon(group: set[tuple[int, int, int]]) -> list[np.ndarray]:
    """The closed polygon through the midpoints of the cube edges leaving ``group``, in order.

    Each cube face holding part of the group contributes one side: the
    segment between the two edges where the face's corner cycle leaves it.
    """
    sides = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for value in (0, 1):
            cycle = []
            for s, t in ((0, 0), (1, 0), (1, 1), (0, 1)):
                corner = [0, 0, 0]
                corner[axis], corner[others[0]], corner[others[1]] = value, s, t
                cycle.append(tuple(corner))
            ends = [
                tuple((np.add(cycle[n], cycle[(n + 1) % 4]) / 2).tolist())
                for n in range(4)
                if (cycle[n] in group) != (cycle[(n + 1) % 4] in group)
            ]
            if ends:
                sides.append(ends)
    chain = list(sides.pop())
    while sides:
        side = next(s for s in sides if chain[-1] in s)
        sides.remove(side)
        chain.append(side[1] if side[0] == chain[-1] else side[0])
    return [np.array(point) for point in chain[:-1]]


def _max_triangulation_area(polygon: list[np.ndarray]) -> float:
    """Largest total area over the triangulations of a (possibly non-planar) polygon."""
    n = len(polygon)
    best = np.zeros((n, n))
    for span in range(2, n):
        for i in range(n - span):
            j = i + span
            best[i, j] = max(
                best[i, k] + best[k, j]
                + 0.5 * np.linalg.norm(np.cross(polygon[k] - polygon[i], polygon[j] - polygon[i]))
                for k in range(i + 1, j)
            )
    return float(best[0, n - 1])


@functools.cache
def surfel_area_table() -> np.ndarray:
    """Surface area (voxel units) inside a 2x2x2 cell for each of its 256 codes: ``(256,)``.

    The surface is the marching-cubes one with vertices at edge midpoints:
    for each edge-connected group of the side with at most four corners,
    the polygon through the midpoints of the edges leaving it, triangulated
    to the largest area where it is not planar (which is what the official
    scorer's surface-distance table holds).
    """
    table = np.zeros(256)
    for code in range(1, 255):
        inside = {c for bit, c in enumerate(_CELL_CORNERS) if code >> bit & 1}
        side = inside if len(inside) <= 4 else set(_CELL_CORNERS) - inside
        table[code] = sum(_max_triangulation_area(_cut_polygon(group)) for group in _cell_components(side))
    return table


def _cell_codes(mask: np.ndarray) -> np.ndarray:
    """Code of every 2x2x2 cell of a binary mask on the voxel-corner lattice: ``(X+1, Y+1, Z+1)`` uint8.

    Corner ``c`` sits between voxels ``c-1`` and ``c`` on every axis (outside
    the mask counts as background); bit ``4i+2j+k`` is voxel ``c-1+(i, j, k)``.
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    shape = tuple(n + 1 for n in mask.shape)
    codes = np.zeros(shape, dtype=np.uint8)
    for bit, (i, j, k) in enumerate(_CELL_CORNERS):
        codes |= padded[i : i + shape[0], j : j + shape[1], k : k + shape[2]] << bit
    return codes


def _directed_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """Area-weighted ``percent`` percentile: the first distance (sorted) whose cumulative area share reaches it."""
    order = np.lexsort((areas, distances))
    cumulative = np.cumsum(areas[order]) / areas.sum()
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(distances[order][min(index, distances.size - 1)])


def robust_hausdorff(a: np.ndarray, b: np.ndarray, percent: float = HD95_PERCENT) -> float:
    """Robust Hausdorff distance between two binary masks of the same shape, in voxels.

    The maximum of the two directed ``percent`` percentiles of distances from
    the surface elements of one mask to the surface of the other, each
    element weighted by its area (:func:`surfel_area_table`); ``inf`` when
    either mask is empty.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        return float("inf")
    union = a | b
    box = []
    for axis in range(3):
        hits = np.flatnonzero(union.any(axis=tuple(j for j in range(3) if j != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    table = surfel_area_table()
    codes_a, codes_b = _cell_codes(a[tuple(box)]), _cell_codes(b[tuple(box)])
    surface_a = (codes_a != 0) & (codes_a != 255)
    surface_b = (codes_b != 0) & (codes_b != 255)
    to_b = ndimage.distance_transform_edt(~surface_b)
    to_a = ndimage.distance_transform_edt(~surface_a)
    return max(
        _directed_percentile(to_b[surface_a], table[codes_a[surface_a]], percent),
        _directed_percentile(to_a[surface_b], table[codes_b[surface_b]], percent),
    )
