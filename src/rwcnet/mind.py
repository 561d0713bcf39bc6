"""MIND-SSC: the modality-independent self-similarity context descriptor (Heinrich et al., MICCAI 2013).

For every voxel ``x`` and each of the 12 pairs ``(a, b)`` of six-neighbourhood
offsets at right angles (``a, b`` in ``{±e_0, ±e_1, ±e_2}``, ``a ⟂ b``), the
squared difference ``(I(x + d·a) − I(x + d·b))²`` (``d`` = dilation, outside
voxels repeat the border) is averaged over a ``(2r+1)³`` box (``r`` = radius,
border repeated). Per voxel the minimum over the 12 channels is subtracted,
the result is divided by its mean over the channels (that variance is
clamped to ``[0.001, 1000] ×`` its mean over the volume), and ``exp(−·)``
maps it into ``(0, 1]``. The descriptor does not change under
``I → αI + β`` (``α > 0``), which makes it a good target for instance
optimisation across contrasts.

Also here: :func:`fill_outside_mask`, the masking that ConvexAdam applies
before MIND. The box means are :func:`rwcnet.geometry.filters.box_filter`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from rwcnet.geometry import identity_grid, sample
from rwcnet.geometry.filters import box_filter

Tensor = torch.Tensor

#: The six-neighbourhood offsets in array order.
SIX_NEIGHBOURHOOD = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))

#: The 12 channel pairs: indices into :data:`SIX_NEIGHBOURHOOD` of offsets at right angles.
MIND_PAIRS = tuple(
    (i, j)
    for i in range(6)
    for j in range(i + 1, 6)
    if sum(a * b for a, b in zip(SIX_NEIGHBOURHOOD[i], SIX_NEIGHBOURHOOD[j])) == 0
)


def _shifted(volume: Tensor, offset: tuple[int, int, int], pad: int) -> Tensor:
    """``volume(x + offset)`` for a ``(B, C, X, Y, Z)`` volume already replicate-padded by ``pad`` voxels."""
    x, y, z = (n - 2 * pad for n in volume.shape[2:])
    o0, o1, o2 = (pad + o for o in offset)
    return volume[:, :, o0 : o0 + x, o1 : o1 + y, o2 : o2 + z]


def mind_ssc(image: Tensor, radius: int = 1, dilation: int = 2, *, eps: float = 1e-12) -> Tensor:
    """MIND-SSC features of ``image`` ``(B, 1, X, Y, Z)``: ``(B, 12, X, Y, Z)`` in ``(0, 1]``, float32 or the input's float dtype.

    ``radius`` is the half-width of the patch box, ``dilation`` the distance
    (voxels) of the six neighbours from the centre. A constant image gives
    all-ones features (``eps`` keeps the variance positive).
    """
    if image.dim() != 5 or image.shape[1] != 1:
        raise ValueError(f"mind_ssc expects a (B, 1, X, Y, Z) volume, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        image = image.float()
    padded = F.pad(image, (dilation,) * 6, mode="replicate")
    neighbours = [_shifted(padded, tuple(dilation * o for o in offset), dilation) for offset in SIX_NEIGHBOURHOOD]
    differentiable = torch.is_grad_enabled() and image.requires_grad
    if differentiable:
        distances = torch.cat([neighbours[i] - neighbours[j] for i, j in MIND_PAIRS], dim=1).square()
    else:  # into one tensor: no list of 12 temporaries to concatenate (330 MB less at 160×192×224)
        distances = image.new_empty(image.shape[0], len(MIND_PAIRS), *image.shape[2:])
        for channel, (i, j) in enumerate(MIND_PAIRS):
            torch.sub(neighbours[i], neighbours[j], out=distances[:, channel : channel + 1])
        distances.square_()
    distances = box_filter(distances, radius, border="replicate")
    minimum = distances.min(dim=1, keepdim=True).values
    distances = distances - minimum if differentiable else distances.sub_(minimum)
    variance = distances.mean(dim=1, keepdim=True)
    global_mean = variance.mean(dim=(1, 2, 3, 4), keepdim=True)
    low = (global_mean * 0.001).clamp_min(eps)
    variance = torch.maximum(torch.minimum(variance, global_mean * 1000.0), low)
    if differentiable:
        return torch.exp(-distances / variance)
    return distances.div_(variance).neg_().exp_()


def fill_outside_mask(image: Tensor, mask: Tensor) -> Tensor:
    """Replace ``image`` ``(1, 1, X, Y, Z)`` outside ``mask`` (same shape, nonzero = inside) by the nearest inside value.

    As ConvexAdam does before MIND: the mask is eroded (voxels whose 3³
    neighbourhood is at least 90 % inside, border repeated); on every second
    voxel, each outside voxel takes the value of the nearest eroded-inside
    one; that half-resolution map is interpolated trilinearly back to full
    resolution, and voxels inside the eroded mask keep their own value.
    This removes the strong mask-boundary edge from the descriptor.
    """
    if image.shape != mask.shape or image.dim() != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"fill_outside_mask expects two (1, 1, X, Y, Z) volumes, got {tuple(image.shape)} and {tuple(mask.shape)}")
    inside = box_filter((mask != 0).to(image.dtype), 1, border="replicate") > 0.9
    if not bool(inside.any()):
        return image
    coarse_inside = inside[0, 0, ::2, ::2, ::2].cpu().numpy()
    _, nearest = distance_transform_edt(~coarse_inside, return_indices=True)
    coarse = image[0, 0, ::2, ::2, ::2]
    index = torch.from_numpy(np.ascontiguousarray(nearest)).to(image.device)
    filled = coarse[index[0], index[1], index[2]][None, None]
    coords = identity_grid(image.shape[2:], device=image.device, dtype=image.dtype) / 2.0
    upsampled = sample(filled, coords)
    return torch.where(inside, image, upsampled)
