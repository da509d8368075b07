"""CLI edge cases found in session 13; each test failed before its fix."""

import os
import subprocess
import sys

from test_cli import invoke, one_line_error


def test_a_failing_run_without_quiet_writes_one_stderr_line(tmp_path):
    """Without --quiet, the stage bar's text (with carriage returns) went to stderr before the
    error line, also when stderr was a file or a pipe."""
    r = invoke("influence", "--dataset", "mnist", "--data-root", tmp_path,
               "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert "\r" not in r.stderr
    assert r.stderr.startswith("error: mnist: dataset files not found"), repr(r.stderr[:300])
    assert len(r.stderr.splitlines()) == 1


def test_on_a_terminal_the_error_line_starts_clean(tmp_path):
    """On a terminal the bar is drawn, and cleared before the error line: the error used to
    follow "stage: data: 0%|...|" on the same line."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()  # a new pty is 0 x 0: tqdm would draw an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ntkcore_launch", "influence", "--dataset", "mnist",
             "--data-root", str(tmp_path), "--out", str(tmp_path / "o")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, timeout=120)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the writer is gone and the buffer is read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert done.returncode == 2
    text = seen.decode(errors="replace")
    assert "stage: data" in text  # the bar is shown on a terminal
    last = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()][-1]
    shown = last.split("\r")[-1]  # what the terminal shows once the carriage returns act
    assert shown.startswith("error: mnist: dataset files not found"), repr(text[-400:])


TINY = ("--n-train", 60, "--n-test", 5, "--epochs", 1, "--quiet", "--solver", "exact")


def test_a_stage_file_replaced_by_another_runs_is_not_reused(tmp_path):
    """influence.npz of a width-8 run copied over a width-16 run's was reused when the
    width-16 run resumed (only --show changed): the width-8 scores were reported as its own."""
    import shutil

    import numpy as np
    narrow, wide = tmp_path / "w8", tmp_path / "w16"
    assert invoke("influence", *TINY, "--width", 8, "--out", narrow).exit_code == 0
    assert invoke("influence", *TINY, "--width", 16, "--out", wide).exit_code == 0
    own = np.load(wide / "influence.npz")["scores"]
    foreign = np.load(narrow / "influence.npz")["scores"]
    assert own.shape == foreign.shape and not np.array_equal(own, foreign)
    shutil.copy(narrow / "influence.npz", wide / "influence.npz")
    r = invoke("influence", *TINY, "--width", 16, "--show", 0, "--out", wide)
    one_line_error(r, f"{wide / 'influence.npz'}: a finished stage's file was changed",
                   "--overwrite")
    assert invoke("influence", *TINY, "--width", 16, "--show", 0, "--out", wide,
                  "--overwrite").exit_code == 0
    np.testing.assert_array_equal(np.load(wide / "influence.npz")["scores"], own)


def test_a_retrained_model_is_not_paired_with_the_old_scores(tmp_path, monkeypatch):
    """model.pt deleted from a finished run: the rerun trained again and then reused
    influence.npz, the scores of the earlier model (equal only where training is
    bit-reproducible)."""
    out = tmp_path / "o"
    assert invoke("influence", *TINY, "--width", 8, "--out", out).exit_code == 0
    (out / "model.pt").unlink()
    r = invoke("influence", *TINY, "--width", 8, "--out", out)
    assert r.exit_code == 0, r.output
    assert "reusing the trained model" not in r.output
    assert "reusing the scores" not in r.output


def test_a_run_folder_copied_without_its_file_times_still_resumes(tmp_path, monkeypatch):
    """``cp -r`` gives every file a new mtime: the stage files are vouched for by their
    checksum, so the copy reuses the model and the scores."""
    import shutil

    import ntkcore.experiments.influence_run as ir
    first, copied = tmp_path / "a", tmp_path / "b"
    assert invoke("influence", *TINY, "--width", 8, "--out", first).exit_code == 0
    shutil.copytree(first, copied, copy_function=shutil.copy)  # contents, new times
    monkeypatch.setattr(ir, "train_network", lambda *a, **kw: 1 / 0)
    monkeypatch.setattr(ir, "kernel_influence", lambda *a, **kw: 1 / 0)
    r = invoke("influence", *TINY, "--width", 8, "--show", 0, "--out", copied)
    assert r.exit_code == 0, r.output
    assert "reusing the scores" in r.output and "reusing the trained model" in r.output


def test_a_damaged_stage_file_of_a_run_recorded_before_fingerprints(tmp_path):
    """Stage records without fingerprints (earlier versions) are judged by presence; a damaged
    file is then caught when it is read, as before."""
    import json
    out = tmp_path / "o"
    assert invoke("influence", *TINY, "--width", 8, "--out", out).exit_code == 0
    manifest = json.loads((out / "run.json").read_text())
    for stage in manifest["stages"].values():
        del stage["fingerprints"]
    (out / "run.json").write_text(json.dumps(manifest))
    npz = out / "influence.npz"
    npz.write_bytes(npz.read_bytes()[:1000])
    one_line_error(invoke("influence", *TINY, "--width", 8, "--show", 0, "--out", out),
                   "influence.npz: a finished stage's file is damaged", "--overwrite")


def test_an_interrupted_solve_after_a_retrain_does_not_reuse_the_old_scores(tmp_path,
                                                                            monkeypatch):
    """Retraining kept the old "solve" record: a run stopped during the new solve, then
    rerun, reused the earlier model's influence.npz with the new model.pt (a retrain that
    differs stands in for a GPU's)."""
    import numpy as np

    import ntkcore.experiments.influence_run as ir
    out = tmp_path / "o"
    assert invoke("influence", *TINY, "--width", 8, "--out", out).exit_code == 0
    old_alpha = np.load(out / "influence.npz")["alpha"]
    (out / "model.pt").unlink()
    real_train = ir.train_network
    monkeypatch.setattr(ir, "train_network",
                        lambda *a, **kw: real_train(*a, **{**kw, "seed": kw["seed"] + 1}))
    real_solve = ir.kernel_influence
    monkeypatch.setattr(ir, "kernel_influence",
                        lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert invoke("influence", *TINY, "--width", 8, "--out", out).exit_code == 130
    monkeypatch.setattr(ir, "kernel_influence", real_solve)
    monkeypatch.setattr(ir, "train_network", lambda *a, **kw: 1 / 0)  # model.pt is whole
    r = invoke("influence", *TINY, "--width", 8, "--out", out)
    assert r.exit_code == 0, r.output
    assert "reusing the scores" not in r.output
    assert not np.array_equal(np.load(out / "influence.npz")["alpha"], old_alpha)


def test_stage_files_that_are_missing_or_unreadable(tmp_path, monkeypatch):
    """record() of a file not (yet) written raised FileNotFoundError; a file that could not
    be read was reported as "changed ... another run's file copied in"."""
    import pytest

    from ntkcore.errors import CorruptDataError
    from ntkcore.experiments import output
    with output.RunFolder(tmp_path / "r", "t", {"a": 1}) as run:
        run.record("s", ["absent.npz"])
        assert not run.done("s")
        (tmp_path / "r" / "x.bin").write_bytes(b"abc")
        run.record("t", ["x.bin"])
        assert run.done("t")
        os.utime(tmp_path / "r" / "x.bin", ns=(1, 1))  # new time: the CRC is read again

        def unreadable(path):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(output, "_crc32", unreadable)
        with pytest.raises(CorruptDataError, match="cannot be read"):
            run.done("t")


def test_a_file_missing_when_its_stage_was_recorded_is_not_vouched_for_later(tmp_path):
    """A stage recorded with a file not yet written got no fingerprint, and the file
    appearing later was then accepted by presence alone, like a stage of an old version."""
    from ntkcore.experiments import output
    with output.RunFolder(tmp_path / "r", "t", {"a": 1}) as run:
        run.record("s", ["late.npz"])
        (tmp_path / "r" / "late.npz").write_bytes(b"anything")
        assert not run.done("s")
