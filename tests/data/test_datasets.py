"""Learn2Reg dataset folders: JSON parsing, pairs, label/mask/keypoint lookup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from l2r_fixture import SHAPE, SHIFT, SPACING, write_paired, write_unpaired
from rwcnet.data.datasets import Learn2RegDataset, Pair, field_names, find_field, image_id, read_pairs_csv
from rwcnet.data.formats import read_image, read_keypoints
from rwcnet.errors import InputError


def test_paired_dataset_pairs_masks_and_csv_keypoints_named_nii(tmp_path: Path) -> None:
    root = write_paired(tmp_path / "tiny")
    ds = Learn2RegDataset(root)
    assert ds.name == "TINY" and ds.pairings == "paired"
    assert ds.evaluation_labels is None
    val = ds.pairs("val")
    assert [p.key for p in val] == ["0002_0000<--0002_0001", "0003_0000<--0003_0001"]
    assert [p.key for p in ds.pairs("train")] == ["0001_0000<--0001_0001"]
    fixed = val[0].fixed
    assert ds.mask_path(fixed) == root / "masksTr" / "TINY_0002_0000.nii.gz"
    assert ds.keypoints_path(fixed) == root / "keypointsTr" / "TINY_0002_0000.csv"
    assert ds.label_path(fixed) is None
    with pytest.raises(InputError, match="registration_test"):
        ds.pairs("test")
    with pytest.raises(InputError, match="unknown pair set 'nope'"):
        ds.pairs("nope")


def test_a_pair_finds_its_images_masks_and_keypoints(tmp_path: Path) -> None:
    ds = Learn2RegDataset(write_paired(tmp_path / "tiny"))
    pair = ds.pairs("val")[0]
    fixed, moving = read_image(pair.fixed), read_image(pair.moving)
    assert fixed.shape == moving.shape == SHAPE
    np.testing.assert_allclose(fixed.spacing, SPACING)
    assert image_id(pair.fixed) == "TINY_0002_0000" and image_id(pair.moving) == "TINY_0002_0001"
    mask = read_image(ds.mask_path(pair.fixed)).array
    assert mask.shape == SHAPE and set(np.unique(mask > 0)) == {False, True}
    fixed_points, moving_points = (read_keypoints(ds.keypoints_path(p)) for p in (pair.fixed, pair.moving))
    assert fixed_points.shape == (5, 3)
    np.testing.assert_allclose(moving_points - fixed_points, np.broadcast_to(SHIFT, (5, 3)), atol=1e-3)
    assert ds.label_path(pair.fixed) is None


def test_unpaired_dataset_labels_train_pairs_and_evaluation_labels(tmp_path: Path) -> None:
    ds = Learn2RegDataset(write_unpaired(tmp_path / "unp"))
    assert ds.evaluation_labels == [1, 2, 3]
    assert len(ds.training_images()) == 4
    train = ds.pairs("train")
    assert len(train) == 2  # 0003 <-> 0004: the validation images 0001, 0002 are held out
    assert {image_id(p.fixed) for p in train} == {"UNP_0003_0000", "UNP_0004_0000"}
    (pair,) = ds.pairs("val")
    assert ds.label_path(pair.moving) == ds.root / "labelsTr" / "UNP_0002_0000.nii.gz"
    labels = read_image(ds.label_path(pair.fixed)).array
    assert labels.shape == SHAPE and set(np.unique(np.rint(labels)).astype(int)) == {0, 1, 2, 3}


def test_pairs_from_csv(tmp_path: Path) -> None:
    root = write_unpaired(tmp_path / "unp")
    csv_file = tmp_path / "pairs.csv"
    absolute = root / "imagesTr" / "UNP_0004_0000.nii.gz"
    csv_file.write_text(f"fixed,moving\n./imagesTr/UNP_0003_0000.nii.gz,{absolute}\n")
    ds = Learn2RegDataset(root)
    assert ds.pairs(csv_file) == [Pair(root / "imagesTr" / "UNP_0003_0000.nii.gz", absolute)]
    assert read_pairs_csv(csv_file, root) == ds.pairs(str(csv_file))
    csv_file.write_text("./imagesTr/UNP_0003_0000.nii.gz,./imagesTr/UNP_0099_0000.nii.gz\n")
    with pytest.raises(InputError, match="UNP_0099_0000.nii.gz"):
        ds.pairs(csv_file)
    csv_file.write_text("only-one-column\n")
    with pytest.raises(InputError, match="line 1"):
        ds.pairs(csv_file)


def test_clear_errors_for_missing_json_and_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        Learn2RegDataset(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no Learn2Reg"):
        Learn2RegDataset(empty)
    (empty / "BAD_dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="BAD_dataset.json"):
        Learn2RegDataset(empty)
    root = write_unpaired(tmp_path / "unp")
    (root / "labelsTr" / "UNP_0002_0000.nii.gz").unlink()
    ds = Learn2RegDataset(root)
    with pytest.raises(InputError, match="UNP_0002_0000.nii.gz"):
        ds.label_path(root / "imagesTr" / "UNP_0002_0000.nii.gz")
    meta = json.loads((root / "UNP_dataset.json").read_text())
    meta["registration_val"] = [{"fixed": "./imagesTr/UNP_0001_0000.nii.gz", "moving": "./imagesTr/GONE.nii.gz"}]
    (root / "UNP_dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="GONE.nii.gz"):
        Learn2RegDataset(root).pairs("val")


def test_shared_brain_dataset(shared_data: Path) -> None:
    ds = Learn2RegDataset(shared_data / "brain")
    (pair,) = ds.pairs("val")
    assert (image_id(pair.fixed), image_id(pair.moving)) == ("BRAIN_0001_0000", "BRAIN_0002_0000")
    assert len(ds.evaluation_labels) == 30
    assert len(ds.pairs("train")) == 6
    assert ds.label_path(pair.fixed) is not None
    assert ds.label_path(ds.root / "imagesTr" / "BRAIN_0003_0000.nii.gz") is None
    fixed = read_image(pair.fixed)
    assert fixed.shape == (160, 192, 224) and read_image(ds.label_path(pair.moving)).shape == fixed.shape
    np.testing.assert_allclose(fixed.spacing, np.ones(3))


def test_field_names_and_find_field(tmp_path: Path):
    fixed, moving = "./imagesTr/OASIS_0395_0000.nii.gz", "OASIS_0396_0000.nii.gz"
    short, long = field_names(fixed, moving)
    assert (short, long) == ("disp_0395_0396.nii.gz", "disp_0395_0000_0396_0000.nii.gz")
    assert field_names("NLST_0101_0000.nii.gz", "NLST_0101_0001.nii.gz") == (
        "disp_0101_0101.nii.gz", "disp_0101_0000_0101_0001.nii.gz")
    assert find_field(tmp_path, fixed, moving) is None
    (tmp_path / "disp_0395_0000_0396_0000.npz").write_bytes(b"")
    assert find_field(tmp_path, fixed, moving) == tmp_path / "disp_0395_0000_0396_0000.npz"
    (tmp_path / long).write_bytes(b"")
    assert find_field(tmp_path, fixed, moving) == tmp_path / long
    (tmp_path / "disp_0395_0396.npz").write_bytes(b"")
    assert find_field(tmp_path, fixed, moving) == tmp_path / "disp_0395_0396.npz"
    (tmp_path / short).write_bytes(b"")
    assert find_field(tmp_path, fixed, moving) == tmp_path / short
    with pytest.raises(InputError, match="fixed.nii.gz"):
        field_names("fixed.nii.gz", moving)


@pytest.mark.parametrize("recorded, expected", [({"0": "CT"}, "ct"), ({"0": "MR"}, "mr"), (None, "mr")])
def test_dataset_modality_names_the_models_preset(tmp_path, recorded, expected):
    meta = {"name": "X", "training": []} | ({"modality": recorded} if recorded else {})
    (tmp_path / "X_dataset.json").write_text(json.dumps(meta))
    assert Learn2RegDataset(tmp_path).modality == expected
