"""Training configuration: one validated object, read from YAML or a preset name.

A :class:`TrainingConfig` holds the network preset, the stage schedule
(paper Table 1: one *phase* per trained stage, coarser stages frozen), the
loss weights (:class:`rwcnet.losses.LossConfig`), the data (a Learn2Reg
folder, semi-synthetic and real pairs, intensity normalisation), the
held-out validation pairs and the checkpoint cadence.

Presets (:func:`training_preset`):

* ``oasis`` and ``nlst`` — the paper's schedules and losses for the ``reference``
  network (a GPU job: 30000 / 45000 / 60000 steps); give the data folder with ``--data``.
* ``cpu-brain`` — the ``cpu`` network on ``../shared/data/brain`` within about two
  hours on 2 cores: semi-synthetic pairs from the unlabelled subjects plus real
  pairs among them; the labelled pair 0001/0002 is never seen in training or
  checkpoint selection and is scored once at the end.
* ``synth-brain`` — the ``cpu`` network from label-map synthesis (SynthMorph-style) plus brains 0003-0005.
* ``distill-brain`` — the ``cpu`` network learns the fields of rwcnet's own optimisation on brains 0003-0005;
  ``distill-brain-joint`` — the same data in one phase where both stages train together on input crops (the
  shipped ``brain`` model is the mean of two such runs).
* ``cpu-lung`` — the ``cpu`` network on breathing-like deformations of the one shared thorax CT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from rwcnet.errors import InputError
from rwcnet.intensity import CT_RANGES
from rwcnet.losses import LossConfig, loss_config
from rwcnet.model.config import ModelConfig
from rwcnet.model.presets import model_preset
from rwcnet.presets import Presets
from rwcnet.training.data_config import (BreathingConfig, DataConfig, Normalisation, Strict, SynthMorphConfig,
                                         SyntheticConfig, TeacherConfig)


class PhaseConfig(Strict):
    """One training phase: which network stage trains, for how long, on what patches, at what resolution."""

    stage: int = Field(ge=1, description="network stage trained (1 = coarsest); earlier stages are frozen")
    steps: int = Field(ge=0, description="optimiser steps of this phase")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate (paper: 3e-4)")
    batch_size: int = Field(1, ge=1, description="global batch (samples per optimiser step, all processes)")
    patch: float | tuple[int, int, int] | None = Field(
        None, description="training region on the stage grid: None = whole grid, a fraction per axis, or a size in voxels"
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="clip the gradient's global L2 norm to this value before each step (RAFT: 1.0); None = off"
    )
    loss_grid: Literal["stage", "full"] = Field(
        "full", description="compute the loss on the stage grid (cheap) or at full resolution (trains the upsampler)"
    )
    joint: bool = Field(
        False, description="train every stage up to `stage`, their carries and the convex upsampler together, none frozen "
        "(the earlier stages then run with gradients: give a `crop`)"
    )
    crop: int | tuple[int, int, int] | None = Field(
        None, description="cut each pair to a box of this many full-resolution voxels per axis (a multiple of the network's "
        "alignment), centred on a random foreground voxel, before the network sees it; label-map pairs are synthesised "
        "on that box; excludes `patch`"
    )

    @field_validator("patch")
    @classmethod
    def _patch(cls, value):
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(f"a patch fraction must be in (0, 1], got {value}")
        if isinstance(value, tuple) and min(value) < 2:
            raise ValueError(f"a patch size must be at least 2 voxels per axis, got {value}")
        return value

    @field_validator("crop")
    @classmethod
    def _crop(cls, value):
        sizes = (value,) * 3 if isinstance(value, int) else value
        if sizes is not None and min(sizes) < 8:
            raise ValueError(f"a crop must be at least 8 voxels per axis, got {value}")
        return sizes

    @model_validator(mode="after")
    def _crop_or_patch(self) -> "PhaseConfig":
        if self.crop is not None and self.patch is not None:
            raise ValueError("give a phase either `crop` (full-resolution input box) or `patch` (stage-grid region), not both")
        return self


class ValidationConfig(Strict):
    """Held-out semi-synthetic pairs (fixed seeds, stronger deformations) for checkpoint selection."""

    pairs: int = Field(2, ge=0)
    seed: int = 1_000_003
    magnitude_mm: float = Field(10.0, gt=0)
    smoothness_mm: float = Field(20.0, gt=0)
    every: int = Field(50, ge=1, description="validate every this many steps (and at the end of each phase)")
    select: Literal["best", "last"] = Field("best", description="weights kept at the end of a phase")
    at_start: bool = Field(False, description="also validate before a phase's first step (the starting point of its curve)")
    metric: Literal["epe", "dice", "teacher"] = Field(
        "epe", description="selects the best weights: endpoint error of the semi-synthetic pairs, Dice of the label-map "
        "pairs, or endpoint error against the teacher on its validation pairs (data.teacher.validation)")


class TrainingConfig(Strict):
    """Everything a training run needs except the output folder."""

    name: str = "custom"
    model: str | ModelConfig = "cpu"
    seed: int = 0
    phases: list[PhaseConfig]
    losses: LossConfig = LossConfig(dice=0.0)
    supervised: float = Field(0.0, ge=0, description="weight of the endpoint error (mm) against a known field")
    data: DataConfig
    validation: ValidationConfig = ValidationConfig()
    checkpoint_every: int = Field(10, ge=1, description="steps between checkpoints (a crash loses at most this many)")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None keeps torch's default")
    report: bool = Field(True, description="score the dataset's registration_val pairs with the final model")
    print_every: int = Field(10, ge=1, description="steps between plain progress lines when not on a terminal")

    @model_validator(mode="after")
    def _check(self) -> "TrainingConfig":
        count = len(self.network().stages)
        for phase in self.phases:
            if phase.stage > count:
                raise ValueError(f"phase trains stage {phase.stage} but the network has {count} stages")
            if phase.loss_grid == "stage" and (self.losses.dice or self.losses.tre):
                raise ValueError("dice and tre losses need loss_grid: full")
        label_pairs = self.data.synthmorph.validation_pairs if self.data.synthmorph is not None else 0
        if self.validation.metric == "dice" and not label_pairs:
            raise ValueError("validation.metric: dice needs data.synthmorph with validation_pairs > 0")
        if self.validation.metric == "teacher" and (self.data.teacher is None or not self.data.teacher.validation):
            raise ValueError("validation.metric: teacher needs data.teacher with validation pairs")
        if self.validation.metric == "epe" and not self.validation.pairs and label_pairs:
            raise ValueError("validation.metric: epe needs validation.pairs > 0 (or use metric: dice)")
        return self

    def network(self) -> ModelConfig:
        """The network configuration (a preset name resolved)."""
        return model_preset(self.model) if isinstance(self.model, str) else self.model

    @property
    def total_steps(self) -> int:
        return sum(phase.steps for phase in self.phases)


def _oasis() -> TrainingConfig:
    return TrainingConfig(
        name="oasis",
        model="reference",
        phases=[
            PhaseConfig(stage=1, steps=30000, patch=None),
            PhaseConfig(stage=2, steps=45000, patch=0.5),
            PhaseConfig(stage=3, steps=60000, patch=0.5),
        ],
        losses=loss_config("oasis"),
        data=DataConfig(dataset="OASIS", real_fraction=1.0, synthetic=None),
        validation=ValidationConfig(pairs=4, every=1000),
        checkpoint_every=500,
    )


def _nlst() -> TrainingConfig:
    return TrainingConfig(
        name="nlst",
        model="reference",
        phases=[
            PhaseConfig(stage=1, steps=30000, patch=None),
            PhaseConfig(stage=2, steps=45000, patch=0.5),
            PhaseConfig(stage=3, steps=60000, patch=0.5),
        ],
        losses=loss_config("nlst"),
        data=DataConfig(
            dataset="NLST",
            real_fraction=1.0,
            synthetic=None,
            normalisation=Normalisation(kind="range", low=-4000.0, high=16000.0),
            foreground_threshold=None,
        ),
        validation=ValidationConfig(pairs=4, every=1000, magnitude_mm=15.0, smoothness_mm=30.0),
        checkpoint_every=500,
    )


def _cpu_losses() -> LossConfig:
    """The image loss of the CPU presets: 10 MSE + 0.1 L1 smoothness over the iterations (γ 0.8)."""
    return LossConfig(mse=10.0, dice=0.0, regulariser=0.1, sequence_gamma=0.8)


def _brain_data(real_fraction: float = 0.25, **extra) -> DataConfig:
    """Brains 0003-0005 of ../shared/data/brain (0001/0002 held out): ``real_fraction`` real pairs, the rest semi-synthetic."""
    return DataConfig(dataset="../shared/data/brain", exclude=["BRAIN_0001_0000", "BRAIN_0002_0000"],
                      real_fraction=real_fraction,
                      synthetic=SyntheticConfig(magnitude_mm=(2.0, 8.0), smoothness_mm=(15.0, 30.0)), **extra)


def _cpu_brain() -> TrainingConfig:
    # Budget: 2 hours on 2 cores. Stage 1 trains on 24^3 patches of its 1/4-resolution grid (encoders on
    # the whole grid, the recurrent loop on the patch): ~8.5 s/step with 2 threads on an idle machine
    # (2026-11-26), three times the steps of whole-grid training (25 s/step) in the same time; a first
    # run of 96 whole-grid steps did not beat zero displacement on validation. Stage 2 trains on 32^3
    # patches of its 1/2-resolution grid with the loss at full resolution (trains the convex upsampler).
    # lr 1e-3 rather than the paper's 3e-4 (this schedule has ~0.5 % of the paper's steps), gradients
    # clipped to norm 1 as RAFT does.
    return TrainingConfig(
        name="cpu-brain",
        model="cpu",
        phases=[
            PhaseConfig(stage=1, steps=CPU_BRAIN_STEPS[0], lr=1e-3, patch=(24, 24, 24), loss_grid="stage"),
            PhaseConfig(stage=2, steps=CPU_BRAIN_STEPS[1], lr=1e-3, patch=(32, 32, 32), loss_grid="full"),
        ],
        losses=_cpu_losses(),
        supervised=0.05,
        data=_brain_data(),
        validation=ValidationConfig(pairs=2, every=50, magnitude_mm=8.0, smoothness_mm=20.0),
        checkpoint_every=10,
        threads=2,
    )


def _synth_brain() -> TrainingConfig:
    # SynthMorph-style training of the ``cpu`` network (issue 18): 80 % of the samples are pairs synthesised from
    # the SynthSeg label maps 1-18 at the trained stage's resolution, cropped to the training patch (soft Dice on
    # 29 merged classes + L2 smoothness); the rest are semi-synthetic and real pairs of brains 0003-0005 (image
    # loss + endpoint error, as cpu-brain). Brains 0001/0002 are read only by the final report. Selection: label
    # Dice on fixed pairs of maps 19-20. Measured seconds per step and why this schedule: docs/training.md.
    return TrainingConfig(
        name="synth-brain",
        model="cpu",
        phases=[
            PhaseConfig(stage=1, steps=SYNTH_BRAIN_STEPS[0], lr=1e-3, patch=(24, 24, 24), loss_grid="stage"),
            PhaseConfig(stage=2, steps=SYNTH_BRAIN_STEPS[1], lr=1e-3, patch=(32, 32, 32), loss_grid="stage"),
            PhaseConfig(stage=2, steps=SYNTH_BRAIN_STEPS[2], lr=5e-4, patch=(32, 32, 32), loss_grid="full"),
        ],
        losses=_cpu_losses(),
        supervised=0.05,
        data=_brain_data(synthmorph=SynthMorphConfig()),
        validation=ValidationConfig(pairs=2, every=SYNTH_BRAIN_VALIDATE_EVERY, magnitude_mm=8.0, smoothness_mm=20.0,
                                    metric="dice", at_start=True),
        checkpoint_every=25,
        threads=2,
    )


def _distill_brain() -> TrainingConfig:
    # Distillation (issue 18): the network learns the fields of rwcnet's own optimisation (instance optimisation +
    # fine-scale refinement, no network: Dice 0.744 on the report pair, where the network alone reaches 0.655) on
    # the real pairs of brains 0003-0005, a target a label-free image loss cannot give. 0003<->0005 are held out for
    # selection (endpoint error against the teacher, both contrasts). A third of the moving images have their
    # contrast inverted (the target is the same field), and the fixed image is deformed by up to 4 mm more (the
    # target composed), so four real pairs give many. 20 % are cpu-brain's semi-synthetic pairs (exact truth).
    # No image loss: an inverted moving image has no MSE to match. Starts from the cpu-brain model (--init
    # tests/fixtures/brain_cpu_brain_v1.pt); its run (training/distill-brain/) is where the shipped brain.pt started.
    return TrainingConfig(
        name="distill-brain",
        model="cpu",
        phases=[
            PhaseConfig(stage=1, steps=DISTILL_BRAIN_STEPS[0], lr=5e-4, patch=(24, 24, 24), loss_grid="stage"),
            PhaseConfig(stage=2, steps=DISTILL_BRAIN_STEPS[1], lr=5e-4, patch=(32, 32, 32), loss_grid="full"),
        ],
        losses=LossConfig(mse=0.0, dice=0.0, regulariser=0.1, sequence_gamma=0.8),
        supervised=1.0,
        data=_brain_data(real_fraction=0.0, teacher=TeacherConfig(fraction=0.8, validation=[("BRAIN_0003_0000", "BRAIN_0005_0000")],
                                                                  invert_moving=1 / 3, warp_fixed_mm=(0.0, 4.0))),
        validation=ValidationConfig(pairs=2, every=50, magnitude_mm=8.0, smoothness_mm=20.0, metric="teacher", at_start=True),
        checkpoint_every=10,
        threads=2,
    )


def _distill_brain_joint() -> TrainingConfig:
    # distill-brain's data, losses and selection in one joint phase: both stages, their carry and the convex
    # upsampler train together on 80^3 full-resolution crops, none frozen. On smooth deformations of 2 mm brain
    # crops the network learned far faster than stage by stage (benchmarks/end_to_end_learning.py,
    # docs/training.md). The shipped brain.pt is the mean of this preset's run from distill-brain run 1's model and
    # of a run with teacher fraction 0.5 from that run's model (training/README.md).
    base = _distill_brain().model_dump()
    base.update(name="distill-brain-joint", validation={**base["validation"], "every": 100},
                phases=[dict(stage=2, steps=DISTILL_JOINT_STEPS, lr=5e-4, crop=(80, 80, 80), joint=True, loss_grid="full")])
    return TrainingConfig.model_validate(base)


def _cpu_lung() -> TrainingConfig:
    # The shipped ``lung`` model (issue 18): the ``cpu`` network on the one shared thorax CT
    # (../shared/data/lung, a folder of images without a dataset JSON), deformed by breathing-like fields
    # (75 %: cranio-caudal motion growing towards the diaphragm, 5-25 mm, inhale or exhale, chest-wall
    # expansion) and by random smooth fields (25 %, 5-15 mm), in the HU window register uses for CT. The
    # cpu-brain schedule; validation on breathing pairs of 18 mm with seeds of their own.
    low, high = CT_RANGES["window"]
    return TrainingConfig(
        name="cpu-lung",
        model="cpu",
        phases=[
            PhaseConfig(stage=1, steps=CPU_LUNG_STEPS[0], lr=1e-3, patch=(24, 24, 24), loss_grid="stage"),
            PhaseConfig(stage=2, steps=CPU_LUNG_STEPS[1], lr=1e-3, patch=(32, 32, 32), loss_grid="full"),
        ],
        losses=_cpu_losses(),
        supervised=0.05,
        data=DataConfig(
            dataset="../shared/data/lung",
            real_fraction=0.0,
            synthetic=SyntheticConfig(magnitude_mm=(5.0, 15.0), smoothness_mm=(20.0, 40.0), breathing=BreathingConfig()),
            normalisation=Normalisation(kind="window", low=low, high=high),
            modality="ct",
            foreground_threshold=0.05,
        ),
        validation=ValidationConfig(pairs=2, every=50, magnitude_mm=18.0, smoothness_mm=30.0),
        checkpoint_every=10,
        threads=2,
    )


#: Steps of the two ``cpu-lung`` phases (patches of the 1/4- and the 1/2-resolution grids).
CPU_LUNG_STEPS = (250, 90)

#: Steps of the three ``synth-brain`` phases: 24^3 patches of the 1/4 grid; 32^3 patches of the 1/2 grid with
#: the loss on that grid; the same patches with the loss at full resolution (trains the convex upsampler).
SYNTH_BRAIN_STEPS = (4000, 1500, 1000)
SYNTH_BRAIN_VALIDATE_EVERY = 100

#: Steps of the two ``distill-brain`` phases (patches of the 1/4- and the 1/2-resolution grids).
DISTILL_BRAIN_STEPS = (300, 150)

#: Steps of the one joint ``distill-brain-joint`` phase (80^3 crops, both stages).
DISTILL_JOINT_STEPS = 400

#: Steps of the two ``cpu-brain`` phases (patches of the 1/4- and the 1/2-resolution grids).
CPU_BRAIN_STEPS = (250, 90)

TRAINING_PRESETS: Presets[TrainingConfig] = Presets(
    "training", {"oasis": _oasis, "nlst": _nlst, "cpu-brain": _cpu_brain, "synth-brain": _synth_brain,
                 "distill-brain": _distill_brain, "distill-brain-joint": _distill_brain_joint, "cpu-lung": _cpu_lung})


def training_preset(name: str) -> TrainingConfig:
    """A training preset by name: ``oasis``, ``nlst``, ``cpu-brain``, ``synth-brain``, ``distill-brain``,
    ``distill-brain-joint`` or ``cpu-lung``."""
    if name not in TRAINING_PRESETS:
        raise InputError(f"unknown training preset {name!r}; use one of {', '.join(TRAINING_PRESETS)} or a YAML file")
    return TRAINING_PRESETS[name]


def load_config(source: str | Path) -> TrainingConfig:
    """A preset name or a YAML file, validated; :class:`InputError` names the file and the problem."""
    if str(source) in TRAINING_PRESETS:
        return training_preset(str(source))
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: no such training config file (presets: {', '.join(TRAINING_PRESETS)})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise InputError(f"{path}: cannot read the YAML training config ({error})") from error
    if not isinstance(data, dict):
        raise InputError(f"{path}: a training config must be a YAML mapping")
    if "preset" in data:
        base = training_preset(str(data.pop("preset"))).model_dump(mode="json")
        data = _merge(base, data)
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as error:
        raise InputError(f"{path}: invalid training config: {error}") from error


def _merge(base: dict, changes: dict) -> dict:
    """``base`` updated recursively by ``changes`` (mappings merged, other values replaced)."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def dump_config(config: TrainingConfig) -> str:
    """The config as YAML text (loads back to an equal config)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
