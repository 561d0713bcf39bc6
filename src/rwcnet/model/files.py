"""Model files: one file per model, holding the weights, the network config and its metadata.

The metadata records what the model expects of its inputs (working spacing
and orientation, intensity normalisation, the ``modality`` it was trained on:
``mr`` or ``ct``) and how it was trained, so that ``register`` can prepare
images the same way and say when a model is used on another modality.
A file written before ``modality`` was recorded (such as the first shipped
``brain.pt``) holds MR weights and reads as ``mr``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rwcnet.errors import InputError
from rwcnet.model.cascade import RWCNet
from rwcnet.model.config import ModelConfig
from rwcnet.model.lapirn import LapIRN, LapIRNConfig
from rwcnet.model.presets import model_preset
from rwcnet.outputs import atomic_output

FORMAT = "rwcnet-model"
FORMAT_VERSION = 1
MODALITIES = ("mr", "ct")
#: The modality of a model file whose metadata does not record one (files from before it was recorded).
DEFAULT_MODALITY = "mr"


def build_model(spec: str | ModelConfig | LapIRNConfig | dict[str, Any]) -> RWCNet | LapIRN:
    """A fresh network from a preset name, a config, or a config's dict (``kind: lapirn`` selects LapIRN)."""
    if isinstance(spec, str):
        spec = model_preset(spec)
    elif isinstance(spec, dict):
        spec = LapIRNConfig.model_validate(spec) if spec.get("kind") == "lapirn" else ModelConfig.model_validate(spec)
    return LapIRN(spec) if isinstance(spec, LapIRNConfig) else RWCNet(spec)


def save_model(path: str | Path, model: RWCNet | LapIRN, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` with its config and ``metadata`` to ``path`` atomically.

    ``metadata["modality"]``, when given, must be one of :data:`MODALITIES`.
    """
    modality = (metadata or {}).get("modality")
    if modality is not None and modality not in MODALITIES:
        raise ValueError(f"model modality must be one of {MODALITIES}, not {modality!r}")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.model_dump(),
        "metadata": dict(metadata or {}),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[RWCNet | LapIRN, dict[str, Any]]:
    """Read a model file; returns the network (eval mode) and its metadata.

    The metadata always has ``modality`` (``mr`` when the file does not record it).

    Raises :class:`InputError` naming the file when it is missing, not a
    model file, of another format version, or its weights do not fit its config.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a corrupt file
        raise InputError(f"{path}: not a readable rwcnet model file ({error.__class__.__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not an rwcnet model file")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: model file format version {version}, this rwcnet reads version {FORMAT_VERSION}")
    try:
        model = build_model(dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as error:
        raise InputError(f"{path}: model config or weights are incompatible with this rwcnet: {error}") from error
    metadata = dict(payload.get("metadata") or {})
    metadata.setdefault("modality", DEFAULT_MODALITY)
    if metadata["modality"] not in MODALITIES:
        raise InputError(f"{path}: unknown model modality {metadata['modality']!r} (expected one of {MODALITIES})")
    return model.to(device).eval(), metadata
