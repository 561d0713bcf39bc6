"""``rwcnet convexadam``: the in-package ConvexAdam baseline through the same pipeline and outputs as ``register``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rwcnet.commands.register import check_registration_outputs, console, run_with_progress, write_outputs


def convexadam(
    fixed: Path = typer.Option(..., "--fixed", help="Fixed image."),
    moving: Path = typer.Option(..., "--moving", help="Moving image; resampled onto the fixed grid physically if needed."),
    output: Path = typer.Option(..., "--output", "-o", help="Learn2Reg field (X,Y,Z,3) in fixed voxels."),
    fixed_mask: Optional[Path] = typer.Option(None, "--fixed-mask", help="Mask on the fixed grid."),
    moving_mask: Optional[Path] = typer.Option(None, "--moving-mask", help="Mask on the moving grid."),
    modality: str = typer.Option("mr", "--modality", help="mr (brain preset: grid 6, radius 4) or ct (lung preset: grid 4, radius 6)."),
    io: bool = typer.Option(True, "--io/--no-io", help="The Adam stage after the discrete optimisation."),
    io_iters: Optional[int] = typer.Option(None, "--io-iters", min=0, help="Adam steps (default: the preset's)."),
    warped: Optional[Path] = typer.Option(None, "--warped", help="Also write the warped moving image."),
    itk_field: Optional[Path] = typer.Option(None, "--itk-field", help="Also write an ITK/ANTs displacement field."),
    qc: Optional[Path] = typer.Option(None, "--qc", help="Also write a QC picture (.png)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Register with ConvexAdam (MIND, discrete coupled convex optimisation, inverse consistency, Adam)."""
    check_registration_outputs(output, warped, itk_field, qc)
    result = run_with_progress(
        fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, method="convexadam", io=io,
        io_iterations=io_iters, modality=modality, device=device,
    )
    write_outputs(result, output, warped=warped, itk_field=itk_field, qc=qc)
    timing = ", ".join(f"{name} {value:.1f} s" for name, value in result.seconds.items())
    console.print(f"wrote {output} ({timing})")
