"""Cost of the local correlation volume: time and peak memory, ours vs a naive autograd loop.

Prints, for the "dot" and "sad" kinds at one feature size (default 40x48x56, C = 32, r = 3,
2 threads): forward time, forward+backward wall and CPU time (median of ``--repeats`` runs)
and the peak resident memory the runs add, for ``rwcnet.model.correlation.local_correlation``
and for a plain Python loop over shifts with autograd. Each measurement runs in a fresh
subprocess so the peak (``ru_maxrss``, before vs after) is clean. The upstream gradient is
allocated before the "before" reading, so the added memory is what the correlation needs.

    [OMP_WAIT_POLICY=PASSIVE] python benchmarks/correlation_cost.py [--size 40 48 56] [--channels 32] [--radius 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from rwcnet.model.correlation import local_correlation, shift_offsets

IMPLEMENTATIONS = ("rwcnet", "naive")
KINDS = ("dot", "sad")


def naive_correlation(fixed: torch.Tensor, moving: torch.Tensor, radius: int, kind: str) -> torch.Tensor:
    """The straightforward version: autograd through one slice of the padded moving features per shift."""
    padded = F.pad(moving, (radius,) * 6)
    sx, sy, sz = fixed.shape[2:]
    channels = []
    for d0, d1, d2 in shift_offsets(radius):
        a, b, c = d0 + radius, d1 + radius, d2 + radius
        shifted = padded[:, :, a : a + sx, b : b + sy, c : c + sz]
        if kind == "dot":
            channels.append((fixed * shifted).sum(1) / math.sqrt(fixed.shape[1]))
        else:
            channels.append((fixed - shifted).abs().sum(1))
    out = torch.stack(channels, 1)
    if kind == "sad":
        out = F.avg_pool3d(out, 3, stride=1, padding=1, count_include_pad=True)
    return out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def worker(impl: str, kind: str, size: list[int], channels: int, radius: int, repeats: int) -> dict:
    """One measurement, meant to run alone in a fresh process."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    function = local_correlation if impl == "rwcnet" else naive_correlation
    fixed = torch.randn(1, channels, *size, requires_grad=True)
    moving = torch.randn(1, channels, *size, requires_grad=True)
    grad_out = torch.randn(1, (2 * radius + 1) ** 3, *size)
    before = _peak_mb()
    forward, both, both_cpu = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = function(fixed, moving, radius, kind)
        forward.append(time.perf_counter() - start)
        del out
    for _ in range(repeats):
        fixed.grad = moving.grad = None
        start, start_cpu = time.perf_counter(), time.process_time()
        function(fixed, moving, radius, kind).backward(grad_out)
        both.append(time.perf_counter() - start)
        both_cpu.append(time.process_time() - start_cpu)
    return {
        "forward_s": statistics.median(forward),
        "forward_backward_s": statistics.median(both),
        "forward_backward_cpu_s": statistics.median(both_cpu),
        "peak_added_mb": _peak_mb() - before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=[40, 48, 56])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--radius", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.size, args.channels, args.radius, args.repeats)))
        return
    common = ["--size", *map(str, args.size), "--channels", str(args.channels), "--radius", str(args.radius)]
    print(
        f"local correlation, features 1x{args.channels}x{'x'.join(map(str, args.size))}, r={args.radius} "
        f"({(2 * args.radius + 1) ** 3} shifts), float32, 2 threads, median of {args.repeats}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    header = ("kind", "implementation", "forward s", "fwd+bwd s", "fwd+bwd CPU s", "peak added MB")
    print(f"{header[0]:<5} {header[1]:<15} {header[2]:>10} {header[3]:>10} {header[4]:>14} {header[5]:>14}")
    for kind in KINDS:
        for impl in args.impl:
            command = [sys.executable, __file__, "--worker", impl, kind, "--repeats", str(args.repeats), *common]
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            print(
                f"{kind:<5} {impl:<15} {result['forward_s']:>10.2f} {result['forward_backward_s']:>10.2f} "
                f"{result['forward_backward_cpu_s']:>14.2f} "
                f"{result['peak_added_mb']:>14.0f}",
                flush=True,
            )
    print(
        f"load average at end {os.getloadavg()[0]:.1f}. Wall times are inflated when other processes share "
        "the 2 cores; fwd+bwd CPU s is the process CPU time of both threads (inflated by OpenMP spinning "
        "unless OMP_WAIT_POLICY=PASSIVE)."
    )


if __name__ == "__main__":
    main()
