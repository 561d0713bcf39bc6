"""Batch registration: the pairs of a CSV or of a Learn2Reg dataset, split among ``torchrun`` ranks, resumable.

A pair whose output file exists is finished (fields are written atomically, so a
file that exists is complete) and a rerun skips it. A pair that fails is reported
and the others go on; each process then writes a status JSON of every pair it had.
Under ``torchrun`` (one node or several) rank ``r`` of ``W`` takes pairs
``r, r + W, ...`` (``RANK``/``WORLD_SIZE``; no process group is needed) and uses
``cores // LOCAL_WORLD_SIZE`` torch threads.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rwcnet.data.datasets import field_names
from rwcnet.errors import InputError
from rwcnet.data.formats import _suffix, write_field
from rwcnet.outputs import atomic_output

log = logging.getLogger(__name__)

CSV_COLUMNS = ("fixed", "moving", "output", "fixed_mask", "moving_mask")


@dataclass(frozen=True)
class Job:
    """One pair to register: image and mask paths, the field's path, and (dataset mode) the older name as a symlink."""

    fixed: Path
    moving: Path
    output: Path
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    alias: Path | None = None


@dataclass(frozen=True)
class Share:
    """This process's place under ``torchrun``: rank, world size, processes on this node, torch threads."""

    rank: int
    world: int
    local_world: int
    threads: int


def image_stem(path: str | Path) -> str:
    """The file name without its image format suffix (``.nii.gz`` counts as one): ``a/OASIS_0395.nii.gz`` -> ``OASIS_0395``."""
    name = Path(path).name
    return name[: -len(_suffix(Path(name)))] if _suffix(Path(name)) else name


def default_output(output_dir: Path, fixed: Path, moving: Path) -> Path:
    """``OUTDIR/disp_<fixed stem>_<moving stem>.nii.gz``."""
    return output_dir / f"disp_{image_stem(fixed)}_{image_stem(moving)}.nii.gz"


def read_jobs_csv(path: str | Path, output_dir: Path | None) -> list[Job]:
    """Jobs from a CSV of ``fixed,moving[,output,fixed_mask,moving_mask]``; header optional, paths relative to the CSV.

    A header row (every cell a column name) may name the columns in any order. An empty
    ``output`` cell, or none, gives :func:`default_output` in ``output_dir``. Input files
    are not checked here: a missing one fails its own pair only.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: pairs CSV file does not exist")
    base = path.resolve().parent
    columns = list(CSV_COLUMNS)
    jobs: list[Job] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            cells = [cell.strip() for cell in row]
            while cells and not cells[-1]:
                cells.pop()
            if not cells or cells[0].startswith("#"):
                continue
            if not jobs and all(c.lower() in CSV_COLUMNS for c in cells):
                columns = [c.lower() for c in cells]
                if "fixed" not in columns or "moving" not in columns or len(set(columns)) != len(columns):
                    raise InputError(f"{path}: line {number}: the header must name fixed and moving once each, not {row}")
                continue
            if len(cells) < 2 or len(cells) > len(columns):
                raise InputError(f"{path}: line {number} must hold {','.join(columns)} (at least fixed,moving), not {row}")
            entry = {name: (Path(cell) if Path(cell).is_absolute() else base / cell) for name, cell in zip(columns, cells) if cell}
            if "fixed" not in entry or "moving" not in entry:
                raise InputError(f"{path}: line {number} has no fixed or no moving image")
            if "output" not in entry:
                if output_dir is None:
                    raise InputError(f"{path}: line {number} names no output; give --output-dir")
                entry["output"] = default_output(output_dir, entry["fixed"], entry["moving"])
            jobs.append(Job(**entry))
    if not jobs:
        raise InputError(f"{path}: no pairs in this CSV file")
    _check_distinct_outputs(jobs, path)
    return jobs


def _check_distinct_outputs(jobs: list[Job], source: Path) -> None:
    seen: dict[Path, Job] = {}
    for job in jobs:
        key = job.output.resolve()
        if key in seen:
            raise InputError(f"{source}: pairs {seen[key].fixed.name}<-{seen[key].moving.name} and "
                             f"{job.fixed.name}<-{job.moving.name} would both write {job.output}")
        seen[key] = job


def dataset_jobs(dataset: Path, pairs: str, output_dir: Path) -> list[Job]:
    """Jobs of a Learn2Reg dataset: the field under the newer name, the older name as its symlink (SPEC §4)."""
    from rwcnet.data.datasets import Learn2RegDataset

    data = Learn2RegDataset(dataset)
    jobs = []
    for pair in data.pairs(pairs):
        short, long = field_names(pair.fixed, pair.moving)
        jobs.append(Job(pair.fixed, pair.moving, output_dir / long, data.mask_path(pair.fixed),
                        data.mask_path(pair.moving), alias=output_dir / short))
    return jobs


def process_share() -> Share:
    """Rank and world size from ``torchrun``'s environment (1 process without it); sets this process's torch threads."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_world)
    if "LOCAL_WORLD_SIZE" in os.environ:
        torch.set_num_threads(threads)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return Share(rank, world, local_world, torch.get_num_threads())


def link_alias(job: Job) -> None:
    """Make ``job.alias`` a relative symlink to ``job.output`` (replacing an older link; a regular file is left alone)."""
    if job.alias is None or (job.alias.exists() and not job.alias.is_symlink()):
        return
    target = os.path.relpath(job.output.resolve(), job.alias.parent.resolve())
    if job.alias.is_symlink() and os.readlink(job.alias) == target:
        return
    temporary = job.alias.with_name(f".{job.alias.name}.link.tmp")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    os.symlink(target, temporary)
    os.replace(temporary, job.alias)


def status_path(output_dir: Path, share: Share) -> Path:
    """``OUTDIR/status.json`` for one process; ``status.rank<R>.json`` for each of several."""
    return output_dir / ("status.json" if share.world == 1 else f"status.rank{share.rank}.json")


def _write_status(path: Path, share: Share, records: list[dict]) -> None:
    counts = {state: sum(r["state"] == state for r in records) for state in ("done", "skipped", "failed", "pending")}
    payload = {"rank": share.rank, "world_size": share.world, "threads": share.threads, **counts, "pairs": records}
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8")


RegisterOne = Callable[[Job], object]  # returns a RegistrationResult
Report = Callable[[str], None]


def run_jobs(jobs: list[Job], output_dir: Path, register_one: RegisterOne, report: Report) -> int:
    """Register this process's share of ``jobs``, write fields (and aliases) and the status JSON; returns the exit code.

    0 when every pair of the share is done or was done before, 1 when any failed.
    ``report`` receives one line per pair.
    """
    share = process_share()
    mine = jobs[share.rank :: share.world]
    output_dir.mkdir(parents=True, exist_ok=True)
    status = status_path(output_dir, share)
    report(f"{len(mine)} of {len(jobs)} pairs on process {share.rank}/{share.world} ({share.threads} threads) -> {output_dir}")
    records = [{"fixed": str(j.fixed), "moving": str(j.moving), "output": str(j.output), "state": "pending"} for j in mine]
    _write_status(status, share, records)
    for index, (job, record) in enumerate(zip(mine, records), 1):
        label = f"[{index}/{len(mine)}] {job.fixed.name} <- {job.moving.name}"
        if job.output.is_file():
            link_alias(job)
            record["state"] = "skipped"
            report(f"{label}: already done ({job.output.name})")
            _write_status(status, share, records)
            continue
        start = time.perf_counter()
        try:
            job.output.parent.mkdir(parents=True, exist_ok=True)
            result = register_one(job)
            write_field(job.output, result.field, result.fixed)
            link_alias(job)
        except Exception as error:  # a failed pair must not stop the others; Ctrl-C still does
            message = str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"
            if not isinstance(error, InputError):
                log.error("%s failed:\n%s", label, traceback.format_exc())
            record.update(state="failed", error=message)
            report(f"{label}: failed: {message}")
        else:
            record.update(state="done", seconds=round(time.perf_counter() - start, 2), warnings=list(result.warnings))
            for warning in result.warnings:
                report(f"{label}: warning: {warning}")
            report(f"{label}: {record['seconds']:.1f} s -> {job.output.name}")
        _write_status(status, share, records)
    failed = sum(r["state"] == "failed" for r in records)
    if failed:
        report(f"{failed} of {len(mine)} pairs failed on process {share.rank}; see {status}")
    return 1 if failed else 0
