"""Breathing-like training pairs of a thorax CT (the ``cpu-lung`` preset): body axes, lung mask, motion direction."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from rwcnet.data.datasets import Learn2RegDataset
from rwcnet.data.formats import Image
from rwcnet.model import load_model
from rwcnet.training.loop import train
from rwcnet.training.config import TrainingConfig, training_preset
from rwcnet.training.data import TrainingData, chest_geometry

SHAPE = (48, 40, 48)
SPACING = 3.0


def lpi_affine(spacing: float = SPACING) -> np.ndarray:
    """Voxel -> RAS for an LPI array (as the shared lung CT): i to the left, j to the back, k to the feet."""
    return np.diag([-spacing, -spacing, -spacing, 1.0])


def phantom_ct(root: Path) -> Path:
    """A folder ``imagesTr/`` (no dataset JSON) with one toy thorax CT in HU: a soft-tissue body, two air lungs
    with vessels, a dense diaphragm below them; array orientation LPI (k grows towards the feet)."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij")
    ct = np.full(SHAPE, -1000.0, dtype=np.float32)
    body = ((i - 24) / 21) ** 2 + ((j - 20) / 17) ** 2 < 1
    ct[body] = 40.0
    for centre in (14, 34):
        lung = ((i - centre) / 8) ** 2 + ((j - 20) / 11) ** 2 + ((k - 20) / 14) ** 2 < 1
        ct[lung & body] = -850.0
    ct[body & (k > 36)] = 60.0
    ct += np.random.default_rng(0).normal(0, 10, SHAPE).astype(np.float32)
    (root / "imagesTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(ct.astype(np.int16), lpi_affine()), str(root / "imagesTr" / "TOYCT_0001_0000.nii.gz"))
    return root


def lung_config(root: Path, **breathing) -> TrainingConfig:
    """``cpu-lung`` on the phantom with a tiny network and a short schedule."""
    stage = dict(iterations=2, radius=1, feature_channels=4, encoder_width=4, hidden_channels=8, context_channels=4,
                 motion_channels=12, head_channels=8, flow_kernel=3)
    data = training_preset("cpu-lung").model_dump()
    data.update(model={"name": "tiny", "final_upsampling": "convex",
                       "stages": [dict(stage, downsample=4), dict(stage, downsample=2, hidden_channels=6)]},
                phases=[{"stage": 1, "steps": 2, "loss_grid": "stage", "patch": [6, 6, 6]},
                        {"stage": 2, "steps": 1, "patch": [8, 8, 8], "loss_grid": "full"}],
                checkpoint_every=5, threads=1, report=False)
    data["data"]["dataset"] = str(root)
    data["data"]["synthetic"]["breathing"].update(breathing)
    data["validation"].update(pairs=2, every=5, magnitude_mm=12.0)
    return TrainingConfig.model_validate(data)


@pytest.mark.parametrize("codes, expected", [("LPI", (2, "+", 1)), ("RAS", (2, "-", 1)), ("LIA", (1, "+", 2)),
                                             ("ASR", (1, "-", 0))])
def test_chest_geometry_reads_the_axes_from_the_orientation(codes, expected):
    axes = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for column, code in enumerate(codes):
        row, sign = axes[code]
        affine[row, column] = 1.5 * sign
    assert chest_geometry(Image(np.zeros((4, 4, 4)), affine)) == expected
    assert "".join(nib.orientations.aff2axcodes(affine)) == codes


def test_a_folder_of_images_without_a_json_reads_as_unpaired_training_images(tmp_path):
    root = phantom_ct(tmp_path / "ct")
    dataset = Learn2RegDataset(root)
    assert [p.name for p in dataset.training_images()] == ["TOYCT_0001_0000.nii.gz"]
    assert dataset.pairs("train") == [] and dataset.modality == "mr"


def test_breathing_pairs_move_the_lung_base_most_and_along_the_body_axis(tmp_path):
    root = phantom_ct(tmp_path / "ct")
    config = lung_config(root, fraction=1.0, amplitude_mm=(15.0, 15.0), exhale_fraction=0.0, variation=0.0)
    data = TrainingData(config, alignment=8)
    chest = data._load(data.images[0]).chest
    assert (chest.cranio_caudal_axis, chest.towards_feet, chest.anterior_posterior_axis) == (2, "+", 1)
    assert chest.lung[0, 0, :SHAPE[0], :SHAPE[1], :SHAPE[2]].sum() > 1000  # the two air ellipsoids
    sample = data.sample(0, config.phases[0], 4, index=3)
    field_mm = sample.truth[0, :, :SHAPE[0], :SHAPE[1], :SHAPE[2]] * SPACING
    lung = chest.lung[0, 0, :SHAPE[0], :SHAPE[1], :SHAPE[2]]
    cranio_caudal = field_mm[2][lung]
    # the fixed image is the warped copy: its pull-back field points towards the head (-k) in the lungs,
    # largest (15 mm, up to the min-Jacobian rescaling) at the base and small at the apex
    assert float(cranio_caudal.min()) < -10.0 and float(cranio_caudal.max()) < 1.0
    k = torch.arange(SHAPE[2]).expand(SHAPE)[lung]
    apex, base = cranio_caudal[k < 12].abs().mean(), cranio_caudal[k > 26].abs().mean()
    assert base > 3 * apex
    assert float(field_mm[0][lung].abs().mean()) < 0.2 * float(cranio_caudal.abs().mean())


def test_exhale_pairs_reverse_the_motion_and_samples_repeat(tmp_path):
    root = phantom_ct(tmp_path / "ct")
    inhale = TrainingData(lung_config(root, fraction=1.0, exhale_fraction=0.0, variation=0.0), alignment=8)
    exhale = TrainingData(lung_config(root, fraction=1.0, exhale_fraction=1.0, variation=0.0), alignment=8)
    phase = inhale.config.phases[0]
    first, again = inhale.sample(0, phase, 4, index=5), inhale.sample(0, phase, 4, index=5)
    assert torch.equal(first.truth, again.truth) and torch.equal(first.fixed, again.fixed)
    reversed_ = exhale.sample(0, phase, 4, index=5)
    lung = inhale._load(inhale.images[0]).chest.lung[0, 0]
    assert float(first.truth[0, 2][lung].mean()) < -1.0 < 1.0 < float(reversed_.truth[0, 2][lung].mean())
    validation = inhale.validation_samples()
    assert [float(v.truth[0, 2][lung].mean()) > 0 for v in validation] == [False, True]


def test_a_lung_run_records_ct_and_the_window_in_its_model(tmp_path):
    root = phantom_ct(tmp_path / "ct")
    result = train(lung_config(root), tmp_path / "run")
    model, metadata = load_model(result["model"])
    assert metadata.modality == "ct"
    assert metadata.normalisation["kind"] == "window" and metadata.orientation == "LPI"
    assert metadata.spacing_mm == (SPACING,) * 3
