"""``rwcnet demo`` end to end on the nilearn MNI152 template (few IO steps, so it stays short)."""

import re

import nibabel as nib
import pytest
from typer.testing import CliRunner

from rwcnet.cli import app

pytest.importorskip("nilearn")


@pytest.mark.slow
def test_demo_writes_outputs_and_improves_the_endpoint_error(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--output-dir", str(out), "--io-iters", "5", "--seed", "3"])
    assert result.exit_code == 0, result.output
    for name in ("fixed.nii.gz", "moving.nii.gz", "warped.nii.gz", "disp.nii.gz", "qc.png"):
        assert (out / name).is_file(), name
    fixed = nib.load(out / "fixed.nii.gz")
    assert nib.load(out / "disp.nii.gz").shape == (*fixed.shape, 3)
    row = re.search(r"mean endpoint error \(mm, in brain\)\s*[│|]?\s*([\d.]+)\s*[│|]?\s*([\d.]+)", result.output)
    assert row, result.output
    before, after = float(row.group(1)), float(row.group(2))
    assert after < before
    assert "tissue labels" in result.output
