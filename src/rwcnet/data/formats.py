"""Images, displacement fields and keypoints on disk, in one convention.

Everything inside rwcnet uses the NIfTI convention (see ``docs/conventions.md``):

* image arrays are ``(I, J, K)`` in NIfTI voxel order, as nibabel returns them;
* geometry is a 4x4 voxel-to-RAS affine in mm (``affine @ [i, j, k, 1]``);
* a Learn2Reg displacement field is ``(X, Y, Z, 3)`` float, in voxels of the
  fixed grid, a pull-back (the warped moving image is ``m(x + u(x))``), and
  channel ``c`` is the displacement along array axis ``c``.

SimpleITK's ``(k, j, i)`` arrays and LPS geometry (MHA/MHD, NRRD, ITK
displacement fields) are converted here, at the boundary, and nowhere else.
Every file written goes through :func:`rwcnet.outputs.atomic_output`; every
problem with a user's file raises :class:`rwcnet.errors.InputError` naming it.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from rwcnet.errors import InputError
from rwcnet.outputs import atomic_output

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
WRITABLE_ITK_SUFFIXES = (".mha", ".nrrd")
FIELD_SUFFIXES = (".nii.gz", ".nii", ".npz")
_KNOWN_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + (".npz", ".csv")
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])  # its own inverse


@dataclass
class Image:
    """A 3D volume and its geometry.

    ``array`` is ``(I, J, K)`` in NIfTI voxel order; ``affine`` maps voxel
    indices to RAS millimetres; ``header`` is the NIfTI header it was read
    with (``None`` for other formats), reused when writing on this grid.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None
    header: nib.Nifti1Header | None = dataclass_field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid size ``(I, J, K)`` in voxels."""
        return tuple(int(n) for n in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along each array axis, mm, shape ``(3,)``."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def direction(self) -> np.ndarray:
        """Unit RAS direction of each array axis as the columns of a ``(3, 3)`` matrix."""
        return self.affine[:3, :3] / self.spacing


def _suffix(path: Path) -> str:
    """The file's format suffix in lower case (``.nii.gz`` counts as one)."""
    name = path.name.lower()
    for suffix in _KNOWN_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    if not path.is_file():
        raise InputError(f"{path}: {what} is not a file")


def _sitk_message(error: Exception) -> str:
    """The informative last line of a SimpleITK exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _lps_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ITK origin (mm, LPS), spacing (mm) and direction (3x3, LPS columns) of a voxel->RAS affine."""
    matrix = _RAS_TO_LPS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    return _RAS_TO_LPS @ affine[:3, 3], spacing, matrix / spacing


def _affine_of_sitk(image: sitk.Image) -> np.ndarray:
    """Voxel->RAS affine of the first three axes of a SimpleITK image."""
    dim = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.array(image.GetSpacing(), dtype=np.float64)[:3]
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ direction @ np.diag(spacing)
    affine[:3, 3] = _RAS_TO_LPS @ np.array(image.GetOrigin(), dtype=np.float64)[:3]
    return affine


def _to_sitk(array: np.ndarray, affine: np.ndarray, *, vector: bool = False) -> sitk.Image:
    """A SimpleITK image of an ``(I, J, K)`` array (``(I, J, K, C)`` if ``vector``) on the affine's grid."""
    axes = (2, 1, 0, 3) if vector else (2, 1, 0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, axes)), isVector=vector)
    origin, spacing, direction = _lps_geometry(affine)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def _nifti_image(
    array: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, *, copy_header: bool
) -> nib.Nifti1Image:
    """A NIfTI image of ``array`` on ``affine``, with the reference header's qform/sform codes.

    With ``copy_header`` the rest of the reference header (units, description,
    intent...) is kept too; scaling and display range are reset for the new data.
    """
    codes = (1, 1) if header is None else (int(header["sform_code"]), int(header["qform_code"]))
    if codes == (0, 0):
        codes = (1, 1)
    template = header.copy() if header is not None and copy_header else None
    image = nib.Nifti1Image(array, affine, header=template, dtype=array.dtype)
    image.header.set_slope_inter(np.nan, np.nan)
    image.header["cal_min"] = image.header["cal_max"] = 0
    image.header.set_xyzt_units(xyz="mm")
    image.set_sform(affine, code=codes[0])
    image.set_qform(affine, code=codes[1])
    return image


def _write_sitk(image: sitk.Image, path: Path) -> None:
    """``sitk.WriteImage`` (compressed) whose failures are ``OSError``, as Python's own writers give.

    ITK reports a full disk as a ``RuntimeError`` for MHA/NRRD, and not at all
    for NIfTI (the file is silently cut short), so NIfTI files are read back.
    """
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
        if _suffix(path) in NIFTI_SUFFIXES:
            np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as error:  # RuntimeError from ITK; nibabel/zlib errors for a cut-short file
        folder = os.statvfs(path.parent)
        full = folder.f_bavail * folder.f_frsize < 1 << 20
        code = errno.ENOSPC if full else next((c for c in (errno.EDQUOT, errno.EACCES, errno.EROFS, errno.ENOSPC)
                                                if os.strerror(c) in str(error)), None)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from error


def _check_volume(array: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze trailing singleton axes; refuse anything but a finite numeric 3D volume."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{path}: image is {array.ndim}D (shape {array.shape}); a 3D volume is needed")
    if min(array.shape) < 2:
        raise InputError(f"{path}: image of shape {array.shape} is a single slice; a 3D volume is needed")
    if array.dtype.kind not in "biuf":
        raise InputError(f"{path}: voxel type {array.dtype} is not a scalar number type")
    if array.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(f"{path}: image contains {bad} NaN or infinite voxel values")
    return np.ascontiguousarray(array)


def read_image(path: str | Path) -> Image:
    """Read a 3D image (.nii, .nii.gz, .mha, .mhd, .nrrd): array ``(I, J, K)`` and voxel->RAS affine.

    Raises :class:`InputError` for a missing file, a file that is not an
    image, an image that is not 3D (a trailing singleton 4th axis is
    squeezed), or NaN/Inf values.
    """
    path = Path(path)
    _require_file(path, "image")
    suffix = _suffix(path)
    header = None
    if suffix in NIFTI_SUFFIXES:
        try:
            loaded = nib.load(str(path))
            array = np.asanyarray(loaded.dataobj)
        except Exception as error:  # nibabel raises many types for a corrupt or foreign file
            raise InputError(f"{path}: not a readable NIfTI image ({error})") from error
        affine = np.array(loaded.affine, dtype=np.float64)
        header = loaded.header if isinstance(loaded, nib.Nifti1Image) else None
    elif suffix in ITK_SUFFIXES:
        try:
            loaded = sitk.ReadImage(str(path))
        except RuntimeError as error:
            raise InputError(f"{path}: not a readable image ({_sitk_message(error)})") from error
        if loaded.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{path}: image has {loaded.GetNumberOfComponentsPerPixel()} components per voxel; "
                             "a scalar volume is needed")
        if loaded.GetDimension() < 3:
            raise InputError(f"{path}: image is {loaded.GetDimension()}D; a 3D volume is needed")
        array = sitk.GetArrayFromImage(loaded)
        array = np.transpose(array, tuple(range(array.ndim))[::-1])
        affine = _affine_of_sitk(loaded)
    else:
        raise InputError(f"{path}: unknown image format; use .nii, .nii.gz, .mha, .mhd or .nrrd")
    return Image(_check_volume(array, path), affine, path, header)


def write_image(path: str | Path, array: np.ndarray, reference: Image) -> None:
    """Write ``array`` ``(I, J, K)`` on ``reference``'s grid (.nii, .nii.gz, .mha, .nrrd), atomically.

    The voxel type of ``array`` is kept (bool is stored as uint8). For NIfTI
    the reference's header, including its qform/sform codes, is reused.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.shape != reference.shape:
        raise ValueError(f"{path}: array of shape {array.shape} does not fit the reference grid {reference.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    suffix = _suffix(path)
    if suffix not in NIFTI_SUFFIXES + WRITABLE_ITK_SUFFIXES:
        raise InputError(f"{path}: cannot write this image format; use .nii.gz, .nii, .mha or .nrrd")
    with atomic_output(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            _nifti_image(array, reference.affine, reference.header, copy_header=True).to_filename(str(tmp))
        else:
            _write_sitk(_to_sitk(array, reference.affine), tmp)


def _check_field_array(field: np.ndarray, path: Path, reference: Image | None) -> None:
    if field.ndim != 4 or field.shape[3] != 3:
        raise ValueError(f"{path}: displacement field of shape {field.shape}; expected (X, Y, Z, 3)")
    if reference is not None and field.shape[:3] != reference.shape:
        raise ValueError(f"{path}: displacement field of shape {field.shape} does not fit the grid {reference.shape}")


def _read_npz(path: Path) -> np.ndarray:
    try:
        with np.load(path) as data:
            keys = list(data.keys())
            if "arr_0" in keys:
                return data["arr_0"]
            if len(keys) == 1:
                return data[keys[0]]
    except Exception as error:  # zipfile/pickle/format errors of a foreign file
        raise InputError(f"{path}: not a readable .npz file ({error})") from error
    raise InputError(f"{path}: .npz holds arrays {keys}; expected the field under 'arr_0' or as its only array")


def read_field(path: str | Path, expected_shape: Sequence[int] | None = None) -> np.ndarray:
    """Read a Learn2Reg displacement field: ``(X, Y, Z, 3)`` float32, voxels of the fixed grid, pull-back.

    Accepts .nii/.nii.gz and .npz (array under ``arr_0`` or the only array).
    ``expected_shape`` is the fixed grid ``(X, Y, Z)`` (a trailing 3 is
    allowed). Raises :class:`InputError` for a missing or unreadable file, a
    wrong shape, or NaN/Inf values.
    """
    path = Path(path)
    _require_file(path, "displacement field")
    suffix = _suffix(path)
    if suffix == ".npz":
        array = _read_npz(path)
    elif suffix in NIFTI_SUFFIXES:
        try:
            loaded = nib.load(str(path))
            array = np.asanyarray(loaded.dataobj)
        except Exception as error:  # nibabel raises many types for a corrupt or foreign file
            raise InputError(f"{path}: not a readable NIfTI displacement field ({error})") from error
        if array.ndim == 5:
            raise InputError(f"{path}: 5D vector image of shape {array.shape} looks like an ITK/ANTs displacement "
                             "field (mm, LPS); read it with read_itk_field, a Learn2Reg field is (X, Y, Z, 3) voxels")
    else:
        raise InputError(f"{path}: unknown displacement field format; use .nii.gz, .nii or .npz")
    if array.ndim != 4 or array.shape[3] != 3 or array.dtype.kind not in "iuf":
        raise InputError(f"{path}: displacement field of shape {array.shape} and type {array.dtype}; "
                         "expected (X, Y, Z, 3) numbers")
    if expected_shape is not None:
        expected = tuple(int(n) for n in expected_shape)[:3] + (3,)
        if array.shape != expected:
            raise InputError(f"{path}: displacement field has shape {array.shape}, expected {expected}")
    field = np.asarray(array, dtype=np.float32)
    bad = int(np.count_nonzero(~np.isfinite(field)))
    if bad:
        raise InputError(f"{path}: displacement field contains {bad} NaN or infinite values")
    return field


def write_field(path: str | Path, field: np.ndarray, reference: Image | None = None) -> None:
    """Write a Learn2Reg field ``(X, Y, Z, 3)`` (voxels, fixed grid) as .nii.gz/.nii or .npz (``arr_0``), atomically.

    NIfTI files get ``reference``'s affine and qform/sform codes (identity
    without a reference). Floating types are kept, others stored as float32.
    """
    path = Path(path)
    field = np.asarray(field)
    _check_field_array(field, path, reference)
    if field.dtype.kind != "f":
        field = field.astype(np.float32)
    suffix = _suffix(path)
    if suffix not in FIELD_SUFFIXES:
        raise InputError(f"{path}: cannot write a displacement field in this format; use .nii.gz, .nii or .npz")
    with atomic_output(path) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, arr_0=field)
        else:
            affine = np.eye(4) if reference is None else reference.affine
            header = None if reference is None else reference.header
            _nifti_image(field, affine, header, copy_header=False).to_filename(str(tmp))


def read_keypoints(path: str | Path) -> np.ndarray:
    """Read keypoints ``(N, 3)`` float64 voxel indices in array order from a CSV (no header, one point a row).

    A path ending ``.nii.gz`` that does not exist is read from its ``.csv``
    sibling (Learn2Reg JSON files name keypoint CSVs that way).
    """
    path = Path(path)
    if not path.exists() and path.name.lower().endswith(".nii.gz"):
        sibling = path.with_name(path.name[: -len(".nii.gz")] + ".csv")
        if sibling.is_file():
            path = sibling
    _require_file(path, "keypoint file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable keypoint CSV ({error})") from error
    points = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = [float(part) for part in line.split(",")]
        except ValueError:
            values = []
        if len(values) != 3 or not np.all(np.isfinite(values)):
            raise InputError(f"{path}, line {number}: expected three comma-separated voxel indices, "
                             f"found {line.strip()[:80]!r}")
        points.append(values)
    if not points:
        raise InputError(f"{path}: keypoint file holds no points")
    return np.array(points, dtype=np.float64)


def write_itk_field(path: str | Path, field: np.ndarray, reference: Image) -> None:
    """Export a Learn2Reg field as an ITK displacement field (.nii.gz/.nii, .mha, .nrrd), atomically.

    ``field`` is ``(X, Y, Z, 3)`` in voxels on ``reference`` (the fixed
    image; the moving image is on the same grid). The file is a 3-component
    float64 vector image on the fixed image's physical grid whose vectors
    are LPS millimetres, ``d = LPS @ A[:3, :3] @ u``, so that ITK's
    ``DisplacementFieldTransform`` maps fixed point ``p`` to ``p + d(p)``;
    NIfTI files carry the vector intent that ANTs reads.
    """
    path = Path(path)
    field = np.asarray(field, dtype=np.float64)
    _check_field_array(field, path, reference)
    suffix = _suffix(path)
    if suffix not in NIFTI_SUFFIXES + WRITABLE_ITK_SUFFIXES:
        raise InputError(f"{path}: cannot write an ITK displacement field in this format; use .nii.gz, .mha or .nrrd")
    vectors = field @ (_RAS_TO_LPS @ reference.affine[:3, :3]).T
    image = _to_sitk(vectors, reference.affine, vector=True)
    with atomic_output(path) as tmp:
        _write_sitk(image, tmp)


def read_itk_field(path: str | Path, reference: Image) -> np.ndarray:
    """Import an ITK/ANTs displacement field (LPS mm) as a Learn2Reg field ``(X, Y, Z, 3)`` float32 in voxels.

    The field must lie on ``reference``'s grid (size, origin, spacing and
    direction); otherwise :class:`InputError`.
    """
    path = Path(path)
    _require_file(path, "ITK displacement field")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(f"{path}: not a readable ITK displacement field ({_sitk_message(error)})") from error
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(f"{path}: a 3D image with {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "is not a 3D displacement field (3 components)")
    size = tuple(int(n) for n in image.GetSize())
    affine = _affine_of_sitk(image)
    if size != reference.shape or not np.allclose(affine, reference.affine, atol=1e-4):
        raise InputError(f"{path}: displacement field grid (size {size}) differs from the grid of the reference "
                         f"image {reference.path or ''} (size {reference.shape}) or its origin/spacing/direction; "
                         "resample one onto the other first")
    vectors = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0, 3)).astype(np.float64)
    field = vectors @ np.linalg.inv(_RAS_TO_LPS @ reference.affine[:3, :3]).T
    if not np.isfinite(field).all():
        raise InputError(f"{path}: displacement field contains NaN or infinite values")
    return field.astype(np.float32)
