"""LapIRN comparator: shapes, near-zero start, patch regions against whole grids, freezing, model files, overfitting, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage

from rwcnet import geometry
from rwcnet.model import ModelMetadata, RWCNet, load_model, model_preset, save_model
from rwcnet.model.files import build_model
from rwcnet.model.lapirn import LapIRN, LapIRNConfig
from rwcnet.synthetic import make_pair

TINY = LapIRNConfig(name="tiny", widths=[4, 8], blocks=1, halo=12)


def smooth_image(shape, seed: int = 0) -> torch.Tensor:
    """A smooth random image ``(1, 1, *shape)`` in [0, 1]."""
    image = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2.0)
    image = (image - image.min()) / (image.max() - image.min())
    return torch.from_numpy(image).float()[None, None]


def test_presets_configs_and_factory():
    assert isinstance(model_preset("lapirn-cpu"), LapIRNConfig)
    assert [s.downsample for s in model_preset("lapirn").stages] == [4, 2, 1]
    assert model_preset("lapirn-cpu").alignment == 16 and model_preset("lapirn").alignment == 8
    assert isinstance(build_model("lapirn-cpu"), LapIRN) and isinstance(build_model("cpu"), RWCNet)
    assert isinstance(build_model(TINY.model_dump()), LapIRN)
    for bad in ({"downsample": [2, 4]}, {"downsample": [4, 3]}, {"widths": []}, {"downsample": []}):
        with pytest.raises(ValidationError):
            LapIRNConfig(**bad)
    with pytest.raises(ValueError, match="unknown LapIRN preset"):
        model_preset("lapirn-gpu")


def test_shapes_for_odd_sizes_and_batch_two_and_untrained_field_is_near_zero(one_thread):
    torch.manual_seed(0)
    net = LapIRN(TINY).eval()
    fixed, moving = torch.rand(2, 1, 19, 23, 17), torch.rand(2, 1, 19, 23, 17)
    with torch.no_grad():
        for count in (1, 2, 3):
            out = net(fixed, moving, num_stages=count, sequence=True)
            assert out.field.shape == (2, 3, 19, 23, 17) and out.origin == (0, 0, 0)
            assert len(out.stages) == count
            for result, factor in zip(out.stages, (4, 2, 1)):
                grid = tuple(n // factor for n in (24, 24, 24))  # padded to a multiple of the alignment 8
                assert result.field.shape == (2, 3, *grid)
                assert len(result.sequence) == 1 and torch.equal(result.sequence[0], result.field)
            assert out.field.abs().max() < 1e-3
        assert net(fixed, moving).stages[0].sequence == []
    with pytest.raises(ValueError, match="multiples of 8"):
        net(fixed, moving, region=(slice(0, 4),) * 3)
    with pytest.raises(ValueError, match="num_stages"):
        net(fixed, moving, num_stages=4)


def test_a_region_with_enough_halo_equals_the_crop_of_the_whole_grid(one_thread):
    torch.manual_seed(1)
    net = LapIRN(TINY)
    for level in net.stages:  # non-trivial outputs at every level
        torch.nn.init.normal_(level.head.weight, std=0.05)
    fixed, moving = smooth_image((48, 40, 32), 1), smooth_image((48, 40, 32), 2)
    region = (slice(19, 27), slice(10, 19), slice(13, 20))  # receptive field of TINY: 10 voxels < halo 12
    with torch.no_grad():
        whole = net(fixed, moving, sequence=True)
        patch = net(fixed, moving, sequence=True, region=region)
    box = (slice(None), slice(None), *region)
    assert patch.origin == (19, 10, 13) and patch.stages[-1].origin == (19, 10, 13)
    assert patch.field.shape == (1, 3, 8, 9, 7)
    torch.testing.assert_close(patch.field, whole.field[box], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(patch.stages[-1].sequence[0], whole.stages[-1].field[box], atol=1e-6, rtol=1e-5)
    coarse = net(fixed, moving, num_stages=2, region=(slice(4, 8),) * 3)  # a region of the 1/2 grid
    assert coarse.origin == (8, 8, 8) and coarse.field.shape == (1, 3, 8, 8, 8)


def test_gradients_reach_every_trained_parameter_and_no_frozen_one(one_thread):
    torch.manual_seed(2)
    net = LapIRN(TINY)
    net.freeze_stages(2)
    net.train()
    assert [level.training for level in net.stages] == [False, False, True]
    fixed, moving = smooth_image((16, 16, 16), 3), smooth_image((16, 16, 16), 4)
    out = net(fixed, moving, sequence=True, region=(slice(4, 12),) * 3)
    (geometry.warp(moving, out.field, origin=out.origin) - fixed[:, :, 4:12, 4:12, 4:12]).pow(2).mean().backward()
    for index, level in enumerate(net.stages):
        for name, parameter in level.named_parameters():
            if index < 2:
                assert parameter.grad is None, name
            else:
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_model_file_round_trip_gives_identical_outputs(tmp_path, one_thread):
    torch.manual_seed(3)
    net = LapIRN(TINY)
    for level in net.stages:
        torch.nn.init.normal_(level.head.weight, std=0.05)
    save_model(tmp_path / "lapirn.pt", net, ModelMetadata(training={"note": "test"}))
    loaded, metadata = load_model(tmp_path / "lapirn.pt")
    assert isinstance(loaded, LapIRN) and loaded.config == TINY and metadata == ModelMetadata(training={"note": "test"})
    fixed, moving = torch.rand(1, 1, 17, 16, 15), torch.rand(1, 1, 17, 16, 15)
    with torch.no_grad():
        expected, got = net.eval()(fixed, moving).field, loaded(fixed, moving).field
    assert expected.abs().max() > 1e-3 and torch.equal(expected, got)


def test_tiny_lapirn_overfits_one_pair_at_full_resolution(one_thread):
    torch.manual_seed(4)
    image = smooth_image((32, 32, 32), 5)
    pair = make_pair(image, spacing_mm=(1.0, 1.0, 1.0), seed=5)
    net = LapIRN(LapIRNConfig(name="overfit", widths=[4, 8], blocks=1))
    net.freeze_stages(2)  # levels 1/4 and 1/2 stay untrained (~zero): the 1/1 level does the work
    net.train()
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)

    def mse() -> torch.Tensor:
        return (geometry.warp(pair.moving, net(pair.fixed, pair.moving).field) - pair.fixed).pow(2).mean()

    with torch.no_grad():
        before = float(mse())
    for _ in range(150):
        loss = mse()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        after = float(mse())
    assert after < 0.5 * before, (before, after)


def test_training_loop_writes_a_loadable_lapirn(tmp_path, one_thread):
    from train_fixture import tiny_config, write_dataset

    from rwcnet.training.loop import train
    from rwcnet.training.config import TrainingConfig

    dataset = write_dataset(tmp_path / "toy")
    phases = [{"stage": 1, "steps": 1, "loss_grid": "stage"},
              {"stage": 2, "steps": 1, "patch": [8, 8, 8], "loss_grid": "full"},
              {"stage": 3, "steps": 1, "patch": [16, 16, 16], "loss_grid": "full"}]
    config = TrainingConfig.model_validate(tiny_config(dataset, model="lapirn-cpu", phases=phases))
    summary = train(config, tmp_path / "run", progress=False)
    assert summary["status"] == "finished"
    model, metadata = load_model(tmp_path / "run" / "model.pt")
    assert isinstance(model, LapIRN) and metadata.training["network_preset"] == "lapirn-cpu"
    image = smooth_image((32, 32, 32), 6)
    with torch.no_grad():
        assert model(image, image).field.shape == (1, 3, 32, 32, 32)
