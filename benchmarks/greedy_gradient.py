"""Our NCC gradient against greedy's own, on a crop of the shared real pair at the identity.

greedy (``picsl-greedy``, in rwcnet's environment) writes its metric gradient with ``-metric -og``;
the refinement's force (:class:`rwcnet.refine._Level`) is computed at the same point with each NCC
gradient option. Prints, per option, the correlation with greedy's per component and the ratio of
mean sizes, inside the crop (``--margin`` voxels from its faces, where greedy's clipped windows differ).

    python benchmarks/greedy_gradient.py [--data ../shared/data] [--size 80] [--margin 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
OPTIONS = {
    "ncc², central differences": dict(),
    "signed ncc², central differences": dict(ncc_signed=True),
    "signed ncc², interpolant gradient": dict(ncc_signed=True, interpolant_gradient=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--size", type=int, default=80)
    parser.add_argument("--margin", type=int, default=4)
    args = parser.parse_args()
    from picsl_greedy import Greedy3D

    from rwcnet.data.formats import read_image
    from rwcnet.refine import RefineConfig, _Level

    root = args.data / "brain" / "imagesTr"
    fixed, moving = (read_image(root / f"BRAIN_{n}_0000.nii.gz").array.astype(np.float32) for n in ("0001", "0002"))
    crop = tuple(slice((n - args.size) // 2, (n - args.size) // 2 + args.size) for n in fixed.shape)
    fixed, moving = np.ascontiguousarray(fixed[crop]), np.ascontiguousarray(moving[crop])
    with tempfile.TemporaryDirectory(prefix="greedy_gradient_") as tmp:
        paths = {name: Path(tmp) / f"{name}.nii.gz" for name in ("fixed", "moving", "gradient", "metric")}
        for name, array in (("fixed", fixed), ("moving", moving)):
            nib.save(nib.Nifti1Image(array, np.eye(4)), paths[name])  # identity affine: voxel axes = greedy's
        Greedy3D().execute(f"-d 3 -threads 2 -i {paths['fixed']} {paths['moving']} -m NCC 2x2x2 -metric "
                           f"-og {paths['gradient']} -o {paths['metric']}")
        theirs = np.squeeze(nib.load(paths["gradient"]).get_fdata())  # (X, Y, Z, 3)
    inner = (slice(args.margin, -args.margin),) * 3
    f, m = (torch.from_numpy(a)[None, None] for a in (fixed, moving))
    print(f"crop {args.size}^3 of 0001<-0002 at the identity; inside {args.margin} voxels from the faces")
    print("| our NCC gradient | correlation with greedy's (x, y, z) | greedy / ours, mean size |")
    print("|---|---|---|")
    for name, options in OPTIONS.items():
        level = _Level(f, m, torch.zeros(1, 3, *f.shape[2:]), None, None, "ncc", RefineConfig(**options))
        force, _ = level.similarity_gradient(torch.zeros(1, 3, *f.shape[2:]))
        ours = force[0].permute(1, 2, 3, 0).numpy()[inner]
        correlations = [np.corrcoef(ours[..., a].ravel(), theirs[inner][..., a].ravel())[0, 1] for a in range(3)]
        ratio = np.abs(theirs[inner]).mean() / np.abs(ours).mean()
        print(f"| {name} | {', '.join(f'{c:.2f}' for c in correlations)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
