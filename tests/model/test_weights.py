"""The shipped ``brain`` weights: present in the package, loadable, and better than zero on a known deformation."""

import numpy as np
import pytest
import torch

from rwcnet import geometry
from rwcnet.model import load_model
from rwcnet.model.files import build_model
from rwcnet.pipeline.network import shipped_model_path
from rwcnet.synthetic import breathing_deformation, random_deformation


def test_shipped_brain_weights_carry_their_training_metadata():
    path = shipped_model_path("brain")
    assert path is not None and path.with_suffix(".md").is_file()
    model, metadata = load_model(path)
    assert model.config.name == "cpu"
    assert metadata.orientation == "LIA" and metadata.spacing_mm == (1.0, 1.0, 1.0)
    assert metadata.training["training_preset"] == "distill-brain-joint" and metadata.modality == "mr"
    assert [entry["weight"] for entry in metadata.training["average_of"]] == [0.5, 0.5]  # the two joint runs, averaged
    images = metadata.training["training_images"]
    assert "BRAIN_0001_0000" not in images and "BRAIN_0002_0000" not in images


def _synthetic_pair(shape=(64, 64, 64)):
    """A smooth random image, a known smooth deformation ``truth`` (4 mm, 12 mm smooth) and the moving image it maps."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 1, 8, 8, 8, generator=generator)
    fixed = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)
    fixed = (fixed - fixed.min()) / (fixed.max() - fixed.min())
    truth = random_deformation(shape, (1.0, 1.0, 1.0), magnitude_mm=4.0, smoothness_mm=12.0, seed=1)
    moving = geometry.warp(fixed, geometry.invert_field(truth).field)  # so that warp(moving, truth) = fixed
    return fixed, moving, truth


def _endpoint_error(model, fixed, moving, truth) -> float:
    inner = (slice(None), slice(None), *(slice(8, -8),) * 3)
    model.eval()
    with torch.no_grad():
        field = model(fixed, moving).field
    return float((field - truth)[inner].norm(dim=1).mean())


def test_shipped_brain_weights_recover_most_of_a_known_smooth_deformation():
    model, _ = load_model(shipped_model_path("brain"))
    fixed, moving, truth = _synthetic_pair()
    before = float(truth[:, :, 8:-8, 8:-8, 8:-8].norm(dim=1).mean())
    assert _endpoint_error(model, fixed, moving, truth) < 0.75 * before  # measured: 0.68 against 1.61


def _errors_of_shipped_and_untrained_brain_networks() -> tuple[float, float]:
    """Endpoint errors (voxels) on :func:`_synthetic_pair` of ``brain.pt`` and of an untrained network of its config (seed 0)."""
    model, _ = load_model(shipped_model_path("brain"))
    torch.manual_seed(0)
    untrained = build_model(model.config)
    fixed, moving, truth = _synthetic_pair()
    return _endpoint_error(model, fixed, moving, truth), _endpoint_error(untrained, fixed, moving, truth)


def test_shipped_brain_weights_beat_an_untrained_network_of_the_same_config():
    """Measured: 0.682 against the untrained network's 0.915 (0.75x). Earlier models: distill-brain-joint 0.744
    (0.81x), distill-brain 0.96, cpu-brain 0.95; the joint-semi candidate alone 0.634 (0.69x)."""
    trained, untrained = _errors_of_shipped_and_untrained_brain_networks()
    assert trained <= 0.8 * untrained


@pytest.mark.xfail(strict=True, reason="issue 18's stricter target, missed: the shipped brain.pt is 0.75x an untrained "
                                       "network on this pair; strict, so a model that passes turns this marker into a "
                                       "failure to remove")
def test_shipped_brain_weights_beat_an_untrained_network_by_the_learning_target():
    trained, untrained = _errors_of_shipped_and_untrained_brain_networks()
    assert trained <= 0.6 * untrained


def _breathing_pair(data):
    """A 96³ crop (1.5 mm) of the shared thorax CT, HU windowed to [0, 1] as ``register`` does (−1000…600), a known
    breathing-like field of 12 mm (array axis 2 towards the feet, as the CT is LPI) and the moving image it maps."""
    import nibabel as nib

    hu = nib.load(str(data / "lung" / "imagesTr" / "LUNG_0001_0000.nii.gz")).get_fdata(dtype=np.float32)
    fixed = ((torch.from_numpy(hu[48:144, 48:144, 60:156].copy()) + 1000.0) / 1600.0).clamp(0, 1)[None, None]
    truth = breathing_deformation(tuple(fixed.shape[2:]), (1.5, 1.5, 1.5), amplitude_mm=12.0, axis=2, towards="+", seed=3)
    moving = geometry.warp(fixed, geometry.invert_field(truth).field)  # so that warp(moving, truth) = fixed
    return fixed, moving, truth


def test_shipped_lung_weights_are_ct_and_beat_an_untrained_network_on_breathing_motion(shared_data):
    """Measured: endpoint error 0.49 voxels against the untrained network's 1.03 (4.09 before registration).
    On a toy thorax phantom instead of the real CT it is worse than untrained (1.00 against 0.72): it learned one CT."""
    path = shipped_model_path("lung")
    assert path is not None and path.with_suffix(".md").is_file()
    model, metadata = load_model(path)
    assert metadata.modality == "ct" and metadata.training["training_preset"] == "cpu-lung"
    torch.manual_seed(0)
    untrained = build_model(model.config)
    fixed, moving, truth = _breathing_pair(shared_data)
    assert _endpoint_error(model, fixed, moving, truth) <= 0.6 * _endpoint_error(untrained, fixed, moving, truth)
