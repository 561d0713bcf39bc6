"""The update block (paper Figure 2, right): motion encoder, 3D ConvGRU, flow head, convex upsampler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rwcnet.model.conv import FastConv3d


class MotionEncoder(nn.Module):
    """Correlation (or concatenated features) and the current flow -> motion features.

    ``cost`` is ``(B, K, X, Y, Z)``, ``flow`` ``(B, 3, X, Y, Z)`` in voxels of the
    stage grid; the output ``(B, channels, X, Y, Z)`` ends with the flow itself.
    """

    def __init__(self, cost_channels: int, channels: int, flow_kernel: int, out_kernel: int = 3) -> None:
        super().__init__()
        cost_mid, cost_out = channels, (3 * channels) // 4
        flow_mid, flow_out = channels // 2, channels // 4
        self.cost = nn.Sequential(
            FastConv3d(cost_channels, cost_mid, 1), nn.ReLU(), nn.Conv3d(cost_mid, cost_out, 3, padding=1), nn.ReLU()
        )
        self.flow = nn.Sequential(
            nn.Conv3d(3, flow_mid, flow_kernel, padding=flow_kernel // 2),
            nn.ReLU(),
            nn.Conv3d(flow_mid, flow_out, 3, padding=1),
            nn.ReLU(),
        )
        self.out = nn.Sequential(
            FastConv3d(cost_out + flow_out, channels - 3, out_kernel), nn.ReLU()
        )

    def forward(self, cost: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        motion = self.out(torch.cat([self.cost(cost), self.flow(flow)], dim=1))
        return torch.cat([motion, flow], dim=1)


class ConvGRU(nn.Module):
    """3D convolutional GRU cell with kernel ``kernel`` (a 3-tuple, so 1-D passes are possible).

    ``z = σ(W_z [h, x])``, ``r = σ(W_r [h, x])``, ``q = tanh(W_q [r ⊙ h, x])``,
    ``h' = (1 − z) ⊙ h + z ⊙ q``.
    """

    def __init__(self, hidden: int, inputs: int, kernel: tuple[int, int, int]) -> None:
        super().__init__()
        self.hidden = hidden
        self.gates = FastConv3d(hidden + inputs, 2 * hidden, kernel)
        self.candidate = FastConv3d(hidden + inputs, hidden, kernel)

    def update_and_reset(self, hx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The update gate ``z`` and the reset gate ``r`` of ``[h, x]``."""
        z, r = torch.sigmoid(self.gates(hx)).split(self.hidden, dim=1)
        return z, r

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z, r = self.update_and_reset(torch.cat([h, x], dim=1))
        q = torch.tanh(self.candidate(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q


class ReferenceConvGRU(ConvGRU):
    """The reference code's cell: the reset gate reuses the update gate (``r = z``); same weights as :class:`ConvGRU`."""

    def update_and_reset(self, hx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, _ = super().update_and_reset(hx)
        return z, z


class UpdateGRU(nn.Module):
    """Dense ``k^3`` ConvGRU, or the separable variant: three GRU passes with ``k×1×1``, ``1×k×1``, ``1×1×k``."""

    def __init__(self, hidden: int, inputs: int, kernel: int, separable: bool, cell: type[ConvGRU] = ConvGRU) -> None:
        super().__init__()
        if separable:
            kernels = [(kernel, 1, 1), (1, kernel, 1), (1, 1, kernel)]
        else:
            kernels = [(kernel, kernel, kernel)]
        self.cells = nn.ModuleList(cell(hidden, inputs, k) for k in kernels)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for cell in self.cells:
            h = cell(h, x)
        return h


class FlowHead(nn.Module):
    """Hidden state -> flow update ``Δu`` ``(B, 3, X, Y, Z)`` in voxels of the stage grid."""

    def __init__(self, hidden: int, channels: int, init_scale: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(hidden, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, 3, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight.mul_(init_scale)
            self.conv2.bias.mul_(init_scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.leaky_relu(self.conv1(h), 0.1))


class ConvexUpsampler(nn.Module):
    """Learned convex upsampling of a field by an integer ``factor`` (RAFT's upsampling, in 3D).

    A mask predicted from the hidden state gives, for each of the ``factor^3``
    fine voxels inside a coarse voxel, softmax weights over the 27 coarse
    neighbours. Values are multiplied by ``factor`` (voxels of the finer grid).
    """

    #: Size of the mask weights computed at once (bytes); see :meth:`forward`.
    slab_bytes = 128 * 2**20

    def __init__(self, hidden: int, channels: int, factor: int) -> None:
        super().__init__()
        self.factor = factor
        self.mask = nn.Sequential(
            nn.Conv3d(hidden, channels, 3, padding=1), nn.ReLU(), nn.Conv3d(channels, 27 * factor**3, 1)
        )

    def forward(self, field: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """``field`` (B, 3, X, Y, Z) in coarse voxels, ``hidden`` (B, H, X, Y, Z) -> (B, 3, sX, sY, sZ) in fine voxels.

        The mask's last (1×1) layer and the softmax run on slabs of about :attr:`slab_bytes`
        along X, so the ``27 * factor^3`` weight channels never exist for the whole volume
        at once (743 MB at 80×96×112 for ``factor`` 2); the result is the same.
        """
        b, c, x, y, z = field.shape
        s = self.factor
        conv, relu, last = self.mask
        features = relu(conv(hidden))
        padded = F.pad(field * s, (1, 1, 1, 1, 1, 1), mode="replicate")
        planes = max(1, self.slab_bytes // (b * 27 * s**3 * y * z * field.element_size()))
        slabs = []
        for x0 in range(0, x, planes):
            n = min(planes, x - x0)
            logits = last(features[:, :, x0 : x0 + n]).mul_(0.25).view(b, 1, 27, s, s, s, n, y, z)
            weights = torch.softmax(logits, dim=2)
            fine = field.new_zeros(b, c, s, s, s, n, y, z)
            for m, (i, j, k) in enumerate((i, j, k) for i in range(3) for j in range(3) for k in range(3)):
                neighbour = padded[:, :, x0 + i : x0 + i + n, j : j + y, k : k + z].view(b, c, 1, 1, 1, n, y, z)
                fine.addcmul_(weights[:, :, m], neighbour)  # in place: one pass instead of a product and a sum
            slabs.append(fine.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, n * s, y * s, z * s))
        return slabs[0] if len(slabs) == 1 else torch.cat(slabs, dim=2)
