"""``rwcnet train`` (stage-wise training, exact resume, torchrun), ``rwcnet plot-log`` (curves of a training log)
and ``rwcnet average-models`` (the weighted average of fine-tuned models of one network)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from rwcnet.outputs import check_output_folder, check_outputs


def train(
    config: str = typer.Argument(..., help="training preset (oasis, nlst, cpu-brain) or a YAML config file"),
    output: Path = typer.Option(..., "--output", "-o", help="run folder: checkpoint, log, config, final model, report"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUTPUT/checkpoint.pt (starts afresh when there is none)"),
    stage: Optional[list[int]] = typer.Option(None, "--stage", help="train only the phases of this stage (1-based; repeatable)"),
    data: Optional[Path] = typer.Option(None, "--data", help="Learn2Reg dataset folder (replaces the config's)"),
    init: Optional[Path] = typer.Option(None, "--init", help="start from the weights of this model file"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="stop after this many steps (checkpoint written)"),
    print_config: bool = typer.Option(False, "--print-config", help="print the validated config as YAML and exit"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress display"),
) -> None:
    """Train RWCNet stage by stage (coarser stages frozen), with checkpoints, validation and a final report.

    Interrupting (Ctrl-C, SIGTERM) writes a checkpoint first; run the same
    command with --resume to continue exactly. Under torchrun each process
    trains on its own share of every batch; only rank 0 writes.
    """
    from rwcnet.training.loop import TrainingInterrupted, train as run_training
    from rwcnet.training.config import dump_config, load_config

    settings = load_config(config)
    if data is not None:
        settings = settings.model_copy(update={"data": settings.data.model_copy(update={"dataset": str(data)})})
    if print_config:
        typer.echo(dump_config(settings), nl=False)
        return
    check_output_folder(output, "run folder")
    try:
        summary = run_training(settings, output, resume=resume, stages=stage or None, max_steps=max_steps,
                               init=init, progress=not quiet)
    except TrainingInterrupted as interrupted:
        typer.echo(f"interrupted: checkpoint written to {output / 'checkpoint.pt'}; continue with --resume", err=True)
        _finish_distributed()
        sys.exit(128 + interrupted.signum)
    _finish_distributed()
    if summary.get("model"):
        typer.echo(f"model written to {summary['model']} ({summary['wall_seconds'] / 60:.1f} min of training)")
        for key, scores in summary.get("report", {}).items():
            typer.echo(f"{key}: " + ", ".join(f"{name} {value:.4f}" for name, value in scores.items()))
    elif summary.get("status") == "stopped":
        typer.echo(f"stopped after {summary['steps_this_call']} steps; checkpoint in {output}; continue with --resume")


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def plot_log(
    log: Path = typer.Argument(..., help="training log (log.jsonl of a run folder)"),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write"),
    smooth: int = typer.Option(20, "--smooth", min=1, help="steps averaged for the training curves"),
) -> None:
    """Plot the training and validation curves of a training log to a PNG."""
    from rwcnet.training.log import plot_log as plot

    check_outputs((output, (".png",), "the plot (PNG)"))
    plotted = plot(log, output, smooth=smooth)
    typer.echo(f"{output}: {len(plotted)} curves")


def average_models(
    models: list[Path] = typer.Argument(..., help="model files of one network config (two or more)"),
    output: Path = typer.Option(..., "--output", "-o", help="model file to write (.pt)"),
    weight: Optional[list[float]] = typer.Option(None, "--weight", help="one positive weight per model, in order "
                                                 "(repeatable; default equal; normalised to sum to one)"),
) -> None:
    """Average the weights of models fine-tuned from one another into one model file (its metadata lists the inputs)."""
    from rwcnet.model.files import average_models as average, save_model

    check_outputs((output, (".pt",), "the model file"))
    model, metadata = average(models, weight or None)
    save_model(output, model, metadata)
    shares = ", ".join(f"{entry['weight']:.3f} {entry['file']}" for entry in metadata.training["average_of"])
    typer.echo(f"{output}: average of {shares}")
