"""SynthMorph-style synthesis from label maps: determinism, labels that follow the images, soft Dice, training samples."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from rwcnet import geometry
from rwcnet.training.label_dice import fixed_onehot, hard_dice, soft_dice, warp_onehot
from rwcnet.training.synthmorph import OUTER_CSF, label_table, make_label_pair, merge_classes, random_transform
from rwcnet.training.synthmorph_maps import moment_alignment, refine_alignment
from rwcnet.training.loop import train
from rwcnet.training.config import SynthMorphConfig, TrainingConfig
from rwcnet.training.data import TrainingData
from rwcnet.training.log import read_log

#: value, synthseg_target: background, CSF, left/right white matter and cortex, lateral and inferior lateral ventricles, skin
LABELS = [(0, 0), (24, 0), (2, 2), (3, 3), (41, 41), (42, 42), (4, 4), (5, 5), (507, 0)]
SETTINGS = SynthMorphConfig(magnitude_mm=(1.0, 3.0), smoothness_mm=(6.0, 10.0))
STILL = SynthMorphConfig(magnitude_mm=(0.0, 0.0), rotation_deg=0.0, scaling=0.0, shear=0.0, translation_mm=0.0,
                         std=(0.0, 0.0), blur_mm=(0.0, 0.0), bias=(0.0, 0.0), gamma_std=0.0, noise=(0.0, 0.0))


def toy_map(shape=(40, 40, 40), shift=0.0) -> np.ndarray:
    """A head: skin shell, CSF, two hemispheres of cortex around white matter, ventricles."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) - n / 2 + 0.5 for n in shape], indexing="ij"))
    grid[0] -= shift
    radius = np.sqrt((grid**2).sum(0))
    labels = np.zeros(shape, np.int32)
    labels[radius < 18] = 507
    labels[radius < 15] = 24
    left = grid[0] < 0
    labels[(radius < 13) & left], labels[(radius < 13) & ~left] = 3, 42
    labels[(radius < 9) & left], labels[(radius < 9) & ~left] = 2, 41
    labels[(np.abs(grid[0] + 3) < 2) & (radius < 5)] = 4
    labels[(np.abs(grid[0] + 3) < 2) & (radius < 5) & (grid[2] > 2)] = 5
    return labels


def write_labels(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = [{"value": v, "name": str(v), "side": "none", "flip": v, "synthseg_target": t} for v, t in LABELS]
    (folder / "labels.json").write_text(json.dumps({"labels": entries}))
    for number in range(1, count + 1):
        nib.save(nib.Nifti1Image(toy_map(shift=number - 2.0), np.eye(4)), str(folder / f"training_seg_{number:02d}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def labels_folder(tmp_path_factory) -> Path:
    return write_labels(tmp_path_factory.mktemp("synthseg"))


@pytest.fixture(scope="module")
def table(labels_folder):
    return label_table(labels_folder / "labels.json")


def onehot(labels: np.ndarray, table) -> torch.Tensor:
    lut = table.lookup(int(labels.max()))
    channels = torch.from_numpy(lut[labels])
    return torch.nn.functional.one_hot(channels, table.channels).permute(3, 0, 1, 2)[None].float()


def test_label_table_merges_targets(table):
    assert table.values[0] == 0 and table.values[-1] == OUTER_CSF
    assert table.classes == (2, 3, 4, 41, 42)  # 5 is scored with 4; CSF and skin are not classes
    assert table.merged[table.values.index(5)] == table.classes.index(4)
    assert [table.background[table.values.index(v)] for v in (0, 507, OUTER_CSF, 24, 2)] == [True, True, True, False, False]


def test_pairs_are_deterministic_per_seed(table):
    maps = onehot(toy_map(), table)
    first, again = (make_label_pair(maps, maps, table, spacing_mm=[2.0] * 3, settings=SETTINGS, seed=5) for _ in range(2))
    other = make_label_pair(maps, maps, table, spacing_mm=[2.0] * 3, settings=SETTINGS, seed=6)
    for name in ("fixed", "moving", "fixed_onehot", "moving_onehot"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.fixed_onehot, other.fixed_onehot)


def test_intensities_differ_across_seeds_and_follow_the_labels(table):
    maps = onehot(toy_map(), table)
    pairs = [make_label_pair(maps, maps, table, spacing_mm=[1.0] * 3, settings=STILL, seed=seed) for seed in (1, 2)]
    means = []
    for pair in pairs:
        assert torch.allclose(pair.fixed_onehot, merge_classes(maps, table), atol=1e-5)  # no deformation: the map itself
        per_label = []
        for channel in range(1, table.channels):
            inside = maps[0, channel] > 0.999
            if inside.any():
                values = pair.fixed[0, 0][inside]
                assert float(values.std()) < 1e-5  # one intensity per label: image and labels agree voxel by voxel
                per_label.append(float(values.mean()))
        means.append(per_label)
    assert np.abs(np.subtract(*means)).max() > 0.05
    assert np.corrcoef(means)[0, 1] < 0.99


def test_moving_labels_warped_by_the_known_transform_match(table):
    """Labels sampled at a random transform equal scipy's trilinear resampling, and warp_onehot with that field reproduces them."""
    labels = merge_classes(onehot(toy_map(), table), table)
    coords = random_transform(labels.shape[2:], [2.0] * 3, SETTINGS, torch.Generator().manual_seed(3))
    field = coords - geometry.identity_grid(labels.shape[2:])
    warped = warp_onehot(labels, field)
    points = coords[0].numpy()
    for index in range(labels.shape[1]):
        expected = ndimage.map_coordinates(labels[0, index].numpy(), points, order=1, mode="nearest")
        np.testing.assert_allclose(warped[0, index].numpy(), expected, atol=1e-4)
    assert float(field.abs().max()) > 0.5


def test_warp_onehot_on_a_finer_grid_samples_cell_centres(table):
    """A full-resolution field samples 1/2-resolution labels at (x + u + 0.5) / 2 - 0.5 (cell-centred voxels)."""
    labels = merge_classes(onehot(toy_map(), table), table)
    generator = torch.Generator().manual_seed(1)
    field = torch.randn(1, 3, 16, 18, 20, generator=generator) * 2.0
    origin = (30, 24, 20)
    warped = warp_onehot(labels, field, origin=origin, ratio=2)
    points = geometry.identity_grid(field.shape[2:])[0].numpy() + np.array(origin).reshape(3, 1, 1, 1)
    coarse = (points + field[0].numpy() + 0.5) / 2 - 0.5
    for index in range(labels.shape[1]):
        expected = ndimage.map_coordinates(labels[0, index].numpy(), coarse, order=1, mode="nearest")
        np.testing.assert_allclose(warped[0, index].numpy(), expected, atol=1e-4)
    torch.testing.assert_close(fixed_onehot(labels, (16, 18, 20), origin=origin, ratio=2),
                               warp_onehot(labels, torch.zeros_like(field), origin=origin, ratio=2))
    torch.testing.assert_close(fixed_onehot(labels, (4, 5, 6), origin=(3, 2, 1)), labels[:, :, 3:7, 2:7, 1:7])


def test_soft_dice_is_one_for_identical_maps_and_matches_numpy():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 4, 6, 7, 8, generator=generator)
    b = torch.rand(2, 4, 6, 7, 8, generator=generator)
    b[1, 2] = 0.0  # class absent from the fixed map of sample 1: not counted there
    hard = torch.nn.functional.one_hot(a.argmax(dim=1), 4).permute(0, 4, 1, 2, 3).float()
    assert float(soft_dice(hard, hard)) == pytest.approx(1.0, abs=1e-6)
    x, y = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    per_sample = []
    for s in range(2):
        scores = [2 * (x[s, c] * y[s, c]).sum() / (x[s, c].sum() + y[s, c].sum()) for c in range(4) if y[s, c].sum() >= 1]
        per_sample.append(np.mean(scores))
    assert float(soft_dice(a, b)) == pytest.approx(np.mean(per_sample), rel=1e-5)
    field = torch.zeros(1, 3, 6, 7, 8, requires_grad=True)
    (1 - soft_dice(warp_onehot(a[:1], field + 0.3), b[:1])).backward()
    assert field.grad is not None and float(field.grad.abs().sum()) > 0


def test_hard_dice_counts_overlaps():
    fixed = torch.zeros(1, 2, 4, 4, 4)
    fixed[0, 0, :2] = 1.0
    fixed[0, 1, 2:] = 1.0
    warped = torch.zeros_like(fixed)
    warped[0, 0, :1] = 1.0
    warped[0, 1, 1:] = 1.0
    mean, scores = hard_dice(warped, fixed)
    assert scores == pytest.approx([2 * 16 / (16 + 32), 2 * 32 / (48 + 32)])
    assert mean == pytest.approx(np.mean(scores))


def test_moment_alignment_recovers_a_scaling_and_shift():
    target = np.zeros((40, 40, 40), bool)
    target[10:30, 12:28, 8:32] = True
    source = np.zeros((60, 60, 60), bool)
    source[5:45, 20:36, 18:42] = True  # axis 0 twice as long, shifted
    matrix, shift = moment_alignment(source, target)
    np.testing.assert_allclose(matrix, np.diag([2.0, 1.0, 1.0]), atol=0.02)
    np.testing.assert_allclose(matrix @ np.array([19.5, 19.5, 19.5]) + shift, [24.5, 27.5, 29.5], atol=0.05)


def test_refine_alignment_recovers_from_a_rotated_and_shifted_start():
    """Start 12 degrees and 3 voxels off an exact alignment of an ellipsoid with a bump: the refinement gets back."""
    grid = np.stack(np.meshgrid(*[np.arange(48, dtype=float) - 23.5] * 3, indexing="ij"))
    shape = (grid[0] / 18) ** 2 + (grid[1] / 10) ** 2 + (grid[2] / 14) ** 2 < 1
    shape |= (np.abs(grid[0] - 8) < 4) & (np.abs(grid[1]) < 4) & (grid[2] < -8) & (grid[2] > -20)
    angle = np.radians(12.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    centre = np.full(3, 23.5)

    def overlap(matrix, shift):
        points = np.einsum("ij,jxyz->ixyz", matrix, grid + 23.5) + shift.reshape(3, 1, 1, 1)
        moved = ndimage.map_coordinates(shape.astype(float), points, order=0) > 0.5
        return 2 * (moved & shape).sum() / (moved.sum() + shape.sum())

    start = (rotation, centre - rotation @ centre + np.array([3.0, -2.0, 1.0]))
    refined = refine_alignment(shape, shape, *start, factor=2)
    assert overlap(*refined) > overlap(*start) + 0.1
    assert overlap(*refined) > 0.95


def _dataset(root: Path) -> Path:
    """A Learn2Reg folder of 40^3 brains (0001/0002 the held-out validation pair)."""
    rng = np.random.default_rng(0)
    training = []
    for case in range(1, 5):
        name = f"TOY_{case:04d}_0000"
        image = ndimage.gaussian_filter(rng.random((40, 40, 40)), 2.0) * (toy_map() > 0)
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(root / "imagesTr" / f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{name}.nii.gz"})
    meta = {"name": "TOY", "evaluation_labels": [1], "training": training,
            "registration_val": [{"fixed": "./imagesTr/TOY_0001_0000.nii.gz", "moving": "./imagesTr/TOY_0002_0000.nii.gz"}]}
    (root / "TOY_dataset.json").write_text(json.dumps(meta))
    return root


def _config(dataset: Path, labels: Path, cache: Path, steps=(3, 2)) -> TrainingConfig:
    stage = dict(iterations=2, radius=1, feature_channels=4, encoder_width=4, hidden_channels=8, context_channels=4,
                 motion_channels=12, head_channels=8, flow_kernel=3)
    return TrainingConfig.model_validate({
        "name": "tiny-synth",
        "model": {"name": "tiny", "final_upsampling": "convex",
                  "stages": [dict(stage, downsample=4), dict(stage, downsample=2, hidden_channels=6)]},
        "phases": [{"stage": 1, "steps": steps[0], "loss_grid": "stage"},
                   {"stage": 2, "steps": steps[1], "patch": [8, 8, 8], "loss_grid": "full"}],
        "losses": {"mse": 10.0, "dice": 0.0, "regulariser": 0.1, "sequence_gamma": 0.8},
        "data": {"dataset": str(dataset), "exclude": ["TOY_0001_0000", "TOY_0002_0000"], "real_fraction": 0.0,
                 "synthetic": {"magnitude_mm": [1.0, 3.0], "smoothness_mm": [6.0, 10.0]},
                 "synthmorph": {"labels": str(labels), "train_maps": [1, 2], "validation_maps": [3, 4],
                                "reference": "TOY_0003_0000", "cache": str(cache), "fraction": 0.5,
                                "magnitude_mm": [1.0, 3.0], "smoothness_mm": [6.0, 10.0], "validation_pairs": 2}},
        "validation": {"pairs": 1, "every": 2, "magnitude_mm": 3.0, "smoothness_mm": 8.0, "metric": "dice",
                       "at_start": True},
        "checkpoint_every": 2, "report": False, "threads": 1,
    })


def test_training_samples_are_pure_functions_of_seed_phase_and_index(tmp_path, labels_folder):
    config = _config(_dataset(tmp_path / "data"), labels_folder, tmp_path / "cache")
    data = TrainingData(config, alignment=8)
    samples = [data.sample(0, config.phases[0], 4, index) for index in range(12)]
    assert any(s.fixed_onehot is not None for s in samples) and any(s.fixed_onehot is None for s in samples)
    fresh = TrainingData(config, alignment=8)  # reads the cache the first one wrote
    for index, sample in enumerate(samples):
        again = fresh.sample(0, config.phases[0], 4, index)
        assert again.key == sample.key
        assert torch.equal(again.fixed, sample.fixed) and torch.equal(again.moving, sample.moving)
        if sample.fixed_onehot is not None:
            assert torch.equal(again.moving_onehot, sample.moving_onehot)
            assert sample.fixed.shape[2:] == (40, 40, 40) and sample.fixed_onehot.shape[2:] == (10, 10, 10)
            assert not torch.equal(sample.fixed, sample.moving)
    keys = {s.key.split(":")[1] for s in samples if s.key.startswith("labels:")}
    assert all(int(k[:2]) in (1, 2) and int(k[3:]) in (1, 2) for k in keys)  # never the validation maps


@pytest.mark.slow
def test_training_logs_label_validation_and_resumes_exactly(tmp_path, labels_folder):
    config = _config(_dataset(tmp_path / "data"), labels_folder, tmp_path / "cache")
    straight = train(config, tmp_path / "straight", progress=False)["network"].state_dict()
    assert train(config, tmp_path / "split", max_steps=3, progress=False)["status"] == "stopped"
    resumed = train(config, tmp_path / "split", resume=True, progress=False)["network"].state_dict()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    records = read_log(tmp_path / "straight" / "log.jsonl")
    validation = [r for r in records if r["kind"] == "validation"]
    assert validation and all({"label_dice", "label_dice_before", "epe"} <= set(r) for r in validation)
    assert [(r["phase"], r["step"]) for r in validation] == [(0, 0), (0, 2), (0, 3), (1, 0), (1, 2)]
    assert any("label_dice" in r for r in records if r["kind"] == "train")


def test_stacked_label_pairs_give_the_mean_loss_and_gradient_of_the_single_ones(tmp_path, labels_folder):
    from rwcnet.model.files import build_model
    from rwcnet.training.steps import batch_label_pairs, sample_loss

    config = _config(_dataset(tmp_path / "data"), labels_folder, tmp_path / "cache")
    config = config.model_copy(update={"model": config.model.model_copy(update={"dropout": 0.0})})
    data = TrainingData(config, alignment=8)
    phase = config.phases[0]
    samples = [data.sample(0, phase, 4, index) for index in range(12)]
    label_pairs = [s for s in samples if s.fixed_onehot is not None][:3]
    image_pair = next(s for s in samples if s.fixed_onehot is None)
    batches = batch_label_pairs([label_pairs[0], image_pair, *label_pairs[1:]])
    assert [count for _, count in batches] == [1, 3] and batches[0][0] is image_pair
    stacked = batches[1][0]
    assert stacked.fixed.shape[0] == 3 and stacked.fixed_onehot.shape[0] == 3

    torch.manual_seed(0)
    net = build_model(config.network())

    def loss_and_gradient(items):
        net.zero_grad()
        total = sum(sample_loss(net, config, phase, item, torch.device("cpu"))[0] * weight for item, weight in items)
        total.backward()
        return float(total.detach()), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    single_loss, single_grad = loss_and_gradient([(s, 1 / 3) for s in label_pairs])
    batch_loss, batch_grad = loss_and_gradient([(stacked, 1.0)])
    assert batch_loss == pytest.approx(single_loss, rel=1e-5)
    assert torch.allclose(batch_grad, single_grad, rtol=1e-4, atol=1e-6)
