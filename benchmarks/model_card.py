"""The numbers of a model card: the real pair 0001<-0002 scored by ``rwcnet evaluate``, all rows in one run.

    python benchmarks/model_card.py --model src/rwcnet/weights/brain.pt [--data ../shared/data/brain] [--threads 2]

Rows: zero displacement; the untrained network (the model's own config, weights from
``torch.manual_seed(0)`` initialisation, metadata copied so that it sees the same inputs);
the trained network; instance optimisation (IO, brain preset) alone; the network followed by IO.
Each registration is ``rwcnet register`` in batch mode on the dataset's validation pair, timed
as a whole command; each score is ``rwcnet evaluate`` on its output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _untrained_copy(model: Path, target: Path) -> None:
    from dataclasses import replace

    import torch

    from rwcnet.model import load_model, save_model
    from rwcnet.model.files import build_model

    trained, metadata = load_model(model)
    torch.manual_seed(0)
    untrained = build_model(trained.config)
    save_model(target, untrained, replace(metadata, training={**metadata.training, "note": "untrained copy for the model card"}))


def _zero_fields(dataset: Path, out: Path) -> None:
    """Zero displacement fields for the dataset's validation pairs, with their Learn2Reg names."""
    import numpy as np

    from rwcnet.data.datasets import Learn2RegDataset
    from rwcnet.data.datasets import field_names
    from rwcnet.data.formats import read_image, write_field

    for pair in Learn2RegDataset(dataset).pairs("val"):
        fixed = read_image(pair.fixed)
        write_field(out / field_names(pair.fixed, pair.moving)[0], np.zeros((*fixed.shape, 3), np.float32), fixed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "src" / "rwcnet" / "weights" / "brain.pt")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "brain")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="model_card_") as tmp:
        untrained = Path(tmp) / "untrained.pt"
        _untrained_copy(args.model, untrained)
        rows = [("zero displacement", None), ("untrained network", ["--model", str(untrained), "--no-io"]),
                ("trained network", ["--model", str(args.model), "--no-io"]), ("IO alone", ["--model", "none", "--io"]),
                ("trained network + IO", ["--model", str(args.model), "--io"])]
        print(f"real pair 0001<-0002 of {args.data}; model {args.model}; {args.threads} threads")
        print(f"{'row':22} {'Dice':>7} {'HD95':>7} {'SDlogJ':>7} {'folded %':>8} {'time s':>7}")
        for name, options in rows:
            out = Path(tmp) / name.replace(" ", "_").replace("+", "and")
            out.mkdir()
            seconds = float("nan")
            if options is None:
                _zero_fields(args.data, out)
            else:
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "rwcnet", "register", "--dataset", str(args.data), "--pairs", "val",
                                "--output-dir", str(out), "--device", "cpu", "--no-affine", *options], check=True, env=env,
                               capture_output=True, text=True)
                seconds = time.perf_counter() - start
            subprocess.run([sys.executable, "-m", "rwcnet", "evaluate", "--dataset", str(args.data), "--displacements",
                            str(out), "--output", str(out / "scores.json")], check=True, capture_output=True, text=True)
            aggregates = json.loads((out / "scores.json").read_text())["aggregates"]
            value = lambda key: aggregates[key]["mean"] if key in aggregates else float("nan")  # noqa: E731
            print(f"{name:22} {value('dice'):7.4f} {value('hd95'):7.2f} {value('sdlogj'):7.4f} "
                  f"{100 * value('folding_fraction'):8.3f} {seconds:7.1f}", flush=True)


if __name__ == "__main__":
    main()
