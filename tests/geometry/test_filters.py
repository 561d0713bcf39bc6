"""Separable filters (rwcnet.geometry.filters) against scipy.ndimage, average pooling and brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d, uniform_filter

from rwcnet.geometry.filters import (
    SeparableFilter, apply_axis_matrices, box_filter, box_half_kernel, filter_matrix, gaussian_half_kernel, running_box_mean,
    separable_filter,
)

SCIPY_MODE = {"zeros": "constant", "replicate": "nearest"}


def _volume(shape=(2, 3, 9, 8, 11), seed=0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _scipy_filter(volume: np.ndarray, weights, border: str, axes=(2, 3, 4)) -> np.ndarray:
    """The filter by scipy: the full normalised kernel correlated along each axis; renormalised = zeros / zeros(ones)."""
    kernel = np.array(list(weights[:0:-1]) + list(weights), dtype=np.float64)
    kernel /= kernel.sum()
    mode = SCIPY_MODE.get(border, "constant")

    def run(array):
        for axis in axes:
            array = correlate1d(array, kernel, axis=axis, mode=mode, cval=0.0)
        return array

    result = run(volume.astype(np.float64))
    return result / run(np.ones_like(volume, dtype=np.float64)) if border == "renormalise" else result


@pytest.mark.parametrize("border", ["zeros", "renormalise", "replicate"])
@pytest.mark.parametrize("weights", [box_half_kernel(1), box_half_kernel(3), gaussian_half_kernel(1.5), [2.0, 1.0]])
def test_functional_and_buffered_filters_equal_scipy(border, weights):
    volume = _volume((1, 2, 9, 8, 11))
    expected = _scipy_filter(volume.numpy(), weights, border)
    np.testing.assert_allclose(separable_filter(volume, weights, border=border).numpy(), expected, atol=1e-12)
    buffered = SeparableFilter(weights, volume.shape[2:], 3, border=border, dtype=torch.float64)
    out = buffered(volume, torch.empty_like(volume))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("border", ["zeros", "renormalise", "replicate"])
@pytest.mark.parametrize("weights", [box_half_kernel(3), gaussian_half_kernel(1.5)])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_buffered_filter_in_slabs_gives_the_same_bits_as_in_one_piece(border, weights, rows, monkeypatch):
    """Slabs of a few rows (kernel radius 3 and 5 reaching past a slab, and past the volume's 9 rows) change nothing."""
    volume = _volume((1, 2, 9, 8, 11)).float()
    whole = SeparableFilter(weights, volume.shape[2:], 2, border=border)
    assert whole.rows == 9
    monkeypatch.setattr(SeparableFilter, "SLAB_BYTES", rows * 2 * 8 * 11 * 4)
    slabbed = SeparableFilter(weights, volume.shape[2:], 2, border=border)
    assert slabbed.rows == rows
    expected = whole(volume, torch.empty_like(volume))
    assert torch.equal(slabbed(volume, torch.empty_like(volume)), expected)
    np.testing.assert_allclose(expected.numpy(), _scipy_filter(volume.double().numpy(), weights, border), atol=1e-6)


@pytest.mark.parametrize("border,mode", [("zeros", "constant"), ("replicate", "nearest")])
def test_box_equals_scipy_uniform_filter(border, mode):
    volume = np.random.default_rng(2).random((9, 8, 7)).astype(np.float32)
    got = box_filter(torch.from_numpy(volume)[None, None], 1, border=border)[0, 0].numpy()
    np.testing.assert_allclose(got, uniform_filter(volume, size=3, mode=mode, cval=0.0), atol=1e-6)


@pytest.mark.parametrize("width", [3, 7])
def test_renormalised_box_equals_average_pool_without_padding(width):
    volume = _volume()
    expected = torch.nn.functional.avg_pool3d(volume, width, 1, width // 2, count_include_pad=False)
    torch.testing.assert_close(box_filter(volume, width // 2, border="renormalise"), expected)
    torch.testing.assert_close(running_box_mean(volume, width // 2), expected)


def test_zero_bordered_box_equals_average_pool_with_padding():
    volume = _volume()
    expected = torch.nn.functional.avg_pool3d(volume, 3, 1, 1, count_include_pad=True)
    torch.testing.assert_close(box_filter(volume, 1), expected)


def test_renormalised_box_on_axes_shorter_than_the_box_is_the_brute_force_mean():
    volume = _volume((1, 2, 4, 2, 5))
    got = box_filter(volume, 3, border="renormalise")
    torch.testing.assert_close(running_box_mean(volume, 3), got)
    expected = torch.empty_like(volume)
    for x in range(4):
        for y in range(2):
            for z in range(5):
                window = volume[..., max(0, x - 3) : x + 4, max(0, y - 3) : y + 4, max(0, z - 3) : z + 4]
                expected[..., x, y, z] = window.mean(dim=(2, 3, 4))
    torch.testing.assert_close(got, expected)


def test_other_axes_and_output_into_the_input():
    volume = _volume((7, 6, 5, 3))
    expected = uniform_filter(volume.numpy(), size=(3, 3, 3, 1), mode="constant")
    np.testing.assert_allclose(box_filter(volume, 1, dims=(0, 1, 2)).numpy(), expected, atol=1e-12)
    box_filter(volume, 1, dims=(0, 1, 2), out=volume)
    np.testing.assert_allclose(volume.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("border", ["zeros", "renormalise", "replicate"])
def test_gradient_is_the_exact_adjoint(border):
    volume = _volume((1, 2, 5, 4, 3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: separable_filter(v, gaussian_half_kernel(1.2), border=border), (volume,))
    assert torch.autograd.gradcheck(lambda v: box_filter(v, 4, border=border, dims=(2, 4)), (volume,))


@pytest.mark.parametrize("border", ["zeros", "renormalise", "replicate"])
def test_filter_matrix_applies_the_filter_along_an_axis(border):
    volume = _volume((1, 2, 6, 7, 8))
    weights = gaussian_half_kernel(1.0)
    matrices = [filter_matrix(n, weights, border=border, repeats=2, dtype=torch.float64) for n in volume.shape[2:]]
    expected = separable_filter(separable_filter(volume, weights, border=border), weights, border=border)
    torch.testing.assert_close(apply_axis_matrices(volume, matrices), expected)


def test_gaussian_half_kernel_and_bad_arguments():
    assert gaussian_half_kernel(0) == [1.0]
    kernel = gaussian_half_kernel(1.0)
    assert len(kernel) == 4 and kernel[0] == 1.0 and kernel[1] == pytest.approx(np.exp(-0.5))
    with pytest.raises(ValueError, match="border"):
        box_filter(_volume(), 1, border="wrap")
    with pytest.raises(ValueError, match="axes"):
        box_filter(_volume(), 1, dims=())
    volume = _volume()
    torch.testing.assert_close(box_filter(volume, 0), volume)
