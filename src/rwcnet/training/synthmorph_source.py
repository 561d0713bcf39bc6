"""Training and validation samples synthesised from label maps (``data.synthmorph`` of a training config).

A sample for a stage with downsampling factor ``f`` is synthesised on the
``1/f`` grid of the reference image (:func:`rwcnet.training.synthmorph.make_label_pair`)
and enlarged to full resolution by repeating each voxel ``f`` times per axis,
so the network's own area averaging gives back exactly the synthesised
images on the stage grid. The merged soft labels stay on the ``1/f`` grid
(``Sample.label_factor``); the loss samples them there
(:mod:`rwcnet.training.label_dice`). Randomness comes from the sample's numpy
generator, so a sample is a pure function of ``(seed, phase, index)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F

from rwcnet.errors import InputError
from rwcnet.training.synthmorph import LabelPair, label_table, make_label_pair
from rwcnet.training.synthmorph_maps import LabelMaps, map_path
from rwcnet.training.config import SynthMorphConfig


#: Voxels synthesised beyond each face of a training crop (on the crop's grid) and then cut away.
CROP_MARGIN = 4


class LabelPairSource:
    """Makes label-map pairs on the grid of ``reference`` (a training image path) for the config ``settings``."""

    def __init__(self, settings: SynthMorphConfig, reference: Path, spacing: tuple[float, float, float]) -> None:
        self.settings = settings
        folder = Path(settings.labels)
        table_path = folder / "labels.json"
        if not table_path.is_file():
            raise InputError(f"{table_path}: label table not found (data.synthmorph.labels names the SynthSeg label folder)")
        for number in [*settings.train_maps, *settings.validation_maps]:
            if not map_path(folder, number).is_file():
                raise InputError(f"{map_path(folder, number)}: label map not found")
        self.table = label_table(table_path)
        self.maps = LabelMaps(folder, reference, self.table, settings.cache)
        self.spacing = spacing

    def pair(self, first: int, second: int, factor: int, seed: int,
             box: tuple[tuple[int, int], ...] | None = None) -> tuple[dict, LabelPair]:
        """Sample fields (full-resolution images, soft labels on the ``1/factor`` grid) of maps ``first`` → fixed, ``second`` → moving.

        ``box`` (``(start, size)`` per axis on the ``1/factor`` grid) crops the
        pair: it is synthesised on the box plus :data:`CROP_MARGIN` voxels (so
        the deformations pull in real anatomy at the box's faces) and cut to the box.
        """
        fixed_map = self.maps.onehot(first, factor)
        moving_map = fixed_map if second == first else self.maps.onehot(second, factor)
        cut = None
        if box is not None:
            grid = fixed_map.shape[2:]
            outer = [(max(0, a - CROP_MARGIN), min(n, a + size + CROP_MARGIN)) for (a, size), n in zip(box, grid)]
            crop = (slice(None), slice(None), *(slice(lo, hi) for lo, hi in outer))
            fixed_map, moving_map = fixed_map[crop], moving_map[crop]
            cut = (slice(None), slice(None), *(slice(a - lo, a - lo + size) for (a, size), (lo, _) in zip(box, outer)))
        spacing = [s * factor for s in self.spacing]
        pair = make_label_pair(fixed_map, moving_map, self.table, spacing_mm=spacing, settings=self.settings, seed=seed)
        if cut is not None:
            pair = LabelPair(pair.fixed[cut], pair.moving[cut], pair.fixed_onehot[cut], pair.moving_onehot[cut], pair.skull_strip)
        enlarge = (lambda image: image) if factor == 1 else (lambda image: F.interpolate(image, scale_factor=factor, mode="nearest"))
        items = dict(fixed=enlarge(pair.fixed), moving=enlarge(pair.moving), fixed_onehot=pair.fixed_onehot,
                     moving_onehot=pair.moving_onehot, label_factor=factor)
        return items, pair

    def training_pair(self, rng: np.random.Generator, factor: int, size: list[int] | None) -> tuple[str, dict]:
        """A random training pair: two training maps (the same one with probability ``same_map``), cropped to a
        random box of ``size`` voxels of the ``1/factor`` grid (whole grid when None)."""
        maps = self.settings.train_maps
        first = maps[int(rng.integers(len(maps)))]
        second = first if rng.random() < self.settings.same_map or len(maps) == 1 else \
            [m for m in maps if m != first][int(rng.integers(len(maps) - 1))]
        seed = int(rng.integers(0, 2**31 - 1))
        box = None
        if size is not None:
            grid = self.maps.grid(factor)
            box = tuple((int(rng.integers(n - min(k, n) + 1)), min(k, n)) for k, n in zip(size, grid))
        items, _ = self.pair(first, second, factor, seed, box)
        return f"labels:{first:02d}-{second:02d}", items

    def validation_pairs(self, seed: int) -> list[tuple[str, dict]]:
        """The fixed validation pairs: each ordered pair of two validation maps, then each map with itself, cycled."""
        maps = self.settings.validation_maps
        order = [(a, b) for a in maps for b in maps if a != b] + [(a, a) for a in maps]
        pairs = []
        for index in range(self.settings.validation_pairs):
            first, second = order[index % len(order)]
            pair_seed = int(np.random.default_rng([seed, 7, index]).integers(0, 2**31 - 1))
            items, _ = self.pair(first, second, self.settings.validation_factor, pair_seed)
            pairs.append((f"validation-labels:{first:02d}-{second:02d}:{index}", items))
        return pairs

