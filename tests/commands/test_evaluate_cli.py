"""``rwcnet evaluate`` end to end on tiny Learn2Reg folders, and on the shared real brain pair."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cli_runner import run
from l2r_fixture import SHAPE, SHIFT, SPACING, save_field, write_paired, write_unpaired
from rwcnet.evaluation.label_names import dataset_label_names, name_labels


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


def _rewrite_json(root, **changes) -> None:
    path = next(root.glob("*_dataset.json"))
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_default_label_rules_are_applied_and_stated(tmp_path, monkeypatch, capsys) -> None:
    # UNP: labels 1 and 2 in every case, label 3 only in the fixed case 0001
    root = write_unpaired(tmp_path / "unp")
    fields = tmp_path / "fields"
    save_field(fields / "disp_0001_0002.nii.gz", np.zeros(SHAPE + (3,), np.float32))
    out = tmp_path / "m.json"
    args = ("evaluate", "--dataset", root, "--displacements", fields, "--no-hd95", "-o", out)

    def scored_labels(*extra):
        code, stdout, _ = run(monkeypatch, capsys, *args, *extra)
        assert code == 0
        result = json.loads(out.read_text())
        return sorted(result["cases"]["0001_0000<--0002_0000"]["dice_per_label"], key=int), result, stdout

    labels, result, stdout = scored_labels()
    assert labels == ["1", "2", "3"] and "the 3 evaluation_labels of UNP_dataset.json" in stdout
    assert result["label_rule"] == "the 3 evaluation_labels of UNP_dataset.json"
    config = tmp_path / "evaluation_config.json"
    config.write_text(json.dumps({"evaluation_methods": [{"name": "DSC", "metric": "dice", "labels": [2]}]}))
    labels, result, stdout = scored_labels("--config", config)
    assert labels == ["2"] and "the 1 labels of evaluation_config.json" in stdout
    labels, result, stdout = scored_labels("--labels", "1")
    assert labels == ["1"] and "the 1 labels of --labels" in stdout
    _rewrite_json(root, evaluation_labels=None)
    labels, result, stdout = scored_labels()
    assert labels == ["1", "2"] and "every non-zero label present in both label maps" in stdout
    assert result["labels"] is None and result["label_rule"] == "every non-zero label present in both label maps"

    labels_dir = root / "labelsTr"
    code, stdout, _ = run(monkeypatch, capsys, "evaluate", "--field", fields / "disp_0001_0002.nii.gz",
                          "--fixed-labels", labels_dir / "UNP_0001_0000.nii.gz", "--moving-labels",
                          labels_dir / "UNP_0002_0000.nii.gz", "--no-hd95", "-o", out)
    assert code == 0 and "every non-zero label present in both label maps" in stdout
    assert sorted(json.loads(out.read_text())["cases"]["disp_0001_0002"]["dice_per_label"], key=int) == ["1", "2"]


def test_label_rows_are_named_from_the_dataset_json_else_freesurfer(tmp_path, monkeypatch, capsys) -> None:
    root = write_unpaired(tmp_path / "unp")
    _rewrite_json(root, labels={"0": {"0": "background", "1": "cube", "2": "slab"}})  # per-modality form
    fields = tmp_path / "fields"
    save_field(fields / "disp_0001_0002.nii.gz", np.zeros(SHAPE + (3,), np.float32))
    out = tmp_path / "m.json"
    code, stdout, _ = run(monkeypatch, capsys, "evaluate", "--dataset", root, "--displacements", fields, "-o", out)
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in stdout.splitlines() if line.count("│") >= 4}
    assert "cube" in rows["1"] and "slab" in rows["2"] and "mean over the 2 labels" in rows["all"]
    assert "names: the dataset JSON's labels map" in stdout
    result = json.loads(out.read_text())
    assert result["label_names"] == {"1": "cube", "2": "slab"}
    assert set(result["aggregates"]["dice"]) == {"mean", "std", "30", "n"}  # the JSON keys stay as they are

    fixed = np.zeros((12, 12, 12), np.uint8)
    fixed[2:6, 2:9, 2:9], fixed[6:10, 2:9, 2:9] = 2, 41
    moving = np.roll(fixed, 1, axis=1)
    for name, array in (("f", fixed), ("m", moving)):
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    save_field(tmp_path / "one.npz", np.zeros((12, 12, 12, 3), np.float32))
    code, stdout, _ = run(monkeypatch, capsys, "evaluate", "--field", tmp_path / "one.npz", "--fixed-labels",
                          tmp_path / "f.nii.gz", "--moving-labels", tmp_path / "m.nii.gz")
    rows = {line.split("│")[1].strip(): line for line in stdout.splitlines() if line.count("│") >= 4}
    assert code == 0 and "Left-Cerebral-White-Matter" in rows["2"] and "Right-Cerebral-White-Matter" in rows["41"]
    assert "names: FreeSurfer aseg names" in stdout


def test_aggregate_rows_are_named_and_the_quantile_explained(tmp_path, monkeypatch, capsys) -> None:
    root = write_paired(tmp_path / "tiny")
    fields = tmp_path / "fields"
    save_field(fields / "disp_0002_0002.nii.gz", constant(SHIFT))
    save_field(fields / "disp_0003_0003.nii.gz", constant([0.0, 0.0, 0.0]))
    code, stdout, _ = run(monkeypatch, capsys, "evaluate", "--dataset", root, "--displacements", fields)
    assert code == 0
    first_cells = [line.split("│")[1].strip() for line in stdout.splitlines() if line.count("│") >= 4]
    assert first_cells[-3:] == ["mean over cases", "std over cases", "30 % quantile over cases *"]
    assert "30" not in first_cells and "mean" not in first_cells
    assert "0.3 quantile" in stdout and "0.7 quantile" in stdout


def test_name_labels_prefers_the_dataset_then_freesurfer_aseg_values_only() -> None:
    assert name_labels([1, 2], {1: "cube"}) == ({1: "cube", 2: ""}, "the dataset JSON's labels map")
    names, source = name_labels([17, 53, 24])
    assert names == {17: "Left-Hippocampus", 53: "Right-Hippocampus", 24: "CSF"} and source.startswith("FreeSurfer")
    names, source = name_labels(list(range(1, 36)))  # Learn2Reg OASIS's own 1..35 numbering: not aseg values
    assert set(names.values()) == {""} and source.startswith("none")
    assert dataset_label_names({"labels": {"1": "cube", "2": "slab"}}, Path("d.json")) == {1: "cube", 2: "slab"}
    assert dataset_label_names({}, Path("d.json")) == {}
