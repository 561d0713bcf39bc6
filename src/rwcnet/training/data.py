"""Training samples made on the fly: each one is a pure function of ``(seed, phase, sample index)``.

A sample is either *semi-synthetic* (an image and its copy warped by a
known random deformation, :func:`rwcnet.synthetic.make_pair` with the warped
copy as the fixed image, so the truth is exact and needs no inversion) or a
*real* pair of two training images (image loss only). Its randomness (which
image or pair, the deformation, the intensity perturbation, the training
patch, and the seed of the network's dropout) comes from a numpy generator
seeded with ``[seed, phase, index]``. So the data order needs no state of
its own beyond the step counter, a resumed run sees exactly the samples it
would have seen, and a sample is the same whichever process makes it —
which is what lets an N-process run equal a one-process run (sample
``step * batch + j`` goes to process ``j // (batch / N)``).

Images are normalised (:class:`rwcnet.training.config.Normalisation`) and
padded at the far end (edge values; labels with 0) to a multiple of the
network's alignment, so patches can be cut anywhere on the stage grids.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from rwcnet import geometry, masks
from rwcnet.geometry.layout import pad_to_multiple
from rwcnet.data.datasets import Learn2RegDataset, Pair, image_id
from rwcnet.errors import InputError
from rwcnet.intensity import invert_contrast, scale_intensity
from rwcnet.data.formats import Image, read_image, read_keypoints
from rwcnet.synthetic import (IntensitySettings, breathing_deformation, coarse_grid, intensity_perturbation, make_pair,
                              random_deformation)
from rwcnet.training.synthmorph_source import LabelPairSource
from rwcnet.training.teacher import TeacherFields, augment
from rwcnet.training.config import DataConfig, Normalisation, PhaseConfig, SyntheticConfig, TrainingConfig

Tensor = torch.Tensor
Box = tuple[slice, slice, slice]


@dataclass
class Sample:
    """One training or validation pair, on the padded grid ``(X, Y, Z)``.

    Images ``(1, 1, X, Y, Z)`` float32 normalised; ``truth`` the known
    pull-back field ``(1, 3, X, Y, Z)`` in voxels (semi-synthetic pairs);
    labels ``(1, 1, X, Y, Z)`` int64; keypoints ``(1, N, 3)`` voxels;
    ``spacing`` mm; ``region`` the training patch on the trained stage's
    grid (None = whole grid); ``seed`` seeds the network's dropout;
    ``mask`` ``(1, 1, X, Y, Z)`` bool foreground of the fixed image;
    ``fixed_onehot``/``moving_onehot`` ``(1, M, X/f, Y/f, Z/f)`` soft labels
    of merged classes on a grid ``label_factor`` (``f``) times coarser (pairs
    synthesised from label maps, :mod:`rwcnet.training.synthmorph_source`).
    """

    key: str
    fixed: Tensor
    moving: Tensor
    spacing: tuple[float, float, float]
    seed: int
    truth: Tensor | None = None
    fixed_labels: Tensor | None = None
    moving_labels: Tensor | None = None
    fixed_keypoints: Tensor | None = None
    moving_keypoints: Tensor | None = None
    region: Box | None = None
    mask: Tensor | None = None
    fixed_onehot: Tensor | None = None
    moving_onehot: Tensor | None = None
    label_factor: int = 1


@dataclass
class _Entry:
    image: Tensor  # (1, 1, X, Y, Z) normalised, padded
    labels: Tensor | None  # (1, 1, X, Y, Z) int64, padded with 0
    keypoints: np.ndarray | None  # (N, 3) voxels
    spacing: tuple[float, float, float]
    chest: "_Chest | None" = None  # lung mask and body axes, for breathing pairs


@dataclass(frozen=True)
class _Chest:
    """What a breathing field needs of a thorax CT: its lung mask and the body's axes in the array."""

    lung: Tensor  # (1, 1, X, Y, Z) bool, padded with False
    cranio_caudal_axis: int
    towards_feet: str  # "+" when the index grows towards the feet, else "-"
    anterior_posterior_axis: int


def chest_geometry(image: Image) -> tuple[int, str, int]:
    """Cranio-caudal axis, its direction to the feet (``"+"``/``"-"``) and the anterior-posterior axis of ``image``."""
    codes = nib.orientations.aff2axcodes(image.affine)
    cranio_caudal = next(i for i, code in enumerate(codes) if code in "SI")
    anterior_posterior = next(i for i, code in enumerate(codes) if code in "AP")
    return cranio_caudal, "+" if codes[cranio_caudal] == "I" else "-", anterior_posterior


def normalise(array: np.ndarray, normalisation: Normalisation) -> np.ndarray:
    """Intensities to the network's range: unchanged, ``(I − low)/(high − low)``, or that clipped to [0, 1]."""
    if normalisation.kind == "none":
        return np.asarray(array, dtype=np.float32)
    return scale_intensity(array, normalisation.low, normalisation.high, clip=normalisation.kind == "window")


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


class TrainingData:
    """The training images and pairs of a config, and the samples made from them."""

    def __init__(self, config: TrainingConfig, alignment: int) -> None:
        data: DataConfig = config.data
        self.config = config
        self.data = data
        self.alignment = alignment
        self.dataset = Learn2RegDataset(data.dataset)
        held_out = {image_id(p) for key in ("val", "test") if self.dataset.meta.get(f"registration_{key}")
                    for pair in self.dataset.pairs(key) for p in (pair.fixed, pair.moving)}
        excluded = held_out | set(data.exclude)
        available = {image_id(p): p for p in self.dataset.training_images()}
        if data.images is not None:
            unknown = [name for name in data.images if name not in available]
            if unknown:
                raise InputError(f"{self.dataset.json_path}: training images {unknown} are not in its 'training' list")
            clash = sorted(set(data.images) & excluded)
            if clash:
                raise InputError(f"{self.dataset.json_path}: images {clash} are held out (validation/test/exclude) and cannot train")
            names = list(data.images)
        else:
            names = [name for name in available if name not in excluded]
        if not names:
            raise InputError(f"{self.dataset.json_path}: no training images left after holding out {sorted(excluded)}")
        self.images: list[Path] = [available[name] for name in names]
        allowed = set(self.images)
        self.pairs: list[Pair] = [p for p in self.dataset.pairs("train") if p.fixed in allowed and p.moving in allowed]
        if data.real_fraction > 0 and not self.pairs:
            raise InputError(f"{self.dataset.json_path}: real_fraction > 0 but no real training pairs among {names}")
        self.synthetic: SyntheticConfig = data.synthetic or SyntheticConfig()
        self._load = functools.lru_cache(maxsize=data.cache_images)(self._read)
        self.label_pairs = None
        if data.synthmorph is not None:
            reference = available.get(data.synthmorph.reference)
            if reference is None or data.synthmorph.reference in excluded:
                raise InputError(f"{self.dataset.json_path}: synthmorph.reference {data.synthmorph.reference!r} is not a training image")
            spacing = tuple(float(s) for s in read_image(reference).spacing)
            self.label_pairs = LabelPairSource(data.synthmorph, reference, spacing)  # type: ignore[arg-type]
        self.teacher = None
        if data.teacher is not None:
            self.teacher = TeacherFields.for_images(data.teacher, names, available, self.dataset.json_path)

    @property
    def image_ids(self) -> list[str]:
        return [image_id(p) for p in self.images]

    def _read(self, path: Path) -> _Entry:
        image = read_image(path)
        volume = torch.from_numpy(normalise(image.array, self.data.normalisation))[None, None]
        label_path = self.dataset.label_path(path)
        labels = None
        if label_path is not None:
            labels = torch.from_numpy(np.rint(np.asarray(read_image(label_path).array)).astype(np.int64))[None, None]
            labels = pad_to_multiple(labels, self.alignment, mode="zeros")
        keypoint_path = self.dataset.keypoints_path(path)
        keypoints = read_keypoints(keypoint_path) if keypoint_path is not None else None
        spacing = tuple(float(s) for s in image.spacing)
        chest = None
        if self.synthetic.breathing is not None:
            cranio_caudal, towards, anterior_posterior = chest_geometry(image)
            lung = masks.lung_mask(np.asarray(image.array, dtype=np.float32), spacing, axis=cranio_caudal)
            if not lung.any():
                raise InputError(f"{path}: no lungs found (breathing pairs need a thorax CT in Hounsfield units)")
            chest = _Chest(pad_to_multiple(torch.from_numpy(lung)[None, None], self.alignment, mode="zeros"), cranio_caudal, towards,
                           anterior_posterior)
        return _Entry(pad_to_multiple(volume, self.alignment), labels, keypoints, spacing, chest)  # type: ignore[arg-type]

    def _foreground(self, fixed: Tensor) -> Tensor | None:
        if self.data.foreground_threshold is None:
            return None
        return fixed > self.data.foreground_threshold

    def _synthetic_pair(self, entry: _Entry, rng: np.random.Generator, magnitude: float, smoothness: float,
                        intensity: IntensitySettings | None, breathing: tuple[float, float] | None = None) -> dict:
        """A semi-synthetic pair: a random field of largest ``magnitude`` mm, or with ``breathing`` =
        (signed amplitude mm, expansion) a breathing field (negative amplitude: exhale-like)."""
        shape = entry.image.shape[2:]
        coarse, coarse_spacing = coarse_grid(shape, entry.spacing, self.synthetic.generation_downsample)
        if breathing is None:
            phi = random_deformation(coarse, coarse_spacing, magnitude_mm=magnitude, smoothness_mm=smoothness,
                                     seed=_seed(rng), min_jacobian=self.synthetic.min_jacobian)
        else:
            chest, settings = entry.chest, self.synthetic.breathing
            lung = F.interpolate(chest.lung.float(), size=coarse, mode="nearest")[0, 0] > 0.5
            amplitude, expansion = breathing
            phi = breathing_deformation(coarse, coarse_spacing, amplitude_mm=amplitude, axis=chest.cranio_caudal_axis,
                                        towards=chest.towards_feet, ap_axis=chest.anterior_posterior_axis,
                                        lung_mask=lung, expansion=expansion, variation=settings.variation,
                                        seed=_seed(rng), min_jacobian=self.synthetic.min_jacobian)
        phi = geometry.resize_field(phi, shape)
        pair = make_pair(entry.image, labels=entry.labels, keypoints=entry.keypoints, deformation=phi,
                         spacing_mm=entry.spacing, warped_role="fixed", intensity=intensity, seed=_seed(rng))
        keypoints = {}
        if pair.fixed_keypoints is not None:
            keypoints = {"fixed_keypoints": pair.fixed_keypoints[None].float(),
                         "moving_keypoints": pair.moving_keypoints[None].float()}
        return dict(fixed=pair.fixed.float(), moving=pair.moving.float(), truth=pair.field.float(),
                    fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels, **keypoints)

    def _real_pair(self, pair: Pair, rng: np.random.Generator) -> dict:
        fixed, moving = self._load(pair.fixed), self._load(pair.moving)
        if fixed.image.shape != moving.image.shape:
            raise InputError(f"{pair.moving}: grid {tuple(moving.image.shape[2:])} differs from the fixed image {pair.fixed}")
        moving_image = moving.image
        if self.synthetic.intensity is not None:
            settings = self.synthetic.intensity
            moving_image = intensity_perturbation(moving_image, bias_strength=settings.bias_strength,
                                                  gamma_range=tuple(settings.gamma_range),
                                                  noise_std=settings.noise_std, seed=_seed(rng))
        items = dict(fixed=fixed.image, moving=moving_image, fixed_labels=fixed.labels, moving_labels=moving.labels)
        if fixed.keypoints is not None and moving.keypoints is not None:
            items["fixed_keypoints"] = torch.from_numpy(fixed.keypoints).float()[None]
            items["moving_keypoints"] = torch.from_numpy(moving.keypoints).float()[None]
        return items

    def _teacher_truth(self, pair: Pair) -> Tensor:
        """The teacher's field of ``pair`` ``(1, 3, X, Y, Z)`` on the padded grid (zeros in the padding)."""
        return pad_to_multiple(self.teacher.field(pair), self.alignment, mode="zeros")

    def _teacher_pair(self, pair: Pair, rng: np.random.Generator) -> dict:
        """A real pair whose known ``truth`` is the teacher's field (augmented: :func:`rwcnet.training.teacher.augment`)."""
        items = self._real_pair(pair, rng)
        fixed, moving, truth = augment(items["fixed"], items["moving"], self._teacher_truth(pair), self._load(pair.fixed).spacing,
                                       self.data.teacher, rng, self.synthetic)
        return dict(fixed=fixed, moving=moving, truth=truth)

    def _crop_size(self, downsample: int, patch) -> list[int] | None:
        """Label-map pairs are synthesised on the training patch alone (stage-grid voxels), rounded to the network's alignment."""
        if patch is None:
            return None
        grid = self.label_pairs.maps.grid(downsample)
        size = [2 * math.ceil(patch * n / 2) for n in grid] if isinstance(patch, float) else [int(p) for p in patch]
        step = max(1, math.ceil(self.alignment / downsample))
        return [max(step, min(k, n) // step * step) for k, n in zip(size, grid)]

    def _region(self, fixed: Tensor, downsample: int, patch, rng: np.random.Generator) -> Box | None:
        """A patch of the stage grid centred on a random foreground voxel (whole grid when ``patch`` is None)."""
        if patch is None:
            return None
        grid = [n // downsample for n in fixed.shape[2:]]
        if isinstance(patch, float):
            size = [min(n, 2 * math.ceil(patch * n / 2)) for n in grid]
        else:
            size = [min(n, int(p)) for n, p in zip(grid, patch)]
        candidates = None
        if self.data.foreground_threshold is not None:
            pooled = F.avg_pool3d(fixed, downsample)[0, 0]
            candidates = torch.nonzero(pooled > self.data.foreground_threshold)
        if candidates is not None and len(candidates):
            centre = candidates[int(rng.integers(len(candidates)))].tolist()
        else:
            centre = [int(rng.integers(n)) for n in grid]
        starts = [min(max(c - s // 2, 0), n - s) for c, s, n in zip(centre, size, grid)]
        return tuple(slice(a, a + s) for a, s in zip(starts, size))  # type: ignore[return-value]

    def sample(self, phase_index: int, phase: PhaseConfig, downsample: int, index: int) -> Sample:
        """Sample ``index`` of schedule phase ``phase_index`` (deterministic)."""
        rng = np.random.default_rng([self.config.seed, phase_index, index])
        seed = _seed(rng)
        if self.label_pairs is not None and rng.random() < self.label_pairs.settings.fraction:
            patch = phase.patch if phase.crop is None else tuple(max(1, n // downsample) for n in phase.crop)
            key, items = self.label_pairs.training_pair(rng, downsample, self._crop_size(downsample, patch))
            return Sample(key=key, spacing=self.label_pairs.spacing, seed=seed, **items)
        if self.teacher is not None and rng.random() < self.data.teacher.fraction:
            pair = self.teacher.training[int(rng.integers(len(self.teacher.training)))]
            items = self._teacher_pair(pair, rng)
            key, spacing = f"teacher:{pair.key}", self._load(pair.fixed).spacing
        elif self.data.synthetic is None or rng.random() < self.data.real_fraction:
            pair = self.pairs[int(rng.integers(len(self.pairs)))]
            items = self._real_pair(pair, rng)
            key, spacing = pair.key, self._load(pair.fixed).spacing
        else:
            path = self.images[int(rng.integers(len(self.images)))]
            entry = self._load(path)
            low, high = self.synthetic.magnitude_mm
            magnitude = float(rng.uniform(low, high))
            low, high = self.synthetic.smoothness_mm
            smoothness = float(rng.uniform(low, high))
            breathing = None
            settings = self.synthetic.breathing
            if settings is not None and rng.random() < settings.fraction:
                sign = -1.0 if rng.random() < settings.exhale_fraction else 1.0
                breathing = (sign * float(rng.uniform(*settings.amplitude_mm)), float(rng.uniform(*settings.expansion)))
            items = self._synthetic_pair(entry, rng, magnitude, smoothness, self.synthetic.intensity, breathing)
            key, spacing = f"synthetic:{image_id(path)}", entry.spacing
        if phase.crop is not None:
            items = self._cut(items, phase.crop, rng)
        region = self._region(items["fixed"], downsample, phase.patch, rng)
        return Sample(key=key, spacing=spacing, seed=seed, region=region, **items)

    def _cut(self, items: dict, crop: tuple[int, int, int], rng: np.random.Generator) -> dict:
        """An image pair's tensors cut to a ``crop`` box of full-resolution voxels, placed on the alignment grid and
        centred on a random foreground voxel of the fixed image; keypoints shifted into it (fixed ones outside dropped)."""
        if any(n % self.alignment for n in crop):
            raise InputError(f"{self.dataset.json_path}: a training crop must be a multiple of the network's alignment "
                             f"({self.alignment} voxels), got {tuple(crop)}")
        box = self._region(items["fixed"], self.alignment, tuple(n // self.alignment for n in crop), rng)
        box = tuple(slice(s.start * self.alignment, s.stop * self.alignment) for s in box)
        volume = (slice(None), slice(None), *box)
        cut = {name: value[volume] if isinstance(value, Tensor) and value.dim() == 5 else value
               for name, value in items.items()}
        if items.get("fixed_keypoints") is not None:
            origin = torch.tensor([s.start for s in box], dtype=torch.float32)
            size = torch.tensor([s.stop - s.start for s in box], dtype=torch.float32)
            fixed_kp, moving_kp = items["fixed_keypoints"] - origin, items["moving_keypoints"] - origin
            inside = ((fixed_kp >= 0) & (fixed_kp <= size - 1)).all(-1)[0]
            cut["fixed_keypoints"], cut["moving_keypoints"] = fixed_kp[:, inside], moving_kp[:, inside]
        return cut

    def validation_samples(self) -> list[Sample]:
        """The held-out semi-synthetic pairs: fixed seeds, the validation deformation strength, whole grids.

        With breathing pairs configured they are breathing pairs of amplitude ``magnitude_mm``
        (inhale-like for even indices, exhale-like for odd ones; the mean expansion)."""
        settings = self.config.validation
        breathing = self.synthetic.breathing
        samples = []
        for index in range(settings.pairs):
            rng = np.random.default_rng([settings.seed, index])
            path = self.images[index % len(self.images)]
            entry = self._load(path)
            motion = None if breathing is None else \
                ((-1.0 if index % 2 else 1.0) * settings.magnitude_mm, sum(breathing.expansion) / 2)
            items = self._synthetic_pair(entry, rng, settings.magnitude_mm, settings.smoothness_mm,
                                         self.synthetic.intensity, motion)
            samples.append(Sample(key=f"validation:{image_id(path)}:{index}", spacing=entry.spacing, seed=0,
                                  mask=self._foreground(items["fixed"]), **items))
        return samples

    def validation_label_samples(self) -> list[Sample]:
        """The held-out pairs synthesised from the validation label maps (fixed seeds); none without ``synthmorph``."""
        if self.label_pairs is None:
            return []
        samples = []
        for key, items in self.label_pairs.validation_pairs(self.config.validation.seed):
            for role in ("fixed_onehot", "moving_onehot"):
                items[role] = items[role].half()  # kept for the whole run: half the memory (fractions to 1e-3)
            samples.append(Sample(key=key, spacing=self.label_pairs.spacing, seed=0, **items))
        return samples

    def validation_teacher_samples(self) -> list[Sample]:
        """The held-out teacher pairs (``data.teacher.validation``), whole grids, and each with the moving contrast
        inverted too when training inverts it."""
        samples = []
        for pair in [] if self.teacher is None else self.teacher.validation:
            fixed, moving = self._load(pair.fixed), self._load(pair.moving)
            truth, mask = self._teacher_truth(pair), self._foreground(fixed.image)
            variants = [("", moving.image)]
            if self.data.teacher.invert_moving > 0:
                variants.append((":inverted", torch.from_numpy(invert_contrast(moving.image.numpy()))))
            for suffix, image in variants:
                samples.append(Sample(key=f"teacher:{pair.key}{suffix}", fixed=fixed.image, moving=image,
                                      spacing=fixed.spacing, seed=0, truth=truth, mask=mask))
        return samples

    def report_pairs(self) -> list[Pair]:
        """The dataset's ``registration_val`` pairs (never used in training), scored once at the end."""
        if not self.dataset.meta.get("registration_val"):
            return []
        return self.dataset.pairs("val")

    def reference_image(self) -> Image:
        """The first training image (its spacing and orientation go into the model's metadata)."""
        return read_image(self.images[0])
