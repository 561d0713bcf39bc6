"""``rwcnet register``: one pair, or every pair of a Learn2Reg dataset (split across ``torchrun`` processes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from rwcnet.datasets import field_names
from rwcnet.errors import InputError
from rwcnet.io import write_field, write_image, write_itk_field
from rwcnet.register import RegistrationResult, register as run_registration

console = Console(stderr=True)


def _check_writable(path: Path | None) -> None:
    if path is None:
        return
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: output folder {folder} is not writable")


def run_with_progress(fixed, moving, **kwargs) -> RegistrationResult:
    """Run :func:`rwcnet.register.register` with a progress display per stage on stderr."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=False,
    ) as progress:
        task = progress.add_task("reading", total=None)

        def on_stage(name: str) -> None:
            progress.update(task, description=name, completed=0, total=None)

        def on_step(done: int, total: int, loss: float) -> None:
            progress.update(task, completed=done, total=total)

        return run_registration(fixed, moving, on_stage=on_stage, on_step=on_step, **kwargs)


def write_outputs(
    result: RegistrationResult,
    output: Path,
    *,
    warped: Path | None = None,
    itk_field: Path | None = None,
    qc: Path | None = None,
    title_metrics: dict | None = None,
) -> None:
    """Write the Learn2Reg field and, on request, the warped image, the ITK field and the QC picture."""
    write_field(output, result.field, result.fixed)
    if warped is not None:
        write_image(warped, result.warped.astype(np.float32), result.fixed)
    if itk_field is not None:
        write_itk_field(itk_field, result.field, result.fixed)
    if qc is not None:
        from rwcnet.qc import qc_figure

        qc_figure(
            qc, result.fixed.array, result.moving.array, result.warped, result.field,
            spacing=result.fixed.spacing, title_metrics=title_metrics, affine=result.fixed.affine,
        )


def _batch(dataset: Path, pairs: str, output_dir: Path, options: dict) -> None:
    from rwcnet.datasets import Learn2RegDataset

    data = Learn2RegDataset(dataset)
    todo = data.pairs(pairs)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    mine = todo[rank::world]
    if not output_dir.is_dir():
        output_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"{len(mine)} of {len(todo)} pairs on process {rank}/{world} -> {output_dir}")
    for index, pair in enumerate(mine, 1):
        short, long = field_names(pair.fixed, pair.moving)
        if (output_dir / short).exists() and (output_dir / long).exists():
            console.print(f"[{index}/{len(mine)}] {pair.key}: already done")
            continue
        fixed_mask, moving_mask = data.mask_path(pair.fixed), data.mask_path(pair.moving)
        result = run_with_progress(pair.fixed, pair.moving, fixed_mask=fixed_mask, moving_mask=moving_mask, **options)
        write_field(output_dir / long, result.field, result.fixed)
        write_field(output_dir / short, result.field, result.fixed)
        console.print(f"[{index}/{len(mine)}] {pair.key}: {result.seconds['total']:.1f} s")


def _iterations(text: str | None) -> tuple[int, ...] | None:
    """``"100x50x20"`` -> ``(100, 50, 20)``; ``InputError`` for anything else."""
    if text is None:
        return None
    try:
        counts = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        counts = ()
    if not counts or any(n < 0 for n in counts):
        raise InputError(f"--refine-iters {text!r}: expected counts per level like 100x50x20")
    return counts


def register(
    fixed: Optional[Path] = typer.Option(None, "--fixed", help="Fixed image (.nii/.nii.gz/.mha/.mhd/.nrrd)."),
    moving: Optional[Path] = typer.Option(None, "--moving", help="Moving image; resampled onto the fixed grid physically if needed."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Learn2Reg field (X,Y,Z,3) in fixed voxels, .nii.gz or .npz."),
    fixed_mask: Optional[Path] = typer.Option(None, "--fixed-mask", help="Mask on the fixed grid."),
    moving_mask: Optional[Path] = typer.Option(None, "--moving-mask", help="Mask on the moving grid."),
    model: str = typer.Option("brain", "--model", help="Shipped model name (brain), a model file, or 'none' for instance optimisation alone."),
    io: bool = typer.Option(True, "--io/--no-io", help="Instance optimisation (Adam on MIND features) after the network."),
    io_iters: Optional[int] = typer.Option(None, "--io-iters", min=0, help="Adam steps (default: the modality preset's)."),
    refine: bool = typer.Option(True, "--refine/--no-refine", help="Fine-scale refinement to full resolution after the network and IO."),
    refine_metric: str = typer.Option("auto", "--refine-metric", help="auto (NCC for CT or same-contrast pairs, else MIND), ncc or mind."),
    refine_iters: Optional[str] = typer.Option(None, "--refine-iters", help="Refinement iterations per level, coarse to fine, e.g. 100x50x20."),
    modality: str = typer.Option("mr", "--modality", help="mr (brain-like) or ct (lung-like): normalisation and IO preset."),
    ct_range: str = typer.Option("window", "--ct-range", help="CT normalisation: window (-1000..600 HU) or paper (-4000..16000)."),
    warped: Optional[Path] = typer.Option(None, "--warped", help="Also write the warped moving image."),
    itk_field: Optional[Path] = typer.Option(None, "--itk-field", help="Also write an ITK/ANTs displacement field (mm, LPS)."),
    qc: Optional[Path] = typer.Option(None, "--qc", help="Also write a QC picture (.png)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded; the pipeline is deterministic on CPU)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Batch mode: a Learn2Reg dataset folder."),
    pairs: str = typer.Option("val", "--pairs", help="Batch mode: val, test, or a CSV of fixed,moving paths."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Batch mode: folder for disp_*.nii.gz (both name forms)."),
) -> None:
    """Register a moving image to a fixed image (or every pair of a dataset) and write the displacement field."""
    options = dict(
        model=None if model.lower() == "none" else model, io=io, io_iterations=io_iters, modality=modality,
        ct_range=ct_range, device=device, seed=seed, refine=refine, refine_metric=refine_metric,
        refine_iterations=_iterations(refine_iters),
    )
    if dataset is not None:
        if output_dir is None:
            raise InputError("--dataset needs --output-dir")
        _batch(dataset, pairs, output_dir, options)
        return
    if fixed is None or moving is None or output is None:
        raise InputError("give --fixed, --moving and --output (or --dataset with --output-dir)")
    for path in (output, warped, itk_field, qc):
        _check_writable(path)
    result = run_with_progress(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, **options)
    write_outputs(result, output, warped=warped, itk_field=itk_field, qc=qc)
    for note in result.notes:
        console.print(f"note: {note}")
    timing = ", ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    console.print(f"wrote {output} ({timing})")
