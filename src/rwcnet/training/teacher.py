"""Distillation targets for real training pairs (``data.teacher`` of a training config).

The teacher registers a pair with rwcnet's own optimisation, instance
optimisation on MIND features and the fine-scale refinement, without a
network and without affine pre-alignment (``register(model=None,
affine=False)``). On the report pair that chain reaches Dice 0.744 where the
shipped network alone reaches 0.655 (``docs/results.md``), and it needs no
labels, so its fields are targets a network can learn from on unlabelled
real brains.

Each field is computed once per ordered pair and cached as
``<fixed>__<moving>.npy``: float16 ``(X, Y, Z, 3)`` in fixed voxels (the
Learn2Reg layout; 1e-3 voxel resolution at 10 voxels), beside a JSON of the
settings that made it. A file made with other settings is refused rather
than reused. Writes are atomic, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rwcnet import geometry
from rwcnet.data.datasets import Pair, image_id
from rwcnet.errors import InputError
from rwcnet.intensity import invert_contrast
from rwcnet.geometry.layout import field_tensor
from rwcnet.outputs import atomic_output
from rwcnet.register import register
from rwcnet.synthetic import coarse_grid, random_deformation
from rwcnet.training.data_config import SyntheticConfig, TeacherConfig

#: What the teacher runs (recorded next to every cached field).
TEACHER_METHOD = "instance optimisation + fine-scale refinement, no network, no affine"


def teacher_settings(seed: int) -> dict:
    return {"method": TEACHER_METHOD, "seed": seed}


def compute_teacher_field(fixed: Path, moving: Path, seed: int) -> np.ndarray:
    """The teacher's field ``(X, Y, Z, 3)`` float32, fixed voxels, for ``moving`` registered to ``fixed``."""
    result = register(fixed, moving, model=None, affine=False, device="cpu", seed=seed)
    return result.field.astype(np.float32)


class TeacherFields:
    """The teacher pairs of a training run (``training`` and held-out ``validation``) and their cached fields."""

    def __init__(self, settings: TeacherConfig, training: list[Pair], validation: list[Pair],
                 compute: Callable[[Path, Path, int], np.ndarray] | None = None) -> None:
        self.settings = settings
        self.folder = Path(settings.cache)
        self.training, self.validation = training, validation
        self.pairs = training + validation
        self._compute = compute
        self._read = functools.lru_cache(maxsize=8)(self._read_uncached)

    @classmethod
    def for_images(cls, settings: TeacherConfig, names: list[str], paths: dict[str, Path], source: Path,
                   **options) -> "TeacherFields":
        """Every ordered pair of the training images ``names`` (ids; ``paths`` maps them to files) trains, except the
        validation pairs, which are held out in both directions. ``source`` names the dataset in errors."""
        for fixed, moving in settings.validation:
            unknown = [name for name in (fixed, moving) if name not in names]
            if unknown:
                raise InputError(f"{source}: data.teacher.validation names {unknown}, which are not training images")
        held_out = {frozenset(pair) for pair in settings.validation}
        training = [Pair(paths[a], paths[b]) for a in names for b in names if a != b and frozenset((a, b)) not in held_out]
        if settings.fraction > 0 and not training:
            raise InputError(f"{source}: data.teacher leaves no training pair outside its validation pairs")
        return cls(settings, training, [Pair(paths[a], paths[b]) for a, b in settings.validation], **options)

    def path(self, pair: Pair) -> Path:
        return self.folder / f"{image_id(pair.fixed)}__{image_id(pair.moving)}.npy"

    def ensure(self, report: Callable[[str], None] = print) -> None:
        """Compute every missing field (about a minute per brain pair on two cores), reporting each."""
        missing = [pair for pair in self.pairs if not self.path(pair).is_file()]
        for number, pair in enumerate(missing, 1):
            start = time.monotonic()
            self.build(pair)
            report(f"teacher field {number}/{len(missing)}: {self.path(pair).name} ({time.monotonic() - start:.0f} s)")

    def build(self, pair: Pair) -> None:
        """Compute and store one pair's field (atomically), with its settings."""
        self.folder.mkdir(parents=True, exist_ok=True)
        field = (self._compute or compute_teacher_field)(pair.fixed, pair.moving, self.settings.seed)
        path = self.path(pair)
        with atomic_output(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps({**teacher_settings(self.settings.seed), "fixed": str(pair.fixed),
                                       "moving": str(pair.moving)}, indent=1), encoding="utf-8")
        with atomic_output(path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, field.astype(np.float16))

    def _read_uncached(self, path: Path) -> torch.Tensor:
        meta_path = path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            array = np.load(path)
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: cannot read the cached teacher field ({error}); delete it to recompute") from error
        expected = teacher_settings(self.settings.seed)
        if {k: meta.get(k) for k in expected} != expected:
            raise InputError(f"{meta_path}: the cached teacher field was made with other settings "
                             f"({ {k: meta.get(k) for k in expected} }, wanted {expected}); delete it or change data.teacher.cache")
        if array.ndim != 4 or array.shape[-1] != 3:
            raise InputError(f"{path}: a teacher field must be (X, Y, Z, 3), got {array.shape}")
        return field_tensor(array.astype(np.float32))

    def field(self, pair: Pair) -> torch.Tensor:
        """The pair's teacher field ``(1, 3, X, Y, Z)`` float32 in fixed voxels (computed now if missing)."""
        path = self.path(pair)
        if not path.is_file():
            self.build(pair)
        return self._read(path)


def augment(fixed: torch.Tensor, moving: torch.Tensor, truth: torch.Tensor, spacing, settings: TeacherConfig,
            rng: np.random.Generator, synthetic: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher pair ``(fixed, moving, truth)`` (``(1, 1, X, Y, Z)`` images, ``(1, 3, X, Y, Z)`` voxels) augmented.

    With a displacement drawn from ``settings.warp_fixed_mm`` above zero, the
    fixed image is deformed by a random smooth field ``e`` (made like the
    semi-synthetic pairs' fields: ``synthetic.generation_downsample``,
    ``min_jacobian``), ``fixed'(x) = fixed(x + e(x))``, so the target becomes
    ``e(x) + truth(x + e(x))`` (:func:`rwcnet.geometry.compose`). With
    probability ``settings.invert_moving`` the moving image's contrast is
    inverted; the target stays.
    """
    magnitude = float(rng.uniform(*settings.warp_fixed_mm))
    if magnitude > 0:
        shape = fixed.shape[2:]
        coarse, coarse_spacing = coarse_grid(shape, spacing, synthetic.generation_downsample)
        extra = random_deformation(coarse, coarse_spacing, magnitude_mm=magnitude, smoothness_mm=settings.warp_smoothness_mm,
                                   seed=int(rng.integers(0, 2**31 - 1)), min_jacobian=synthetic.min_jacobian)
        extra = geometry.resize_field(extra, shape)
        fixed, truth = geometry.warp(fixed, extra), geometry.compose(extra, truth)
    if rng.random() < settings.invert_moving:
        moving = torch.from_numpy(invert_contrast(moving.numpy()))
    return fixed, moving, truth
