"""Training: exact resume (also after SIGTERM), per-sample data, torchrun equivalence, config files, plots, losses with an origin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rwcnet import geometry
from rwcnet.errors import InputError
from rwcnet.losses import LossConfig, total_loss
from rwcnet.model import load_model
from rwcnet.training.loop import train
from rwcnet.training.config import TrainingConfig, dump_config, load_config, training_preset
from rwcnet.training.data import TrainingData
from rwcnet.training.sampling import sample_indices
from rwcnet.training.log import plot_log, read_log
from train_fixture import tiny_config, write_dataset

@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("toy"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_model(folder / "model.pt")[0].state_dict()


def train_records(folder: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(folder / "log.jsonl")]


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory) -> Path:
    """20 steps (10 per stage) in one go."""
    output = tmp_path_factory.mktemp("straight")
    summary = train(TrainingConfig.model_validate(tiny_config(dataset)), output, progress=False)
    assert summary["status"] == "finished"
    return output


def test_interrupted_and_resumed_training_gives_identical_weights(dataset, straight, tmp_path):
    config = TrainingConfig.model_validate(tiny_config(dataset))
    assert train(config, tmp_path, max_steps=7, progress=False)["status"] == "stopped"  # mid stage 1, between checkpoints
    assert not (tmp_path / "model.pt").exists()
    assert train(config, tmp_path, resume=True, max_steps=6, progress=False)["status"] == "stopped"  # mid stage 2
    assert train(config, tmp_path, resume=True, progress=False)["status"] == "finished"
    expected, got = weights(straight), weights(tmp_path)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert train_records(tmp_path) == train_records(straight)


def test_sigterm_writes_a_checkpoint_and_resume_is_exact(dataset, straight, tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(dataset)))
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "rwcnet", "train", str(config_path), "-o", str(run), "--quiet"],
                               env=env, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and sum(1 for _ in log.open()) >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "continue with --resume" in stderr
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (checkpoint["phase"], checkpoint["step"]) < (1, 10)
    train(load_config(config_path), run, resume=True, progress=False)
    expected, got = weights(straight), weights(run)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_stage_option_trains_only_that_stage_from_an_initial_model(dataset, straight, tmp_path):
    config = TrainingConfig.model_validate(tiny_config(dataset))
    summary = train(config, tmp_path, stages=[2], init=straight / "model.pt", max_steps=2, progress=False)
    assert summary["status"] == "stopped"
    start, now = weights(straight), summary["network"].state_dict()
    assert all(torch.equal(start[name], now[name]) for name in start if name.startswith("stages.0."))
    assert not all(torch.equal(start[name], now[name]) for name in start if name.startswith("stages.1."))
    assert {r["stage"] for r in read_log(tmp_path / "log.jsonl")} == {2}


def test_a_new_run_refuses_a_folder_with_a_checkpoint_and_resume_refuses_another_config(dataset, straight):
    config = TrainingConfig.model_validate(tiny_config(dataset))
    with pytest.raises(InputError, match="--resume"):
        train(config, straight, progress=False)
    other = TrainingConfig.model_validate(tiny_config(dataset, seed=5))
    with pytest.raises(InputError, match="another training config"):
        train(other, straight, resume=True, progress=False)


def test_samples_are_pure_functions_of_their_index_and_keep_held_out_images_out(dataset):
    config = TrainingConfig.model_validate(tiny_config(dataset))
    data = TrainingData(config, alignment=8)
    assert data.image_ids == ["TOY_0003_0000", "TOY_0004_0000", "TOY_0005_0000"]
    assert all("0001" not in p.key and "0002" not in p.key for p in data.pairs)
    phase = config.phases[1]
    first, again = data.sample(1, phase, 2, 5), TrainingData(config, alignment=8).sample(1, phase, 2, 5)
    assert torch.equal(first.fixed, again.fixed) and first.region == again.region and first.seed == again.seed
    assert all(s.stop - s.start == 8 for s in first.region)
    synthetic = next(s for s in (data.sample(1, phase, 2, i) for i in range(20)) if s.truth is not None)
    # the truth is exact: the moving image warped by it is the fixed image (before the intensity perturbation)
    plain = TrainingData(TrainingConfig.model_validate(tiny_config(
        dataset, data={"dataset": str(dataset), "synthetic": {"intensity": None}})), alignment=8)
    sample = plain.sample(0, config.phases[0], 4, 0)
    torch.testing.assert_close(geometry.warp(sample.moving, sample.truth), sample.fixed)
    assert synthetic.key.startswith("synthetic:TOY_000")
    assert sample_indices(3, 4, rank=1, world_size=2) == [14, 15]


def test_configs_load_from_presets_and_yaml_and_errors_name_the_file(tmp_path):
    for name in ("oasis", "nlst", "cpu-brain"):
        preset = training_preset(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_config(preset))
        assert load_config(path) == preset
    assert "BRAIN_0001_0000" in training_preset("cpu-brain").data.exclude
    derived = tmp_path / "derived.yaml"
    derived.write_text("preset: cpu-brain\nseed: 7\nvalidation: {pairs: 1}\n")
    loaded = load_config(derived)
    assert loaded.seed == 7 and loaded.validation.pairs == 1
    assert loaded.validation.every == training_preset("cpu-brain").validation.every  # untouched keys keep the preset
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: cpu-brain\nphases: [{stage: 3, steps: 1}]\n")
    with pytest.raises(InputError, match="(?s)bad.yaml.*network has 2 stages"):
        load_config(bad)
    with pytest.raises(InputError, match="no such training config"):
        load_config(tmp_path / "missing.yaml")


def test_plot_log_writes_a_png(straight, tmp_path):
    from typer.testing import CliRunner

    from rwcnet.cli import app

    result = CliRunner().invoke(app, ["plot-log", str(straight / "log.jsonl"), "--output", str(tmp_path / "c.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plotted = plot_log(straight / "log.jsonl", tmp_path / "d.png")
    assert {"train/total", "train/mse", "validation/epe"} <= set(plotted)


def test_total_loss_with_an_origin_equals_the_loss_of_the_cropped_problem():
    generator = torch.Generator().manual_seed(0)
    moving = torch.rand(1, 1, 12, 12, 12, generator=generator)
    labels = (moving * 3).long()
    field = torch.randn(1, 3, 12, 12, 12, generator=generator)
    box = (slice(None), slice(None), slice(2, 8), slice(3, 9), slice(4, 10))
    config = LossConfig(mse=1.0, dice=1.0, regulariser=0.0)
    whole_warp = geometry.warp(moving, field)
    fixed = torch.rand(1, 1, 12, 12, 12, generator=generator)
    loss, terms = total_loss(config, fixed=fixed[box], moving=moving, field=field[box], origin=(2, 3, 4),
                             fixed_labels=labels[box], moving_labels=labels)
    expected = ((whole_warp[box] - fixed[box]) ** 2).mean()
    torch.testing.assert_close(torch.tensor(terms["mse"]), expected)
    assert terms["dice"] < 1.0 and torch.isfinite(loss)


def _free_port() -> int:
    import socket

    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, config: dict, output: str, weights_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist

    torch.set_num_threads(1)
    summary = train(TrainingConfig.model_validate(config), Path(output), progress=False)
    torch.save(summary["network"].state_dict(), Path(weights_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(dataset, tmp_path):
    """2 gloo ranks x batch 1 == 1 process x batch 2, up to float reduction order (atol 1e-5 after 6 Adam steps)."""
    import torch.multiprocessing as mp

    config = tiny_config(dataset, steps=(3, 3), batch_size=2, checkpoint_every=2)
    mp.spawn(_distributed_worker, args=(2, _free_port(), config, str(tmp_path / "ddp"), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    single = train(TrainingConfig.model_validate(config), tmp_path / "single", progress=False)["network"].state_dict()
    difference = max(float((rank0[name] - single[name]).abs().max()) for name in single)
    assert difference < 1e-5
    written = weights(tmp_path / "ddp")  # rank 0's model file
    assert all(torch.equal(written[name], rank0[name]) for name in rank0)
    logged = [r["total"] for r in read_log(tmp_path / "ddp" / "log.jsonl") if r["kind"] == "train"]
    expected = [r["total"] for r in read_log(tmp_path / "single" / "log.jsonl") if r["kind"] == "train"]
    np.testing.assert_allclose(logged, expected, rtol=1e-4)


def test_a_data_worker_process_gives_the_same_training(dataset, straight, tmp_path):
    config = tiny_config(dataset)
    config["data"]["num_workers"] = 1
    train(TrainingConfig.model_validate(config), tmp_path, progress=False)
    expected, got = weights(straight), weights(tmp_path)
    assert all(torch.equal(expected[name], got[name]) for name in expected)
