"""An image pair prepared once for every method of a chain: on the fixed grid, normalised, with its masks.

The fixed image's grid is the working grid of the pipeline: the moving image
(and its mask) is resampled onto it once, through physical space, when it lies
elsewhere; the normalised tensors are made once, on first use, and shared by
all methods. The original moving image is kept for the output warp, which
samples it once (through physical space when it was off the fixed grid).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rwcnet import geometry
from rwcnet.errors import InputError
from rwcnet.geometry.grids import Grid, grid_difference, voxel_map
from rwcnet.geometry.resample import resample_image, same_grid
from rwcnet.data.formats import Image, read_image
from rwcnet.pipeline.instrument import Instrumentation

Tensor = torch.Tensor
Intensities = Callable[[np.ndarray], np.ndarray]


def volume_tensor(array: np.ndarray, device: torch.device) -> Tensor:
    """An ``(X, Y, Z)`` array as a float32 ``(1, 1, X, Y, Z)`` tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


@dataclass
class PreparedPair:
    """The pair every method sees. Images are ``(X, Y, Z)`` on the fixed grid; tensors ``(1, 1, X, Y, Z)``.

    ``intensities`` maps a raw image to the intensity range the methods work in: the modality's
    preset unless a method of the chain declares another (see :func:`rwcnet.pipeline.method.chain_intensities`).
    """

    fixed: Image
    moving: Image  # on the fixed grid
    original_moving: Image  # as given (another grid, possibly)
    fixed_mask: Image | None
    moving_mask: Image | None  # on the fixed grid
    modality: str
    device: torch.device
    intensities: Intensities
    original_moving_mask: Image | None = None  # as given, on the original moving image's grid
    affine: np.ndarray | None = None  # 4x4 fixed->moving RAS mm the moving side was pre-aligned by (see prealign)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.fixed.shape

    @cached_property
    def fixed_tensor(self) -> Tensor:
        """The normalised fixed image ``(1, 1, X, Y, Z)``."""
        return volume_tensor(self.intensities(self.fixed.array), self.device)

    @cached_property
    def moving_tensor(self) -> Tensor:
        """The normalised moving image on the fixed grid ``(1, 1, X, Y, Z)``."""
        return volume_tensor(self.intensities(self.moving.array), self.device)

    @cached_property
    def fixed_mask_tensor(self) -> Tensor | None:
        return None if self.fixed_mask is None else volume_tensor(self.fixed_mask.array > 0, self.device)

    @cached_property
    def moving_mask_tensor(self) -> Tensor | None:
        return None if self.moving_mask is None else volume_tensor(self.moving_mask.array > 0, self.device)

    def moving_through(self, init: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The normalised moving image and its mask sampled once through ``init`` (``(1, 3, X, Y, Z)`` fixed voxels).

        For methods that cannot start from a field: they register the fixed image to this and
        return ``geometry.compose(residual, init)``. ``init=None`` returns them as they are.
        """
        if init is None:
            return self.moving_tensor, self.moving_mask_tensor
        with torch.no_grad():
            mask = self.moving_mask_tensor
            warped_mask = None if mask is None else geometry.warp(mask, init, mode="nearest")
            return geometry.warp(self.moving_tensor, init), warped_mask

    def moving_source(self) -> tuple[Tensor, Tensor | None, np.ndarray | None]:
        """The normalised moving image and mask ``(1, 1, ...)`` on the grid they were given on, and the ``(3, 4)`` map
        from fixed-grid voxels to their voxels, pre-alignment included (:func:`rwcnet.geometry.grids.voxel_map`).

        The map is ``None`` when that grid is the fixed grid and nothing pre-aligned the pair: the tensors are then
        :attr:`moving_tensor` and :attr:`moving_mask_tensor`. A method that samples the moving image at full
        resolution uses this to interpolate it once, not a copy already resampled onto the fixed grid.
        """
        if self.affine is None and self.moving is self.original_moving:
            return self.moving_tensor, self.moving_mask_tensor, None
        mask = self.original_moving_mask
        return (volume_tensor(self.intensities(self.original_moving.array), self.device),
                None if mask is None else volume_tensor(mask.array > 0, self.device),
                voxel_map(self.fixed.affine, self.original_moving.affine, self.affine))

    def raw_moving_through(self, init: Tensor | None) -> Image:
        """The raw (not normalised) moving image on the fixed grid, sampled once through ``init`` when given."""
        if init is None:
            return self.moving
        with torch.no_grad():
            warped = geometry.warp(volume_tensor(self.moving.array, init.device), init.float())
        return Image(warped[0, 0].cpu().numpy(), self.fixed.affine)

    def prealign(self, matrix: np.ndarray) -> None:
        """Re-base the pair on an affine ``T`` (fixed RAS mm -> moving RAS mm): the moving image becomes the original
        sampled once at ``T p`` on the fixed grid (its mask too), and later methods' fields are relative to it;
        :func:`rwcnet.register.register` composes ``T`` back into the final field."""
        from rwcnet.affine.transforms import resample_moving

        self.affine = np.asarray(matrix, dtype=np.float64)
        self.moving = resample_moving(self.original_moving, self.affine, self.fixed, order=1)
        if self.original_moving_mask is not None:
            self.moving_mask = resample_moving(self.original_moving_mask, self.affine, self.fixed, order=0)
        self.release()

    def release(self) -> None:
        """Drop the cached tensors (before the output warp, to lower the peak memory)."""
        for name in ("fixed_tensor", "moving_tensor", "fixed_mask_tensor", "moving_mask_tensor"):
            self.__dict__.pop(name, None)


def as_image(value: Image | str | Path, what: str) -> Image:
    """An :class:`Image` given as one or as a path to read."""
    if isinstance(value, Image):
        return value
    if isinstance(value, (str, Path)):
        return read_image(value)
    raise TypeError(f"{what}: expected an rwcnet.data.formats.Image or a path, got {type(value).__name__}")


def _check_mask(mask: Image | None, image: Image, what: str) -> Image | None:
    if mask is None:
        return None
    name = mask.path or what
    if not same_grid(mask, image):
        raise InputError(f"{name}: {what} is on another grid than its image ({mask.shape} vs {image.shape} or a different affine)")
    if not np.any(mask.array > 0):
        raise InputError(f"{name}: {what} is empty")
    return mask


def prepare_pair(
    fixed: Image | str | Path, moving: Image | str | Path, fixed_mask: Image | str | Path | None,
    moving_mask: Image | str | Path | None, modality: str, device: torch.device, intensities: Intensities,
    record: Instrumentation,
) -> PreparedPair:
    """Read the pair and its masks, bring the moving side onto the fixed grid once, compute CT lung masks if none."""
    fixed_img, moving_img = as_image(fixed, "fixed"), as_image(moving, "moving")
    masks = [
        _check_mask(as_image(m, what) if m is not None else None, image, what)
        for m, image, what in ((fixed_mask, fixed_img, "fixed mask"), (moving_mask, moving_img, "moving mask"))
    ]
    if modality == "ct" and masks[0] is None and masks[1] is None:
        from rwcnet.masks import lung_mask

        record.stage("lung masks")
        masks = [Image(lung_mask(img.array, img.spacing).astype(np.uint8), img.affine) for img in (fixed_img, moving_img)]
        record.notes.append("CT without masks: lung masks computed for instance optimisation")
    original_moving, original_moving_mask = moving_img, masks[1]
    if grid_difference(moving_img, Grid.of(fixed_img, "the fixed image")) is not None:
        record.notes.append(f"moving image resampled onto the fixed grid in physical space ({moving_img.shape} -> {fixed_img.shape})")
        moving_img = resample_image(moving_img, fixed_img, order=1)
        if masks[1] is not None:
            masks[1] = resample_image(masks[1], fixed_img, order=0)
    return PreparedPair(fixed_img, moving_img, original_moving, masks[0], masks[1], modality, device, intensities,
                        original_moving_mask)
