"""Training losses (SPEC §2 "Losses"): image similarity, differentiable Dice, keypoint TRE, regularisers.

Conventions (see ``docs/conventions.md``): volumes are torch tensors
``(B, C, X, Y, Z)`` in array order; a field is ``(B, 3, X, Y, Z)``, a
pull-back displacement in voxels of the fixed grid; keypoints are
``(B, N, 3)`` voxel indices of that grid. Every loss is a scalar tensor,
differentiable with respect to the warped image or the field (except the
``reference_compat`` Dice, kept for ablations), and is *lower = better*.

:func:`total_loss` combines the terms with the weights of a
:class:`LossConfig`; the presets ``oasis`` and ``nlst`` hold the paper's
weights (MSE 10, Dice 1 or TRE 1, L1 gradient regulariser 0.1).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rwcnet.geometry import forward_difference_means, sample_field, warp
from rwcnet.mind import mind_ssc
from rwcnet.presets import Presets

Tensor = torch.Tensor

#: Dice labels are warped in groups of at most this many ``labels × voxels × batch`` values per pass.
DICE_ELEMENTS_PER_PASS = 2**24


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.dim() != 5 or a.shape != b.shape:
        raise ValueError(f"{names}: expected two (B, C, X, Y, Z) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` ``(B, C, X, Y, Z)``, weighted by ``mask`` (broadcastable, ≥ 0) when given; an empty mask gives 0."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype).expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def mse(warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared intensity difference (intensity²) of ``warped`` and ``fixed`` ``(B, C, X, Y, Z)``.

    ``mask`` ``(B, 1 or C, X, Y, Z)`` on the fixed grid (nonzero = inside,
    fractional values act as weights) restricts the mean to the mask.
    """
    _check_pair(warped, fixed, "mse")
    return _masked_mean((warped - fixed) ** 2, mask)


def local_ncc(warped: Tensor, fixed: Tensor, window: int = 9, mask: Tensor | None = None, *, eps: float = 1e-5) -> Tensor:
    """Local normalised cross-correlation loss ``1 − mean_x NCC(x)``, in ``[0, 2]``, 0 for a perfect match.

    ``NCC(x) = cov / sqrt((var_w + eps)(var_f + eps))`` over the ``window³``
    box around ``x`` (box means by average pooling; near the border the box
    is clipped to the volume), per channel of ``warped`` and ``fixed``
    ``(B, C, X, Y, Z)``. ``eps`` (intensity²) keeps flat regions finite;
    the NCC of an image with ``α·image + β`` (``α > 0``) is 1 up to
    ``eps / var``. It is the signed NCC: an inverted contrast scores −1.
    ``mask`` ``(B, 1 or C, X, Y, Z)`` restricts the mean over ``x``.
    """
    _check_pair(warped, fixed, "local_ncc")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"local_ncc: window must be a positive odd number of voxels, got {window}")
    channels = warped.shape[1]
    stacked = torch.cat([warped, fixed, warped * warped, fixed * fixed, warped * fixed], dim=1)
    means = F.avg_pool3d(stacked, window, stride=1, padding=window // 2, count_include_pad=False)
    mean_w, mean_f, mean_ww, mean_ff, mean_wf = means.split(channels, dim=1)
    var_w = (mean_ww - mean_w * mean_w).clamp_min(0.0)
    var_f = (mean_ff - mean_f * mean_f).clamp_min(0.0)
    ncc = (mean_wf - mean_w * mean_f) / torch.sqrt((var_w + eps) * (var_f + eps))
    return 1.0 - _masked_mean(ncc, mask)


def feature_ssd(warped_features: Tensor, fixed_features: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean_x Σ_c (F_w − F_f)²`` for feature maps ``(B, C, X, Y, Z)`` (the ConvexAdam data term), masked mean over ``x``."""
    _check_pair(warped_features, fixed_features, "feature_ssd")
    return mse(warped_features, fixed_features, mask) * warped_features.shape[1]


def mind_ssd(warped: Tensor, fixed: Tensor, mask: Tensor | None = None, *, radius: int = 1, dilation: int = 2) -> Tensor:
    """MIND-SSC feature SSD of two images ``(B, 1, X, Y, Z)``, for multimodal pairs: :func:`feature_ssd` of their MIND-SSC.

    The descriptor (:func:`rwcnet.mind.mind_ssc`, ``radius`` and ``dilation``
    in voxels) is computed on the warped moving image and the fixed image,
    and is differentiable; it does not change under ``I → αI + β`` (``α > 0``).
    To compare precomputed (e.g. warped) features, use :func:`feature_ssd`.
    """
    _check_pair(warped, fixed, "mind_ssd")
    return feature_ssd(mind_ssc(warped, radius, dilation), mind_ssc(fixed, radius, dilation), mask)


def _dice_sums(
    field: Tensor, moving_labels: Tensor, fixed_labels: Tensor, values: Tensor, mode: str, origin: Sequence[int] = (0, 0, 0)
) -> tuple[Tensor, Tensor]:
    """Per sample and label: ``Σ warped·fixed`` and ``Σ warped + Σ fixed`` of one-hot maps, each ``(B, L)``."""
    moving_onehot = (moving_labels == values.view(1, -1, 1, 1, 1)).to(field.dtype)
    fixed_onehot = (fixed_labels == values.view(1, -1, 1, 1, 1)).to(field.dtype)
    warped = warp(moving_onehot, field, mode=mode, origin=origin)
    intersection = (warped * fixed_onehot).sum(dim=(2, 3, 4))
    total = warped.sum(dim=(2, 3, 4)) + fixed_onehot.sum(dim=(2, 3, 4))
    return intersection, total


class _RecomputedDiceSums(torch.autograd.Function):
    """:func:`_dice_sums` that keeps no volumes for the backward pass and recomputes them there (gradient checkpointing)."""

    @staticmethod
    def forward(ctx, field: Tensor, moving_labels: Tensor, fixed_labels: Tensor, values: Tensor, mode: str, origin: tuple[int, ...]):
        ctx.save_for_backward(field, moving_labels, fixed_labels, values)
        ctx.mode, ctx.origin = mode, origin
        return _dice_sums(field, moving_labels, fixed_labels, values, mode, origin)

    @staticmethod
    def backward(ctx, grad_intersection: Tensor, grad_total: Tensor):
        field, moving_labels, fixed_labels, values = ctx.saved_tensors
        with torch.enable_grad():
            leaf = field.detach().requires_grad_(True)
            outputs = _dice_sums(leaf, moving_labels, fixed_labels, values, ctx.mode, ctx.origin)
            (grad_field,) = torch.autograd.grad(outputs, leaf, (grad_intersection, grad_total))
        return grad_field, None, None, None, None, None


def dice_loss(
    moving_labels: Tensor,
    fixed_labels: Tensor,
    field: Tensor,
    labels: Sequence[int] | None = None,
    *,
    reference_compat: bool = False,
    chunk: int | None = None,
    origin: Sequence[int] = (0, 0, 0),
) -> Tensor:
    """Soft Dice loss ``1 − mean Dice`` of the moving label map warped by ``field`` against the fixed labels.

    ``moving_labels`` ``(B, 1, X', Y', Z')`` and ``fixed_labels``
    ``(B, 1, X, Y, Z)`` are integer maps; ``field`` ``(B, 3, X, Y, Z)``
    (voxels). Each label's indicator of the moving map is warped
    *trilinearly* (:func:`rwcnet.geometry.warp`) and compared with the
    fixed indicator: ``Dice = 2 Σ w·f / (Σ w + Σ f)``. The mean runs over
    the labels present in both unwarped maps, per sample, then over the
    samples that have such a label (0 when none has). ``labels`` (default:
    every nonzero value of either map) chooses the labels; 0 is background.

    Labels are warped ``chunk`` at a time (default: as many as keep a pass
    under :data:`DICE_ELEMENTS_PER_PASS` values); with several passes and a
    field that needs gradients, each pass is checkpointed, so memory stays
    at one pass whatever the number of labels. ``reference_compat=True``
    warps with nearest-neighbour sampling, as the reference code does: the
    same value at integer displacements, but a zero gradient for the field.
    With an ``origin``, ``field`` and ``fixed_labels`` cover a box of the fixed
    grid whose voxel 0 is voxel ``origin`` of the moving grid (patch-wise training).
    """
    if moving_labels.dim() != 5 or moving_labels.shape[1] != 1 or fixed_labels.dim() != 5 or fixed_labels.shape[1] != 1:
        raise ValueError(f"dice_loss: labels must be (B, 1, X, Y, Z), got {tuple(moving_labels.shape)} and {tuple(fixed_labels.shape)}")
    if field.dim() != 5 or field.shape[1] != 3 or field.shape[2:] != fixed_labels.shape[2:] or field.shape[0] != fixed_labels.shape[0]:
        raise ValueError(f"dice_loss: field {tuple(field.shape)} must be (B, 3) + the fixed labels' grid {tuple(fixed_labels.shape[2:])}")
    if moving_labels.shape[0] != fixed_labels.shape[0]:
        raise ValueError(f"dice_loss: batch sizes differ: {moving_labels.shape[0]} and {fixed_labels.shape[0]}")
    found = [(torch.unique(m), torch.unique(f)) for m, f in zip(moving_labels, fixed_labels)]
    if labels is None:
        values = torch.unique(torch.cat([torch.cat(pair) for pair in found]))
        values = values[values != 0]
    else:
        values = torch.as_tensor(list(labels), device=fixed_labels.device, dtype=fixed_labels.dtype)
    present = torch.stack([torch.isin(values, m) & torch.isin(values, f) for m, f in found])  # (B, L): in both maps
    if not bool(present.any()):
        return field.sum() * 0.0
    keep = present.any(dim=0)
    values, present = values[keep], present[:, keep]
    batch = fixed_labels.shape[0]
    if chunk is None:
        chunk = max(1, DICE_ELEMENTS_PER_PASS // (batch * max(fixed_labels[0, 0].numel(), moving_labels[0, 0].numel())))
    mode = "nearest" if reference_compat else "bilinear"
    passes = [values[start : start + chunk] for start in range(0, len(values), chunk)]
    use_checkpoint = len(passes) > 1 and field.requires_grad and torch.is_grad_enabled()
    intersections, totals = [], []
    for group in passes:
        if use_checkpoint:
            inter, total = _RecomputedDiceSums.apply(field, moving_labels, fixed_labels, group, mode, tuple(origin))
        else:
            inter, total = _dice_sums(field, moving_labels, fixed_labels, group, mode, origin)
        intersections.append(inter)
        totals.append(total)
    dice = 2.0 * torch.cat(intersections, dim=1) / torch.cat(totals, dim=1).clamp_min(torch.finfo(field.dtype).tiny)
    weights = present.to(field.dtype)
    counts = weights.sum(dim=1)
    per_sample = (dice * weights).sum(dim=1) / counts.clamp_min(1.0)
    has_labels = counts > 0
    return 1.0 - per_sample[has_labels].mean()


def _spacing_tensor(spacing: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """Voxel spacing ``(3,)`` or ``(B, 3)`` (mm) as a ``(1 or B, 1, 3)`` tensor on ``like``'s device and dtype."""
    tensor = torch.as_tensor(spacing, dtype=like.dtype, device=like.device)
    if tensor.shape == (3,):
        return tensor.view(1, 1, 3)
    if tensor.dim() == 2 and tensor.shape[1] == 3:
        return tensor.unsqueeze(1)
    raise ValueError(f"spacing must be 3 values (mm) or (B, 3), got shape {tuple(tensor.shape)}")


def tre_loss(
    field: Tensor,
    fixed_keypoints: Tensor,
    moving_keypoints: Tensor,
    spacing: Sequence[float] | Tensor,
    scale: float = 1.0,
) -> Tensor:
    """Mean target registration error in mm, times ``scale``.

    ``fixed_keypoints`` and ``moving_keypoints`` ``(B, N, 3)`` are voxel
    indices of the field's grid, ``spacing`` its voxel size (mm, ``(3,)`` or
    ``(B, 3)``). The field ``(B, 3, X, Y, Z)`` is sampled trilinearly at the
    fixed points (:func:`rwcnet.geometry.sample_field`); the error of a point
    is ``‖(k_fix + u(k_fix) − k_mov) ⊙ spacing‖₂``. ``scale`` weights a
    stage by its resolution factor (the reference uses 4 / 2 / 1).
    """
    if fixed_keypoints.dim() != 3 or fixed_keypoints.shape[-1] != 3 or fixed_keypoints.shape != moving_keypoints.shape:
        raise ValueError(
            f"tre_loss: keypoints must be two (B, N, 3) tensors of the same shape, got {tuple(fixed_keypoints.shape)} and {tuple(moving_keypoints.shape)}"
        )
    fixed_points = fixed_keypoints.to(field.dtype)
    residual = fixed_points + sample_field(field, fixed_points) - moving_keypoints.to(field.dtype)
    errors = torch.linalg.vector_norm(residual * _spacing_tensor(spacing, field), dim=-1)
    return errors.mean() * scale


def gradient_regulariser(field: Tensor, kind: Literal["l1", "l2"] = "l1") -> Tensor:
    """Smoothness of a field ``(B, 3, X, Y, Z)``: mean over the three axes of the mean ``|forward difference|`` (``l1``) or its square (``l2``).

    Units: voxels per voxel (``l1``) or its square. A field ``u(x) = G x + t``
    gives ``Σ|G| / 9`` (``l1``) or ``Σ G² / 9`` (``l2``); a constant field gives 0.
    """
    return sum(forward_difference_means(field, kind)) / 3.0


def sequence_weights(iterations: int, gamma: float = 0.8) -> list[float]:
    """RAFT weights ``γ^(N−i)`` for iterations ``i = 1..N``: the last iteration weighs 1."""
    return [gamma ** (iterations - i) for i in range(1, iterations + 1)]


def sequence_loss(per_iteration_losses: Sequence[Tensor], gamma: float = 0.8) -> Tensor:
    """RAFT sequence loss: ``Σ_i γ^(N−i) L_i`` over the losses of iterations ``1..N`` (scalar tensors)."""
    if len(per_iteration_losses) == 0:
        raise ValueError("sequence_loss needs at least one iteration's loss")
    weights = sequence_weights(len(per_iteration_losses), gamma)
    return sum(weight * loss for weight, loss in zip(weights, per_iteration_losses))


class LossConfig(BaseModel):
    """Weights of the training loss terms (0 switches a term off) and their options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mse: float = Field(10.0, ge=0, description="weight of the mean squared intensity difference")
    ncc: float = Field(0.0, ge=0, description="weight of the local NCC loss (1 − mean NCC)")
    ncc_window: int = Field(9, ge=1, description="NCC box width (voxels, odd)")
    mind: float = Field(0.0, ge=0, description="weight of the MIND-SSC feature SSD")
    dice: float = Field(1.0, ge=0, description="weight of the soft Dice loss (1 − mean Dice)")
    dice_reference_compat: bool = Field(False, description="nearest-neighbour label warping of the reference code (no gradient)")
    tre: float = Field(0.0, ge=0, description="weight of the keypoint TRE (mm), scaled by the stage factor")
    regulariser: float = Field(0.1, ge=0, description="weight of the gradient regulariser")
    regulariser_kind: Literal["l1", "l2"] = Field("l1", description="l1 (reference) or l2 forward differences")
    sequence_gamma: float | None = Field(None, gt=0, description="RAFT sequence-loss γ (0.8 in RAFT); None uses only the last iteration")

    @field_validator("ncc_window")
    @classmethod
    def _odd_window(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"ncc_window must be odd, got {value}")
        return value


#: The paper's training losses: OASIS (MSE 10 + Dice 1 + L1 reg 0.1) and NLST (MSE 10 + TRE 1 + L1 reg 0.1).
LOSS_PRESETS: Presets[LossConfig] = Presets("loss", {
    "oasis": LossConfig(mse=10.0, dice=1.0, tre=0.0, regulariser=0.1),
    "nlst": LossConfig(mse=10.0, dice=0.0, tre=1.0, regulariser=0.1),
})


def loss_config(preset: str | LossConfig = "oasis", **overrides) -> LossConfig:
    """The :class:`LossConfig` of a preset name (or a given config) with the non-``None`` ``overrides`` applied."""
    return LOSS_PRESETS.resolve(preset, **overrides)


def _require(term: str, **inputs: object) -> None:
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        raise ValueError(f"loss term {term!r} has a non-zero weight but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")


def _single_total(
    config: LossConfig,
    fixed: Tensor,
    moving: Tensor,
    field: Tensor,
    fixed_labels: Tensor | None,
    moving_labels: Tensor | None,
    fixed_keypoints: Tensor | None,
    moving_keypoints: Tensor | None,
    spacing: Sequence[float] | Tensor | None,
    mask: Tensor | None,
    stage_factor: float,
    origin: Sequence[int],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum and unweighted terms for one field."""
    terms: dict[str, Tensor] = {}
    if config.mse or config.ncc or config.mind:
        warped = warp(moving, field, origin=origin)
        if config.mse:
            terms["mse"] = mse(warped, fixed, mask)
        if config.ncc:
            terms["ncc"] = local_ncc(warped, fixed, config.ncc_window, mask)
        if config.mind:
            terms["mind"] = mind_ssd(warped, fixed, mask)
    if config.dice:
        _require("dice", fixed_labels=fixed_labels, moving_labels=moving_labels)
        terms["dice"] = dice_loss(
            moving_labels, fixed_labels, field, reference_compat=config.dice_reference_compat, origin=origin
        )
    if config.tre:
        _require("tre", fixed_keypoints=fixed_keypoints, moving_keypoints=moving_keypoints, spacing=spacing)
        shift = torch.as_tensor(list(origin), dtype=field.dtype, device=field.device)
        terms["tre"] = tre_loss(field, fixed_keypoints - shift, moving_keypoints - shift, spacing, scale=stage_factor)
    if config.regulariser:
        terms["regulariser"] = gradient_regulariser(field, config.regulariser_kind)
    total = sum(getattr(config, name) * value for name, value in terms.items())
    if not terms:
        total = field.sum() * 0.0
    return total, terms


def total_loss(
    config: LossConfig,
    *,
    fixed: Tensor,
    moving: Tensor,
    field: Tensor | Sequence[Tensor],
    fixed_labels: Tensor | None = None,
    moving_labels: Tensor | None = None,
    fixed_keypoints: Tensor | None = None,
    moving_keypoints: Tensor | None = None,
    spacing: Sequence[float] | Tensor | None = None,
    mask: Tensor | None = None,
    stage_factor: float = 1,
    origin: Sequence[int] = (0, 0, 0),
) -> tuple[Tensor, dict[str, float]]:
    """The weighted training loss of a field and its named terms.

    ``fixed`` ``(B, 1, X, Y, Z)``, ``moving`` ``(B, 1, X', Y', Z')``, ``field``
    ``(B, 3, X, Y, Z)`` in voxels of the fixed grid; the moving image is
    warped here (:func:`rwcnet.geometry.warp`). Labels are ``(B, 1, ...)``
    integer maps, keypoints ``(B, N, 3)`` voxels of the field's grid,
    ``spacing`` that grid's voxel size in mm, ``mask`` ``(B, 1, X, Y, Z)``
    restricts the image terms. ``stage_factor`` (4 / 2 / 1) scales the TRE.
    ``origin`` (patch-wise training): ``field``, ``fixed``, ``fixed_labels`` and
    ``mask`` cover a box of the fixed grid whose voxel 0 is voxel ``origin`` of
    the whole grid; ``moving`` and ``moving_labels`` stay whole and keypoints
    stay in whole-grid voxels (points should lie inside the box).

    Terms with weight 0 are skipped; a term with a non-zero weight whose
    inputs are missing raises ``ValueError``. ``field`` may be the list of
    per-iteration fields: with ``config.sequence_gamma`` the loss is the RAFT
    sequence loss over them, otherwise only the last one counts.

    Returns ``(loss, terms)``: ``terms`` holds the unweighted value of each
    computed term of the last field (``mse``, ``ncc``, ``mind``, ``dice``,
    ``tre`` in mm × stage factor, ``regulariser``) and ``total``, as floats.
    """
    fields = [field] if isinstance(field, Tensor) else list(field)
    if not fields:
        raise ValueError("total_loss needs a field (or a non-empty list of per-iteration fields)")
    if config.sequence_gamma is None:
        fields = fields[-1:]
    inputs = (fixed_labels, moving_labels, fixed_keypoints, moving_keypoints, spacing, mask, stage_factor, tuple(origin))
    results = [_single_total(config, fixed, moving, one, *inputs) for one in fields]
    losses = [loss for loss, _ in results]
    loss = losses[0] if len(losses) == 1 else sequence_loss(losses, config.sequence_gamma)
    named = {name: float(value.detach()) for name, value in results[-1][1].items()}
    named["total"] = float(loss.detach())
    return loss, named
