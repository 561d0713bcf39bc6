"""ANTs SyN (antspyx), run by rwcnet in its own virtual environment; imports nothing from rwcnet.

    python ants_syn.py FIXED MOVING FIELD_OUT WARPED_OUT THREADS

Writes the composite forward transform as one ITK displacement field (LPS mm on
the fixed grid, ``antsApplyTransforms``' ``compose`` output) and the moving image
warped by ANTs itself; prints ``{"seconds", "peak_gb"}`` as the last line.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _process import peak_gb  # sibling module: this folder is on sys.path when run as a script


def main() -> None:
    fixed_path, moving_path, field_out, warped_out, threads = sys.argv[1:6]
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = threads
    import ants

    fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
    start = time.perf_counter()
    result = ants.registration(fixed, moving, type_of_transform="SyN", random_seed=0)
    seconds = time.perf_counter() - start
    ants.image_write(ants.apply_transforms(fixed, moving, result["fwdtransforms"]), warped_out)
    with tempfile.TemporaryDirectory() as tmp:
        composite = ants.apply_transforms(fixed, moving, result["fwdtransforms"], compose=str(Path(tmp) / "composite_"))
        shutil.move(composite, field_out)
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb()}))


if __name__ == "__main__":
    main()
