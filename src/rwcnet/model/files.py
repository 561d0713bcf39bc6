"""Model files: one file per model, holding the weights, the network config and its metadata.

The metadata records what the model expects of its inputs (working spacing
and orientation, intensity normalisation) and how it was trained, so that
``register`` can prepare images the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rwcnet.errors import InputError
from rwcnet.model.cascade import RWCNet
from rwcnet.model.config import ModelConfig, model_preset
from rwcnet.model.lapirn import LapIRN, LapIRNConfig
from rwcnet.outputs import atomic_output

FORMAT = "rwcnet-model"
FORMAT_VERSION = 1


def build_model(spec: str | ModelConfig | LapIRNConfig | dict[str, Any]) -> RWCNet | LapIRN:
    """A fresh network from a preset name, a config, or a config's dict (``kind: lapirn`` selects LapIRN)."""
    if isinstance(spec, str):
        spec = model_preset(spec)
    elif isinstance(spec, dict):
        spec = LapIRNConfig.model_validate(spec) if spec.get("kind") == "lapirn" else ModelConfig.model_validate(spec)
    return LapIRN(spec) if isinstance(spec, LapIRNConfig) else RWCNet(spec)


def save_model(path: str | Path, model: RWCNet | LapIRN, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model`` with its config and ``metadata`` to ``path`` atomically."""
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
    return model.to(device).eval(), payload.get("metadata", {})
