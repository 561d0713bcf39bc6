"""Does the ``cpu`` network learn faster when its stages train jointly? Arms compared in one run, same samples.

Task (``semi``): 64³ crops of the shared training brains at 2 mm (0004 and 0005 train, 0003 is held out;
0001/0002 are never read), deformed by fresh random smooth fields (largest 2-6 mm, smoothness 12 mm); loss:
the final full-resolution field's mean endpoint error (voxels) against the known field, 8-voxel border
excluded; Adam, gradient norm clipped to 1, the same sample stream for every arm. Arms, all from the same
start (``--init``: ``untrained`` = the ``cpu`` config seeded 0, or a model file):

* ``joint``: every stage, the carries and the convex upsampler train together, every step;
* ``stagewise``: the training loop's order: stage 1 alone for the first half (its own field, upsampled
  trilinearly, against the truth), then stage 2, its carry and the upsampler with stage 1 frozen.

Every ``--every`` steps it prints the mean seconds per step so far (the held-out scoring included) and the
held-out endpoint errors: two pairs of brain 0003 and the blob pair of
``tests/model/test_weights.py`` (smooth noise, 4 mm / 12 mm), in voxels.

    python benchmarks/end_to_end_learning.py --steps 150 [--arms joint stagewise] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from rwcnet import geometry
from rwcnet.model import load_model
from rwcnet.model.files import build_model
from rwcnet.model.presets import rwcnet_preset
from rwcnet.synthetic import random_deformation
from rwcnet.training.steps import endpoint_error as training_endpoint_error

REPO = Path(__file__).resolve().parents[1]
SIZE, BORDER = 64, 8
INNER = (slice(None), slice(None), *(slice(BORDER, -BORDER),) * 3)


def brain_crop(data: Path, subject: int) -> torch.Tensor:
    """The central 64³ of brain ``subject`` averaged to 2 mm, min-max normalised, ``(1, 1, 64, 64, 64)``."""
    path = data / "brain" / "imagesTr" / f"BRAIN_{subject:04d}_0000.nii.gz"
    image = torch.from_numpy(nib.load(str(path)).get_fdata(dtype=np.float32))[None, None]
    image = F.avg_pool3d(image, 2)
    start = [(n - SIZE) // 2 for n in image.shape[2:]]
    image = image[(..., *(slice(s, s + SIZE) for s in start))]
    return ((image - image.min()) / (image.max() - image.min())).contiguous()


def blob() -> torch.Tensor:
    """``test_weights``' fixed image: 8³ uniform noise upsampled trilinearly to 64³, min-max normalised."""
    coarse = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    image = F.interpolate(coarse, size=(SIZE,) * 3, mode="trilinear", align_corners=False)
    return (image - image.min()) / (image.max() - image.min())


def deformed_pair(fixed: torch.Tensor, seed: int, magnitude_mm: float, smoothness_mm: float = 12.0):
    """``(fixed, moving, truth)`` with ``warp(moving, truth) = fixed`` for a random field (voxels)."""
    truth = random_deformation((SIZE,) * 3, (1.0, 1.0, 1.0), magnitude_mm=magnitude_mm, smoothness_mm=smoothness_mm,
                               seed=seed)
    return fixed, geometry.warp(fixed, geometry.invert_field(truth).field), truth


def endpoint_error(field: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The training loop's endpoint error (voxels at 1-voxel spacing) inside the 8-voxel border."""
    return training_endpoint_error(field[INNER], truth[INNER], (1.0, 1.0, 1.0))


def held_out(model, pairs) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        return {name: round(float(endpoint_error(model(f, m).field, t)), 4) for name, (f, m, t) in pairs.items()}


def run_arm(arm: str, start, train_images, pairs, args) -> list[dict]:
    model = copy.deepcopy(start)
    half = args.steps // 2
    rows = [{"arm": arm, "step": 0, **held_out(model, pairs)}]
    print(json.dumps(rows[-1]), flush=True)

    def optimiser_for(parameters):
        return torch.optim.Adam([p for p in parameters if p.requires_grad], lr=args.lr)

    model.freeze_stages(0)
    optimiser = optimiser_for(model.parameters() if arm == "joint" else model.stages[0].parameters())
    began = time.monotonic()
    for step in range(1, args.steps + 1):
        if arm == "stagewise" and step == half + 1:
            model.freeze_stages(1)
            later = [p for module in (*model.stages[1:], *model.carry, model.upsampler) if module is not None
                     for p in module.parameters()]
            optimiser = optimiser_for(later)
        seed = 1000 + step
        magnitude = float(np.random.default_rng(seed).uniform(2.0, 6.0))
        fixed, moving, truth = deformed_pair(train_images[seed % len(train_images)], seed, magnitude)
        model.train()
        if arm == "stagewise" and step <= half:
            field = model(fixed, moving, num_stages=1).field  # stage 1's field, upsampled
        else:
            field = model(fixed, moving).field
        loss = endpoint_error(field, truth)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimiser.param_groups for p in group["params"]], 1.0)
        optimiser.step()
        if step % args.every == 0 or step == args.steps:
            rows.append({"arm": arm, "step": step, "train": round(float(loss.detach()), 4),
                         "seconds_per_step": round((time.monotonic() - began) / step, 2), **held_out(model, pairs)})
            print(json.dumps(rows[-1]), flush=True)
    if args.save:
        torch.save(model.state_dict(), args.save.with_name(f"{args.save.stem}_{arm}{args.save.suffix}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--init", default="untrained", help="'untrained' (cpu config, seed 0) or a model file")
    parser.add_argument("--arms", nargs="+", default=["joint", "stagewise"], choices=["joint", "stagewise"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save", type=Path, help="write each arm's final state_dict as STEM_<arm>.pt")
    parser.add_argument("--output", type=Path, help="also write every row as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.init == "untrained":
        torch.manual_seed(0)
        start = build_model(rwcnet_preset("cpu"))
    else:
        start = load_model(args.init)[0]
    train_images = [brain_crop(args.data, 4), brain_crop(args.data, 5)]
    held = brain_crop(args.data, 3)
    pairs = {"brain 0003 (seed 100)": deformed_pair(held, 100, 4.0), "brain 0003 (seed 101)": deformed_pair(held, 101, 4.0),
             "blob (test_weights)": deformed_pair(blob(), 1, 4.0)}
    rows = []
    for arm in args.arms:
        torch.manual_seed(0)  # the same dropout masks for every arm
        rows += run_arm(arm, start, train_images, pairs, args)
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
