"""What limits the synth-brain network's learning: three measurements behind docs/training.md ("What limits it, continued").

* ``iterations``: network-alone validation (label Dice of the maps 19-20 pairs, EPE of the semi-synthetic
  0003-0005 pairs) of the untrained network, ``brain.pt`` and a synth-brain checkpoint's best weights, with
  the recurrent iterations per stage as trained and changed at inference (``--iterations 4,3 8,6``);
* ``overfit``: stage 1 of the checkpoint's best weights trained on ONE training sample (the first label pair
  of phase 1 at ``--step``) with the training's own loss: can the network fit one crop (capacity)?
* ``crop-bound``: the same crop's soft Dice at zero displacement and for a free displacement field on the
  stage-1 grid optimised directly with the same loss, per regulariser weight (what any field on that grid
  can reach, and how regular it is).

The training config is the run's YAML (``--config``, e.g. ``training/synth-brain/run.yaml``); its data paths
are relative to the working directory, as in training. Brains 0001/0002 are never read.

    git show 1f72cfe:training/synth-brain/checkpoint.pt > synth-brain-checkpoint.pt   # the run's last checkpoint
    python benchmarks/learning_limits.py iterations --checkpoint synth-brain-checkpoint.pt
    python benchmarks/learning_limits.py overfit --steps 100 --checkpoint synth-brain-checkpoint.pt
    python benchmarks/learning_limits.py crop-bound --regulariser 1 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rwcnet import geometry
from rwcnet.model.files import build_model, load_model
from rwcnet.training.config import load_config
from rwcnet.training.data import TrainingData
from rwcnet.training.sampling import iterate_steps
from rwcnet.training.runtime import load_checkpoint
from rwcnet.training.steps import _label_loss, sample_loss, validate, validate_labels

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _best_weights(config, checkpoint: Path):
    model = build_model(config.network())
    model.load_state_dict(load_checkpoint(checkpoint, config)["best"])
    return model


def _first_label_sample(config, data: TrainingData, step: int):
    phase = config.phases[0]
    factor = config.network().stages[phase.stage - 1].downsample
    for samples in iterate_steps(data, 0, phase, factor, step, 0, 1):
        for sample in samples:
            if sample.fixed_onehot is not None:
                return sample
    raise SystemExit("no label pair in phase 1 from that step on")


def iterations(config, data: TrainingData, args) -> None:
    torch.manual_seed(config.seed)  # the untrained network is the one training starts from
    models = {"untrained": build_model(config.network()), "brain.pt": load_model(REPO / "src/rwcnet/weights/brain.pt")[0],
              "checkpoint best": _best_weights(config, args.checkpoint)}
    models = {name: model for name, model in models.items() if name in args.models}
    image_pairs, label_pairs = data.validation_samples(), data.validation_label_samples()
    for name, model in models.items():
        trained = [stage.config for stage in model.stages]
        for counts in args.iterations:
            for stage, count in zip(model.stages, counts):
                stage.config = stage.config.model_copy(update={"iterations": count})
            start = time.monotonic()
            result = validate(model, image_pairs, len(model.stages), CPU)
            result.update(validate_labels(model, label_pairs, len(model.stages), CPU))
            print(f"{name:16s} iterations {counts}: label Dice {result['label_dice']:.4f} (zero {result['label_dice_before']:.4f}), "
                  f"EPE {result['epe']:.3f} mm (zero {result['epe_before']:.3f}), SDlogJ {result['label_sdlogj']:.3f}, "
                  f"folding {result['label_folding']:.5f}  {time.monotonic() - start:.0f} s", flush=True)
        for stage, original in zip(model.stages, trained):
            stage.config = original


def overfit(config, data: TrainingData, args) -> None:
    model = _best_weights(config, args.checkpoint)
    sample = _first_label_sample(config, data, args.step)
    phase = config.phases[0]
    parameters = list(model.stages[0].parameters())
    optimiser = torch.optim.Adam(parameters, lr=args.lr)
    model.train()
    start = time.monotonic()
    for step in range(args.steps + 1):
        loss, terms = sample_loss(model, config, phase, sample, CPU)
        if step % 10 == 0 or step == args.steps:
            print(f"step {step}: soft label Dice {terms['label_dice']:.4f}, loss {terms['total']:.4f}  "
                  f"{time.monotonic() - start:.0f} s", flush=True)
        if step == args.steps:
            break
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, phase.grad_clip)
        optimiser.step()


def crop_bound(config, data: TrainingData, args) -> None:
    sample = _first_label_sample(config, data, args.step)
    factor = config.network().stages[0].downsample
    model = build_model(config.network())
    result = model(sample.fixed, sample.moving, num_stages=1, sequence=True, region=sample.region).stages[0]
    shape, origin = result.field.shape[2:], result.origin
    zero = _label_loss(config, [torch.zeros(1, 3, *shape)], sample, origin, factor, CPU)[1]
    print(f"crop {tuple(shape)} on the 1/{factor} grid: zero displacement soft Dice {zero['label_dice']:.4f}")
    for weight in args.regulariser:
        synthmorph = config.data.synthmorph.model_copy(update={"regulariser": weight})
        weighted = config.model_copy(update={"data": config.data.model_copy(update={"synthmorph": synthmorph})})
        field = torch.zeros(1, 3, *shape, requires_grad=True)
        optimiser = torch.optim.Adam([field], lr=0.1)
        for _ in range(args.steps):
            loss, terms = _label_loss(weighted, [field], sample, origin, factor, CPU)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        terms = _label_loss(weighted, [field.detach()], sample, origin, factor, CPU)[1]
        det = geometry.jacobian_determinant(field.detach())
        print(f"free field, regulariser {weight:g}, {args.steps} Adam steps: soft Dice {terms['label_dice']:.4f}, "
              f"SDlogJ {float(torch.log(det.clamp(1e-9, 1e9)).std()):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["iterations", "overfit", "crop-bound"])
    parser.add_argument("--config", type=Path, default=REPO / "training/synth-brain/run.yaml")
    parser.add_argument("--checkpoint", type=Path, help="iterations, overfit: a synth-brain training checkpoint "
                        "(git show 1f72cfe:training/synth-brain/checkpoint.pt)")
    parser.add_argument("--iterations", type=lambda text: tuple(int(n) for n in text.split(",")), nargs="+",
                        default=[(4, 3), (8, 6), (12, 9)])
    parser.add_argument("--models", nargs="+", default=["untrained", "brain.pt", "checkpoint best"],
                        choices=["untrained", "brain.pt", "checkpoint best"])
    parser.add_argument("--step", type=int, default=7, help="phase-1 step whose first label pair is the crop")
    parser.add_argument("--steps", type=int, default=None, help="overfit: 100; crop-bound: 300")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--regulariser", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.what != "crop-bound" and args.checkpoint is None:
        parser.error(f"{args.what} needs --checkpoint (git show 1f72cfe:training/synth-brain/checkpoint.pt > FILE)")
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    data = TrainingData(config, config.network().alignment)
    if args.what == "iterations":
        iterations(config, data, args)
    elif args.what == "overfit":
        args.steps = 100 if args.steps is None else args.steps
        overfit(config, data, args)
    else:
        args.steps = 300 if args.steps is None else args.steps
        crop_bound(config, data, args)


if __name__ == "__main__":
    main()
