"""Resampling of images and label maps from one grid onto another through physical (RAS) space (scipy, numpy)."""

from __future__ import annotations

import numpy as np
import scipy.ndimage

from rwcnet.data.formats import Image


def same_grid(a: Image, b: Image, atol: float = 1e-4) -> bool:
    """Whether two images share size and voxel->RAS affine (to ``atol`` mm)."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=atol))


def resample_image(image: Image, reference: Image, order: int = 1) -> Image:
    """Resample ``image`` onto ``reference``'s grid through physical (RAS) space.

    Reference voxel ``y`` takes the value of ``image`` at voxel
    ``inv(A_image) @ A_reference @ y``. ``order=0`` (labels, masks) keeps the
    voxel type and takes the nearest voxel's value; points more than half a
    voxel outside the image get 0 (scipy's ``grid-constant``: a point 1e-12
    voxels outside, from rounding in the affine product, still takes the
    border voxel, where ``constant`` would give 0). ``order>=1`` (spline order,
    1 = linear) returns float32 (float64 for float64 input) and repeats the
    border outside, as :func:`rwcnet.geometry.warp` does.
    """
    matrix = np.linalg.inv(image.affine) @ reference.affine
    if order == 0:
        data = image.array.astype(np.uint8) if image.array.dtype == np.bool_ else image.array
        mode = "grid-constant"
    else:
        data = image.array.astype(np.float64 if image.array.dtype == np.float64 else np.float32, copy=False)
        mode = "nearest"
    resampled = scipy.ndimage.affine_transform(
        data, matrix[:3, :3], offset=matrix[:3, 3], output_shape=reference.shape, order=order, mode=mode, cval=0.0
    )
    return Image(resampled, reference.affine.copy(), None, reference.header)
