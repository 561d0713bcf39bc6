"""One resolution of RWCNet: encoders plus the recurrent correlation/GRU loop (paper Figure 2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rwcnet import geometry
from rwcnet.geometry.filters import running_box_mean
from rwcnet.model.config import ModelConfig, StageConfig
from rwcnet.model.correlation import local_correlation, soft_argmax
from rwcnet.model.encoders import ContextEncoder, FeatureEncoder
from rwcnet.model.update import ConvGRU, FlowHead, MotionEncoder, ReferenceConvGRU, UpdateGRU


@dataclass
class StageState:
    """Whole-grid inputs of the recurrent loop, all on the stage grid ``(X, Y, Z)``.

    ``moving_image`` is the moving image already warped by the previous
    stages; ``hidden`` the initial hidden state (carry-over included).
    """

    fixed_features: torch.Tensor  # (B, C, X, Y, Z)
    moving_features: torch.Tensor  # (B, C, X, Y, Z)
    moving_image: torch.Tensor  # (B, 1, X, Y, Z)
    hidden: torch.Tensor  # (B, H, X, Y, Z)
    context: torch.Tensor  # (B, K, X, Y, Z), K may be 0


class RecurrentStage(nn.Module):
    """Feature/context encoders and the update block of one stage, with its own weights."""

    gru_cell: type[ConvGRU] = ConvGRU

    def __init__(self, config: StageConfig, model: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.detach_flow = model.detach_flow
        c = config.feature_channels
        self.features = FeatureEncoder(c, config.encoder_width, model.dropout)
        self.context = ContextEncoder(config.hidden_channels, config.context_channels, config.encoder_width)
        cost_channels = 2 * c if config.correlation == "none" else (2 * config.radius + 1) ** 3
        self.motion = MotionEncoder(cost_channels, config.motion_channels, config.flow_kernel, config.motion_out_kernel)
        gru_inputs = config.motion_channels + c + config.context_channels
        self.gru = UpdateGRU(config.hidden_channels, gru_inputs, config.gru_kernel, config.separable_gru, self.gru_cell)
        self.head = FlowHead(config.hidden_channels, config.head_channels, model.flow_head_init_scale)
        if config.readout and config.correlation == "none":
            raise ValueError("readout needs a correlation (dot or sad)")
        if config.readout:
            self.readout_gain = nn.Parameter(torch.tensor(float(config.readout_gain)))
            self.readout_log_temperature = nn.Parameter(torch.tensor(math.log(config.readout_temperature)))

    def encode(self, fixed: torch.Tensor, moving: torch.Tensor, prior_flow: torch.Tensor) -> StageState:
        """Encode whole stage-grid images ``(B, 1, X, Y, Z)``; ``prior_flow`` ``(B, 3, X, Y, Z)`` in stage voxels."""
        batch = fixed.shape[0]
        features = self.features(torch.cat([fixed, moving], dim=0))
        hidden, context = self.context(moving, prior_flow)
        return StageState(features[:batch], features[batch:], moving, hidden, context)

    def _next_moving_features(self, state: StageState, origin: tuple[int, int, int], flow: torch.Tensor,
                              moving_features: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The moving features for the next iteration: sampled afresh at ``region + flow``."""
        return self._moving_features(state, origin, flow)

    def _motion_flow(self, flow: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The field the motion encoder sees: the current flow."""
        return flow

    def _moving_features(self, state: StageState, origin: tuple[int, int, int], flow: torch.Tensor) -> torch.Tensor:
        """Moving features at ``region + flow``: warped features, or features of the re-warped image."""
        if self.config.rewarp == "image":
            return self.features(geometry.warp(state.moving_image, flow, origin=origin))
        return geometry.warp(state.moving_features, flow, origin=origin)

    def _cost(self, fixed_features: torch.Tensor, moving_features: torch.Tensor) -> torch.Tensor:
        if self.config.correlation == "none":
            return torch.cat([fixed_features, moving_features], dim=1)
        return local_correlation(fixed_features, moving_features, self.config.radius, self.config.correlation)

    def _readout(self, cost: torch.Tensor) -> torch.Tensor:
        """Smoothed soft-argmax of the correlation: a displacement estimate ``(B, 3, X, Y, Z)`` in stage voxels."""
        estimate = soft_argmax(cost, self.config.radius, self.config.correlation, self.readout_log_temperature.exp())
        for _ in range(2 if self.config.readout_smoothing > 1 else 0):
            estimate = running_box_mean(estimate, self.config.readout_smoothing // 2)
        return estimate

    def iterate(
        self, state: StageState, region: tuple[slice, slice, slice], flow: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Run the recurrent loop on one region of the stage grid.

        Returns the residual field ``(B, 3, *region)`` in stage voxels, the final
        hidden state and the field after every iteration (for a sequence loss).
        """
        box = (slice(None), slice(None), *region)
        fixed_features, hidden, context = state.fixed_features[box], state.hidden[box], state.context[box]
        origin = tuple(s.start for s in region)
        if flow is None:
            flow = fixed_features.new_zeros(fixed_features.shape[0], 3, *fixed_features.shape[2:])
        delta = torch.zeros_like(flow)
        moving_features = self._moving_features(state, origin, flow)
        flows = []
        for step in range(self.config.iterations):
            if self.detach_flow:
                flow = flow.detach()
            if step > 0:
                moving_features = self._next_moving_features(state, origin, flow, moving_features, delta)
            cost = self._cost(fixed_features, moving_features)
            motion = self.motion(cost, self._motion_flow(flow, delta))
            hidden = self.gru(hidden, torch.cat([motion, moving_features, context], dim=1))
            delta = self.head(hidden)
            if self.config.readout:
                delta = delta + self.readout_gain * self._readout(cost)
            flow = flow + delta  # u_{k+1} = u_k + Δu_k
            flows.append(flow)
        return flow, hidden, flows


class ReferenceStage(RecurrentStage):
    """The reference code's stage: its GRU cell, moving features warped by the last update only
    (not resampled at the total flow), and the motion encoder fed the last update instead of the flow."""

    gru_cell = ReferenceConvGRU

    def _next_moving_features(self, state: StageState, origin: tuple[int, int, int], flow: torch.Tensor,
                              moving_features: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return geometry.warp(moving_features, delta)

    def _motion_flow(self, flow: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return delta
