"""Seconds to make, forward and backward one training sample, per phase and sample kind, of a training config.

Runs ``--samples`` samples of every phase of the config (default
``synth-brain``) through the loss and its backward pass on an untrained
network (no optimiser step), printing one line per sample: phase, stage,
patch, sample key (``labels:NN-MM`` label-map pairs; real or
``synthetic:`` image pairs), and the seconds of each part, with the load
average. ``--whole-grid`` adds the first phase once more without its patch,
as the comparator for training on patches. Pause other training first
(``kill -STOP``) and compare numbers of one run only.

    python benchmarks/train_sample_cost.py [--config synth-brain] [--samples 3] [--threads 1] [--whole-grid]
"""

from __future__ import annotations

import argparse
import time

import torch

from rwcnet.model.files import build_model
from rwcnet.training.config import load_config
from rwcnet.training.data import TrainingData
from rwcnet.training.steps import sample_loss


def _load() -> str:
    with open("/proc/loadavg", encoding="utf-8") as handle:
        return handle.read().split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="synth-brain")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--whole-grid", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    torch.manual_seed(config.seed)
    model = build_model(config.network())
    model.train()
    data = TrainingData(config, model.config.alignment)
    runs = [(index, phase) for index, phase in enumerate(config.phases)]
    if args.whole_grid:
        runs.append((0, config.phases[0].model_copy(update={"patch": None})))
    print("phase stage patch sample sample_s forward_s backward_s total_s load")
    for index, phase in runs:
        model.freeze_stages(phase.stage - 1)
        factor = model.config.stages[phase.stage - 1].downsample
        for number in range(args.samples):
            start = time.monotonic()
            sample = data.sample(index, phase, factor, 10_000 + number)
            made = time.monotonic()
            loss, _ = sample_loss(model, config, phase, sample, torch.device("cpu"))
            forward = time.monotonic()
            loss.backward()
            done = time.monotonic()
            model.zero_grad(set_to_none=True)
            patch = "whole" if phase.patch is None else "x".join(str(p) for p in phase.patch) if isinstance(phase.patch, tuple) else phase.patch
            print(f"{index} {phase.stage} {patch} {sample.key} {made - start:.2f} {forward - made:.2f} {done - forward:.2f} "
                  f"{done - start:.2f} {_load()}", flush=True)


if __name__ == "__main__":
    main()
