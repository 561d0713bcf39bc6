"""The built-in methods after the network: instance optimisation, refinement, fold repair and the ConvexAdam baseline."""

from __future__ import annotations

import torch

from rwcnet import geometry
from rwcnet.instance_optimisation import instance_optimise
from rwcnet.pipeline.instrument import Instrumentation
from rwcnet.pipeline.method import Method, Settings, register_method
from rwcnet.pipeline.pair import PreparedPair
from rwcnet.refine import choose_metric, refine

Tensor = torch.Tensor


class InstanceOptimisation(Method):
    """Adam on MIND-SSC features (:mod:`rwcnet.instance_optimisation`), starting from the field before it."""

    stage, key = "instance optimisation", "instance_optimisation"

    def __init__(self, preset: str, iterations: int | None) -> None:
        self.preset, self.iterations = preset, iterations

    def run(self, pair: PreparedPair, init: Tensor | None, record: Instrumentation) -> Tensor:
        return instance_optimise(
            pair.fixed_tensor, pair.moving_tensor, init, preset=self.preset, iterations=self.iterations,
            fixed_mask=pair.fixed_mask_tensor, moving_mask=pair.moving_mask_tensor, progress=record.step,
        )


class Refinement(Method):
    """Greedy-style refinement to full resolution (:mod:`rwcnet.refine`), its metric chosen on the pair as warped so far."""

    stage = key = "refinement"

    def __init__(self, settings: Settings) -> None:
        self.config, self.metric, self.modality = settings.refinement, settings.refine_metric, settings.modality

    def run(self, pair: PreparedPair, init: Tensor | None, record: Instrumentation) -> Tensor:
        fixed, moving = pair.fixed_tensor, pair.moving_tensor
        field = torch.zeros(1, 3, *pair.shape, device=fixed.device) if init is None else init
        with torch.no_grad():
            warped_now = geometry.warp(moving, field)
        metric, note = choose_metric(self.metric, self.modality, fixed, warped_now, pair.fixed_mask_tensor,
                                     self.config.contrast_threshold)
        del warped_now
        record.notes.append(note)
        source, source_mask, to_source = pair.moving_source()
        return refine(fixed, source, field, config=self.config, metric=metric, fixed_mask=pair.fixed_mask_tensor,
                      moving_mask=source_mask, moving_map=to_source, progress=record.step)


class FoldRepair(Method):
    """The field smoothed locally where ``x + u(x)`` folds (:func:`rwcnet.geometry.repair_folds`); a note says how much."""

    stage, key = "fold repair", "fold_repair"

    def run(self, pair: PreparedPair, init: Tensor | None, record: Instrumentation) -> Tensor | None:
        if init is None:
            return None
        field, report = geometry.repair_folds(init)
        share = 100.0 / init[0, 0].numel()
        if report.folded_before:
            record.notes.append(
                f"fold repair: {report.folded_before} voxels ({report.folded_before * share:.3f} %) with a Jacobian "
                f"determinant <= {geometry.FOLD_THRESHOLD} smoothed locally in {report.passes} passes; {report.folded_after} left")
        if report.folded_after:
            record.warnings.append(f"fold repair left {report.folded_after} voxels ({report.folded_after * share:.3f} %) "
                                   f"with a Jacobian determinant <= {geometry.FOLD_THRESHOLD}")
        return field


class ConvexAdam(Method):
    """The in-package ConvexAdam baseline (:mod:`rwcnet.baselines.convexadam`); it announces its own stages.

    Its discrete step cannot start from a field: given one, it registers the moving image
    sampled through it and returns the composition.
    """

    key = "convexadam"

    def __init__(self, preset: str, io_iterations: int | None) -> None:
        self.preset, self.io_iterations = preset, io_iterations

    def run(self, pair: PreparedPair, init: Tensor | None, record: Instrumentation) -> Tensor:
        from rwcnet.baselines.convexadam import convex_adam

        moving, moving_mask = pair.moving_through(init)
        residual = convex_adam(
            pair.fixed_tensor, moving, preset=self.preset, io_iterations=self.io_iterations,
            fixed_mask=pair.fixed_mask_tensor, moving_mask=moving_mask, progress=record.step, on_stage=record.stage,
        )
        return residual if init is None else geometry.compose(residual, init)


@register_method("instance_optimisation")
def build_instance_optimisation(settings: Settings, record: Instrumentation) -> InstanceOptimisation | None:
    return InstanceOptimisation(settings.preset, settings.io_iterations) if settings.instance_optimisation else None


@register_method("refinement")
def build_refinement(settings: Settings, record: Instrumentation) -> Refinement | None:
    return Refinement(settings) if settings.refine else None


@register_method("fold_repair")
def build_fold_repair(settings: Settings, record: Instrumentation) -> FoldRepair | None:
    return FoldRepair() if settings.repair_folds else None


@register_method("convexadam")
def build_convexadam(settings: Settings, record: Instrumentation) -> ConvexAdam:
    record.notes.append("ConvexAdam (in-package baseline)")
    return ConvexAdam(settings.preset, settings.io_iterations if settings.io is not False else 0)
