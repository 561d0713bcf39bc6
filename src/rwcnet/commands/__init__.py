"""Command-line subcommands; each module holds one typer command function."""
