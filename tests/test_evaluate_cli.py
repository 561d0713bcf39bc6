"""``rwcnet evaluate`` end to end on tiny Learn2Reg folders, and on the shared real brain pair."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from l2r_fixture import SHAPE, SHIFT, SPACING, save_field, write_paired, write_unpaired
from rwcnet.cli import main


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """Run the ``rwcnet`` entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["rwcnet", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.out, captured.err


def constant(vector, shape=SHAPE) -> np.ndarray:
    return np.broadcast_to(np.asarray(vector, np.float32), tuple(shape) + (3,)).copy()


def test_paired_val_with_a_good_and_a_wrong_shaped_field(tmp_path, monkeypatch, capsys) -> None:
    root = write_paired(tmp_path / "tiny")
    fields = tmp_path / "fields"
    save_field(fields / "disp_0002_0002.nii.gz", constant(SHIFT))
    save_field(fields / "disp_0003_0003.nii.gz", constant(SHIFT, (8, 8, 8)))
    out = tmp_path / "metrics.json"
    code, stdout, _ = run(monkeypatch, capsys, "evaluate", "--dataset", root, "--displacements", fields,
                          "--output", out)
    assert code == 0
    result = json.loads(out.read_text())
    good, bad = result["cases"]["0002_0000<--0002_0001"], result["cases"]["0003_0000<--0003_0001"]
    assert good["status"] == "ok" and good["masked"] is True
    assert good["tre"] == pytest.approx(0.0, abs=1e-3)
    assert good["sdlogj"] == pytest.approx(0.0, abs=1e-6) and good["folding_fraction"] == 0.0
    assert bad["status"] == "error" and "shape" in bad["message"]
    assert result["n_cases"] == 2 and result["n_scored"] == 1 and result["aggregates"]["tre"]["n"] == 1
    assert "0003_0000<--0003_0001" in stdout and "error" in stdout
    assert not list(tmp_path.glob(".metrics.json.*"))  # no temporary file left behind


def test_zero_field_tre_and_missing_field_from_a_pairs_csv(tmp_path, monkeypatch, capsys) -> None:
    root = write_paired(tmp_path / "tiny")
    fields = tmp_path / "fields"
    save_field(fields / "disp_0002_0002.npz", np.zeros(SHAPE + (3,), np.float32))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("./imagesTr/TINY_0001_0000.nii.gz,./imagesTr/TINY_0001_0001.nii.gz\n"
                     "./imagesTr/TINY_0002_0000.nii.gz,./imagesTr/TINY_0002_0001.nii.gz\n")
    out = tmp_path / "m.json"
    code, stdout, stderr = run(monkeypatch, capsys, "evaluate", "--dataset", root, "--displacements", fields,
                               "--pairs", pairs, "-o", out)
    assert code == 0
    cases = json.loads(out.read_text())["cases"]
    assert cases["0001_0000<--0001_0001"]["status"] == "missing"
    assert cases["0002_0000<--0002_0001"]["tre"] == pytest.approx(np.linalg.norm(SHIFT * np.array(SPACING)))
    assert "missing" in stdout and "1 of 2 case(s) not scored" in stderr


def test_unpaired_labels_from_dataset_json_option_and_official_config(tmp_path, monkeypatch, capsys) -> None:
    root = write_unpaired(tmp_path / "unp")
    fields = tmp_path / "fields"
    save_field(fields / "disp_0001_0002.nii.gz", np.zeros(SHAPE + (3,), np.float32))
    save_field(fields / "disp_0001_0003.nii.gz", np.zeros(SHAPE + (3,), np.float32))
    out = tmp_path / "m.json"
    args = ("evaluate", "--dataset", root, "--displacements", fields, "-o", out)
    assert run(monkeypatch, capsys, *args)[0] == 0
    case = json.loads(out.read_text())["cases"]["0001_0000<--0002_0000"]
    # label 1: cubes of side 8 shifted by 1 voxel; label 2 identical; label 3 absent from the moving map
    assert case["dice_per_label"]["1"] == pytest.approx(7 / 8) and case["dice_per_label"]["2"] == 1.0
    assert math.isnan(case["dice_per_label"]["3"])
    assert case["dice"] == pytest.approx((7 / 8 + 1) / 2)
    assert case["hd95_per_label"]["1"] == pytest.approx(1.0) and case["hd95"] == pytest.approx(0.5)
    assert run(monkeypatch, capsys, *args, "--labels", "2", "--no-hd95")[0] == 0
    case = json.loads(out.read_text())["cases"]["0001_0000<--0002_0000"]
    assert case["dice"] == 1.0 and "hd95" not in case
    config = tmp_path / "evaluation_config.json"
    config.write_text(json.dumps({
        "task_name": "UNP", "expected_shape": list(SHAPE) + [3], "masked_evaluation": False,
        "eval_pairs": [{"fixed": "./imagesTr/UNP_0001_0000.nii.gz", "moving": "./imagesTr/UNP_0003_0000.nii.gz"}],
        "evaluation_methods": [{"name": "DSC", "metric": "dice", "labels": [1]},
                               {"name": "LogJacDetStd", "metric": "sdlogj"}]}))
    assert run(monkeypatch, capsys, *args, "--config", config)[0] == 0
    result = json.loads(out.read_text())
    assert list(result["cases"]) == ["0001_0000<--0003_0000"]
    case = result["cases"]["0001_0000<--0003_0000"]
    assert case["dice"] == pytest.approx(6 / 8) and "hd95" not in case and case["sdlogj"] == 0.0
    assert set(result["aggregates"]) == {"dice", "sdlogj", "folding_fraction"}


def test_dataset_free_form(tmp_path, monkeypatch, capsys) -> None:
    root = write_unpaired(tmp_path / "unp")
    field = save_field(tmp_path / "field.nii.gz", constant([1.0, 0.0, 0.0]))
    labels = root / "labelsTr"
    out = tmp_path / "one.json"
    code, stdout, _ = run(monkeypatch, capsys, "evaluate", "--field", field, "--fixed-labels",
                          labels / "UNP_0001_0000.nii.gz", "--moving-labels", labels / "UNP_0002_0000.nii.gz",
                          "--labels", "1", "-o", out)
    assert code == 0 and "mean Dice 1.0000" in stdout
    case = json.loads(out.read_text())["cases"]["field"]
    assert case["dice"] == 1.0 and case["hd95"] == 0.0
    tiny = write_paired(tmp_path / "tiny")
    kp = tiny / "keypointsTr"
    keypoints = ("--fixed-keypoints", kp / "TINY_0001_0000.csv", "--moving-keypoints", kp / "TINY_0001_0001.csv")
    zero = save_field(tmp_path / "zero.npz", np.zeros(SHAPE + (3,), np.float32))
    code, _, _ = run(monkeypatch, capsys, "evaluate", "--field", zero, *keypoints, "--spacing", "1,1,1", "-o", out)
    assert code == 0
    assert json.loads(out.read_text())["cases"]["zero"]["tre"] == pytest.approx(np.linalg.norm(SHIFT), abs=1e-3)
    grid = ("--fixed-image", tiny / "imagesTr" / "TINY_0001_0000.nii.gz",
            "--fixed-mask", tiny / "masksTr" / "TINY_0001_0000.nii.gz")
    code, _, _ = run(monkeypatch, capsys, "evaluate", "--field", zero, *keypoints, *grid, "-o", out)
    case = json.loads(out.read_text())["cases"]["zero"]
    assert code == 0 and case["masked"] is True
    assert case["tre"] == pytest.approx(np.linalg.norm(SHIFT * np.array(SPACING)), abs=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "give --dataset and --displacements, or --field"),
        (("--field", "{tmp}/none.nii.gz"), "none.nii.gz"),
        (("--field", "{tmp}/zero.npz", "--dataset", "{tmp}"), "not both"),
        (("--field", "{tmp}/zero.npz", "--labels", "a,b"), "--labels"),
        (("--field", "{tmp}/zero.npz", "--fixed-keypoints", "{tmp}/kp.csv", "--moving-keypoints", "{tmp}/kp.csv"),
         "spacing"),
        (("--field", "{tmp}/zero.npz", "--fixed-labels", "{tmp}/zero.npz"), "--moving-labels"),
        (("--dataset", "{tmp}", "--displacements", "{tmp}"), "no Learn2Reg"),
        (("--field", "{tmp}/zero.npz", "--output", "{tmp}/no/such/folder/m.json"), "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, monkeypatch, capsys, args, message) -> None:
    save_field(tmp_path / "zero.npz", np.zeros((8, 8, 8, 3), np.float32))
    (tmp_path / "kp.csv").write_text("1,2,3\n")
    code, _, stderr = run(monkeypatch, capsys, "evaluate", *(str(a).format(tmp=tmp_path) for a in args))
    assert code == 2
    assert stderr.startswith("error:") and message in stderr


def test_shared_brain_zero_field_dice(shared_data, tmp_path, monkeypatch, capsys) -> None:
    fields = tmp_path / "fields"
    save_field(fields / "disp_0001_0002.npz", np.zeros((160, 192, 224, 3), np.float32))
    out = tmp_path / "brain.json"
    code, stdout, _ = run(monkeypatch, capsys, "evaluate", "--dataset", shared_data / "brain",
                          "--displacements", fields, "--no-hd95", "-o", out)
    assert code == 0
    result = json.loads(out.read_text())
    assert result["labels"] == result["labels"][:30] and len(result["labels"]) == 30
    assert 0.50 <= result["aggregates"]["dice"]["mean"] <= 0.54
    assert "mean Dice 0.52" in stdout
