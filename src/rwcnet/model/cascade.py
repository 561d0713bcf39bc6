"""The multi-scale cascade: stages from coarse to fine, tiles, hidden-state carry-over, composition."""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field

import torch
import torch.nn.functional as F
from torch import nn

from rwcnet import geometry
from rwcnet.geometry.layout import pad_to_multiple
from rwcnet.model.config import ModelConfig
from rwcnet.model.stage import RecurrentStage, ReferenceStage
from rwcnet.model.tiling import Box, Tile, plan_tiles, run_tiled
from rwcnet.model.update import ConvexUpsampler


@dataclass
class StageResult:
    """What one stage produced, on its own grid (voxels of that grid)."""

    field: torch.Tensor  # (B, 3, X_s, Y_s, Z_s): total field after this stage
    hidden: torch.Tensor  # (B, H, X_s, Y_s, Z_s)
    sequence: list[torch.Tensor] = dataclass_field(default_factory=list)  # total field after each iteration
    origin: tuple[int, int, int] = (0, 0, 0)  # stage-grid voxel where the field starts (training regions)


@dataclass
class CascadeOutput:
    """The full-resolution field ``(B, 3, X, Y, Z)`` in voxels of the input grid, and per-stage results.

    With a training ``region`` the field covers only that box; ``origin`` is
    its first voxel on the input grid.
    """

    field: torch.Tensor
    stages: list[StageResult]
    origin: tuple[int, int, int] = (0, 0, 0)


class StagewiseModel(nn.Module):
    """Coarse-to-fine networks trained stage by stage: ``stages`` and ``carry`` module lists,
    the first ``frozen_stages`` of them frozen (no gradients, eval mode)."""

    stages: nn.ModuleList
    carry: nn.ModuleList
    frozen_stages: int = 0

    def freeze_stages(self, count: int) -> None:
        """Freeze the first ``count`` stages (no gradients, eval mode, run without autograd)."""
        self.frozen_stages = count
        for index, stage in enumerate(self.stages):
            stage.requires_grad_(index >= count)
        for index, carry in enumerate(self.carry):
            carry.requires_grad_(index + 1 >= count)

    def train(self, mode: bool = True) -> "StagewiseModel":
        super().train(mode)
        for stage in list(self.stages)[: self.frozen_stages]:
            stage.eval()
        return self


class RWCNet(StagewiseModel):
    """RWCNet: one :class:`RecurrentStage` per resolution, run coarse to fine.

    Inputs are normalised images ``(B, 1, X, Y, Z)`` on the same grid, of any
    size (padded internally to a multiple of ``config.alignment`` and cropped
    back). The output is a pull-back field in voxels on that grid. A config with
    ``reference_compat`` is built as :class:`ReferenceRWCNet` (``rwcnet.model.files.build_model``).
    """

    stage_class: type[RecurrentStage] = RecurrentStage

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.reference_compat != isinstance(self, ReferenceRWCNet):
            raise ValueError("a reference_compat config is built as ReferenceRWCNet (see rwcnet.model.files.build_model)")
        self.config = config
        self.stages = nn.ModuleList(self.stage_class(stage, config) for stage in config.stages)
        self.carry = nn.ModuleList(
            nn.Identity() if prev.hidden_channels == cur.hidden_channels else nn.Conv3d(prev.hidden_channels, cur.hidden_channels, 1)
            for prev, cur in zip(config.stages, config.stages[1:])
        )
        last = config.stages[-1]
        self.upsampler = (
            ConvexUpsampler(last.hidden_channels, last.head_channels, last.downsample)
            if config.final_upsampling == "convex" and last.downsample > 1
            else None
        )
        self.frozen_stages = 0

    def forward(
        self,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        *,
        num_stages: int | None = None,
        sequence: bool = False,
        region: Box | None = None,
    ) -> CascadeOutput:
        """Register ``moving`` to ``fixed``; run the first ``num_stages`` stages (all by default).

        With ``sequence=True`` each stage result keeps the total field after
        every iteration, for RAFT's sequence loss. ``region`` (a box on the
        grid of the last stage run) makes that stage iterate on this one patch
        instead of tiling the whole grid, as in patch-wise training; the input
        size must then be a multiple of ``config.alignment``.
        """
        if fixed.shape != moving.shape or fixed.dim() != 5 or fixed.shape[1] != 1:
            raise ValueError(f"expected two (B, 1, X, Y, Z) images of one shape, got {tuple(fixed.shape)} and {tuple(moving.shape)}")
        shape = fixed.shape[2:]
        align = self.config.alignment
        pad = [(-n) % align for n in shape]
        fixed_p, moving_p = (pad_to_multiple(x, align) for x in (fixed, moving))
        full = fixed_p.shape[2:]
        count = len(self.stages) if num_stages is None else num_stages
        results: list[StageResult] = []
        for index in range(count):
            grad = index >= self.frozen_stages and torch.is_grad_enabled()
            with torch.set_grad_enabled(grad):
                last = index == count - 1
                previous = results[-1] if results else None
                results.append(self._run_stage(index, fixed_p, moving_p, previous, sequence, region if last else None))
        final = results[-1]
        factor = self.config.stages[count - 1].downsample
        if region is not None:
            if any(pad):
                raise ValueError(f"a training region needs sizes that are multiples of {align}, got {tuple(shape)}")
            target = tuple(factor * (s.stop - s.start) for s in region)
            origin = tuple(factor * s.start for s in region)
            return CascadeOutput(self._to_full(final, target, count == len(self.stages)), results, origin)
        field = self._to_full(final, full, final=count == len(self.stages))
        return CascadeOutput(field[(slice(None), slice(None), *(slice(0, n) for n in shape))], results)

    def _upsample(self, tensor: torch.Tensor, shape: tuple[int, ...], is_field: bool) -> torch.Tensor:
        """A coarser stage's field (vectors rescaled) or hidden state on a finer grid."""
        return geometry.resize_field(tensor, shape) if is_field else geometry.resize_volume(tensor, shape)

    def _carried(self, carried: torch.Tensor, index: int) -> torch.Tensor:
        """The hidden state carried into stage ``index`` from the one before (as it is)."""
        return carried

    def _run_stage(
        self,
        index: int,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        previous: StageResult | None,
        sequence: bool,
        region: Box | None,
    ) -> StageResult:
        config = self.config.stages[index]
        stage = self.stages[index]
        grid = tuple(n // config.downsample for n in fixed.shape[2:])
        fixed_s = geometry.resize_volume(fixed, grid)
        if previous is None:
            prior = fixed.new_zeros(fixed.shape[0], 3, *grid)
            moving_s = geometry.resize_volume(moving, grid)
        else:
            prior = self._upsample(previous.field, grid, is_field=True)
            warped = geometry.warp(moving, self._upsample(prior, tuple(fixed.shape[2:]), is_field=True))
            moving_s = geometry.resize_volume(warped, grid)
        state = stage.encode(fixed_s, moving_s, prior)
        if previous is not None:
            carried = self.carry[index - 1](self._upsample(previous.hidden, grid, is_field=False))
            state.hidden = state.hidden + self._carried(carried, index)
        if region is not None:
            residual, hidden, flows = stage.iterate(state, region)
            origin = tuple(s.start for s in region)
            return StageResult(
                field=geometry.compose(residual, prior, origin=origin),
                hidden=hidden,
                sequence=[geometry.compose(flow, prior, origin=origin) for flow in flows] if sequence else [],
                origin=origin,
            )
        tiles = plan_tiles(grid, config.patch_factor, halo=config.halo, mode=config.tiling, alignment=2)

        def run(tile: Tile) -> dict[str, torch.Tensor]:
            residual, hidden, flows = stage.iterate(state, tile.region)
            outputs = {"residual": residual, "hidden": hidden}
            if sequence:
                outputs.update({f"step{i}": flow for i, flow in enumerate(flows)})
            return outputs

        out = run_tiled(run, tiles, grid)
        steps = [out[f"step{i}"] for i in range(config.iterations)] if sequence else []
        return StageResult(
            field=geometry.compose(out["residual"], prior),
            hidden=out["hidden"],
            sequence=[geometry.compose(step, prior) for step in steps],
        )

    def _to_full(self, result: StageResult, full: tuple[int, ...], final: bool) -> torch.Tensor:
        if tuple(result.field.shape[2:]) == tuple(full):
            return result.field
        if final and self.upsampler is not None:
            return self.upsampler(result.field, result.hidden)
        return self._upsample(result.field, tuple(full), is_field=True)


class ReferenceRWCNet(RWCNet):
    """RWCNet with the reference code's defects, for the ablation (``ModelConfig.reference_compat``).

    Its stages are :class:`~rwcnet.model.stage.ReferenceStage`; coarse fields and hidden states are
    upsampled by nearest neighbour (fields scaled by the first axis' ratio), and in training the
    carried hidden state is multiplied by the ratio of the two stages' downsampling factors.
    """

    stage_class = ReferenceStage

    def _upsample(self, tensor: torch.Tensor, shape: tuple[int, ...], is_field: bool) -> torch.Tensor:
        up = F.interpolate(tensor, size=shape, mode="nearest")
        return up * (shape[0] / tensor.shape[2]) if is_field else up

    def _carried(self, carried: torch.Tensor, index: int) -> torch.Tensor:
        if not self.training:
            return carried
        return carried * (self.config.stages[index - 1].downsample // self.config.stages[index].downsample)
