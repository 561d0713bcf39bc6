"""The RWCNet network: encoders, correlation, update block, recurrent stage, cascade, presets, model files."""

from rwcnet.model.cascade import CascadeOutput, RWCNet, StageResult
from rwcnet.model.config import ModelConfig, StageConfig, model_preset
from rwcnet.model.files import load_model, save_model

__all__ = [
    "CascadeOutput",
    "ModelConfig",
    "RWCNet",
    "StageConfig",
    "StageResult",
    "load_model",
    "model_preset",
    "save_model",
]
