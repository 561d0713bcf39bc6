"""Output files: checked before any work (the work is monkeypatched to fail if reached), written together, mode from the umask (os.stat in subprocesses), SIGTERM (a signalled subprocess)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rwcnet.cli import main
from rwcnet.data.formats import Image, write_field, write_image

SHAPE = (24, 24, 24)


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """Run the ``rwcnet`` entry point in-process; returns the exit code and stderr."""
    monkeypatch.setattr(sys, "argv", ["rwcnet", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def blobs(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 6, 6)).astype(np.float32)
    return np.kron(coarse, np.ones((4, 4, 4), np.float32))


@pytest.fixture()
def pair(tmp_path: Path) -> Path:
    reference = Image(np.zeros(SHAPE, np.float32), np.eye(4))
    write_image(tmp_path / "fixed.nii.gz", blobs(1), reference)
    write_image(tmp_path / "moving.nii.gz", blobs(2), reference)
    write_field(tmp_path / "field.nii.gz", np.zeros((*SHAPE, 3), np.float32), reference)
    np.savetxt(tmp_path / "points.csv", [[4.0, 5.0, 6.0]], delimiter=",")
    return tmp_path


def no_work(*args, **kwargs):
    raise AssertionError("the work started before the outputs were checked")


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


REGISTER_CASES = [
    (["-o", "d.txt"], "d.txt", "format"),
    (["-o", "d.nii.gz", "--qc", "x.jpg"], "x.jpg", "format"),
    (["-o", "d.nii.gz", "--warped", "w.png"], "w.png", "format"),
    (["-o", "d.nii.gz", "--itk-field", "i.npz"], "i.npz", "format"),
    (["-o", "no_such_folder/d.nii.gz"], "no_such_folder/d.nii.gz", "does not exist"),
    (["-o", "/proc/foo.nii.gz"], "/proc/foo.nii.gz", "cannot write in /proc"),
    (["-o", "d.nii.gz", "--warped", "d.nii.gz"], "d.nii.gz", "two outputs"),
    (["-o", "sub.nii.gz"], "sub.nii.gz", "is a folder"),
]


@pytest.mark.parametrize("command", ["register", "convexadam"])
@pytest.mark.parametrize("extra, path, problem", REGISTER_CASES)
def test_registration_outputs_are_checked_before_any_work(pair, monkeypatch, capsys, command, extra, path, problem):
    import rwcnet.commands.register as register_command

    monkeypatch.setattr(register_command, "run_registration", no_work)
    monkeypatch.chdir(pair)
    (pair / "sub.nii.gz").mkdir()
    before = files(pair)
    code, err = run(monkeypatch, capsys, command, "--fixed", "fixed.nii.gz", "--moving", "moving.nii.gz", *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: ") and problem in err, err
    assert files(pair) == before


@pytest.mark.parametrize("extra, path", [
    (["--moving", "moving.nii.gz", "-o", "w.png"], "w.png"),
    (["--keypoints", "points.csv", "--keypoints-output", "moved.txt"], "moved.txt"),
    (["--moving", "moving.nii.gz", "-o", "/proc/w.nii.gz"], "/proc/w.nii.gz"),
])
def test_apply_outputs_are_checked_before_reading_the_field(pair, monkeypatch, capsys, extra, path):
    import rwcnet.commands.apply as apply_command

    monkeypatch.setattr(apply_command, "read_field", no_work)
    monkeypatch.chdir(pair)
    code, err = run(monkeypatch, capsys, "apply", "--field", "field.nii.gz", *extra)
    assert code == 2 and err.startswith(f"error: {path}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("output", ["scores.txt", "/proc/scores.json", "missing/scores.json"])
def test_evaluate_output_is_checked_before_scoring(pair, monkeypatch, capsys, output):
    import rwcnet.commands.evaluate as evaluate_command

    monkeypatch.setattr(evaluate_command, "_evaluate_field", no_work)
    monkeypatch.chdir(pair)
    code, err = run(monkeypatch, capsys, "evaluate", "--field", "field.nii.gz", "-o", output)
    assert code == 2 and err.startswith(f"error: {output}: ") and err.count("\n") == 1, err


def test_demo_train_and_plot_log_check_their_outputs_first(pair, monkeypatch, capsys):
    import rwcnet.commands.demo as demo_command
    import rwcnet.training.loop
    import rwcnet.training.log

    monkeypatch.setattr(demo_command, "load_template", no_work)
    monkeypatch.setattr(rwcnet.training.loop, "train", no_work)
    monkeypatch.setattr(rwcnet.training.log, "plot_log", no_work)
    (pair / "log.jsonl").write_text("{}\n")
    for args, path in [
        (["demo", "--output-dir", "/proc/demo"], "/proc/demo"),
        (["demo", "--output-dir", pair / "fixed.nii.gz"], pair / "fixed.nii.gz"),
        (["train", "cpu-brain", "-o", "/proc/run"], "/proc/run"),
        (["plot-log", pair / "log.jsonl", "-o", pair / "curves.jpg"], pair / "curves.jpg"),
        (["plot-log", pair / "log.jsonl", "-o", "/proc/curves.png"], "/proc/curves.png"),
    ]:
        code, err = run(monkeypatch, capsys, *args)
        assert code == 2 and err.startswith(f"error: {path}: ") and err.count("\n") == 1, (args, err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders, so chmod cannot make one")
def test_read_only_folder_is_refused_before_any_work(pair, monkeypatch, capsys):
    import rwcnet.commands.register as register_command

    monkeypatch.setattr(register_command, "run_registration", no_work)
    locked = pair / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert not os.access(locked, os.W_OK)
        code, err = run(monkeypatch, capsys, "register", "--fixed", pair / "fixed.nii.gz", "--moving",
                        pair / "moving.nii.gz", "-o", locked / "d.nii.gz")
    finally:
        locked.chmod(0o755)
    assert code == 2 and "Permission denied" in err and err.count("\n") == 1, err


def register_args(folder: Path, *extra: str) -> list[object]:
    return ["register", "--fixed", folder / "fixed.nii.gz", "--moving", folder / "moving.nii.gz", "-o",
            folder / "d.nii.gz", "--model", "none", "--io-iters", "2", *extra]


def test_full_disk_gives_one_line_exit_2_and_leaves_no_file(pair, monkeypatch, capsys):
    import SimpleITK

    def full_disk(image, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(SimpleITK, "WriteImage", full_disk)  # the ITK field, written after the field
    before = files(pair)
    code, err = run(monkeypatch, capsys, *register_args(pair, "--itk-field", str(pair / "itk.mha")))
    assert code == 2
    assert err.splitlines()[-1] == f"error: {pair / 'itk.mha'}: No space left on device"
    assert files(pair) == before  # neither the field written before it nor any temporary file


def test_a_failing_qc_picture_leaves_no_field(pair, monkeypatch):
    import rwcnet.qc

    def broken(*args, **kwargs):
        raise RuntimeError("qc failed")

    monkeypatch.setattr(rwcnet.qc, "qc_figure", broken)
    monkeypatch.setattr(sys, "argv", ["rwcnet", *map(str, register_args(pair, "--qc", str(pair / "qc.png"),
                                                                         "--warped", str(pair / "w.nii.gz")))])
    before = files(pair)
    with pytest.raises(RuntimeError, match="qc failed"):  # a bug keeps its traceback
        main()
    assert files(pair) == before


def test_outputs_appear_together_with_the_qc_picture(pair, monkeypatch, capsys):
    code, err = run(monkeypatch, capsys, *register_args(pair, "--qc", str(pair / "qc.png"), "--warped",
                                                        str(pair / "w.nii.gz")))
    assert code == 0, err
    assert files(pair) >= {"d.nii.gz", "qc.png", "w.nii.gz"}
    assert not [name for name in files(pair) if ".tmp" in name]


UMASK_WRITES = textwrap.dedent("""
    import os, sys
    import numpy as np
    from rwcnet.data.formats import Image, write_field, write_image
    from rwcnet.outputs import atomic_output
    folder = sys.argv[1]
    reference = Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    for umask in (0o022, 0o077, 0o002):
        os.umask(umask)
        write_image(f"{folder}/{umask:o}.nii.gz", reference.array, reference)
        write_image(f"{folder}/{umask:o}.mha", reference.array, reference)
        write_field(f"{folder}/{umask:o}.npz", np.zeros((8, 8, 8, 3), np.float32), reference)
        with atomic_output(f"{folder}/{umask:o}.csv") as tmp:
            tmp.write_text("1,2,3")
""")


def test_outputs_get_the_mode_the_umask_gives(tmp_path):
    subprocess.run([sys.executable, "-c", UMASK_WRITES, str(tmp_path)], check=True)
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        for suffix in (".nii.gz", ".mha", ".npz", ".csv"):
            assert oct(os.stat(tmp_path / f"{umask:o}{suffix}").st_mode & 0o777) == oct(mode), (umask, suffix)


SLOW_QC = textwrap.dedent("""
    import sys, time
    import rwcnet.qc
    def slow_qc(path, *args, **kwargs):
        print("writing the QC picture", file=sys.stderr, flush=True)
        time.sleep(60)
    rwcnet.qc.qc_figure = slow_qc
    from rwcnet.cli import main
    sys.argv = ["rwcnet"] + sys.argv[1:]
    main()
""")


def signal_when(process: subprocess.Popen, marker: str, signum: int) -> str:
    """Read the process's stderr until ``marker`` appears, send ``signum``; returns all of stderr."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            process.send_signal(signum)
            break
    seen.append(process.stderr.read())
    process.wait(timeout=60)
    return "".join(seen)


def test_sigterm_while_writing_exits_143_and_removes_temporary_files(pair):
    args = register_args(pair, "--qc", str(pair / "qc.png"), "--warped", str(pair / "w.nii.gz"))
    before = files(pair)
    process = subprocess.Popen([sys.executable, "-c", SLOW_QC, *map(str, args)], stderr=subprocess.PIPE, text=True)
    err = signal_when(process, "writing the QC picture", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "terminated (SIGTERM)" in err
    assert files(pair) == before  # the field and warped image were in temporary files: all removed


@pytest.mark.slow
def test_sigterm_during_registration_exits_143_and_writes_nothing(pair):
    args = register_args(pair)
    args[args.index("--io-iters") + 1] = "100000"
    before = files(pair)
    process = subprocess.Popen([sys.executable, "-m", "rwcnet", *map(str, args)], stderr=subprocess.PIPE, text=True)
    err = signal_when(process, "steps", signal.SIGTERM)
    assert process.returncode == 143, err
    assert "Traceback" not in err
    assert files(pair) == before


def test_a_nifti_cut_short_by_itk_on_a_full_disk_is_an_error_not_a_file(tmp_path, monkeypatch):
    # ITK's NIfTI writer reports no error when the disk is full: it leaves a short file and returns.
    import SimpleITK

    from rwcnet.errors import InputError
    from rwcnet.data.formats import write_itk_field

    real_write = SimpleITK.WriteImage

    def cut_short(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 3])

    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(SimpleITK, "WriteImage", cut_short)
    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    reference = Image(np.zeros(SHAPE, np.float32), np.eye(4))
    field = np.random.default_rng(0).normal(size=(*SHAPE, 3)).astype(np.float32)
    with pytest.raises(InputError, match="itk.nii.gz: No space left on device"):
        write_itk_field(tmp_path / "itk.nii.gz", field, reference)
    assert files(tmp_path) == set()
