"""The affine pre-alignment inside ``register``: on by default, composed into the field, --init, --affine-only."""

from __future__ import annotations

import numpy as np
import pytest

from cli_runner import run
from rwcnet.affine import affine_field, write_itk_transform
from rwcnet.affine.transforms import foreground_points, transform_points
from rwcnet.data.formats import read_field, write_image
from rwcnet.register import register
from test_affine import _moved, _random_rigid, template  # noqa: F401  (the 48^3 MNI fixture)


def _field_errors(field: np.ndarray, fixed, truth: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Distance (mm) between where the Learn2Reg field and the true affine send fixed points ``(N, 3)`` (RAS mm)."""
    inverse = np.linalg.inv(fixed.affine)
    voxels = np.rint(transform_points(inverse, points_mm)).astype(int)
    reached = voxels + field[voxels[:, 0], voxels[:, 1], voxels[:, 2]]
    return np.linalg.norm(transform_points(fixed.affine, reached) - transform_points(truth, transform_points(
        fixed.affine, voxels)), axis=1)


def test_the_default_pre_alignment_is_composed_into_the_field(template):  # noqa: F811
    points = foreground_points(template, 0.1, step=2)
    truth = _random_rigid(4, points.mean(0), degrees=15.0, shift_mm=12.0)
    moving = _moved(template, truth, pad=8)
    options = dict(model=None, refine=False, device="cpu")
    alone = register(template, moving, io_iterations=0, **options)  # the affine step alone, composed
    assert alone.affine is not None and "affine" in alone.seconds
    assert _field_errors(alone.field, template, truth, points).mean() < 1.0
    aligned = register(template, moving, io_iterations=10, **options)
    plain = register(template, moving, io_iterations=10, affine=False, **options)
    assert plain.affine is None
    with_affine = _field_errors(aligned.field, template, truth, points)
    without = _field_errors(plain.field, template, truth, points)
    assert with_affine.mean() < 0.6 * without.mean(), (with_affine.mean(), without.mean())
    inside = template.array > 0.1
    correlations = [np.corrcoef(result.warped[inside], template.array[inside])[0, 1] for result in (aligned, plain)]
    assert correlations[0] > max(0.9, correlations[1] + 0.05), correlations


def test_an_init_file_is_applied_as_it_is_without_the_search(template, tmp_path):  # noqa: F811
    truth = _random_rigid(5, foreground_points(template, 0.1).mean(0), degrees=10.0, shift_mm=8.0)
    write_itk_transform(tmp_path / "init.txt", truth)
    result = register(template, _moved(template, truth, pad=4), affine=False, init=tmp_path / "init.txt",
                      affine_only=True, model=None, device="cpu")
    np.testing.assert_allclose(result.affine, truth, atol=1e-9)
    np.testing.assert_allclose(result.field, affine_field(truth, template), atol=1e-3)


def test_an_fsl_matrix_or_nothing_to_do_exits_2_without_output(template, tmp_path, monkeypatch, capsys):  # noqa: F811
    write_image(tmp_path / "f.nii.gz", template.array, template)
    (tmp_path / "flirt.mat").write_text("1 0 0 2\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    base = ["register", "--fixed", tmp_path / "f.nii.gz", "--moving", tmp_path / "f.nii.gz", "-o",
            tmp_path / "d.nii.gz", "--model", "none"]
    for extra, message in ((["--init", tmp_path / "flirt.mat"], "FSL"),
                           (["--no-affine", "--affine-only"], "--affine-only needs"),
                           (["--transform", "similarity"], "unknown linear transform")):
        code, _, stderr = run(monkeypatch, capsys, *base, *extra)
        assert code == 2 and message in stderr, stderr
        assert not (tmp_path / "d.nii.gz").exists()
    code, _, stderr = run(monkeypatch, capsys, *base, "--affine-only", "--affine-metric", "ncc")
    assert code == 0, stderr
    np.testing.assert_allclose(read_field(tmp_path / "d.nii.gz"), 0.0, atol=0.3)  # an image onto itself
