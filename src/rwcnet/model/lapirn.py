"""LapIRN, the paper's deep-learning comparator (SPEC §7): a Laplacian pyramid of residual CNNs.

Three levels (1/4, 1/2, 1 of the input grid), each a small residual conv
encoder-decoder. Level ``l`` sees the fixed image, the moving image warped by
the upsampled field of level ``l-1`` and that field, all on its own grid, and
predicts a residual displacement that is *added* to the upsampled field (the
non-diffeomorphic variant the RWCNet paper compared against: no velocity, no
scaling and squaring). Coarse levels are trained first and frozen while a finer
one trains, with the same ``forward``/``freeze_stages`` interface as
:class:`~rwcnet.model.cascade.RWCNet`, so the training loop runs it unchanged.

Presets (:data:`LAPIRN_PRESETS`, ``lapirn_preset(name)``; also in :data:`rwcnet.model.presets.PRESETS`):

* ``lapirn`` — widths of the LapIRN paper's order (28 channels, one stride-2
  level, 5 residual blocks); a GPU design.
* ``lapirn-cpu`` — narrow (4/8/16 channels over two stride-2 levels, 2 blocks),
  so that a 160x192x224 pair registers in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from rwcnet import geometry
from rwcnet.geometry.layout import pad_to_multiple
from rwcnet.presets import Presets
from rwcnet.model.cascade import CascadeOutput, StageResult, StagewiseModel
from rwcnet.model.tiling import Box

#: Standard deviation of each level's output convolution at init: an untrained LapIRN gives a field of ~1e-4 voxels.
HEAD_INIT_STD = 1e-5


@dataclass(frozen=True)
class LevelView:
    """What the training loop reads of a level (as of a :class:`~rwcnet.model.config.StageConfig`)."""

    downsample: int


class LapIRNConfig(BaseModel):
    """The pyramid: levels' downsample factors (coarse to fine) and the width of every level's network."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["lapirn"] = "lapirn"
    name: str = "lapirn"
    downsample: list[int] = Field(default_factory=lambda: [4, 2, 1], description="level grid = full grid / downsample")
    widths: list[int] = Field(
        default_factory=lambda: [28, 28],
        description="channels on the level grid, then after each stride-2 convolution (len - 1 downsamplings)",
    )
    blocks: int = Field(5, ge=0, le=32, description="residual blocks at the coarsest resolution of each level")
    halo: int = Field(16, ge=0, le=128, description="context voxels (level grid) around a training region")

    @model_validator(mode="after")
    def _check(self) -> "LapIRNConfig":
        factors = self.downsample
        if not factors or any(f < 1 or f > 16 for f in factors):
            raise ValueError(f"downsample factors must be 1..16, at least one, got {factors}")
        if any(a <= b or a % b for a, b in zip(factors, factors[1:])):
            raise ValueError(f"levels must go from coarse to fine, each factor a multiple of the next, got {factors}")
        if not self.widths or len(self.widths) > 5 or any(w < 2 or w > 512 for w in self.widths):
            raise ValueError(f"widths must be 1 to 5 channel counts of 2..512, got {self.widths}")
        return self

    @property
    def stages(self) -> list[LevelView]:
        """One entry per level, coarse to fine (the training loop's name for them)."""
        return [LevelView(f) for f in self.downsample]

    @property
    def alignment(self) -> int:
        """Input sizes are padded to a multiple of this (coarsest factor times the networks' total stride)."""
        return self.downsample[0] * 2 ** (len(self.widths) - 1)


#: ``lapirn`` (paper-like widths, GPU) and ``lapirn-cpu`` (narrow, CPU); each lookup builds a new config.
LAPIRN_PRESETS: Presets[LapIRNConfig] = Presets("LapIRN", {
    "lapirn": lambda: LapIRNConfig(name="lapirn"),
    "lapirn-cpu": lambda: LapIRNConfig(name="lapirn-cpu", widths=[4, 8, 16], blocks=2, halo=16),
})


def lapirn_preset(name: str) -> LapIRNConfig:
    """A LapIRN preset by name (:data:`LAPIRN_PRESETS`); an unknown name is a ``ValueError``."""
    return LAPIRN_PRESETS[name]


def _conv(inputs: int, outputs: int, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(inputs, outputs, 3, stride=stride, padding=1)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2)


class _Residual(nn.Module):
    """Pre-activation residual block: ``x + conv(act(conv(act(x))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_act(), _conv(channels, channels), _act(), _conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class LevelNet(nn.Module):
    """One level: a conv encoder (stride-2 steps), residual blocks, a decoder with skips, a 3-channel head.

    Input ``(B, C, X, Y, Z)`` with sizes multiples of ``2 ** (len(widths) - 1)``;
    returns the residual field ``(B, 3, X, Y, Z)`` (voxels of this grid) and
    the decoder's last features ``(B, widths[0], X, Y, Z)``.
    """

    def __init__(self, inputs: int, widths: list[int], blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(inputs, widths[0]), _act(), _conv(widths[0], widths[0]), _act())
        self.down = nn.ModuleList(nn.Sequential(_conv(a, b, 2), _act()) for a, b in zip(widths, widths[1:]))
        self.blocks = nn.Sequential(*(_Residual(widths[-1]) for _ in range(blocks)))
        self.up = nn.ModuleList(nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in zip(widths, widths[1:]))
        self.merge = nn.ModuleList(nn.Sequential(_conv(2 * a, a), _act()) for a in widths[:-1])
        self.head = _conv(widths[0], 3)
        nn.init.normal_(self.head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = [self.stem(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = self.blocks(skips.pop())
        for up, merge in zip(reversed(self.up), reversed(self.merge)):
            y = merge(torch.cat([up(y), skips.pop()], dim=1))
        return self.head(y), y


class LapIRN(StagewiseModel):
    """LapIRN (non-diffeomorphic): one :class:`LevelNet` per pyramid level, run coarse to fine.

    Inputs are normalised images ``(B, 1, X, Y, Z)`` on one grid, of any size
    (padded to a multiple of ``config.alignment`` and cropped back); the output
    is a pull-back field in voxels of that grid, as for :class:`RWCNet`.
    """

    def __init__(self, config: LapIRNConfig) -> None:
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(
            LevelNet(2 if index == 0 else 5, config.widths, config.blocks) for index in range(len(config.downsample))
        )
        self.carry = nn.ModuleList()  # the training loop's interface: no hidden state passes between levels
        self.upsampler = None  # ... and no learned upsampling to full resolution
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
        """Register ``moving`` to ``fixed`` with the first ``num_stages`` levels (all by default).

        Each level's result holds its total field on its grid; with
        ``sequence=True`` its ``sequence`` is ``[field]`` (one prediction per
        level). ``region`` (a box on the grid of the last level run) restricts
        that level to the box: its network sees the box plus ``config.halo``
        voxels of context and its field covers the box only (patch-wise
        training); the input size must then be a multiple of ``config.alignment``.
        """
        if fixed.shape != moving.shape or fixed.dim() != 5 or fixed.shape[1] != 1:
            raise ValueError(f"expected two (B, 1, X, Y, Z) images of one shape, got {tuple(fixed.shape)} and {tuple(moving.shape)}")
        count = len(self.stages) if num_stages is None else num_stages
        if not 1 <= count <= len(self.stages):
            raise ValueError(f"num_stages must be 1..{len(self.stages)}, got {count}")
        shape = fixed.shape[2:]
        align = self.config.alignment
        pad = [(-n) % align for n in shape]
        if region is not None and any(pad):
            raise ValueError(f"a training region needs sizes that are multiples of {align}, got {tuple(shape)}")
        fixed_p, moving_p = (pad_to_multiple(x, align) for x in (fixed, moving))
        results: list[StageResult] = []
        for index in range(count):
            with torch.set_grad_enabled(index >= self.frozen_stages and torch.is_grad_enabled()):
                previous = results[-1] if results else None
                last = index == count - 1
                results.append(self._run_level(index, fixed_p, moving_p, previous, sequence, region if last else None))
        final = results[-1]
        factor = self.config.downsample[count - 1]
        if region is not None:
            target = tuple(factor * (s.stop - s.start) for s in region)
            origin = tuple(factor * s.start for s in region)
            return CascadeOutput(geometry.resize_field(final.field, target), results, origin)
        field = geometry.resize_field(final.field, tuple(fixed_p.shape[2:]))
        return CascadeOutput(field[(slice(None), slice(None), *(slice(0, n) for n in shape))], results)

    def _run_level(
        self,
        index: int,
        fixed: torch.Tensor,
        moving: torch.Tensor,
        previous: StageResult | None,
        sequence: bool,
        region: Box | None,
    ) -> StageResult:
        full = tuple(fixed.shape[2:])
        grid = tuple(n // self.config.downsample[index] for n in full)
        fixed_s = geometry.resize_volume(fixed, grid)
        if previous is None:
            prior = fixed.new_zeros(fixed.shape[0], 3, *grid)
            inputs = torch.cat([fixed_s, geometry.resize_volume(moving, grid)], dim=1)
        else:
            prior = geometry.resize_field(previous.field, grid)
            warped = geometry.warp(moving, geometry.resize_field(previous.field, full))
            inputs = torch.cat([fixed_s, geometry.resize_volume(warped, grid), prior], dim=1)
        box = (slice(None), slice(None), *(region if region is not None else (slice(0, n) for n in grid)))
        if region is None:
            residual, features = self.stages[index](inputs)
        else:
            step = 2 ** (len(self.config.widths) - 1)
            halo = self.config.halo
            window = [slice(max(0, s.start - halo) // step * step, min(n, -(-(s.stop + halo) // step) * step))
                      for s, n in zip(region, grid)]
            residual, features = self.stages[index](inputs[(slice(None), slice(None), *window)])
            inner = (slice(None), slice(None), *(slice(s.start - w.start, s.stop - w.start) for s, w in zip(region, window)))
            residual, features = residual[inner], features[inner]
        field = prior[box] + residual  # LapIRN's pyramid step: upsampled coarse field + this level's residual
        return StageResult(
            field=field,
            hidden=features,
            sequence=[field] if sequence else [],
            origin=tuple(s.start for s in region) if region is not None else (0, 0, 0),
        )
