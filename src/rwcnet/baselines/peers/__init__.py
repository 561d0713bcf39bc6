"""Classical peers — ANTs SyN, elastix B-spline and greedy — each in a virtual environment of its own, run as subprocesses.

antspyx pins older numpy and scipy and itk-elastix is 1.6 GB, so neither is
a dependency of rwcnet. Set them up once (from the folder you run in)::

    python -m venv .venvs/ants && .venvs/ants/bin/pip install antspyx
    python -m venv .venvs/elastix && .venvs/elastix/bin/pip install itk-elastix
    python -m venv --system-site-packages .venvs/greedy && .venvs/greedy/bin/pip install picsl-greedy

or point ``RWCNET_ANTS_PYTHON`` / ``RWCNET_ELASTIX_PYTHON`` / ``RWCNET_GREEDY_PYTHON``
at an interpreter that has them. greedy's wheel needs only numpy and SimpleITK,
so ``pip install rwcnet[greedy]`` also works: greedy then runs in rwcnet's own
interpreter (still as a subprocess, so its time and memory are its own). Each peer writes an ITK displacement field (LPS mm on the fixed
grid), which :func:`rwcnet.data.formats.read_itk_field` turns into our Learn2Reg field.
"""

from __future__ import annotations

import json
import os
import importlib.util
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwcnet.errors import InputError
from rwcnet.geometry.resample import same_grid
from rwcnet.data.formats import Image, read_image, read_itk_field, write_image

PEERS = {
    "ants": ("ants_syn.py", "RWCNET_ANTS_PYTHON", "antspyx"),
    "elastix": ("elastix_bspline.py", "RWCNET_ELASTIX_PYTHON", "itk-elastix"),
    "greedy": ("greedy_ncc.py", "RWCNET_GREEDY_PYTHON", "picsl-greedy"),
}


@dataclass
class PeerResult:
    """``field`` ``(X, Y, Z, 3)`` float32 in fixed voxels (Learn2Reg); ``warped`` the moving image warped by the peer's own tool."""

    field: np.ndarray
    warped: np.ndarray
    seconds: float  # registration only, measured inside the peer's process
    peak_gb: float  # peak resident memory of the peer's process


def peer_python(name: str) -> Path | None:
    """The interpreter of peer ``name``'s environment, or None when it is not set up."""
    script, variable, _ = PEERS[name]
    candidate = Path(os.environ.get(variable, Path(".venvs") / name / "bin" / "python"))
    if candidate.is_file():
        return candidate.absolute()  # absolute, not resolved: a venv python is a symlink
    if name == "greedy" and importlib.util.find_spec("picsl_greedy") is not None:  # the rwcnet[greedy] extra
        return Path(sys.executable)
    return None


def run_peer(name: str, fixed: Image, moving: Image, threads: int = 2, arguments: tuple[str, ...] = ()) -> PeerResult:
    """Register ``moving`` to ``fixed`` (same grid) with peer ``name`` (``ants``, ``elastix`` or ``greedy``).

    ``arguments`` go to the peer's script after the threads (greedy: the iterations per level, e.g. ``"50x25x10"``).
    """
    if name not in PEERS:
        raise InputError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    script, variable, package = PEERS[name]
    python = peer_python(name)
    if python is None:
        raise InputError(f"peer {name} is not set up: python -m venv .venvs/{name} && .venvs/{name}/bin/pip install "
                         f"{package} (or set {variable})")
    if not same_grid(fixed, moving):
        raise InputError(f"{moving.path or 'moving image'}: peers need the moving image on the fixed grid")
    with tempfile.TemporaryDirectory(prefix=f"rwcnet_{name}_") as tmp:
        paths = {key: Path(tmp) / f"{key}.nii.gz" for key in ("fixed", "moving", "field", "warped")}
        write_image(paths["fixed"], fixed.array.astype(np.float32), fixed)
        write_image(paths["moving"], moving.array.astype(np.float32), fixed)
        command = [str(python), str(Path(__file__).with_name(script)), *(str(paths[k]) for k in ("fixed", "moving", "field", "warped")),
                   str(threads), *arguments]
        process = subprocess.run(command, capture_output=True, text=True, cwd=tmp)  # peers drop files in their cwd
        if process.returncode != 0:
            raise RuntimeError(f"peer {name} failed:\n{process.stderr[-3000:]}")
        report = json.loads(process.stdout.strip().splitlines()[-1])
        reference = read_image(paths["fixed"])
        return PeerResult(field=read_itk_field(paths["field"], reference), warped=read_image(paths["warped"]).array,
                          seconds=report["seconds"], peak_gb=report["peak_gb"])
