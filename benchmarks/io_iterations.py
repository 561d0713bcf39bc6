"""How many instance-optimisation (IO) steps the network's field needs: endpoint error against steps.

    python benchmarks/io_iterations.py [--model brain] [--pairs 4] [--steps 0 20 40 80] [--threads 2]

Tuning data, never test data: semi-synthetic pairs made from the *unlabelled* brain subjects
(``BRAIN_0003``..``0005``; the labelled 0001/0002 are the test subjects of every table), a
smooth random deformation of 6-10 mm (seeds 500+), intensity perturbation on the moving copy,
exactly as the paper tables' ``SYNBRAIN`` pairs but on other subjects. For each pair the network
runs once; IO then starts from its field with each step count (the brain preset otherwise), and
once from a zero field with the largest count. Printed per row: the mean endpoint error (mm)
inside the head (fixed intensity above 5 % of its range) and the 95th percentile, over pairs,
and the IO seconds. It answers whether IO after the network can take fewer steps than IO alone
(the brain preset's 80), which is what would bring network + IO under a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _pairs(data: Path, count: int):
    from rwcnet.data.formats import read_image
    from rwcnet.synthetic import IntensitySettings, make_pair, random_deformation

    subjects = ("0003", "0004", "0005")
    for index in range(count):
        image = read_image(data / "imagesTr" / f"BRAIN_{subjects[index % 3]}_0000.nii.gz")
        seed = 500 + index
        phi = random_deformation(image.shape, image.spacing, magnitude_mm=6.0 + 4.0 * index / max(count - 1, 1),
                                 smoothness_mm=20.0, seed=seed)
        pair = make_pair(image.array, deformation=phi, spacing_mm=image.spacing, warped_role="moving",
                         intensity=IntensitySettings(), seed=seed)
        yield subjects[index % 3], seed, image.spacing, pair


def _errors(field: torch.Tensor, truth: torch.Tensor, inside: torch.Tensor, spacing) -> tuple[float, float]:
    scale = torch.tensor(spacing, dtype=torch.float32).view(1, 3, 1, 1, 1)
    error = ((field - truth) * scale).norm(dim=1)[0][inside]
    return float(error.mean()), float(torch.quantile(error[:: max(1, error.numel() // 1_000_000)], 0.95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="brain")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "brain")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 20, 40, 80])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rwcnet.intensity import normalise
    from rwcnet.instance_optimisation import instance_optimise
    from rwcnet.pipeline.network import resolve_model

    network, _, note = resolve_model(args.model, torch.device("cpu"))
    if network is None:
        raise SystemExit(f"no network: {note}")
    rows: dict[str, list] = {}
    for subject, seed, spacing, pair in _pairs(args.data, args.pairs):
        fixed = torch.from_numpy(normalise(pair.fixed[0, 0].numpy(), "mr"))[None, None]
        moving = torch.from_numpy(normalise(pair.moving[0, 0].numpy(), "mr"))[None, None]
        inside = fixed[0, 0] > 0.05
        truth = pair.field.float()
        rows.setdefault("zero displacement", []).append((*_errors(torch.zeros_like(truth), truth, inside, spacing), 0.0))
        start = time.perf_counter()
        with torch.inference_mode():
            init = network(fixed, moving).field
        rows.setdefault("network", []).append((*_errors(init, truth, inside, spacing), time.perf_counter() - start))
        for steps in sorted(set(args.steps) - {0}):
            start = time.perf_counter()
            field = instance_optimise(fixed, moving, init.clone(), preset="brain", iterations=steps)
            rows.setdefault(f"network + IO {steps}", []).append(
                (*_errors(field, truth, inside, spacing), time.perf_counter() - start))
        steps = max(args.steps)
        start = time.perf_counter()
        field = instance_optimise(fixed, moving, None, preset="brain", iterations=steps)
        rows.setdefault(f"IO {steps} from zero", []).append((*_errors(field, truth, inside, spacing), time.perf_counter() - start))
        print(json.dumps({"subject": subject, "seed": seed, **{k: v[-1] for k, v in rows.items()}}), flush=True)

    print(f"\n{len(rows['network'])} pairs, {args.threads} threads, model {args.model}")
    print("| row | EPE mm (mean ± std over pairs) | EPE p95 mm | seconds |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        epe, p95, seconds = np.array(values).T
        print(f"| {name} | {epe.mean():.3f} ± {epe.std():.3f} | {p95.mean():.2f} | {seconds.mean():.1f} |")


if __name__ == "__main__":
    main()
