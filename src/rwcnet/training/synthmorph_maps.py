"""Label maps for SynthMorph-style synthesis: aligned to a reference brain, cropped, stored as soft one-hot grids.

The SynthSeg maps (``training_seg_NN.nii.gz``, 256³ whole heads, LIA 1 mm,
each in its own subject space) are brought once onto the grid of a
reference image (a shared training brain: 160×192×224, LIA 1 mm, brains
affinely aligned to a common space): the map's brain (labels other than
background, CSF and extra-cerebral tissue) is matched to the reference's
foreground (intensity > 0) by its first and second moments (centroid and a
symmetric linear map that carries one covariance onto the other), refined as
a 12-parameter affine on the two masks at 4 mm (:func:`refine_alignment`), and
the labels are resampled there (nearest neighbour). CSF outside the closed,
hole-filled brain becomes its own label (:data:`rwcnet.training.synthmorph.OUTER_CSF`),
so that skull-stripped images can drop it as the shared brains do.

For each downsampling factor ``f`` the map is then stored as the fraction of
every coarse voxel covered by each generation label (area averaging of the
1 mm one-hot maps): ``(K, X/f, Y/f, Z/f)`` float16 ``.npy`` files in the
cache folder, read back memory-mapped. The moment match is written beside
them (``<map>_alignment.json``: matrix, shift, Dice of the aligned brain
with the reference foreground).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from rwcnet import geometry
from rwcnet.errors import InputError
from rwcnet.data.formats import read_image
from rwcnet.outputs import atomic_output
from rwcnet.training.synthmorph import OUTER_CSF, LabelTable

#: Factors cached together on first use (the stages of the ``cpu`` network), since resampling a map is the slow part.
TRAINING_FACTORS = (2, 4)
#: Bump when the cached grids would change, so that old caches are not reused.
CACHE_VERSION = 2


def map_path(folder: str | Path, number: int) -> Path:
    """The file of label map ``number`` (1-based) in a SynthSeg label folder."""
    return Path(folder) / f"training_seg_{number:02d}.nii.gz"


def _moments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    points = np.stack(np.nonzero(mask), axis=1).astype(np.float64)
    if len(points) < 10:
        raise ValueError("a brain mask with fewer than 10 voxels")
    return points.mean(axis=0), np.cov(points, rowvar=False)


def _sqrtm(matrix: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * values**power) @ vectors.T


def moment_alignment(source_mask: np.ndarray, target_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(M, b)`` with ``x = M y + b`` mapping target voxels ``y`` to source voxels ``x`` so the masks' moments agree.

    ``M = C_s^½ C_t^-½`` (symmetric square roots) carries the target
    covariance onto the source covariance without a rotation; the centroids
    map onto each other.
    """
    source_mean, source_cov = _moments(source_mask)
    target_mean, target_cov = _moments(target_mask)
    matrix = _sqrtm(source_cov, 0.5) @ _sqrtm(target_cov, -0.5)
    return matrix, source_mean - matrix @ target_mean


def refine_alignment(source_mask: np.ndarray, target_mask: np.ndarray, matrix: np.ndarray, shift: np.ndarray, *,
                     factor: int = 4, iterations: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Refine ``x = M y + b`` (target voxel ``y`` -> source voxel ``x``) by Adam on the squared difference of the two
    masks, area-averaged by ``factor`` and blurred (one coarse voxel), sampled trilinearly; returns the new ``(M, b)``.
    """
    def coarse(mask: np.ndarray) -> torch.Tensor:
        volume = F.avg_pool3d(torch.from_numpy(mask.astype(np.float32))[None, None], factor)
        return F.avg_pool3d(volume, 3, stride=1, padding=1, count_include_pad=False)

    source, target = coarse(source_mask), coarse(target_mask)
    fine = geometry.identity_grid(target.shape[2:]) * factor + (factor - 1) / 2.0  # coarse target voxel -> fine voxel
    base_matrix, base_shift = torch.from_numpy(matrix).float(), torch.from_numpy(shift).float()
    change = torch.zeros(3, 3, requires_grad=True)
    offset = torch.zeros(3, requires_grad=True)
    optimiser = torch.optim.Adam([{"params": [change], "lr": 5e-3}, {"params": [offset], "lr": 0.5}])
    for _ in range(iterations):
        linear = base_matrix @ (torch.eye(3) + change)
        points = torch.einsum("ij,bjxyz->bixyz", linear, fine) + (base_shift + offset).view(1, 3, 1, 1, 1)
        warped = geometry.sample(source, (points - (factor - 1) / 2.0) / factor, padding_mode="zeros")
        loss = ((warped - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return (base_matrix @ (torch.eye(3) + change)).double().numpy(), (base_shift + offset).double().numpy()


def _channels(labels: np.ndarray, table: LabelTable, path: Path) -> np.ndarray:
    lut = table.lookup(int(labels.max()) if labels.size else 0)
    if labels.min() < 0:
        raise InputError(f"{path}: negative label values")
    channels = lut[labels]
    if (channels < 0).any():
        unknown = sorted(set(np.unique(labels[channels < 0]).tolist()))[:10]
        raise InputError(f"{path}: label values {unknown} are not in the label table")
    return channels


class LabelMaps:
    """The SynthSeg label maps of ``folder`` on ``reference``'s grid, as cached soft one-hot grids."""

    def __init__(self, folder: str | Path, reference: str | Path, table: LabelTable, cache: str | Path) -> None:
        self.folder = Path(folder)
        self.reference_path = Path(reference)
        self.table = table
        self.cache = Path(cache)
        self._reference = None

    def _file(self, number: int, factor: int) -> Path:
        return self.cache / f"seg{number:02d}_{self.reference_path.name.split('.')[0]}_f{factor}_v{CACHE_VERSION}.npy"

    def grid(self, factor: int) -> tuple[int, int, int]:
        """The shape of the ``1/factor`` grids (the reference grid divided by ``factor``, rounded down)."""
        if self._reference is None:
            self._reference = read_image(self.reference_path)
        return tuple(n // factor for n in self._reference.shape)  # type: ignore[return-value]

    def onehot(self, number: int, factor: int) -> torch.Tensor:
        """Map ``number`` at ``1/factor`` resolution: ``(1, K, X/f, Y/f, Z/f)`` float32 label fractions (built once, then cached)."""
        path = self._file(number, factor)
        if not path.exists():
            self.build(number, sorted({factor, *TRAINING_FACTORS}))
        return torch.from_numpy(np.load(path, mmap_mode="r").astype(np.float32))[None]

    def channels_on_reference(self, number: int) -> tuple[np.ndarray, dict]:
        """Map ``number``'s channel indices ``(X, Y, Z)`` resampled onto the reference grid, and the alignment record."""
        path = map_path(self.folder, number)
        if not path.is_file():
            raise InputError(f"{path}: label map not found")
        if self._reference is None:
            self._reference = read_image(self.reference_path)
        reference = self._reference
        channels = _channels(np.rint(read_image(path).array).astype(np.int64), self.table, path)
        background = np.array(self.table.background)
        csf = self.table.values.index(24) if 24 in self.table.values else -1
        brain = ~background[channels] & (channels != csf)
        target = reference.array > 0
        matrix, shift = refine_alignment(brain, target, *moment_alignment(brain, target))
        grid = geometry.identity_grid(reference.shape, dtype=torch.float64)
        coords = torch.einsum("ij,bjxyz->bixyz", torch.from_numpy(matrix), grid) + torch.from_numpy(shift).view(1, 3, 1, 1, 1)
        volume = torch.from_numpy(channels.astype(np.float32))[None, None]
        resampled = geometry.sample(volume, coords.float(), mode="nearest", padding_mode="zeros")[0, 0]
        channels = resampled.round().long().numpy()
        inside = ~background[channels] & (channels != csf)
        closed = ndimage.binary_fill_holes(ndimage.binary_closing(inside, iterations=3))
        if csf >= 0:
            channels[(channels == csf) & ~closed] = self.table.values.index(OUTER_CSF)
        overlap = 2.0 * float((closed & target).sum()) / float(closed.sum() + target.sum())
        record = {"map": path.name, "reference": self.reference_path.name, "matrix": matrix.tolist(),
                  "shift": shift.tolist(), "brain_dice_with_reference": overlap}
        return channels, record

    def build(self, number: int, factors: Sequence[int]) -> None:
        """Resample map ``number`` onto the reference grid and write its soft one-hot grids for ``factors``."""
        channels, record = self.channels_on_reference(number)
        self.cache.mkdir(parents=True, exist_ok=True)
        labels = torch.from_numpy(channels)[None, None]
        for factor in factors:
            shape = [n // factor for n in channels.shape]
            fractions = np.empty((self.table.channels, *shape), dtype=np.float16)
            for channel in range(self.table.channels):
                indicator = (labels == channel).float()
                fractions[channel] = F.avg_pool3d(indicator, factor)[0, 0].numpy().astype(np.float16) if factor > 1 \
                    else indicator[0, 0].numpy()
            with atomic_output(self._file(number, factor)) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, fractions)
        with atomic_output(self.cache / f"seg{number:02d}_alignment.json") as tmp:
            tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
