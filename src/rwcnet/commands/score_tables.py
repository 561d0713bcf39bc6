"""The tables ``rwcnet evaluate`` prints: one row per case, one row per label, every row named."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

COLUMNS = (("dice", "Dice", 4), ("hd95", "HD95 vx", 2), ("sdlogj", "SDlogJ", 4),
           ("folding_fraction", "folded %", 3), ("tre", "TRE mm", 3))
STATISTICS = (("mean", "mean over cases"), ("std", "std over cases"), ("30", "30 % quantile over cases *"))
QUANTILE_NOTE = ("* Learn2Reg's \"30\" value: the 0.3 quantile of the case scores for Dice and HD95, "
                 "the 0.7 quantile for SDlogJ, folded % and TRE")
LABEL_METRICS = (("dice_per_label", "Dice", 4), ("hd95_per_label", "HD95 vx", 2))


def _fmt(value: Any, digits: int, percent: bool = False) -> str:
    if value is None:
        return ""
    value = float(value) * (100.0 if percent else 1.0)
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def _console() -> Console:
    return Console(width=max(120, Console().width))


def _status(case: dict[str, Any]) -> str:
    if case["status"] != "ok":
        return f"{case['status']}: {case.get('message', '')}"
    details = []
    if case.get("label_sampling", "").startswith("physical"):
        details.append("labels through physical space")
    if case.get("warnings"):
        details.append("warning: grids differ")
    return "ok" + "".join(f", {d}" for d in details)


def print_case_table(name: str, cases: dict[str, dict[str, Any]], aggregates: dict[str, dict[str, float]]) -> None:
    """One row per case, then (with two or more scored cases) the named aggregate rows."""
    columns = [c for c in COLUMNS if c[0] in aggregates or any(c[0] in case for case in cases.values())]
    several = sum(case["status"] == "ok" for case in cases.values()) > 1
    table = Table(title=f"rwcnet evaluate: {name}", caption=QUANTILE_NOTE if several else None)
    table.add_column("case")
    table.add_column("status")
    for _, title, _ in columns:
        table.add_column(title, justify="right")
    for key, case in cases.items():
        table.add_row(key, _status(case), *(_fmt(case.get(m), d, m == "folding_fraction") for m, _, d in columns))
    if several:
        for statistic, row_name in STATISTICS:
            row = [_fmt(aggregates[m][statistic], d, m == "folding_fraction") if m in aggregates else ""
                   for m, _, d in columns]
            table.add_row(row_name, "", *row, style="bold")
    _console().print(table)


def per_label_means(scored: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Mean over the scored cases of each label's Dice and HD95 (NaN cases left out): ``{metric: {label: value}}``."""
    result: dict[str, dict[int, float]] = {}
    for metric, _, _ in LABEL_METRICS:
        per_case = [case[metric] for case in scored if metric in case]
        if not per_case:
            continue
        labels = sorted({int(label) for values in per_case for label in values})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a label absent from every case stays NaN
            result[metric] = {label: float(np.nanmean([values.get(str(label), np.nan) for values in per_case]))
                              for label in labels}
    return result


def print_label_table(scored: list[dict[str, Any]], names: dict[int, str], rule: str, names_source: str) -> None:
    """One row per label (its value and name), then the mean over labels; the caption states both rules."""
    means = per_label_means(scored)
    if not means:
        return
    labels = sorted({label for values in means.values() for label in values})
    over = f"mean over {len(scored)} cases" if len(scored) > 1 else "one case"
    table = Table(title=f"per label ({over})", caption=f"labels: {rule}; names: {names_source}")
    table.add_column("label", justify="right")
    table.add_column("name")
    metrics = [m for m in LABEL_METRICS if m[0] in means]
    for _, title, _ in metrics:
        table.add_column(title, justify="right")
    for label in labels:
        table.add_row(str(label), names.get(label, ""), *(_fmt(means[m].get(label), d) for m, _, d in metrics))
    summary = []
    for metric, _, digits in metrics:
        values = np.array([v for v in means[metric].values() if not math.isnan(v)])
        summary.append(_fmt(values.mean() if values.size else math.nan, digits))
    scored_labels = sum(not math.isnan(v) for v in means[metrics[0][0]].values())
    table.add_row("all", f"mean over the {scored_labels} labels present in both maps", *summary, style="bold")
    _console().print(table)
