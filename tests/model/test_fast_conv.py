"""FastConv3d gives nn.Conv3d's result (forward and gradients) on every kernel shape it special-cases."""

import pytest
import torch
import torch.nn.functional as F

from rwcnet.model.conv import FastConv3d


@pytest.mark.parametrize("kernel", [(1, 1, 1), (3, 1, 1), (5, 1, 1), (1, 3, 1), (1, 1, 3), (3, 3, 3)])
def test_fast_conv_matches_conv3d(kernel):
    torch.manual_seed(0)
    conv = FastConv3d(5, 4, kernel).double()
    x = torch.randn(2, 5, 7, 6, 9, dtype=torch.float64, requires_grad=True)
    expected = F.conv3d(x, conv.weight, conv.bias, padding=tuple(k // 2 for k in kernel))
    got = conv(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (x, conv.weight, conv.bias), grad_out)
    have = torch.autograd.grad(got, (x, conv.weight, conv.bias), grad_out)
    for a, b in zip(have, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fast_conv_state_dict_is_conv3d():
    conv = FastConv3d(3, 2, (3, 1, 1))
    plain = torch.nn.Conv3d(3, 2, (3, 1, 1), padding=(1, 0, 0))
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 4, 5, 6)
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-5, atol=1e-6)


def test_fast_conv_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        FastConv3d(2, 2, (2, 1, 1))
