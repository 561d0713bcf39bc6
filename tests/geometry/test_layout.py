"""Field layout conversion, padding to a multiple and shift tables, against numpy and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwcnet.geometry.layout import crop, field_array, field_tensor, integer_shifts, pad_to_multiple


def test_field_layouts_round_trip_and_match_numpy_indexing():
    field = np.random.default_rng(0).normal(size=(5, 4, 3, 3)).astype(np.float32)
    tensor = field_tensor(field)
    assert tensor.shape == (1, 3, 5, 4, 3) and tensor.dtype == torch.float32
    assert float(tensor[0, 2, 4, 1, 0]) == field[4, 1, 0, 2]
    np.testing.assert_array_equal(field_array(tensor), field)
    np.testing.assert_array_equal(field_array(tensor[0]), field)
    assert field_tensor(field, torch.float64).dtype == torch.float64
    with pytest.raises(ValueError):
        field_array(np.zeros((4, 4, 4, 2)))
    with pytest.raises(ValueError):
        field_array(torch.zeros(2, 3, 4, 4, 4))


@pytest.mark.parametrize("mode, numpy_mode", [("replicate", "edge"), ("zeros", "constant")])
def test_pad_to_multiple_pads_the_high_end_like_numpy_and_crop_undoes_it(mode, numpy_mode):
    volume = torch.arange(5 * 6 * 7, dtype=torch.float32).view(1, 1, 5, 6, 7)
    padded = pad_to_multiple(volume, 4, mode=mode)
    expected = np.pad(volume[0, 0].numpy(), [(0, 3), (0, 2), (0, 1)], mode=numpy_mode)
    np.testing.assert_array_equal(padded[0, 0].numpy(), expected)
    assert torch.equal(crop(padded, (5, 6, 7)), volume)
    assert pad_to_multiple(volume[..., :4, :4, :4], 4) .data_ptr() == volume[..., :4, :4, :4].data_ptr()


def test_integer_shifts_are_every_shift_once_first_axis_outermost():
    shifts = integer_shifts(2)
    assert len(shifts) == len(set(shifts)) == 125
    assert shifts == sorted(shifts) and shifts[0] == (-2, -2, -2) and shifts[-1] == (2, 2, 2)
