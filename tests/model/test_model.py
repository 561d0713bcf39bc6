"""RWCNet network: shapes, invariants, gradients, tiling, presets, model files, overfitting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rwcnet import geometry
from rwcnet.errors import InputError
from rwcnet.model import ModelConfig, ModelMetadata, RWCNet, StageConfig, load_model, model_preset, save_model
from rwcnet.model.tiling import plan_tiles, run_tiled
from rwcnet.model.cascade import ReferenceRWCNet
from rwcnet.model.files import build_model
from rwcnet.model.update import ConvexUpsampler, ConvGRU, ReferenceConvGRU


def tiny_stage(**overrides) -> StageConfig:
    values = dict(
        downsample=1, iterations=2, radius=1, feature_channels=4, encoder_width=4, hidden_channels=8,
        context_channels=4, motion_channels=12, head_channels=8, flow_kernel=3, halo=4,
    )
    values.update(overrides)
    return StageConfig(**values)


def tiny_model(**overrides) -> ModelConfig:
    values = dict(
        stages=[tiny_stage(downsample=4, separable_gru=True), tiny_stage(downsample=2, hidden_channels=6)],
        final_upsampling="convex",
        dropout=0.0,
    )
    values.update(overrides)
    return ModelConfig(**values)


def smooth_image(shape, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *[max(2, n // 4) for n in shape], generator=generator)
    return torch.nn.functional.interpolate(noise, size=shape, mode="trilinear", align_corners=False)


@pytest.mark.parametrize("shape", [(21, 18, 15), (16, 16, 16)])
def test_odd_sizes_and_batch_two_give_full_resolution_fields(shape):
    torch.manual_seed(0)
    model = RWCNet(tiny_model()).eval()
    fixed, moving = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    with torch.no_grad():
        out = model(fixed, moving, sequence=True)
    assert out.field.shape == (2, 3, *shape)
    assert [len(stage.sequence) for stage in out.stages] == [2, 2]
    assert torch.isfinite(out.field).all()


def test_zero_initialised_flow_head_gives_zero_field():
    torch.manual_seed(0)
    model = RWCNet(tiny_model(flow_head_init_scale=0.0)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 16, 20, 12), torch.rand(1, 1, 16, 20, 12))
    assert out.field.abs().max() == 0


@pytest.mark.parametrize("correlation", ["dot", "sad", "none"])
def test_gradients_reach_every_parameter(correlation):
    torch.manual_seed(0)
    stages = [
        tiny_stage(downsample=4, correlation=correlation),
        tiny_stage(downsample=2, hidden_channels=6, correlation=correlation, patch_factor=0.5),
    ]
    model = RWCNet(tiny_model(stages=stages, flow_head_init_scale=1.0)).train()
    fixed, moving = smooth_image((16, 16, 16), 1), smooth_image((16, 16, 16), 2)
    out = model(fixed, moving)
    (out.field * torch.randn_like(out.field)).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing


def test_frozen_stages_get_no_gradient():
    model = RWCNet(tiny_model(flow_head_init_scale=1.0))
    model.freeze_stages(1)
    model.train()
    assert not model.stages[0].training
    out = model(smooth_image((16, 16, 16), 1), smooth_image((16, 16, 16), 2))
    out.field.square().sum().backward()
    assert all(p.grad is None for p in model.stages[0].parameters())
    assert any(p.grad is not None for p in model.stages[1].parameters())


def test_conv_gru_matches_its_equations_and_the_reference_cell_reuses_the_update_gate():
    torch.manual_seed(0)
    cell = ConvGRU(4, 3, (3, 3, 3))
    h, x = torch.randn(1, 4, 5, 5, 5), torch.randn(1, 3, 5, 5, 5)
    z, r = torch.sigmoid(cell.gates(torch.cat([h, x], 1))).split(4, 1)
    q = torch.tanh(cell.candidate(torch.cat([r * h, x], 1)))
    torch.testing.assert_close(cell(h, x), (1 - z) * h + z * q)
    reference = ReferenceConvGRU(4, 3, (3, 3, 3))
    reference.load_state_dict(cell.state_dict())  # the same weights
    q_compat = torch.tanh(cell.candidate(torch.cat([z * h, x], 1)))
    torch.testing.assert_close(reference(h, x), (1 - z) * h + z * q_compat)


def test_convex_upsampling_of_a_constant_field_is_the_scaled_constant():
    up = ConvexUpsampler(hidden=4, channels=4, factor=2)
    field = torch.ones(1, 3, 4, 5, 6) * torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    out = up(field, torch.randn(1, 4, 4, 5, 6))
    assert out.shape == (1, 3, 8, 10, 12)
    torch.testing.assert_close(out, field.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4) * 2)


def test_tiling_is_exact_for_a_network_whose_receptive_field_fits_the_halo():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv3d(5, 3, 3, padding=1)).double()
    volume = torch.randn(2, 2, 27, 22, 19, dtype=torch.float64)
    whole = net(volume)
    tiles = plan_tiles(volume.shape[2:], 0.4, halo=6, mode="overlap")
    assert len(tiles) > 8
    tiled = run_tiled(lambda tile: {"y": net(volume[(slice(None), slice(None), *tile.region)])}, tiles, volume.shape[2:])
    torch.testing.assert_close(tiled["y"], whole, rtol=0, atol=1e-12)


def _border_jump_ratio(tiling: str) -> float:
    """Mean field jump across tile borders divided by the mean jump elsewhere (1 = no seam)."""
    torch.manual_seed(3)
    stage = tiny_stage(patch_factor=0.5, tiling=tiling, halo=6, iterations=2)
    model = RWCNet(ModelConfig(stages=[stage], dropout=0.0, flow_head_init_scale=1.0)).eval()
    shape = (24, 24, 24)
    with torch.no_grad():
        field = model(smooth_image(shape, 4), smooth_image(shape, 5)).field
    jumps = (field[:, :, 1:] - field[:, :, :-1]).norm(dim=1).mean(dim=(0, 2, 3))  # per x-step
    border = jumps[11]  # between x = 11 and 12, the tile border along x
    elsewhere = torch.cat([jumps[2:9], jumps[14:21]]).mean()
    return float(border / elsewhere)


def test_overlapping_tiles_remove_the_seams_that_disjoint_tiles_leave():
    disjoint, overlap = _border_jump_ratio("disjoint"), _border_jump_ratio("overlap")
    assert disjoint > 2.0
    assert overlap < 1.5


def test_rewarp_image_and_reference_compat_run_and_differ_from_the_default():
    torch.manual_seed(0)
    fixed, moving = smooth_image((16, 16, 16), 1), smooth_image((16, 16, 16), 2)
    fields = []
    for overrides in [{}, {"rewarp": "image"}]:
        torch.manual_seed(0)
        model = RWCNet(ModelConfig(stages=[tiny_stage(**overrides)], dropout=0.0, flow_head_init_scale=1.0)).eval()
        with torch.no_grad():
            fields.append(model(fixed, moving).field)
    torch.manual_seed(0)
    compat_config = ModelConfig(stages=[tiny_stage()], dropout=0.0, flow_head_init_scale=1.0, reference_compat=True)
    compat = build_model(compat_config)
    assert isinstance(compat, ReferenceRWCNet)
    with pytest.raises(ValueError, match="ReferenceRWCNet"):
        RWCNet(compat_config)
    with torch.no_grad():
        fields.append(compat.eval()(fixed, moving).field)
    assert not torch.allclose(fields[0], fields[1])
    assert not torch.allclose(fields[0], fields[2])


def test_presets_validate_and_ablations_change_what_they_say():
    reference = model_preset("reference")
    assert [s.downsample for s in reference.stages] == [4, 2, 1]
    assert [s.iterations for s in reference.stages] == [12, 12, 4]
    assert [s.radius for s in reference.stages] == [3, 3, 2]
    assert len(model_preset("single_resolution").stages) == 1
    assert all(s.correlation == "none" for s in model_preset("no_correlation").stages)
    assert all(s.iterations == 2 for s in model_preset("cpu:steps=2").stages)
    with pytest.raises(ValueError):
        model_preset("nonsense")
    with pytest.raises(ValueError):
        ModelConfig(stages=[tiny_stage(downsample=1), tiny_stage(downsample=2)])
    with pytest.raises(ValueError):
        StageConfig(radius=0)


def test_model_file_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    model = RWCNet(tiny_model()).eval()
    path = tmp_path / "model.pt"
    save_model(path, model, ModelMetadata(spacing_mm=(1.0, 1.0, 1.0), training={"note": "test"}))
    loaded, metadata = load_model(path)
    assert metadata == ModelMetadata(spacing_mm=(1.0, 1.0, 1.0), training={"note": "test"})
    x, y = smooth_image((16, 16, 16), 1), smooth_image((16, 16, 16), 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, y).field, model(x, y).field)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(InputError, match="future.pt.*version 99"):
        load_model(tmp_path / "future.pt")
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(InputError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")


#: The first shipped ``brain.pt`` (``cpu-brain``, format 1), kept so that files of that format stay tested.
FORMAT_1_BRAIN = Path(__file__).resolve().parents[1] / "fixtures" / "brain_cpu_brain_v1.pt"


def test_model_files_record_their_modality_and_old_files_read_as_mr(tmp_path):
    old = FORMAT_1_BRAIN
    assert "modality" not in torch.load(old, weights_only=True)["metadata"]  # written before modality was recorded
    assert load_model(old)[1].modality == "mr"
    model = RWCNet(tiny_model())
    save_model(tmp_path / "ct.pt", model, ModelMetadata(modality="ct"))
    assert load_model(tmp_path / "ct.pt")[1].modality == "ct"
    with pytest.raises(ValueError, match="pet"):
        ModelMetadata(modality="pet")
    payload = torch.load(tmp_path / "ct.pt", weights_only=True)
    payload["metadata"]["modality"] = "pet"  # a file edited by hand: refused on load, naming the file
    torch.save(payload, tmp_path / "pet.pt")
    with pytest.raises(InputError, match="pet.pt.*pet"):
        load_model(tmp_path / "pet.pt")


def test_format_1_files_read_through_the_versioned_reader(tmp_path):
    shipped = FORMAT_1_BRAIN
    payload = torch.load(shipped, weights_only=True)
    assert payload["format_version"] == 1
    _, metadata = load_model(shipped)
    flat = payload["metadata"]  # format 1: one flat dict
    assert metadata.orientation == flat["orientation"] == "LIA" and list(metadata.spacing_mm) == flat["spacing_mm"]
    assert metadata.normalisation == flat.get("normalisation") and metadata.modality == "mr"
    assert metadata.training["training_preset"] == flat["training_preset"] == "cpu-brain"
    assert set(metadata.training) == set(flat) - {"orientation", "spacing_mm", "normalisation", "modality"}
    save_model(tmp_path / "again.pt", load_model(shipped)[0], metadata)  # written again: format 2, same metadata
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert again["format_version"] == 2 and set(again["metadata"]) == {"modality", "spacing_mm", "orientation",
                                                                       "normalisation", "training"}
    assert load_model(tmp_path / "again.pt")[1] == metadata


@pytest.mark.slow
def test_a_tiny_stage_overfits_one_semi_synthetic_pair():
    torch.manual_seed(0)
    shape = (32, 32, 32)
    fixed = smooth_image(shape, 7)
    grid = geometry.identity_grid(shape)
    bump = torch.exp(-((grid - 15.5) ** 2).sum(1, keepdim=True) / (2 * 6.0**2))
    truth = torch.cat([2.5 * bump, -1.5 * bump, 1.0 * bump], dim=1)
    moving = geometry.warp(fixed, geometry.integrate_velocity(-truth))  # moving(x + truth) ≈ fixed
    model = RWCNet(ModelConfig(stages=[tiny_stage(downsample=2, iterations=2, radius=1)], dropout=0.0))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        field = model(fixed, moving).field
        loss = (geometry.warp(moving, field) - fixed).square().mean() * 100
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        if len(losses) >= 10 and sum(losses[-5:]) < 0.5 * sum(losses[:5]):
            break
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert math.isfinite(end) and end < 0.5 * start, (len(losses), start, end)


def test_untrained_readout_moves_towards_a_known_constant_shift():
    """With the flow head silenced, the readout alone must recover most of a known sub-voxel shift."""
    torch.manual_seed(0)
    stage = tiny_stage(
        iterations=3, radius=2, correlation="sad", readout=True, readout_gain=0.5, readout_temperature=0.1,
        readout_smoothing=5, feature_channels=8, halo=0,
    )
    model = RWCNet(ModelConfig(stages=[stage], dropout=0.0, flow_head_init_scale=0.0)).eval()
    shape = (32, 32, 32)
    fixed = smooth_image(shape, seed=3)
    shift = torch.tensor([0.8, -0.6, 0.4]).view(1, 3, 1, 1, 1)
    truth = shift.expand(1, 3, *shape).contiguous()
    moving = geometry.warp(fixed, -truth)  # moving(x) = fixed(x - shift), so warp(moving, truth) = fixed
    with torch.no_grad():
        field = model(fixed, moving).field
    inner = (slice(None), slice(None), *(slice(8, -8),) * 3)
    error = (field - truth)[inner].norm(dim=1).mean()
    assert error < 0.5 * shift.norm()


def test_readout_smoothing_must_be_odd():
    with pytest.raises(ValueError, match="readout_smoothing"):
        tiny_stage(correlation="sad", readout=True, readout_smoothing=4)
