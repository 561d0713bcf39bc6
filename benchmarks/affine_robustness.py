"""Robustness, accuracy, time and memory of rwcnet's affine engines and SimpleITK's on the shared brains.

For each engine (one subprocess each, so its peak memory is its own), on ``../shared/data/brain``:

* **turned cases**: the moving image (``BRAIN_0001`` itself, the known-truth case, and ``BRAIN_0002``) is
  padded by 40 voxels and resampled through 5 seeded rigid transforms ``Q`` (a random oblique axis, 18-30
  degrees, a random direction, 18-30 mm), then registered rigidly to ``BRAIN_0001``. The error is the mean
  and largest distance (mm) over the fixed brain (voxels > 0, every second one) between where the result
  and the truth put each point: the truth is ``Q`` for the same subject, and ``Q T0`` for the other one, with
  ``T0`` the engine's own rigid result on the unturned pair (so it measures consistency);
* **real pair**: ``BRAIN_0001`` (fixed) and ``BRAIN_0002`` (moving) as stored, rigid and affine (the default).

Seconds are wall time and CPU time of the ``register_affine`` call (CPU time is less sensitive to other
processes on a shared machine); memory is the peak resident size of the worker above its size before the
first call. Pause other work before timing (see HELPER_RULES) and read the printed load average.

    python benchmarks/affine_robustness.py [--engines torch:mind torch:ncc torch:mi sitk:mi] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ENGINES = ("torch:mind", "torch:ncc", "torch:mi", "sitk:mi")
PAD = 40
TURNS = 5


def _memory_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def turned(image, truth: np.ndarray, pad: int):
    """``image`` padded by ``pad`` voxels and resampled so that its content at ``T p`` is the original at ``p``."""
    import scipy.ndimage

    from rwcnet.data.formats import Image

    shift = np.eye(4)
    shift[:3, 3] = -pad
    affine = image.affine @ shift
    to_source = np.linalg.inv(affine) @ np.linalg.inv(truth) @ affine
    array = scipy.ndimage.affine_transform(np.pad(image.array.astype(np.float32), pad), to_source[:3, :3],
                                           offset=to_source[:3, 3], order=1)
    return Image(array, affine)


def truths(centre: np.ndarray) -> list[np.ndarray]:
    """The 5 seeded rigid transforms (fixed RAS -> moving RAS) about ``centre``."""
    from rwcnet.affine import matrix_about, rotation_matrix

    result = []
    for seed in range(TURNS):
        rng = np.random.default_rng(seed)
        axis = rng.normal(size=3)
        direction = rng.normal(size=3)
        result.append(matrix_about(rotation_matrix(axis, rng.uniform(18.0, 30.0)), centre,
                                   direction / np.linalg.norm(direction) * rng.uniform(18.0, 30.0)))
    return result


def _worker(engine_metric: str, threads: int) -> None:
    import SimpleITK as sitk
    import torch

    from rwcnet.affine import point_errors, register_affine
    from rwcnet.affine.transforms import foreground_points
    from rwcnet.data.formats import read_image

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    engine, metric = engine_metric.split(":")
    root = DATA / "brain" / "imagesTr"
    fixed, other = (read_image(root / f"BRAIN_{n}_0000.nii.gz") for n in ("0001", "0002"))
    points = foreground_points(fixed, 0.0, step=2)
    base = _memory_kb("VmRSS")

    def run(moving, transform):
        wall, cpu = time.perf_counter(), time.process_time()
        result = register_affine(fixed, moving, transform=transform, metric=metric, engine=engine)
        return result.matrix, time.perf_counter() - wall, time.process_time() - cpu

    rows = []
    for transform in ("rigid", "affine"):
        matrix, wall, cpu = run(other, transform)
        rows.append({"case": f"real pair {transform}", "wall": wall, "cpu": cpu,
                     "from_identity_mm": float(point_errors(matrix, np.eye(4), points).mean())})
        if transform == "rigid":
            own_rigid = matrix
    for subject, moving in (("same subject", fixed), ("0002", other)):
        reference = np.eye(4) if subject == "same subject" else own_rigid
        for index, truth in enumerate(truths(points.mean(0))):
            matrix, wall, cpu = run(turned(moving, truth, PAD), "rigid")
            errors = point_errors(matrix, truth @ reference, points)
            rows.append({"case": f"{subject} turn {index}", "wall": wall, "cpu": cpu,
                         "mean_mm": float(errors.mean()), "max_mm": float(errors.max())})
    print(json.dumps({"rows": rows, "peak_gb": (_memory_kb("VmHWM") - base) / 1e6}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.threads)
        return
    print(f"load average before: {Path('/proc/loadavg').read_text().strip()}; {args.threads} threads")
    results = {}
    for engine in args.engines:
        command = [sys.executable, __file__, "--worker", engine, "--threads", str(args.threads)]
        process = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        if process.returncode != 0:
            raise SystemExit(f"{engine} failed:\n{process.stderr[-3000:]}")
        results[engine] = json.loads(process.stdout.strip().splitlines()[-1])
    cases = [row["case"] for row in next(iter(results.values()))["rows"]]
    print(f"\n{'case':<24}" + "".join(f"{engine:>26}" for engine in results))
    print(f"{'':<24}" + "".join(f"{'mean/max mm  wall/cpu s':>26}" for _ in results))
    for i, case in enumerate(cases):
        cells = []
        for result in results.values():
            row = result["rows"][i]
            accuracy = (f"{row['mean_mm']:.2f}/{row['max_mm']:.2f}" if "mean_mm" in row
                        else f"id {row['from_identity_mm']:.1f}")
            cells.append(f"{accuracy}  {row['wall']:.1f}/{row['cpu']:.1f}")
        print(f"{case:<24}" + "".join(f"{cell:>26}" for cell in cells))
    for label, prefix in (("same subject", "same subject"), ("other subject", "0002")):
        summary = []
        for result in results.values():
            rows = [r for r in result["rows"] if r["case"].startswith(prefix)]
            summary.append(f"{np.mean([r['mean_mm'] for r in rows]):.2f}/{max(r['max_mm'] for r in rows):.2f}  "
                           f"{np.mean([r['wall'] for r in rows]):.1f}/{np.mean([r['cpu'] for r in rows]):.1f}")
        print(f"{label + ' (avg)':<24}" + "".join(f"{cell:>26}" for cell in summary))
    print(f"{'peak memory GB':<24}" + "".join(f"{r['peak_gb']:>26.2f}" for r in results.values()))
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")
    print("real pair rows: 'id' = mean distance (mm) of the result from the identity over the fixed brain")


if __name__ == "__main__":
    main()
