"""Peak memory, time and accuracy of ``register`` on brain MR and thorax CT, network and IO alone, native and 256³.

    python benchmarks/register_memory.py [--data ../shared/data] [--cache results/register-memory]
        [--cases brain ct] [--sizes native 256] [--modes network+io network io]
        [--io-iters N] [--threads 2] [--src OTHER/src]

Each (case, size, mode) runs ``rwcnet.register.register`` in its own subprocess, which
reports its wall time and its peak resident memory (``VmHWM`` of ``/proc/self/status``,
the largest RSS of that process), then scores the field:

* ``brain``: the real pair 0001 <- 0002 of ``DATA/brain`` (160×192×224, 1 mm, LIA,
  ``--modality mr``); Dice over the dataset's 30 evaluation labels.
* ``ct``: a semi-synthetic breathing pair of the shared thorax CT (224×192×188, 1.5 mm,
  LPI; pair 0003 of ``benchmarks/paper_tables.py``'s SYNLUNG set, 14 mm amplitude, made
  with its generator and cached under ``--cache``; ``--modality ct``, no masks given, so
  lung masks are computed); TRE over its 1000 keypoints.
* ``256``: both images padded symmetrically to 256³ at their own spacing (background
  0 for MR, -1024 HU for CT), labels and keypoints moved along.

Modes: ``network+io`` (``--model brain``, the default pipeline), ``network``
(``--no-io``), ``io`` (``--model none``). ``--io-iters`` shortens IO (peak memory is
reached in its first steps; accuracy then is not the preset's). ``--src`` runs the
subprocesses on another source tree (e.g. an older checkout) to compare.
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
LUNG_PAIR = "0003"
MODES = {"network+io": {"model": "brain", "io": True}, "network": {"model": "brain", "io": False},
         "io": {"model": None, "io": True}}


def _peak_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("VmHWM not in /proc/self/status (Linux only)")


def _pad(array: np.ndarray, affine: np.ndarray, size: int, value: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``array`` padded symmetrically to ``size``³ with ``value``; returns it, its affine and the offset (voxels)."""
    before = np.array([(size - n) // 2 for n in array.shape])
    if np.any(before < 0):
        raise ValueError(f"cannot pad {array.shape} to {size}³")
    padded = np.pad(array, [(b, size - n - b) for b, n in zip(before, array.shape)], constant_values=value)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ (-before) + affine[:3, 3]
    return padded, shifted, before


def worker(job: dict) -> dict:
    """Subprocess: register one case and score it; returns seconds, peak GB, accuracy and the notes."""
    import torch

    from rwcnet.data.formats import Image, read_image, read_keypoints
    from rwcnet.evaluation.metrics import dice_per_label, tre, warp_labels_nearest
    from rwcnet.register import register

    torch.set_num_threads(job["threads"])
    fixed, moving = read_image(job["fixed"]), read_image(job["moving"])
    extra = {}
    if job["case"] == "brain":
        extra = {key: read_image(job[key]).array.astype(np.int32) for key in ("fixed_labels", "moving_labels")}
    else:
        extra = {key: read_keypoints(job[key]) for key in ("fixed_keypoints", "moving_keypoints")}
    if job["size"] != "native":
        background = 0.0 if job["case"] == "brain" else -1024.0
        padded = [_pad(img.array, img.affine, int(job["size"]), background) for img in (fixed, moving)]
        fixed, moving = (Image(array.astype(np.float32), affine) for array, affine, _ in padded)
        offset = padded[0][2]
        if job["case"] == "brain":
            extra = {key: np.pad(labels, [(o, int(job["size"]) - n - o) for o, n in zip(offset, labels.shape)])
                     for key, labels in extra.items()}
        else:
            extra = {key: points + offset for key, points in extra.items()}
    options = dict(MODES[job["mode"]])
    start = time.perf_counter()
    result = register(fixed, moving, modality="mr" if job["case"] == "brain" else "ct", device="cpu", seed=0,
                      io_iterations=job["io_iters"], **options)
    seconds = time.perf_counter() - start
    peak = _peak_gb()
    if job["case"] == "brain":
        warped = warp_labels_nearest(extra["moving_labels"], result.field)
        accuracy = float(np.nanmean(dice_per_label(extra["fixed_labels"], warped, job["labels"], extra["moving_labels"])))
    else:
        accuracy = float(tre(result.field, extra["fixed_keypoints"], extra["moving_keypoints"], fixed.spacing).mean())
    return {"seconds": seconds, "peak_gb": peak, "accuracy": accuracy, "shape": list(fixed.shape),
            "notes": [note for note in result.notes if "grid" in note or "model" in note or "trained" in note]}


def _jobs(args) -> list[dict]:
    brain = json.loads((args.data / "brain" / "BRAIN_dataset.json").read_text())
    lung = args.cache / "data" / "SYNLUNG"
    if not (lung / "keypointsTr" / f"SYNLUNG_{LUNG_PAIR}_0001.csv").is_file() and "ct" in args.cases:
        sys.path.insert(0, str(REPO / "benchmarks"))
        import paper_tables

        paper_tables.prepare_lung(args.data, args.cache)
    inputs = {
        "brain": {key: str(args.data / "brain" / folder / f"BRAIN_{case}_0000.nii.gz")
                  for key, folder, case in (("fixed", "imagesTr", "0001"), ("moving", "imagesTr", "0002"),
                                            ("fixed_labels", "labelsTr", "0001"), ("moving_labels", "labelsTr", "0002"))},
        "ct": {key: str(lung / folder / f"SYNLUNG_{LUNG_PAIR}_{phase}.{ext}")
               for key, folder, phase, ext in (("fixed", "imagesTr", "0000", "nii.gz"), ("moving", "imagesTr", "0001", "nii.gz"),
                                               ("fixed_keypoints", "keypointsTr", "0000", "csv"),
                                               ("moving_keypoints", "keypointsTr", "0001", "csv"))},
    }
    return [{"case": case, "size": size, "mode": mode, "threads": args.threads, "io_iters": args.io_iters,
             "labels": brain["evaluation_labels"], **inputs[case]}
            for case in args.cases for size in args.sizes for mode in args.modes]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cache", type=Path, default=REPO / "results" / "register-memory")
    parser.add_argument("--cases", nargs="+", default=["brain", "ct"], choices=["brain", "ct"])
    parser.add_argument("--sizes", nargs="+", default=["native", "256"], choices=["native", "256"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--io-iters", type=int, default=None, help="Adam steps of IO (default: the modality preset's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--src", type=Path, default=REPO / "src", help="source tree the subprocesses import rwcnet from")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.src.resolve())}
    print(f"rwcnet from {args.src.resolve()}, {args.threads} threads, IO steps {args.io_iters or 'preset'}, "
          f"load average {Path('/proc/loadavg').read_text().split()[0]}")
    print("| case | size | mode | shape | seconds | peak GB | Dice / TRE mm | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for job in _jobs(args):
        process = subprocess.run([sys.executable, __file__, "worker", json.dumps(job)], capture_output=True, text=True,
                                 env=env, cwd=REPO)
        if process.returncode != 0:
            print(f"| {job['case']} | {job['size']} | {job['mode']} | failed: {process.stderr.strip().splitlines()[-1]} |")
            continue
        row = json.loads(process.stdout.strip().splitlines()[-1])
        shape = "×".join(map(str, row["shape"]))
        print(f"| {job['case']} | {job['size']} | {job['mode']} | {shape} | {row['seconds']:.1f} | {row['peak_gb']:.2f} | "
              f"{row['accuracy']:.4f} | {'; '.join(row['notes'])} |", flush=True)


if __name__ == "__main__":
    main()
