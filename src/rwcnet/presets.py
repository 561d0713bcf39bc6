"""One shape for every preset registry: named configs of one concern, looked up and overridden alike.

``PRESETS[name]`` gives a preset (an entry may be a config or a function making one, for presets
that are expensive or built from others); ``PRESETS.resolve(name_or_config, **overrides)`` gives it
with the non-``None`` overrides applied and validated. Used for instance optimisation, refinement,
ConvexAdam, losses, training and the networks; an unknown name is a ``ValueError`` naming the concern and the choices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Generic, Iterator, TypeVar

from pydantic import BaseModel

Config = TypeVar("Config", bound=BaseModel)


class UnknownPreset(KeyError, ValueError):
    """A preset name that the registry does not hold (a ``ValueError`` for callers, a ``KeyError`` for ``in``)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Presets(Mapping[str, Config], Generic[Config]):
    """The presets of one ``concern`` (a word for messages, e.g. ``"refinement"``), by name."""

    def __init__(self, concern: str, entries: Mapping[str, Config | Callable[[], Config]]) -> None:
        self.concern, self._entries = concern, dict(entries)

    def __getitem__(self, name: str) -> Config:
        if name not in self._entries:
            raise UnknownPreset(f"unknown {self.concern} preset {name!r}; use one of {sorted(self._entries)}")
        entry = self._entries[name]
        return entry if isinstance(entry, BaseModel) else entry()

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    @classmethod
    def merged(cls, concern: str, *registries: "Presets") -> "Presets":
        """One registry holding the entries of ``registries`` (later ones win a name)."""
        entries: dict = {}
        for registry in registries:
            entries.update(registry._entries)
        return cls(concern, entries)

    def resolve(self, preset: str | Config, **overrides) -> Config:
        """The preset ``preset`` (or the config given) with the non-``None`` ``overrides`` applied and validated."""
        base = preset if isinstance(preset, BaseModel) else self[preset]
        changes = {key: value for key, value in overrides.items() if value is not None}
        return type(base).model_validate({**base.model_dump(), **changes}) if changes else base
