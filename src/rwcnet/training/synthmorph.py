"""SynthMorph-style training pairs made from label maps alone (after Hoffmann et al., 2022).

A pair starts from two soft one-hot label maps ``(1, K, X, Y, Z)`` on the
grid of the stage being trained (one channel per *generation* label, the
fraction of each voxel that the label covers; see
:mod:`rwcnet.training.synthmorph_maps`). Each map is warped by its own random smooth
transform (a small random affine about the grid centre after an integrated
stationary velocity field, :func:`random_transform`), trilinearly, so the
warped channels stay fractions. Each map becomes an image with random
contrast (:func:`mixture_maps`, :func:`render_image`): a Gaussian mixture (a
random mean and spread per label, mixed before warping, which is the same
by linearity), blur, a smooth multiplicative bias field,
normalisation to [0, 1], gamma and noise. Skull-stripped images set the
extra-cerebral labels (and the CSF outside the brain) to 0, as the shared
brains are; whole-head images give them random intensities too.

The loss sees the warped maps merged into :data:`MERGED_CLASSES` (SynthSeg's
segmentation targets), so every pair comes with exact labels and no
ground-truth field is needed. All randomness comes from one
``torch.Generator``, so a pair is a pure function of its seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rwcnet import geometry
from rwcnet.errors import InputError
from rwcnet.synthetic import _blur, _bspline_upsample, _smooth_noise

Tensor = torch.Tensor

#: Labels that a skull-stripped image shows as background: air, the CSF outside the brain
#: (:data:`OUTER_CSF`, made by :mod:`rwcnet.training.synthmorph_maps`) and the extra-cerebral tissues 500-599.
OUTER_CSF = -24

#: SynthSeg's inferior lateral ventricles (5 / 44) are scored with the lateral ventricles (4 / 43):
#: they are small, touch them, and are not among the evaluation labels of the real brains.
_MERGE = {5: 4, 44: 43}


@dataclass(frozen=True)
class LabelTable:
    """The generation labels (one channel each) and how they map to the merged loss classes.

    ``values[k]`` is the label value of channel ``k`` (:data:`OUTER_CSF` for
    the CSF outside the brain); ``background[k]`` says whether a
    skull-stripped image shows it as 0; ``merged[k]`` is the loss class of
    the channel (index into ``classes``, -1: none); ``classes`` are the
    label values of the merged classes.
    """

    values: tuple[int, ...]
    background: tuple[bool, ...]
    merged: tuple[int, ...]
    classes: tuple[int, ...]

    @property
    def channels(self) -> int:
        return len(self.values)

    def lookup(self, maximum: int) -> np.ndarray:
        """An array ``lut`` with ``lut[value]`` = channel of ``value`` (-1 for unknown values), for values up to ``maximum``."""
        lut = np.full(max(maximum, max(self.values)) + 1, -1, dtype=np.int64)
        for channel, value in enumerate(self.values):
            if value >= 0:
                lut[value] = channel
        return lut


def label_table(labels_json: str | Path) -> LabelTable:
    """The :class:`LabelTable` of a ``labels.json`` (value, synthseg_target per label) plus the outer-CSF channel.

    Merged classes: SynthSeg's segmentation targets with left and right kept
    (registration must not map a left structure onto its right partner, and
    the brain evaluation labels keep the sides), the inferior lateral
    ventricles merged into the lateral ventricles: 29 classes.
    """
    path = Path(labels_json)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["labels"]
        pairs = [(int(e["value"]), int(e["synthseg_target"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a label table with 'labels' [{{value, synthseg_target}}] ({error})") from error
    if (0, 0) not in pairs:
        raise InputError(f"{path}: the label table has no background (value 0)")
    pairs = [(0, 0)] + [pair for pair in pairs if pair != (0, 0)] + [(OUTER_CSF, 0)]  # channel 0: background
    targets = [_MERGE.get(target, target) for _, target in pairs]
    classes = tuple(sorted({t for t in targets if t > 0}))
    return LabelTable(
        values=tuple(value for value, _ in pairs),
        background=tuple(value in (0, OUTER_CSF) or 500 <= value < 600 for value, _ in pairs),
        merged=tuple(classes.index(t) if t > 0 else -1 for t in targets),
        classes=classes,
    )


def merge_classes(onehot: Tensor, table: LabelTable) -> Tensor:
    """Sum the generation channels of ``onehot`` ``(B, K, X, Y, Z)`` into the merged classes: ``(B, M, X, Y, Z)``."""
    index = torch.tensor(table.merged, device=onehot.device)
    keep = index >= 0
    out = onehot.new_zeros(onehot.shape[0], len(table.classes), *onehot.shape[2:])
    return out.index_add_(1, index[keep], onehot[:, keep])


def _uniform(generator: torch.Generator, low: float, high: float, size: Sequence[int] = ()) -> Tensor:
    return low + (high - low) * torch.rand(tuple(size), generator=generator, dtype=torch.float64)


def _rotation(angles: Tensor) -> Tensor:
    """Rotation matrix ``(3, 3)`` from three angles (radians) about the array axes."""
    matrix = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        rotation = torch.eye(3, dtype=torch.float64)
        rotation[a, a] = rotation[b, b] = torch.cos(angle)
        rotation[a, b], rotation[b, a] = -torch.sin(angle), torch.sin(angle)
        matrix = rotation @ matrix
    return matrix


#: Velocity fields are drawn and integrated on a grid of about this spacing (they are smooth on the scale of
#: ``smoothness_mm`` >= 8 mm) and brought to the synthesis grid trilinearly: at 1/2 resolution this is 8x cheaper.
FIELD_SPACING_MM = 4.0


def random_transform(shape: Sequence[int], spacing_mm: Sequence[float], settings, generator: torch.Generator) -> Tensor:
    """Sampling coordinates ``(1, 3, *shape)`` (voxels) of a random smooth pull-back transform.

    ``x -> c + L (x + u(x) - c) + t``: ``u`` the flow of a stationary velocity
    field (Gaussian-smoothed noise of std drawn from ``settings.smoothness_mm``,
    scaled to a largest length drawn from ``settings.magnitude_mm``, integrated
    by :func:`rwcnet.geometry.integrate_velocity` on a grid of about
    :data:`FIELD_SPACING_MM`); ``L`` a rotation (up to ``rotation_deg`` per
    axis) times a shear (``shear``) times scales (``1 ± scaling``), about the
    grid centre ``c``; ``t`` a shift up to ``translation_mm``.
    """
    shape = tuple(int(n) for n in shape)
    coarse = [max(2, min(n, round(n * float(s) / FIELD_SPACING_MM))) for n, s in zip(shape, spacing_mm)]
    coarse_spacing = [n * float(s) / c for n, s, c in zip(shape, spacing_mm, coarse)]
    spacing = torch.tensor(coarse_spacing, dtype=torch.float32).view(1, 3, 1, 1, 1)
    magnitude = float(_uniform(generator, *settings.magnitude_mm))
    smoothness = float(_uniform(generator, *settings.smoothness_mm))
    noise = _smooth_noise(coarse, coarse_spacing, smoothness, generator, None, torch.float32)
    largest = float(noise.norm(dim=1).max())
    velocity = noise * (magnitude / max(largest, 1e-12)) / spacing
    displacement = geometry.resize_field(geometry.integrate_velocity(velocity), shape)
    rotation = _rotation(_uniform(generator, -1.0, 1.0, (3,)) * math.radians(settings.rotation_deg))
    shear = torch.eye(3, dtype=torch.float64) + (1.0 - torch.eye(3, dtype=torch.float64)) * _uniform(
        generator, -settings.shear, settings.shear, (3, 3))
    scales = torch.diag(1.0 + _uniform(generator, -settings.scaling, settings.scaling, (3,)))
    linear = (rotation @ shear @ scales).to(torch.float32)
    step = torch.tensor([float(s) for s in spacing_mm], dtype=torch.float32)
    shift = (_uniform(generator, -1.0, 1.0, (3,)) * settings.translation_mm).to(torch.float32) / step
    centre = torch.tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float32).view(1, 3, 1, 1, 1)
    points = geometry.identity_grid(shape) + displacement - centre
    return centre + torch.einsum("ij,bjxyz->bixyz", linear, points) + shift.view(1, 3, 1, 1, 1)


def mixture_maps(onehot: Tensor, table: LabelTable, *, skull_strip: bool, settings, generator: torch.Generator) -> Tensor:
    """Per-voxel Gaussian-mixture mean, spread and foreground fraction ``(B, 3, X, Y, Z)`` of soft labels ``(B, K, X, Y, Z)``.

    Each label gets a mean in [0, 1] and a spread drawn from ``settings.std``;
    ``skull_strip`` gives the background labels (``table.background``) 0 for
    both. All three maps are linear in the label fractions, so warping them
    equals mixing the warped fractions (and costs 3 channels instead of K).
    """
    channels = onehot.shape[1]
    means = torch.rand(channels, generator=generator).to(onehot)
    spreads = _uniform(generator, *settings.std, (channels,)).to(onehot)
    background = torch.tensor(table.background, device=onehot.device)
    if skull_strip:
        means, spreads = means.masked_fill(background, 0.0), spreads.masked_fill(background, 0.0)
    weights = torch.stack([means, spreads, (~background).to(onehot)])
    return torch.einsum("ck,bkxyz->bcxyz", weights, onehot)


def render_image(mixture: Tensor, *, skull_strip: bool, spacing_mm: Sequence[float], settings,
                 generator: torch.Generator) -> Tensor:
    """A random-contrast image ``(1, 1, X, Y, Z)`` in [0, 1] from :func:`mixture_maps` ``(1, 3, X, Y, Z)``.

    Mean plus spread times unit Gaussian noise per voxel, then a Gaussian blur
    of std drawn from ``settings.blur_mm``, a bias field ``exp(b)`` (``b`` a
    cubic B-spline on 5³ random control points, largest ``|b|`` drawn from
    ``settings.bias``), division by the maximum, gamma ``exp(N(0, gamma_std))``
    and Gaussian noise of std drawn from ``settings.noise``. ``skull_strip``
    keeps the image 0 where the foreground covers less than half a voxel.
    """
    shape = mixture.shape[2:]
    image = mixture[:, :1] + mixture[:, 1:2] * torch.randn((1, 1, *shape), generator=generator).to(mixture)
    blur = float(_uniform(generator, *settings.blur_mm))
    image = _blur(image, [blur / float(s) for s in spacing_mm])
    coarse = torch.randn((1, 1, 5, 5, 5), generator=generator, dtype=torch.float64)
    bias = _bspline_upsample(coarse, shape).to(image)
    bias = bias * (float(_uniform(generator, *settings.bias)) / bias.abs().max().clamp_min(1e-12))
    image = (image * torch.exp(bias)).clamp_min(0.0)
    image = image / image.max().clamp_min(1e-6)
    gamma = math.exp(settings.gamma_std * float(torch.randn((), generator=generator, dtype=torch.float64)))
    image = image.clamp_min(1e-6) ** gamma
    noise = float(_uniform(generator, *settings.noise))
    image = (image + noise * torch.randn((1, 1, *shape), generator=generator).to(image)).clamp(0.0, 1.0)
    if skull_strip:
        image = image.masked_fill(mixture[:, 2:3] < 0.5, 0.0)
    return image


@dataclass
class LabelPair:
    """A synthetic pair on one grid: images ``(1, 1, X, Y, Z)`` in [0, 1] and their merged one-hot labels ``(1, M, X, Y, Z)``."""

    fixed: Tensor
    moving: Tensor
    fixed_onehot: Tensor
    moving_onehot: Tensor
    skull_strip: bool


def make_label_pair(fixed_map: Tensor, moving_map: Tensor, table: LabelTable, *, spacing_mm: Sequence[float],
                    settings, seed: int) -> LabelPair:
    """A random pair from two soft one-hot maps ``(1, K, X, Y, Z)`` (or one map twice), deterministic in ``seed``.

    Each map is warped by its own :func:`random_transform` (trilinear, so the
    channels stay fractions) and turned into an image with its own contrast
    (:func:`mixture_maps`, :func:`render_image`); both images are
    skull-stripped with probability ``settings.skull_strip``.
    """
    if fixed_map.shape != moving_map.shape or fixed_map.shape[1] != table.channels:
        raise ValueError(f"maps must be (1, {table.channels}, X, Y, Z) of one shape, got {tuple(fixed_map.shape)} and {tuple(moving_map.shape)}")
    generator = torch.Generator().manual_seed(int(seed))
    skull_strip = bool(torch.rand((), generator=generator) < settings.skull_strip)
    images, labels = [], []
    for source in (fixed_map, moving_map):
        source = source.float()
        coords = random_transform(source.shape[2:], spacing_mm, settings, generator)
        mixture = mixture_maps(source, table, skull_strip=skull_strip, settings=settings, generator=generator)
        warped = geometry.sample(torch.cat([mixture, merge_classes(source, table)], dim=1), coords)
        images.append(render_image(warped[:, :3], skull_strip=skull_strip, spacing_mm=spacing_mm, settings=settings,
                                   generator=generator))
        labels.append(warped[:, 3:])
    return LabelPair(images[0], images[1], labels[0], labels[1], skull_strip)
