"""``register``'s transform outputs beyond the field: ``--affine-out``, ``--itk-field``, ``--jacobian``, ``--inverse``,
``--itk-inverse``, ``--report`` and the affine QC picture, written inside the command's all-or-nothing block.

The registration's field holds the whole transform (affine included); see :mod:`rwcnet.exports` for the
ITK/ANTs forms and :mod:`rwcnet.run_report` for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

import numpy as np

from rwcnet.affine.transforms import TRANSFORM_SUFFIXES, resample_moving, write_itk_transform
from rwcnet.exports import (ITK_TRANSFORM_SUFFIXES, format_jacobian, inverse_array, inverse_errors, inverse_field,
                            write_itk_inverse, write_itk_transform_field)
from rwcnet.data.formats import FIELD_SUFFIXES, NIFTI_SUFFIXES, WRITABLE_ITK_SUFFIXES, Image, write_field, write_image
from rwcnet.geometry.resample import resample_image
from rwcnet.evaluation.metrics import jacobian_statistics
from rwcnet.run_report import StageMeter, build_report, write_report


@dataclass
class TransformOutputs:
    """Which extra outputs to write, and what they need besides the registration's result.

    ``moving``: the moving image on its own grid (the inverse's grid); ``affine``: the 4x4 fixed->moving RAS
    matrix of the linear stage (``None``: there was none); masks (each on its image's grid) restrict the
    inverse's check and the Jacobian statistics; ``inputs`` are hashed into the report.
    """

    affine_out: Path | None = None
    jacobian: Path | None = None
    inverse: Path | None = None
    itk_inverse: Path | None = None
    report: Path | None = None
    qc_affine: Path | None = None
    moving: Image | None = None
    affine: np.ndarray | None = None
    fixed_mask: Image | None = None
    moving_mask: Image | None = None
    inputs: dict[str, Path | None] = dataclass_field(default_factory=dict)
    meter: StageMeter | None = None
    seed: int = 0

    def checks(self) -> list[tuple[Path | None, tuple[str, ...], str]]:
        """``(path, formats, what)`` of each output, for :func:`rwcnet.outputs.check_outputs`."""
        images = NIFTI_SUFFIXES + WRITABLE_ITK_SUFFIXES
        return [(self.affine_out, TRANSFORM_SUFFIXES, "an ITK affine transform"),
                (self.jacobian, images, "the Jacobian determinant image"),
                (self.inverse, FIELD_SUFFIXES, "the inverse displacement field"),
                (self.itk_inverse, ITK_TRANSFORM_SUFFIXES, "the inverse ITK transform"),
                (self.report, (".json",), "the run report"), (self.qc_affine, (".png",), "the affine QC picture")]

    def step(self, name: str) -> None:
        if self.meter is not None:
            self.meter(name)


def _mask_array(mask: Image | None, image: Image) -> np.ndarray:
    """The mask as bool on ``image``'s grid, or the image's foreground (above its minimum) without one."""
    return np.asarray(mask.array) > 0 if mask is not None else np.asarray(image.array) > np.min(image.array)


def write_transform_outputs(result, outputs: TransformOutputs, *, itk_field: Path | None = None) -> list[str]:
    """Write the requested outputs of ``result`` (a :class:`rwcnet.register.RegistrationResult`); returns lines to print.

    Call inside :func:`rwcnet.outputs.written_together`. The inverse needs ``outputs.moving``.
    """
    fixed, field, lines = result.fixed, result.field, []
    if itk_field is not None:
        write_itk_transform_field(itk_field, field, fixed, outputs.affine)
    if outputs.affine_out is not None:
        write_itk_transform(outputs.affine_out, np.eye(4) if outputs.affine is None else outputs.affine)
    jacobian = inverse = None
    if outputs.jacobian is not None or outputs.report is not None:
        outputs.step("jacobian")
        mask = None if outputs.fixed_mask is None else outputs.fixed_mask.array
        determinant, jacobian = jacobian_statistics(field, mask)
        if outputs.jacobian is not None:
            write_image(outputs.jacobian, determinant, fixed)
        lines.append(format_jacobian(jacobian))
    if outputs.inverse is not None or outputs.itk_inverse is not None:
        outputs.step("inverse")
        moving = outputs.moving
        found = inverse_field(field, fixed, moving)
        array = inverse_array(found)
        undefined = found.undefined[0].numpy()
        inverse = inverse_errors(field, array, fixed, moving, _mask_array(outputs.fixed_mask, fixed),
                                 _mask_array(outputs.moving_mask, moving), undefined)
        inverse.update(undefined_fraction=found.undefined_fraction, iterations=found.iterations)
        if outputs.inverse is not None:
            write_field(outputs.inverse, array, moving)
        if outputs.itk_inverse is not None:
            write_itk_inverse(outputs.itk_inverse, array, moving)
        lines.append(f"inverse: |u(x) + v(x + u(x))| median {inverse['fixed_median_vox']:.3f}, p95 "
                     f"{inverse['fixed_p95_vox']:.3f} vox (fixed mask); |v(y) + u(y + v(y))| median "
                     f"{inverse['moving_median_vox']:.3f}, p95 {inverse['moving_p95_vox']:.3f} vox (moving mask); "
                     f"undefined on {100 * inverse['undefined_fraction']:.2f} % of the moving grid")
    if outputs.qc_affine is not None and outputs.affine is not None and outputs.moving is not None:
        from rwcnet.qc_affine import affine_qc_figure

        before = resample_image(outputs.moving, fixed, order=1).array
        after = resample_moving(outputs.moving, outputs.affine, fixed).array
        affine_qc_figure(outputs.qc_affine, fixed.array, before, after, affine=fixed.affine)
    if outputs.report is not None:
        steps = outputs.meter.finish() if outputs.meter is not None else []
        report = build_report(steps=steps, inputs=outputs.inputs, per_step_memory=bool(outputs.meter and
                              outputs.meter.per_step), seed=outputs.seed, affine=outputs.affine, jacobian=jacobian,
                              inverse=inverse, notes=list(result.notes) + [f"warning: {w}" for w in result.warnings])
        report["seconds"] = {name: round(value, 4) for name, value in result.seconds.items()}
        write_report(outputs.report, report)
    return lines
