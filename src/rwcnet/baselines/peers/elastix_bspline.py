"""elastix B-spline registration (itk-elastix), run by rwcnet in its own virtual environment; imports nothing from rwcnet.

    python elastix_bspline.py FIXED MOVING FIELD_OUT WARPED_OUT THREADS

Default ``bspline`` parameter map (multi-resolution, Mattes mutual information),
final grid spacing 8 mm. Writes transformix's deformation field (LPS mm on the
fixed grid: fixed point ``p`` maps to ``p + d(p)``) and the moving image warped
by transformix; prints ``{"seconds", "peak_gb"}`` as the last line.
"""

import json
import sys
import time

from _process import peak_gb  # sibling module: this folder is on sys.path when run as a script


def main() -> None:
    fixed_path, moving_path, field_out, warped_out, threads = sys.argv[1:6]
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    fixed, moving = itk.imread(fixed_path, itk.F), itk.imread(moving_path, itk.F)
    parameters = itk.ParameterObject.New()
    bspline = parameters.GetDefaultParameterMap("bspline")
    bspline["FinalGridSpacingInPhysicalUnits"] = ["8"]
    bspline["MaximumNumberOfIterations"] = ["250"]
    bspline["RandomSeed"] = ["0"]
    parameters.AddParameterMap(bspline)
    start = time.perf_counter()
    _, transform = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
    seconds = time.perf_counter() - start
    transform.SetParameter("FinalBSplineInterpolationOrder", "1")
    itk.imwrite(itk.transformix_filter(moving, transform), warped_out)
    itk.imwrite(itk.transformix_deformation_field(moving, transform), field_out)
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb()}))


if __name__ == "__main__":
    main()
