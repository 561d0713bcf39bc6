"""Stage-wise RWCNet training (paper Table 1): checkpoints with exact resume, validation, multi-process.

One *phase* per trained network stage, coarse to fine; coarser stages are
frozen (run without autograd) while a finer one trains, and each phase has
its own Adam optimiser. A phase's loss is :func:`rwcnet.losses.total_loss`
(plus, for semi-synthetic pairs, an optional endpoint error against the known
field) on the stage grid or at full resolution on the training patch.

**Exact resume.** A checkpoint (written atomically every
``checkpoint_every`` steps, at the end of each phase and on SIGTERM/SIGINT)
holds the weights, the optimiser, the RNG states, the phase and step, the
best validated weights and the elapsed time. Samples and dropout masks are
seeded per sample (:mod:`rwcnet.training.data`), so ``--resume`` continues
exactly: interrupted and resumed training gives bit-identical weights.

**Threads and data processes.** torch and numpy/scipy each default to 2
threads on a 2-core machine; data-loading workers beside them oversubscribe
the cores (measured: two busy 2-thread processes on 2 loaded cores made a
step several times slower than one thread). So by default the samples are
made in the main process, between steps (``data.num_workers: 0``), and
``threads`` sets torch's intra-op threads; workers, when configured, use one
thread each. Under ``torchrun`` give each process one thread
(``OMP_NUM_THREADS=1``, torchrun's default).

**Multi-process.** Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped
in DistributedDataParallel (gloo on CPU, nccl on GPU); each process handles
its share of every global batch (distinct sample indices); only rank 0
writes logs, checkpoints and models. Every sample runs as its own forward
and backward pass (gradients accumulated, ``no_sync`` until the last), so a
batch of B on one process and B/N per process on N processes compute the same
mean gradient up to the order of floating-point additions. The exception:
label-map pairs of one shape in a process's share run as one stacked batch
(:func:`rwcnet.training.steps.batch_label_pairs`), with one dropout seed.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rwcnet.errors import InputError
from rwcnet.model import RWCNet, load_model, save_model
from rwcnet.model.metadata import ModelMetadata
from rwcnet.model.files import build_model
from rwcnet.outputs import atomic_output
from rwcnet.training.config import PhaseConfig, TrainingConfig, dump_config
from rwcnet.training.data import TrainingData
from rwcnet.training.sampling import iterate_steps
from rwcnet.training.log import Progress, TrainLog
from rwcnet.training.runtime import Distributed, Signals, TrainingInterrupted, init_distributed, load_checkpoint, \
    rng_state, save_checkpoint, set_rng_state
from rwcnet.training.steps import batch_label_pairs, report, sample_loss, validate, validate_labels

__all__ = ["TrainingInterrupted", "train"]

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "log.jsonl"
REPORT = "report.json"


def _setup_phase(model: RWCNet, stage: int, phase: PhaseConfig, env: Distributed, device: torch.device):
    """Freeze what this phase does not train (the stages before ``stage``, 0-based, unless the phase is joint, and
    every later one); returns the (maybe DDP-wrapped) network and its Adam optimiser."""
    first = 0 if phase.joint else stage
    model.freeze_stages(first)
    for index, module in enumerate(model.stages):
        if index > stage:
            module.requires_grad_(False)
    for index, carry in enumerate(model.carry):  # carry ``index`` feeds stage ``index + 1``
        carry.requires_grad_(first <= index + 1 <= stage)
    if model.upsampler is not None:
        model.upsampler.requires_grad_(stage == len(model.stages) - 1)
    params = [p for p in model.parameters() if p.requires_grad]
    net: torch.nn.Module = model
    if env.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return net, torch.optim.Adam(params, lr=phase.lr)


def train(config: TrainingConfig, output: str | Path, *, resume: bool = False, stages: list[int] | None = None,
          max_steps: int | None = None, init: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``config`` into the folder ``output``; returns a summary (``status``: finished or stopped,
    ``network``: the trained :class:`RWCNet`, ``model``/``report`` when finished on rank 0).

    ``resume`` continues from ``output/checkpoint.pt``; ``stages`` (1-based)
    restricts the run to the phases training those stages; ``max_steps``
    stops (with a checkpoint) after that many steps in this call; ``init``
    starts from the weights of a model file. Writes ``checkpoint.pt``,
    ``log.jsonl``, ``config.yaml``, and at the end ``model.pt`` and
    ``report.json``. Raises :class:`TrainingInterrupted` after writing a
    checkpoint when SIGINT/SIGTERM arrives.
    """
    env, device = init_distributed()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    output = Path(output)
    if env.main:
        output.mkdir(parents=True, exist_ok=True)
    checkpoint_path = output / CHECKPOINT
    if checkpoint_path.exists() and not resume:
        raise InputError(f"{checkpoint_path}: the output folder already holds a training run; use --resume or another folder")
    selected = [i for i, phase in enumerate(config.phases) if stages is None or phase.stage in stages]
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    model = build_model(config.network())  # RWCNet, or LapIRN for a lapirn preset
    if init is not None:
        model.load_state_dict(load_model(init)[0].state_dict())
    model.to(device)
    data = TrainingData(config, model.config.alignment)
    state = {"phase": selected[0] if selected else len(config.phases), "step": 0, "validated": -1,
             "best": None, "best_metric": float("inf"), "wall_seconds": 0.0, "optimizer": None}
    if resume and checkpoint_path.exists():
        payload = load_checkpoint(checkpoint_path, config)
        model.load_state_dict(payload["model"])
        set_rng_state(payload["rng"])
        state.update({k: payload[k] for k in ("phase", "step", "validated", "best", "best_metric", "wall_seconds", "optimizer")})
    log = TrainLog(output / LOG) if env.main else None
    if env.main:
        with atomic_output(output / "config.yaml") as tmp:
            tmp.write_text(dump_config(config), encoding="utf-8")
        position = (state["phase"], state["step"])
        log.truncate(lambda r: (r.get("phase", -1), r.get("step", 0)) <= position and not (
            r.get("kind") == "validation" and (r["phase"], r["step"]) == position and state["validated"] != state["step"]))
    label_pairs = config.data.synthmorph.validation_pairs if config.data.synthmorph is not None else 0
    teacher_pairs = len(config.data.teacher.validation) if config.data.teacher is not None else 0
    validating = config.validation.pairs > 0 or label_pairs > 0 or teacher_pairs > 0
    validation_samples = data.validation_samples() if config.validation.pairs and env.main else []
    label_samples = data.validation_label_samples() if label_pairs and env.main else []
    teacher_samples = data.validation_teacher_samples() if teacher_pairs and env.main else []
    signals = Signals()
    remaining = [i for i in selected if i >= state["phase"]]
    done = sum(config.phases[i].steps for i in selected if i < state["phase"]) + state["step"]
    bar = Progress(sum(config.phases[i].steps for i in selected), done, enabled=progress and env.main, every=config.print_every)
    session_start, steps_this_call, status = time.monotonic(), 0, "finished"
    boundary_rng = rng_state()

    def payload() -> dict[str, Any]:
        return {"config": config.model_dump(mode="json"), "model": model.state_dict(),
                "rng": boundary_rng, "wall_seconds": state["wall_seconds"] + time.monotonic() - session_start,
                **{k: state[k] for k in ("phase", "step", "validated", "best", "best_metric", "optimizer")}}

    def save() -> None:
        if env.main:
            save_checkpoint(checkpoint_path, payload())

    def run_validation(phase_index: int, phase: PhaseConfig) -> None:
        result = None
        if env.main:
            start = time.monotonic()
            result = validate(model, validation_samples, phase.stage, device) if validation_samples else {}
            if label_samples:
                result.update(validate_labels(model, label_samples, phase.stage, device))
            if teacher_samples:
                result.update({f"teacher_{k}": v for k, v in validate(model, teacher_samples, phase.stage, device).items()})
            result["seconds"] = time.monotonic() - start
        if env.world > 1:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        with signals.critical():
            key = {"dice": "label_dice", "epe": "epe", "teacher": "teacher_epe"}[config.validation.metric]
            metric = -result[key] if key == "label_dice" else result[key]  # lower is better
            if metric < state["best_metric"]:
                state["best_metric"] = metric
                state["best"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            state["validated"] = state["step"]
            if log is not None:
                log.write({"kind": "validation", "phase": phase_index, "stage": phase.stage, "step": state["step"],
                           "global_step": bar.done, **result})
        parts = []
        if "epe" in result:
            parts.append(f"EPE {result['epe']:.3f} mm (before {result['epe_before']:.3f}), MSE {result['mse']:.5f}")
        if "label_dice" in result:
            parts.append(f"label Dice {result['label_dice']:.4f} (before {result['label_dice_before']:.4f}), "
                         f"folding {result['label_folding']:.5f}")
        if "teacher_epe" in result:
            parts.append(f"teacher EPE {result['teacher_epe']:.3f} mm (before {result['teacher_epe_before']:.3f})")
        bar.message(f"validation stage {phase.stage} step {state['step']}: " + "; ".join(parts))

    with signals:
        try:
            for phase_index in remaining:
                phase = config.phases[phase_index]
                stage = phase.stage - 1
                net, optimiser = _setup_phase(model, stage, phase, env, device)
                if state["optimizer"] is not None:
                    optimiser.load_state_dict(state["optimizer"])
                model.train()
                due = lambda step: (step > 0 or config.validation.at_start) and (  # noqa: E731
                    step % config.validation.every == 0 or step == phase.steps)
                if validating and due(state["step"]) and state["validated"] != state["step"]:
                    run_validation(phase_index, phase)
                factor = model.config.stages[stage].downsample
                start = time.monotonic()  # a step's time includes making its samples
                for samples in iterate_steps(data, phase_index, phase, factor, state["step"], env.rank, env.world):
                    if max_steps is not None and steps_this_call >= max_steps:
                        status = "stopped"
                        break
                    sums: dict[str, tuple[float, int]] = {}
                    batches = batch_label_pairs(samples)
                    for j, (sample, count) in enumerate(batches):
                        sync = j == len(batches) - 1 or env.world == 1
                        with (contextlib.nullcontext() if sync else net.no_sync()):
                            loss, terms = sample_loss(net, config, phase, sample, device)
                            (loss * count / len(samples)).backward()
                        for name, value in terms.items():
                            total, seen = sums.get(name, (0.0, 0))
                            sums[name] = (total + value * count, seen + count)
                    if phase.grad_clip is not None:
                        grad_norm = torch.nn.utils.clip_grad_norm_(
                            [p for group in optimiser.param_groups for p in group["params"]], phase.grad_clip)
                        sums["grad_norm"] = (float(grad_norm), 1)
                    with signals.critical():
                        optimiser.step()
                        optimiser.zero_grad(set_to_none=True)
                        state["step"] += 1
                        state["optimizer"] = optimiser.state_dict()
                        steps_this_call += 1
                        terms = _mean_over_samples(sums, env)
                        boundary_rng = rng_state()
                        if log is not None:
                            log.write({"kind": "train", "phase": phase_index, "stage": phase.stage, "step": state["step"],
                                       "global_step": bar.done + 1, "seconds": time.monotonic() - start, "lr": phase.lr, **terms})
                        bar.update(f"stage {phase.stage} loss {terms['total']:.4f}")
                    if validating and due(state["step"]):
                        run_validation(phase_index, phase)
                    if state["step"] % config.checkpoint_every == 0 and state["step"] < phase.steps:
                        with signals.critical():
                            save()
                    start = time.monotonic()
                if status == "stopped":
                    with signals.critical():
                        save()
                    break
                with signals.critical():
                    if config.validation.select == "best" and state["best"] is not None:
                        model.load_state_dict(state["best"])
                    state.update(phase=phase_index + 1, step=0, validated=-1, best=None, best_metric=float("inf"), optimizer=None)
                    save()
        except TrainingInterrupted:
            save()
            bar.close()
            raise
    bar.close()
    wall = state["wall_seconds"] + time.monotonic() - session_start
    summary: dict[str, Any] = {"status": status, "steps_this_call": steps_this_call, "wall_seconds": wall,
                               "output": str(output), "network": model}
    if status == "finished" and env.main:
        summary.update(_finish(model, config, data, output, wall, device, env))
    if log is not None:
        log.close()
    return summary


def _mean_over_samples(sums: dict[str, tuple[float, int]], env: Distributed) -> dict[str, float]:
    """Mean of each logged term over the samples of the global batch that have it (``epe``: synthetic ones only)."""
    if env.world > 1:
        gathered: list[dict[str, tuple[float, int]]] = [{} for _ in range(env.world)]
        dist.all_gather_object(gathered, sums)
        sums = {}
        for part in gathered:
            for name, (total, count) in part.items():
                previous = sums.get(name, (0.0, 0))
                sums[name] = (previous[0] + total, previous[1] + count)
    return {name: total / count for name, (total, count) in sorted(sums.items())}


def _finish(model: RWCNet, config: TrainingConfig, data: TrainingData, output: Path, wall: float,
            device: torch.device, env: Distributed) -> dict[str, Any]:
    """Write the final model (with its training metadata) and the report of the held-out real pairs."""
    import nibabel as nib

    reference = data.reference_image()
    metadata = ModelMetadata(
        modality=config.data.modality or data.dataset.modality,
        spacing_mm=tuple(float(s) for s in reference.spacing),
        orientation="".join(nib.orientations.aff2axcodes(reference.affine)),
        normalisation=config.data.normalisation.model_dump(),
        training={
            "training_preset": config.name,
            "network_preset": config.model if isinstance(config.model, str) else config.model.name,
            "steps": {f"stage{p.stage}": p.steps for p in config.phases},
            "wall_seconds": wall,
            "seed": config.seed,
            "processes": env.world,
            "training_images": data.image_ids,
        },
    )
    save_model(output / MODEL, model, metadata)
    result: dict[str, Any] = {"model": str(output / MODEL)}
    if config.report and data.report_pairs():
        cases = report(model, data, device)
        with atomic_output(output / REPORT) as tmp:
            tmp.write_text(json.dumps({"cases": cases, "metadata": metadata.to_dict()}, indent=2), encoding="utf-8")
        result["report"] = cases
    return result
