"""The robust Hausdorff distance against scipy's exact Hausdorff distance and hand-computed surface areas."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

from rwcnet.evaluation import surface_distance


def _corner_surface_points(mask: np.ndarray) -> np.ndarray:
    """Voxel corners whose 2x2x2 neighbourhood is mixed, as coordinates (brute force)."""
    padded = np.pad(mask, 1)
    points = []
    for corner in itertools.product(*[range(n + 1) for n in mask.shape]):
        block = padded[corner[0] : corner[0] + 2, corner[1] : corner[1] + 2, corner[2] : corner[2] + 2]
        if 0 < block.sum() < 8:
            points.append(corner)
    return np.array(points, dtype=np.float64)


def test_robust_hausdorff_at_100_percent_is_the_hausdorff_distance_of_the_surfaces() -> None:
    rng = np.random.default_rng(3)
    shape = (12, 11, 10)
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1
    b = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1
    pa, pb = _corner_surface_points(a), _corner_surface_points(b)
    expected = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])
    assert surface_distance.robust_hausdorff(a, b, 100.0) == pytest.approx(expected)
    assert surface_distance.robust_hausdorff(a, b) <= expected
    assert surface_distance.robust_hausdorff(a, a) == 0.0
    assert surface_distance.robust_hausdorff(a, np.zeros(shape, bool)) == np.inf


def test_surfel_area_table_known_cells_and_symmetries() -> None:
    table = surface_distance.surfel_area_table()
    assert table[0] == table[255] == 0.0
    assert table[1] == pytest.approx(math.sqrt(3) / 8)  # one corner: equilateral triangle of side sqrt(2)/2
    assert table[0b00001111] == pytest.approx(1.0)  # half the cell: a unit square
    assert table[0b00000011] == pytest.approx(math.sqrt(2) / 2)  # one edge: 1 x sqrt(2)/2 rectangle
    assert table[0b00010111] == pytest.approx(3 * math.sqrt(3) / 4)  # corner and its 3 neighbours: hexagon
    np.testing.assert_allclose(table, table[255 - np.arange(256)])  # complement: same surface

    def permuted(code: int, perm, flips) -> int:
        out = 0
        for bit in range(8):
            if code >> bit & 1:
                ijk = [(bit >> 2) & 1, (bit >> 1) & 1, bit & 1]
                new = [ijk[perm[a]] ^ flips[a] for a in range(3)]
                out |= 1 << (4 * new[0] + 2 * new[1] + new[2])
        return out

    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((0, 1), repeat=3):
            mapped = [permuted(code, perm, flips) for code in range(256)]
            np.testing.assert_allclose(table[mapped], table)
