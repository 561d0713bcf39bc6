"""Refinement variants from the default's own start: the network + IO field computed once per pair, then refined by each variant.

Pairs: ``real`` (the shared pair 0001<-0002, Dice over the dataset's 30 labels) and the numbers of the
semi-synthetic brains of ``benchmarks/paper_tables.py`` (``--pairs-cache``, from its ``prepare``; endpoint error
in mm inside the brain against the known field). All are pre-aligned: no affine step, as in ``refine_vs_greedy.py``
and ``paper_tables.py``. A variant is a name and
:class:`rwcnet.refine.RefineConfig` overrides of the brain preset, in JSON. The start fields are cached in
``--starts`` (one ``.pt`` per pair; delete them after changing the network or IO). Prints one JSON line per pair
and variant: the scores, SDlogJ, folds and the refinement's seconds. The chain ends with the fold repair unless
``--no-repair``. With ``--invert-moving`` every moving image has its contrast inverted first (``where(m > 0,
max(m[m > 0]) - m, 0)``, written once beside the starts), so that the refinement's contrast check picks MIND. Uses the
pipeline's extension points (:func:`rwcnet.pipeline.register_method`).

    python benchmarks/refine_variants.py --pairs real 2 6 8 --variant preset '{}' \\
        --variant plain '{"iterations": [200, 100, 40], "momentum": 0, "sigma_field": 0.85}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from rwcnet.data.formats import read_image
from rwcnet.evaluation.metrics import score_case
from rwcnet.intensity import invert_contrast
from rwcnet.pipeline import register_method
from rwcnet.pipeline.methods import Refinement
from rwcnet.pipeline.method import Method
from rwcnet.refine import refine_config
from rwcnet.register import register

REPO = Path(__file__).resolve().parents[1]


class CachedStart(Method):
    """Saves the field it receives to ``path`` (the first time), or returns the saved one when it receives none."""

    stage = key = "cached start"
    path: Path

    def run(self, pair, init, record):
        if init is not None:
            partial = self.path.with_suffix(".partial")
            torch.save(init.cpu(), partial)
            partial.replace(self.path)  # an interrupted run leaves no half-written start
            return init
        return torch.load(self.path).to(pair.device)


class VariantRefinement(Refinement):
    """The pipeline's refinement with the brain preset and the current variant's overrides (``OVERRIDES``)."""

    def run(self, pair, init, record):
        self.config = refine_config("brain", **OVERRIDES)
        return super().run(pair, init, record)


START, OVERRIDES = CachedStart(), {}
register_method("cached_start")(lambda settings, record: START)
register_method("variant_refinement")(lambda settings, record: VariantRefinement(settings))


def _pair(name: str, data: Path, pairs_cache: Path) -> tuple[str, str]:
    if name == "real":
        root = data / "brain" / "imagesTr"
        return str(root / "BRAIN_0001_0000.nii.gz"), str(root / "BRAIN_0002_0000.nii.gz")
    stem = pairs_cache / "data" / "SYNBRAIN" / "imagesTr" / f"SYNBRAIN_{int(name):04d}_"
    return f"{stem}0000.nii.gz", f"{stem}0001.nii.gz"


def _inverted(moving: str, folder: Path) -> str:
    """The moving image with its contrast inverted inside the head, written once into ``folder``; returns its path."""
    from rwcnet.data.formats import write_image

    target = folder / ("inverted_" + Path(moving).name)
    if not target.is_file():
        image = read_image(moving)
        partial = target.with_name(target.name + ".partial.nii.gz")
        write_image(partial, invert_contrast(image.array), image)
        partial.replace(target)
    return str(target)


def _scorer(name: str, data: Path, pairs_cache: Path):
    """``score(field)`` for pair ``name``: its references are read once, here."""
    if name == "real":
        root = data / "brain"
        labels = json.loads((root / "BRAIN_dataset.json").read_text())["evaluation_labels"]
        read = lambda n: read_image(root / "labelsTr" / f"BRAIN_{n}_0000.nii.gz").array.astype(np.int32)  # noqa: E731
        fixed_labels, moving_labels = read("0001"), read("0002")

        def score(field: np.ndarray) -> dict:
            s = score_case(field, fixed_labels, moving_labels, labels=labels, compute_hd95=False)
            return {"dice": round(s["dice"], 4), "sdlogj": round(s["sdlogj"], 4), "folds_pct": round(100 * s["folding_fraction"], 4)}

        return score
    root = pairs_cache / "data" / "SYNBRAIN"
    fixed = read_image(root / "imagesTr" / f"SYNBRAIN_{int(name):04d}_0000.nii.gz")
    truth, inside, spacing = np.load(root / "truth" / f"{int(name):04d}.npy"), fixed.array > 0, np.asarray(fixed.spacing)

    def score(field: np.ndarray) -> dict:
        error = np.linalg.norm((field - truth) * spacing, axis=-1)[inside].mean()
        s = score_case(field, compute_hd95=False)
        return {"epe": round(float(error), 4), "sdlogj": round(s["sdlogj"], 4), "folds_pct": round(100 * s["folding_fraction"], 4)}

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", nargs="+", default=["real"], help="'real' and/or semi-synthetic pair numbers")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "JSON"), required=True)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--pairs-cache", type=Path, default=Path("runs/paper_tables"), help="paper_tables.py's --cache")
    parser.add_argument("--starts", type=Path, default=Path("runs/refine_starts"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--io-iters", type=int, default=None, help="instance optimisation steps of the start (default: the preset's)")
    parser.add_argument("--no-repair", action="store_true")
    parser.add_argument("--invert-moving", action="store_true", help="invert each moving image's contrast (MIND refinement)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.starts.mkdir(parents=True, exist_ok=True)
    variants = [(name, json.loads(text)) for name, text in args.variant]
    for name, overrides in variants:
        refine_config("brain", **overrides)  # fail on a bad variant before any work
    repair = () if args.no_repair else ("fold_repair",)
    for pair in args.pairs:
        fixed, moving = _pair(pair, args.data, args.pairs_cache)
        if args.invert_moving:
            moving = _inverted(moving, args.starts)
        score = _scorer(pair, args.data, args.pairs_cache)
        suffix = ("" if args.io_iters is None else f"-io{args.io_iters}") + ("-inverted" if args.invert_moving else "")
        START.path = args.starts / f"{pair}{suffix}.pt"
        if not START.path.is_file():
            register(fixed, moving, affine=False, io_iterations=args.io_iters,
                     method=("network", "instance_optimisation", "cached_start"))
        for name, overrides in variants:
            OVERRIDES.clear()
            OVERRIDES.update(overrides)
            result = register(fixed, moving, affine=False, method=("cached_start", "variant_refinement", *repair))
            print(json.dumps({"pair": pair, "variant": name, **score(result.field),
                              "refinement_s": round(result.seconds["refinement"], 1)}), flush=True)


if __name__ == "__main__":
    main()
