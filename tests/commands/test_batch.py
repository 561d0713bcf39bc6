"""Batch registration: a CSV on its own, dataset mode's symlinked names, failures, resume, and torchrun ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from l2r_fixture import write_paired
from rwcnet.batch import image_stem, read_jobs_csv
from rwcnet.data.datasets import field_names

SHAPE = (24, 24, 24)
FAST = ["--model", "none", "--io-iters", "2", "--device", "cpu"]


def _blobs(seed: int, shape=SHAPE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random([n // 4 for n in shape])
    return np.kron(coarse, np.ones((4, 4, 4))).astype(np.float32)


def _images(folder: Path, count: int, shape=SHAPE) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"img{index}.nii.gz"
        nib.save(nib.Nifti1Image(_blobs(index, shape), np.diag([1.5, 1.5, 1.5, 1.0])), str(path))
        paths.append(path)
    return paths


def _rwcnet(*args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rwcnet", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_image_stem_strips_the_format_suffix():
    assert image_stem("a/OASIS_0395_0000.nii.gz") == "OASIS_0395_0000"
    assert image_stem("b/case.v2.mha") == "case.v2"


def test_csv_columns_header_and_paths_relative_to_the_csv(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    csv_file = folder / "pairs.csv"
    csv_file.write_text("moving,fixed,fixed_mask\n"
                        "../m.nii.gz,/abs/f.nii.gz,masks/f.nii.gz\n"
                        "m2.nii.gz,f2.nii.gz\n")
    jobs = read_jobs_csv(csv_file, tmp_path / "out")
    assert jobs[0].fixed == Path("/abs/f.nii.gz") and jobs[0].moving == folder / "../m.nii.gz"
    assert jobs[0].fixed_mask == folder / "masks/f.nii.gz" and jobs[0].moving_mask is None
    assert jobs[0].output == tmp_path / "out" / "disp_f_m.nii.gz"
    assert jobs[1].output == tmp_path / "out" / "disp_f2_m2.nii.gz"


def test_csv_pairs_work_without_a_dataset(tmp_path):
    images = _images(tmp_path / "data" / "images", 3)
    csv_file = tmp_path / "data" / "pairs.csv"  # no header; the second row names its own output, relative to the CSV
    csv_file.write_text("images/img0.nii.gz,images/img1.nii.gz\n"
                        "images/img2.nii.gz,images/img1.nii.gz,fields/mine.nii.gz\n")
    out = tmp_path / "out"
    result = _rwcnet("register", "--pairs", csv_file, "--output-dir", out, *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    default = out / "disp_img0_img1.nii.gz"
    named = tmp_path / "data" / "fields" / "mine.nii.gz"
    assert default.is_file() and named.is_file()
    single = tmp_path / "single.nii.gz"
    result = _rwcnet("register", "--fixed", images[0], "--moving", images[1], "--output", single, *FAST)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(nib.load(str(default)).get_fdata(), nib.load(str(single)).get_fdata())
    status = json.loads((out / "status.json").read_text())
    assert [p["state"] for p in status["pairs"]] == ["done", "done"]


def test_a_failed_pair_is_reported_others_go_on_and_a_rerun_skips_finished_pairs(tmp_path):
    images = _images(tmp_path, 2)
    other_grid = tmp_path / "mask_other_grid.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), str(other_grid))
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("fixed,moving,output,fixed_mask\n"
                        "img0.nii.gz,img1.nii.gz,a.nii.gz\n"
                        "img0.nii.gz,missing.nii.gz,b.nii.gz\n"
                        "img1.nii.gz,img0.nii.gz,c.nii.gz,mask_other_grid.nii.gz\n"
                        "img1.nii.gz,img1.nii.gz,d.nii.gz\n")
    result = _rwcnet("register", "--pairs", csv_file, "--output-dir", tmp_path / "out", *FAST)
    assert result.returncode == 1
    assert "missing.nii.gz" in result.stderr + result.stdout
    assert (tmp_path / "a.nii.gz").is_file() and (tmp_path / "d.nii.gz").is_file()
    assert not (tmp_path / "b.nii.gz").exists() and not (tmp_path / "c.nii.gz").exists()
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert [p["state"] for p in status["pairs"]] == ["done", "failed", "failed", "done"]
    assert "missing.nii.gz" in status["pairs"][1]["error"] and "mask_other_grid" in status["pairs"][2]["error"]
    assert (status["done"], status["failed"]) == (2, 2)

    before = {name: os.stat(tmp_path / name).st_mtime_ns for name in ("a.nii.gz", "d.nii.gz")}
    shutil.copy(images[1], tmp_path / "missing.nii.gz")
    csv_file.write_text(csv_file.read_text().replace(",mask_other_grid.nii.gz", ""))
    result = _rwcnet("register", "--pairs", csv_file, "--output-dir", tmp_path / "out", *FAST)
    assert result.returncode == 0, result.stderr
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in before} == before
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert [p["state"] for p in status["pairs"]] == ["skipped", "done", "done", "skipped"]


def test_bad_csv_is_an_input_error_before_any_work(tmp_path):
    _images(tmp_path, 2)
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("img0.nii.gz,img1.nii.gz,same.nii.gz\nimg1.nii.gz,img0.nii.gz,same.nii.gz\n")
    result = _rwcnet("register", "--pairs", csv_file, "--output-dir", tmp_path / "out", *FAST)
    assert result.returncode == 2 and "same.nii.gz" in result.stderr
    assert not (tmp_path / "out").exists()


def test_dataset_mode_writes_each_field_once_and_links_the_older_name(tmp_path):
    root = write_paired(tmp_path / "TINY")
    out = tmp_path / "out"
    result = _rwcnet("register", "--dataset", root, "--output-dir", out, *FAST)
    assert result.returncode == 0, result.stderr
    fixed, moving = root / "imagesTr" / "TINY_0002_0000.nii.gz", root / "imagesTr" / "TINY_0002_0001.nii.gz"
    short, long = field_names(fixed, moving)
    assert (out / long).is_file() and not (out / long).is_symlink()
    assert (out / short).is_symlink() and os.readlink(out / short) == long  # relative, in the same folder
    assert os.stat(out / short).st_ino == os.stat(out / long).st_ino
    regular = [p for p in out.iterdir() if p.name.startswith("disp_") and not p.is_symlink()]
    assert len(regular) == 2  # two validation pairs, one file each
    (out / short).unlink()  # a rerun skips the pair and restores the link
    result = _rwcnet("register", "--dataset", root, "--output-dir", out, *FAST)
    assert result.returncode == 0 and "already done" in result.stdout + result.stderr
    assert (out / short).is_symlink()


def test_torchrun_splits_the_pairs_among_two_ranks(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not installed next to this python")
    _images(tmp_path, 4, shape=(32, 32, 32))
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("".join(f"img{i}.nii.gz,img{(i + 1) % 4}.nii.gz\n" for i in range(4)))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "rwcnet", "register",
                             "--pairs", str(csv_file), "--output-dir", str(out), *FAST],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"status.rank{r}.json").read_text()) for r in (0, 1)]
    outputs = [{Path(p["output"]).name for p in rank["pairs"]} for rank in ranks]
    expected = {f"disp_img{i}_img{(i + 1) % 4}.nii.gz" for i in range(4)}
    assert all(len(names) == 2 for names in outputs) and outputs[0] | outputs[1] == expected
    assert all(p["state"] == "done" for rank in ranks for p in rank["pairs"])
    assert all((out / name).is_file() for name in expected)
    cores = len(os.sched_getaffinity(0))
    assert [rank["threads"] for rank in ranks] == [max(1, cores // 2)] * 2
