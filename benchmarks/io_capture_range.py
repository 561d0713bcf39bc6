"""Capture range of instance optimisation alone (``--model none``): the largest known displacement it recovers.

    python benchmarks/io_capture_range.py [--data ../shared/data] [--mm 1 2 4 6 8 10 12 15 20]
        [--images brain ct] [--kinds translation deformation] [--crop 96] [--threads 2]

For each image and each amount ``s`` (mm), a pair with a known field ``phi`` is made
with :func:`rwcnet.synthetic.make_pair` (``warped_role="fixed"``: the moving image is
the real image, the fixed image is it warped by ``phi``, so ``phi`` is exact):

* ``translation``: every voxel moves ``s`` mm (brain: along the diagonal of its array
  axes; CT: cranio-caudally, the direction of breathing);
* ``deformation``: a smooth field whose largest displacement is ``s`` mm (brain:
  :func:`rwcnet.synthetic.random_deformation`, smoothness 20 mm; CT:
  :func:`rwcnet.synthetic.breathing_deformation`, as ``benchmarks/paper_tables.py`` makes
  its lung pairs).

To keep it affordable on a CPU, the image is first cut to its central ``--crop``³ voxels
plus a margin of 20 mm each side, the pair is made on that, and both images are then
cut to the central ``--crop``³ (IO's cost grows with the volume, its capture range
does not: it comes from the MIND features, the 2-voxel IO grid and Adam's steps). The
table gives the largest displacement inside that box, too; then ``rwcnet.register.register(model=None)`` runs with the
modality's preset (``mr``: brain; ``ct``: lung, given the lung masks). The residual is
the mean endpoint error ``|u - phi|`` in mm over the foreground (brain: intensity >
0.05; CT: the fixed lung mask). A shift counts as recovered when the residual is under
one voxel of the image (brain 1 mm, CT 1.5 mm) and under a quarter of ``s``; the
capture range is the largest ``s`` up to which every amount is recovered.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def load(name: str, data: Path):
    """The real image (array, affine, spacing) and its foreground/lung mask."""
    from rwcnet import masks
    from rwcnet.data.formats import read_image

    if name == "brain":
        image = read_image(data / "brain" / "imagesTr" / "BRAIN_0001_0000.nii.gz")
        return image, image.array > 0.05
    image = read_image(data / "lung" / "imagesTr" / "LUNG_0001_0000.nii.gz")
    return image, masks.lung_mask(image.array.astype(np.float32), image.spacing, axis=2)


def known_field(name: str, kind: str, amount: float, image, mask) -> torch.Tensor:
    """``phi`` ``(1, 3, X, Y, Z)`` in voxels, its largest displacement ``amount`` mm."""
    from rwcnet import synthetic

    spacing = tuple(float(s) for s in image.spacing)
    if kind == "translation":
        direction = np.array([1.0, 1.0, 1.0]) / np.sqrt(3.0) if name == "brain" else np.array([0.0, 0.0, 1.0])
        voxels = amount * direction / np.asarray(spacing)
        return torch.tensor(voxels, dtype=torch.float32).view(1, 3, 1, 1, 1).expand(1, 3, *image.shape).contiguous()
    if name == "brain":
        return synthetic.random_deformation(image.shape, spacing, magnitude_mm=amount, smoothness_mm=20.0, seed=7)
    return synthetic.breathing_deformation(image.shape, spacing, amplitude_mm=amount, axis=2, towards="+",
                                           lung_mask=mask, seed=7)


def _central(image, mask, size: np.ndarray):
    """The central ``size`` voxels of an image and its mask (an :class:`rwcnet.data.formats.Image` with a shifted affine)."""
    from rwcnet.data.formats import Image

    start = np.maximum(0, (np.asarray(image.shape) - size) // 2)
    box = tuple(slice(int(b), int(b + n)) for b, n in zip(start, size))
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ start + image.affine[:3, 3]
    return Image(np.ascontiguousarray(image.array[box]), affine), mask[box]


def residual_mm(name: str, kind: str, amount: float, image, mask, crop: int) -> tuple[float, float, float]:
    """Mean |u - phi| (mm) over the foreground after IO alone, the largest |phi| (mm) there, and IO's seconds."""
    from rwcnet import synthetic
    from rwcnet.data.formats import Image
    from rwcnet.register import register

    spacing = np.asarray(image.spacing, dtype=np.float64)
    margin = np.ceil(20.0 / spacing).astype(int)
    region, region_mask = _central(image, mask, np.minimum(np.asarray(image.shape), crop + 2 * margin))
    phi = known_field(name, kind, amount, region, region_mask)
    pair = synthetic.make_pair(region.array.astype(np.float32), mask=region_mask, deformation=phi,
                               spacing_mm=tuple(float(s) for s in spacing), warped_role="fixed")
    start = (np.asarray(region.shape) - np.minimum(np.asarray(region.shape), crop)) // 2
    box = tuple(slice(int(b), int(b) + min(n, crop)) for b, n in zip(start, region.shape))
    affine = region.affine.copy()
    affine[:3, 3] = region.affine[:3, :3] @ start + region.affine[:3, 3]

    def cut(volume: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(volume[0, 0].numpy()[box])

    fixed, moving = Image(cut(pair.fixed), affine), Image(cut(pair.moving), affine)
    masks = {}
    if name == "ct":
        masks = {"fixed_mask": Image(cut(pair.fixed_mask).astype(np.uint8), affine),
                 "moving_mask": Image(cut(pair.moving_mask).astype(np.uint8), affine)}
    began = time.perf_counter()
    result = register(fixed, moving, model=None, modality="mr" if name == "brain" else "ct", device="cpu", seed=0, **masks)
    seconds = time.perf_counter() - began
    truth = phi[0].permute(1, 2, 3, 0).numpy()[box]
    inside = cut(pair.fixed_mask) if name == "ct" else fixed.array > 0.05
    error = np.linalg.norm((result.field - truth) * spacing, axis=-1)
    largest = np.linalg.norm(truth * spacing, axis=-1)[inside].max()
    return float(error[inside].mean()), float(largest), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--mm", type=float, nargs="+", default=[1, 2, 4, 6, 8, 10, 12, 15, 20])
    parser.add_argument("--images", nargs="+", default=["brain", "ct"], choices=["brain", "ct"])
    parser.add_argument("--kinds", nargs="+", default=["translation", "deformation"], choices=["translation", "deformation"])
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"IO alone (model none, modality preset), central {args.crop}³ crop, {args.threads} threads, "
          f"load average {Path('/proc/loadavg').read_text().split()[0]}")
    print("| image | kind | applied mm | largest in box mm | residual mm | recovered | IO seconds |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for name in args.images:
        image, mask = load(name, args.data)
        voxel = float(max(image.spacing))
        for kind in args.kinds:
            capture, broken = 0.0, False
            for amount in sorted(args.mm):
                residual, largest, seconds = residual_mm(name, kind, amount, image, mask, args.crop)
                recovered = residual < voxel and residual < 0.25 * amount
                if recovered and not broken:
                    capture = amount
                broken = broken or not recovered
                print(f"| {name} | {kind} | {amount:g} | {largest:.1f} | {residual:.2f} | {'yes' if recovered else 'no'} | "
                      f"{seconds:.1f} |",
                      flush=True)
            summary.append(f"{name} {kind}: recovered up to {capture:g} mm")
    print("\ncapture range (every amount up to it recovered):")
    for line in summary:
        print(f"  {line}")


if __name__ == "__main__":
    main()
