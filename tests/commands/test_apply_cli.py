"""``rwcnet apply``: images, label maps and keypoints moved by known fields; bad input refused with exit 2."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from cli_runner import run
from rwcnet.commands.apply import move_keypoints, warp_image, warp_label_map
from rwcnet.data.formats import read_keypoints

SHAPE = (20, 18, 16)
SPACING = (1.5, 1.0, 2.0)
FIXED_AFFINE = np.diag(list(SPACING) + [1.0])
MOVING_AFFINE = np.array([[0.0, 0.0, 2.0, -10.0], [-1.5, 0.0, 0.0, 5.0], [0.0, 1.0, 0.0, 7.0], [0, 0, 0, 1.0]])


def save(path: Path, array: np.ndarray, affine: np.ndarray = MOVING_AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def smooth_field(shape=SHAPE, amplitude: float = 1.5) -> np.ndarray:
    """A smooth, invertible field (X, Y, Z, 3) in voxels (largest gradient well below 1)."""
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), axis=-1)
    field = np.stack([amplitude * np.sin(x[..., 1] / 5.0 + 0.3),
                      amplitude * np.cos(x[..., 2] / 6.0) * 0.8,
                      amplitude * np.sin(x[..., 0] / 4.0 + x[..., 1] / 9.0)], axis=-1)
    return field.astype(np.float32)


def blob_labels(shape=SHAPE, dtype=np.uint8) -> np.ndarray:
    """Non-contiguous label values 0, 3, 7, 200 in boxes."""
    labels = np.zeros(shape, dtype)
    labels[3:12, 2:10, 4:13] = 3
    labels[8:17, 9:16, 2:9] = 7
    labels[5:9, 11:15, 10:14] = 200
    return labels


def test_zero_field_returns_the_moving_image_and_label_map(tmp_path, monkeypatch, capsys) -> None:
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 3000, SHAPE).astype(np.int16)
    mr = rng.random(SHAPE).astype(np.float32)
    labels = blob_labels()
    np.savez(tmp_path / "zero.npz", arr_0=np.zeros(SHAPE + (3,), np.float32))
    for name, array, extra in (("ct", ct, ()), ("mr", mr, ()), ("lab", labels, ("--labels",)),
                               ("labnn", labels, ("--labels", "--label-method", "nearest"))):
        moving = save(tmp_path / f"{name}.nii.gz", array)
        out = tmp_path / f"{name}_warped.nii.gz"
        code, stdout, _ = run(monkeypatch, capsys, "apply", "--field", tmp_path / "zero.npz", "--moving", moving,
                              "--output", out, *extra)
        assert code == 0 and str(out) in stdout
        written = nib.load(str(out))
        data = np.asanyarray(written.dataobj)
        assert data.dtype == array.dtype
        np.testing.assert_allclose(written.affine, MOVING_AFFINE)  # .npz field: geometry from the moving image
        if name == "mr":  # trilinear through grid_sample: exact up to float64 rounding of the coordinates
            np.testing.assert_allclose(data, array, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(data, array)


def test_integer_translation_shifts_the_image_like_np_roll() -> None:
    rng = np.random.default_rng(1)
    moving = rng.random(SHAPE)
    shift = np.array([2, -3, 1])
    field = np.broadcast_to(shift.astype(np.float32), SHAPE + (3,))
    warped = warp_image(moving, field)
    rolled = np.roll(moving, tuple(-shift), axis=(0, 1, 2))  # rolled[x] = moving[x + shift]
    interior = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, SHAPE))
    np.testing.assert_allclose(warped[interior], rolled[interior], atol=1e-9)
    assert warped.dtype == moving.dtype
    labels = blob_labels(dtype=np.int32)
    for method in ("onehot", "nearest"):
        moved = warp_label_map(labels, field, method)
        np.testing.assert_array_equal(moved[interior], np.roll(labels, tuple(-shift), axis=(0, 1, 2))[interior])


def test_onehot_labels_come_from_the_neighbours_of_the_sampled_point() -> None:
    labels = blob_labels(dtype=np.uint16)
    field = smooth_field(amplitude=2.5)
    warped = warp_label_map(labels, field, "onehot")
    assert warped.dtype == np.uint16 and set(np.unique(warped)) <= set(np.unique(labels))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    target = np.clip(grid + field.astype(np.float64), 0, np.array(SHAPE) - 1)
    low = np.floor(target).astype(int)
    corners = []
    for offset in np.ndindex(2, 2, 2):
        index = np.minimum(low + np.array(offset), np.array(SHAPE) - 1)
        corners.append(labels[index[..., 0], index[..., 1], index[..., 2]])
    assert np.all(np.any(np.stack(corners) == warped, axis=0))  # brute force: one of the 8 neighbours
    float_labels = labels.astype(np.float32)
    np.testing.assert_array_equal(warp_label_map(float_labels, field, "onehot"), warped.astype(np.float32))
    with pytest.raises(ValueError, match="not a label map"):
        warp_label_map(float_labels + 0.5, field)


def test_keypoints_forward_matches_scipy_and_inverse_returns_them(tmp_path, monkeypatch, capsys) -> None:
    field = smooth_field()
    rng = np.random.default_rng(2)
    points = rng.uniform(2, np.array(SHAPE) - 3, size=(12, 3))
    moved, residual = move_keypoints(points, field, "fixed")
    expected = points + np.stack([scipy.ndimage.map_coordinates(field[..., c].astype(np.float64), points.T, order=1)
                                  for c in range(3)], axis=1)
    np.testing.assert_allclose(moved, expected, atol=1e-5)
    assert residual == 0.0
    back, residual = move_keypoints(moved, field, "moving")
    assert residual < 1e-6
    np.testing.assert_allclose(back, points, atol=1e-4)

    nib.save(nib.Nifti1Image(field, FIXED_AFFINE), str(tmp_path / "disp.nii.gz"))
    np.savetxt(tmp_path / "fixed_kp.csv", points, delimiter=",")
    code, _, _ = run(monkeypatch, capsys, "apply", "--field", tmp_path / "disp.nii.gz", "--keypoints",
                     tmp_path / "fixed_kp.csv", "--keypoints-space", "fixed", "--keypoints-output",
                     tmp_path / "moving_kp.csv")
    assert code == 0
    np.testing.assert_allclose(read_keypoints(tmp_path / "moving_kp.csv"), expected, atol=1e-5)
    code, stdout, _ = run(monkeypatch, capsys, "apply", "--field", tmp_path / "disp.nii.gz", "--keypoints",
                          tmp_path / "moving_kp.csv", "--keypoints-output", tmp_path / "back_kp.csv")
    assert code == 0 and "12 keypoints on the fixed grid" in stdout
    np.testing.assert_allclose(read_keypoints(tmp_path / "back_kp.csv"), points, atol=1e-4)


def test_output_geometry_from_fixed_then_field_header_then_moving(tmp_path, monkeypatch, capsys) -> None:
    moving = save(tmp_path / "m.nii.gz", np.random.default_rng(3).random(SHAPE).astype(np.float32))
    fixed = save(tmp_path / "f.nii.gz", np.zeros(SHAPE, np.float32), FIXED_AFFINE)
    zero = np.zeros(SHAPE + (3,), np.float32)
    nib.save(nib.Nifti1Image(zero, FIXED_AFFINE * 2 - np.diag([1, 1, 1, 1])), str(tmp_path / "with_header.nii.gz"))
    nib.save(nib.Nifti1Image(zero, np.eye(4)), str(tmp_path / "identity.nii.gz"))
    cases = (("with_header.nii.gz", ("--fixed", fixed), FIXED_AFFINE),
             ("with_header.nii.gz", (), FIXED_AFFINE * 2 - np.diag([1, 1, 1, 1])),
             ("identity.nii.gz", (), MOVING_AFFINE))
    for name, extra, affine in cases:
        out = tmp_path / "out.nii.gz"
        code, _, stderr = run(monkeypatch, capsys, "apply", "--field", tmp_path / name, "--moving", moving,
                              "--output", out, *extra)
        assert code == 0
        np.testing.assert_allclose(nib.load(str(out)).affine, affine)
        # on a known fixed grid the moving image (another affine) is sampled through physical space
        assert ("through physical space" in stderr) == (affine is not MOVING_AFFINE)
        assert ("no fixed grid given" in stderr) == (affine is MOVING_AFFINE)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--field", "{tmp}/none.npz", "--moving", "{tmp}/m.nii.gz", "-o", "{out}"), "none.npz"),
        (("--field", "{tmp}/zero.npz", "--moving", "{tmp}/none.nii.gz", "-o", "{out}"), "none.nii.gz"),
        (("--field", "{tmp}/zero.npz", "--moving", "{tmp}/m.nii.gz", "-o", "{out}", "--fixed", "{tmp}/small.nii.gz"),
         "zero.npz"),
        (("--field", "{tmp}/zero.npz", "--moving", "{tmp}/small.nii.gz", "-o", "{out}"), "small.nii.gz"),
        (("--field", "{tmp}/zero.npz", "--moving", "{tmp}/m.nii.gz", "-o", "{out}", "--labels"), "m.nii.gz"),
        (("--field", "{tmp}/zero.npz", "--keypoints", "{tmp}/far.csv", "--keypoints-output", "{tmp}/out/k.csv"),
         "far.csv"),
        (("--field", "{tmp}/zero.npz", "--keypoints", "{tmp}/bad.csv", "--keypoints-output", "{tmp}/out/k.csv"),
         "bad.csv, line 2"),
        (("--field", "{tmp}/zero.npz", "--moving", "{tmp}/m.nii.gz", "-o", "{tmp}/no/such/w.nii.gz"), "w.nii.gz"),
        (("--field", "{tmp}/zero.npz", "--moving", "{tmp}/m.nii.gz", "-o", "{tmp}/out/w.png"), "w.png"),
        (("--field", "{tmp}/zero.npz", "--moving", "{tmp}/m.nii.gz"), "--output"),
        (("--field", "{tmp}/zero.npz",), "nothing to do"),
    ],
)
def test_bad_input_exits_2_naming_the_file_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message) -> None:
    np.savez(tmp_path / "zero.npz", arr_0=np.zeros(SHAPE + (3,), np.float32))
    save(tmp_path / "m.nii.gz", np.random.default_rng(4).random(SHAPE).astype(np.float32))
    save(tmp_path / "small.nii.gz", np.zeros((10, 9, 8), np.float32))
    (tmp_path / "far.csv").write_text("1,2,3\n1,200,3\n")
    (tmp_path / "bad.csv").write_text("1,2,3\n1,2\n")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "warped.nii.gz"
    code, _, stderr = run(monkeypatch, capsys, "apply",
                          *(str(a).format(tmp=tmp_path, out=out) for a in args))
    assert code == 2
    assert stderr.startswith("error:") and message in stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_shared_brain_zero_field_keeps_image_and_labels(shared_data, tmp_path, monkeypatch, capsys) -> None:
    brain = shared_data / "brain"
    image, labels = brain / "imagesTr" / "BRAIN_0002_0000.nii.gz", brain / "labelsTr" / "BRAIN_0002_0000.nii.gz"
    np.savez(tmp_path / "zero.npz", arr_0=np.zeros((160, 192, 224, 3), np.float32))
    for source, extra in ((image, ()), (labels, ("--labels", "--label-method", "nearest"))):
        out = tmp_path / f"warped_{len(extra)}.nii.gz"
        code, _, _ = run(monkeypatch, capsys, "apply", "--field", tmp_path / "zero.npz", "--moving", source,
                         "--fixed", brain / "imagesTr" / "BRAIN_0001_0000.nii.gz", "--output", out, *extra)
        assert code == 0
        original, written = np.asanyarray(nib.load(str(source)).dataobj), np.asanyarray(nib.load(str(out)).dataobj)
        assert written.dtype == original.dtype
        np.testing.assert_allclose(written, original, rtol=0, atol=1e-6)
