"""Seconds of the hot paths that run a separable filter, for the rwcnet on ``PYTHONPATH`` (compare two checkouts).

Each line is the median of ``--repeats`` runs on random volumes of the real pair's size (160x192x224) or
of the network stages' grids:

* ``mind``: MIND-SSC of a full-resolution image (box of radius 1, replicated border);
* ``correlation box``: the "sad" correlation's 3x3x3 zero-padded box on 125 channels at 1/4 resolution;
* ``readout box (fwd / fwd+bwd)``: the network readout's two 7-voxel renormalised boxes, 3 channels at 1/2 resolution;
* ``refine ncc step``: one refinement iteration (NCC, two Gaussians and two 5³ boxes) at full resolution;
* ``io smoothing fwd+bwd``: IO's three 3³ boxes of the parameter grid (80x96x112), forward and backward.

    PYTHONPATH=src python benchmarks/filter_speed.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rwcnet
from rwcnet.instance_optimisation import smooth_field
from rwcnet.mind import mind_ssc
from rwcnet.model.correlation import _box as correlation_box
from rwcnet.refine import RefineConfig, _Level

try:  # the checkout before geometry/filters.py
    from rwcnet.model.stage import box_mean as _cumsum_box

    def readout_box(volume, width):
        return _cumsum_box(volume, width)
except ImportError:
    from rwcnet.geometry.filters import running_box_mean

    def readout_box(volume, width):
        return running_box_mean(volume, width // 2)


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    full = (160, 192, 224)
    image = torch.rand(1, 1, *full, generator=generator)
    cost = torch.rand(1, 125, 40, 48, 56, generator=generator)
    estimate = torch.randn(1, 3, 80, 96, 112, generator=generator, requires_grad=True)
    parameter = torch.randn(1, 3, 80, 96, 112, generator=generator, requires_grad=True)
    moving = torch.rand(1, 1, *full, generator=generator)
    level = _Level(image, moving, torch.zeros(1, 3, *full), None, None, "ncc", RefineConfig())
    residual = torch.zeros(1, 3, *full)

    def readout(backward: bool):
        def run():
            with torch.set_grad_enabled(backward):
                smoothed = readout_box(readout_box(estimate, 7), 7)
                if backward:
                    smoothed.square().sum().backward()
        return run

    def io_smoothing():
        smooth_field(parameter).square().sum().backward()

    cases = {
        "mind": lambda: mind_ssc(image),
        "correlation box": lambda: correlation_box(cost, torch.empty_like(cost)),
        "readout box (fwd)": readout(False),
        "readout box (fwd+bwd)": readout(True),
        "refine ncc step": lambda: level.step(residual, 1.0, 1.0),
        "io smoothing fwd+bwd": io_smoothing,
    }
    print(f"rwcnet from {rwcnet.__file__}, {args.threads} threads, median of {args.repeats}")
    for name, run in cases.items():
        if name in ("mind", "correlation box", "refine ncc step"):
            with torch.no_grad():
                seconds = median_seconds(run, args.repeats)
        else:
            seconds = median_seconds(run, args.repeats)
        print(f"{name:24s} {seconds * 1000:8.1f} ms", flush=True)


if __name__ == "__main__":
    main()
