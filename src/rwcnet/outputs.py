"""Output files of a command: checked before any work, then written atomically and all together.

* :func:`check_outputs` runs before any computation: each output's format
  (file name ending), its folder (exists, is a folder, a file can be created
  there: this catches read-only folders and file systems, ``/proc``, missing
  permissions) and that no two outputs share a path.
* :func:`atomic_output` writes one file through a temporary file next to it,
  created like any new file (mode ``0666`` less the umask), renamed onto the
  target on success and removed on failure. Inside :func:`written_together`
  the renames wait until the whole block succeeded, so a command's outputs
  appear together or not at all.
* :func:`environment_problem` turns an ``OSError`` the user's environment
  caused (full disk, read-only file system, permissions...) into the one line
  the command line prints; :func:`raise_on_sigterm` makes SIGTERM unwind like
  Ctrl-C, so that temporary files are removed.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import secrets
import signal
from pathlib import Path
from typing import Iterator, Sequence

from rwcnet.errors import InputError

#: errno values that mean a problem of the user's paths or machine, not a bug in rwcnet.
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
    errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EXDEV, errno.EIO,
})


class Terminated(BaseException):
    """SIGTERM arrived; like ``KeyboardInterrupt`` it is no ``Exception``, so only cleanup code sees it."""


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _create_temporary(path: Path) -> Path:
    """Create an empty hidden file beside ``path`` that keeps its suffixes (writers dispatch on them).

    ``os.open`` with mode ``0666`` lets the umask decide the permissions, as for any new file.
    """
    suffix = "".join(path.suffixes)
    while True:
        candidate = _folder(path) / f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back in the block (delivered at its end), so a temporary file is never left untracked."""
    if not hasattr(signal, "pthread_sigmask"):  # not on Windows
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _format_ok(path: Path, formats: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(formats))


def check_output_folder(folder: Path, what: str = "output folder") -> None:
    """Check, before any work, that files can be created in ``folder``; create it (with parents) if missing."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: {what} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _signals_held():
            os.remove(_create_temporary(folder / "probe"))
    except OSError as error:
        raise InputError(f"{folder}: cannot write in this {what} ({os.strerror(error.errno or errno.EIO)})") from error


def check_outputs(*outputs: tuple[Path | None, Sequence[str], str]) -> None:
    """Check every ``(path, formats, what)`` a command will write, before any work; ``None`` paths are skipped.

    Raises :class:`InputError` for a name with another ending than ``formats``,
    a path that is a folder, a missing folder, a folder where no file can be
    created, or two outputs with one path.
    """
    seen: dict[Path, Path] = {}
    for path, formats, what in outputs:
        if path is None:
            continue
        if path.is_dir():
            raise InputError(f"{path}: is a folder; give a file name for {what}")
        if not _format_ok(path, formats):
            raise InputError(f"{path}: cannot write {what} in this format; name the file *{', *'.join(formats)}")
        folder = _folder(path)
        if not folder.is_dir():
            raise InputError(f"{path}: output folder {folder} does not exist")
        try:
            with _signals_held():
                os.remove(_create_temporary(path))
        except OSError as error:
            raise InputError(f"{path}: cannot write in {folder} ({os.strerror(error.errno or errno.EIO)})") from error
        key = path.resolve()
        if key in seen:
            raise InputError(f"{path}: given for two outputs (also as {seen[key]})")
        seen[key] = path


class _Together:
    """Temporary files waiting for their rename: ``(temporary, target)`` pairs."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def commit(self) -> None:
        """Rename every temporary file onto its target, with SIGINT/SIGTERM held back meanwhile.

        If one rename fails the targets renamed before it are removed again, so none appears.
        """
        placed: list[Path] = []
        with _signals_held():
            try:
                for temporary, target in self.pending:
                    os.replace(temporary, target)
                    placed.append(target)
                self.pending = []
            except BaseException:
                for target in placed:
                    target.unlink(missing_ok=True)
                raise

    def discard(self) -> None:
        for temporary, _ in self.pending:
            temporary.unlink(missing_ok=True)
        self.pending = []


_together: contextvars.ContextVar[_Together | None] = contextvars.ContextVar("rwcnet_outputs_together", default=None)


@contextlib.contextmanager
def written_together() -> Iterator[None]:
    """Every :func:`atomic_output` in the block appears only when the whole block succeeds; else none does.

    Nested inside another such block, it joins the outer one.
    """
    if _together.get() is not None:
        yield
        return
    batch = _Together()
    token = _together.set(batch)
    try:
        yield
        batch.commit()
    finally:
        _together.reset(token)
        batch.discard()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary name keeps the file's suffixes (``.nii.gz``, ``.npz``...)
    so writers that dispatch on the extension still work; it is created with
    the umask's permissions. On any exception (also Ctrl-C and SIGTERM) it is
    removed and ``path`` is left untouched. Inside :func:`written_together`
    the rename waits for the end of that block. An ``OSError`` of the
    environment (see :data:`ENVIRONMENT_ERRNOS`) becomes :class:`InputError` naming ``path``.
    """
    path = Path(path)
    folder = _folder(path)
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    batch = _together.get()
    temporary: Path | None = None
    try:
        with _signals_held():
            temporary = _create_temporary(path)
        yield temporary
        if batch is None:
            os.replace(temporary, path)
        else:
            batch.pending.append((temporary, path))
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            _raise_if_environment(error, path)
        raise


def _raise_if_environment(error: OSError, path: Path) -> None:
    if error.errno in ENVIRONMENT_ERRNOS:
        raise InputError(f"{path}: {os.strerror(error.errno)}") from error


def environment_problem(error: OSError) -> str | None:
    """``"<path>: <problem>"`` for an ``OSError`` of the user's paths or machine; ``None`` for any other (a bug)."""
    if error.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = error.filename if error.filename is not None else "rwcnet"
    return f"{where}: {os.strerror(error.errno)}"


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (cleanup runs, as for Ctrl-C)."""

    def handle(signum: int, frame: object) -> None:
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, handle)
