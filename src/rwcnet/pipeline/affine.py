"""The affine pre-alignment method: rigid -> affine (:func:`rwcnet.affine.register_affine`) before the deformable ones.

It comes first in the ``rwcnet`` chain and re-bases the pair (:meth:`PreparedPair.prealign`): the moving image is
sampled once through the affine ``T`` onto the fixed grid, and the methods after it register that, starting from
the identity. :func:`rwcnet.register.register` composes ``T`` back, so the Learn2Reg field holds the whole
transform. The deformable methods thus never see the affine part of the field (instance optimisation's diffusion
regulariser and zero-padded smoothing would pull a rotation back).

With ``affine`` off but an initial transform (``--init``), that transform is applied as it is.
"""

from __future__ import annotations

import numpy as np
import torch

from rwcnet.affine import register_affine
from rwcnet.pipeline.instrument import Instrumentation
from rwcnet.pipeline.method import Method, Settings, register_method
from rwcnet.pipeline.pair import PreparedPair

Tensor = torch.Tensor
#: Singular values of the linear part a same-anatomy pre-alignment may reach; outside, the search failed.
SCALE_RANGE = (0.67, 1.5)


class AffinePrealignment(Method):
    """Find ``T`` (or take the given one) and re-base the pair on it; returns ``None`` (identity on the re-based pair)."""

    stage, key = "affine", "affine"

    def __init__(self, search: bool, transform: str, metric: str, init: np.ndarray | None, seed: int) -> None:
        self.search, self.transform, self.metric, self.init, self.seed = search, transform, metric, init, seed

    def run(self, pair: PreparedPair, init: Tensor | None, record: Instrumentation) -> Tensor | None:
        if init is not None:
            raise ValueError("the affine pre-alignment must come first in a chain")
        if not self.search:
            matrix = self.init
            record.notes.append("initial transform applied as it is (no affine search)")
        else:
            found = register_affine(pair.fixed, pair.original_moving, transform=self.transform, metric=self.metric,
                                    init="com" if self.init is None else self.init, fixed_mask=pair.fixed_mask,
                                    moving_mask=pair.original_moving_mask, seed=self.seed)
            matrix = found.matrix
            start = "the given transform" if self.init is not None else "the centres of mass"
            scales = np.linalg.svd(matrix[:3, :3], compute_uv=False)
            if scales.min() < SCALE_RANGE[0] or scales.max() > SCALE_RANGE[1]:
                record.warnings.append(
                    f"the affine pre-alignment found implausible scales ({scales.min():.2f}..{scales.max():.2f}, "
                    f"outside {SCALE_RANGE[0]}..{SCALE_RANGE[1]}); it was dropped and the pair aligned by "
                    f"{start} only; check the images, or give --init or --no-affine")
                matrix = found.initial
            else:
                record.notes.append(f"affine pre-alignment: {self.transform}, {self.metric.upper()}, from {start}")
        pair.prealign(matrix)
        return None


@register_method("affine")
def build_affine(settings: Settings, record: Instrumentation) -> AffinePrealignment | None:
    """The pre-alignment when ``settings.affine`` is on or an initial transform is given; else ``None``."""
    if not settings.affine and settings.init_matrix is None:
        return None
    return AffinePrealignment(settings.affine, settings.linear_transform, settings.affine_metric,
                              settings.init_matrix, settings.seed)
