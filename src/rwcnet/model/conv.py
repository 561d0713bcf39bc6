"""``Conv3d`` with faster CPU paths for the 1-D and pointwise kernels of the ``cpu`` preset.

torch runs ``k×1×1`` 3D convolutions (and their backward) on its generic
``slow_conv3d`` path: with one thread about 3× slower than the equivalent 2D
convolution on a reshaped view, with two threads as fast (it parallelises
well). Wide ``1×1×1`` convolutions (343 correlation channels in) are about
2× slower than a matrix product either way. Measured forward + backward at
40×48×56 by ``benchmarks/fast_conv.py``.
:class:`FastConv3d` keeps ``nn.Conv3d``'s parameters (state dicts and model
files are unchanged) and picks the equivalent cheap form in ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FastConv3d(nn.Conv3d):
    """A stride-1, "same"-padded ``nn.Conv3d`` on ``(B, C, X, Y, Z)``; same result, faster kernels.

    * ``1×1×1``: one matrix product over the flattened volume;
    * ``k×1×1``: a 2D convolution with a ``k×1`` kernel on the view ``(B, C, X, Y·Z)``;
    * anything else (``1×k×1``, ``1×1×k`` and dense kernels already run on
      oneDNN): ``nn.Conv3d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int]) -> None:
        kernel = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        super().__init__(in_channels, out_channels, kernel, padding=tuple(k // 2 for k in kernel))
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"FastConv3d needs odd kernel sizes, got {kernel}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, nx, ny, nz = x.shape
        kx, ky, kz = self.kernel_size
        weight = self.weight
        if (kx, ky, kz) == (1, 1, 1):
            out = torch.matmul(weight.view(self.out_channels, c), x.reshape(b, c, -1))
            if self.bias is not None:
                out = out + self.bias.view(1, -1, 1)
            return out.view(b, self.out_channels, nx, ny, nz)
        if (ky, kz) == (1, 1):
            out = F.conv2d(x.reshape(b, c, nx, ny * nz), weight.view(self.out_channels, c, kx, 1), self.bias,
                           padding=(kx // 2, 0))
            return out.view(b, self.out_channels, nx, ny, nz)
        return super().forward(x)
