"""Measure a shipped model and (re)write its model card: one command per card.

    python benchmarks/model_card.py brain [--model FILE] [--data ../shared/data] [--threads 2] [--write]
    python benchmarks/model_card.py lung  [--model FILE] [--data ../shared/data] [--threads 2] [--write]
        [--cases lung_model.json ...]

``brain``: the real pair 0001<-0002 and the same pair with the moving contrast inverted
(``where(m > 0, max(m[m > 0]) - m, 0)``, labels unchanged), each registration a whole
``rwcnet register`` command (batch mode, timed, ``--no-affine``: the pair is pre-aligned) scored
by ``rwcnet evaluate``. Rows: zero
displacement; the untrained network (the model's config, ``torch.manual_seed(0)``
initialisation, same metadata); the trained network alone (one forward pass: ``--no-io
--no-refine``); IO alone; network + IO; the default chain (network + IO + refinement). Per-label
Dice of the network alone and of network + IO, with the label names of the dataset.

``lung``: ``benchmarks/lung_model.py`` on its two pair settings (rows zero, IO alone, network
alone, network + IO, default).

Without ``--write`` the tables are printed. With it, the card ``src/rwcnet/weights/<name>.md``
is written from the hand-written template ``docs/model_cards/<name>.md``: its lines
``<!-- facts -->``, ``<!-- accuracy -->`` and ``<!-- per-label -->`` are replaced by the model
file's training facts and the measured tables (with the date, threads and load average).
Pause any training first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BRAIN_ROWS = [("zero displacement", None), ("untrained network", ["--model", "{untrained}", "--no-io", "--no-refine"]),
              ("network alone", ["--model", "{model}", "--no-io", "--no-refine"]),
              ("IO alone", ["--model", "none", "--io", "--no-refine"]),
              ("network + IO", ["--model", "{model}", "--io", "--no-refine"]),
              ("default (network + IO + refinement)", ["--model", "{model}"])]
PER_LABEL_ROWS = ("network alone", "network + IO")


def _load() -> str:
    with open("/proc/loadavg", encoding="utf-8") as handle:
        return handle.read().split()[0]


def _untrained_copy(model: Path, target: Path) -> None:
    from dataclasses import replace

    import torch

    from rwcnet.model import load_model, save_model
    from rwcnet.model.files import build_model

    trained, metadata = load_model(model)
    torch.manual_seed(0)
    untrained = replace(metadata, training={**metadata.training, "note": "untrained copy for the model card"})
    save_model(target, build_model(trained.config), untrained)


def _inverted_dataset(source: Path, target: Path) -> Path:
    """A copy of the dataset folder (links) whose validation moving images have their contrast inverted."""
    from rwcnet.data.datasets import Learn2RegDataset
    from rwcnet.data.formats import read_image, write_image
    from rwcnet.intensity import invert_contrast

    dataset = Learn2RegDataset(source)
    shutil.copytree(dataset.root, target, symlinks=True, copy_function=os.symlink)
    # The dataset JSON is a real copy: a link would resolve back to the source folder, and the inverted images
    # written below would silently not be read (the first version of this card script scored the real pair twice).
    json_copy = target / dataset.json_path.relative_to(dataset.root)
    json_copy.unlink()
    shutil.copyfile(dataset.json_path, json_copy)
    written = []
    for pair in dataset.pairs("val"):
        image = read_image(pair.moving)
        inverted = invert_contrast(image.array)
        destination = target / Path(pair.moving).relative_to(dataset.root)
        destination.unlink()
        write_image(destination, inverted, image)
        written.append(destination.resolve())
    read_back = [Path(pair.moving).resolve() for pair in Learn2RegDataset(target).pairs("val")]
    if read_back != written:
        raise RuntimeError(f"the inverted dataset {target} reads {read_back}, not the inverted images {written}")
    return target


def _zero_fields(dataset: Path, out: Path) -> None:
    from rwcnet.data.datasets import Learn2RegDataset, field_names
    from rwcnet.data.formats import read_image, write_field

    for pair in Learn2RegDataset(dataset).pairs("val"):
        fixed = read_image(pair.fixed)
        write_field(out / field_names(pair.fixed, pair.moving)[0], np.zeros((*fixed.shape, 3), np.float32), fixed)


def brain_rows(model: Path, data: Path, threads: int, work: Path) -> dict:
    """Every brain row on the real pair and on the contrast-inverted pair: aggregates, per-label Dice, seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    untrained = work / "untrained.pt"
    _untrained_copy(model, untrained)
    results: dict = {}
    datasets = {"real pair": data / "brain", "inverted contrast": _inverted_dataset(data / "brain", work / "inverted")}
    for setting, dataset in datasets.items():
        for name, options in BRAIN_ROWS:
            if setting == "inverted contrast" and name == "untrained network":
                continue
            out = work / "fields" / setting.replace(" ", "_") / name.replace(" ", "_").replace("+", "and")
            out.mkdir(parents=True)
            seconds = float("nan")
            if options is None:
                _zero_fields(dataset, out)
            else:
                options = [o.format(model=model, untrained=untrained) for o in options]
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "rwcnet", "register", "--dataset", str(dataset), "--pairs", "val",
                                "--output-dir", str(out), "--device", "cpu", "--no-affine", *options], check=True, env=env,
                               capture_output=True, text=True)
                seconds = time.perf_counter() - start
            subprocess.run([sys.executable, "-m", "rwcnet", "evaluate", "--dataset", str(dataset), "--displacements",
                            str(out), "--output", str(out / "scores.json")], check=True, capture_output=True, text=True)
            scores = json.loads((out / "scores.json").read_text())
            case = next(iter(scores["cases"].values()))
            results[(setting, name)] = {**{k: case.get(k, float("nan")) for k in ("dice", "hd95", "sdlogj", "folding_fraction")},
                                        "seconds": seconds, "dice_per_label": case.get("dice_per_label", {})}
            row = results[(setting, name)]
            print(f"{setting:18} {name:36} Dice {row['dice']:.4f}  SDlogJ {row['sdlogj']:.4f}  "
                  f"folds {100 * row['folding_fraction']:.3f} %  {seconds:6.1f} s", flush=True)
    return results


def brain_tables(results: dict) -> tuple[str, str]:
    """The accuracy table and the per-label Dice table (markdown) of :func:`brain_rows`."""
    from rwcnet.evaluation.label_names import freesurfer_aseg_names

    lines = ["| pair | row | Dice (30 labels) | HD95 (voxels) | SDlogJ | folded % | time s |", "|---|---|---|---|---|---|---|"]
    for (setting, name), row in results.items():
        seconds = "–" if np.isnan(row["seconds"]) else f"{row['seconds']:.1f}"
        lines.append(f"| {setting} | {name} | {row['dice']:.4f} | {row['hd95']:.2f} | {row['sdlogj']:.4f} | "
                     f"{100 * row['folding_fraction']:.3f} | {seconds} |")
    names = freesurfer_aseg_names()
    columns = [(s, n) for s in ("real pair", "inverted contrast") for n in PER_LABEL_ROWS if (s, n) in results]
    labels = sorted({int(k) for key in columns for k in results[key]["dice_per_label"]})
    per_label = ["| label | " + " | ".join(f"{n} ({s})" for s, n in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in labels:
        values = " | ".join(f"{results[key]['dice_per_label'].get(str(label), float('nan')):.3f}" for key in columns)
        per_label.append(f"| {label} {names.get(label, '')} | {values} |")
    return "\n".join(lines), "\n".join(per_label)


def lung_table(model: Path, data: Path, threads: int, work: Path, measured: list[Path] | None = None) -> str:
    """``benchmarks/lung_model.py``'s mean table for ``model``; from its ``--output`` files ``measured`` when given."""
    if measured:
        cases = [case for path in measured for case in json.loads(path.read_text())]
    else:
        out = work / "lung.json"
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "lung_model.py"), "--model", str(model), "--data",
                        str(data), "--threads", str(threads), "--output", str(out)], check=True)
        cases = json.loads(out.read_text())
    lines = ["| pairs | row | TRE mm | folded % | SDlogJ | s / pair |", "|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(c["setting"] for c in cases):
        for row in dict.fromkeys(c["row"] for c in cases):
            chosen = [c for c in cases if c["setting"] == setting and c["row"] == row]
            mean = {k: float(np.mean([c[k] for c in chosen])) for k in ("tre_mm", "folds", "sdlogj", "seconds")}
            lines.append(f"| {setting} ({len(chosen)}) | {row} | {mean['tre_mm']:.2f} | {100 * mean['folds']:.3f} | "
                         f"{mean['sdlogj']:.3f} | {mean['seconds']:.0f} |")
    return "\n".join(lines)


def facts(model: Path) -> str:
    """Training facts from the model file's metadata."""
    from rwcnet.model import load_model

    network, metadata = load_model(model)
    parameters = sum(p.numel() for p in network.parameters())
    training = metadata.training
    steps = ", ".join(f"{k} {v}" for k, v in training.get("steps", {}).items())
    wall = training.get("wall_seconds")
    averaged = [f"{entry['weight']:g} × `{entry['file']}` ({entry.get('wall_seconds', 0) / 60:.0f} min)"
                for entry in training.get("average_of", [])]
    if averaged and wall is None:
        wall = sum(entry.get("wall_seconds", 0.0) for entry in training["average_of"])
    return "\n".join([
        *([f"- The parameter-wise average of {', '.join(averaged)}; wall time below is their sum."] if averaged else []),
        f"- File: `{model.name}`, {model.stat().st_size / 2**20:.1f} MB, {parameters:,} parameters, network preset "
        f"`{training.get('network_preset', '?')}`, modality `{metadata.modality}`.",
        f"- Training preset `{training.get('training_preset', '?')}`; steps: {steps or '?'}; seed {training.get('seed', '?')}; "
        f"wall time {'?' if wall is None else f'{wall / 60:.0f} min'}.",
        f"- Grid: {metadata.orientation} at {list(metadata.spacing_mm or [])} mm; intensities: {metadata.normalisation}.",
        f"- Training images: {', '.join(training.get('training_images', [])) or '?'}.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("card", choices=["brain", "lung"])
    parser.add_argument("--model", type=Path, help="model file (default: the shipped one)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", type=Path, nargs="+", help="lung: lung_model.py --output files of this model "
                        "(rows measured in separate runs) instead of measuring again")
    parser.add_argument("--write", action="store_true", help="write src/rwcnet/weights/<card>.md from docs/model_cards/")
    args = parser.parse_args()
    model = args.model or REPO / "src" / "rwcnet" / "weights" / f"{args.card}.pt"
    stamp = (f"Measured {datetime.date.today().isoformat()} with `python benchmarks/model_card.py {args.card}`, "
             f"{args.threads} threads, load average {_load()} at the start.")
    with tempfile.TemporaryDirectory(prefix="model_card_") as tmp:
        if args.card == "brain":
            accuracy, per_label = brain_tables(brain_rows(model, args.data, args.threads, Path(tmp)))
        else:
            accuracy, per_label = lung_table(model, args.data, args.threads, Path(tmp), args.cases), ""
            if args.cases:
                stamp = (f"Measured {datetime.date.today().isoformat()} with `python benchmarks/lung_model.py` (rows in "
                         f"separate runs, collected with `model_card.py lung --cases`); see each row's seconds.")
    print(accuracy, per_label, sep="\n\n")
    if args.write:
        template = (REPO / "docs" / "model_cards" / f"{args.card}.md").read_text(encoding="utf-8")
        card = (template.replace("<!-- facts -->", facts(model)).replace("<!-- accuracy -->", f"{stamp}\n\n{accuracy}")
                .replace("<!-- per-label -->", per_label))
        target = REPO / "src" / "rwcnet" / "weights" / f"{args.card}.md"
        tmp_path = target.with_suffix(".md.tmp")
        tmp_path.write_text(card, encoding="utf-8")
        os.replace(tmp_path, target)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
