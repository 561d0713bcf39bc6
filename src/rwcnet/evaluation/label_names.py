"""Names of label values for score tables: the dataset JSON's own names, else FreeSurfer's aseg names."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from rwcnet.errors import InputError

FREESURFER = "FreeSurfer aseg"


@lru_cache(maxsize=1)
def freesurfer_aseg_names() -> dict[int, str]:
    """``{value: name}`` of the FreeSurfer aseg labels, from the table shipped in ``rwcnet/data``."""
    text = (resources.files("rwcnet") / "data" / "freesurfer_aseg.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return {int(value): name for value, name in rows[1:]}


def dataset_label_names(meta: dict[str, Any], json_path: Path) -> dict[int, str]:
    """The ``labels`` map of a Learn2Reg dataset JSON as ``{value: name}``; empty when there is none.

    Accepts ``{"1": "name", ...}`` and the per-modality form ``{"0": {"1": "name", ...}}``
    (modality ``"0"``, else the first one).
    """
    labels = meta.get("labels")
    if not labels:
        return {}
    if not isinstance(labels, dict):
        raise InputError(f"{json_path}: 'labels' must be an object mapping label values to names")
    if all(isinstance(v, dict) for v in labels.values()):
        labels = labels.get("0", next(iter(labels.values())))
    try:
        return {int(value): str(name) for value, name in labels.items()}
    except (TypeError, ValueError) as error:
        raise InputError(f"{json_path}: the keys of 'labels' must be integer label values") from error


def name_labels(labels: Sequence[int], dataset_names: dict[int, str] | None = None) -> tuple[dict[int, str], str]:
    """A name for each label value, and where the names come from.

    The dataset's names when it has a ``labels`` map (a value it does not
    name stays unnamed); else FreeSurfer's aseg names when every value is an
    aseg label (another numbering, such as Learn2Reg OASIS's 1..35, would be
    misnamed by them); else none.
    """
    if dataset_names:
        return {int(v): dataset_names.get(int(v), "") for v in labels}, "the dataset JSON's labels map"
    aseg = freesurfer_aseg_names()
    if labels and all(int(v) in aseg for v in labels):
        return {int(v): aseg[int(v)] for v in labels}, f"{FREESURFER} names"
    return {int(v): "" for v in labels}, "none (not all labels are FreeSurfer aseg values, and no dataset names)"
