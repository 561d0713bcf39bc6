"""The ``rwcnet`` command line: one typer app, one module per subcommand.

Problems with the user's input (:class:`rwcnet.errors.InputError`) are
printed as ``error: ...`` and end the program with exit code 2.
"""

from __future__ import annotations

import sys

import typer

from rwcnet import __version__
from rwcnet.errors import InputError
from rwcnet.runtime import keep_freed_memory

app = typer.Typer(
    name="rwcnet",
    help="RWCNet: 3D deformable medical image registration (recurrence with correlation).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        typer.echo(f"rwcnet {__version__}")
        raise typer.Exit()


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
from rwcnet.commands.train import plot_log, train  # noqa: E402

app.command()(train)
app.command()(plot_log)
from rwcnet.commands.synth_preview import synth_preview  # noqa: E402

app.command(name="synth-preview")(synth_preview)


def main() -> None:
    """Entry point of the ``rwcnet`` console script."""
    keep_freed_memory()
    try:
        app()
    except InputError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
