"""The :class:`Method` interface, the settings methods are built from, and the registry of methods and chains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from rwcnet.errors import InputError
from rwcnet.intensity import normalise
from rwcnet.pipeline.instrument import Instrumentation
from rwcnet.pipeline.pair import Intensities, PreparedPair
from rwcnet.refine import REFINE_PRESETS, RefineConfig, refine_config

Tensor = torch.Tensor

#: The instance-optimisation (and refinement, ConvexAdam) preset of each modality.
MODALITY_PRESET = {"mr": "brain", "ct": "lung"}
#: Whether the ``rwcnet`` chain runs instance optimisation when ``io`` is not given. Off for CT: on breathing
#: pairs IO's rough field is a worse start for the refinement than the network's (docs/results.md, lung pairs).
MODALITY_IO = {"mr": True, "ct": False}


@dataclass(frozen=True)
class Settings:
    """The validated options of :func:`rwcnet.register.register` that methods are built from."""

    model: str | Path | None
    io: bool | None  # None: the modality's choice (MODALITY_IO; ConvexAdam's Adam stage runs)
    io_iterations: int | None
    modality: str
    ct_range: str
    refine: bool
    refine_metric: str
    refinement: RefineConfig
    device: torch.device
    affine: bool = False  # the affine pre-alignment (rwcnet.pipeline.affine)
    linear_transform: str = "affine"  # its last stage: rigid or affine
    affine_metric: str = "mind"
    init_matrix: np.ndarray | None = None  # 4x4 fixed->moving RAS mm to start from (or apply, without the search)
    seed: int = 0
    repair_folds: bool = True  # smooth the field locally where it folds (rwcnet.geometry.folds), last in the chain

    @property
    def preset(self) -> str:
        """``brain`` or ``lung``: the modality's preset of instance optimisation, refinement and ConvexAdam."""
        return MODALITY_PRESET[self.modality]

    @property
    def instance_optimisation(self) -> bool:
        """Whether the ``rwcnet`` chain runs instance optimisation: ``io``, else the modality's :data:`MODALITY_IO`."""
        return MODALITY_IO[self.modality] if self.io is None else self.io

    @classmethod
    def checked(cls, *, modality: str, refine_metric: str, refine_iterations: tuple[int, ...] | None,
                **options) -> "Settings":
        """Settings from :func:`register`'s options; raises :class:`InputError` for an unknown choice."""
        if modality not in MODALITY_PRESET:
            raise InputError(f"unknown modality {modality!r}; use 'mr' or 'ct'")
        if refine_metric not in ("auto", "ncc", "mind"):
            raise InputError(f"unknown refinement metric {refine_metric!r}; use auto, ncc or mind")
        if options.get("linear_transform", "affine") not in ("rigid", "affine"):
            raise InputError(f"unknown linear transform {options['linear_transform']!r}; use rigid or affine")
        if options.get("affine_metric", "mind") not in ("mind", "ncc", "mi"):
            raise InputError(f"unknown affine metric {options['affine_metric']!r}; use mind, ncc or mi")
        try:
            refinement = refine_config(REFINE_PRESETS[MODALITY_PRESET[modality]], iterations=refine_iterations)
        except ValueError as error:
            raise InputError(f"--refine-iters: {error}") from error
        return cls(modality=modality, refine_metric=refine_metric, refinement=refinement, **options)


class Method:
    """One registration method of a chain (see :mod:`rwcnet.pipeline` for the contract).

    Subclasses set ``stage`` (the name the progress display shows; ``None`` when the method
    announces its own stages), ``key`` (its entry in the result's ``seconds``), optionally
    ``intensities`` (how the pair must be normalised for it, with a note), and implement :meth:`run`.
    """

    stage: str | None = None
    key: str = "method"
    intensities: tuple[Intensities, str] | None = None

    def run(self, pair: PreparedPair, init: Tensor | None, record: Instrumentation) -> Tensor:
        """The total field ``(1, 3, X, Y, Z)`` in fixed voxels on the fixed grid, starting from ``init`` (``None``: zero)."""
        raise NotImplementedError


#: ``build(settings, record)`` -> the method, or ``None`` when the settings switch it off (it may add notes).
Builder = Callable[[Settings, Instrumentation], "Method | None"]
#: Registered methods by name.
METHODS: dict[str, Builder] = {}
#: Named chains: what ``register(method=NAME)`` runs, in order.
CHAINS: dict[str, tuple[str, ...]] = {
    "rwcnet": ("affine", "network", "instance_optimisation", "refinement", "fold_repair"),
    "convexadam": ("convexadam",),
}


def register_method(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``build(settings, record) -> Method | None`` as method ``name``."""

    def add(build: Builder) -> Builder:
        METHODS[name] = build
        return build

    return add


def chain_names(method: str | Sequence[str]) -> tuple[str, ...]:
    """The method names of a chain name, a registered method's name, or a sequence of method names."""
    names = CHAINS.get(method, (method,)) if isinstance(method, str) else tuple(method)
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        choices = ", ".join([*CHAINS, *(name for name in METHODS if name not in CHAINS)])
        raise InputError(f"unknown registration method {method!r}; use one of {choices}")
    return names


def build_chain(method: str | Sequence[str], settings: Settings, record: Instrumentation) -> list[Method]:
    """The methods of ``method`` (see :func:`chain_names`) that the settings switch on, in order."""
    built = (METHODS[name](settings, record) for name in chain_names(method))
    return [step for step in built if step is not None]


def chain_intensities(chain: list[Method], settings: Settings, record: Instrumentation) -> Intensities:
    """The normalisation of the first method that declares one (its note recorded), else the modality's preset."""
    for step in chain:
        if step.intensities is not None:
            mapping, note = step.intensities
            if note:
                record.notes.append(note)
            return mapping
    modality, ct_range = settings.modality, settings.ct_range
    return lambda array: normalise(array, modality, ct_range=ct_range)
