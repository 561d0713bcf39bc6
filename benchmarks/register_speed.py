"""Wall time, peak memory and Dice of ``rwcnet.register`` and its peers on the shared real brain pair.

Methods, each in its own subprocess with the same thread count, on the real pair
``../shared/data/brain`` (fixed 0001, moving 0002, 160×192×224, Dice over the dataset JSON's
``evaluation_labels`` with the official nearest-neighbour label warping):

* ``network``: ``register(model=MODEL, io=False)`` — the network alone;
* ``network+io``: ``register(model=MODEL)`` — network, then instance optimisation (brain preset);
* ``io``: ``register(model=None)`` — instance optimisation alone from a zero field;
* ``convexadam``: ``register(method="convexadam")`` — the in-package ConvexAdam;
* ``official``: the official ``convexAdam`` package (``pip install --no-deps convexAdam``),
  brain preset, on the same arrays.

Time is that of the whole ``register`` call (reading, resampling, normalisation, registration,
mapping back), peak memory the process's ``VmHWM`` (it includes Python and torch; "base GB" is
the resident size just before the call). ``MODEL`` is ``brain`` (the shipped weights) by default.

``--allocators`` picks how glibc's allocator is set in each worker: ``keep`` is what the
``rwcnet`` command line does (:func:`rwcnet.runtime.keep_freed_memory`; for the official package
the same settings through ``MALLOC_MMAP_MAX_``/``MALLOC_TRIM_THRESHOLD_``), ``default`` leaves it
alone (what a Python caller of ``rwcnet.register`` gets unless it calls that function).

    python benchmarks/register_speed.py [--methods ...] [--allocators keep default] [--threads 2]
        [--model brain|PATH] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convexadam_vs_official import _brain_case, _memory_kb, _scores

REPO = Path(__file__).resolve().parents[1]
METHODS = ("network", "network+io", "io", "convexadam", "official")


def _register_worker(method: str, data: Path, model: str, output: Path, threads: int, allocator: str) -> None:
    """Run ``rwcnet.register`` on the real pair; save the field and print a JSON line with time and memory."""
    import torch

    from rwcnet.data.formats import read_image
    from rwcnet.register import register
    from rwcnet.runtime import keep_freed_memory

    if allocator == "keep" and not keep_freed_memory():
        raise RuntimeError("keep_freed_memory() did not take effect (not glibc?)")
    torch.set_num_threads(threads)
    root = data / "brain" / "imagesTr"
    fixed, moving = (read_image(root / f"BRAIN_{n}_0000.nii.gz") for n in ("0001", "0002"))
    options = {
        "network": dict(model=model, io=False),
        "network+io": dict(model=model, io=True),
        "io": dict(model=None, io=True),
        "convexadam": dict(method="convexadam", io=True),
    }[method]
    baseline = _memory_kb("VmRSS")
    start = time.perf_counter()
    result = register(fixed, moving, device="cpu", **options)
    seconds = time.perf_counter() - start
    np.save(output, result.field.astype(np.float32))
    print(json.dumps({"seconds": seconds, "baseline_rss_kb": baseline, "peak_rss_kb": _memory_kb("VmHWM"),
                      "stages": result.seconds, "notes": result.notes}))


def _run(method: str, allocator: str, args: argparse.Namespace, tmp: Path) -> dict:
    output = tmp / f"{method.replace('+', '_')}.npy"
    env = dict(os.environ)
    if allocator == "keep" and method == "official":
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 30))
    if method == "official":
        inputs = tmp / "brain_inputs.npz"
        command = [sys.executable, str(REPO / "benchmarks" / "convexadam_vs_official.py"), "--worker", "official",
                   "brain", str(inputs), str(output), "--threads", str(args.threads)]
    else:
        command = [sys.executable, __file__, "--worker", method, str(args.data), args.model, str(output),
                   "--threads", str(args.threads), allocator]
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{process.stderr[-3000:]}")
    report = json.loads(process.stdout.strip().splitlines()[-1])
    report["field"] = np.load(output)
    return report


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        method, data, model, output = sys.argv[2:6]
        _register_worker(method, Path(data), model, Path(output), int(sys.argv[7]), sys.argv[8])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--allocators", nargs="+", default=["keep"], choices=["keep", "default"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="brain", help="shipped model name or model file for the network rows")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()

    inputs, truth = _brain_case(args.data)
    zero = _scores("brain", np.zeros((*inputs["fixed"].shape, 3), np.float32), truth)
    print(f"real pair 0001<-0002 {inputs['fixed'].shape}; {args.threads} thread(s) per method; torch "
          f"{__import__('torch').__version__}; model {args.model}")
    print(f"{'method':12} {'alloc':7} {'Dice':>7} {'SDlogJ':>7} {'time s':>8} {'peak GB':>8} {'base GB':>8}  stages / notes")
    print(f"{'zero field':12} {'':7} {zero['accuracy']:7.4f} {zero['sdlogj']:7.4f}")
    with tempfile.TemporaryDirectory(prefix="register_speed_") as tmp:
        np.savez(Path(tmp) / "brain_inputs.npz", **inputs)
        for method, allocator in ((m, a) for m in args.methods for a in args.allocators):
            report = _run(method, allocator, args, Path(tmp))
            score = _scores("brain", report["field"], truth)
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.get("stages", {}).items())
            notes = "; ".join(report.get("notes", []))
            print(f"{method:12} {allocator:7} {score['accuracy']:7.4f} {score['sdlogj']:7.4f} {report['seconds']:8.1f} "
                  f"{report['peak_rss_kb'] / 2**20:8.2f} {report['baseline_rss_kb'] / 2**20:8.2f}  {stages} {notes}",
                  flush=True)


if __name__ == "__main__":
    main()
