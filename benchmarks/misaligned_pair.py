"""Dice on the shared brain pair when the moving scan is turned and shifted, with and without the affine step.

The moving side (``BRAIN_0002``, image and labels) gets a new header: its grid is turned by ``--degrees``
(12) about an oblique axis through the brain's centre and shifted by ``--shift`` (14 mm), the voxel data
untouched, as a scan from another session would be. Then, on the fixed ``BRAIN_0001``, from one run:

* ``misaligned, nothing``: the identity (moving labels through physical space);
* ``aligned``: ``register`` with the defaults (affine pre-alignment on) on the pair as stored, and with
  ``affine=False`` (``--no-affine``);
* ``misaligned``: ``register`` on the turned pair with ``affine=False`` and with the defaults;
* ``inverted``: the stored pair with the moving intensities inverted inside the head
  (``where(m > 0, max(m[m > 0]) - m, 0)``), with and without the affine step.

Each row prints the mean Dice over the dataset JSON's ``evaluation_labels`` (moving labels sampled through
physical space where they lie on another grid, nearest neighbour), the seconds of the whole call, and for
runs with the affine step its seconds beside those of the deformable steps (network, IO, refinement).
Pause other work before timing (see HELPER_RULES) and read the printed load average.

    python benchmarks/misaligned_pair.py [--degrees 12] [--shift 14] [--model brain] [--threads 2] [--affine-only]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from rwcnet.affine import matrix_about, rotation_matrix
from rwcnet.data.formats import Image, read_image
from rwcnet.evaluation import metrics
from rwcnet.geometry.grids import Grid, sampling_field
from rwcnet.intensity import invert_contrast
from rwcnet.register import register

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain"
AXIS = (1.0, 2.0, -1.0)
SHIFT_DIRECTION = (1.0, -1.0, 1.0)
DEFORMABLE = ("network", "instance_optimisation", "refinement")


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
    parser.add_argument("--affine-only", action="store_true",
                        help="only the affine step per pair (register(affine_only=True)): minutes instead of an hour on "
                             "a loaded 2-core machine")
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
    inverted = Image(invert_contrast(moving.array), moving.affine)
    runs = [("aligned", moving, moving_labels), ("misaligned", turned, turned_labels),
            ("inverted", inverted, moving_labels)]
    for name, image, image_labels in runs:
        if args.affine_only:
            start = time.perf_counter()
            result = register(fixed, image, affine_only=True)
            row(f"{name}, affine only", dice(result.field, fixed, image_labels, fixed_labels, labels),
                time.perf_counter() - start, f"affine step {result.seconds['affine']:.1f} s")
            continue
        for affine in (False, True):
            start = time.perf_counter()
            result = register(fixed, image, model=args.model, affine=affine)
            seconds = time.perf_counter() - start
            deformable = sum(result.seconds.get(key, 0.0) for key in DEFORMABLE)
            note = (f"affine {result.seconds['affine']:.1f} s = {100 * result.seconds['affine'] / deformable:.0f} % of "
                    f"the deformable steps' {deformable:.1f} s" if affine else f"deformable steps {deformable:.1f} s")
            row(f"{name}, {'defaults' if affine else '--no-affine'}",
                dice(result.field, fixed, image_labels, fixed_labels, labels), seconds, note)


if __name__ == "__main__":
    main()
