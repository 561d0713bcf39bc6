"""Learn2Reg dataset folders: the ``<TASK>_dataset.json`` file, its pairs, labels, masks and keypoints.

A Learn2Reg folder holds one ``<TASK>_dataset.json`` and the files it names
with paths relative to the folder (``./imagesTr/TASK_0001_0000.nii.gz``):
images in ``imagesTr``/``imagesTs``, label maps in ``labelsTr`` with the same
file name as the image, masks in ``masksTr``, keypoints as CSV files (one
point a row, voxel indices in array order, no header) in ``keypointsTr``;
the JSON may name keypoint files ``.nii.gz`` although they are ``.csv``.

Unpaired tasks (OASIS-like) list ``training`` images; paired tasks
(NLST-like) also list ``training_paired_images``. ``registration_val`` and
``registration_test`` hold ``{fixed, moving}`` pairs; an optional
``evaluation_labels`` list names the labels to score.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

from rwcnet.errors import InputError

PAIR_SETS = {"val": "registration_val", "test": "registration_test"}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
_CASE_RE = re.compile(r"(\d{4})_(\d{4})$")


def image_id(path: str | Path) -> str:
    """File name without its extension (image, .csv, .npz): ``TASK_0001_0000`` for ``TASK_0001_0000.nii.gz``."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES + (".csv", ".npz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _case_numbers(path: str | Path) -> tuple[str, str]:
    """The case and modality/phase numbers of a Learn2Reg file name (its last two digit groups)."""
    groups = re.findall(r"\d+", image_id(path))
    if len(groups) < 2:
        raise InputError(f"{path}: cannot derive a Learn2Reg field name; the file name needs "
                         "<case>_<modality> numbers, e.g. OASIS_0395_0000.nii.gz")
    return groups[-2], groups[-1]


def field_names(fixed_path: str | Path, moving_path: str | Path) -> tuple[str, str]:
    """Learn2Reg displacement file names for a pair: ``(short, long)``.

    Fixed ``OASIS_0395_0000.nii.gz`` and moving ``OASIS_0396_0000.nii.gz``
    give ``disp_0395_0396.nii.gz`` and ``disp_0395_0000_0396_0000.nii.gz``.
    """
    fixed_case, fixed_mod = _case_numbers(fixed_path)
    moving_case, moving_mod = _case_numbers(moving_path)
    return (f"disp_{fixed_case}_{moving_case}.nii.gz",
            f"disp_{fixed_case}_{fixed_mod}_{moving_case}_{moving_mod}.nii.gz")


def find_field(directory: str | Path, fixed_path: str | Path, moving_path: str | Path) -> Path | None:
    """The pair's displacement file in ``directory`` (short name first, .nii.gz then .npz), or ``None``."""
    for name in field_names(fixed_path, moving_path):
        for candidate in (name, name[: -len(".nii.gz")] + ".npz"):
            path = Path(directory) / candidate
            if path.is_file():
                return path
    return None


@dataclass(frozen=True)
class Pair:
    """A registration pair: absolute paths of the fixed and the moving image."""

    fixed: Path
    moving: Path

    @property
    def key(self) -> str:
        """Case name as the official scorer writes it: ``0001_0000<--0002_0000`` (else the two file ids)."""
        ids = []
        for path in (self.fixed, self.moving):
            match = _CASE_RE.search(image_id(path))
            ids.append(f"{match.group(1)}_{match.group(2)}" if match else image_id(path))
        return f"{ids[0]}<--{ids[1]}"


def _sibling(image: Path, folder_word: str, suffix: str | None = None) -> Path:
    """The file beside ``image`` in the folder named like its own with ``images`` replaced by ``folder_word``."""
    folder = image.parent.name.replace("images", folder_word)
    name = image.name if suffix is None else image_id(image) + suffix
    return image.parent.parent / folder / name


def _keypoint_file(path: Path) -> Path:
    """The existing keypoint file for a JSON entry, accepting the ``.nii.gz``-named CSV quirk."""
    if path.is_file():
        return path
    csv_path = path.with_name(image_id(path) + ".csv")
    return csv_path if csv_path.is_file() else path


class Learn2RegDataset:
    """A Learn2Reg dataset folder read from its ``<TASK>_dataset.json``.

    ``root`` is the folder (holding exactly one ``*_dataset.json``) or the
    JSON file itself. Paths in the JSON are resolved relative to the folder.
    A folder without a JSON but with ``imagesTr/*.nii*`` reads as unpaired
    training images alone (training from a plain folder of images).
    """

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if root.is_dir() and not any(root.glob("*_dataset.json")) and sorted((root / "imagesTr").glob("*.nii*")):
            self._images_only(root)
            return
        if root.is_file():
            json_path = root
        elif root.is_dir():
            found = sorted(root.glob("*_dataset.json"))
            if not found:
                raise InputError(f"{root}: no Learn2Reg '<TASK>_dataset.json' file in this folder")
            if len(found) > 1:
                raise InputError(f"{root}: several dataset JSON files ({', '.join(p.name for p in found)}); name one")
            json_path = found[0]
        else:
            raise InputError(f"{root}: dataset folder does not exist")
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{json_path}: cannot read the dataset JSON ({error})") from error
        if not isinstance(meta, dict):
            raise InputError(f"{json_path}: the dataset JSON must be an object")
        self.json_path = json_path.resolve()
        self.root = self.json_path.parent
        self.meta: dict[str, Any] = meta
        self.name: str = str(meta.get("name", image_id(json_path).replace("_dataset", "")))
        self.pairings: str = str(meta.get("pairings", "unpaired"))
        self._entries = {self.resolve(e["image"]): e for e in self._list("training") if "image" in e}

    def _images_only(self, root: Path) -> None:
        """A folder with ``imagesTr/`` but no dataset JSON: its images are unpaired training images (no pairs,
        labels or keypoints), as the shared one-CT lung folder."""
        self.json_path = root.resolve() / "imagesTr"
        self.root = root.resolve()
        images = sorted((root / "imagesTr").glob("*.nii*"))
        self.meta = {"name": root.name, "pairings": "unpaired",
                     "training": [{"image": f"./imagesTr/{path.name}"} for path in images]}
        self.name = root.name
        self.pairings = "unpaired"
        self._entries = {self.resolve(e["image"]): e for e in self._list("training")}

    def resolve(self, relative: str) -> Path:
        """Absolute path of a JSON path (``./imagesTr/...``) relative to the dataset folder."""
        path = Path(relative)
        return path if path.is_absolute() else (self.root / path).resolve()

    def _list(self, key: str) -> list[dict[str, Any]]:
        value = self.meta.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise InputError(f"{self.json_path}: '{key}' must be a list of objects")
        return value

    def _existing(self, path: Path, what: str) -> Path:
        if not path.is_file():
            raise InputError(f"{path}: {what} named in {self.json_path.name} does not exist")
        return path

    @property
    def evaluation_labels(self) -> list[int] | None:
        """The ``evaluation_labels`` list of the JSON, or None."""
        labels = self.meta.get("evaluation_labels")
        if labels is None:
            return None
        try:
            return [int(v) for v in labels]
        except (TypeError, ValueError) as error:
            raise InputError(f"{self.json_path}: 'evaluation_labels' must be a list of integers") from error

    @property
    def modality(self) -> str:
        """``ct`` when the JSON's ``modality`` of image 0 says CT, else ``mr`` (rwcnet's two modality presets)."""
        recorded = self.meta.get("modality")
        name = recorded.get("0", "") if isinstance(recorded, dict) else ""
        return "ct" if str(name).strip().upper() == "CT" else "mr"

    def training_images(self) -> list[Path]:
        """Images of the ``training`` list (each checked to exist)."""
        return [self._existing(path, "training image") for path in self._entries]

    def _pair_list(self, key: str) -> list[Pair]:
        pairs = []
        for index, entry in enumerate(self._list(key)):
            if "fixed" not in entry or "moving" not in entry:
                raise InputError(f"{self.json_path}: entry {index} of '{key}' needs 'fixed' and 'moving'")
            fixed = self._existing(self.resolve(entry["fixed"]), f"fixed image of {key}[{index}]")
            moving = self._existing(self.resolve(entry["moving"]), f"moving image of {key}[{index}]")
            pairs.append(Pair(fixed, moving))
        return pairs

    def pairs(self, which: str | Path = "val") -> list[Pair]:
        """Registration pairs: ``'val'``, ``'test'``, ``'train'`` or a CSV file of ``fixed,moving`` paths.

        ``'train'`` is ``training_paired_images`` when the JSON has it, else
        every ordered pair of distinct training images; pairs touching an
        image of ``registration_val`` are left out either way.
        """
        which_str = str(which)
        if which_str in PAIR_SETS:
            key = PAIR_SETS[which_str]
            if key not in self.meta:
                raise InputError(f"{self.json_path}: no '{key}' pairs in this dataset")
            return self._pair_list(key)
        if which_str == "train":
            held_out = {p for pair in self._pair_list("registration_val") for p in (pair.fixed, pair.moving)}
            if "training_paired_images" in self.meta:
                candidates = self._pair_list("training_paired_images")
            else:
                candidates = [Pair(f, m) for f, m in permutations(self.training_images(), 2)]
            return [p for p in candidates if p.fixed not in held_out and p.moving not in held_out]
        path = Path(which)
        if path.suffix.lower() == ".csv" or path.is_file():
            return read_pairs_csv(path, self.root)
        raise InputError(f"unknown pair set {which_str!r}: use val, test, train or a CSV file of fixed,moving paths")

    def _lookup(self, image: Path, key: str, folder_word: str, suffix: str | None) -> Path | None:
        image = Path(image).resolve()
        entry = self._entries.get(image, {})
        if key in entry:
            path = self.resolve(entry[key])
            if key == "keypoints":
                path = _keypoint_file(path)
            return self._existing(path, f"{key} of {image.name}")
        path = _sibling(image, folder_word, suffix)
        return path if path.is_file() else None

    def label_path(self, image: str | Path) -> Path | None:
        """Label map of an image: the JSON's ``label`` entry, else ``labelsXx/<same name>``; None if none."""
        return self._lookup(Path(image), "label", "labels", None)

    def mask_path(self, image: str | Path) -> Path | None:
        """Mask of an image: the JSON's ``mask`` entry, else ``masksXx/<same name>``; None if none."""
        return self._lookup(Path(image), "mask", "masks", None)

    def keypoints_path(self, image: str | Path) -> Path | None:
        """Keypoint CSV of an image: the JSON's ``keypoints`` entry, else ``keypointsXx/<id>.csv``; None if none."""
        return self._lookup(Path(image), "keypoints", "keypoints", ".csv")


def read_pairs_csv(path: str | Path, root: str | Path | None = None) -> list[Pair]:
    """Pairs from a CSV of ``fixed,moving`` image paths (absolute, or relative to ``root``; header optional)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: pairs CSV file does not exist")
    base = Path(root) if root is not None else path.parent
    pairs = []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            cells = [c.strip() for c in row if c.strip()]
            header = number == 1 and [c.lower() for c in cells] == ["fixed", "moving"]
            if not cells or cells[0].startswith("#") or header:
                continue
            if len(cells) != 2:
                raise InputError(f"{path}: line {number} must hold two paths 'fixed,moving', not {row}")
            files = []
            for cell in cells:
                file = Path(cell) if Path(cell).is_absolute() else (base / cell)
                if not file.is_file():
                    raise InputError(f"{file}: image named on line {number} of {path} does not exist")
                files.append(file.resolve())
            pairs.append(Pair(files[0], files[1]))
    if not pairs:
        raise InputError(f"{path}: no pairs in this CSV file")
    return pairs
