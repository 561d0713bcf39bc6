"""All of rwcnet's geometry: grids and affines, resampling through physical space, and field algebra.

* :mod:`rwcnet.geometry.fields`: warp, compose, invert, resize, Jacobian of displacement fields
  (torch, ``(B, 3, X, Y, Z)`` in voxels); its functions are re-exported here;
* :mod:`rwcnet.geometry.grids`: which grid is the fixed grid, working grids, how a field samples
  an image on another grid;
* :mod:`rwcnet.geometry.folds`: fold repair (the field smoothed locally where it folds);
* :mod:`rwcnet.geometry.filters`: separable filters (box, Gaussian; zero, renormalised or
  replicated borders) used by MIND, the network's readout and correlation, IO and refinement.
"""

from rwcnet.geometry.fields import (  # noqa: F401  (the field algebra, used as rwcnet.geometry.NAME)
    identity_grid, sample, warp, warp_labels, sample_field, transform_points, invert_points, compose,
    resize_field, resize_volume, spatial_gradient, forward_difference_means, jacobian_determinant, integrate_velocity, resample_field,
    moving_voxel_field, FieldInverse, invert_field, invert_field_on_moving_grid, _grid_sample, _normalise,
)
from rwcnet.geometry.folds import FOLD_THRESHOLD, FoldRepairReport, repair_folds  # noqa: F401,E402
