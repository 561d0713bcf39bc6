"""The network method: a model file (RWCNet, or a LapIRN comparator) run on its own working grid.

The network sees both images on its working grid (the model's orientation, at
:func:`network_spacing`: the model's spacing, never finer than the fixed
image); when that is not the fixed grid, the images are resampled onto it and
the field is mapped back with :func:`rwcnet.geometry.resample_field` (vectors
rotated and rescaled). It cannot start from a field: given one, it registers
the moving image sampled through it and returns the composition.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rwcnet import geometry
from rwcnet.geometry.grids import working_grid, orientation_matrix
from rwcnet.intensity import normalise, scale_intensity
from rwcnet.geometry.resample import resample_image
from rwcnet.data.formats import Image
from rwcnet.model import RWCNet, load_model
from rwcnet.model.metadata import ModelMetadata
from rwcnet.pipeline.instrument import Instrumentation
from rwcnet.pipeline.method import Method, Settings, register_method
from rwcnet.pipeline.pair import PreparedPair, volume_tensor
from rwcnet.runtime import release_freed_memory

Tensor = torch.Tensor

SHIPPED_MODELS = {"brain": "brain.pt", "lung": "lung.pt"}
#: The model ``model="default"`` means for each modality: the MR-trained brain model for MR, the lung model
#: (breathing motion of thorax CT, trained on one CT: see its card) for CT.
DEFAULT_MODELS = {"mr": "brain", "ct": "lung"}


def shipped_model_path(name: str) -> Path | None:
    """Path of a model shipped inside the package, or ``None`` when it is not there."""
    path = Path(str(resources.files("rwcnet") / "weights" / SHIPPED_MODELS[name]))
    return path if path.is_file() else None


def resolve_model(
    model: str | Path | None, device: torch.device, modality: str = "mr"
) -> tuple[RWCNet | None, ModelMetadata, str]:
    """Load ``model`` (``"default"``, a shipped name, a path or ``None``); returns the network, its metadata and a note.

    ``"default"`` is :data:`DEFAULT_MODELS` of ``modality``.
    """
    if model is None:
        return None, ModelMetadata(), "no network: instance optimisation alone"
    if str(model) == "default":
        model = DEFAULT_MODELS[modality]
    if str(model) in SHIPPED_MODELS:
        path = shipped_model_path(str(model))
        if path is None:
            return None, ModelMetadata(), f"no shipped '{model}' weights in this rwcnet yet: instance optimisation alone"
    else:
        path = Path(model)
    network, metadata = load_model(path, device=device)
    return network, metadata, f"network: {path.name} ({network.config.name}, trained on {metadata.modality.upper()})"


def modality_warning(metadata: ModelMetadata, modality: str, name: str) -> str | None:
    """The one-line warning for a model trained on another modality than ``modality`` (None when they match)."""
    trained = metadata.modality
    if trained == modality:
        return None
    return (f"model {name} was trained on {trained.upper()} images and is used here on {modality.upper()} "
            f"(--modality {modality}); expect lower accuracy than on {trained.upper()}")


def network_spacing(fixed: Image, spacing: float | list[float], orientation: str) -> np.ndarray:
    """The network's working spacing (mm, per axis of ``orientation``): the model's, or the fixed image's where coarser.

    Along each working axis the fixed image's spacing is that of its array axis closest
    in direction, so a 1.5 mm CT is not upsampled to a 1 mm model grid.
    """
    model = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,))
    columns = fixed.affine[:3, :3]
    voxel_mm = np.linalg.norm(columns, axis=0)
    alignment = np.abs(orientation_matrix(orientation).T @ (columns / voxel_mm))  # working axis x fixed axis
    return np.maximum(model, voxel_mm[alignment.argmax(axis=1)])


def intensity_mapping(metadata: ModelMetadata, modality: str, ct_range: str) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """How to normalise images for a model: as it was trained, if its file records a range; else by ``modality``.

    ``metadata.normalisation`` is the training config's ``{kind, low, high}``: ``range`` maps
    ``low..high`` to 0..1, ``window`` also clips to [0, 1], ``none`` (or no record) means the images
    were used as stored, and the modality's preset applies. Returns the mapping and a note
    (empty when the modality's preset is used).
    """
    trained = metadata.normalisation or {}
    kind = trained.get("kind", "none")
    if kind in ("range", "window"):
        low, high = float(trained["low"]), float(trained["high"])
        return (
            lambda array: scale_intensity(array, low, high, clip=kind == "window"),
            f"intensities normalised as the model was trained: {kind} {low:g}..{high:g}",
        )
    return (lambda array: normalise(array, modality, ct_range=ct_range)), ""


class NetworkMethod(Method):
    """A trained network's field for the pair, mapped from its working grid to the fixed grid."""

    stage = key = "network"

    def __init__(self, network: RWCNet, metadata: ModelMetadata, settings: Settings) -> None:
        self.network, self.metadata = network, metadata
        self.intensities = intensity_mapping(metadata, settings.modality, settings.ct_range)

    def run(self, pair: PreparedPair, init: Tensor | None, record: Instrumentation) -> Tensor:
        moving = pair.raw_moving_through(init)
        residual = self.field(pair.fixed, moving, pair.intensities, record.notes)
        release_freed_memory()
        return residual if init is None else geometry.compose(residual, init)

    def field(self, fixed: Image, moving: Image, intensities: Callable[[np.ndarray], np.ndarray],
              notes: list[str]) -> Tensor:
        """The network's field ``(1, 3, *fixed.shape)`` in fixed voxels; ``moving`` is on the fixed grid."""
        metadata, on_fixed_grid, work = self.metadata, True, fixed
        if metadata.orientation is not None:
            spacing = network_spacing(fixed, metadata.spacing_mm or 1.0, metadata.orientation)
            affine, shape = working_grid(fixed, spacing, metadata.orientation)
            on_fixed_grid = tuple(shape) == fixed.shape and bool(np.allclose(affine, fixed.affine, atol=1e-4))
            if not on_fixed_grid:
                work = Image(np.zeros(shape, np.float32), affine)
                notes.append(f"network working grid {metadata.orientation} {tuple(shape)} at "
                             f"{'x'.join(f'{s:g}' for s in spacing)} mm (IO and output on the fixed grid)")
        device = next(self.network.parameters()).device
        inputs = [volume_tensor(intensities(img.array if on_fixed_grid else resample_image(img, work, order=1).array), device)
                  for img in (fixed, moving)]
        with torch.inference_mode():
            field = self.network(inputs[0], inputs[1]).field
        del inputs
        if on_fixed_grid:
            return field.clone()
        with torch.no_grad():
            return geometry.resample_field(field, torch.from_numpy(work.affine), torch.from_numpy(fixed.affine), fixed.shape)


@register_method("network")
def build_network(settings: Settings, record: Instrumentation) -> NetworkMethod | None:
    """The network of ``settings.model`` (``None`` when there is none: a note says so)."""
    network, metadata, note = resolve_model(settings.model, settings.device, settings.modality)
    record.notes.append(note)
    if network is None:
        return None
    warning = modality_warning(metadata, settings.modality, Path(str(settings.model)).name)
    if warning:
        record.warnings.append(warning)
    return NetworkMethod(network, metadata, settings)
