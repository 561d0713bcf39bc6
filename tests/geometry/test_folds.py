"""Fold repair against the official (scipy) Jacobian: folds go, the field changes only near them."""

import numpy as np
import pytest
import torch

from rwcnet.evaluation.metrics import jacobian_det
from rwcnet.geometry import FOLD_THRESHOLD, jacobian_determinant, repair_folds
from rwcnet.geometry.layout import field_array


def _folding_field(shape=(48, 48, 48), centres=((24.0, 20.0, 30.0),), strength=2.5, width=3.0) -> torch.Tensor:
    """A pull along x towards each centre, ``u_x = -strength (x - x0) exp(-r^2 / 2 width^2)``: at the centre
    ``d u_x / dx = -strength``, so ``det = 1 - strength < 0`` there; smooth and tiny elsewhere."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    field = torch.zeros(1, 3, *shape)
    for centre in centres:
        offset = grid - torch.tensor(centre).view(3, 1, 1, 1)
        field[0, 0] -= strength * offset[0] * torch.exp(-offset.square().sum(0) / (2 * width**2))
    return field


def _official_folds(field: torch.Tensor) -> int:
    return int(np.count_nonzero(jacobian_det(field_array(field)) <= 0))


@pytest.mark.parametrize("centres, tile", [(((24.0, 20.0, 30.0),), 32),
                                           (((16.0, 16.0, 16.0), (31.5, 20.0, 33.0)), 16)])  # on tile corners too
def test_repair_removes_every_fold_of_the_official_count(centres, tile):
    field = _folding_field(centres=centres)
    assert _official_folds(field) > 20
    repaired, report = repair_folds(field, tile=tile)
    assert _official_folds(repaired) == 0
    assert report.folded_after == 0 and report.folded_before > 20 and report.passes > 0
    assert float(jacobian_determinant(repaired).min()) > FOLD_THRESHOLD


def test_repair_changes_the_field_only_near_the_fold_and_not_its_input():
    field = _folding_field()
    original = field.clone()
    repaired, _ = repair_folds(field)
    assert torch.equal(field, original)
    changed = (repaired - field).abs().amax(1)[0] > 0
    index = torch.nonzero(changed).float()
    assert index.shape[0] > 0
    # the pull reaches ~3 widths; everything changed lies within a few voxels of the folded core
    assert float((index - torch.tensor([24.0, 20.0, 30.0])).norm(dim=1).max()) < 10.0
    far = torch.ones_like(changed)
    far[12:37, 8:33, 18:43] = False
    assert not changed[far].any()


def test_a_field_without_folds_comes_back_as_it_is():
    field = _folding_field(strength=0.5)  # det >= 0.5 everywhere
    repaired, report = repair_folds(field)
    assert repaired is field and report.folded_before == 0 and report.passes == 0


def test_pass_limit_is_reported_as_folds_left():
    field = _folding_field(strength=6.0)
    _, report = repair_folds(field, max_passes=1)
    assert report.passes == 1 and 0 < report.folded_after


def test_rejects_a_batch_or_a_wrong_layout():
    with pytest.raises(ValueError, match="expected a field"):
        repair_folds(torch.zeros(2, 3, 8, 8, 8))
