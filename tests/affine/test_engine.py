"""The affine engine's building blocks against independent references: grid_sample, finite differences, matrix_exp."""

import torch

from rwcnet.affine.engine import _rotation, _skew, _trilinear
from rwcnet.geometry import sample


def _volume(shape=(7, 9, 6), channels=4):
    torch.manual_seed(0)
    volume = torch.randn(1, channels, *shape, dtype=torch.float64)
    return volume, volume[0].reshape(channels, -1)


def test_trilinear_matches_grid_sample_inside_and_at_the_border():
    volume, table = _volume()
    voxels = torch.rand(200, 3, dtype=torch.float64) * torch.tensor([9.0, 11.0, 8.0]) - 1.0  # some outside
    expected = sample(volume.float(), voxels.T.float()[None, :, :, None, None])[0, :, :, 0, 0].T
    assert torch.allclose(_trilinear(table, (7, 9, 6), voxels), expected.double(), atol=1e-5)


def test_trilinear_gradient_matches_finite_differences():
    _, table = _volume()
    voxels = (torch.rand(60, 3, dtype=torch.float64) * torch.tensor([5.8, 7.8, 4.8]) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: _trilinear(table, (7, 9, 6), v), (voxels,))


def test_trilinear_gradient_is_zero_where_the_border_clamp_holds_the_point():
    _, table = _volume()
    voxels = torch.tensor([[-2.0, 3.2, 2.5], [3.3, 12.0, 2.5]], dtype=torch.float64, requires_grad=True)
    _trilinear(table, (7, 9, 6), voxels).sum().backward()
    assert voxels.grad[0, 0] == 0 and voxels.grad[1, 1] == 0
    assert voxels.grad[0, 1] != 0 and voxels.grad[1, 0] != 0


def test_rotation_is_the_matrix_exponential_with_its_gradient_also_at_zero():
    for vector in (torch.tensor([0.3, -0.2, 0.5]), torch.tensor([1e-8, 0.0, -2e-8]), torch.zeros(3)):
        vector = vector.double().requires_grad_()
        assert torch.allclose(_rotation(vector), torch.linalg.matrix_exp(_skew(vector)), atol=1e-12)
        assert torch.autograd.gradcheck(_rotation, (vector,))
