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
seeded per sample (:mod:`rwcnet.train_data`), so ``--resume`` continues
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
mean gradient up to the order of floating-point additions.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rwcnet import geometry, metrics
from rwcnet.errors import InputError, atomic_output
from rwcnet.io import read_image, read_keypoints
from rwcnet.losses import sequence_loss, total_loss
from rwcnet.model import RWCNet, load_model, save_model
from rwcnet.train_config import PhaseConfig, TrainingConfig, dump_config
from rwcnet.train_data import Sample, TrainingData, iterate_steps, normalise
from rwcnet.train_log import Progress, TrainLog

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOG = "log.jsonl"
REPORT = "report.json"
FORMAT = "rwcnet-checkpoint"
#: Config entries that may change between a run and its resumption (they do not change the result).
_RESUMABLE_CHANGES = {"threads", "print_every", "report", "checkpoint_every"}


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was written (``signum`` tells which signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"training interrupted by signal {signum}; checkpoint written")
        self.signum = signum


class _Signals:
    """Turns SIGINT/SIGTERM into :class:`TrainingInterrupted`, deferred while inside :meth:`critical`."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._critical = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        if _main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        self.pending = signum
        if not self._critical:
            raise TrainingInterrupted(signum)

    @contextlib.contextmanager
    def critical(self):
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self.pending is not None:
            raise TrainingInterrupted(self.pending)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed() -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return _Dist(rank, world, local_rank), device


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _comparable(config: TrainingConfig) -> dict:
    data = config.model_dump(mode="json")
    for key in _RESUMABLE_CHANGES:
        data.pop(key)
    for key in ("dataset", "num_workers", "cache_images"):
        data["data"].pop(key)
    return data


def _setup_phase(model: RWCNet, stage: int, phase: PhaseConfig, env: _Dist, device: torch.device):
    """Freeze what this phase does not train; returns the (maybe DDP-wrapped) network and its Adam optimiser."""
    model.freeze_stages(stage)
    for index, module in enumerate(model.stages):
        if index > stage:
            module.requires_grad_(False)
    for index, carry in enumerate(model.carry):
        carry.requires_grad_(index + 1 == stage)
    if model.upsampler is not None:
        model.upsampler.requires_grad_(stage == len(model.stages) - 1)
    params = [p for p in model.parameters() if p.requires_grad]
    net: torch.nn.Module = model
    if env.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return net, torch.optim.Adam(params, lr=phase.lr)


def _box(origin, shape) -> tuple[slice, slice, slice, slice, slice]:
    return (slice(None), slice(None), *(slice(o, o + n) for o, n in zip(origin, shape)))


def endpoint_error(field: torch.Tensor, truth: torch.Tensor, spacing, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean endpoint error in mm between two voxel fields ``(B, 3, X, Y, Z)`` with voxel size ``spacing`` (mm), inside ``mask``."""
    scale = torch.as_tensor(list(spacing), dtype=field.dtype, device=field.device).view(1, 3, 1, 1, 1)
    error = ((field - truth) * scale).norm(dim=1, keepdim=True)
    if mask is None:
        return error.mean()
    weights = mask.to(error.dtype)
    return (error * weights).sum() / weights.sum().clamp_min(1.0)


def sample_loss(net: torch.nn.Module, config: TrainingConfig, phase: PhaseConfig, sample: Sample,
                device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one sample for a phase: ``total_loss`` of the trained stage's fields (+ supervised endpoint error)."""
    stage = phase.stage - 1
    model: RWCNet = net.module if hasattr(net, "module") else net  # type: ignore[assignment]
    factor = model.config.stages[stage].downsample
    fixed, moving = sample.fixed.to(device), sample.moving.to(device)
    torch.manual_seed(sample.seed)  # dropout masks depend on the sample only
    out = net(fixed, moving, num_stages=stage + 1, sequence=True, region=sample.region)
    result = out.stages[stage]
    extra: dict[str, Any] = {}
    truth = None if sample.truth is None else sample.truth.to(device)
    if phase.loss_grid == "stage":
        grid = [n // factor for n in fixed.shape[2:]]
        origin = result.origin
        box = _box(origin, result.field.shape[2:])
        fields = result.sequence
        fixed_t = geometry.resize_volume(fixed, grid)[box]
        moving_t = geometry.resize_volume(moving, grid)
        spacing = [s * factor for s in sample.spacing]
        truth_t = None if truth is None else geometry.resize_field(truth, grid)[box]
    else:
        origin, shape = out.origin, out.field.shape[2:]
        box = _box(origin, shape)
        fields = [geometry.resize_field(f, shape) for f in result.sequence[:-1]] + [out.field]
        fixed_t, moving_t, spacing = fixed[box], moving, list(sample.spacing)
        truth_t = None if truth is None else truth[box]
        if sample.fixed_labels is not None and sample.moving_labels is not None:
            extra["fixed_labels"] = sample.fixed_labels.to(device)[box]
            extra["moving_labels"] = sample.moving_labels.to(device)
        if sample.fixed_keypoints is not None and sample.moving_keypoints is not None:
            fixed_kp, moving_kp = sample.fixed_keypoints.to(device), sample.moving_keypoints.to(device)
            low = torch.tensor(origin, device=device, dtype=fixed_kp.dtype)
            inside = ((fixed_kp >= low) & (fixed_kp <= low + torch.tensor(shape, device=device) - 1)).all(-1)[0]
            extra["fixed_keypoints"], extra["moving_keypoints"] = fixed_kp[:, inside], moving_kp[:, inside]
    losses = config.losses
    if losses.tre and ("fixed_keypoints" not in extra or extra["fixed_keypoints"].shape[1] == 0):
        losses = losses.model_copy(update={"tre": 0.0})
    if losses.dice and "fixed_labels" not in extra:
        losses = losses.model_copy(update={"dice": 0.0})
    if losses.sequence_gamma is None:
        fields = fields[-1:]
    loss, terms = total_loss(losses, fixed=fixed_t, moving=moving_t, field=fields, spacing=spacing,
                             stage_factor=factor, origin=origin, **extra)
    if config.supervised and truth_t is not None:
        errors = [endpoint_error(f, truth_t, spacing) for f in fields]
        supervised = errors[0] if len(errors) == 1 else sequence_loss(errors, losses.sequence_gamma)
        loss = loss + config.supervised * supervised
        terms["epe"] = float(errors[-1].detach())
        terms["total"] = float(loss.detach())
    return loss, terms


@torch.no_grad()
def validate(model: RWCNet, samples: list[Sample], num_stages: int, device: torch.device) -> dict[str, float]:
    """Mean endpoint error (mm, foreground) and MSE of the first ``num_stages`` stages on held-out pairs, and both before registration."""
    training = model.training
    model.eval()
    totals = {"epe": 0.0, "mse": 0.0, "epe_before": 0.0, "mse_before": 0.0}
    for sample in samples:
        fixed, moving, truth = sample.fixed.to(device), sample.moving.to(device), sample.truth.to(device)
        mask = None if sample.mask is None else sample.mask.to(device)
        field = model(fixed, moving, num_stages=num_stages).field
        weights = torch.ones_like(fixed) if mask is None else mask.to(fixed.dtype)
        for suffix, current in (("", field), ("_before", torch.zeros_like(field))):
            totals["epe" + suffix] += float(endpoint_error(current, truth, sample.spacing, mask))
            squared = (geometry.warp(moving, current) - fixed) ** 2
            totals["mse" + suffix] += float((squared * weights).sum() / weights.sum().clamp_min(1.0))
    model.train(training)
    return {name: value / max(len(samples), 1) for name, value in totals.items()}


@torch.no_grad()
def report(model: RWCNet, data: TrainingData, device: torch.device) -> dict[str, Any]:
    """Score the dataset's ``registration_val`` pairs with the whole network (Dice over
    ``evaluation_labels``, TRE when keypoints exist, SDlogJ), next to zero displacement."""
    model.eval()
    cases = {}
    labels = data.dataset.evaluation_labels
    for pair in data.report_pairs():
        fixed_image, moving_image = read_image(pair.fixed), read_image(pair.moving)
        tensors = [torch.from_numpy(normalise(i.array, data.data.normalisation))[None, None].to(device)
                   for i in (fixed_image, moving_image)]
        field = model(*tensors).field[0].permute(1, 2, 3, 0).cpu().numpy()
        inputs: dict[str, Any] = {"labels": labels, "spacing": fixed_image.spacing}
        label_paths = [data.dataset.label_path(p) for p in (pair.fixed, pair.moving)]
        if None not in label_paths:
            inputs["fixed_labels"], inputs["moving_labels"] = (np.rint(read_image(p).array).astype(np.int64) for p in label_paths)
        keypoint_paths = [data.dataset.keypoints_path(p) for p in (pair.fixed, pair.moving)]
        if None not in keypoint_paths:
            inputs["fixed_kp"], inputs["moving_kp"] = (read_keypoints(p) for p in keypoint_paths)
        scores = metrics.score_case(field, **inputs, compute_hd95=False)
        zero = metrics.score_case(np.zeros_like(field), **inputs, compute_hd95=False)
        cases[pair.key] = {name: scores[name] for name in ("dice", "tre", "sdlogj", "folding_fraction") if name in scores}
        cases[pair.key].update({f"{name}_zero": zero[name] for name in ("dice", "tre") if name in zero})
    return cases


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, config: TrainingConfig) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a corrupt file
        raise InputError(f"{path}: not a readable training checkpoint ({error.__class__.__name__})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not an rwcnet training checkpoint")
    if _comparable(TrainingConfig.model_validate(payload["config"])) != _comparable(config):
        raise InputError(f"{path}: the checkpoint was made with another training config; resume with the same config")
    return payload


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
    env, device = _init_distributed()
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
    model = RWCNet(config.network())
    if init is not None:
        model.load_state_dict(load_model(init)[0].state_dict())
    model.to(device)
    data = TrainingData(config, model.config.alignment)
    state = {"phase": selected[0] if selected else len(config.phases), "step": 0, "validated": 0,
             "best": None, "best_metric": float("inf"), "wall_seconds": 0.0, "optimizer": None}
    if resume and checkpoint_path.exists():
        payload = _load_checkpoint(checkpoint_path, config)
        model.load_state_dict(payload["model"])
        _set_rng_state(payload["rng"])
        state.update({k: payload[k] for k in ("phase", "step", "validated", "best", "best_metric", "wall_seconds", "optimizer")})
    log = TrainLog(output / LOG) if env.main else None
    if env.main:
        with atomic_output(output / "config.yaml") as tmp:
            tmp.write_text(dump_config(config), encoding="utf-8")
        position = (state["phase"], state["step"])
        log.truncate(lambda r: (r.get("phase", -1), r.get("step", 0)) <= position and not (
            r.get("kind") == "validation" and (r["phase"], r["step"]) == position and state["validated"] != state["step"]))
    validating = config.validation.pairs > 0
    validation_samples = data.validation_samples() if validating and env.main else []
    signals = _Signals()
    remaining = [i for i in selected if i >= state["phase"]]
    done = sum(config.phases[i].steps for i in selected if i < state["phase"]) + state["step"]
    bar = Progress(sum(config.phases[i].steps for i in selected), done, enabled=progress and env.main, every=config.print_every)
    session_start, steps_this_call, status = time.monotonic(), 0, "finished"
    boundary_rng = _rng_state()

    def payload() -> dict[str, Any]:
        return {"format": FORMAT, "config": config.model_dump(mode="json"), "model": model.state_dict(),
                "rng": boundary_rng, "wall_seconds": state["wall_seconds"] + time.monotonic() - session_start,
                **{k: state[k] for k in ("phase", "step", "validated", "best", "best_metric", "optimizer")}}

    def save() -> None:
        if env.main:
            _save_checkpoint(checkpoint_path, payload())

    def run_validation(phase_index: int, phase: PhaseConfig) -> None:
        result = None
        if env.main:
            start = time.monotonic()
            result = validate(model, validation_samples, phase.stage, device)
            result["seconds"] = time.monotonic() - start
        if env.world > 1:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        with signals.critical():
            if result["epe"] < state["best_metric"]:
                state["best_metric"] = result["epe"]
                state["best"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            state["validated"] = state["step"]
            if log is not None:
                log.write({"kind": "validation", "phase": phase_index, "stage": phase.stage, "step": state["step"],
                           "global_step": bar.done, **result})
        bar.message(f"validation stage {phase.stage} step {state['step']}: EPE {result['epe']:.3f} mm "
                    f"(before {result['epe_before']:.3f}), MSE {result['mse']:.5f}")

    with signals:
        try:
            for phase_index in remaining:
                phase = config.phases[phase_index]
                stage = phase.stage - 1
                net, optimiser = _setup_phase(model, stage, phase, env, device)
                if state["optimizer"] is not None:
                    optimiser.load_state_dict(state["optimizer"])
                model.train()
                due = lambda step: step > 0 and (step % config.validation.every == 0 or step == phase.steps)  # noqa: E731
                if validating and due(state["step"]) and state["validated"] != state["step"]:
                    run_validation(phase_index, phase)
                factor = model.config.stages[stage].downsample
                start = time.monotonic()  # a step's time includes making its samples
                for samples in iterate_steps(data, phase_index, phase, factor, state["step"], env.rank, env.world):
                    if max_steps is not None and steps_this_call >= max_steps:
                        status = "stopped"
                        break
                    sums: dict[str, tuple[float, int]] = {}
                    for j, sample in enumerate(samples):
                        sync = j == len(samples) - 1 or env.world == 1
                        with (contextlib.nullcontext() if sync else net.no_sync()):
                            loss, terms = sample_loss(net, config, phase, sample, device)
                            (loss / len(samples)).backward()
                        for name, value in terms.items():
                            total, count = sums.get(name, (0.0, 0))
                            sums[name] = (total + value, count + 1)
                    with signals.critical():
                        optimiser.step()
                        optimiser.zero_grad(set_to_none=True)
                        state["step"] += 1
                        state["optimizer"] = optimiser.state_dict()
                        steps_this_call += 1
                        terms = _mean_over_samples(sums, env)
                        boundary_rng = _rng_state()
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
                    state.update(phase=phase_index + 1, step=0, validated=0, best=None, best_metric=float("inf"), optimizer=None)
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


def _mean_over_samples(sums: dict[str, tuple[float, int]], env: _Dist) -> dict[str, float]:
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
            device: torch.device, env: _Dist) -> dict[str, Any]:
    """Write the final model (with its training metadata) and the report of the held-out real pairs."""
    import nibabel as nib

    reference = data.reference_image()
    metadata = {
        "training_preset": config.name,
        "network_preset": config.model if isinstance(config.model, str) else config.model.name,
        "spacing_mm": [float(s) for s in reference.spacing],
        "orientation": "".join(nib.orientations.aff2axcodes(reference.affine)),
        "normalisation": config.data.normalisation.model_dump(),
        "steps": {f"stage{p.stage}": p.steps for p in config.phases},
        "wall_seconds": wall,
        "seed": config.seed,
        "processes": env.world,
        "training_images": data.image_ids,
    }
    save_model(output / MODEL, model, metadata)
    result: dict[str, Any] = {"model": str(output / MODEL)}
    if config.report and data.report_pairs():
        import json

        cases = report(model, data, device)
        with atomic_output(output / REPORT) as tmp:
            tmp.write_text(json.dumps({"cases": cases, "metadata": metadata}, indent=2), encoding="utf-8")
        result["report"] = cases
    return result
