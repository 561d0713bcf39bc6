"""The registration pipeline a user runs: images in, a Learn2Reg field (and optional extras) out.

Steps: read the images (any supported format) -> bring the moving image onto
the fixed grid in physical space when the grids differ -> normalise
intensities by modality -> resample both onto the model's working grid
(the orientation and spacing it was trained with) -> network -> instance
optimisation on MIND features -> fine-scale refinement to full resolution
(greedy-style, local NCC or MIND) -> map the field back to the fixed grid
(vectors rotated and rescaled) -> warp the moving image.
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


@dataclass
class RegistrationResult:
    """The outcome on the fixed grid: ``field`` ``(X, Y, Z, 3)`` in fixed voxels (Learn2Reg), the warped moving image."""

    field: np.ndarray
    warped: np.ndarray
    fixed: Image
    moving: Image  # the moving image on the fixed grid (resampled if it was elsewhere)
    seconds: dict[str, float] = dataclass_field(default_factory=dict)
    notes: list[str] = dataclass_field(default_factory=list)


def shipped_model_path(name: str) -> Path | None:
    """Path of a model shipped inside the package, or ``None`` when it is not there."""
    path = Path(str(resources.files("rwcnet") / "weights" / SHIPPED_MODELS[name]))
    return path if path.is_file() else None


def resolve_model(model: str | Path | None, device: torch.device) -> tuple[RWCNet | None, dict, str]:
    """Load ``model`` (a shipped name, a path or ``None``); returns the network, its metadata and a note."""
    if model is None:
        return None, {}, "no network: instance optimisation alone"
    if str(model) in SHIPPED_MODELS:
        path = shipped_model_path(str(model))
        if path is None:
            return None, {}, f"no shipped '{model}' weights in this rwcnet yet: instance optimisation alone"
    else:
        path = Path(model)
    network, metadata = load_model(path, device=device)
    return network, metadata, f"network: {path.name} ({network.config.name})"


def working_grid(fixed: Image, spacing: float | list[float], orientation: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An axis-aligned grid in ``orientation`` (e.g. ``"LIA"``) at ``spacing`` mm covering the fixed image's box.

    Returns its voxel-to-RAS affine and shape.
    """
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    direction = np.zeros((3, 3))
    for axis, (ras_axis, sign) in enumerate(nib.orientations.axcodes2ornt(tuple(orientation))):
        direction[int(ras_axis), axis] = sign
    corners = np.array([[i, j, k, 1.0] for i in (0, fixed.shape[0] - 1) for j in (0, fixed.shape[1] - 1) for k in (0, fixed.shape[2] - 1)])
    points = (fixed.affine @ corners.T)[:3]
    projected = direction.T @ points  # mm along each working axis
    low, high = projected.min(axis=1), projected.max(axis=1)
    shape = tuple(int(np.ceil((h - l) / s - 1e-6)) + 1 for l, h, s in zip(low, high, spacing))
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = direction @ low
    return affine, shape  # type: ignore[return-value]


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
    model: str | Path | None = "brain",
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

    ``model`` is a shipped model name (``"brain"``), a model file, or
    ``None`` for instance optimisation alone (also used, with a note, when the
    shipped weights are absent). ``modality`` picks intensity normalisation
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
    if not same_grid(fixed_img, moving_img):
        notes.append(f"moving image resampled onto the fixed grid in physical space ({moving_img.shape} -> {fixed_img.shape})")
        moving_img = resample_image(moving_img, fixed_img, order=1)
        if masks[1] is not None:
            masks[1] = resample_image(masks[1], fixed_img, order=0)
    if modality == "ct" and masks[0] is None and masks[1] is None:
        from rwcnet.masks import lung_mask

        stage("lung masks")
        masks = [Image(lung_mask(img.array, img.spacing).astype(np.uint8), img.affine) for img in (fixed_img, moving_img)]
        notes.append("CT without masks: lung masks computed for instance optimisation")
    network, metadata, note = resolve_model(model, dev)
    notes.append("ConvexAdam (in-package baseline)" if method == "convexadam" else note)
    seconds["read"] = time.perf_counter() - start

    # the working grid: the model's orientation and spacing, or the fixed grid itself
    if network is not None and "orientation" in metadata:
        affine, shape = working_grid(fixed_img, metadata.get("spacing_mm", 1.0), metadata["orientation"])
        work_ref = Image(np.zeros(shape, np.float32), affine)
        on_fixed_grid = np.allclose(affine, fixed_img.affine, atol=1e-4) and tuple(shape) == fixed_img.shape
    else:
        work_ref, on_fixed_grid = fixed_img, True
    if not on_fixed_grid:
        notes.append(f"working grid {metadata['orientation']} {tuple(work_ref.shape)} at {metadata.get('spacing_mm', 1.0)} mm")
    intensities, intensity_note = intensity_mapping(metadata if network is not None else {}, modality, ct_range)
    if intensity_note:
        notes.append(intensity_note)
    images = []
    for img in (fixed_img, moving_img):
        on_work = img if on_fixed_grid else resample_image(img, work_ref, order=1)
        images.append(_tensor(intensities(on_work.array), dev))
    work_masks = [
        None if m is None else _tensor(m.array > 0 if on_fixed_grid else resample_image(m, work_ref, order=0).array > 0, dev)
        for m in masks
    ]

    field = torch.zeros(1, 3, *work_ref.shape, device=dev)
    if method == "convexadam":
        from rwcnet.convexadam import convex_adam

        t = time.perf_counter()
        field = convex_adam(
            images[0], images[1], preset=IO_PRESET[modality], io_iterations=io_iterations if io else 0,
            fixed_mask=work_masks[0], moving_mask=work_masks[1], progress=on_step, on_stage=stage,
        )
        seconds["convexadam"] = time.perf_counter() - t
    elif network is not None:
        stage("network")
        t = time.perf_counter()
        with torch.inference_mode():
            field = network(images[0], images[1]).field
        seconds["network"] = time.perf_counter() - t
        release_freed_memory()
    if io and method == "rwcnet":
        stage("instance optimisation")
        t = time.perf_counter()
        field = instance_optimise(
            images[0], images[1], field.clone(), preset=IO_PRESET[modality], iterations=io_iterations,
            fixed_mask=work_masks[0], moving_mask=work_masks[1], progress=on_step,
        )
        seconds["instance_optimisation"] = time.perf_counter() - t
    if refine and method == "rwcnet":
        stage("refinement")
        t = time.perf_counter()
        with torch.no_grad():
            warped_now = geometry.warp(images[1], field)
        metric, metric_note = choose_metric(refine_metric, modality, images[0], warped_now, work_masks[0], refinement.contrast_threshold)
        del warped_now
        notes.append(metric_note)
        field = refine_field(images[0], images[1], field, config=refinement, metric=metric, fixed_mask=work_masks[0],
                             moving_mask=work_masks[1], progress=on_step)
        seconds["refinement"] = time.perf_counter() - t
    stage("output")
    with torch.no_grad():
        if not on_fixed_grid:
            field = geometry.resample_field(
                field, torch.from_numpy(work_ref.affine), torch.from_numpy(fixed_img.affine), fixed_img.shape
            )
        moving_t = torch.from_numpy(np.ascontiguousarray(moving_img.array, dtype=np.float32))[None, None].to(dev)
        warped = geometry.warp(moving_t, field.to(torch.float32))
    seconds["total"] = time.perf_counter() - start
    return RegistrationResult(
        field=field[0].permute(1, 2, 3, 0).cpu().numpy().astype(np.float32),
        warped=warped[0, 0].cpu().numpy(),
        fixed=fixed_img,
        moving=moving_img,
        seconds=seconds,
        notes=notes,
    )
