"""The fine-scale refinement against greedy, on the shared real brain pair, all methods in one run.

Methods, each in its own subprocess with the same thread count, in this order,
on ``../shared/data/brain`` (fixed 0001, moving 0002, 160×192×224, 1 mm):

* ``greedy 100x50x20`` and ``greedy 50x25x10``: greedy (``rwcnet.baselines.peers``), NCC 2x2x2, no affine;
* ``default``: ``register()`` as shipped now (network, IO, the refinement, then the fold repair; no affine step for every
  method: the pair is pre-aligned);
* ``network+io``: ``register(refine=False, repair_folds=False)``, the default before the refinement;
* ``network``: ``register(io=False, refine=False, repair_folds=False)``, the network alone (one forward pass);
* ``network+refine``: ``register(io=False, refine=True)``;
* ``io+refine``: ``register(model=None)``: the default without the network;
* ``io``: ``register(model=None, refine=False, repair_folds=False)``, instance optimisation alone;
* ``convexadam``: ``register(method="convexadam")``.

Scores with rwcnet's official metrics (:func:`rwcnet.evaluation.metrics.score_case`): Dice and HD95 (voxels)
over the dataset JSON's ``evaluation_labels``, SDlogJ and folds (``det J ≤ 0``, % of voxels).
Time is the whole ``register`` call (greedy: its registration, measured inside its process),
peak memory the process's ``VmHWM``. The background training (``/work/runs/train.pid`` when
present, or ``--pause-pid``) is stopped for the run and continued after it, even on failure; the
load average is printed before and after.

    python benchmarks/refine_vs_greedy.py [--methods ...] [--threads 2] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {
    "default": {},
    "network": dict(io=False, refine=False, repair_folds=False),
    "network+io": dict(refine=False, repair_folds=False),
    "network+refine": dict(io=False, refine=True),
    "io": dict(model=None, refine=False, repair_folds=False),
    "io+refine": dict(model=None),
    "convexadam": dict(method="convexadam"),
}
METHODS = ("greedy 100x50x20", "greedy 50x25x10", "default", "network+refine", "io+refine", "network+io", "network", "io",
           "convexadam")


def _memory_gb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _worker(method: str, data: Path, output: Path, threads: int) -> None:
    """Register the real pair with ``method``; save the field, print a JSON line with time and memory."""
    import torch

    from rwcnet.data.formats import read_image
    from rwcnet.runtime import keep_freed_memory

    keep_freed_memory()  # as the rwcnet command line does
    torch.set_num_threads(threads)
    root = data / "brain" / "imagesTr"
    fixed, moving = (read_image(root / f"BRAIN_{n}_0000.nii.gz") for n in ("0001", "0002"))
    if method.startswith("greedy"):
        from rwcnet.baselines.peers import run_peer

        result = run_peer("greedy", fixed, moving, threads=threads, arguments=(method.split()[1],))
        field, seconds, peak, stages, notes = result.field, result.seconds, result.peak_gb, {}, []
    else:
        from rwcnet.register import register

        start = time.perf_counter()
        result = register(fixed, moving, device="cpu", seed=0, affine=False, **OPTIONS[method])  # pre-aligned pair
        seconds = time.perf_counter() - start
        field, peak, stages, notes = result.field, _memory_gb("VmHWM"), result.seconds, result.notes
    np.save(output, field.astype(np.float32))
    print(json.dumps({"seconds": seconds, "peak_gb": peak, "stages": stages, "notes": notes}))


def _run(method: str, args: argparse.Namespace, tmp: Path) -> dict:
    output = tmp / "field.npy"
    command = [sys.executable, __file__, "--worker", method, str(args.data), str(output), str(args.threads)]
    process = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if process.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{process.stderr[-3000:]}")
    report = json.loads(process.stdout.strip().splitlines()[-1])
    report["field"] = np.load(output)
    return report


def _truth(data: Path) -> dict:
    from rwcnet.data.formats import read_image

    root = data / "brain"
    labels = json.loads((root / "BRAIN_dataset.json").read_text())["evaluation_labels"]
    label = lambda name: read_image(root / "labelsTr" / f"BRAIN_{name}_0000.nii.gz").array.astype(np.int32)  # noqa: E731
    return {"fixed_labels": label("0001"), "moving_labels": label("0002"), "labels": labels}


def _paused(pid: int | None):
    """Stop ``pid`` now; returns the function that continues it (a no-op without a pid, or for 0, which to
    ``os.kill`` would mean this whole process group)."""
    if not pid:
        return lambda: None
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return lambda: None
    return lambda: os.kill(pid, signal.SIGCONT)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--pause-pid", type=int, default=None, help="process to stop during the run (default: the training's; 0: none)")
    args = parser.parse_args()
    from rwcnet.evaluation.metrics import score_case

    pid_file = Path("/work/runs/train.pid")
    pid = args.pause_pid if args.pause_pid is not None else (int(pid_file.read_text()) if pid_file.is_file() else None)
    truth = _truth(args.data)
    zero = score_case(np.zeros((*truth["fixed_labels"].shape, 3), np.float32), **truth)
    print(f"real pair 0001<-0002; {args.threads} threads per method; paused pid {pid}; load before "
          f"{Path('/proc/loadavg').read_text().split()[:3]}")
    print(f"| method | Dice | HD95 | SDlogJ | folds % | seconds | peak GB | load | stages |")
    print(f"|---|---|---|---|---|---|---|---|---|")
    print(f"| zero displacement | {zero['dice']:.4f} | {zero['hd95']:.2f} | {zero['sdlogj']:.4f} | 0 | – | – | – | |", flush=True)
    resume = _paused(pid)
    try:
        with tempfile.TemporaryDirectory(prefix="refine_vs_greedy_") as tmp:
            for method in args.methods:
                report = _run(method, args, Path(tmp))
                score = score_case(report["field"], **truth)
                stages = ", ".join(f"{k} {v:.0f}" for k, v in report["stages"].items() if k != "total")
                load = Path("/proc/loadavg").read_text().split()[0]
                print(f"| {method} | {score['dice']:.4f} | {score['hd95']:.2f} | {score['sdlogj']:.4f} | "
                      f"{100 * score['folding_fraction']:.3f} | {report['seconds']:.1f} | {report['peak_gb']:.2f} | {load} | "
                      f"{stages} |", flush=True)
    finally:
        resume()
    print(f"load after {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
