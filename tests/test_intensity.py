"""Intensity helpers against hand-made arrays."""

import numpy as np

from rwcnet.intensity import invert_contrast


def test_invert_contrast_flips_the_head_about_its_maximum_and_keeps_the_background():
    array = np.array([[0.0, 0.2], [0.5, 1.0]], dtype=np.float64)
    inverted = invert_contrast(array)
    assert inverted.dtype == np.float32
    np.testing.assert_allclose(inverted, [[0.0, 0.8], [0.5, 0.0]], atol=1e-7)
    assert not invert_contrast(np.zeros((2, 2))).any()
