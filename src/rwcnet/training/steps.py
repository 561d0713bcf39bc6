"""One training sample's loss, validation on held-out pairs, and the final report on the real validation pairs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rwcnet import geometry

from rwcnet.evaluation import metrics
from rwcnet.geometry.layout import field_array
from rwcnet.data.formats import read_image, read_keypoints
from rwcnet.training.label_dice import fixed_onehot, hard_dice, soft_dice, warp_onehot
from rwcnet.losses import gradient_regulariser, sequence_loss, total_loss
from rwcnet.model import RWCNet
from rwcnet.training.config import PhaseConfig, TrainingConfig
from rwcnet.training.data import Sample, TrainingData, normalise


def _box(origin, shape) -> tuple[slice, slice, slice, slice, slice]:
    return (slice(None), slice(None), *(slice(o, o + n) for o, n in zip(origin, shape)))


def endpoint_error(field: torch.Tensor, truth: torch.Tensor, spacing, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean endpoint error in mm between two voxel fields ``(B, 3, X, Y, Z)`` with voxel size ``spacing`` (mm), inside ``mask``."""
    scale = torch.as_tensor(list(spacing), dtype=field.dtype, device=field.device).view(1, 3, 1, 1, 1)
    error = ((field - truth) * scale).norm(dim=1, keepdim=True)
    if mask is None:
        return error.mean()
    weights = mask.to(error.dtype)
    return (error * weights).sum() / weights.sum().clamp_min(1.0)


def batch_label_pairs(samples: list[Sample]) -> list[tuple[Sample, int]]:
    """The step's samples with its label-map pairs of one shape stacked into one batch: ``(sample, count)`` each.

    A label pair's loss is already a mean over the batch (soft Dice per sample, then averaged; the
    smoothness term over equal-sized fields), so one forward pass of the stack gives the mean of the
    single losses (dropout aside: the stack uses its first sample's seed), and at batch 1 the
    convolutions of a 24³ grid reach PyTorch's fast CPU kernels (``docs/training.md``). Other
    samples, and label pairs of another shape, stay as they are, each with count 1.
    """
    groups: dict[tuple, list[Sample]] = {}
    result: list[tuple[Sample, int]] = []
    for sample in samples:
        if sample.fixed_onehot is None or sample.region is not None:
            result.append((sample, 1))
            continue
        shape = (tuple(sample.fixed.shape), tuple(sample.fixed_onehot.shape), sample.label_factor, sample.spacing)
        groups.setdefault(shape, []).append(sample)
    for group in groups.values():
        if len(group) == 1:
            result.append((group[0], 1))
            continue
        first = group[0]
        stacked = Sample(key="+".join(s.key for s in group), spacing=first.spacing, seed=first.seed,
                         fixed=torch.cat([s.fixed for s in group]), moving=torch.cat([s.moving for s in group]),
                         fixed_onehot=torch.cat([s.fixed_onehot for s in group]),
                         moving_onehot=torch.cat([s.moving_onehot for s in group]), label_factor=first.label_factor)
        result.append((stacked, len(group)))
    return result


def sample_loss(net: torch.nn.Module, config: TrainingConfig, phase: PhaseConfig, sample: Sample,
                device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one sample for a phase: ``total_loss`` of the trained stage's fields (+ supervised endpoint error)."""
    stage = phase.stage - 1
    model: RWCNet = net.module if hasattr(net, "module") else net  # type: ignore[assignment]
    factor = model.config.stages[stage].downsample
    fixed, moving = sample.fixed.to(device), sample.moving.to(device)
    torch.manual_seed(sample.seed)  # dropout masks depend on the sample only
    out = net(fixed, moving, num_stages=stage + 1, sequence=True, region=sample.region)
    result = out.stages[stage]
    extra: dict[str, Any] = {}
    truth = None if sample.truth is None else sample.truth.to(device)
    if phase.loss_grid == "stage":
        grid = [n // factor for n in fixed.shape[2:]]
        origin = result.origin
        box = _box(origin, result.field.shape[2:])
        fields = result.sequence
        fixed_t = geometry.resize_volume(fixed, grid)[box]
        moving_t = geometry.resize_volume(moving, grid)
        spacing = [s * factor for s in sample.spacing]
        truth_t = None if truth is None else geometry.resize_field(truth, grid)[box]
    else:
        origin, shape = out.origin, out.field.shape[2:]
        box = _box(origin, shape)
        fields = [geometry.resize_field(f, shape) for f in result.sequence[:-1]] + [out.field]
        fixed_t, moving_t, spacing = fixed[box], moving, list(sample.spacing)
        truth_t = None if truth is None else truth[box]
        if sample.fixed_labels is not None and sample.moving_labels is not None:
            extra["fixed_labels"] = sample.fixed_labels.to(device)[box]
            extra["moving_labels"] = sample.moving_labels.to(device)
        if sample.fixed_keypoints is not None and sample.moving_keypoints is not None:
            fixed_kp, moving_kp = sample.fixed_keypoints.to(device), sample.moving_keypoints.to(device)
            low = torch.tensor(origin, device=device, dtype=fixed_kp.dtype)
            inside = ((fixed_kp >= low) & (fixed_kp <= low + torch.tensor(shape, device=device) - 1)).all(-1)[0]
            extra["fixed_keypoints"], extra["moving_keypoints"] = fixed_kp[:, inside], moving_kp[:, inside]
    if sample.fixed_onehot is not None:
        grid_factor = factor if phase.loss_grid == "stage" else 1
        return _label_loss(config, fields, sample, origin, grid_factor, device)
    losses = config.losses
    if losses.tre and ("fixed_keypoints" not in extra or extra["fixed_keypoints"].shape[1] == 0):
        losses = losses.model_copy(update={"tre": 0.0})
    if losses.dice and "fixed_labels" not in extra:
        losses = losses.model_copy(update={"dice": 0.0})
    if losses.sequence_gamma is None:
        fields = fields[-1:]
    loss, terms = total_loss(losses, fixed=fixed_t, moving=moving_t, field=fields, spacing=spacing,
                             stage_factor=factor, origin=origin, **extra)
    if config.supervised and truth_t is not None:
        errors = [endpoint_error(f, truth_t, spacing) for f in fields]
        supervised = errors[0] if len(errors) == 1 else sequence_loss(errors, losses.sequence_gamma)
        loss = loss + config.supervised * supervised
        terms["epe"] = float(errors[-1].detach())
        terms["total"] = float(loss.detach())
    return loss, terms


def _label_loss(config: TrainingConfig, fields: list[torch.Tensor], sample: Sample, origin, grid_factor: int,
                device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a label-map pair: ``dice × (1 − soft Dice) + regulariser × smoothness`` per field (RAFT sequence over iterations).

    ``fields`` cover a box at ``origin`` of a grid ``grid_factor`` times coarser
    than full resolution; the soft labels live on a grid
    ``sample.label_factor`` times coarser, sampled there (:mod:`rwcnet.training.label_dice`).
    """
    settings = config.data.synthmorph
    if sample.label_factor % grid_factor:
        raise ValueError(f"labels at 1/{sample.label_factor} cannot be compared on the 1/{grid_factor} grid")
    ratio = sample.label_factor // grid_factor
    fixed = fixed_onehot(sample.fixed_onehot.to(device), fields[-1].shape[2:], origin=origin, ratio=ratio)
    moving = sample.moving_onehot.to(device)
    losses, dice, smooth = [], None, None
    for field in fields:
        dice = soft_dice(warp_onehot(moving, field, origin=origin, ratio=ratio), fixed)
        smooth = gradient_regulariser(field, settings.regulariser_kind)
        losses.append(settings.dice * (1.0 - dice) + settings.regulariser * smooth)
    gamma = config.losses.sequence_gamma
    loss = losses[-1] if gamma is None or len(losses) == 1 else sequence_loss(losses, gamma)
    return loss, {"label_dice": float(dice.detach()), "regulariser": float(smooth.detach()), "total": float(loss.detach())}


@torch.no_grad()
def validate_labels(model: RWCNet, samples: list[Sample], num_stages: int, device: torch.device) -> dict[str, float]:
    """Dice of the merged classes on the label-map validation pairs (before and after), folding and SDlogJ of the fields.

    The full-resolution field of the first ``num_stages`` stages is brought to
    the labels' grid (:func:`rwcnet.geometry.resize_field`); Dice is taken on
    the most likely class per voxel (:func:`rwcnet.training.label_dice.hard_dice`).
    """
    training = model.training
    model.eval()
    totals = {"dice": 0.0, "dice_before": 0.0, "folding": 0.0, "sdlogj": 0.0}
    for sample in samples:
        fixed, moving = sample.fixed.to(device), sample.moving.to(device)
        field = model(fixed, moving, num_stages=num_stages).field
        labels_fixed, labels_moving = sample.fixed_onehot.to(device).float(), sample.moving_onehot.to(device).float()
        coarse = geometry.resize_field(field, labels_fixed.shape[2:])
        totals["dice"] += hard_dice(warp_onehot(labels_moving, coarse), labels_fixed)[0]
        totals["dice_before"] += hard_dice(labels_moving, labels_fixed)[0]
        det = geometry.jacobian_determinant(field)
        totals["folding"] += float((det <= 0).float().mean())
        totals["sdlogj"] += float(torch.log(det.clamp(1e-9, 1e9)).std())
    model.train(training)
    return {f"label_{name}": value / max(len(samples), 1) for name, value in totals.items()}


@torch.no_grad()
def validate(model: RWCNet, samples: list[Sample], num_stages: int, device: torch.device) -> dict[str, float]:
    """Mean endpoint error (mm, foreground) and MSE of the first ``num_stages`` stages on held-out pairs, and both before registration."""
    training = model.training
    model.eval()
    totals = {"epe": 0.0, "mse": 0.0, "epe_before": 0.0, "mse_before": 0.0}
    for sample in samples:
        fixed, moving, truth = sample.fixed.to(device), sample.moving.to(device), sample.truth.to(device)
        mask = None if sample.mask is None else sample.mask.to(device)
        field = model(fixed, moving, num_stages=num_stages).field
        weights = torch.ones_like(fixed) if mask is None else mask.to(fixed.dtype)
        for suffix, current in (("", field), ("_before", torch.zeros_like(field))):
            totals["epe" + suffix] += float(endpoint_error(current, truth, sample.spacing, mask))
            squared = (geometry.warp(moving, current) - fixed) ** 2
            totals["mse" + suffix] += float((squared * weights).sum() / weights.sum().clamp_min(1.0))
    model.train(training)
    return {name: value / max(len(samples), 1) for name, value in totals.items()}


@torch.no_grad()
def report(model: RWCNet, data: TrainingData, device: torch.device) -> dict[str, Any]:
    """Score the dataset's ``registration_val`` pairs with the whole network (Dice over
    ``evaluation_labels``, TRE when keypoints exist, SDlogJ), next to zero displacement."""
    model.eval()
    cases = {}
    labels = data.dataset.evaluation_labels
    for pair in data.report_pairs():
        fixed_image, moving_image = read_image(pair.fixed), read_image(pair.moving)
        tensors = [torch.from_numpy(normalise(i.array, data.data.normalisation))[None, None].to(device)
                   for i in (fixed_image, moving_image)]
        field = field_array(model(*tensors).field)
        inputs: dict[str, Any] = {"labels": labels, "spacing": fixed_image.spacing}
        label_paths = [data.dataset.label_path(p) for p in (pair.fixed, pair.moving)]
        if None not in label_paths:
            inputs["fixed_labels"], inputs["moving_labels"] = (np.rint(read_image(p).array).astype(np.int64) for p in label_paths)
        keypoint_paths = [data.dataset.keypoints_path(p) for p in (pair.fixed, pair.moving)]
        if None not in keypoint_paths:
            inputs["fixed_kp"], inputs["moving_kp"] = (read_keypoints(p) for p in keypoint_paths)
        scores = metrics.score_case(field, **inputs, compute_hd95=False)
        zero = metrics.score_case(np.zeros_like(field), **inputs, compute_hd95=False)
        cases[pair.key] = {name: scores[name] for name in ("dice", "tre", "sdlogj", "folding_fraction") if name in scores}
        cases[pair.key].update({f"{name}_zero": zero[name] for name in ("dice", "tre") if name in zero})
    return cases
