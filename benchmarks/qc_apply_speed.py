"""Wall and CPU time of the QC picture and of ``rwcnet apply``'s warps on a 160x192x224 volume.

Synthetic, seeded data (no download): a smooth random field of a few voxels,
a random image, a label map with 30 labels, 300 keypoints. Run:

    python benchmarks/qc_apply_speed.py [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch

from rwcnet.commands.apply import move_keypoints, warp_image, warp_label_map
from rwcnet.qc import qc_figure

SHAPE = (160, 192, 224)


def timed(name: str, function, repeats: int = 3) -> None:
    """Print the best wall time and its CPU time over ``repeats`` runs."""
    best = None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        result = (time.perf_counter() - wall, time.process_time() - cpu)
        best = result if best is None or result[0] < best[0] else best
    print(f"{name:<40s} wall {best[0]:6.2f} s   cpu {best[1]:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(3, 10, 12, 14)) * 3.0
    field = np.stack([scipy.ndimage.zoom(c, 16, order=3) for c in coarse], axis=-1).astype(np.float32)
    image = scipy.ndimage.gaussian_filter(rng.random(SHAPE), 2).astype(np.float32)
    labels = np.digitize(image, np.quantile(image, np.linspace(0, 1, 31)[1:-1])).astype(np.uint8)
    points = rng.uniform(20, np.array(SHAPE) - 20, size=(300, 3))
    warped = warp_image(image, field)
    affine = np.array([[-1.0, 0, 0, 80], [0, 0, 1, -112], [0, -1, 0, 96], [0, 0, 0, 1]])
    print(f"volume {SHAPE}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        png = Path(folder) / "qc.png"
        timed("qc_figure (LIA affine, metrics)", lambda: qc_figure(
            png, image, image, warped, field, affine=affine, title_metrics={"Dice": (0.5, 0.8), "SDlogJ": 0.1}))
    timed("warp_image (trilinear, float64)", lambda: warp_image(image, field))
    timed("warp_label_map onehot (31 labels)", lambda: warp_label_map(labels, field, "onehot"), repeats=1)
    timed("warp_label_map nearest", lambda: warp_label_map(labels, field, "nearest"))
    timed("move_keypoints moving->fixed (300)", lambda: move_keypoints(points, field, "moving"))


if __name__ == "__main__":
    main()
