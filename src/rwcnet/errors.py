"""Errors raised for bad user input, and atomic output files.

Every problem a user can cause (a missing file, an image of the wrong
dimension, grids that do not match, ...) raises :class:`InputError` with a
message that names the file and the problem. The command line turns it into
``error: <message>`` on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


class InputError(ValueError):
    """Bad input from the user: the message names the file and the problem."""


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary name keeps the file's suffixes (``.nii.gz``, ``.npz``...)
    so writers that dispatch on the extension still work. On any exception
    the temporary file is removed and ``path`` is left untouched, so no
    half-written output is ever visible.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise InputError(f"{path}: output folder {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise InputError(f"{path}: output folder {directory} is not writable")
    suffix = "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
