"""Errors raised for bad user input.

Every problem a user can cause (a missing file, an image of the wrong
dimension, grids that do not match, ...) raises :class:`InputError` with a
message that names the file and the problem. The command line turns it into
``error: <message>`` on stderr and exit code 2. Output files are written
through :mod:`rwcnet.outputs`.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: the message names the file and the problem."""

