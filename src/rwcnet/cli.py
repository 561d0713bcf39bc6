"""The ``rwcnet`` command line: one typer app, one module per subcommand.

Problems with the user's input, output paths or machine
(:class:`rwcnet.errors.InputError`, and ``OSError`` such as a full disk or a
read-only folder) are printed as one line ``error: <path>: <problem>`` and end
the program with exit code 2; any other exception is a bug and keeps its
traceback (exit code 1). Ctrl-C exits with 130 and SIGTERM with 143, after
removing temporary files.
"""

from __future__ import annotations

import signal
import sys

import typer

from rwcnet import __version__
from rwcnet.errors import InputError
from rwcnet.outputs import Terminated, environment_problem, raise_on_sigterm
from rwcnet.runtime import keep_freed_memory

app = typer.Typer(
    name="rwcnet",
    help="RWCNet: 3D deformable medical image registration (recurrence with correlation).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rwcnet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    """Print the version with --version; the subcommands do the work."""


from rwcnet.commands.evaluate import evaluate  # noqa: E402

app.command()(evaluate)
from rwcnet.commands.apply import apply  # noqa: E402

app.command()(apply)
from rwcnet.commands.register import register  # noqa: E402

app.command()(register)
from rwcnet.commands.demo import demo  # noqa: E402

app.command()(demo)
from rwcnet.commands.convexadam import convexadam  # noqa: E402

app.command()(convexadam)
from rwcnet.commands.train import average_models, plot_log, train  # noqa: E402

app.command()(train)
app.command()(plot_log)
app.command(name="average-models")(average_models)
from rwcnet.commands.synth_preview import synth_preview  # noqa: E402

app.command(name="synth-preview")(synth_preview)


def main() -> None:
    """Entry point of the ``rwcnet`` console script."""
    keep_freed_memory()
    raise_on_sigterm()
    try:
        app()
    except InputError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except OSError as error:
        problem = environment_problem(error)
        if problem is None:
            raise
        typer.echo(f"error: {problem}", err=True)
        sys.exit(2)
    except Terminated:
        typer.echo("terminated (SIGTERM); temporary files removed", err=True)
        sys.exit(128 + signal.SIGTERM)
