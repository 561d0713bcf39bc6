"""Distillation targets (``data.teacher``): cached fields, held-out pairs, exact augmented targets, a run that uses them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rwcnet import geometry
from rwcnet.data.datasets import Pair
from rwcnet.errors import InputError
from rwcnet.intensity import invert_contrast
from rwcnet.synthetic import random_deformation
from rwcnet.training import teacher as teacher_module
from rwcnet.training.config import TrainingConfig
from rwcnet.training.data import TrainingData
from rwcnet.training.data_config import SyntheticConfig, TeacherConfig
from rwcnet.training.loop import train
from rwcnet.training.log import read_log
from rwcnet.training.runtime import comparable
from rwcnet.training.teacher import TeacherFields, augment
from train_fixture import SHAPE, tiny_config, write_dataset


def _translation(shape, vector) -> np.ndarray:
    field = np.zeros((*shape, 3), dtype=np.float32)
    field[...] = vector
    return field


class _Counting:
    """A stand-in teacher: a constant translation per pair, counting its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, fixed: Path, moving: Path, seed: int) -> np.ndarray:
        self.calls.append((fixed.name, moving.name))
        return _translation(SHAPE, (0.5, -1.25, 2.0))


def test_teacher_fields_are_computed_once_cached_as_float16_and_refused_when_made_otherwise(tmp_path):
    compute = _Counting()
    pairs = [Pair(tmp_path / "A_0000.nii.gz", tmp_path / "B_0000.nii.gz"), Pair(tmp_path / "B_0000.nii.gz", tmp_path / "A_0000.nii.gz")]
    fields = TeacherFields(TeacherConfig(cache=str(tmp_path / "cache")), pairs[:1], pairs[1:], compute=compute)
    messages: list[str] = []
    fields.ensure(messages.append)
    assert len(compute.calls) == 2 and len(messages) == 2
    stored = np.load(fields.path(pairs[0]))
    assert stored.dtype == np.float16 and stored.shape == (*SHAPE, 3)
    field = fields.field(pairs[0])
    assert field.shape == (1, 3, *SHAPE) and field.dtype == torch.float32
    torch.testing.assert_close(field[0, :, 3, 4, 5], torch.tensor([0.5, -1.25, 2.0]))
    fields.ensure(messages.append)
    assert len(compute.calls) == 2  # nothing recomputed
    other = TeacherFields(TeacherConfig(cache=str(tmp_path / "cache"), seed=1), pairs[:1], [], compute=compute)
    with pytest.raises(InputError, match="A_0000__B_0000.json.*other settings"):
        other.field(pairs[0])
    meta = json.loads(fields.path(pairs[0]).with_suffix(".json").read_text())
    assert meta["seed"] == 0 and meta["moving"].endswith("B_0000.nii.gz")


def test_validation_pairs_are_held_out_in_both_directions_and_unknown_ids_are_refused(tmp_path):
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("A", "B", "C")}
    settings = TeacherConfig(validation=[("A", "C")])
    fields = TeacherFields.for_images(settings, list(paths), paths, tmp_path / "X.json")
    names = lambda pairs: {(p.fixed.stem.split(".")[0], p.moving.stem.split(".")[0]) for p in pairs}  # noqa: E731
    assert names(fields.training) == {("A", "B"), ("B", "A"), ("B", "C"), ("C", "B")}
    assert names(fields.validation) == {("A", "C")}
    with pytest.raises(InputError, match="X.json.*'D'"):
        TeacherFields.for_images(TeacherConfig(validation=[("A", "D")]), list(paths), paths, tmp_path / "X.json")


def test_an_extra_deformation_of_the_fixed_image_keeps_the_target_exact():
    """moving warped by the truth is the fixed image; after augmenting, the moving image warped by the new target
    is the new fixed image (an invariant, checked away from the border), and inversion leaves the target alone.

    The image is smooth and analytic, so two trilinear interpolations stay within 0.0035 of one; the wrong order of
    composition, ``truth(x) + e(x + truth(x))``, misses by 0.030 and the plain sum ``e + truth`` by 0.009."""
    shape = (40, 40, 40)
    x = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    moving = (torch.sin(x[0] / 10) * torch.cos(x[1] / 12) + torch.sin(x[2] / 14))[None, None] + 2.0
    truth = random_deformation(shape, (1.0,) * 3, magnitude_mm=2.0, smoothness_mm=12.0, seed=4)
    fixed = geometry.warp(moving, truth)
    settings = TeacherConfig(warp_fixed_mm=(3.0, 3.0), invert_moving=1.0)
    new_fixed, new_moving, new_truth = augment(fixed, moving, truth, (1.0, 1.0, 1.0), settings, np.random.default_rng(0),
                                               SyntheticConfig())
    inner = (slice(None), slice(None), *(slice(6, -6),) * 3)
    assert float((new_fixed - fixed)[inner].abs().max()) > 0.1  # the extra field moved the image
    torch.testing.assert_close(geometry.warp(moving, new_truth)[inner], new_fixed[inner], atol=5e-3, rtol=0)
    torch.testing.assert_close(new_moving, torch.from_numpy(invert_contrast(moving.numpy())))
    unchanged = augment(fixed, moving, truth, (1.0,) * 3, TeacherConfig(), np.random.default_rng(0), SyntheticConfig())
    assert unchanged[0] is fixed and unchanged[1] is moving and unchanged[2] is truth


@pytest.fixture
def teacher_dataset(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(teacher_module, "compute_teacher_field", _Counting())
    return write_dataset(tmp_path / "toy")


def _teacher_config(dataset: Path, cache: Path, **changes) -> dict:
    data = {"dataset": str(dataset), "real_fraction": 0.0,
            "synthetic": {"magnitude_mm": [1.0, 3.0], "smoothness_mm": [6.0, 10.0]},
            "teacher": {"fraction": 0.8, "validation": [["TOY_0003_0000", "TOY_0005_0000"]], "cache": str(cache),
                        "invert_moving": 0.5, "warp_fixed_mm": [0.0, 2.0], "warp_smoothness_mm": 8.0}}
    return tiny_config(dataset, data=data, supervised=1.0, validation={"pairs": 1, "every": 4, "metric": "teacher"},
                       **changes)


def test_a_training_run_learns_from_teacher_pairs_and_selects_on_the_held_out_ones(teacher_dataset, tmp_path):
    cache = tmp_path / "cache"
    config = TrainingConfig.model_validate(_teacher_config(teacher_dataset, cache))
    data = TrainingData(config, alignment=8)
    keys = [data.sample(0, config.phases[0], 4, i).key for i in range(30)]
    teacher_keys = {k for k in keys if k.startswith("teacher:")}
    assert teacher_keys and all("0003" not in k or "0005" not in k for k in teacher_keys)
    sample = next(data.sample(0, config.phases[0], 4, i) for i in range(30) if keys[i].startswith("teacher:"))
    assert sample.truth.shape == (1, 3, *SHAPE)
    validation = data.validation_teacher_samples()
    assert [s.key.endswith(":inverted") for s in validation] == [False, True]
    assert all(torch.equal(s.truth, validation[0].truth) for s in validation)
    for pair in data.teacher.pairs:  # the run below finds every field cached
        data.teacher.field(pair)
    output = tmp_path / "run"
    assert train(config, output, progress=False)["status"] == "finished"
    records = [r for r in read_log(output / "log.jsonl") if r["kind"] == "validation"]
    assert records and all(r["teacher_epe_before"] > 0 and np.isfinite(r["teacher_epe"]) for r in records)
    moved = TrainingConfig.model_validate(_teacher_config(teacher_dataset, tmp_path / "elsewhere"))
    assert comparable(moved) == comparable(config)  # a cache folder is a path: a resume may move it
    with pytest.raises(ValueError, match="metric: teacher needs data.teacher"):
        TrainingConfig.model_validate(tiny_config(teacher_dataset, validation={"pairs": 1, "metric": "teacher"}))
