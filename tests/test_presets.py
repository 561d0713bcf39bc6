"""The one preset-registry shape: lookup, overrides, validation and the error for an unknown name, alike for every concern."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rwcnet.baselines.convexadam import CONVEXADAM_PRESETS
from rwcnet.instance_optimisation import IO_PRESETS
from rwcnet.losses import LOSS_PRESETS
from rwcnet.presets import Presets
from rwcnet.refine import REFINE_PRESETS
from rwcnet.training.config import TRAINING_PRESETS


@pytest.mark.parametrize("presets", [IO_PRESETS, REFINE_PRESETS, CONVEXADAM_PRESETS, LOSS_PRESETS, TRAINING_PRESETS])
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
