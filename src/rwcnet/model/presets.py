"""Every network preset by name: RWCNet's (:mod:`rwcnet.model.config`) and the LapIRN comparator's
(:mod:`rwcnet.model.lapirn`), in one :class:`rwcnet.presets.Presets`. Kept apart from both so that
neither imports the other."""

from __future__ import annotations

from rwcnet.model.config import RWCNET_PRESETS, ModelConfig, rwcnet_preset
from rwcnet.model.lapirn import LAPIRN_PRESETS, LapIRNConfig, lapirn_preset
from rwcnet.presets import Presets, UnknownPreset

__all__ = ["PRESETS", "model_preset"]

#: The named network presets of both architectures (RWCNet's ablations of other bases are built by name).
PRESETS: Presets[ModelConfig | LapIRNConfig] = Presets.merged("model", RWCNET_PRESETS, LAPIRN_PRESETS)


def model_preset(name: str) -> ModelConfig | LapIRNConfig:
    """A network preset by name: one of :data:`PRESETS` (``reference``, ``cpu``, the ablations,
    ``lapirn``, ``lapirn-cpu``), ``<base>:<ablation>`` or ``steps=N``; an unknown name is a ``ValueError``."""
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith("lapirn"):
        return lapirn_preset(name)
    try:
        return rwcnet_preset(name)
    except UnknownPreset:
        raise UnknownPreset(f"unknown model preset {name!r}; use one of {sorted(PRESETS)}, "
                            "<base>:<ablation> (base reference or cpu) or steps=N") from None
