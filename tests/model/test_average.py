"""Averaging model files (``average_models``, ``rwcnet average-models``): exact parameter interpolation, refusals."""

from __future__ import annotations

import pytest
import torch

from cli_runner import run
from rwcnet.errors import InputError
from rwcnet.model import ModelConfig, ModelMetadata, RWCNet, StageConfig, load_model, save_model
from rwcnet.model.files import average_models


def tiny_model(**overrides) -> ModelConfig:
    stage = dict(downsample=2, iterations=2, radius=1, feature_channels=4, encoder_width=4, hidden_channels=6,
                 context_channels=4, motion_channels=12, head_channels=8, flow_kernel=3, halo=4)
    return ModelConfig(**({"stages": [StageConfig(**stage)], "final_upsampling": "convex", "dropout": 0.0} | overrides))


def smooth_image(shape, seed: int) -> torch.Tensor:
    noise = torch.rand(1, 1, *[n // 4 for n in shape], generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(noise, size=shape, mode="trilinear", align_corners=False)


def _two_models(tmp_path, **metadata_b):
    """Two files of one tiny config with different seeded weights (a, b) and their state dicts."""
    paths, states = [], []
    for seed, extra in ((0, {}), (1, metadata_b)):
        torch.manual_seed(seed)
        model = RWCNet(tiny_model())
        for parameter in model.parameters():  # the flow heads start at zero; make every parameter differ
            parameter.data.add_(0.01 * torch.randn_like(parameter))
        path = tmp_path / f"m{seed}.pt"
        metadata = {"spacing_mm": (1.0, 1.0, 1.0), "training": {"training_preset": "p", "steps": 10 * (seed + 1)}}
        save_model(path, model, ModelMetadata(**(metadata | extra)))
        paths.append(path)
        states.append(model.state_dict())
    return paths, states


def test_the_average_is_the_weighted_mean_of_every_parameter_and_records_its_inputs(tmp_path):
    paths, (a, b) = _two_models(tmp_path)
    model, metadata = average_models(paths, [1.0, 3.0])  # normalised: 0.25, 0.75
    averaged = model.state_dict()
    for name, tensor in a.items():
        expected = 0.25 * tensor + 0.75 * b[name] if tensor.is_floating_point() else tensor
        torch.testing.assert_close(averaged[name], expected, rtol=0, atol=1e-7)
    assert metadata.spacing_mm == (1.0, 1.0, 1.0) and metadata.training["training_preset"] == "p"
    assert "steps" not in metadata.training  # the inputs disagree, so only their own records keep it
    assert [(e["file"], e["weight"], e["steps"]) for e in metadata.training["average_of"]] == [
        (str(paths[0]), 0.25, 10), (str(paths[1]), 0.75, 20)]


def test_averaging_a_model_with_itself_gives_the_same_network(tmp_path):
    paths, _ = _two_models(tmp_path)
    model, _ = average_models([paths[0], paths[0]])
    original, _ = load_model(paths[0])
    x, y = smooth_image((16, 16, 16), 1), smooth_image((16, 16, 16), 2)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, y).field, original(x, y).field)


def test_models_that_cannot_be_averaged_are_refused_naming_the_file(tmp_path):
    paths, _ = _two_models(tmp_path, modality="ct")
    with pytest.raises(InputError, match="m1.pt.*modality"):
        average_models(paths)
    other = tmp_path / "wide.pt"
    save_model(other, RWCNet(tiny_model(final_upsampling="trilinear")))
    with pytest.raises(InputError, match="wide.pt.*network config"):
        average_models([paths[0], other])
    with pytest.raises(InputError, match="at least two"):
        average_models([paths[0]])
    with pytest.raises(InputError, match="positive weight"):
        average_models(paths, [1.0, 0.0])


def test_the_command_writes_the_average_and_refuses_bad_input_without_output(tmp_path, monkeypatch, capsys):
    paths, (a, b) = _two_models(tmp_path)
    output = tmp_path / "soup.pt"
    code, out, _ = run(monkeypatch, capsys, "average-models", *paths, "--output", output)
    assert code == 0 and "0.500" in out
    model, metadata = load_model(output)
    name = next(iter(a))
    torch.testing.assert_close(model.state_dict()[name], 0.5 * a[name] + 0.5 * b[name], rtol=0, atol=1e-7)
    assert len(metadata.training["average_of"]) == 2
    missing = tmp_path / "missing.pt"
    code, _, err = run(monkeypatch, capsys, "average-models", paths[0], missing, "--output", tmp_path / "no.pt")
    assert code == 2 and "missing.pt" in err and not (tmp_path / "no.pt").exists()
    code, _, err = run(monkeypatch, capsys, "average-models", *paths, "--weight", "1", "--output", tmp_path / "no.pt")
    assert code == 2 and "one positive weight" in err and not (tmp_path / "no.pt").exists()
