"""The registration pipeline a user runs: images in, a Learn2Reg field (and optional extras) out.

Steps: read the images (any supported format) -> bring the moving image onto
the fixed grid in physical space when the grids differ -> normalise
intensities by modality -> network on its working grid (the model's
orientation and spacing, never finer than the fixed image; the field is
mapped back to the fixed grid, vectors rotated and rescaled) -> instance
optimisation on MIND features on the fixed grid -> fine-scale refinement to
full resolution (greedy-style, local NCC or MIND) -> warp the original moving image
(sampled once, through physical space when it lies on another grid).
The model's grid applies to the network's input only: IO and the output
stay on the fixed image's own grid, so their cost follows the data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field as dataclass_field
from importlib import resources
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import torch

from rwcnet import geometry
from rwcnet.errors import InputError
from rwcnet.grids import Grid, grid_difference
from rwcnet.intensity import normalise, scale_intensity
from rwcnet.io import Image, read_image, resample_image, same_grid
from rwcnet.model import RWCNet, load_model
from rwcnet.optimize import instance_optimise
from rwcnet.refine import REFINE_PRESETS, choose_metric, refine as refine_field, refine_config
from rwcnet.runtime import release_freed_memory

log = logging.getLogger(__name__)

#: ``stage(name)`` is called when a pipeline stage starts; ``step(done, total)`` during instance optimisation.
StageCallback = Callable[[str], None]
StepCallback = Callable[[int, int, float], None]

SHIPPED_MODELS = {"brain": "brain.pt"}
IO_PRESET = {"mr": "brain", "ct": "lung"}
#: The model ``model="default"`` means for each modality. CT keeps the MR-trained brain model (with a
#: warning) until a lung model ships: IO alone cannot follow breathing motion (see the README).
DEFAULT_MODELS = {"mr": "brain", "ct": "brain"}


@dataclass
class RegistrationResult:
    """The outcome on the fixed grid: ``field`` ``(X, Y, Z, 3)`` in fixed voxels (Learn2Reg), the warped moving image."""

    field: np.ndarray
    warped: np.ndarray  # the original moving image sampled once by the field (through physical space if off-grid)
    fixed: Image
    moving: Image  # the moving image on the fixed grid (resampled if it was elsewhere)
    seconds: dict[str, float] = dataclass_field(default_factory=dict)
    notes: list[str] = dataclass_field(default_factory=list)
    warnings: list[str] = dataclass_field(default_factory=list)  # one line each; the command prints them as "warning: ..."


def shipped_model_path(name: str) -> Path | None:
    """Path of a model shipped inside the package, or ``None`` when it is not there."""
    path = Path(str(resources.files("rwcnet") / "weights" / SHIPPED_MODELS[name]))
    return path if path.is_file() else None


def resolve_model(
    model: str | Path | None, device: torch.device, modality: str = "mr"
) -> tuple[RWCNet | None, dict, str]:
    """Load ``model`` (``"default"``, a shipped name, a path or ``None``); returns the network, its metadata and a note.

    ``"default"`` is :data:`DEFAULT_MODELS` of ``modality``.
    """
    if model is None:
        return None, {}, "no network: instance optimisation alone"
    if str(model) == "default":
        model = DEFAULT_MODELS[modality]
    if str(model) in SHIPPED_MODELS:
        path = shipped_model_path(str(model))
        if path is None:
            return None, {}, f"no shipped '{model}' weights in this rwcnet yet: instance optimisation alone"
    else:
        path = Path(model)
    network, metadata = load_model(path, device=device)
    return network, metadata, f"network: {path.name} ({network.config.name}, trained on {metadata['modality'].upper()})"


def modality_warning(metadata: dict, modality: str, name: str) -> str | None:
    """The one-line warning for a model trained on another modality than ``modality`` (None when they match)."""
    trained = metadata.get("modality", "mr")
    if trained == modality:
        return None
    return (f"model {name} was trained on {trained.upper()} images and is used here on {modality.upper()} "
            f"(--modality {modality}); expect lower accuracy than on {trained.upper()}")


def working_grid(fixed: Image, spacing: float | list[float], orientation: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An axis-aligned grid in ``orientation`` (e.g. ``"LIA"``) at ``spacing`` mm covering the fixed image's box.

    Returns its voxel-to-RAS affine and shape.
    """
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    direction = _orientation_matrix(orientation)
    corners = np.array([[i, j, k, 1.0] for i in (0, fixed.shape[0] - 1) for j in (0, fixed.shape[1] - 1) for k in (0, fixed.shape[2] - 1)])
    points = (fixed.affine @ corners.T)[:3]
    projected = direction.T @ points  # mm along each working axis
    low, high = projected.min(axis=1), projected.max(axis=1)
    shape = tuple(int(np.ceil((h - l) / s - 1e-6)) + 1 for l, h, s in zip(low, high, spacing))
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = direction @ low
    return affine, shape  # type: ignore[return-value]


def _orientation_matrix(orientation: str) -> np.ndarray:
    """Columns: the RAS unit vector of each array axis of an orientation code such as ``"LIA"``."""
    direction = np.zeros((3, 3))
    for axis, (ras_axis, sign) in enumerate(nib.orientations.axcodes2ornt(tuple(orientation))):
        direction[int(ras_axis), axis] = sign
    return direction


def network_spacing(fixed: Image, spacing: float | list[float], orientation: str) -> np.ndarray:
    """The network's working spacing (mm, per axis of ``orientation``): the model's, or the fixed image's where coarser.

    Along each working axis the fixed image's spacing is that of its array axis closest
    in direction, so a 1.5 mm CT is not upsampled to a 1 mm model grid.
    """
    model = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    columns = fixed.affine[:3, :3]
    voxel_mm = np.linalg.norm(columns, axis=0)
    alignment = np.abs(_orientation_matrix(orientation).T @ (columns / voxel_mm))  # working axis x fixed axis
    return np.maximum(model, voxel_mm[alignment.argmax(axis=1)])


def intensity_mapping(metadata: dict, modality: str, ct_range: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """How to normalise images for a model: as it was trained, if its file records a range; else by ``modality``.

    ``metadata["normalisation"]`` is the training config's ``{kind, low, high}``: ``range`` maps
    ``low..high`` to 0..1, ``window`` also clips to [0, 1], ``none`` (or no record) means the images
    were used as stored, and the modality's preset applies. Returns the mapping and a note
    (empty when the modality's preset is used).
    """
    trained = metadata.get("normalisation") or {}
    kind = trained.get("kind", "none")
    if kind in ("range", "window"):
        low, high = float(trained["low"]), float(trained["high"])
        return (
            lambda array: scale_intensity(array, low, high, clip=kind == "window"),
            f"intensities normalised as the model was trained: {kind} {low:g}..{high:g}",
        )
    return (lambda array: normalise(array, modality, ct_range=ct_range)), ""


def _as_image(value: Image | str | Path, what: str) -> Image:
    if isinstance(value, Image):
        return value
    if isinstance(value, (str, Path)):
        return read_image(value)
    raise TypeError(f"{what}: expected an rwcnet.io.Image or a path, got {type(value).__name__}")


def _check_mask(mask: Image | None, image: Image, what: str) -> Image | None:
    if mask is None:
        return None
    name = mask.path or what
    if not same_grid(mask, image):
        raise InputError(f"{name}: {what} is on another grid than its image ({mask.shape} vs {image.shape} or a different affine)")
    if not np.any(mask.array > 0):
        raise InputError(f"{name}: {what} is empty")
    return mask


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


def _run_network(
    network: RWCNet, metadata: dict, fixed: Image, moving: Image, intensities: Callable[[np.ndarray], np.ndarray],
    device: torch.device, notes: list[str],
) -> torch.Tensor:
    """The network's field ``(1, 3, *fixed.shape)`` in fixed voxels; ``moving`` is on the fixed grid.

    The network sees both images on its working grid (the model's orientation, at
    :func:`network_spacing`); when that is not the fixed grid, the images are resampled
    onto it and the field is mapped back with :func:`rwcnet.geometry.resample_field`.
    """
    on_fixed_grid, work = True, fixed
    if "orientation" in metadata:
        spacing = network_spacing(fixed, metadata.get("spacing_mm", 1.0), metadata["orientation"])
        affine, shape = working_grid(fixed, spacing, metadata["orientation"])
        on_fixed_grid = tuple(shape) == fixed.shape and bool(np.allclose(affine, fixed.affine, atol=1e-4))
        if not on_fixed_grid:
            work = Image(np.zeros(shape, np.float32), affine)
            notes.append(f"network working grid {metadata['orientation']} {tuple(shape)} at "
                         f"{'x'.join(f'{s:g}' for s in spacing)} mm (IO and output on the fixed grid)")
    inputs = [_tensor(intensities(img.array if on_fixed_grid else resample_image(img, work, order=1).array), device)
              for img in (fixed, moving)]
    with torch.inference_mode():
        field = network(inputs[0], inputs[1]).field
    del inputs
    if on_fixed_grid:
        return field.clone()
    with torch.no_grad():
        return geometry.resample_field(field, torch.from_numpy(work.affine), torch.from_numpy(fixed.affine), fixed.shape)


def pick_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; refuses ``cuda`` on a machine without it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available on this machine")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def register(
    fixed: Image | str | Path,
    moving: Image | str | Path,
    *,
    fixed_mask: Image | str | Path | None = None,
    moving_mask: Image | str | Path | None = None,
    model: str | Path | None = "default",
    io: bool = True,
    io_iterations: int | None = None,
    modality: str = "mr",
    ct_range: str = "window",
    device: str = "auto",
    seed: int = 0,
    method: str = "rwcnet",
    refine: bool = True,
    refine_metric: str = "auto",
    refine_iterations: tuple[int, ...] | None = None,
    on_stage: StageCallback | None = None,
    on_step: StepCallback | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; returns the Learn2Reg field on the fixed grid and the warped image.

    ``model`` is ``"default"`` (the modality's model, :data:`DEFAULT_MODELS`), a shipped
    model name (``"brain"``), a model file, or ``None`` for instance optimisation alone
    (also used, with a note, when the shipped weights are absent). A model trained on
    another modality than ``modality`` runs, with a one-line entry in ``warnings``. ``modality`` picks intensity normalisation
    (unless the model file records the range it was trained with, see
    :func:`intensity_mapping`) and the instance-optimisation preset (``mr``:
    brain, ``ct``: lung; for CT without masks, lung masks are computed). Seeds torch with ``seed``.
    ``method="convexadam"`` runs the in-package ConvexAdam baseline instead
    of the network (``io`` then toggles its Adam stage). ``refine`` adds the
    fine-scale refinement of :mod:`rwcnet.refine` after the network (and IO),
    with ``refine_metric`` ``auto`` (NCC for CT or when the intensities agree,
    MIND across contrasts), ``ncc`` or ``mind``; ``refine_iterations`` per
    level overrides the modality preset's.
    """
    if method not in ("rwcnet", "convexadam"):
        raise InputError(f"unknown registration method {method!r}; use rwcnet or convexadam")
    if method == "convexadam":
        model = None
    stage = on_stage or (lambda name: None)
    if modality not in IO_PRESET:
        raise InputError(f"unknown modality {modality!r}; use 'mr' or 'ct'")
    if refine_metric not in ("auto", "ncc", "mind"):
        raise InputError(f"unknown refinement metric {refine_metric!r}; use auto, ncc or mind")
    try:
        refinement = refine_config(REFINE_PRESETS[IO_PRESET[modality]], iterations=refine_iterations)
    except ValueError as error:
        raise InputError(f"--refine-iters: {error}") from error
    torch.manual_seed(seed)
    dev = pick_device(device)
    seconds: dict[str, float] = {}
    notes: list[str] = []
    start = time.perf_counter()
    fixed_img, moving_img = _as_image(fixed, "fixed"), _as_image(moving, "moving")
    masks = [
        _check_mask(_as_image(m, what) if m is not None else None, image, what)
        for m, image, what in ((fixed_mask, fixed_img, "fixed mask"), (moving_mask, moving_img, "moving mask"))
    ]
    original_moving = moving_img  # --warped samples it once, through physical space when off the fixed grid
    if grid_difference(moving_img, Grid.of(fixed_img, "the fixed image")) is not None:
        notes.append(f"moving image resampled onto the fixed grid in physical space ({moving_img.shape} -> {fixed_img.shape})")
        moving_img = resample_image(moving_img, fixed_img, order=1)
        if masks[1] is not None:
            masks[1] = resample_image(masks[1], fixed_img, order=0)
    if modality == "ct" and masks[0] is None and masks[1] is None:
        from rwcnet.masks import lung_mask

        stage("lung masks")
        masks = [Image(lung_mask(img.array, img.spacing).astype(np.uint8), img.affine) for img in (fixed_img, moving_img)]
        notes.append("CT without masks: lung masks computed for instance optimisation")
    network, metadata, note = resolve_model(model, dev, modality)
    notes.append("ConvexAdam (in-package baseline)" if method == "convexadam" else note)
    warnings: list[str] = []
    if network is not None:
        warning = modality_warning(metadata, modality, Path(str(model)).name)
        if warning:
            warnings.append(warning)
    seconds["read"] = time.perf_counter() - start

    intensities, intensity_note = intensity_mapping(metadata if network is not None else {}, modality, ct_range)
    if intensity_note:
        notes.append(intensity_note)
    field = torch.zeros(1, 3, *fixed_img.shape, device=dev)
    if network is not None:
        stage("network")
        t = time.perf_counter()
        field = _run_network(network, metadata, fixed_img, moving_img, intensities, dev, notes)
        seconds["network"] = time.perf_counter() - t
        release_freed_memory()
    # instance optimisation and the output stay on the fixed grid
    images = [_tensor(intensities(img.array), dev) for img in (fixed_img, moving_img)]
    fixed_masks = [None if m is None else _tensor(m.array > 0, dev) for m in masks]
    if method == "convexadam":
        from rwcnet.convexadam import convex_adam

        t = time.perf_counter()
        field = convex_adam(
            images[0], images[1], preset=IO_PRESET[modality], io_iterations=io_iterations if io else 0,
            fixed_mask=fixed_masks[0], moving_mask=fixed_masks[1], progress=on_step, on_stage=stage,
        )
        seconds["convexadam"] = time.perf_counter() - t
    if io and method == "rwcnet":
        stage("instance optimisation")
        t = time.perf_counter()
        field = instance_optimise(
            images[0], images[1], field, preset=IO_PRESET[modality], iterations=io_iterations,
            fixed_mask=fixed_masks[0], moving_mask=fixed_masks[1], progress=on_step,
        )
        seconds["instance_optimisation"] = time.perf_counter() - t
    if refine and method == "rwcnet":
        stage("refinement")
        t = time.perf_counter()
        with torch.no_grad():
            warped_now = geometry.warp(images[1], field)
        metric, metric_note = choose_metric(refine_metric, modality, images[0], warped_now, fixed_masks[0], refinement.contrast_threshold)
        del warped_now
        notes.append(metric_note)
        field = refine_field(images[0], images[1], field, config=refinement, metric=metric, fixed_mask=fixed_masks[0],
                             moving_mask=fixed_masks[1], progress=on_step)
        seconds["refinement"] = time.perf_counter() - t
    del images, fixed_masks
    stage("output")
    with torch.no_grad():
        sampling = field.to(torch.float32)
        if original_moving is not moving_img:
            sampling = geometry.moving_voxel_field(
                sampling, torch.from_numpy(fixed_img.affine), torch.from_numpy(original_moving.affine)
            )
        moving_t = torch.from_numpy(np.ascontiguousarray(original_moving.array, dtype=np.float32))[None, None].to(dev)
        warped = geometry.warp(moving_t, sampling)
    seconds["total"] = time.perf_counter() - start
    return RegistrationResult(
        field=field[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32),
        warped=warped[0, 0].cpu().numpy(),
        fixed=fixed_img,
        moving=moving_img,
        seconds=seconds,
        notes=notes,
        warnings=warnings,
    )
