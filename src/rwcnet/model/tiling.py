"""Tiles of a stage grid: disjoint patches (the reference) or overlapping tiles with a halo and linear blending.

A tile has three nested boxes along each axis:

* ``core`` — the tiles' cores partition the grid;
* ``window`` — the core widened by the blend width on interior sides; the
  tile's output is used there, weighted by a linear ramp so that the weights
  of neighbouring tiles sum to one across their shared blend zone;
* ``region`` — the window widened by the halo (clipped to the grid); the
  network sees this box, so a voxel of the window has at least
  ``halo - blend`` voxels of context on every interior side.

For ``disjoint`` tiling, region = window = core and every weight is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Box = tuple[slice, slice, slice]


@dataclass(frozen=True)
class Tile:
    """One tile: its ``region`` (network input), ``window`` (blended output) and per-axis ramp weights."""

    region: Box
    window: Box
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    @property
    def origin(self) -> tuple[int, int, int]:
        """First voxel of the region on the stage grid."""
        return tuple(s.start for s in self.region)  # type: ignore[return-value]

    def window_in_region(self) -> Box:
        """The window's box in the region's own coordinates."""
        return tuple(slice(w.start - r.start, w.stop - r.start) for w, r in zip(self.window, self.region))  # type: ignore[return-value]


def _axis_tiles(size: int, core: int, halo: int, blend: int) -> list[tuple[slice, slice, torch.Tensor]]:
    count = math.ceil(size / core)
    tiles = []
    for index in range(count):
        start, stop = index * core, min((index + 1) * core, size)
        lo = blend if index > 0 else 0
        hi = blend if index < count - 1 else 0
        w_start, w_stop = start - lo, stop + hi
        positions = torch.arange(w_start, w_stop, dtype=torch.float64) + 0.5
        weight = torch.ones(w_stop - w_start, dtype=torch.float64)
        if lo:
            weight = torch.minimum(weight, (positions - (start - lo)) / (2 * lo))
        if hi:
            weight = torch.minimum(weight, ((stop + hi) - positions) / (2 * hi))
        region = slice(max(w_start - halo, 0), min(w_stop + halo, size))
        tiles.append((region, slice(w_start, w_stop), weight))
    return tiles


def plan_tiles(
    shape: Sequence[int], patch_factor: float, *, halo: int, mode: str = "overlap", alignment: int = 1
) -> list[Tile]:
    """Tiles covering a grid ``shape``; core size ``ceil(patch_factor * size)`` rounded up to ``alignment``.

    ``mode="overlap"`` blends over ``halo // 2`` voxels each side of a core
    boundary and gives every region ``halo`` more voxels of context;
    ``mode="disjoint"`` reproduces the reference code's non-overlapping patches.
    """
    if mode not in ("overlap", "disjoint"):
        raise ValueError(f"unknown tiling mode {mode!r}")
    per_axis = []
    for size in shape:
        core = max(alignment, math.ceil(math.ceil(patch_factor * size) / alignment) * alignment)
        if mode == "disjoint" or core >= size:
            per_axis.append(_axis_tiles(size, core, 0 if mode == "disjoint" else halo, 0))
        else:
            per_axis.append(_axis_tiles(size, core, halo, min(halo // 2, core // 2)))
    tiles = []
    for ax in per_axis[0]:
        for ay in per_axis[1]:
            for az in per_axis[2]:
                tiles.append(
                    Tile(
                        region=(ax[0], ay[0], az[0]),
                        window=(ax[1], ay[1], az[1]),
                        weights=(ax[2], ay[2], az[2]),
                    )
                )
    return tiles


def run_tiled(
    function: Callable[[Tile], dict[str, torch.Tensor]], tiles: list[Tile], shape: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Run ``function`` on each tile and blend its outputs onto the whole grid.

    ``function(tile)`` returns tensors ``(B, C, *region_shape)``; each is cut
    to the tile's window, weighted by its ramp and accumulated. Returns the
    blended tensors ``(B, C, *shape)``.
    """
    if len(tiles) == 1 and tuple(s.stop - s.start for s in tiles[0].region) == tuple(shape):
        return function(tiles[0])
    total = torch.zeros(tuple(shape), dtype=torch.float64)
    for tile in tiles:
        total[tile.window] += _tile_weight(tile)
    sums: dict[str, torch.Tensor] = {}
    for tile in tiles:
        outputs = function(tile)
        inner = tile.window_in_region()
        weight = _tile_weight(tile)
        for name, value in outputs.items():
            if name not in sums:
                sums[name] = value.new_zeros(*value.shape[:2], *shape)
            sums[name][(slice(None), slice(None), *tile.window)] += value[(slice(None), slice(None), *inner)] * weight.to(value)
    return {name: value / total.to(value) for name, value in sums.items()}


def _tile_weight(tile: Tile) -> torch.Tensor:
    """The tile's blending weight on its window: the product of the per-axis ramps."""
    wx, wy, wz = tile.weights
    return wx.view(-1, 1, 1) * wy.view(1, -1, 1) * wz.view(1, 1, -1)
