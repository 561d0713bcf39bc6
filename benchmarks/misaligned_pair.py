"""Dice on the shared brain pair when the moving scan is turned and shifted: today's register vs affine first.

The moving side (``BRAIN_0002``, image and labels) gets a new header: its grid is turned by ``--degrees``
(12) about an oblique axis through the brain's centre and shifted by ``--shift`` (14 mm), the voxel data
untouched, as a scan from another session would be. Then, on the fixed ``BRAIN_0001``, three runs:

* ``aligned``: ``register`` on the pair as stored;
* ``misaligned, no affine``: ``register`` on the turned pair (it resamples the moving image onto the fixed
  grid in physical space and registers that);
* ``misaligned, affine first``: :func:`rwcnet.affine.register_affine` (defaults), the moving image resampled
  onto the fixed grid through it, ``register`` on that, and the two composed into one Learn2Reg field
  (``x + u(x) = A_fix^-1 T A_fix (x + u_def(x))``, fixed voxels).

Dice is the mean over the dataset JSON's ``evaluation_labels``, the moving labels sampled through physical
space where they lie on another grid (:func:`rwcnet.grids.sampling_field`), nearest neighbour. When
``register`` gains its affine step, the last two rows become ``--no-affine`` and the defaults.

    python benchmarks/misaligned_pair.py [--degrees 12] [--shift 14] [--model brain] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rwcnet.evaluation import metrics
from rwcnet.affine import affine_field, matrix_about, register_affine, resample_moving, rotation_matrix
from rwcnet.geometry.grids import Grid, sampling_field
from rwcnet.data.formats import Image, read_image
from rwcnet.register import register

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain"
AXIS = (1.0, 2.0, -1.0)
SHIFT_DIRECTION = (1.0, -1.0, 1.0)


def dice(field: np.ndarray, fixed: Image, moving_labels: Image, fixed_labels: Image, labels: list[int]) -> float:
    """Mean Dice over ``labels`` of a Learn2Reg field (fixed voxels), moving labels on any grid."""
    label_field, _ = sampling_field(field, Grid.of(fixed, "the fixed image"), moving_labels, "moving labels")
    scores = metrics.score_case(field, fixed_labels.array, moving_labels.array, labels, compute_hd95=False,
                                label_field=label_field)
    return scores["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--degrees", type=float, default=12.0)
    parser.add_argument("--shift", type=float, default=14.0)
    parser.add_argument("--model", default="brain")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    labels = json.loads((DATA / "BRAIN_dataset.json").read_text())["evaluation_labels"]
    read = lambda folder, name: read_image(DATA / folder / f"BRAIN_{name}_0000.nii.gz")  # noqa: E731
    fixed, moving, fixed_labels, moving_labels = (read("imagesTr", "0001"), read("imagesTr", "0002"),
                                                  read("labelsTr", "0001"), read("labelsTr", "0002"))
    centre = fixed.affine[:3, :3] @ np.argwhere(fixed.array > 0).mean(0) + fixed.affine[:3, 3]
    direction = np.asarray(SHIFT_DIRECTION) / np.linalg.norm(SHIFT_DIRECTION)
    turn = matrix_about(rotation_matrix(AXIS, args.degrees), centre, direction * args.shift)
    turned = Image(moving.array, turn @ moving.affine)
    turned_labels = Image(moving_labels.array, turn @ moving_labels.affine)
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}; {args.threads} threads; moving turned "
          f"{args.degrees} deg about {AXIS} and shifted {args.shift} mm along {SHIFT_DIRECTION}")

    print(f"\n{'run':<28}{'Dice':>8}{'seconds':>10}", flush=True)

    def row(name: str, value: float, seconds: float, note: str = "") -> None:
        print(f"{name:<28}{value:>8.3f}{seconds:>10.1f}  {note}", flush=True)

    identity = np.zeros(fixed.shape + (3,), np.float32)
    row("misaligned, nothing", dice(identity, fixed, turned_labels, fixed_labels, labels), 0.0)
    start = time.perf_counter()
    aligned = register(fixed, moving, model=args.model)
    row("aligned", dice(aligned.field, fixed, moving_labels, fixed_labels, labels), time.perf_counter() - start)
    start = time.perf_counter()
    plain = register(fixed, turned, model=args.model)
    row("misaligned, no affine", dice(plain.field, fixed, turned_labels, fixed_labels, labels),
        time.perf_counter() - start)
    start = time.perf_counter()
    affine = register_affine(fixed, turned)
    affine_seconds = time.perf_counter() - start
    row("misaligned, affine only", dice(affine_field(affine.matrix, fixed), fixed, turned_labels, fixed_labels, labels),
        affine_seconds)
    deformable = register(fixed, resample_moving(turned, affine.matrix, fixed), model=args.model)
    to_moving = np.linalg.inv(fixed.affine) @ affine.matrix @ fixed.affine  # fixed voxel -> fixed voxel
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in fixed.shape], indexing="ij"), -1)
    total = ((grid + deformable.field) @ to_moving[:3, :3].T + to_moving[:3, 3] - grid).astype(np.float32)
    row("misaligned, affine first", dice(total, fixed, turned_labels, fixed_labels, labels),
        time.perf_counter() - start, f"affine {affine_seconds:.1f} s")

if __name__ == "__main__":
    main()
