"""greedy (PICSL, ``picsl-greedy``), run by rwcnet in its own interpreter; imports nothing from rwcnet.

    python greedy_ncc.py FIXED MOVING FIELD_OUT WARPED_OUT THREADS [ITERATIONS]

Deformable only (no affine stage), local NCC with a 5³ window (``-m NCC
2x2x2``), ``ITERATIONS`` per level coarse to fine (``100x50x20`` by default,
greedy's own default), greedy's default smoothing (``-s 1.732vox 0.7071vox``)
and step (``-e 1``). Writes greedy's warp (an ITK displacement field, LPS mm on
the fixed grid) and the moving image resliced by greedy itself; prints
``{"seconds", "peak_gb"}`` as the last line.
"""

import json
import sys
import time

from _process import peak_gb  # sibling module: this folder is on sys.path when run as a script


def main() -> None:
    fixed_path, moving_path, field_out, warped_out, threads = sys.argv[1:6]
    iterations = sys.argv[6] if len(sys.argv) > 6 else "100x50x20"
    from picsl_greedy import Greedy3D

    greedy = Greedy3D()
    start = time.perf_counter()
    greedy.execute(f"-d 3 -threads {int(threads)} -i {fixed_path} {moving_path} -m NCC 2x2x2 -n {iterations} "
                   f"-o {field_out}", out=sys.stderr, err=sys.stderr)
    seconds = time.perf_counter() - start
    greedy.execute(f"-d 3 -threads {int(threads)} -rf {fixed_path} -rm {moving_path} {warped_out} -r {field_out}",
                   out=sys.stderr, err=sys.stderr)
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb()}))


if __name__ == "__main__":
    main()
