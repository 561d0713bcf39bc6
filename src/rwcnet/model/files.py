"""Model files: one file per model, holding the weights, the network config and its metadata.

The metadata records what the model expects of its inputs (working spacing
and orientation, intensity normalisation, the ``modality`` it was trained on:
``mr`` or ``ct``) and how it was trained, so that ``register`` can prepare
images the same way and say when a model is used on another modality.
It is a :class:`rwcnet.model.metadata.ModelMetadata`, validated on load; files of format 1
(such as the first shipped ``brain.pt``) are read through its versioned reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from rwcnet.errors import InputError
from rwcnet.model.cascade import ReferenceRWCNet, RWCNet
from rwcnet.model.config import ModelConfig
from rwcnet.model.lapirn import LapIRN, LapIRNConfig
from rwcnet.model.presets import model_preset
from rwcnet.model.metadata import ModelMetadata
from rwcnet.outputs import atomic_output

FORMAT = "rwcnet-model"
FORMAT_VERSION = 2
#: Versions this rwcnet reads (1: flat metadata dict, see :mod:`rwcnet.model.metadata`).
READABLE_VERSIONS = (1, 2)


def build_model(spec: str | ModelConfig | LapIRNConfig | dict[str, Any]) -> RWCNet | LapIRN:
    """A fresh network from a preset name, a config, or a config's dict (``kind: lapirn`` selects LapIRN)."""
    if isinstance(spec, str):
        spec = model_preset(spec)
    elif isinstance(spec, dict):
        spec = LapIRNConfig.model_validate(spec) if spec.get("kind") == "lapirn" else ModelConfig.model_validate(spec)
    if isinstance(spec, LapIRNConfig):
        return LapIRN(spec)
    return ReferenceRWCNet(spec) if spec.reference_compat else RWCNet(spec)


def save_model(path: str | Path, model: RWCNet | LapIRN, metadata: ModelMetadata | None = None) -> None:
    """Write ``model`` with its config and ``metadata`` (format :data:`FORMAT_VERSION`) to ``path`` atomically."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.model_dump(),
        "metadata": (metadata or ModelMetadata()).to_dict(),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()},
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[RWCNet | LapIRN, ModelMetadata]:
    """Read a model file of a readable format version; returns the network (eval mode) and its validated metadata.

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
    if version not in READABLE_VERSIONS:
        raise InputError(f"{path}: model file format version {version}, this rwcnet reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    try:
        model = build_model(dict(payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as error:
        raise InputError(f"{path}: model config or weights are incompatible with this rwcnet: {error}") from error
    try:
        metadata = ModelMetadata.read(payload.get("metadata"), version)
    except (TypeError, ValueError) as error:
        raise InputError(f"{path}: invalid model metadata: {error}") from error
    return model.to(device).eval(), metadata


def average_models(paths: Sequence[str | Path], weights: Sequence[float] | None = None
                   ) -> tuple[RWCNet | LapIRN, ModelMetadata]:
    """The weighted average of the parameters of model files of one network config (a "model soup").

    Meant for models fine-tuned from one another, such as a model and the
    fine-tuned model that started from it (weight-space interpolation between
    them). ``weights`` (positive, default equal) are normalised to sum to one;
    integer buffers are taken from the first file. The metadata's input fields
    must agree; its ``training`` keeps every input's record, each with its
    file name and weight, under ``"average_of"``, and the keys all inputs record
    alike at the top. Raises :class:`InputError` naming the file that differs.
    """
    if len(paths) < 2:
        raise InputError("averaging needs at least two model files")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths) or min(weights) <= 0:
        raise InputError(f"averaging needs one positive weight per model file, got {weights} for {len(paths)} files")
    total = sum(weights)
    weights = [w / total for w in weights]
    loaded = [load_model(path) for path in paths]
    first_model, first_metadata = loaded[0]
    inputs = {name: value for name, value in first_metadata.to_dict().items() if name != "training"}
    for path, (model, metadata) in zip(paths[1:], loaded[1:]):
        if model.config != first_model.config:
            raise InputError(f"{path}: its network config differs from {paths[0]}'s, so the weights cannot be averaged")
        differing = sorted(name for name, value in metadata.to_dict().items() if name != "training" and value != inputs[name])
        if differing:
            raise InputError(f"{path}: its {', '.join(differing)} differ from {paths[0]}'s")
    states = [model.state_dict() for model, _ in loaded]
    averaged = {name: sum(w * state[name] for w, state in zip(weights, states)) if tensor.is_floating_point() else tensor
                for name, tensor in states[0].items()}
    first_model.load_state_dict(averaged)
    records = [metadata.training for _, metadata in loaded]
    shared = {key: value for key, value in records[0].items() if all(record.get(key) == value for record in records)}
    training = shared | {"average_of": [{**record, "file": str(path), "weight": w}
                                        for path, w, record in zip(paths, weights, records)]}
    return first_model, ModelMetadata(**inputs, training=training)
