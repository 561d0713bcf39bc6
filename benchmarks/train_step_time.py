"""Seconds per training step of a training preset or YAML config (default ``cpu-brain``), per phase, and of one validation.

Runs ``steps`` steps of every phase of the preset (validation on one
held-out pair at the end of each phase, no report) in a temporary folder and
prints the mean step time without the first step of each phase (which pays
for reading images). A step's time includes making its samples. With label-map
pairs (``synth-brain``) the steps are also split by sample kind (label pairs,
image pairs), since they cost differently.

    python benchmarks/train_step_time.py [--preset cpu-brain] [--steps 4] [--threads 1] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rwcnet.training.loop import train
from rwcnet.training.config import load_config
from rwcnet.training.log import read_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-brain")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    config = load_config(args.preset)
    data = config.data if args.data is None else config.data.model_copy(update={"dataset": args.data})
    config = config.model_copy(update={
        "phases": [p.model_copy(update={"steps": args.steps}) for p in config.phases],
        "validation": config.validation.model_copy(update={"pairs": 1, "every": args.steps}),
        "threads": args.threads if args.threads is not None else config.threads,
        "report": False, "data": data,
    })
    with tempfile.TemporaryDirectory() as folder:
        summary = train(config, Path(folder), progress=False)
        records = read_log(Path(folder) / "log.jsonl")
    result = {"preset": args.preset, "threads": config.threads, "wall_seconds": round(summary["wall_seconds"], 1)}
    for phase in sorted({r["phase"] for r in records}):
        train_records = [r for r in records if r["kind"] == "train" and r["phase"] == phase]
        steps = [r["seconds"] for r in train_records]
        validation = [r["seconds"] for r in records if r["kind"] == "validation" and r["phase"] == phase]
        stage = next(r["stage"] for r in records if r["phase"] == phase)
        kinds = {kind: [r["seconds"] for r in train_records[1:] if key in r]
                 for kind, key in (("label_pairs_s", "label_dice"), ("image_pairs_s", "mse"))}
        result[f"phase{phase}_stage{stage}"] = {
            **{kind: round(sum(v) / len(v), 2) for kind, v in kinds.items() if v},
            "first_step_s": round(steps[0], 2),
            "step_s": round(sum(steps[1:]) / max(len(steps) - 1, 1), 2),
            "validation_s": round(validation[-1], 2) if validation else None,
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
