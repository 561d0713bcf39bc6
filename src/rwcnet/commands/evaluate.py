"""``rwcnet evaluate``: score displacement fields as the official Learn2Reg evaluation does.

Two forms:

* a dataset folder and a folder of ``disp_*.nii.gz``/``.npz`` fields, one
  case per pair of ``--pairs`` (``val``, ``test``, or a CSV of ``fixed,moving``
  image paths), or of the ``eval_pairs`` of an official ``--config``;
* one field with its own ground truth (``--field`` with label maps,
  keypoints and/or a fixed mask), no dataset needed.

A missing, unreadable or wrong-shaped field is reported as that case's
status and left out of the aggregates; it does not stop the evaluation.

Grids (:mod:`rwcnet.grids`): in the single-field form, moving labels on
another grid than the fixed one are sampled through physical space, and the
output says so; the dataset form keeps the official voxel rule and warns when
a pair's grids differ. A field that fits no fixed grid is an error.

Labels scored by default: the config's, else the dataset's
``evaluation_labels``, else (and always in the single-field form) every
non-zero label present in both label maps; the output states the rule.

SDlogJ is taken inside the fixed image's mask when the config says
``masked_evaluation``, or, without a config, whenever the dataset has a
mask for the fixed image. TRE uses the moving image's spacing in the dataset
form (as the official script does) and the fixed image's (or ``--spacing``)
in the single-field form; Learn2Reg pairs share one spacing anyway.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any

import numpy as np
import typer

from rwcnet.commands.score_tables import print_case_table, print_label_table
from rwcnet.data.datasets import Learn2RegDataset, Pair, find_field, image_id
from rwcnet.errors import InputError
from rwcnet.geometry.grids import PHYSICAL, VOXEL, Grid, check_field_fits, common_grid, field_header_grid, grid_difference, \
    image_grid, sampling_field
from rwcnet.data.formats import Image, read_field, read_image, read_keypoints
from rwcnet.evaluation.label_names import dataset_label_names, name_labels
from rwcnet.evaluation.metrics import aggregate, score_case
from rwcnet.outputs import atomic_output, check_outputs

OFFICIAL_METRICS = ("dice", "hd95", "sdlogj", "tre")


@dataclass
class EvalConfig:
    """What to score: from an official evaluation-config JSON, or defaults."""

    name: str | None = None
    labels: list[int] | None = None
    metrics: set[str] = dataclass_field(default_factory=lambda: set(OFFICIAL_METRICS))
    masked: bool | None = None
    expected_shape: tuple[int, ...] | None = None
    pairs: list[dict[str, str]] | None = None
    label_rule: str = "every non-zero label present in both label maps"


def parse_labels(text: str) -> list[int]:
    """``"1,2,3"`` to ``[1, 2, 3]``; ranges ``"1-35"`` are allowed."""
    labels: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, _, last = part.partition("-")
            labels.extend(range(int(first), int(last or first) + 1))
    except ValueError as error:
        raise InputError(f"--labels {text!r}: expected comma-separated integers such as 1,2,3 or 1-35") from error
    if not labels:
        raise InputError(f"--labels {text!r}: no labels given")
    return labels


def parse_spacing(text: str) -> tuple[float, float, float]:
    """``"1.5,1.5,1.5"`` (or one number for all axes) to three positive mm values."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as error:
        raise InputError(f"--spacing {text!r}: expected three numbers in mm such as 1.5,1.5,1.5") from error
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(v > 0 and math.isfinite(v) for v in values):
        raise InputError(f"--spacing {text!r}: expected three positive numbers in mm")
    return tuple(values)  # type: ignore[return-value]


def read_eval_config(path: Path) -> EvalConfig:
    """Read an official ``evaluation_config.json`` (``evaluation_methods``, ``expected_shape``, ...)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: cannot read the evaluation config ({error})") from error
    methods = data.get("evaluation_methods") if isinstance(data, dict) else None
    if not isinstance(methods, list) or not all(isinstance(m, dict) and "metric" in m for m in methods):
        raise InputError(f"{path}: 'evaluation_methods' must be a list of objects with a 'metric'")
    config = EvalConfig(name=data.get("task_name"), metrics={str(m["metric"]).lower() for m in methods})
    unknown = config.metrics - set(OFFICIAL_METRICS)
    if unknown:
        raise InputError(f"{path}: unknown metric(s) {sorted(unknown)}; known: {', '.join(OFFICIAL_METRICS)}")
    for method in methods:
        if method.get("labels") is not None and config.labels is None:
            try:
                config.labels = [int(v) for v in method["labels"]]
            except (TypeError, ValueError) as error:
                name = method.get("name", method["metric"])
                raise InputError(f"{path}: 'labels' of {name} must be integers") from error
            config.label_rule = f"the {len(config.labels)} labels of {path.name}"
    config.masked = bool(data.get("masked_evaluation", False))
    if data.get("expected_shape") is not None:
        config.expected_shape = tuple(int(v) for v in data["expected_shape"])
    if data.get("eval_pairs") is not None:
        pairs = data["eval_pairs"]
        if not isinstance(pairs, list) or not all(isinstance(p, dict) and {"fixed", "moving"} <= set(p) for p in pairs):
            raise InputError(f"{path}: 'eval_pairs' must be a list of {{fixed, moving}} objects")
        config.pairs = pairs
    return config


def _labels_of(image: Image) -> np.ndarray:
    return np.rint(np.asarray(image.array)).astype(np.int64)


def _labels_in_both(fixed_labels: np.ndarray, moving_labels: np.ndarray) -> list[int]:
    """Every non-zero label value present in both maps, in increasing order."""
    return [int(v) for v in np.intersect1d(np.unique(fixed_labels), np.unique(moving_labels)) if v != 0]


def _score(field: np.ndarray, field_path: Path, truth: dict[str, Any], config: EvalConfig,
           hd95: bool) -> dict[str, Any]:
    """Score a field ``(X, Y, Z, 3)`` against ``truth`` (arrays of labels, keypoints, mask, spacing)."""
    labels = config.labels
    if labels is None and "fixed_labels" in truth:
        labels = _labels_in_both(truth["fixed_labels"], truth["moving_labels"])
    try:
        scores = score_case(
            field,
            fixed_labels=truth.get("fixed_labels") if config.metrics & {"dice", "hd95"} else None,
            moving_labels=truth.get("moving_labels") if config.metrics & {"dice", "hd95"} else None,
            labels=labels,
            fixed_kp=truth.get("fixed_kp") if "tre" in config.metrics else None,
            moving_kp=truth.get("moving_kp") if "tre" in config.metrics else None,
            spacing=truth.get("spacing"),
            fixed_mask=truth.get("fixed_mask"),
            compute_hd95=hd95 and "hd95" in config.metrics,
            label_field=truth.get("label_field"),
        )
    except ValueError as error:
        raise InputError(f"{field_path}: {error}") from error
    if "dice" not in config.metrics:
        scores.pop("dice", None)
        scores.pop("dice_per_label", None)
    if "sdlogj" not in config.metrics:
        scores.pop("sdlogj", None)
    case = {"status": "ok", "field": str(field_path), "masked": "fixed_mask" in truth, **scores}
    if "dice_per_label" in scores or "hd95_per_label" in scores:
        case["label_sampling"] = PHYSICAL if "label_field" in truth else VOXEL
    return case


def _dataset_truth(dataset: Learn2RegDataset, pair: Pair, fixed_grid: Grid,
                   config: EvalConfig) -> tuple[dict[str, Any], list[str]]:
    """Ground truth of a pair from the dataset folder (only what exists for both sides), and grid warnings.

    The official voxel rule applies whatever the grids; a pair whose moving
    image or label map is not on its fixed counterpart's grid gets a warning.
    """
    truth: dict[str, Any] = {}
    warnings = []
    difference = grid_difference(image_grid(pair.moving, "the moving image"), fixed_grid)
    if difference is not None:
        warnings.append(f"the moving image is on another grid than the fixed image ({difference})")
    labels = (dataset.label_path(pair.fixed), dataset.label_path(pair.moving))
    if None not in labels and config.metrics & {"dice", "hd95"}:
        fixed_labels, moving_labels = (read_image(p) for p in labels)
        difference = grid_difference(moving_labels, Grid.of(fixed_labels, "the fixed labels"))
        if difference is not None:
            warnings.append(f"the moving labels are on another grid than the fixed labels ({difference})")
        truth["fixed_labels"], truth["moving_labels"] = _labels_of(fixed_labels), _labels_of(moving_labels)
    keypoints = (dataset.keypoints_path(pair.fixed), dataset.keypoints_path(pair.moving))
    if None not in keypoints and "tre" in config.metrics:
        truth["fixed_kp"], truth["moving_kp"] = (read_keypoints(p) for p in keypoints)
        truth["spacing"] = tuple(float(v) for v in read_image(pair.moving).spacing)
    mask = dataset.mask_path(pair.fixed)
    if mask is not None and config.masked is not False:
        truth["fixed_mask"] = np.asarray(read_image(mask).array)
    if warnings:
        warnings.append("scored with the official voxel rule, which assumes one grid (use --field to score "
                        "through physical space)")
    return truth, warnings


def _evaluate_dataset(dataset_dir: Path, displacements: Path, pairs: str | None, config: EvalConfig,
                      hd95: bool) -> tuple[str, dict[str, dict[str, Any]], dict[int, str]]:
    dataset = Learn2RegDataset(dataset_dir)
    names = dataset_label_names(dataset.meta, dataset.json_path)
    if not displacements.is_dir():
        raise InputError(f"{displacements}: displacement folder does not exist")
    if pairs is None and config.pairs is not None:
        pair_list = [Pair(dataset.resolve(p["fixed"]), dataset.resolve(p["moving"])) for p in config.pairs]
    else:
        pair_list = dataset.pairs(pairs or "val")
    if not pair_list:
        raise InputError(f"{dataset.json_path}: no pairs to evaluate in '{pairs or 'val'}'")
    if config.labels is None and dataset.evaluation_labels is not None:
        config.labels = dataset.evaluation_labels
        config.label_rule = f"the {len(config.labels)} evaluation_labels of {dataset.json_path.name}"
    cases: dict[str, dict[str, Any]] = {}
    for pair in pair_list:
        try:
            field_path = find_field(displacements, pair.fixed, pair.moving)
            if field_path is None:
                cases[pair.key] = {"status": "missing", "message": f"no displacement field for {image_id(pair.fixed)} "
                                   f"<- {image_id(pair.moving)} in {displacements}"}
                continue
            fixed_grid = image_grid(pair.fixed, "the fixed image")
            truth, warnings = _dataset_truth(dataset, pair, fixed_grid, config)
            shape = config.expected_shape or fixed_grid.shape
            cases[pair.key] = _score(read_field(field_path, expected_shape=tuple(shape)), field_path, truth, config,
                                     hd95)
            if warnings:
                cases[pair.key]["warnings"] = warnings
        except InputError as error:
            cases[pair.key] = {"status": "error", "message": str(error)}
    return config.name or dataset.name, cases, names


def _evaluate_field(field_path: Path, options: dict[str, Path | None], spacing: str | None, config: EvalConfig,
                    hd95: bool) -> tuple[str, dict[str, dict[str, Any]], dict[int, str]]:
    truth: dict[str, Any] = {}
    if (options["fixed_labels"] is None) != (options["moving_labels"] is None):
        raise InputError("give both --fixed-labels and --moving-labels, or neither")
    if (options["fixed_keypoints"] is None) != (options["moving_keypoints"] is None):
        raise InputError("give both --fixed-keypoints and --moving-keypoints, or neither")
    fixed_side = {key: read_image(options[key]) for key in ("fixed_image", "fixed_labels", "fixed_mask")
                  if options[key] is not None}
    field = read_field(field_path)
    grid = common_grid([(image, f"--{key.replace('_', '-')} {options[key]}") for key, image in fixed_side.items()])
    if grid is None:
        grid = field_header_grid(field_path, field.shape[:3])
    else:
        check_field_fits(field.shape, grid, field_path)
    notes = []
    if options["fixed_labels"] is not None:
        moving = read_image(options["moving_labels"])
        sampling, note = sampling_field(field, grid, moving, "moving labels")
        truth["fixed_labels"], truth["moving_labels"] = _labels_of(fixed_side["fixed_labels"]), _labels_of(moving)
        if note is not None:
            truth["label_field"] = sampling
            notes.append(note)
    if "fixed_mask" in fixed_side:
        truth["fixed_mask"] = np.asarray(fixed_side["fixed_mask"].array)
    if options["fixed_keypoints"] is not None:
        truth["fixed_kp"] = read_keypoints(options["fixed_keypoints"])
        truth["moving_kp"] = read_keypoints(options["moving_keypoints"])
        if spacing is not None:
            truth["spacing"] = parse_spacing(spacing)
        elif grid is not None:
            truth["spacing"] = tuple(float(v) for v in np.linalg.norm(grid.affine[:3, :3], axis=0))
            notes.append(f"TRE in mm with the voxel spacing of {grid.source}")
        else:
            raise InputError("TRE needs the voxel spacing: give --spacing or --fixed-image")
    case = _score(field, field_path, truth, config, hd95)
    if notes:
        case["notes"] = notes
    return config.name or image_id(field_path), {image_id(field_path): case}, {}


def _option(*names: str, help: str) -> Any:  # noqa: A002 (typer's keyword)
    return typer.Option(None, *names, help=help)


def evaluate(
    dataset: Path | None = _option("--dataset", help="Learn2Reg dataset folder holding <TASK>_dataset.json."),
    displacements: Path | None = _option("--displacements", help="Folder of disp_FFFF_MMMM.nii.gz / .npz fields."),
    pairs: str | None = _option("--pairs", help="val, test, or a CSV of fixed,moving image paths (relative to the "
                                "dataset or absolute). Default: the config's eval_pairs, else val."),
    labels: str | None = _option("--labels", help="Labels to score, e.g. 1,2,3 or 1-35. Default: the config's, "
                                 "else the dataset's evaluation_labels, else (and with --field) every non-zero label "
                                 "present in both label maps."),
    config: Path | None = _option("--config", help="Official Learn2Reg evaluation_config.json (metrics, labels, "
                                  "expected_shape, eval_pairs, masked_evaluation)."),
    field: Path | None = _option("--field", help="One displacement field (X,Y,Z,3) to score without a dataset."),
    fixed_labels: Path | None = _option("--fixed-labels", help="Fixed label map (with --field)."),
    moving_labels: Path | None = _option("--moving-labels", help="Moving label map (with --field)."),
    fixed_keypoints: Path | None = _option("--fixed-keypoints", help="Fixed keypoint CSV (with --field)."),
    moving_keypoints: Path | None = _option("--moving-keypoints", help="Moving keypoint CSV (with --field)."),
    fixed_mask: Path | None = _option("--fixed-mask", help="Fixed mask: SDlogJ inside it (with --field)."),
    fixed_image: Path | None = _option("--fixed-image", help="Fixed image: grid and spacing (with --field)."),
    spacing: str | None = _option("--spacing", help="Voxel spacing in mm for TRE, e.g. 1.5,1.5,1.5 (with --field; "
                                  "default: the header of --fixed-image or --fixed-labels)."),
    hd95: bool = typer.Option(True, "--hd95/--no-hd95", help="Compute HD95 (the slowest metric)."),
    output: Path | None = _option("--output", "-o", help="Write the scores as JSON here."),
) -> None:
    """Score displacement fields: Dice, HD95, SDlogJ, folded voxels and TRE, as Learn2Reg does."""
    check_outputs((output, (".json",), "the scores (JSON)"))
    eval_config = read_eval_config(config) if config is not None else EvalConfig()
    if labels is not None:
        eval_config.labels = parse_labels(labels)
        eval_config.label_rule = f"the {len(eval_config.labels)} labels of --labels"
    if field is not None:
        if dataset is not None or displacements is not None:
            raise InputError("use either --field (one case) or --dataset with --displacements, not both")
        options = {"fixed_labels": fixed_labels, "moving_labels": moving_labels, "fixed_keypoints": fixed_keypoints,
                   "moving_keypoints": moving_keypoints, "fixed_mask": fixed_mask, "fixed_image": fixed_image}
        name, cases, dataset_names = _evaluate_field(field, options, spacing, eval_config, hd95)
    elif dataset is not None and displacements is not None:
        name, cases, dataset_names = _evaluate_dataset(dataset, displacements, pairs, eval_config, hd95)
    else:
        raise InputError("give --dataset and --displacements, or --field (see rwcnet evaluate --help)")
    scored = [case for case in cases.values() if case["status"] == "ok"]
    aggregates = aggregate(scored)
    scored_labels = sorted({int(v) for case in scored
                            for v in case.get("dice_per_label", case.get("hd95_per_label", {}))})
    names, names_source = name_labels(scored_labels, dataset_names)
    print_case_table(name, cases, aggregates)
    print_label_table(scored, names, eval_config.label_rule, names_source)
    for key, case in cases.items():
        for note in case.get("notes", []):
            typer.echo(f"note: {key}: {note}")
        for warning in case.get("warnings", []):
            typer.echo(f"warning: {key}: {warning}", err=True)
    if scored_labels:
        typer.echo(f"labels: {eval_config.label_rule} ({len(scored_labels)} scored); names: {names_source}")
    if "dice" in aggregates:
        typer.echo(f"mean Dice {aggregates['dice']['mean']:.4f} over {len(scored)} case(s)")
    if "tre" in aggregates:
        typer.echo(f"mean TRE {aggregates['tre']['mean']:.3f} mm over {len(scored)} case(s)")
    if len(scored) < len(cases):
        typer.echo(f"warning: {len(cases) - len(scored)} of {len(cases)} case(s) not scored (see status)", err=True)
    if output is not None:
        result = {"name": name, "aggregates": aggregates, "cases": cases, "labels": eval_config.labels,
                  "label_rule": eval_config.label_rule, "label_names": {str(k): v for k, v in names.items() if v},
                  "label_names_source": names_source, "n_cases": len(cases), "n_scored": len(scored),
                  "scorer": "rwcnet (Learn2Reg evaluation 2.0)"}
        with atomic_output(output) as tmp:
            tmp.write_text(json.dumps(result, indent=2, allow_nan=True), encoding="utf-8")
        typer.echo(f"wrote {output}")
