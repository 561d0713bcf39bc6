"""``rwcnet evaluate``: score displacement fields as the official Learn2Reg evaluation does.

Two forms:

* a dataset folder and a folder of ``disp_*.nii.gz``/``.npz`` fields, one
  case per pair of ``--pairs`` (``val``, ``test``, or a CSV of ``fixed,moving``
  image paths), or of the ``eval_pairs`` of an official ``--config``;
* one field with its own ground truth (``--field`` with label maps,
  keypoints and/or a fixed mask), no dataset needed.

A missing, unreadable or wrong-shaped field is reported as that case's
status and left out of the aggregates; it does not stop the evaluation.

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
from rich.console import Console
from rich.table import Table

from rwcnet.datasets import Learn2RegDataset, Pair, find_field, image_id
from rwcnet.errors import InputError, atomic_output
from rwcnet.io import read_field, read_image, read_keypoints
from rwcnet.metrics import aggregate, score_case

OFFICIAL_METRICS = ("dice", "hd95", "sdlogj", "tre")
COLUMNS = (("dice", "Dice", 4), ("hd95", "HD95 vx", 2), ("sdlogj", "SDlogJ", 4),
           ("folding_fraction", "folded %", 3), ("tre", "TRE mm", 3))


@dataclass
class EvalConfig:
    """What to score: from an official evaluation-config JSON, or defaults."""

    name: str | None = None
    labels: list[int] | None = None
    metrics: set[str] = dataclass_field(default_factory=lambda: set(OFFICIAL_METRICS))
    masked: bool | None = None
    expected_shape: tuple[int, ...] | None = None
    pairs: list[dict[str, str]] | None = None


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
    config.masked = bool(data.get("masked_evaluation", False))
    if data.get("expected_shape") is not None:
        config.expected_shape = tuple(int(v) for v in data["expected_shape"])
    if data.get("eval_pairs") is not None:
        pairs = data["eval_pairs"]
        if not isinstance(pairs, list) or not all(isinstance(p, dict) and {"fixed", "moving"} <= set(p) for p in pairs):
            raise InputError(f"{path}: 'eval_pairs' must be a list of {{fixed, moving}} objects")
        config.pairs = pairs
    return config


def _labels_array(path: Path) -> np.ndarray:
    return np.rint(np.asarray(read_image(path).array)).astype(np.int64)


def _score(field_path: Path, expected_shape: tuple[int, ...] | None, truth: dict[str, Any], config: EvalConfig,
           hd95: bool) -> dict[str, Any]:
    """Read a field and score it against ``truth`` (arrays of labels, keypoints, mask, spacing)."""
    field = read_field(field_path, expected_shape=expected_shape)
    try:
        scores = score_case(
            field,
            fixed_labels=truth.get("fixed_labels") if config.metrics & {"dice", "hd95"} else None,
            moving_labels=truth.get("moving_labels") if config.metrics & {"dice", "hd95"} else None,
            labels=config.labels,
            fixed_kp=truth.get("fixed_kp") if "tre" in config.metrics else None,
            moving_kp=truth.get("moving_kp") if "tre" in config.metrics else None,
            spacing=truth.get("spacing"),
            fixed_mask=truth.get("fixed_mask"),
            compute_hd95=hd95 and "hd95" in config.metrics,
        )
    except ValueError as error:
        raise InputError(f"{field_path}: {error}") from error
    if "dice" not in config.metrics:
        scores.pop("dice", None)
        scores.pop("dice_per_label", None)
    if "sdlogj" not in config.metrics:
        scores.pop("sdlogj", None)
    return {"status": "ok", "field": str(field_path), "masked": "fixed_mask" in truth, **scores}


def _dataset_truth(dataset: Learn2RegDataset, pair: Pair, config: EvalConfig) -> dict[str, Any]:
    """Ground truth of a pair from the dataset folder; only what exists for both sides."""
    truth: dict[str, Any] = {}
    labels = (dataset.label_path(pair.fixed), dataset.label_path(pair.moving))
    if None not in labels and config.metrics & {"dice", "hd95"}:
        truth["fixed_labels"], truth["moving_labels"] = (_labels_array(p) for p in labels)
    keypoints = (dataset.keypoints_path(pair.fixed), dataset.keypoints_path(pair.moving))
    if None not in keypoints and "tre" in config.metrics:
        truth["fixed_kp"], truth["moving_kp"] = (read_keypoints(p) for p in keypoints)
        truth["spacing"] = tuple(float(v) for v in read_image(pair.moving).spacing)
    mask = dataset.mask_path(pair.fixed)
    if mask is not None and config.masked is not False:
        truth["fixed_mask"] = np.asarray(read_image(mask).array)
    return truth


def _evaluate_dataset(dataset_dir: Path, displacements: Path, pairs: str | None, config: EvalConfig,
                      hd95: bool) -> tuple[str, dict[str, dict[str, Any]]]:
    dataset = Learn2RegDataset(dataset_dir)
    if not displacements.is_dir():
        raise InputError(f"{displacements}: displacement folder does not exist")
    if pairs is None and config.pairs is not None:
        pair_list = [Pair(dataset.resolve(p["fixed"]), dataset.resolve(p["moving"])) for p in config.pairs]
    else:
        pair_list = dataset.pairs(pairs or "val")
    if not pair_list:
        raise InputError(f"{dataset.json_path}: no pairs to evaluate in '{pairs or 'val'}'")
    if config.labels is None:
        config.labels = dataset.evaluation_labels
    cases: dict[str, dict[str, Any]] = {}
    for pair in pair_list:
        try:
            field_path = find_field(displacements, pair.fixed, pair.moving)
            if field_path is None:
                cases[pair.key] = {"status": "missing", "message": f"no displacement field for {image_id(pair.fixed)} "
                                   f"<- {image_id(pair.moving)} in {displacements}"}
                continue
            shape = config.expected_shape or read_image(pair.fixed).shape
            cases[pair.key] = _score(field_path, tuple(shape), _dataset_truth(dataset, pair, config), config, hd95)
        except InputError as error:
            cases[pair.key] = {"status": "error", "message": str(error)}
    return config.name or dataset.name, cases


def _evaluate_field(field_path: Path, options: dict[str, Path | None], spacing: str | None, config: EvalConfig,
                    hd95: bool) -> tuple[str, dict[str, dict[str, Any]]]:
    truth: dict[str, Any] = {}
    if (options["fixed_labels"] is None) != (options["moving_labels"] is None):
        raise InputError("give both --fixed-labels and --moving-labels, or neither")
    if (options["fixed_keypoints"] is None) != (options["moving_keypoints"] is None):
        raise InputError("give both --fixed-keypoints and --moving-keypoints, or neither")
    grid_sources = [options[k] for k in ("fixed_image", "fixed_labels", "fixed_mask") if options[k] is not None]
    grid = read_image(grid_sources[0]) if grid_sources else None
    if options["fixed_labels"] is not None:
        truth["fixed_labels"] = _labels_array(options["fixed_labels"])
        truth["moving_labels"] = _labels_array(options["moving_labels"])
    if options["fixed_mask"] is not None:
        truth["fixed_mask"] = np.asarray(read_image(options["fixed_mask"]).array)
    if options["fixed_keypoints"] is not None:
        truth["fixed_kp"] = read_keypoints(options["fixed_keypoints"])
        truth["moving_kp"] = read_keypoints(options["moving_keypoints"])
        if spacing is not None:
            truth["spacing"] = parse_spacing(spacing)
        elif grid is not None:
            truth["spacing"] = tuple(float(v) for v in grid.spacing)
        else:
            raise InputError("TRE needs the voxel spacing: give --spacing or --fixed-image")
    case = _score(field_path, grid.shape if grid is not None else None, truth, config, hd95)
    return config.name or image_id(field_path), {image_id(field_path): case}


def _fmt(value: Any, digits: int, percent: bool = False) -> str:
    if value is None:
        return ""
    value = float(value) * (100.0 if percent else 1.0)
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def _print_table(name: str, cases: dict[str, dict[str, Any]], aggregates: dict[str, dict[str, float]]) -> None:
    columns = [c for c in COLUMNS if c[0] in aggregates or any(c[0] in case for case in cases.values())]
    table = Table(title=f"rwcnet evaluate: {name}")
    table.add_column("case")
    table.add_column("status")
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    for key, case in cases.items():
        status = case["status"] if case["status"] == "ok" else f"{case['status']}: {case.get('message', '')}"
        table.add_row(key, status, *(_fmt(case.get(m), d, m == "folding_fraction") for m, _, d in columns))
    for statistic in ("mean", "std", "30"):
        row = [_fmt(aggregates[m][statistic], d, m == "folding_fraction") if m in aggregates else ""
               for m, _, d in columns]
        table.add_row(statistic, "", *row, style="bold")
    Console(width=max(120, Console().width)).print(table)


def _option(*names: str, help: str) -> Any:  # noqa: A002 (typer's keyword)
    return typer.Option(None, *names, help=help)


def evaluate(
    dataset: Path | None = _option("--dataset", help="Learn2Reg dataset folder holding <TASK>_dataset.json."),
    displacements: Path | None = _option("--displacements", help="Folder of disp_FFFF_MMMM.nii.gz / .npz fields."),
    pairs: str | None = _option("--pairs", help="val, test, or a CSV of fixed,moving image paths (relative to the "
                                "dataset or absolute). Default: the config's eval_pairs, else val."),
    labels: str | None = _option("--labels", help="Labels to score, e.g. 1,2,3 or 1-35. Default: the config's, "
                                 "else the dataset's evaluation_labels, else every label present."),
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
    eval_config = read_eval_config(config) if config is not None else EvalConfig()
    if labels is not None:
        eval_config.labels = parse_labels(labels)
    if field is not None:
        if dataset is not None or displacements is not None:
            raise InputError("use either --field (one case) or --dataset with --displacements, not both")
        options = {"fixed_labels": fixed_labels, "moving_labels": moving_labels, "fixed_keypoints": fixed_keypoints,
                   "moving_keypoints": moving_keypoints, "fixed_mask": fixed_mask, "fixed_image": fixed_image}
        name, cases = _evaluate_field(field, options, spacing, eval_config, hd95)
    elif dataset is not None and displacements is not None:
        name, cases = _evaluate_dataset(dataset, displacements, pairs, eval_config, hd95)
    else:
        raise InputError("give --dataset and --displacements, or --field (see rwcnet evaluate --help)")
    scored = [case for case in cases.values() if case["status"] == "ok"]
    aggregates = aggregate(scored)
    _print_table(name, cases, aggregates)
    if "dice" in aggregates:
        typer.echo(f"mean Dice {aggregates['dice']['mean']:.4f} over {len(scored)} case(s)")
    if "tre" in aggregates:
        typer.echo(f"mean TRE {aggregates['tre']['mean']:.3f} mm over {len(scored)} case(s)")
    if len(scored) < len(cases):
        typer.echo(f"warning: {len(cases) - len(scored)} of {len(cases)} case(s) not scored (see status)", err=True)
    if output is not None:
        result = {"name": name, "aggregates": aggregates, "cases": cases, "labels": eval_config.labels,
                  "n_cases": len(cases), "n_scored": len(scored), "scorer": "rwcnet (Learn2Reg evaluation 2.0)"}
        with atomic_output(output) as tmp:
            tmp.write_text(json.dumps(result, indent=2, allow_nan=True), encoding="utf-8")
        typer.echo(f"wrote {output}")
