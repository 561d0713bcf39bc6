"""rwcnet's ConvexAdam next to the official ``convexAdam`` package (PyPI), on the same inputs, in the same run.

Cases:

* ``brain``: the shared real pair (``../shared/data/brain``, fixed 0001, moving 0002),
  Dice over the dataset JSON's ``evaluation_labels`` with nearest-neighbour label warping
  (:mod:`rwcnet.evaluation.metrics`, the official scorer's rule), brain preset (g 6, h 4, λ 1.25, 80 steps).
* ``lung``: a semi-synthetic NLST-like pair: the shared lung CT (fixed) and a copy warped by a
  known breathing deformation (:func:`rwcnet.synthetic.breathing_deformation`, 15 mm, lung mask
  from :func:`rwcnet.masks.lung_mask`); TRE in mm over keypoints sampled in the fixed lung
  mask and carried through the known field; lung preset (g 4, h 6, λ 0.65, 50 steps), both
  methods given the fixed and moving lung masks.

Each method runs in its own subprocess (same thread count), ``--repeats`` times in alternating
order (the machine is shared; the best time is reported, all are listed); the wall time of the
registration call and the peak resident memory of that process (``VmHWM`` of
``/proc/self/status``, which unlike ``ru_maxrss`` does not inherit the parent's footprint
through fork/exec; it includes Python, torch and the loaded inputs, whose resident size just
before the call is the "base GB" column) are reported, with SDlogJ of each field and the mean distance between the two
fields (inside the fixed lung mask for the lung case).

Install the peer without touching torch: ``pip install --no-deps convexAdam`` (its other
dependencies: nibabel, SimpleITK, scikit-learn, scipy).

    python benchmarks/convexadam_vs_official.py [--cases brain lung] [--threads 2] [--repeats 2] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHODS = ("rwcnet", "official")
PRESETS = {  # the official package's argument names for our presets
    "brain": dict(grid_sp=6, disp_hw=4, lambda_weight=1.25, selected_niter=80, grid_sp_adam=2, ic=True),
    "lung": dict(grid_sp=4, disp_hw=6, lambda_weight=0.65, selected_niter=50, grid_sp_adam=2, ic=True),
}


def _worker(method: str, case: str, inputs: Path, output: Path, threads: int) -> None:
    """Run one method on saved inputs; save the field ``(X, Y, Z, 3)`` and print a JSON line with time and memory."""
    import torch

    torch.set_num_threads(threads)
    data = np.load(inputs)
    fixed = torch.from_numpy(data["fixed"].astype(np.float32))
    moving = torch.from_numpy(data["moving"].astype(np.float32))
    masks = (data["fixed_mask"], data["moving_mask"]) if "fixed_mask" in data else None
    baseline = _memory_kb("VmRSS")
    start = time.perf_counter()
    if method == "rwcnet":
        from rwcnet.baselines.convexadam import convex_adam

        kwargs = {} if masks is None else dict(fixed_mask=masks[0], moving_mask=masks[1])
        field = convex_adam(fixed, moving, preset=case, **kwargs)[0].permute(1, 2, 3, 0).numpy()
    else:
        import nibabel as nib
        from convexAdam.convex_adam_MIND import convex_adam_pt

        kwargs = dict(PRESETS[case])
        if masks is not None:
            paths = [output.with_name(f"{output.stem}_{name}.nii.gz") for name in ("fixed_mask", "moving_mask")]
            for path, mask in zip(paths, masks):
                nib.save(nib.Nifti1Image(mask.astype(np.float32), np.eye(4)), path)
            kwargs.update(use_mask=True, path_fixed_mask=paths[0], path_moving_mask=paths[1])
        field = convex_adam_pt(fixed, moving, device=torch.device("cpu"), **kwargs)
    seconds = time.perf_counter() - start
    np.save(output, np.asarray(field, dtype=np.float32))
    print(json.dumps({"seconds": seconds, "baseline_rss_kb": baseline, "peak_rss_kb": _memory_kb("VmHWM")}))


def _memory_kb(key: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, kB, from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not found in /proc/self/status (Linux only)")


def _run(method: str, case: str, inputs: Path, output: Path, threads: int) -> dict:
    """Run a worker subprocess; its time, its own peak RSS (GB) and the field."""
    command = [sys.executable, __file__, "--worker", method, case, str(inputs), str(output), "--threads", str(threads)]
    process = subprocess.run(command, capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"{method} on {case} failed:\n{process.stderr[-3000:]}")
    report = json.loads(process.stdout.strip().splitlines()[-1])
    return {
        "seconds": report["seconds"],
        "peak_gb": report["peak_rss_kb"] / 2**20,
        "baseline_gb": report["baseline_rss_kb"] / 2**20,
        "field": np.load(output),
    }


def _brain_case(data: Path) -> tuple[dict, dict]:
    """Inputs and ground truth of the real brain pair."""
    from rwcnet.data.formats import read_image

    root = data / "brain"
    labels = json.loads((root / "BRAIN_dataset.json").read_text())["evaluation_labels"]
    image = lambda name: read_image(root / "imagesTr" / f"BRAIN_{name}_0000.nii.gz").array  # noqa: E731
    label = lambda name: read_image(root / "labelsTr" / f"BRAIN_{name}_0000.nii.gz").array.astype(np.int32)  # noqa: E731
    inputs = {"fixed": image("0001"), "moving": image("0002")}
    return inputs, {"fixed_labels": label("0001"), "moving_labels": label("0002"), "labels": labels}


def _lung_case(data: Path, keypoints: int) -> tuple[dict, dict]:
    """Inputs and ground truth of the semi-synthetic lung pair (known breathing deformation)."""
    from rwcnet import masks, synthetic
    from rwcnet.data.formats import read_image

    ct = read_image(data / "lung" / "imagesTr" / "LUNG_0001_0000.nii.gz")
    spacing = tuple(float(s) for s in ct.spacing)
    array = ct.array.astype(np.float32)
    mask = masks.lung_mask(array, spacing, axis=2)
    phi = synthetic.breathing_deformation(ct.shape, spacing, amplitude_mm=15.0, axis=2, towards="+", lung_mask=mask, seed=0)
    pair = synthetic.make_pair(array, mask=mask, deformation=phi, spacing_mm=spacing, warped_role="moving",
                               n_keypoints=keypoints, keypoint_distance=4.0, seed=0)
    inputs = {
        "fixed": pair.fixed[0, 0].numpy(),
        "moving": pair.moving[0, 0].numpy(),
        "fixed_mask": pair.fixed_mask[0, 0].numpy().astype(np.uint8),
        "moving_mask": pair.moving_mask[0, 0].numpy().astype(np.uint8),
    }
    truth = {
        "fixed_keypoints": pair.fixed_keypoints.numpy(),
        "moving_keypoints": pair.moving_keypoints.numpy(),
        "spacing": spacing,
        "fixed_mask": inputs["fixed_mask"],
        "field": pair.field_l2r(),
    }
    return inputs, truth


def _scores(case: str, field: np.ndarray, truth: dict) -> dict:
    """Dice (brain) or TRE in mm (lung), and SDlogJ, of a field ``(X, Y, Z, 3)``."""
    from rwcnet.evaluation import metrics

    det = metrics.jacobian_det(field)
    if case == "brain":
        warped = metrics.warp_labels_nearest(truth["moving_labels"], field)
        dice = metrics.dice_per_label(truth["fixed_labels"], warped, truth["labels"], truth["moving_labels"])
        return {"accuracy": float(np.nanmean(dice)), "sdlogj": metrics.sdlogj(det)}
    errors = metrics.tre(field, truth["fixed_keypoints"], truth["moving_keypoints"], truth["spacing"])
    return {"accuracy": float(errors.mean()), "sdlogj": metrics.sdlogj(det, truth["fixed_mask"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["brain", "lung"], choices=["brain", "lung"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--keypoints", type=int, default=1000, help="lung keypoints")
    parser.add_argument("--repeats", type=int, default=2, help="runs per method (best time reported)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="convexadam_bench_") as tmp:
        for case in args.cases:
            inputs, truth = _brain_case(args.data) if case == "brain" else _lung_case(args.data, args.keypoints)
            path = Path(tmp) / f"{case}_inputs.npz"
            np.savez(path, **inputs)
            shape = inputs["fixed"].shape
            zero = _scores(case, np.zeros((*shape, 3), np.float32), truth)
            runs: dict[str, list[dict]] = {m: [] for m in METHODS}
            for repeat in range(args.repeats):  # alternate the order so that changes in machine load hit both
                for m in METHODS if repeat % 2 == 0 else METHODS[::-1]:
                    runs[m].append(_run(m, case, path, Path(tmp) / f"{case}_{m}.npy", args.threads))
            results = {
                m: {
                    "seconds": min(r["seconds"] for r in runs[m]),
                    "all_seconds": [r["seconds"] for r in runs[m]],
                    "peak_gb": max(r["peak_gb"] for r in runs[m]),
                    "baseline_gb": runs[m][0]["baseline_gb"],
                    "field": runs[m][0]["field"],
                }
                for m in METHODS
            }
            difference = np.linalg.norm(results["rwcnet"]["field"] - results["official"]["field"], axis=-1)
            difference = difference[truth["fixed_mask"] > 0].mean() if "fixed_mask" in truth else difference.mean()
            for method in METHODS:
                result = results[method]
                rows.append((case, method, _scores(case, result["field"], truth), result))
            rows.append((case, "zero field", zero, None))
            ratio = results["rwcnet"]["seconds"] / results["official"]["seconds"]
            rows.append((case, f"time ratio rwcnet/official {ratio:.2f}; mean |u_rwcnet - u_official| "
                               f"{difference:.3f} voxels; shape {shape}", None, None))

    print(f"threads per method: {args.threads}; torch {__import__('torch').__version__}; best of {args.repeats} "
          f"alternating runs; Dice (brain, higher is better) / TRE mm (lung, lower is better)")
    print(f"{'case':6} {'method':11} {'Dice/TRE':>9} {'SDlogJ':>7} {'time s':>8} {'peak GB':>8} {'base GB':>8}  all times s")
    for case, method, score, result in rows:
        if score is None:
            print(f"{case:6} {method}")
        elif result is None:
            print(f"{case:6} {method:11} {score['accuracy']:9.4f} {score['sdlogj']:7.4f}")
        else:
            times = ", ".join(f"{t:.1f}" for t in result["all_seconds"])
            print(f"{case:6} {method:11} {score['accuracy']:9.4f} {score['sdlogj']:7.4f} {result['seconds']:8.1f} "
                  f"{result['peak_gb']:8.2f} {result['baseline_gb']:8.2f}  {times}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker = argparse.ArgumentParser()
        worker.add_argument("--worker", nargs=4, metavar=("METHOD", "CASE", "INPUTS", "OUTPUT"))
        worker.add_argument("--threads", type=int, default=2)
        parsed = worker.parse_args()
        method, case, inputs, output = parsed.worker
        _worker(method, case, Path(inputs), Path(output), parsed.threads)
    else:
        main()
