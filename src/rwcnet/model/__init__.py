"""The RWCNet network: encoders, correlation, update block, recurrent stage, cascade, presets, model files."""

from rwcnet.model.cascade import CascadeOutput, RWCNet, StageResult
from rwcnet.model.config import ModelConfig, StageConfig
from rwcnet.model.files import load_model, save_model
from rwcnet.model.metadata import ModelMetadata
from rwcnet.model.presets import model_preset

__all__ = [
    "CascadeOutput",
    "ModelConfig",
    "ModelMetadata",
    "RWCNet",
    "StageConfig",
    "StageResult",
    "load_model",
    "model_preset",
    "save_model",
]
