"""``register``'s transform outputs: Jacobian image, inverse, ITK forms, affine file and the JSON report."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from cli_runner import run
from rwcnet.data.formats import Image, read_field, read_image, write_image

SHAPE = (28, 26, 24)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("register_outputs")
    rng = np.random.default_rng(2)
    blocks = np.kron(rng.random((7, 7, 6)), np.ones((4, 4, 4)))[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    fixed_affine = np.diag([1.1, 1.0, 1.2, 1.0])
    moving_affine = np.diag([1.0, 1.1, 1.0, 1.0])
    moving_affine[:3, 3] = [1.5, -1.0, 0.5]
    write_image(folder / "fixed.nii.gz", blocks.astype(np.float32), Image(blocks, fixed_affine))
    moving = np.roll(blocks, (1, -1, 0), axis=(0, 1, 2))[:26, :25, :24]
    write_image(folder / "moving.nii.gz", moving.astype(np.float32), Image(moving, moving_affine))
    return folder


def test_the_extras_are_written_and_agree_with_independent_computations(pair, tmp_path, monkeypatch, capsys):
    outputs = {name: tmp_path / name for name in ("disp.nii.gz", "jac.nii.gz", "inv.nii.gz", "inv_itk.h5",
                                                  "all.h5", "affine.txt", "report.json", "qc.png", "qc_affine.png")}
    code, _, stderr = run(monkeypatch, capsys, "register", "--fixed", pair / "fixed.nii.gz", "--moving",
                          pair / "moving.nii.gz", "-o", outputs["disp.nii.gz"], "--model", "none", "--io-iters", "20",
                          "--refine-iters", "5x5x5", "--jacobian", outputs["jac.nii.gz"], "--inverse",
                          outputs["inv.nii.gz"], "--itk-inverse", outputs["inv_itk.h5"], "--itk-field",
                          outputs["all.h5"], "--affine-out", outputs["affine.txt"], "--report", outputs["report.json"],
                          "--qc", outputs["qc.png"])
    assert code == 0, stderr
    assert all(path.exists() for path in outputs.values())
    field = read_field(outputs["disp.nii.gz"]).astype(np.float64)
    # Jacobian: numpy's central differences (one-sided at the border) of x + u(x), on the whole grid
    gradients = np.stack([np.stack(np.gradient(field[..., c]), -1) for c in range(3)], -2) + np.eye(3)
    determinant = read_image(outputs["jac.nii.gz"])
    assert determinant.array.dtype == np.float32 and determinant.shape == SHAPE
    np.testing.assert_allclose(determinant.array, np.linalg.det(gradients), atol=1e-4)
    assert "SDlogJ" in stderr and "folded" in stderr and "inverse: |u(x) + v(x + u(x))| median" in stderr
    # the inverse lies on the moving grid
    moving = read_image(pair / "moving.nii.gz")
    inverse = nib.load(str(outputs["inv.nii.gz"]))
    assert inverse.shape == moving.shape + (3,)
    np.testing.assert_allclose(inverse.affine, moving.affine, atol=1e-5)
    assert sitk.ReadTransform(str(outputs["inv_itk.h5"])).GetName() == "CompositeTransform"
    report = json.loads(outputs["report.json"].read_text())
    assert report["versions"]["torch"] == torch.__version__
    digest = hashlib.sha256((pair / "moving.nii.gz").read_bytes()).hexdigest()
    assert report["inputs"]["moving"]["sha256"] == digest
    names = [step["name"] for step in report["steps"]]
    assert {"instance optimisation", "refinement", "jacobian", "inverse"} <= set(names)
    assert all(step["seconds"] >= 0 and step["peak_rss_mb"] > 0 for step in report["steps"])
    assert report["jacobian"]["min"] == pytest.approx(float(determinant.array.min()), abs=1e-4)
    assert report["inverse"]["fixed_median_vox"] < 0.1 and report["inverse"]["moving_median_vox"] < 0.1
    # the affine file is the report's affine, in ITK's LPS convention
    itk = np.array(report["affine"]["itk_lps_fixed_to_moving"])
    probe = np.array([3.0, -5.0, 7.0])
    np.testing.assert_allclose(sitk.ReadTransform(str(outputs["affine.txt"])).TransformPoint(tuple(probe)),
                               itk[:3, :3] @ probe + itk[:3, 3], atol=1e-6)
