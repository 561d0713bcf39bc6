"""Every network preset by name: RWCNet's (:mod:`rwcnet.model.config`) and the LapIRN comparator's
(:mod:`rwcnet.model.lapirn`). Kept apart from both so that neither imports the other."""

from __future__ import annotations

from rwcnet.model.config import PRESETS, ModelConfig, rwcnet_preset
from rwcnet.model.lapirn import LapIRNConfig, lapirn_preset

__all__ = ["PRESETS", "model_preset"]


def model_preset(name: str) -> ModelConfig | LapIRNConfig:
    """A network preset by name: ``reference``, ``cpu``, an ablation, ``<base>:<ablation>``, or the
    LapIRN comparator's ``lapirn``/``lapirn-cpu`` (a :class:`~rwcnet.model.lapirn.LapIRNConfig`)."""
    return lapirn_preset(name) if name.startswith("lapirn") else rwcnet_preset(name)
