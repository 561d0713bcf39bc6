"""Feature and context encoders (paper Figure 2, left).

Both are small 3D residual encoder-decoders with GroupNorm and ReLU that keep
the input resolution: one stride-2 level, so inputs of any size work (the
decoder is resized to the skip connection's size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int) -> int:
    for groups in (8, 4, 2):
        if channels % groups == 0 and channels // groups >= 2:
            return groups
    return 1


class ResidualBlock(nn.Module):
    """Two 3^3 convolutions with GroupNorm and ReLU, plus a (projected) identity path."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.skip = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Conv3d(in_channels, out_channels, 1, stride=stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.skip(x))


class Encoder(nn.Module):
    """Residual encoder-decoder: ``(B, in, X, Y, Z)`` -> ``(B, out, X, Y, Z)`` at the input resolution."""

    def __init__(self, in_channels: int, out_channels: int, width: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1), nn.GroupNorm(_groups(width), width), nn.ReLU()
        )
        self.level1 = ResidualBlock(width, width)
        self.down = ResidualBlock(width, 2 * width, stride=2)
        self.level2 = ResidualBlock(2 * width, 2 * width)
        self.fuse = ResidualBlock(3 * width, width)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Conv3d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.level1(self.stem(x))
        coarse = self.level2(self.down(skip))
        coarse = F.interpolate(coarse, size=skip.shape[2:], mode="trilinear", align_corners=False)
        y = self.fuse(torch.cat([skip, coarse], dim=1))
        return self.head(self.dropout(y))


class FeatureEncoder(Encoder):
    """Image ``(B, 1, X, Y, Z)`` -> features ``(B, C, X, Y, Z)``; shared by fixed and moving (dropout as the paper)."""

    def __init__(self, channels: int, width: int, dropout: float) -> None:
        super().__init__(1, channels, width, dropout)


class ContextEncoder(nn.Module):
    """Moving image and current flow -> initial hidden state ``tanh`` and context features ``ReLU``.

    Input ``(B, 4, X, Y, Z)`` (warped moving image and the flow in voxels of the
    stage grid). With ``context_channels == 0`` (the reference design) only the
    hidden state is produced and the context is empty.
    """

    def __init__(self, hidden_channels: int, context_channels: int, width: int) -> None:
        super().__init__()
        self.hidden_channels = hidden_channels
        self.encoder = Encoder(4, hidden_channels + context_channels, width)

    def forward(self, moving: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(torch.cat([moving, flow], dim=1))
        hidden, context = out.split([self.hidden_channels, out.shape[1] - self.hidden_channels], dim=1)
        return torch.tanh(hidden), F.relu(context)
