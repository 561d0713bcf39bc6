"""``rwcnet register``: one pair, or every pair of a Learn2Reg dataset (split across ``torchrun`` processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console

from rwcnet.errors import InputError
from rwcnet.data.formats import FIELD_SUFFIXES, NIFTI_SUFFIXES, WRITABLE_ITK_SUFFIXES, read_image, write_field, write_image
from rwcnet.exports import ITK_TRANSFORM_SUFFIXES
from rwcnet.outputs import check_output_folder, check_outputs, written_together
from rwcnet.progress import StageProgress
from rwcnet.register import RegistrationResult, register as run_registration
from rwcnet.run_report import StageMeter
from rwcnet.transform_outputs import TransformOutputs, write_transform_outputs

console = Console(stderr=True, soft_wrap=True)


def check_registration_outputs(output: Path, warped: Path | None, itk_field: Path | None, qc: Path | None,
                               extras: TransformOutputs | None = None) -> None:
    """Check the paths :func:`write_outputs` will write (formats, folders), before any work."""
    images = NIFTI_SUFFIXES + WRITABLE_ITK_SUFFIXES
    extras = extras or TransformOutputs()
    check_outputs((output, FIELD_SUFFIXES, "a displacement field"), (warped, images, "the warped image"),
                  (itk_field, ITK_TRANSFORM_SUFFIXES, "an ITK transform"), (qc, (".png",), "the QC picture"),
                  *extras.checks())


def run_with_progress(fixed, moving, *, meter=None, **kwargs) -> RegistrationResult:
    """Run :func:`rwcnet.register.register` showing each stage's progress on stderr (plain lines off a terminal).

    ``meter`` (a :class:`rwcnet.run_report.StageMeter`) also sees each stage, for ``--report``.
    """
    with StageProgress(console) as progress:
        def stage(name: str) -> None:
            progress.stage(name)
            if meter is not None:
                meter(name)

        stage("reading")
        return run_registration(fixed, moving, on_stage=stage, on_step=progress.step, **kwargs)


def write_outputs(
    result: RegistrationResult,
    output: Path,
    *,
    warped: Path | None = None,
    itk_field: Path | None = None,
    qc: Path | None = None,
    title_metrics: dict | None = None,
    extras: TransformOutputs | None = None,
) -> list[str]:
    """Write the Learn2Reg field and, on request, the warped image, the ITK transform, the QC picture and
    ``extras`` (:mod:`rwcnet.transform_outputs`): all or none. Returns the lines to print about the extras."""
    extras = extras or TransformOutputs()
    with written_together():
        write_field(output, result.field, result.fixed)
        if warped is not None:
            write_image(warped, result.warped.astype(np.float32), result.fixed)
        lines = write_transform_outputs(result, extras, itk_field=itk_field)
        if qc is not None:
            from rwcnet.qc import qc_figure

            qc_figure(
                qc, result.fixed.array, result.moving.array, result.warped, result.field,
                spacing=result.fixed.spacing, title_metrics=title_metrics, affine=result.fixed.affine,
            )
    return lines


def _batch(jobs, output_dir: Path, options: dict) -> None:
    from rwcnet.batch import run_jobs

    def register_one(job):
        return run_with_progress(job.fixed, job.moving, fixed_mask=job.fixed_mask, moving_mask=job.moving_mask, **options)

    code = run_jobs(jobs, output_dir, register_one, lambda line: console.print(line, soft_wrap=True, markup=False))
    if code:
        raise typer.Exit(code)


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
    model: str = typer.Option(
        "default", "--model",
        help="default (the modality's model: brain for mr, lung for ct), "
             "a shipped model name (brain, lung), a model file, or 'none' for no network (with --io: IO alone). "
             "IO alone follows shifts up to about 6 mm and smooth deformations up to about 10 mm (known "
             "displacements, benchmarks/io_capture_range.py: residual 0.9-1.0 mm at a 6 mm shift, 2-4.5 mm at 10 mm, "
             "lost at 15 mm): use it alone for pairs already aligned to within a few mm, not for breathing motion.",
    ),
    io: Optional[bool] = typer.Option(None, "--io/--no-io", help="Instance optimisation (Adam on MIND features) after the "
                                      "network. Default: on for --modality mr, off for ct (on breathing CT, IO's field "
                                      "is a worse start for the refinement than the network's)."),
    io_iters: Optional[int] = typer.Option(None, "--io-iters", min=0, help="Adam steps (default: the modality preset's)."),
    refine: bool = typer.Option(True, "--refine/--no-refine", help="Fine-scale refinement to full resolution after the network and IO."),
    refine_metric: str = typer.Option("auto", "--refine-metric", help="auto (NCC for CT or same-contrast pairs, else MIND), ncc or mind."),
    refine_iters: Optional[str] = typer.Option(None, "--refine-iters", help="Refinement iterations per level, coarse to fine, e.g. 100x50x20."),
    repair_folds: bool = typer.Option(True, "--repair-folds/--no-repair-folds", help="Last step: smooth the field "
                                      "locally wherever it folds (Jacobian determinant <= 0.01), nowhere else."),
    affine: bool = typer.Option(True, "--affine/--no-affine", help="Rigid then affine pre-alignment before the "
                                "deformable steps (Learn2Reg pairs come pre-aligned: --no-affine)."),
    transform: str = typer.Option("affine", "--transform", help="Last linear stage of the pre-alignment: rigid or affine."),
    affine_only: bool = typer.Option(False, "--affine-only", help="Stop after the pre-alignment (no deformable step)."),
    affine_metric: str = typer.Option("mind", "--affine-metric", help="Pre-alignment metric: mind (MR, CT, contrast "
                                      "changes), ncc or mi."),
    init: Optional[Path] = typer.Option(None, "--init", help="Initial ITK/ANTs affine (.txt/.tfm, .mat in ITK's "
                                        "MATLAB format; FSL matrices are refused): the search starts there, or with "
                                        "--no-affine it is applied as it is."),
    modality: str = typer.Option("mr", "--modality", help="mr (brain-like) or ct (lung-like): normalisation and IO preset."),
    ct_range: str = typer.Option("window", "--ct-range", help="CT normalisation: window (-1000..600 HU) or paper (-4000..16000)."),
    warped: Optional[Path] = typer.Option(None, "--warped", help="Also write the warped moving image."),
    itk_field: Optional[Path] = typer.Option(
        None, "--itk-field",
        help="Also write the whole transform for ITK/ANTs: .nii.gz/.nii/.mha/.nrrd one displacement field (mm, LPS, "
             "fixed grid, affine included); .h5 an ITK CompositeTransform [affine, deformable field].",
    ),
    affine_out: Optional[Path] = typer.Option(
        None, "--affine-out", help="Also write the affine alone as an ITK transform (.txt/.tfm/.mat): fixed LPS points "
                                   "to moving ones, as antsApplyTransforms -r fixed -i moving -t applies it."),
    jacobian: Optional[Path] = typer.Option(
        None, "--jacobian", help="Also write the Jacobian determinant of the whole transform (float32, fixed grid, "
                                 "central differences, not cropped) and print its statistics."),
    inverse: Optional[Path] = typer.Option(
        None, "--inverse", help="Also write the inverse field in the Learn2Reg format on the moving grid (moving "
                                "voxels; fixed-point iteration), and print how well it inverts, both ways."),
    itk_inverse: Optional[Path] = typer.Option(
        None, "--itk-inverse", help="Also write the inverse for ITK/ANTs (moving grid, LPS mm; .nii.gz/.mha/.nrrd or "
                                    ".h5): carries fixed-side labels back onto the moving image."),
    report: Optional[Path] = typer.Option(
        None, "--report", help="Also write a JSON report: seconds and peak memory per step, the affine, Jacobian "
                               "statistics, versions, input SHA-256 and the command line."),
    qc: Optional[Path] = typer.Option(None, "--qc", help="Also write a QC picture (.png); with the pre-alignment also "
                                      "NAME_affine.png, checkerboards of fixed and moving before and after it."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Random seed (recorded; the pipeline is deterministic on CPU)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Batch mode: a Learn2Reg dataset folder."),
    pairs: Optional[str] = typer.Option(
        None, "--pairs",
        help="Batch mode. With --dataset: val (default), test, or a CSV of fixed,moving paths. Alone: a CSV of "
             "fixed,moving[,output,fixed_mask,moving_mask] (header optional, paths relative to the CSV; "
             "default output OUTDIR/disp_<fixed stem>_<moving stem>.nii.gz). Finished pairs are skipped; failed "
             "ones are reported, the others go on, and the command exits 1; OUTDIR/status.json lists every pair.",
    ),
    output_dir: Optional[Path] = typer.Option(
        None, "--output-dir",
        help="Batch mode: folder for the fields and status.json (dataset mode: the newer Learn2Reg name, "
             "the older one a relative symlink to it).",
    ),
) -> None:
    """Register a moving image to a fixed image (or every pair of a CSV or a dataset) and write the displacement field."""
    options = dict(
        model=None if model.lower() == "none" else model, io=io, io_iterations=io_iters, modality=modality,
        ct_range=ct_range, device=device, seed=seed, refine=refine, refine_metric=refine_metric,
        refine_iterations=_iterations(refine_iters), affine=affine, transform=transform, affine_only=affine_only,
        affine_metric=affine_metric, init=init, repair_folds=repair_folds,
    )
    single_pair_outputs = {"--affine-out": affine_out, "--jacobian": jacobian, "--inverse": inverse,
                           "--itk-inverse": itk_inverse, "--report": report}
    if dataset is not None or pairs is not None:
        from rwcnet.batch import dataset_jobs, read_jobs_csv

        given = [flag for flag, value in single_pair_outputs.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)}: for a single pair (--fixed, --moving, --output), not batch mode")
        if output_dir is None:
            raise InputError("batch mode (--dataset or --pairs) needs --output-dir")
        if dataset is not None:
            jobs = dataset_jobs(dataset, pairs or "val", output_dir)
        else:
            jobs = read_jobs_csv(pairs, output_dir)
        check_output_folder(output_dir)
        _batch(jobs, output_dir, options)
        return
    if fixed is None or moving is None or output is None:
        raise InputError("give --fixed, --moving and --output (or --dataset with --output-dir)")
    extras = TransformOutputs(affine_out=affine_out, jacobian=jacobian, inverse=inverse, itk_inverse=itk_inverse,
                              report=report, seed=seed,
                              inputs={"fixed": fixed, "moving": moving, "fixed_mask": fixed_mask,
                                      "moving_mask": moving_mask},
                              meter=StageMeter() if report is not None else None,
                              qc_affine=qc.with_name(qc.name[:-len(".png")] + "_affine.png")
                              if qc is not None and qc.name.lower().endswith(".png") and (affine or init) else None)
    check_registration_outputs(output, warped, itk_field, qc, extras)
    result = run_with_progress(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, meter=extras.meter,
                               **options)
    extras.moving, extras.affine = result.original_moving, result.affine
    if moving_mask is not None and (inverse is not None or itk_inverse is not None):
        extras.moving_mask = read_image(moving_mask)
    if fixed_mask is not None:
        extras.fixed_mask = read_image(fixed_mask)
    for line in write_outputs(result, output, warped=warped, itk_field=itk_field, qc=qc, extras=extras):
        console.print(line, soft_wrap=True, markup=False)
    for warning in result.warnings:
        console.print(f"warning: {warning}", soft_wrap=True, markup=False)
    for note in result.notes:
        console.print(f"note: {note}")
    timing = ", ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    console.print(f"wrote {output} ({timing})")
