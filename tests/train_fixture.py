"""A tiny Learn2Reg training folder and a tiny training config, shared by the training and LapIRN tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

SHAPE = (32, 32, 32)


def write_dataset(root: Path, cases: int = 5) -> Path:
    """A Learn2Reg folder ``TOY``: smooth random 32^3 images; 0001/0002 labelled and the validation pair."""
    rng = np.random.default_rng(3)
    training = []
    for case in range(1, cases + 1):
        name = f"TOY_{case:04d}_0000"
        image = ndimage.gaussian_filter(rng.random(SHAPE), 2.0)
        image = (image - image.min()) / (image.max() - image.min())
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(root / "imagesTr" / f"{name}.nii.gz"))
        entry = {"image": f"./imagesTr/{name}.nii.gz"}
        if case <= 2:
            labels = ((image > 0.5).astype(np.int16) + 2 * (image > 0.7)).astype(np.int16)
            (root / "labelsTr").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(labels, np.eye(4)), str(root / "labelsTr" / f"{name}.nii.gz"))
            entry["label"] = f"./labelsTr/{name}.nii.gz"
        training.append(entry)
    meta = {"name": "TOY", "pairings": "unpaired", "evaluation_labels": [1, 2], "training": training,
            "registration_val": [{"fixed": "./imagesTr/TOY_0001_0000.nii.gz", "moving": "./imagesTr/TOY_0002_0000.nii.gz"}]}
    (root / "TOY_dataset.json").write_text(json.dumps(meta))
    return root


def tiny_config(dataset: Path, steps=(10, 10), batch_size: int = 1, **changes) -> dict:
    stage = dict(iterations=2, radius=1, feature_channels=4, encoder_width=4, hidden_channels=8, context_channels=4,
                 motion_channels=12, head_channels=8, flow_kernel=3)
    config = {
        "name": "tiny",
        "model": {"name": "tiny", "final_upsampling": "convex", "dropout": 0.2,
                  "stages": [dict(stage, downsample=4, separable_gru=True), dict(stage, downsample=2, hidden_channels=6)]},
        "phases": [{"stage": 1, "steps": steps[0], "loss_grid": "stage", "batch_size": batch_size},
                   {"stage": 2, "steps": steps[1], "patch": [8, 8, 8], "loss_grid": "full", "batch_size": batch_size}],
        "losses": {"mse": 10.0, "dice": 0.0, "regulariser": 0.1, "sequence_gamma": 0.8},
        "supervised": 0.05,
        "data": {"dataset": str(dataset), "real_fraction": 0.3,
                 "synthetic": {"magnitude_mm": [1.0, 3.0], "smoothness_mm": [6.0, 10.0]}},
        "validation": {"pairs": 1, "every": 4, "magnitude_mm": 3.0, "smoothness_mm": 8.0},
        "checkpoint_every": 3,
        "report": False,
        "threads": 1,  # two threads per process oversubscribe a shared 2-core machine badly
    }
    config.update(changes)
    return config
