"""Network configuration: one validated object per stage, one for the cascade, and named presets.

Presets (:data:`RWCNET_PRESETS`, a :class:`rwcnet.presets.Presets`; ``rwcnet_preset(name)`` also
builds ``<base>:<ablation>`` and ``steps=N``; :func:`rwcnet.model.presets.model_preset` also knows LapIRN's):

* ``reference`` — the paper's Table 1 with the reference code's sizes (a GPU design):
  1/4, 1/2 and full resolution, 12/12/4 iterations, radius 3/3/2, patch factor 1/0.5/0.5,
  16 feature channels, hidden state 64.
* ``cpu`` — the fast CPU design (see ``docs/cpu_preset.md``): 1/4 and 1/2 resolution stages
  with narrow, separable GRUs, then a learned convex upsampling to full resolution.
* Ablations of the paper's Table 3, applied to ``reference`` or, as ``cpu:<ablation>``, to
  ``cpu``: ``single_resolution`` (the first stage only), ``no_correlation`` (the GRU gets the
  concatenated features instead of the correlation), ``steps=2`` (two iterations per stage).
* ``lapirn``, ``lapirn-cpu`` — the LapIRN comparator's configs (:mod:`rwcnet.model.lapirn`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rwcnet.presets import Presets, UnknownPreset


class StageConfig(BaseModel):
    """One resolution of the cascade."""

    model_config = ConfigDict(extra="forbid")

    downsample: int = Field(4, ge=1, le=16, description="stage grid = full grid / downsample")
    iterations: int = Field(12, ge=1, le=64, description="recurrent update steps")
    radius: int = Field(3, ge=1, le=6, description="correlation radius r: (2r+1)^3 shifts")
    correlation: Literal["dot", "sad", "none"] = Field(
        "dot", description="dot: paper (dot product / sqrt(C)); sad: reference code; none: ablation"
    )
    readout: bool = Field(
        False,
        description="add g * smooth(soft-argmax(correlation / T)) to each update, g and T learnt scalars "
        "(not in the paper: a displacement estimate that small training budgets can use at once)",
    )
    readout_gain: float = Field(0.0, ge=0.0, le=2.0, description="initial readout gain g")
    readout_temperature: float = Field(1.0, gt=0.0, le=10.0, description="initial softmax temperature T (cost units)")
    readout_smoothing: int = Field(
        1, ge=1, le=15, description="box filter width (stage voxels, odd) applied twice to the estimate; 1 = none"
    )
    rewarp: Literal["features", "image"] = Field(
        "features", description="features: warp the moving features; image: re-extract from the warped image"
    )
    patch_factor: float = Field(1.0, gt=0.0, le=1.0, description="tile size as a fraction of the stage grid")
    tiling: Literal["overlap", "disjoint"] = Field("overlap", description="overlap: halo + linear blending")
    halo: int = Field(8, ge=0, le=64, description="extra context voxels on each side of a tile (stage grid)")
    feature_channels: int = Field(16, ge=1, le=256)
    encoder_width: int = Field(16, ge=4, le=256, description="channels of the first encoder level")
    hidden_channels: int = Field(64, ge=4, le=512)
    context_channels: int = Field(0, ge=0, le=512, description="RAFT context split; 0 = reference (h0 only)")
    separable_gru: bool = Field(False, description="three 1-D GRU passes instead of one dense 3^3 GRU")
    gru_kernel: int = Field(3, ge=1, le=7)
    flow_kernel: int = Field(7, ge=1, le=9, description="first convolution of the flow branch in the motion encoder")
    motion_channels: int = Field(64, ge=8, le=512, description="output channels of the motion encoder")
    motion_out_kernel: int = Field(3, ge=1, le=5, description="kernel of the motion encoder's last convolution")
    head_channels: int = Field(128, ge=8, le=512, description="hidden width of the flow head")

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        if any(k % 2 == 0 for k in (self.gru_kernel, self.flow_kernel, self.motion_out_kernel)):
            raise ValueError("gru_kernel, flow_kernel and motion_out_kernel must be odd")
        if self.readout_smoothing % 2 == 0:
            raise ValueError("readout_smoothing must be odd")
        if self.motion_channels <= 3:
            raise ValueError("motion_channels must exceed 3 (the flow is appended)")
        return self


class ModelConfig(BaseModel):
    """The cascade: stages from coarse to fine, plus switches shared by all stages."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    stages: list[StageConfig]
    final_upsampling: Literal["trilinear", "convex"] = Field(
        "trilinear", description="how the last stage's field reaches full resolution when downsample > 1"
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout on the feature encoders (paper: 0.5)")
    detach_flow: bool = Field(True, description="RAFT: no gradient through earlier updates of the flow")
    flow_head_init_scale: float = Field(0.01, ge=0.0, description="scale of the flow head's last layer at init")
    reference_compat: bool = Field(False, description="reproduce the reference code's defects (ablation only)")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if not self.stages:
            raise ValueError("a model needs at least one stage")
        factors = [stage.downsample for stage in self.stages]
        if any(a < b for a, b in zip(factors, factors[1:])):
            raise ValueError(f"stages must go from coarse to fine, got downsample factors {factors}")
        if any(a % b for a, b in zip(factors, factors[1:])):
            raise ValueError(f"each downsample factor must be a multiple of the next, got {factors}")
        return self

    @property
    def alignment(self) -> int:
        """Input sizes are padded to a multiple of this (coarsest factor times the encoder's stride 2)."""
        return self.stages[0].downsample * 2


def _reference() -> ModelConfig:
    return ModelConfig(
        name="reference",
        stages=[
            StageConfig(downsample=4, iterations=12, radius=3, patch_factor=1.0),
            StageConfig(downsample=2, iterations=12, radius=3, patch_factor=0.5),
            StageConfig(downsample=1, iterations=4, radius=2, patch_factor=0.5),
        ],
    )


# Measured on held-out semi-synthetic brains with untrained features (docs/cpu_preset.md): unsmoothed
# soft-argmax estimates are noisy per voxel and their sum over iterations drifts; a 7-voxel box filter
# (applied twice) and a cold softmax make the readout reduce the error from the first step.
_CPU_READOUT = dict(readout=True, readout_gain=0.5, readout_temperature=0.1, readout_smoothing=7)


def _cpu() -> ModelConfig:
    return ModelConfig(
        name="cpu",
        stages=[
            StageConfig(
                downsample=4, iterations=4, radius=2, correlation="sad", feature_channels=16, encoder_width=8,
                **_CPU_READOUT, hidden_channels=24, context_channels=8, separable_gru=True, gru_kernel=3,
                flow_kernel=3, motion_channels=24, motion_out_kernel=1, head_channels=24,
            ),
            StageConfig(
                downsample=2, iterations=3, radius=2, correlation="sad", feature_channels=8, encoder_width=4,
                **_CPU_READOUT, hidden_channels=12, context_channels=4, separable_gru=True, gru_kernel=3,
                flow_kernel=3, motion_channels=16, motion_out_kernel=1, head_channels=12,
            ),
        ],
        final_upsampling="convex",
        dropout=0.1,
    )


def _ablate(config: ModelConfig, ablation: str) -> ModelConfig:
    data = config.model_dump()
    if ablation == "single_resolution":
        data["stages"] = data["stages"][:1]
        data["final_upsampling"] = "trilinear"
    elif ablation == "no_correlation":
        for stage in data["stages"]:
            stage["correlation"] = "none"
            stage["readout"] = False  # the readout reads the correlation
    elif ablation.startswith("steps="):
        steps = int(ablation.split("=", 1)[1])
        for stage in data["stages"]:
            stage["iterations"] = steps
    else:
        raise ValueError(f"unknown ablation {ablation!r}")
    data["name"] = f"{config.name}:{ablation}"
    return ModelConfig.model_validate(data)


def _reference_ablation(ablation: str):
    return lambda: _ablate(_reference(), ablation)


#: The named RWCNet configurations (each lookup builds a new, mutable config). The ablations here
#: apply to ``reference``; :func:`rwcnet_preset` also builds ``cpu:<ablation>`` and ``steps=N``.
RWCNET_PRESETS: Presets[ModelConfig] = Presets("model", {
    "reference": _reference,
    "cpu": _cpu,
    **{name: _reference_ablation(name) for name in ("single_resolution", "no_correlation", "steps=2")},
})
_BASES = ("reference", "cpu")


def rwcnet_preset(name: str) -> ModelConfig:
    """An RWCNet preset by name: one of :data:`RWCNET_PRESETS`, ``<base>:<ablation>`` or ``steps=N``."""
    if name in RWCNET_PRESETS:
        return RWCNET_PRESETS[name]
    base, _, ablation = name.partition(":")
    if base in _BASES and ablation:
        return _ablate(RWCNET_PRESETS[base], ablation)
    if not ablation and base.startswith("steps="):
        return _ablate(_reference(), base)
    raise UnknownPreset(f"unknown model preset {name!r}; use one of {sorted(RWCNET_PRESETS)}, "
                        f"<base>:<ablation> (base {' or '.join(_BASES)}) or steps=N")
