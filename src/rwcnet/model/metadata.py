"""What a model file records besides its weights: a typed, versioned :class:`ModelMetadata`, validated on load.

Format 2 (written now) stores ``{"modality", "spacing_mm", "orientation", "normalisation", "training"}``.
Format 1 (the first shipped ``brain.pt``, early checkpoints) stored one flat dict: its known keys are
read into the fields, everything else into ``training``, and a missing ``modality`` reads as ``mr``
(MR weights were the only ones written before it was recorded).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib

MODALITIES = ("mr", "ct")
#: The modality of a model file whose metadata does not record one (files from before it was recorded).
DEFAULT_MODALITY = "mr"
NORMALISATION_KINDS = ("none", "range", "window")


@dataclass(frozen=True)
class ModelMetadata:
    """What a network expects of its inputs and how it was trained.

    ``modality``: ``mr`` or ``ct``, what it was trained on. ``spacing_mm`` (3 floats) and ``orientation``
    (an axis code such as ``"LIA"``): the working grid it was trained on (``None``: it runs on the fixed
    grid). ``normalisation``: ``{kind, low, high}`` of the training config (``None`` or kind ``none``:
    the modality's preset). ``training``: how it was trained (presets, steps, seed, wall seconds,
    images, notes), kept as recorded. Raises ``ValueError`` for an invalid value.
    """

    modality: str = DEFAULT_MODALITY
    spacing_mm: tuple[float, float, float] | None = None
    orientation: str | None = None
    normalisation: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"model modality must be one of {MODALITIES}, not {self.modality!r}")
        if self.spacing_mm is not None:
            values = [self.spacing_mm] * 3 if isinstance(self.spacing_mm, (int, float)) else self.spacing_mm
            spacing = tuple(float(s) for s in values)
            if len(spacing) != 3 or min(spacing) <= 0:
                raise ValueError(f"spacing_mm must be three positive numbers, not {self.spacing_mm!r}")
            object.__setattr__(self, "spacing_mm", spacing)
        if self.orientation is not None:
            try:
                nib.orientations.axcodes2ornt(tuple(self.orientation))
            except Exception as error:
                raise ValueError(f"orientation must be an axis code such as 'LIA', not {self.orientation!r}") from error
            if len(self.orientation) != 3:
                raise ValueError(f"orientation must be an axis code such as 'LIA', not {self.orientation!r}")
        if self.normalisation is not None:
            kind = self.normalisation.get("kind", "none")
            if kind not in NORMALISATION_KINDS:
                raise ValueError(f"normalisation kind must be one of {NORMALISATION_KINDS}, not {kind!r}")
            if kind != "none" and not float(self.normalisation["high"]) > float(self.normalisation["low"]):
                raise ValueError(f"normalisation needs high > low, got {self.normalisation}")

    def to_dict(self) -> dict[str, Any]:
        """The format-2 record (plain values, as saved with the weights)."""
        record = asdict(self)
        record["spacing_mm"] = None if self.spacing_mm is None else list(self.spacing_mm)
        return record

    @classmethod
    def read(cls, record: dict[str, Any] | None, version: int) -> "ModelMetadata":
        """The metadata of a file of format ``version`` (1: a flat dict; 2: :meth:`to_dict`'s record)."""
        record = dict(record or {})
        if version == 1:
            known = {name: record.pop(name) for name in ("modality", "spacing_mm", "orientation", "normalisation")
                     if name in record}
            return cls(**known, training=record)
        unknown = set(record) - {"modality", "spacing_mm", "orientation", "normalisation", "training"}
        if unknown:
            raise ValueError(f"unknown metadata fields {sorted(unknown)}")
        return cls(**record)
