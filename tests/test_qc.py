"""QC picture: a valid PNG for small synthetic cases (with metrics, with folds, with an oblique affine)."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import torch

from rwcnet.errors import InputError
from rwcnet.geometry import jacobian_determinant
from rwcnet.qc import _format_metrics, _orient, jacobian_slice, qc_figure

SHAPE = (24, 20, 16)
LIA = np.array([[-1.0, 0, 0, 12], [0, 0, 1.2, -8], [0, -0.8, 0, 10], [0, 0, 0, 1]])


def volumes(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fixed = rng.random(SHAPE).astype(np.float32)
    moving = np.roll(fixed, 2, axis=0)
    return fixed, moving, fixed.copy()


def folding_field() -> np.ndarray:
    """A field (X, Y, Z, 3) whose first component decreases steeply in one region: det <= 0 there."""
    field = np.zeros(SHAPE + (3,), np.float32)
    x = np.arange(SHAPE[0], dtype=np.float32)
    field[..., 0] = (-3.0 * np.exp(-((x - 12.0) ** 2) / 4.0) * (x - 12.0))[:, None, None]
    return field


def full_det(field: np.ndarray) -> np.ndarray:
    return jacobian_determinant(torch.from_numpy(np.moveaxis(field, 3, 0)[None].astype(np.float64)))[0].numpy()


def test_writes_a_png_with_metrics_in_the_title(tmp_path) -> None:
    fixed, moving, warped = volumes()
    field = np.zeros(SHAPE + (3,), np.float32)
    field[..., 0] = -2.0
    path = tmp_path / "qc.png"
    qc_figure(path, fixed, moving, warped, field, spacing=(1.0, 1.2, 2.5),
              title_metrics={"Dice": (0.51, 0.83), "TRE mm": 1.25, "SDlogJ": 0.0})
    picture = matplotlib.image.imread(str(path))
    assert picture.ndim == 3 and picture.shape[0] > 300 and picture.shape[1] > 1000 and picture.shape[2] in (3, 4)
    assert picture[..., :3].std() > 0.05  # something is drawn
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qc.png"]  # no temporary file left


def test_metrics_title_text() -> None:
    text = _format_metrics({"Dice": (0.51234, 0.83), "TRE mm": 1.25, "note": "IO only"})
    assert text == "Dice 0.5123 → 0.83   TRE mm 1.25   note IO only"


def test_folds_are_drawn_and_the_slice_jacobian_equals_the_volume_one(tmp_path) -> None:
    field = folding_field()
    det = full_det(field)
    assert (det <= 0).any()
    components = [field[..., c] for c in range(3)]
    for axis in range(3):
        for index in (0, 5, SHAPE[axis] - 1):
            np.testing.assert_allclose(jacobian_slice(components, axis, index), np.take(det, index, axis=axis),
                                       atol=1e-12)
    fixed, moving, warped = volumes(1)
    qc_figure(tmp_path / "folds.png", fixed, moving, warped, torch.from_numpy(np.moveaxis(field, 3, 0))[None],
              point=(12, 3, 4))
    assert matplotlib.image.imread(str(tmp_path / "folds.png")).shape[2] in (3, 4)


def test_anatomical_orientation_keeps_the_determinant_and_the_slice_point(tmp_path) -> None:
    rng = np.random.default_rng(5)
    field = (rng.normal(size=SHAPE + (3,)) * 0.4).astype(np.float32)
    field[..., 1] += np.linspace(0, 3, SHAPE[2])[None, None, :]  # a shear, so signs and axes matter
    det = full_det(field)
    fixed, moving, warped = volumes(2)
    point = (5, 7, 9)
    view = _orient([fixed, moving, warped], field, np.linalg.norm(LIA[:3, :3], axis=0), point, LIA)
    assert view.names == ("R", "A", "S")
    np.testing.assert_allclose(view.spacing, [1.0, 1.2, 0.8])  # i is R-L, j is S-I, k is A-P
    value = fixed[point]
    assert view.images[0][view.point] == value
    for axis in range(3):
        oriented = jacobian_slice(view.components, axis, view.point[axis])
        assert oriented[tuple(p for a, p in enumerate(view.point) if a != axis)] == pytest.approx(det[point],
                                                                                                   abs=1e-9)
    qc_figure(tmp_path / "lia.png", fixed, moving, warped, field, point=point, affine=LIA)
    assert matplotlib.image.imread(str(tmp_path / "lia.png")).ndim == 3


def test_refuses_other_formats_and_mismatched_shapes(tmp_path) -> None:
    fixed, moving, warped = volumes()
    field = np.zeros(SHAPE + (3,), np.float32)
    with pytest.raises(InputError, match="qc.jpg"):
        qc_figure(tmp_path / "qc.jpg", fixed, moving, warped, field)
    with pytest.raises(ValueError, match="moving image"):
        qc_figure(tmp_path / "qc.png", fixed, moving[:-1], warped, field)
    assert list(tmp_path.iterdir()) == []
