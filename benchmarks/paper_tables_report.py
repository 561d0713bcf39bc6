"""Write ``docs/results.md`` from the cached scores of ``benchmarks/paper_tables.py``.

The tables are generated; ``docs/results_notes.md`` is appended verbatim. Hand-written sections belong
there: anything written into ``docs/results.md`` itself is lost at the next ``report``.
"""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path

import numpy as np

from paper_tables import DATASETS, METHODS, _slug, cases, model_path, row_status

PAPER = {  # SPEC §5, as printed: NLST TRE (mm), OASIS Dice (%)
    "zero displacement": ("9.73", "52.4"), "ConvexAdam": ("1.48", "76.4"), "ConvexAdam without IO": ("2.78", "75.6"),
    "LapIRN": ("5.51", "80.0"), "RWCNet": ("2.11", "80.7"), "RWCNet with IO": ("1.48", "76.4"),
    "ANTs SyN": ("2.24*", "75.6*"), "elastix B-spline": ("–", "–"), "greedy": ("–", "–"),
    "RWCNet with IO and refinement": ("–", "–"),
    "single resolution": ("5.52", "74.0"), "no correlation": ("4.10", "80.0"), "2 RNN steps": ("5.17", "80.1"),
}
PAIRED_BASELINE = {2: "ConvexAdam", 3: "RWCNet"}  # the row each table's paired column compares with
COLUMNS = {  # metric: (header, format, scale)
    "BRAIN": [("dice", "Dice %", "{:.1f}", 100), ("hd95", "HD95 vx", "{:.2f}", 1), ("sdlogj", "SDlogJ", "{:.3f}", 1)],
    "SYNBRAIN": [("dice", "Dice %", "{:.1f}", 100), ("hd95", "HD95 vx", "{:.2f}", 1), ("epe", "EPE mm", "{:.2f}", 1),
                 ("sdlogj", "SDlogJ", "{:.3f}", 1)],
    "SYNLUNG": [("tre", "TRE mm", "{:.2f}", 1), ("epe", "EPE mm", "{:.2f}", 1), ("sdlogj", "SDlogJ", "{:.3f}", 1)],
}


def _cell(values: list[float], fmt: str, scale: float) -> str:
    values = [v * scale for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(np.mean(values))} ± {fmt.format(np.std(values))}"


def _cases(cache: Path, method_name: str, dataset: str) -> dict | None:
    """The scored cases of one row, keyed by pair (None before it is scored)."""
    path = cache / "scores" / f"{_slug(method_name)}_{dataset}.json"
    return json.loads(path.read_text())["cases"] if path.is_file() else None


def _finer(fmt: str) -> str:
    """``{:.Nf}`` with one more decimal: paired differences are often smaller than the row spreads."""
    digits = int(fmt[fmt.index(".") + 1 : fmt.index("f")])
    return f"{{:.{digits + 1}f}}"


def _paired_difference(cases: dict, reference: dict, key: str, fmt: str, scale: float, lower_is_better: bool) -> str:
    """Per-pair ``key`` minus the reference row's on the same pairs: mean ± std, and in how many pairs it is worse."""
    pairs = [k for k in cases if k in reference and all(math.isfinite(c[k].get(key, math.nan)) for c in (cases, reference))]
    if not pairs:
        return "–"
    differences = np.array([(cases[k][key] - reference[k][key]) * scale for k in pairs])

    def signed(value: float) -> str:
        return ("+" if value >= 0 else "−") + fmt.format(abs(value))

    if len(pairs) == 1:
        return signed(differences[0])
    worse = int(np.sum(differences > 0 if lower_is_better else differences < 0))
    return f"{signed(differences.mean())} ± {fmt.format(differences.std())} (worse in {worse}/{len(pairs)})"


def _table(cache: Path, data: Path, dataset: str, table: int) -> list[str]:
    header = [c[1] for c in COLUMNS[dataset]] + ["s / pair", "threads", "peak GB"]
    key, name, fmt, scale = COLUMNS[dataset][0]
    lower_is_better = key == "tre"
    baseline = PAIRED_BASELINE[table]
    header.append(f"Δ {name} vs {baseline}, paired")
    paper = "paper NLST TRE mm" if dataset == "SYNLUNG" else "paper OASIS Dice %"
    lines = ["| method | " + " | ".join(header) + f" | {paper} | status |", "|---" * (len(header) + 3) + "|"]
    baseline_cases = _cases(cache, baseline, dataset)
    for method in (m for m in METHODS if m.table == table or (table == 3 and m.name == "RWCNet")):
        reference = PAPER[method.name][0 if dataset == "SYNLUNG" else 1]
        row_cases = _cases(cache, method.name, dataset)
        if row_cases is None:
            status = row_status(method, dataset, data, cache)
            lines.append(f"| {method.name} | " + " | ".join(["–"] * len(header)) + f" | {reference} | {status} |")
            continue
        scored = list(row_cases.values())
        cells = [_cell([c.get(k) for c in scored], f, sc) for k, _, f, sc in COLUMNS[dataset]]
        cells.append(_cell([c.get("seconds") for c in scored], "{:.0f}", 1))
        cells.append("/".join(str(t) for t in sorted({c.get("threads", "?") for c in scored}, key=str)))
        cells.append("{:.2f}".format(max(c.get("peak_gb", 0.0) for c in scored)))
        cells.append("–" if baseline_cases is None or method.name == baseline
                     else _paired_difference(row_cases, baseline_cases, key, _finer(fmt), scale, lower_is_better))
        lines.append(f"| {method.name} | " + " | ".join(cells) + f" | {reference} | done |")
    return lines


def _total_time(cache: Path, training_seconds: float) -> list[str]:
    """The command's cost so far: registrations (sum of recorded wall times) and trainings."""
    records = [json.loads(p.read_text()) for p in sorted((cache / "runs").glob("*/*/*.json"))]
    registering = sum(r["seconds"] for r in records)
    return [
        "## Total time", "",
        f"Registrations: {len(records)} (method, pair) runs, {registering / 3600:.1f} h of wall time in all;",
        f"trainings of the rows' own networks: {training_seconds / 3600:.1f} h (the shipped `brain` weights' training",
        "is in their model card). Dataset preparation adds about 10 minutes. Rows were run across several",
        "sessions, some beside a training job on the same two cores, so per-pair times are upper bounds;",
        "training wall times likewise include periods when benchmarks shared (or paused) the cores.", "",
    ]


def write_report(cache: Path, data: Path, target: Path) -> None:
    """Tables 2 and 3 per dataset, the paper's numbers beside, with the protocol; written atomically."""
    counts = {d: len(cases(d, data, cache)) for d in DATASETS}
    models = [(m.name, "brain", model_path(m, cache)) for m in METHODS if m.model]
    models += [(m.name, "lung", model_path(m, cache, "SYNLUNG")) for m in METHODS if m.lung_model]
    from rwcnet.model import load_model

    training, wall_seconds = [], {}
    for name, organ, path in models:
        if path is None or not path.is_file():
            continue
        if path not in wall_seconds:  # every model file records its training time; rows may share a file
            wall_seconds[path] = load_model(path)[1].training.get("wall_seconds")
        seconds = wall_seconds[path]
        training.append(f"| {name} | {organ} | `{path.relative_to(path.parents[2]) if 'train' in path.parts else path.name}` | "
                        f"{'–' if seconds is None else f'{seconds / 60:.0f} min'} |")
    training_seconds = sum(s or 0.0 for path, s in wall_seconds.items() if "weights" not in path.parts)
    lines = [
        "# Results: the protocol of the paper's Tables 2 and 3 on the data we have",
        "",
        f"Generated on {date.today().isoformat()} by `python benchmarks/paper_tables.py all` (cached per method and",
        "case in `results/paper-tables/`, resumable; `report` rewrites this file from the cache).",
        "Every number below comes from that command; a dash means the row has not been run yet (see its status).",
        "Values are mean ± standard deviation over pairs; time is the whole `register` call per pair, peak",
        "memory the largest resident size of the registering process. The paper's column is its Table 2/3",
        "(OASIS Dice, NLST TRE); * marks ANTs SyN's public OASIS/NLST validation numbers quoted in SPEC §5.",
        "The paired column is a row's score minus that of ConvexAdam (Table 2), the paper's strongest",
        "comparator, or of RWCNet (Table 3) on the same pair: mean ± std over pairs, and in how many pairs",
        "the row is worse. The pairs differ in difficulty far more than the rows do, so this difference,",
        "not the overlap of the per-row spreads, tells whether two rows differ.",
        "",
    ]
    for dataset, title in DATASETS.items():
        for table in (2, 3):
            lines += [f"## Table {table} — {title} ({counts[dataset]} pair{'s' if counts[dataset] > 1 else ''})", ""]
            lines += _table(cache, data, dataset, table) + [""]
    lines += ["## Networks and their training", "", "| row | data | model | training wall time |", "|---|---|---|---|"]
    lines += training + [""]
    lines += _total_time(cache, training_seconds)
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n" + (target.parent / "results_notes.md").read_text())
    tmp.replace(target)
