"""Registration pipeline: working grids, field mapping across grids, the API and the command's bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rwcnet import geometry
from rwcnet.cli import app
from rwcnet.data.formats import Image, read_field, write_image
from rwcnet.model import ModelConfig, ModelMetadata, RWCNet, StageConfig, save_model
from rwcnet.geometry.grids import working_grid
from rwcnet.register import register

runner = CliRunner()


def blobs(shape, seed=0) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *[n // 4 for n in shape], generator=generator)
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def lia_affine(spacing=1.0) -> np.ndarray:
    return np.array([[-spacing, 0, 0, 20], [0, 0, spacing, -10], [0, -spacing, 0, 15], [0, 0, 0, 1.0]])


def test_working_grid_is_the_fixed_grid_when_orientation_and_spacing_match():
    fixed = Image(np.zeros((20, 18, 16), np.float32), lia_affine())
    affine, shape = working_grid(fixed, 1.0, "LIA")
    np.testing.assert_allclose(affine, fixed.affine)
    assert shape == fixed.shape
    affine, shape = working_grid(fixed, 2.0, "RAS")
    corner = fixed.affine @ np.array([19, 17, 15, 1.0])
    inside = np.linalg.inv(affine) @ corner
    assert np.all(inside[:3] >= -1e-6) and np.all(inside[:3] <= np.array(shape) - 1 + 1e-6)


def test_resample_field_keeps_a_physical_translation():
    source = torch.tensor(lia_affine(1.0))
    target = torch.tensor([[2.0, 0, 0, -5], [0, 1.5, 0, -3], [0, 0, 1.0, -7], [0, 0, 0, 1]], dtype=torch.float64)
    shift_mm = torch.tensor([3.0, -2.0, 1.5], dtype=torch.float64)
    u_source = (torch.linalg.inv(source[:3, :3]) @ shift_mm).view(1, 3, 1, 1, 1).expand(1, 3, 10, 12, 8)
    u_target = geometry.resample_field(u_source.contiguous(), source, target, (7, 9, 11))
    expected = torch.linalg.inv(target[:3, :3]) @ shift_mm
    torch.testing.assert_close(u_target, expected.view(1, 3, 1, 1, 1).expand_as(u_target).contiguous())


def test_instance_optimisation_alone_recovers_a_smooth_shift(tmp_path):
    shape = (40, 40, 40)
    fixed = blobs(shape, 1)
    truth = torch.zeros(1, 3, *shape)
    truth[:, 0] = 1.5
    moving = geometry.warp(torch.from_numpy(fixed)[None, None], -truth)[0, 0].numpy()
    affine = np.eye(4)
    result = register(Image(fixed, affine), Image(moving, affine), model=None, io_iterations=40, device="cpu")
    assert result.field.shape == (*shape, 3)
    inner = result.field[8:-8, 8:-8, 8:-8]
    assert abs(inner[..., 0].mean() - 1.5) < 0.4
    assert np.abs(result.warped - fixed)[8:-8, 8:-8, 8:-8].mean() < np.abs(moving - fixed)[8:-8, 8:-8, 8:-8].mean()


def test_a_model_on_another_working_grid_returns_the_field_on_the_fixed_grid(tmp_path):
    stage = StageConfig(downsample=2, iterations=1, radius=1, feature_channels=4, encoder_width=4, hidden_channels=4,
                        motion_channels=8, head_channels=8, flow_kernel=3)
    network = RWCNet(ModelConfig(stages=[stage], dropout=0.0, flow_head_init_scale=0.0))
    path = tmp_path / "model.pt"
    save_model(path, network, ModelMetadata(orientation="LIA", spacing_mm=2.0))
    fixed = Image(blobs((24, 20, 16), 2), np.diag([1.0, 1.0, 1.0, 1.0]))
    result = register(fixed, fixed, model=path, io=False, refine=False, device="cpu")
    assert result.field.shape == (24, 20, 16, 3)
    assert np.abs(result.field).max() == 0
    assert any("working grid" in note for note in result.notes)


def _tiny_model(path, metadata):
    stage = StageConfig(downsample=2, iterations=1, radius=1, feature_channels=4, encoder_width=4, hidden_channels=4,
                        motion_channels=8, head_channels=8, flow_kernel=3)
    save_model(path, RWCNet(ModelConfig(stages=[stage], dropout=0.0)), metadata)
    return path


def test_the_network_grid_is_never_finer_than_the_fixed_image_and_io_runs_on_the_fixed_grid(tmp_path, monkeypatch):
    from rwcnet.pipeline import methods

    path = _tiny_model(tmp_path / "model.pt", ModelMetadata(orientation="LIA", spacing_mm=1.0))
    seen = {}
    forward, optimise = RWCNet.forward, methods.instance_optimise
    monkeypatch.setattr(RWCNet, "forward", lambda self, f, m, **k: seen.setdefault("network", tuple(f.shape[2:])) and forward(self, f, m, **k))
    monkeypatch.setattr(methods, "instance_optimise",
                        lambda f, m, u, **k: seen.setdefault("io", (tuple(f.shape[2:]), tuple(u.shape[2:]))) and optimise(f, m, u, **k))
    fixed = Image(blobs((20, 16, 12), 5), np.diag([2.0, 2.0, 2.0, 1.0]))  # RAS at 2 mm
    result = register(fixed, fixed, model=path, io_iterations=1, device="cpu")
    # LIA axes are -x, -z, +y: extents 38, 22, 30 mm at 2 mm (the fixed spacing, coarser than the model's 1 mm)
    assert seen["network"] == (20, 12, 16)
    assert seen["io"] == ((20, 16, 12), (20, 16, 12))
    assert result.field.shape == (20, 16, 12, 3)


def test_a_model_of_another_modality_runs_with_a_one_line_warning(tmp_path, images):
    path = _tiny_model(tmp_path / "mr.pt", ModelMetadata())  # the default modality: an MR model
    fixed = Image(blobs((16, 16, 16), 6) * 1000.0 - 500.0, np.eye(4))
    mask = Image(np.ones((16, 16, 16), np.uint8), np.eye(4))
    as_ct = register(fixed, fixed, fixed_mask=mask, model=path, io=False, modality="ct", device="cpu")
    assert len(as_ct.warnings) == 1 and "MR" in as_ct.warnings[0] and "CT" in as_ct.warnings[0]
    assert register(fixed, fixed, model=path, io=False, modality="mr", device="cpu").warnings == []
    result = runner.invoke(app, ["register", "--fixed", str(images / "fixed.nii.gz"), "--moving", str(images / "moving.nii.gz"),
                                 "--fixed-mask", str(images / "fixed.nii.gz"), "--output", str(images / "d.nii.gz"),
                                 "--model", str(path), "--no-io", "--modality", "ct"])
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if line.startswith("warning:")] == [f"warning: {as_ct.warnings[0]}"]


def test_network_memory_is_released_before_instance_optimisation(tmp_path, monkeypatch):
    from rwcnet.pipeline import methods, network

    stage = StageConfig(downsample=2, iterations=1, radius=1, feature_channels=4, encoder_width=4, hidden_channels=4,
                        motion_channels=8, head_channels=8, flow_kernel=3)
    path = tmp_path / "model.pt"
    save_model(path, RWCNet(ModelConfig(stages=[stage], dropout=0.0)))
    events = []
    optimise = methods.instance_optimise
    monkeypatch.setattr(network, "release_freed_memory", lambda: events.append("release") or True)
    monkeypatch.setattr(methods, "instance_optimise", lambda *a, **k: events.append("io") or optimise(*a, **k))
    fixed = Image(blobs((16, 16, 16), 3), np.eye(4))
    register(fixed, fixed, model=path, io_iterations=1, device="cpu")
    assert events == ["release", "io"]


@pytest.mark.parametrize(
    "recorded, expected",
    [
        ({"kind": "range", "low": -1000.0, "high": 1000.0}, lambda hu: (hu + 1000.0) / 2000.0),
        ({"kind": "window", "low": -500.0, "high": 500.0}, lambda hu: np.clip((hu + 500.0) / 1000.0, 0, 1)),
        ({"kind": "none", "low": 0.0, "high": 1.0}, lambda hu: np.clip((hu + 1000.0) / 1600.0, 0, 1)),  # CT window preset
    ],
)
def test_the_network_sees_intensities_normalised_as_it_was_trained(tmp_path, monkeypatch, recorded, expected):

    stage = StageConfig(downsample=2, iterations=1, radius=1, feature_channels=4, encoder_width=4, hidden_channels=4,
                        motion_channels=8, head_channels=8, flow_kernel=3)
    network = RWCNet(ModelConfig(stages=[stage], dropout=0.0))
    path = tmp_path / "model.pt"
    save_model(path, network, ModelMetadata(normalisation=recorded))
    seen = []
    forward = RWCNet.forward
    monkeypatch.setattr(RWCNet, "forward", lambda self, f, m, **k: seen.append(f.clone()) or forward(self, f, m, **k))
    hounsfield = (blobs((16, 16, 16), 4) * 3000.0 - 1500.0).astype(np.float32)
    fixed = Image(hounsfield, np.eye(4))
    mask = Image(np.ones_like(hounsfield, np.uint8), np.eye(4))  # a given mask: no lung-mask computation
    result = register(fixed, fixed, fixed_mask=mask, model=path, io=False, modality="ct", device="cpu")
    np.testing.assert_allclose(seen[0][0, 0].numpy(), expected(hounsfield), rtol=1e-5, atol=1e-6)
    assert any("as the model was trained" in note for note in result.notes) == (recorded["kind"] != "none")


@pytest.fixture()
def images(tmp_path):
    affine = np.eye(4)
    reference = Image(np.zeros((24, 24, 24), np.float32), affine)
    write_image(tmp_path / "fixed.nii.gz", blobs((24, 24, 24), 1), reference)
    write_image(tmp_path / "moving.nii.gz", blobs((24, 24, 24), 2), reference)
    write_image(tmp_path / "empty.nii.gz", np.zeros((24, 24, 24), np.uint8), reference)
    write_image(tmp_path / "small.nii.gz", np.ones((12, 12, 12), np.uint8), Image(np.zeros((12, 12, 12)), affine))
    return tmp_path


def _run(args):
    from rwcnet.cli import main  # the entry point turns InputError into exit code 2

    import sys

    old = sys.argv
    sys.argv = ["rwcnet", *map(str, args)]
    try:
        main()
    except SystemExit as exit_:
        return exit_.code
    finally:
        sys.argv = old
    return 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fixed-mask", "small.nii.gz"], "small.nii.gz"),
        (["--fixed-mask", "empty.nii.gz"], "empty"),
        (["--modality", "pet"], "modality"),
        (["--model", "missing_model.pt"], "missing_model.pt"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_no_output(images, capsys, extra, message):
    out = images / "disp.nii.gz"
    args = ["register", "--fixed", images / "fixed.nii.gz", "--moving", images / "moving.nii.gz", "--output", out,
            "--io-iters", "1", *[images / a if a.endswith(".nii.gz") else a for a in extra]]
    assert _run(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output_folder_exits_2(images, capsys):
    args = ["register", "--fixed", images / "fixed.nii.gz", "--moving", images / "moving.nii.gz",
            "--output", images / "no_such_folder" / "disp.nii.gz"]
    assert _run(args) == 2
    assert "no_such_folder" in capsys.readouterr().err


def test_register_command_writes_the_field_and_extras(images):
    out = images / "disp.nii.gz"
    result = runner.invoke(app, ["register", "--fixed", str(images / "fixed.nii.gz"), "--moving", str(images / "moving.nii.gz"),
                                 "--output", str(out), "--model", "none", "--io-iters", "3", "--warped", str(images / "w.nii.gz"),
                                 "--itk-field", str(images / "itk.nii.gz")])
    assert result.exit_code == 0, result.output
    assert read_field(out).shape == (24, 24, 24, 3)
    assert (images / "w.nii.gz").exists() and (images / "itk.nii.gz").exists()
    assert not [p for p in images.iterdir() if ".tmp" in p.name]


def test_convexadam_command_recovers_an_integer_shift(tmp_path):
    shape = (36, 36, 36)
    fixed = blobs(shape, 3)
    moving = np.roll(fixed, 2, axis=1)  # moving(x + 2 e_y) = fixed(x)
    reference = Image(np.zeros(shape, np.float32), np.eye(4))
    write_image(tmp_path / "f.nii.gz", fixed, reference)
    write_image(tmp_path / "m.nii.gz", moving, reference)
    result = runner.invoke(app, ["convexadam", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
                                 "--output", str(tmp_path / "d.nii.gz"), "--io-iters", "5"])
    assert result.exit_code == 0, result.output
    field = read_field(tmp_path / "d.nii.gz")
    assert abs(np.median(field[8:-8, 8:-8, 8:-8, 1]) - 2.0) < 0.5
