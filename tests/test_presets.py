"""The one preset-registry shape: lookup, overrides, validation and the error for an unknown name, alike for every concern."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rwcnet.baselines.convexadam import CONVEXADAM_PRESETS
from rwcnet.instance_optimisation import IO_PRESETS
from rwcnet.losses import LOSS_PRESETS
from rwcnet.model.config import RWCNET_PRESETS, ModelConfig
from rwcnet.model.lapirn import LAPIRN_PRESETS, LapIRNConfig
from rwcnet.model.presets import PRESETS as MODEL_PRESETS, model_preset
from rwcnet.presets import Presets
from rwcnet.refine import REFINE_PRESETS
from rwcnet.training.config import TRAINING_PRESETS


@pytest.mark.parametrize("presets", [IO_PRESETS, REFINE_PRESETS, CONVEXADAM_PRESETS, LOSS_PRESETS, TRAINING_PRESETS,
                                     RWCNET_PRESETS, LAPIRN_PRESETS, MODEL_PRESETS])
def test_every_registry_has_the_same_shape(presets):
    assert isinstance(presets, Presets) and len(presets) >= 2
    for name in presets:
        assert name in presets and presets.resolve(name) == presets[name]
    with pytest.raises(ValueError, match=f"unknown {presets.concern} preset 'nonsense'; use one of"):
        presets["nonsense"]
    assert "nonsense" not in presets


def test_resolve_applies_only_given_overrides_and_validates_them():
    brain = IO_PRESETS["brain"]
    changed = IO_PRESETS.resolve("brain", iterations=7, lam=None)
    assert changed.iterations == 7 and changed.lam == brain.lam
    assert IO_PRESETS.resolve(changed) is changed
    with pytest.raises(ValidationError):
        IO_PRESETS.resolve("brain", iterations=-1)


def test_model_presets_hold_both_architectures_and_build_fresh_configs():
    assert set(MODEL_PRESETS) == set(RWCNET_PRESETS) | set(LAPIRN_PRESETS)
    assert {"reference", "cpu", "lapirn", "lapirn-cpu"} <= set(MODEL_PRESETS)
    assert isinstance(MODEL_PRESETS["cpu"], ModelConfig) and isinstance(MODEL_PRESETS["lapirn-cpu"], LapIRNConfig)
    first = MODEL_PRESETS["cpu"]
    first.dropout = 0.3  # a model config is mutable: a lookup must not hand out a shared instance
    assert MODEL_PRESETS["cpu"].dropout == 0.1 and MODEL_PRESETS["cpu"] is not MODEL_PRESETS["cpu"]
    assert MODEL_PRESETS.resolve("cpu", dropout=0.2).dropout == 0.2
    with pytest.raises(ValidationError):
        MODEL_PRESETS.resolve("cpu", dropout=1.5)


def test_model_preset_builds_ablations_by_name_and_refuses_unknown_names():
    assert model_preset("cpu").model_dump() == MODEL_PRESETS["cpu"].model_dump()
    steps = model_preset("cpu:steps=3")
    assert steps.name == "cpu:steps=3" and [s.iterations for s in steps.stages] == [3, 3]
    assert [s.iterations for s in model_preset("steps=5").stages] == [5, 5, 5]
    assert model_preset("steps=2").model_dump() == MODEL_PRESETS["steps=2"].model_dump()
    with pytest.raises(ValueError, match=r"unknown model preset 'gpu:steps=2'; use one of \['cpu', 'lapirn'"):
        model_preset("gpu:steps=2")
    with pytest.raises(ValueError, match="unknown model preset 'nonsense'"):
        model_preset("nonsense")
    with pytest.raises(ValueError, match="unknown ablation 'bogus'"):
        model_preset("cpu:bogus")
    with pytest.raises(ValueError, match=r"unknown LapIRN preset 'lapirn-gpu'; use one of \['lapirn', 'lapirn-cpu'\]"):
        model_preset("lapirn-gpu")
