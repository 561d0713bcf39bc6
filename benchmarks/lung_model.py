"""A lung model on breathing pairs of the shared CT: TRE of IO alone, the network alone and network + IO.

    python benchmarks/lung_model.py --model runs/cpu-lung/model.pt [--data ../shared/data] [--threads 2]
        [--rows zero io network network+io default default+io] [--output lung_model.json]

Pairs: the six ``SYNLUNG`` pairs of ``benchmarks/paper_tables.py`` (inhale-like breathing fields of
10-20 mm, seeds 200-205; :func:`paper_tables.lung_pair`), and a second generator setting the
training never used in this form, ``EXHALE``: three exhale-like fields of 16, 20 and 24 mm with a
stronger chest-wall motion (expansion 0.3, variation 0.15, seeds 300-302). Training (``cpu-lung``)
draws its fields from its own seeds. Every row registers each pair in this process with the
lung masks, timed as a whole ``rwcnet.register`` call; TRE is the official one (mm, cubic
sampling of the field at the fixed keypoints) over the 1000 keypoints, with the folding share
and SDlogJ of the field. Rows: ``zero``; ``io`` (instance optimisation alone); ``network`` (one
forward pass, no IO, no refinement); ``network+io`` (these three without the affine
pre-alignment: the pairs are aligned); ``default`` (``register --modality ct`` with the model
given, i.e. the full default chain, affine included); ``default+io`` (the same with instance
optimisation, the CT default before it was switched off). Pause any training first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_tables import LUNG_PAIRS, REPO, lung_pair  # noqa: E402

ROWS = {"zero": None, "io": dict(model=None, io=True, refine=False, affine=False),
        "network": dict(io=False, refine=False, affine=False), "network+io": dict(io=True, refine=False, affine=False),
        "default": dict(), "default+io": dict(io=True)}
SETTINGS = {"SYNLUNG": [dict(amplitude_mm=10.0 + 2.0 * i, seed=200 + i) for i in range(LUNG_PAIRS)],
            "EXHALE": [dict(amplitude_mm=-a, seed=300 + i, expansion=0.3, variation=0.15) for i, a in enumerate((16, 20, 24))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="lung model file (or a shipped name)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--output", type=Path, help="write every case as JSON")
    args = parser.parse_args()

    import torch

    from rwcnet import masks
    from rwcnet.evaluation import metrics
    from rwcnet.data.formats import Image, read_image
    from rwcnet.register import register

    torch.set_num_threads(args.threads)
    ct_image = read_image(args.data / "lung" / "imagesTr" / "LUNG_0001_0000.nii.gz")
    spacing = tuple(float(s) for s in ct_image.spacing)
    ct = ct_image.array.astype(np.float32)
    lung = masks.lung_mask(ct, spacing, axis=2)
    with open("/proc/loadavg", encoding="utf-8") as handle:
        print(f"model {args.model}; threads {args.threads}; load average {handle.read().split()[0]}", flush=True)
    cases = []
    for setting in args.settings:
        for parameters in SETTINGS[setting]:
            pair = lung_pair(ct, lung, spacing, **parameters)
            images = {name: Image(volume[0, 0].numpy().astype(np.float32), ct_image.affine)
                      for name, volume in (("fixed", pair.fixed), ("moving", pair.moving),
                                           ("fixed_mask", pair.fixed_mask), ("moving_mask", pair.moving_mask))}
            fixed_kp, moving_kp = pair.fixed_keypoints.numpy(), pair.moving_keypoints.numpy()
            for row in args.rows:
                start = time.perf_counter()
                if ROWS[row] is None:
                    field = np.zeros((*ct.shape, 3), np.float32)
                else:
                    options = {"model": args.model, **ROWS[row]}
                    field = register(images["fixed"], images["moving"], fixed_mask=images["fixed_mask"],
                                     moving_mask=images["moving_mask"], modality="ct", device="cpu", seed=0, **options).field
                seconds = time.perf_counter() - start
                det = metrics.jacobian_det(field)
                case = {"setting": setting, "amplitude_mm": parameters["amplitude_mm"], "seed": parameters["seed"],
                        "row": row, "tre_mm": float(metrics.tre(field, fixed_kp, moving_kp, spacing).mean()),
                        "folds": metrics.folding_fraction(det), "sdlogj": metrics.sdlogj(det), "seconds": seconds}
                cases.append(case)
                print(f"{setting:8} {parameters['amplitude_mm']:+6.1f} mm  {row:11} TRE {case['tre_mm']:6.3f} mm  "
                      f"folds {100 * case['folds']:.3f} %  SDlogJ {case['sdlogj']:.3f}  {seconds:6.1f} s", flush=True)
    print("\nmean over pairs:\n| setting | row | TRE mm | folds % | SDlogJ | s / pair |\n|---|---|---|---|---|---|")
    for setting in args.settings:
        for row in args.rows:
            rows = [c for c in cases if c["setting"] == setting and c["row"] == row]
            mean = {key: float(np.mean([c[key] for c in rows])) for key in ("tre_mm", "folds", "sdlogj", "seconds")}
            print(f"| {setting} | {row} | {mean['tre_mm']:.3f} | {100 * mean['folds']:.3f} | {mean['sdlogj']:.3f} | "
                  f"{mean['seconds']:.0f} |")
    if args.output:
        args.output.write_text(json.dumps(cases, indent=2))


if __name__ == "__main__":
    main()
