"""Tiny Learn2Reg-layout dataset folders for tests (written with nibabel, independent of rwcnet.data.formats)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (16, 14, 12)
SPACING = (1.5, 2.0, 2.5)
SHIFT = np.array([2.0, -1.0, 1.0])  # moving keypoints = fixed keypoints + SHIFT (voxels)


def _affine(spacing=SPACING) -> np.ndarray:
    return np.diag(list(spacing) + [1.0])


def _save(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, _affine(spacing)), str(path))


def write_paired(root: Path, cases: int = 3) -> Path:
    """NLST-like folder ``TINY``: cases 0001..000n, phases _0000 (fixed) and _0001 (moving).

    Masks in masksTr, keypoints as CSV in keypointsTr but named ``.nii.gz`` in
    the JSON. Case 0001 is the paired training pair, the others validation.
    """
    rng = np.random.default_rng(0)
    training, pairs = [], []
    for case in range(1, cases + 1):
        fixed_kp = rng.uniform(3, np.array(SHAPE) - 4, size=(5, 3))
        for phase, points in (("0000", fixed_kp), ("0001", fixed_kp + SHIFT)):
            name = f"TINY_{case:04d}_{phase}"
            _save(root / "imagesTr" / f"{name}.nii.gz", rng.random(SHAPE).astype(np.float32))
            mask = np.zeros(SHAPE, np.uint8)
            mask[3:-3, 3:-3, 3:-3] = 1
            _save(root / "masksTr" / f"{name}.nii.gz", mask)
            (root / "keypointsTr").mkdir(exist_ok=True)
            np.savetxt(root / "keypointsTr" / f"{name}.csv", points, delimiter=",", fmt="%.4f")
            training.append({"image": f"./imagesTr/{name}.nii.gz", "mask": f"./masksTr/{name}.nii.gz",
                             "keypoints": f"./keypointsTr/{name}.nii.gz"})
        pairs.append({"fixed": f"./imagesTr/TINY_{case:04d}_0000.nii.gz",
                      "moving": f"./imagesTr/TINY_{case:04d}_0001.nii.gz"})
    meta = {"name": "TINY", "pairings": "paired", "tensorImageShape": {"0": list(SHAPE)},
            "training": training, "training_paired_images": pairs[:1], "registration_val": pairs[1:]}
    (root / "TINY_dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def write_unpaired(root: Path, cases: int = 4) -> Path:
    """OASIS-like folder ``UNP``: images with labels (a cube of label 1, a slab of 2, label 3 in case 1 only).

    Validation pair: fixed 0001, moving 0002; ``evaluation_labels`` [1, 2, 3].
    Case ``n`` has its cube shifted by ``n - 1`` voxels along axis 0.
    """
    rng = np.random.default_rng(1)
    training = []
    for case in range(1, cases + 1):
        name = f"UNP_{case:04d}_0000"
        labels = np.zeros(SHAPE, np.int16)
        labels[2 + case - 1 : 10 + case - 1, 3:11, 2:10] = 1
        labels[:, :, 10:] = 2
        if case == 1:
            labels[0:2, 0:2, 0:2] = 3
        _save(root / "imagesTr" / f"{name}.nii.gz", rng.random(SHAPE).astype(np.float32), (1.0, 1.0, 1.0))
        _save(root / "labelsTr" / f"{name}.nii.gz", labels, (1.0, 1.0, 1.0))
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"name": "UNP", "pairings": "unpaired", "evaluation_labels": [1, 2, 3], "training": training,
            "registration_val": [{"fixed": "./imagesTr/UNP_0001_0000.nii.gz",
                                  "moving": "./imagesTr/UNP_0002_0000.nii.gz"}]}
    (root / "UNP_dataset.json").write_text(json.dumps(meta, indent=2))
    return root


def save_field(path: Path, field: np.ndarray) -> Path:
    """Write a Learn2Reg displacement field ``(X, Y, Z, 3)`` as .nii.gz or .npz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".npz"):
        np.savez_compressed(path, arr_0=field)
    else:
        nib.save(nib.Nifti1Image(field.astype(np.float32), np.eye(4)), str(path))
    return path
