"""The pipeline's method registry: a method added from outside runs through register(), alone and in a chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwcnet import geometry, pipeline
from rwcnet.errors import InputError
from rwcnet.data.formats import Image
from rwcnet.pipeline import Method, register_method
from rwcnet.register import register


class BruteForceTranslation(Method):
    """A toy method that cannot start from a field: the integer shift in [-3, 3]³ with the least SSD."""

    stage, key = "toy translation", "toy_translation"

    def run(self, pair, init, record):
        fixed = pair.fixed_tensor
        moving, _ = pair.moving_through(init)
        best, best_cost = None, float("inf")
        shifts = [(a, b, c) for a in range(-3, 4) for b in range(-3, 4) for c in range(-3, 4)]
        for done, shift in enumerate(shifts, 1):
            residual = torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *pair.shape)
            cost = float(((geometry.warp(moving, residual) - fixed)[..., 4:-4, 4:-4, 4:-4] ** 2).mean())
            if cost < best_cost:
                best, best_cost = residual.clone(), cost
            record.step(done, len(shifts), cost)
        return best if init is None else geometry.compose(best, init)


@pytest.fixture()
def toy_method(monkeypatch):
    monkeypatch.setattr(pipeline.method, "METHODS", dict(pipeline.METHODS))  # undone after the test
    register_method("toy")(lambda settings, record: BruteForceTranslation())


def smooth_volume(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *[n // 4 for n in shape], generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def test_a_registered_method_runs_through_register_and_reports_progress(toy_method):
    fixed = smooth_volume((24, 24, 24), 0)
    moving = np.roll(fixed, 2, axis=1)  # moving(x + 2 e_y) = fixed(x)
    stages, steps = [], []
    result = register(Image(fixed, np.eye(4)), Image(moving, np.eye(4)), method="toy", device="cpu",
                      on_stage=stages.append, on_step=lambda done, total, value: steps.append((done, total)))
    np.testing.assert_array_equal(result.field[..., 1], 2.0)
    np.testing.assert_array_equal(result.field[..., [0, 2]], 0.0)
    np.testing.assert_allclose(result.warped[:, :-2], fixed[:, :-2], atol=1e-6)  # exact where no border is repeated
    assert stages == ["toy translation", "output"] and steps[-1] == (343, 343)
    assert {"read", "toy_translation", "total"} <= set(result.seconds) and result.peak_gb["toy_translation"] > 0


def test_a_method_that_cannot_start_from_a_field_composes_with_the_one_before(toy_method):
    fixed = smooth_volume((24, 24, 24), 1)
    moving = np.roll(fixed, 2, axis=1)
    # instance optimisation first, then the toy on the moving image sampled through its field: the total stays a shift of 2
    result = register(Image(fixed, np.eye(4)), Image(moving, np.eye(4)), method=("instance_optimisation", "toy"),
                      model=None, io_iterations=30, device="cpu")
    assert list(result.seconds)[:3] == ["read", "instance_optimisation", "toy_translation"]
    interior = result.field[6:-6, 6:-6, 6:-6]
    assert abs(np.median(interior[..., 1]) - 2.0) < 0.25 and np.abs(np.median(interior[..., [0, 2]], axis=(0, 1, 2))).max() < 0.25


def test_an_unknown_method_is_an_input_error_naming_the_choices():
    image = Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(InputError, match="rwcnet, convexadam"):
        register(image, image, method="nonsense", device="cpu")


class FoldingField(Method):
    """A toy method returning a hand-made field that folds around one point (det = 1 - 2.5 there)."""

    stage, key = "toy fold", "toy_fold"

    def run(self, pair, init, record):
        grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in pair.shape], indexing="ij"))
        offset = grid - torch.tensor([16.0, 12.0, 14.0]).view(3, 1, 1, 1)
        field = torch.zeros(1, 3, *pair.shape)
        field[0, 0] = -2.5 * offset[0] * torch.exp(-offset.square().sum(0) / 18.0)
        return field


@pytest.mark.parametrize("repair", [True, False])
def test_the_fold_repair_step_ends_a_chain_and_can_be_switched_off(monkeypatch, repair):
    from rwcnet.evaluation.metrics import folding_fraction, jacobian_det

    monkeypatch.setattr(pipeline.method, "METHODS", dict(pipeline.METHODS))
    register_method("toy_fold")(lambda settings, record: FoldingField())
    volume = Image(smooth_volume((32, 32, 32), 0), np.eye(4))
    result = register(volume, volume, method=("toy_fold", "fold_repair"), device="cpu", repair_folds=repair)
    folds = folding_fraction(jacobian_det(result.field))
    if repair:
        assert folds == 0 and "fold_repair" in result.seconds
        assert any(note.startswith("fold repair: ") and note.endswith("; 0 left") for note in result.notes)
    else:
        assert folds > 0 and "fold_repair" not in result.seconds
    assert "fold_repair" in pipeline.CHAINS["rwcnet"][-1:]


@pytest.mark.parametrize("modality, io, runs_io", [("mr", None, True), ("ct", None, False), ("ct", True, True),
                                                   ("mr", False, False)])
def test_instance_optimisation_is_the_modality_choice_unless_asked(modality, io, runs_io):
    from rwcnet.pipeline.instrument import Instrumentation
    from rwcnet.pipeline.method import Settings, build_chain

    settings = Settings.checked(model=None, io=io, io_iterations=None, modality=modality, ct_range="window",
                                refine=True, refine_metric="auto", refine_iterations=None, device=torch.device("cpu"))
    record = Instrumentation(None, None, torch.device("cpu"))
    keys = [step.key for step in build_chain("rwcnet", settings, record)]
    assert ("instance_optimisation" in keys) == runs_io and "refinement" in keys
    convexadam = build_chain("convexadam", settings, record)[0]  # its Adam stage runs unless io is False
    assert (convexadam.io_iterations != 0) == (io is not False)
