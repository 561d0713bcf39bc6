"""Forward + backward time of ``nn.Conv3d`` vs :class:`rwcnet.model.conv.FastConv3d` on the cpu preset's shapes.

    python benchmarks/fast_conv.py [--threads 1] [--repeats 3]

Shapes are those of stage 1 of the ``cpu`` preset on a 160×192×224 pair
(stage grid 40×48×56): the separable ConvGRU (72 → 48 channels) and the
motion encoder's pointwise convolution of the 343 correlation channels.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from rwcnet.model.conv import FastConv3d

CASES = [((3, 1, 1), 72, 48), ((1, 3, 1), 72, 48), ((1, 1, 3), 72, 48), ((1, 1, 1), 343, 24), ((1, 1, 1), 72, 24)]


def _time(fn, x: torch.Tensor, repeats: int) -> float:
    out = fn(x)
    out.backward(torch.ones_like(out))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(x)
        out.backward(torch.ones_like(out))
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, nargs=3, default=(40, 48, 56))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"forward + backward, {args.threads} thread(s), grid {tuple(args.size)}")
    print(f"{'kernel':>10} {'in':>4} {'out':>4} {'Conv3d s':>9} {'Fast s':>8} {'speed-up':>8}")
    for kernel, cin, cout in CASES:
        torch.manual_seed(0)
        conv = FastConv3d(cin, cout, kernel)
        x = torch.randn(1, cin, *args.size, requires_grad=True)
        padding = tuple(k // 2 for k in kernel)
        plain = _time(lambda t: F.conv3d(t, conv.weight, conv.bias, padding=padding), x, args.repeats)
        fast = _time(conv, x, args.repeats)
        print(f"{'x'.join(map(str, kernel)):>10} {cin:>4} {cout:>4} {plain:9.3f} {fast:8.3f} {plain / fast:7.2f}x")


if __name__ == "__main__":
    main()
