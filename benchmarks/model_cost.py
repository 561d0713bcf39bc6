"""Cost of the RWCNet presets: parameters, MACs, inference time and peak memory per stage, training step time.

    python benchmarks/model_cost.py [--presets cpu reference] [--size 160 192 224] [--threads 2]
        [--allocator keep|default]

Each measurement runs in a fresh subprocess so that peak memory (ru_maxrss)
belongs to it alone. Stage ``k`` is timed as the run of stages ``1..k`` minus
the run of stages ``1..k-1``. Convolution MACs are counted with forward hooks;
the achieved GMAC/s is set against a plain dense 3^3 convolution measured in
the same run. ``--scale`` shrinks every axis of the volume for presets too
slow to run at full size on a CPU: such rows are marked "extrapolated" and
scaled by the voxel ratio (time and MACs are linear in the voxel count).
``--allocator keep`` (the default) sets glibc's allocator as the ``rwcnet`` command line does
(:func:`rwcnet.runtime.keep_freed_memory`); ``default`` leaves it alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from rwcnet.model import RWCNet, model_preset


def conv_macs(model: RWCNet, shape, num_stages: int) -> float:
    total = 0.0

    def hook(module, inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.kernel_size[2]
        total += output.numel() * module.in_channels * kernel / module.groups

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv3d)]
    with torch.inference_mode():
        model(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape), num_stages=num_stages)
    for handle in handles:
        handle.remove()
    return total


def worker(args) -> dict:
    if args.allocator == "keep":
        from rwcnet.runtime import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RWCNet(model_preset(args.preset)).eval()
    shape = tuple(args.size)
    fixed, moving = torch.rand(1, 1, *shape), torch.rand(1, 1, *shape)
    if args.task == "infer":
        start = time.perf_counter()
        with torch.inference_mode():
            model(fixed, moving, num_stages=args.stages)
        seconds = time.perf_counter() - start
    elif args.task == "train":
        model.freeze_stages(args.stages - 1)
        model.train()
        stage = model.config.stages[args.stages - 1]
        grid = [n // stage.downsample for n in shape]
        patch = [max(2, int(round(stage.patch_factor * n / 2)) * 2) for n in grid]
        region = tuple(slice(0, p) for p in patch)
        start = time.perf_counter()
        out = model(fixed, moving, num_stages=args.stages, region=None if stage.patch_factor >= 1 else region)
        out.field.square().mean().backward()
        seconds = time.perf_counter() - start
    else:
        conv = nn.Conv3d(32, 32, 3, padding=1)
        x = torch.rand(1, 32, *[n // 4 for n in shape])
        with torch.inference_mode():
            conv(x)
            start = time.perf_counter()
            conv(x)
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "gmac": x[0, 0].numel() * 32 * 32 * 27 / 1e9}
    return {"seconds": seconds, "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def run(preset: str, task: str, stages: int, size, threads: int, allocator: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--preset", preset, "--task", task, "--stages", str(stages),
               "--threads", str(threads), "--allocator", allocator, "--size", *map(str, size)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cpu", "reference"])
    parser.add_argument("--size", nargs=3, type=int, default=[160, 192, 224])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep")
    parser.add_argument("--scale", nargs="+", default=["cpu=1", "reference=0.25"], help="per-preset axis scale")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--stages", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    scales = {k: float(v) for k, v in (item.split("=") for item in args.scale)}
    dense = run("cpu", "dense", 1, args.size, args.threads, args.allocator)
    dense_rate = dense["gmac"] / dense["seconds"]
    print(f"plain dense 3^3 conv 32->32 at 1/4 size: {dense_rate:.1f} GMAC/s ({args.threads} threads, allocator {args.allocator})")
    header = f"{'preset':10s} {'stage':>5s} {'params':>9s} {'GMAC':>8s} {'infer s':>8s} {'GMAC/s':>7s} {'peak GB':>8s} {'train step s':>12s}  note"
    print(header)
    for preset in args.presets:
        config = model_preset(preset)
        model = RWCNet(config)
        scale = scales.get(preset, 1.0)
        size = [max(config.alignment, int(round(n * scale / config.alignment)) * config.alignment) for n in args.size]
        ratio = (args.size[0] * args.size[1] * args.size[2]) / (size[0] * size[1] * size[2])
        note = "" if ratio == 1 else f"extrapolated x{ratio:.1f} from {tuple(size)}"
        previous_time, previous_macs = 0.0, 0.0
        for count in range(1, len(config.stages) + 1):
            infer = run(preset, "infer", count, size, args.threads, args.allocator)
            train = run(preset, "train", count, size, args.threads, args.allocator)
            macs = conv_macs(model, [max(config.alignment, n // 4) for n in size], count) * 64 * ratio / 1e9
            stage_time = (infer["seconds"] - previous_time) * ratio
            stage_macs = macs - previous_macs
            params = sum(p.numel() for p in model.stages[count - 1].parameters())
            print(f"{preset:10s} {count:5d} {params:9d} {stage_macs:8.1f} {stage_time:8.1f} {stage_macs / max(stage_time, 1e-9):7.1f} "
                  f"{infer['peak_gb']:8.2f} {train['seconds'] * ratio:12.1f}  {note}")
            previous_time, previous_macs = infer["seconds"], macs
        total_params = sum(p.numel() for p in model.parameters())
        print(f"{preset:10s} {'all':>5s} {total_params:9d} {previous_macs:8.1f} {previous_time * ratio:8.1f} "
              f"{previous_macs / max(previous_time * ratio, 1e-9):7.1f} {infer['peak_gb']:8.2f} {'':>12s}  {note}")


if __name__ == "__main__":
    main()
