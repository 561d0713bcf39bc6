"""The data section of a training config: where training pairs come from and how they are made.

:class:`DataConfig` names the Learn2Reg folder (or a folder of images), the share of real pairs,
semi-synthetic pairs (:class:`SyntheticConfig`: random smooth fields, or breathing-like fields of
thorax CT, :class:`BreathingConfig`), pairs synthesised from label maps (:class:`SynthMorphConfig`)
and the intensity normalisation (:class:`Normalisation`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rwcnet.synthetic import IntensitySettings


class Strict(BaseModel):
    """A config section that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid")


class BreathingConfig(Strict):
    """Breathing-like semi-synthetic pairs of a thorax CT (:func:`rwcnet.synthetic.breathing_deformation`).

    A share ``fraction`` of the semi-synthetic samples deform the image by a
    breathing field instead of a random one: cranio-caudal motion that grows
    towards the diaphragm, largest ``amplitude_mm`` (drawn uniformly), an
    anterior-posterior chest-wall expansion of ``expansion`` × the amplitude,
    and random smooth variation of ``variation`` × the amplitude. With
    probability ``exhale_fraction`` the motion is reversed (the diaphragm moves
    up). The lung mask (:func:`rwcnet.masks.lung_mask`, intensities in HU
    before normalisation) and the cranio-caudal and anterior-posterior axes
    (from the image's orientation) are found once per image.
    """

    fraction: float = Field(0.75, ge=0, le=1)
    amplitude_mm: tuple[float, float] = (5.0, 25.0)
    expansion: tuple[float, float] = (0.1, 0.3)
    variation: float = Field(0.1, ge=0)
    exhale_fraction: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> "BreathingConfig":
        for name in ("amplitude_mm", "expansion"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be a range 0 <= low <= high, got {(lo, hi)}")
        return self


class SyntheticConfig(Strict):
    """Semi-synthetic pairs: an image and its copy warped by a known smooth random deformation.

    The largest displacement (mm) and the smoothness (Gaussian std, mm) are
    drawn uniformly per sample from the given ranges. The deformation is
    made on a grid ``generation_downsample`` times coarser (it is smooth on
    the scale of ``smoothness_mm``) and brought to full resolution trilinearly.
    """

    magnitude_mm: tuple[float, float] = (2.0, 8.0)
    smoothness_mm: tuple[float, float] = (15.0, 30.0)
    min_jacobian: float = Field(0.1, ge=0, lt=1)
    generation_downsample: int = Field(2, ge=1, le=8)
    intensity: IntensitySettings | None = IntensitySettings()
    breathing: BreathingConfig | None = Field(None, description="breathing-like pairs of thorax CT (lung models)")

    @model_validator(mode="after")
    def _ranges(self) -> "SyntheticConfig":
        for name in ("magnitude_mm", "smoothness_mm"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < low <= high, got {(lo, hi)}")
        return self


class SynthMorphConfig(Strict):
    """Pairs synthesised from label maps (:mod:`rwcnet.training.synthmorph`), trained with a soft Dice loss on merged classes.

    Ranges are ``(low, high)`` drawn uniformly per image. Synthesis runs at
    the resolution of the stage being trained (its downsampling factor), on
    the grid of the ``reference`` training image (the maps are aligned to it
    and cached in ``cache``, :mod:`rwcnet.training.synthmorph_maps`).
    """

    labels: str = Field("../shared/data/synthseg_labels", description="folder of training_seg_NN.nii.gz and labels.json")
    train_maps: list[int] = Field(default_factory=lambda: list(range(1, 19)), description="map numbers used for training")
    validation_maps: list[int] = Field(default_factory=lambda: [19, 20], description="map numbers used for validation only")
    reference: str = Field("BRAIN_0003_0000", description="training image whose grid the maps are aligned and cropped to")
    cache: str = Field("runs/cache", description="folder for the aligned, downsampled maps")
    fraction: float = Field(0.8, ge=0, le=1, description="share of training samples made from label maps")
    same_map: float = Field(0.3, ge=0, le=1, description="probability that both images of a pair come from one map")
    skull_strip: float = Field(0.75, ge=0, le=1, description="probability that a pair is skull-stripped (else whole head)")
    magnitude_mm: tuple[float, float] = (0.0, 5.0)
    smoothness_mm: tuple[float, float] = (8.0, 20.0)
    rotation_deg: float = Field(3.0, ge=0)
    scaling: float = Field(0.04, ge=0, lt=1)
    shear: float = Field(0.02, ge=0, lt=1)
    translation_mm: float = Field(3.0, ge=0)
    std: tuple[float, float] = (0.01, 0.08)
    blur_mm: tuple[float, float] = (0.0, 2.0)
    bias: tuple[float, float] = (0.0, 0.3)
    gamma_std: float = Field(0.25, ge=0)
    noise: tuple[float, float] = (0.0, 0.02)
    dice: float = Field(1.0, ge=0, description="weight of 1 − soft Dice of the merged classes")
    regulariser: float = Field(1.0, ge=0, description="weight of the gradient regulariser on label pairs")
    regulariser_kind: Literal["l1", "l2"] = "l2"
    validation_pairs: int = Field(4, ge=0, description="fixed synthetic pairs from the validation maps (Dice)")
    validation_factor: int = Field(2, ge=1, description="downsampling factor of the validation pairs' synthesis")

    @model_validator(mode="after")
    def _check(self) -> "SynthMorphConfig":
        for name in ("magnitude_mm", "smoothness_mm", "std", "blur_mm", "bias", "noise"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"synthmorph.{name} must be a range 0 <= low <= high, got {(lo, hi)}")
        if self.smoothness_mm[0] <= 0:
            raise ValueError("synthmorph.smoothness_mm must be positive")
        if set(self.train_maps) & set(self.validation_maps):
            raise ValueError(f"maps {sorted(set(self.train_maps) & set(self.validation_maps))} are both training and validation maps")
        if not self.train_maps:
            raise ValueError("synthmorph.train_maps is empty")
        return self


class TeacherConfig(Strict):
    """Real training pairs whose target is rwcnet's own optimisation of the pair (distillation).

    The teacher is instance optimisation plus the fine-scale refinement, without
    a network (``register(model=None, affine=False)``), run once per ordered
    pair of training images and cached (:mod:`rwcnet.training.teacher`). Its
    field is the known ``truth`` of the sample, scored by the supervised
    endpoint error.
    """

    fraction: float = Field(0.8, ge=0, le=1, description="share of the samples (after label-map pairs) that are teacher pairs")
    validation: list[tuple[str, str]] = Field(
        default_factory=list, description="(fixed, moving) image ids held out from training and used for validation")
    cache: str = Field("runs/cache/teacher", description="folder of the cached teacher fields")
    seed: int = Field(0, description="seed of the teacher's registration")
    invert_moving: float = Field(0.0, ge=0, le=1, description="probability that the moving image's contrast is inverted "
                                 "(rwcnet.intensity.invert_contrast; the target is unchanged)")
    warp_fixed_mm: tuple[float, float] = Field(
        (0.0, 0.0), description="largest displacement (mm, drawn from this range) of a random smooth field that also "
        "deforms the fixed image; the target becomes the composition (0: no extra deformation)")
    warp_smoothness_mm: float = Field(20.0, gt=0, description="smoothness of that extra field")


class Normalisation(Strict):
    """Intensity normalisation: ``none`` (as stored), ``range`` ``(I − low)/(high − low)``, ``window`` (clipped range)."""

    kind: Literal["none", "range", "window"] = "none"
    low: float = 0.0
    high: float = 1.0

    @model_validator(mode="after")
    def _order(self) -> "Normalisation":
        if self.kind != "none" and not self.high > self.low:
            raise ValueError(f"normalisation needs high > low, got {self.low}, {self.high}")
        return self


class DataConfig(Strict):
    """Where the training pairs come from."""

    dataset: str = Field(description="Learn2Reg folder (or its dataset JSON)")
    images: list[str] | None = Field(
        None, description="image ids used for training; default: training images outside registration_val/test"
    )
    exclude: list[str] = Field(default_factory=list, description="image ids never used for training or validation")
    real_fraction: float = Field(0.0, ge=0, le=1, description="share of samples that are real pairs (image loss only)")
    synthetic: SyntheticConfig | None = SyntheticConfig()
    synthmorph: SynthMorphConfig | None = Field(None, description="pairs synthesised from label maps (SynthMorph-style)")
    teacher: TeacherConfig | None = Field(None, description="real pairs with rwcnet's own optimisation as the target")
    normalisation: Normalisation = Normalisation()
    modality: Literal["mr", "ct"] | None = Field(
        None, description="modality recorded in the model file; None = the dataset JSON's (mr without one)")
    foreground_threshold: float | None = Field(
        0.0, description="normalised intensity above which a voxel is foreground (patch centres, validation EPE); None = all"
    )
    num_workers: int = Field(0, ge=0, description="data-loading processes; 0 = generate in the main process")
    cache_images: int = Field(16, ge=1, description="images kept in memory")

    @model_validator(mode="after")
    def _source(self) -> "DataConfig":
        if self.synthetic is None and self.real_fraction < 1.0:
            raise ValueError("without synthetic pairs real_fraction must be 1")
        return self
