"""Run the ``rwcnet`` command line in-process from a test, as a user's shell would, and capture what it prints."""

from __future__ import annotations

import sys

import pytest

from rwcnet.cli import main


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run the ``rwcnet`` entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["rwcnet", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err
