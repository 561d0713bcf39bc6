"""The protocol of the paper's Tables 2 and 3 on the data we have, on a CPU budget; resumable.

    python benchmarks/paper_tables.py all [--cache results/paper-tables] [--data ../shared/data]
    python benchmarks/paper_tables.py prepare | train | run | score | report

Steps (``all`` runs them in order; each skips what is already done, so an
interrupted run continues where it stopped, across sessions):

* ``prepare`` writes two Learn2Reg-layout datasets under ``CACHE/data``:
  ``SYNBRAIN`` — 10 semi-synthetic pairs of the two labelled subjects 0001 and 0002
  (fixed: the subject; moving: it warped by a seeded random deformation of 6-10 mm with
  intensity perturbation; labels carried), and ``SYNLUNG`` — 6 semi-synthetic breathing pairs
  of the shared thorax CT (10-20 mm, lung masks, 1000 keypoints carried through the known
  field). The labelled subjects never enter training, so they are held out for every network.
  The real pair 0001←0002 is read from ``DATA/brain`` itself.
* ``train`` trains each network row that has no model yet with the ``cpu-brain`` schedule
  (:func:`rwcnet.training.config.training_preset`), its network replaced (``rwcnet train
  --resume``, so an interrupted training continues). The ``rwcnet`` row uses the shipped
  ``brain`` weights, trained with that same schedule. With ``SYNLUNG`` among the datasets,
  every network row also gets a lung network: the same schedule on random
  deformations of the one shared CT (:func:`lung_schedule`; ``prepare`` writes that
  one-image training set as ``LUNGTRAIN``).
* ``run`` registers every (method, case) in its own subprocess and records wall time and peak
  resident memory (``VmHWM``); the field is written with the Learn2Reg name, then a small JSON
  record. A record present means done.
* ``score`` runs ``rwcnet evaluate`` on each (method, dataset) whose fields are complete, and
  the endpoint error against the known fields of the semi-synthetic pairs.
* ``report`` writes ``docs/results.md`` from the scores (``benchmarks/paper_tables_report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BRAIN_PAIRS = 10
LUNG_PAIRS = 6


@dataclass(frozen=True)
class Method:
    """One table row: how ``register`` is called, and the model it needs (None: no network)."""

    name: str
    table: int
    options: dict
    model: str | None = None  # "shipped:brain" or the training run name under CACHE/train
    network: str | None = None  # network preset trained with the cpu-brain schedule
    lung_model: str | None = None  # training run name under CACHE/train of the network for SYNLUNG
    peer: str | None = None  # classical peer run in its own environment (rwcnet.baselines.peers)
    peer_arguments: tuple[str, ...] = ()  # after the threads (greedy: iterations per level)


METHODS = [
    Method("zero displacement", 2, {}),
    Method("ConvexAdam", 2, {"method": "convexadam", "io": True}),
    Method("ConvexAdam without IO", 2, {"method": "convexadam", "io": False}),
    Method("LapIRN", 2, {"io": False, "refine": False, "repair_folds": False}, model="lapirn", network="lapirn-cpu", lung_model="lapirn_lung"),
    Method("RWCNet", 2, {"io": False, "refine": False, "repair_folds": False}, model="shipped:brain", network="cpu", lung_model="rwcnet_lung"),
    Method("RWCNet with IO", 2, {"io": True, "refine": False, "repair_folds": False}, model="shipped:brain", network="cpu", lung_model="rwcnet_lung"),
    Method("RWCNet with IO and refinement", 2, {"io": True, "refine": True}, model="shipped:brain", network="cpu",
           lung_model="rwcnet_lung"),
    Method("IO and refinement (no network)", 2, {"io": True, "refine": True}),
    Method("IO alone", 2, {"io": True, "refine": False, "repair_folds": False}),
    Method("ANTs SyN", 2, {}, peer="ants"),
    Method("elastix B-spline", 2, {}, peer="elastix"),
    Method("greedy", 2, {}, peer="greedy"),
    Method("greedy 50x25x10", 2, {}, peer="greedy", peer_arguments=("50x25x10",)),
    Method("single resolution", 3, {"io": False, "refine": False, "repair_folds": False}, model="single_resolution", network="cpu:single_resolution",
           lung_model="single_resolution_lung"),
    Method("no correlation", 3, {"io": False, "refine": False, "repair_folds": False}, model="no_correlation", network="cpu:no_correlation",
           lung_model="no_correlation_lung"),
    Method("2 RNN steps", 3, {"io": False, "refine": False, "repair_folds": False}, model="steps2", network="cpu:steps=2", lung_model="steps2_lung"),
]
DATASETS = {"BRAIN": "brain (real pair 0001<-0002)", "SYNBRAIN": "brain, semi-synthetic", "SYNLUNG": "lung, semi-synthetic"}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _memory_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


# --------------------------------------------------------------------------------------- prepare
def _write_dataset(root: Path, name: str, meta: dict) -> None:
    from rwcnet.outputs import atomic_output

    with atomic_output(root / f"{name}_dataset.json") as tmp:
        Path(tmp).write_text(json.dumps(meta, indent=2))


def prepare_brain(data: Path, cache: Path) -> None:
    """``SYNBRAIN``: pairs ``0001..0010`` (fixed ``_0000`` = subject, moving ``_0001`` = warped copy)."""
    from rwcnet.data.formats import read_image, write_image
    from rwcnet.synthetic import IntensitySettings, make_pair, random_deformation

    root = cache / "data" / "SYNBRAIN"
    if (root / "SYNBRAIN_dataset.json").is_file():
        return
    source = json.loads((data / "brain" / "BRAIN_dataset.json").read_text())
    for folder in ("imagesTr", "labelsTr", "truth"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    pairs, training = [], []
    for index in range(BRAIN_PAIRS):
        subject = ("0001", "0002")[index % 2]
        image = read_image(data / "brain" / "imagesTr" / f"BRAIN_{subject}_0000.nii.gz")
        labels = read_image(data / "brain" / "labelsTr" / f"BRAIN_{subject}_0000.nii.gz")
        magnitude = 6.0 + index % 5
        phi = random_deformation(image.shape, image.spacing, magnitude_mm=magnitude, smoothness_mm=20.0, seed=100 + index)
        pair = make_pair(image.array, labels=np.rint(labels.array).astype(np.int32), deformation=phi,
                         spacing_mm=image.spacing, warped_role="moving", intensity=IntensitySettings(), seed=100 + index)
        case = f"{index + 1:04d}"
        names = {}
        for phase, volume, label in (("0000", pair.fixed, pair.fixed_labels), ("0001", pair.moving, pair.moving_labels)):
            names[phase] = f"SYNBRAIN_{case}_{phase}.nii.gz"
            write_image(root / "imagesTr" / names[phase], volume[0, 0].numpy().astype(np.float32), image)
            write_image(root / "labelsTr" / names[phase], label[0, 0].numpy().astype(np.int16), image)
            training.append({"image": f"./imagesTr/{names[phase]}", "label": f"./labelsTr/{names[phase]}"})
        np.save(root / "truth" / f"{case}.npy", pair.field_l2r().astype(np.float32))
        pairs.append({"fixed": f"./imagesTr/{names['0000']}", "moving": f"./imagesTr/{names['0001']}",
                      "magnitude_mm": magnitude, "seed": 100 + index, "subject": subject})
    meta = {"name": "SYNBRAIN", "pairings": "paired", "modality": {"0": "MR"},
            "evaluation_labels": source["evaluation_labels"], "training": training, "registration_val": pairs}
    _write_dataset(root, "SYNBRAIN", meta)


def lung_pair(ct: np.ndarray, mask: np.ndarray, spacing: tuple, *, amplitude_mm: float, seed: int, keypoints: int = 1000,
              expansion: float = 0.2, variation: float = 0.1):
    """One breathing pair of the shared CT (LPI: axis 2 runs to the feet): the moving image is the CT warped by
    a breathing field of ``amplitude_mm`` (negative: exhale-like), keypoints in the lungs carried along."""
    from rwcnet import synthetic

    phi = synthetic.breathing_deformation(ct.shape, spacing, amplitude_mm=amplitude_mm, axis=2, towards="+",
                                          lung_mask=mask, expansion=expansion, variation=variation, seed=seed)
    return synthetic.make_pair(ct, mask=mask, deformation=phi, spacing_mm=spacing, warped_role="moving",
                               n_keypoints=keypoints, keypoint_distance=4.0, seed=seed)


def prepare_lung(data: Path, cache: Path, keypoints: int = 1000) -> None:
    """``SYNLUNG``: breathing pairs of the shared CT with lung masks and keypoints."""
    from rwcnet import masks
    from rwcnet.data.formats import read_image, write_image

    root = cache / "data" / "SYNLUNG"
    if (root / "SYNLUNG_dataset.json").is_file():
        return
    ct = read_image(data / "lung" / "imagesTr" / "LUNG_0001_0000.nii.gz")
    spacing = tuple(float(s) for s in ct.spacing)
    array = ct.array.astype(np.float32)
    mask = masks.lung_mask(array, spacing, axis=2)
    for folder in ("imagesTr", "masksTr", "keypointsTr", "truth"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    pairs, training = [], []
    for index in range(LUNG_PAIRS):
        amplitude = 10.0 + 2.0 * index
        pair = lung_pair(array, mask, spacing, amplitude_mm=amplitude, seed=200 + index, keypoints=keypoints)
        case = f"{index + 1:04d}"
        entries = {}
        for phase, volume, lung, points in (("0000", pair.fixed, pair.fixed_mask, pair.fixed_keypoints),
                                            ("0001", pair.moving, pair.moving_mask, pair.moving_keypoints)):
            name = f"SYNLUNG_{case}_{phase}"
            write_image(root / "imagesTr" / f"{name}.nii.gz", volume[0, 0].numpy().astype(np.float32), ct)
            write_image(root / "masksTr" / f"{name}.nii.gz", lung[0, 0].numpy().astype(np.uint8), ct)
            np.savetxt(root / "keypointsTr" / f"{name}.csv", points.numpy(), delimiter=",", fmt="%.4f")
            entries[phase] = f"./imagesTr/{name}.nii.gz"
            training.append({"image": entries[phase], "mask": f"./masksTr/{name}.nii.gz",
                             "keypoints": f"./keypointsTr/{name}.csv"})
        np.save(root / "truth" / f"{case}.npy", pair.field_l2r().astype(np.float32))
        pairs.append({"fixed": entries["0000"], "moving": entries["0001"], "amplitude_mm": amplitude, "seed": 200 + index})
    meta = {"name": "SYNLUNG", "pairings": "paired", "modality": {"0": "CT"}, "training": training,
            "registration_val": pairs}
    _write_dataset(root, "SYNLUNG", meta)


def prepare_lung_training(data: Path, cache: Path) -> None:
    """``LUNGTRAIN``: the shared thorax CT as the one training image of the lung networks.

    There is no other CT, so the lung networks train on random deformations of the very
    CT that the ``SYNLUNG`` test pairs deform by breathing fields (other seeds, another kind of
    field): the same anatomy, which the report states.
    """
    root = cache / "data" / "LUNGTRAIN"
    if (root / "LUNGTRAIN_dataset.json").is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    image = (data / "lung" / "imagesTr" / "LUNG_0001_0000.nii.gz").resolve()
    meta = {"name": "LUNGTRAIN", "pairings": "unpaired", "modality": {"0": "CT"}, "training": [{"image": str(image)}]}
    _write_dataset(root, "LUNGTRAIN", meta)


# ----------------------------------------------------------------------------------------- train
def model_path(method: Method, cache: Path, dataset: str = "BRAIN") -> Path | None:
    """The model file a network row uses on ``dataset`` (None when it needs none); may not exist yet."""
    if dataset == "SYNLUNG":
        return cache / "train" / method.lung_model / "model.pt" if method.lung_model else None
    if method.model is None:
        return None
    if method.model.startswith("shipped:"):
        from rwcnet.pipeline.network import shipped_model_path

        return shipped_model_path(method.model.split(":", 1)[1])
    return cache / "train" / method.model / "model.pt"


def lung_schedule(config, dataset: Path):
    """The cpu-brain schedule with the lung data: the one CT, random 5-15 mm deformations, a Hounsfield window.

    Same steps, patches, learning rate and losses as the brain networks; only the data change:
    no real pairs (there is one CT), larger and smoother deformations (breathing moves the
    diaphragm 10-20 mm), the ``window`` intensity range that ``register`` uses for CT, and patch
    centres in the body (normalised intensity above 0.05, i.e. above about -920 HU).
    """
    from rwcnet.intensity import CT_RANGES
    from rwcnet.training.config import Normalisation, SyntheticConfig

    low, high = CT_RANGES["window"]
    data = config.data.model_copy(update={
        "dataset": str(dataset), "exclude": [], "real_fraction": 0.0,
        "synthetic": SyntheticConfig(magnitude_mm=(5.0, 15.0), smoothness_mm=(20.0, 40.0)),
        "normalisation": Normalisation(kind="window", low=low, high=high), "foreground_threshold": 0.05,
    })
    validation = config.validation.model_copy(update={"magnitude_mm": 12.0, "smoothness_mm": 30.0})
    return config.model_copy(update={"data": data, "validation": validation, "report": False})


def train(method: Method, data: Path, cache: Path, dataset: str = "BRAIN") -> None:
    """Train one network row for ``dataset`` (brain, or SYNLUNG: its lung network) with the cpu-brain schedule (resuming)."""
    import yaml

    from rwcnet.training.config import dump_config, training_preset

    lung = dataset == "SYNLUNG"
    path = model_path(method, cache, dataset)
    name = method.lung_model if lung else method.model
    if path is None or method.network is None or path.is_file() or str(name).startswith("shipped:"):
        return
    config = training_preset("cpu-brain")
    updates = {"model": method.network, "name": f"paper-tables-{name}"}
    if method.network.endswith("single_resolution"):
        updates["phases"] = [p for p in config.phases if p.stage == 1]
    elif method.network.startswith("lapirn"):
        first, second = config.phases
        updates["phases"] = [first, second, second.model_copy(update={"stage": 3})]
    config = config.model_copy(update=updates)
    source = cache / "data" / "LUNGTRAIN" if lung else data / "brain"
    if lung:
        config = lung_schedule(config, source)
    run = cache / "train" / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "experiment.yaml").write_text(dump_config(config))
    yaml.safe_load((run / "experiment.yaml").read_text())  # fail early on a config that does not round-trip
    command = [sys.executable, "-m", "rwcnet", "train", str(run / "experiment.yaml"), "--output", str(run),
               "--resume", "--data", str(source)]
    print(f"train {method.name} ({dataset}): {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)


# ------------------------------------------------------------------------------------------- run
def cases(dataset: str, data: Path, cache: Path) -> list:
    """The pairs of one dataset (``rwcnet.data.datasets.Pair``)."""
    from rwcnet.data.datasets import Learn2RegDataset

    root = data / "brain" if dataset == "BRAIN" else cache / "data" / dataset
    return Learn2RegDataset(root).pairs("val")


def _record_path(cache: Path, method: Method, dataset: str, pair) -> Path:
    return cache / "runs" / _slug(method.name) / dataset / f"{pair.key.replace('<--', '_from_')}.json"


def field_dir(cache: Path, method: Method, dataset: str) -> Path:
    return cache / "fields" / _slug(method.name) / dataset


def worker(payload: str) -> None:
    """Subprocess: register one pair, write the Learn2Reg field, print time and peak memory as JSON."""
    import torch

    from rwcnet.data.datasets import field_names
    from rwcnet.data.formats import read_image, write_field
    from rwcnet.register import register

    job = json.loads(payload)
    torch.set_num_threads(job["threads"])
    fixed, moving = read_image(job["fixed"]), read_image(job["moving"])
    masks = {k: read_image(job[k]) for k in ("fixed_mask", "moving_mask") if job.get(k)}
    base = _memory_kb("VmRSS")
    start = time.perf_counter()
    peak = None
    if job["method"] == "zero displacement":
        field = np.zeros((*fixed.shape, 3), np.float32)
    elif job.get("peer"):
        from rwcnet.baselines.peers import run_peer

        result = run_peer(job["peer"], fixed, moving, threads=job["threads"], arguments=tuple(job.get("peer_arguments", ())))
        field, peak = result.field, result.peak_gb
    else:
        options = dict(job["options"])
        if job.get("model"):
            options["model"] = job["model"]
        elif options.get("method") != "convexadam":
            options["model"] = None
        result = register(fixed, moving, modality=job["modality"], device="cpu", seed=0, affine=False, **masks,
                          **options)  # Learn2Reg pairs come pre-aligned: --no-affine
        field = result.field
    seconds = time.perf_counter() - start
    out = Path(job["output"])
    write_field(out / field_names(job["fixed"], job["moving"])[0], field.astype(np.float32), fixed)
    peak = max(peak or 0.0, _memory_kb("VmHWM") / 2**20)  # a peer's own process, or this one
    print(json.dumps({"seconds": seconds, "peak_gb": peak, "base_gb": base / 2**20, "threads": job["threads"]}))


def blocked(method: Method, dataset: str, cache: Path) -> str | None:
    """Why ``method`` cannot run on ``dataset`` yet (None when it can)."""
    path = model_path(method, cache, dataset)
    if method.model is not None and (path is None or not path.is_file()):
        return f"not run: model {method.lung_model if dataset == 'SYNLUNG' else method.model} not trained yet"
    if method.peer is not None:
        from rwcnet.baselines.peers import peer_python

        if peer_python(method.peer) is None:
            return f"not run: peer {method.peer} not set up (see rwcnet.baselines.peers)"
    return None


def row_status(method: Method, dataset: str, data: Path, cache: Path) -> str:
    """``blocked`` reason, or how many pairs are done."""
    pairs = cases(dataset, data, cache)
    done = sum(_record_path(cache, method, dataset, p).is_file() for p in pairs)
    return blocked(method, dataset, cache) or f"{done}/{len(pairs)} pairs run"


def run(method: Method, dataset: str, data: Path, cache: Path, threads: int) -> str:
    """Register every pair of ``dataset`` with ``method`` that has no record yet; returns a status line."""
    modality = "ct" if dataset == "SYNLUNG" else "mr"
    reason = blocked(method, dataset, cache)
    if reason:
        return reason
    path = model_path(method, cache, dataset)
    done = 0
    pairs = cases(dataset, data, cache)
    for pair in pairs:
        record = _record_path(cache, method, dataset, pair)
        if record.is_file():
            done += 1
            continue
        job = {"method": method.name, "options": method.options, "model": str(path) if path else None, "peer": method.peer,
               "peer_arguments": list(method.peer_arguments), "fixed": str(pair.fixed), "moving": str(pair.moving), "modality": modality, "threads": threads,
               "output": str(field_dir(cache, method, dataset))}
        if dataset == "SYNLUNG":
            job["fixed_mask"], job["moving_mask"] = (str(Path(str(p).replace("imagesTr", "masksTr"))) for p in (pair.fixed, pair.moving))
        Path(job["output"]).mkdir(parents=True, exist_ok=True)
        process = subprocess.run([sys.executable, __file__, "worker", json.dumps(job)], capture_output=True, text=True, cwd=REPO)
        if process.returncode != 0:
            raise RuntimeError(f"{method.name} on {pair.key} failed:\n{process.stderr[-3000:]}")
        result = json.loads(process.stdout.strip().splitlines()[-1])
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, record)
        done += 1
        print(f"  {method.name:22} {dataset:8} {pair.key:40} {result['seconds']:7.1f} s {result['peak_gb']:5.2f} GB", flush=True)
    return f"{done}/{len(pairs)} pairs"


# ----------------------------------------------------------------------------------------- score
def score(method: Method, dataset: str, data: Path, cache: Path) -> dict | None:
    """``rwcnet evaluate`` on a complete (method, dataset), plus endpoint errors; cached as JSON."""
    pairs = cases(dataset, data, cache)
    records = [_record_path(cache, method, dataset, p) for p in pairs]
    if not all(r.is_file() for r in records):
        return None
    out = cache / "scores" / f"{_slug(method.name)}_{dataset}.json"
    if out.is_file() and out.stat().st_mtime >= max(r.stat().st_mtime for r in records):
        return json.loads(out.read_text())
    root = data / "brain" if dataset == "BRAIN" else cache / "data" / dataset
    evaluation = cache / "scores" / f"{_slug(method.name)}_{dataset}.evaluate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "rwcnet", "evaluate", "--dataset", str(root), "--displacements",
               str(field_dir(cache, method, dataset)), "--pairs", "val", "--output", str(evaluation)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    scores = json.loads(evaluation.read_text())
    from rwcnet.data.datasets import field_names
    from rwcnet.data.formats import read_field, read_image

    for pair, record in zip(pairs, records):
        case = scores["cases"][pair.key]
        case.update(json.loads(record.read_text()))
        truth = root / "truth" / f"{Path(pair.fixed).name.split('_')[1]}.npy" if dataset != "BRAIN" else None
        if truth is not None:
            field = read_field(field_dir(cache, method, dataset) / field_names(pair.fixed, pair.moving)[0])
            spacing = np.asarray(read_image(pair.fixed).spacing)
            fixed = read_image(pair.fixed).array
            inside = fixed > (0.0 if dataset == "SYNBRAIN" else -1e9)
            if dataset == "SYNLUNG":
                inside = read_image(str(pair.fixed).replace("imagesTr", "masksTr")).array > 0
            case["epe"] = float(np.linalg.norm((field - np.load(truth)) * spacing, axis=-1)[inside].mean())
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(scores))
    os.replace(tmp, out)
    return scores


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=["prepare", "train", "run", "score", "report", "all"])
    parser.add_argument("--cache", type=Path, default=REPO / "results" / "paper-tables")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=[m.name for m in METHODS], help="row names to run")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    args = parser.parse_args()
    methods = [m for m in METHODS if m.name in args.methods]
    started = time.perf_counter()
    if args.step in ("prepare", "all"):
        prepare_brain(args.data, args.cache)
        prepare_lung(args.data, args.cache)
        prepare_lung_training(args.data, args.cache)
    if args.step in ("train", "all"):
        for dataset in [d for d in ("BRAIN", "SYNLUNG") if d in args.datasets or (d == "BRAIN" and "SYNBRAIN" in args.datasets)]:
            if dataset == "SYNLUNG":
                prepare_lung_training(args.data, args.cache)
            for method in methods:
                train(method, args.data, args.cache, dataset)
    if args.step in ("run", "all"):
        for method in methods:
            for dataset in args.datasets:
                print(f"{method.name:22} {dataset:8} {run(method, dataset, args.data, args.cache, args.threads)}", flush=True)
    if args.step in ("score", "all", "report"):
        for method in methods:
            for dataset in args.datasets:
                score(method, dataset, args.data, args.cache)
    if args.step in ("report", "all"):
        from paper_tables_report import write_report

        write_report(args.cache, args.data, REPO / "docs" / "results.md")
    print(f"{args.step}: {time.perf_counter() - started:.0f} s this call")


if __name__ == "__main__":
    main()
