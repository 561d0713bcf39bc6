"""Joint phases (every stage trains, none frozen) on input crops (``joint``, ``crop`` of a phase)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from rwcnet.model.files import build_model
from rwcnet.training.config import PhaseConfig, TrainingConfig
from rwcnet.training.data import TrainingData
from rwcnet.training.loop import train
from train_fixture import tiny_config, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("joint") / "toy")


def _joint_config(dataset: Path, *, joint: bool, crop=(16, 16, 24), steps: int = 2) -> TrainingConfig:
    config = tiny_config(dataset, steps=(0, steps))
    config["phases"][1] = {"stage": 2, "steps": steps, "loss_grid": "full", "joint": joint, "crop": list(crop)}
    return TrainingConfig.model_validate(config)


def test_a_crop_and_a_patch_exclude_each_other_and_a_crop_size_becomes_three_axes():
    assert PhaseConfig(stage=2, steps=1, crop=16).crop == (16, 16, 16)
    with pytest.raises(ValidationError, match="not both"):
        PhaseConfig(stage=2, steps=1, crop=16, patch=(8, 8, 8))
    with pytest.raises(ValidationError, match="at least 8"):
        PhaseConfig(stage=2, steps=1, crop=4)


def test_a_cropped_sample_is_the_uncropped_sample_cut_on_the_alignment_grid(dataset):
    cropped_config = _joint_config(dataset, joint=True)
    whole_config = cropped_config.model_copy(deep=True)
    whole_config.phases[1] = PhaseConfig(stage=2, steps=2, loss_grid="full")
    cropped_data, whole_data = TrainingData(cropped_config, alignment=8), TrainingData(whole_config, alignment=8)
    for index in range(6):  # semi-synthetic and real pairs; the crop is drawn after the pair, so the pairs agree
        cropped = cropped_data.sample(1, cropped_config.phases[1], 2, index)
        whole = whole_data.sample(1, whole_config.phases[1], 2, index)
        assert cropped.key == whole.key and cropped.fixed.shape[2:] == (16, 16, 24) and cropped.region is None
        matches = [(x, y, z) for x in range(0, 17, 8) for y in range(0, 17, 8) for z in range(0, 9, 8)
                   if torch.equal(whole.fixed[..., x:x + 16, y:y + 16, z:z + 24], cropped.fixed)]
        assert len(matches) == 1  # one box on the 8-voxel grid, by brute force
        x, y, z = matches[0]
        box = (..., slice(x, x + 16), slice(y, y + 16), slice(z, z + 24))
        assert torch.equal(whole.moving[box], cropped.moving)
        if whole.truth is not None:
            assert torch.equal(whole.truth[box], cropped.truth)
        if whole.fixed_labels is not None:
            assert torch.equal(whole.fixed_labels[box], cropped.fixed_labels)
    with pytest.raises(Exception, match="multiple of the network's alignment"):
        bad = _joint_config(dataset, joint=True, crop=(12, 16, 16))
        TrainingData(bad, alignment=8).sample(1, bad.phases[1], 2, 0)


def test_a_crop_shifts_keypoints_into_its_box_and_drops_fixed_ones_outside(dataset):
    config = _joint_config(dataset, joint=True, crop=(16, 16, 16))
    data = TrainingData(config, alignment=8)
    fixed = torch.zeros(1, 1, 32, 32, 32)
    fixed[..., 16:24, 8:16, 0:8] = 1.0  # the only foreground: the box must contain it
    fixed_kp = torch.tensor([[[20.0, 10.0, 3.0], [2.0, 2.0, 2.0], [30.0, 30.0, 30.0]]])
    moving_kp = fixed_kp + torch.tensor([1.0, -2.0, 0.5])
    items = {"fixed": fixed, "moving": fixed.clone(), "fixed_keypoints": fixed_kp, "moving_keypoints": moving_kp}
    data.data = data.data.model_copy(update={"foreground_threshold": 0.5})
    cut = data._cut(items, (16, 16, 16), np.random.default_rng(0))
    origin = next((x, y, z) for x in (8, 16) for y in (0, 8) for z in (0,)
                  if torch.equal(fixed[..., x:x + 16, y:y + 16, z:z + 16], cut["fixed"]))
    shift = torch.tensor(origin, dtype=torch.float32)
    inside = [(k - shift).tolist() for k in fixed_kp[0] if bool(((k - shift >= 0) & (k - shift <= 15)).all())]
    assert cut["fixed_keypoints"][0].tolist() == inside and [20.0 - origin[0], 10.0 - origin[1], 3.0] in inside
    assert torch.allclose(cut["moving_keypoints"] - cut["fixed_keypoints"], torch.tensor([1.0, -2.0, 0.5]))


def _first_stage(network) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in network.state_dict().items() if name.startswith("stages.0.")}


@pytest.mark.parametrize("joint", [True, False])
def test_a_joint_phase_trains_the_coarse_stage_too_and_a_stagewise_one_leaves_it(dataset, tmp_path, joint):
    config = _joint_config(dataset, joint=joint)
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["status"] == "finished"
    torch.manual_seed(config.seed)  # the run's own start
    start = _first_stage(build_model(config.network()))
    trained = _first_stage(summary["network"])
    changed = [name for name in start if not torch.equal(start[name], trained[name])]
    assert bool(changed) == joint
