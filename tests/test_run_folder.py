"""The run-folder protocol (ntkcore.experiments.output.RunFolder): resume, refusal, --overwrite,
damaged or foreign manifests, locking, and cleanup after a failed start."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from ntkcore.errors import OutputExistsError
from ntkcore.experiments.output import RunFolder, atomic_write_text, dataset_identity

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import TINY, invoke, one_line_error  # noqa: E402

CFG = {"width": 16, "seed": 1}


def _write(run, name, text="x"):
    atomic_write_text(run.output(name), text)


def test_resume_skips_only_stages_whose_files_are_present(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunFolder(tmp_path, "cmd", CFG) as run:
            _write(run, "a.npz")
            run.record("a", ["a.npz"], value=float("nan"))
            _write(run, "b.npz")
            run.record("b", ["b.npz"])
            raise KeyboardInterrupt
    (tmp_path / "b.npz").unlink()  # e.g. an interrupt between deleting and re-recording
    with RunFolder(tmp_path, "cmd", CFG) as run:
        assert run.resumed and run.done("a") and not run.done("b")
        assert np.isnan(run.info("a")["value"])  # non-finite floats survive the JSON


def test_other_settings_are_refused_naming_them_and_finished_runs_too(tmp_path):
    with RunFolder(tmp_path, "cmd", CFG) as run:
        run.record("a")
    with pytest.raises(OutputExistsError, match=r"other settings \(seed\).*resume"):
        RunFolder(tmp_path, "cmd", {**CFG, "seed": 2})
    with pytest.raises(OutputExistsError, match="of `cmd`"):
        RunFolder(tmp_path, "other", CFG)
    with RunFolder(tmp_path, "cmd", CFG) as run:
        run.finish()
    with pytest.raises(OutputExistsError, match="finished results"):
        RunFolder(tmp_path, "cmd", CFG)


def test_settings_outside_the_identity_reopen_the_run_keeping_its_finished_stages(tmp_path):
    """identity= names what the stages depend on: other settings reopen the run, finished or
    not; its finished stages are kept, everything else it wrote is deleted up front."""
    for finished in (False, True):
        out = tmp_path / str(finished)
        with RunFolder(out, "cmd", {**CFG, "solver": "a"}, identity=CFG,
                       about={"source": "here"}) as run:
            _write(run, "model.pt")
            run.record("training", ["model.pt"])
            _write(run, "scores.npz")
            if finished:
                run.finish()
        with RunFolder(out, "cmd", {**CFG, "solver": "b"}, identity=CFG,
                       about={"source": "there"}) as run:  # about: recorded, not compared
            assert run.resumed and run.changed == ["solver"] and run.done("training")
            assert sorted(p.name for p in out.iterdir()) == [".run.lock", "model.pt",
                                                             "run.json"]
            m = json.loads((out / "run.json").read_text())
            assert m["config"]["solver"] == "b" and not m["complete"]
            assert m["about"] == {"source": "there"}
            assert m["files"] == ["model.pt"]
            run.finish()
        with pytest.raises(OutputExistsError, match=r"finished results of these settings"):
            RunFolder(out, "cmd", {**CFG, "solver": "b"}, identity=CFG)
        with pytest.raises(OutputExistsError, match=r"other settings \(seed\);"):
            RunFolder(out, "cmd", {**CFG, "seed": 2, "solver": "c"},
                      identity={**CFG, "seed": 2})
        assert (out / "model.pt").exists()



def test_a_stage_with_its_own_settings_is_kept_only_while_they_hold(tmp_path):
    """record(..., depends_on=) names settings beyond the identity a stage depends on: a run
    that changes only other settings (display) keeps it and its files; one that changes one of
    them drops the stage and deletes its files up front."""
    out = tmp_path / "r"
    with RunFolder(out, "cmd", {**CFG, "solver": "a", "show": 5}, identity=CFG) as run:
        _write(run, "model.pt")
        run.record("training", ["model.pt"])
        _write(run, "scores.npz")
        run.record("solve", ["scores.npz"], depends_on=("solver",), note="first")
        _write(run, "figure.png")
        run.finish()
    with RunFolder(out, "cmd", {**CFG, "solver": "a", "show": 2}, identity=CFG) as run:
        assert run.changed == ["show"] and run.done("solve") and run.done("training")
        assert run.info("solve") == {"note": "first"}
        assert sorted(p.name for p in out.iterdir()) == [".run.lock", "model.pt", "run.json",
                                                         "scores.npz"]
        run.finish()
    with RunFolder(out, "cmd", {**CFG, "solver": "b", "show": 2}, identity=CFG) as run:
        assert run.done("training") and not run.done("solve")
        assert sorted(p.name for p in out.iterdir()) == [".run.lock", "model.pt", "run.json"]

def test_overwrite_deletes_only_what_the_manifest_lists_and_never_through_links(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with RunFolder(tmp_path, "cmd", CFG) as run:
        (tmp_path / "table.md").write_text("mine too")  # a legacy result name, not listed
        _write(run, "a.npz")
        run.record("a", ["a.npz"])
        os.symlink(tmp_path / "notes.txt", run.output("link.png"))
        run.manifest["files"] += ["sub/../notes.txt", "../outside.txt"]
        run.finish()
    (tmp_path.parent / "outside.txt").write_text("outside")
    with RunFolder(tmp_path, "cmd", {**CFG, "seed": 3}, overwrite=True) as run:
        pass
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".run.lock", "notes.txt", "run.json", "table.md"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path.parent / "outside.txt").exists()


def test_files_are_registered_before_they_are_written(tmp_path):
    """An interrupt while writing outputs leaves their names in the manifest, so a later
    --overwrite removes them (no figure of an old run survives beside a new one)."""
    with pytest.raises(KeyboardInterrupt):
        with RunFolder(tmp_path, "cmd", CFG) as run:
            run.record("a")
            path = run.output("fig.png")
            path.write_text("half")
            raise KeyboardInterrupt
    assert "fig.png" in json.loads((tmp_path / "run.json").read_text())["files"]
    with RunFolder(tmp_path, "cmd", CFG, overwrite=True):
        pass
    assert not (tmp_path / "fig.png").exists()


def test_a_failed_start_leaves_no_manifest_and_no_new_folder(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ValueError):
        with RunFolder(out, "cmd", CFG) as run:
            _write(run, "table.md")  # a stage-less command failing while it writes
            raise ValueError("bad input found after the folder was opened")
    assert not out.exists()
    with RunFolder(out, "cmd", {**CFG, "seed": 9}) as run:  # the corrected command runs
        run.finish()


def test_damaged_manifest_needs_overwrite_and_a_foreign_one_is_never_touched(tmp_path):
    (tmp_path / "run.json").write_text('{"command": "influ')
    with pytest.raises(OutputExistsError, match="damaged"):
        RunFolder(tmp_path, "cmd", CFG)
    with RunFolder(tmp_path, "cmd", CFG, overwrite=True) as run:
        run.finish()
    (tmp_path / "run.json").write_text(json.dumps({"name": "someone else's"}))
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not an ntkcore run manifest"):
            RunFolder(tmp_path, "cmd", CFG, overwrite=overwrite)
    assert json.loads((tmp_path / "run.json").read_text()) == {"name": "someone else's"}


def test_one_run_at_a_time_holds_a_folder(tmp_path):
    with RunFolder(tmp_path, "cmd", CFG):
        with pytest.raises(OutputExistsError, match="in use"):
            RunFolder(tmp_path, "cmd", CFG)
    with RunFolder(tmp_path, "cmd", CFG) as run:  # released
        run.finish()


def test_dataset_identity_sees_the_data_not_the_path(tmp_path):
    import ntkcore as nc
    a = nc.load_dataset("synthetic", n_train=40, n_test=5, seed=1)
    b = nc.load_dataset("synthetic", n_train=40, n_test=5, seed=2)
    assert dataset_identity(a) == dataset_identity(
        nc.load_dataset("synthetic", n_train=40, n_test=5, seed=1))
    assert dataset_identity(a)["content_hash"] != dataset_identity(b)["content_hash"]


def test_the_data_identity_holds_no_path_of_the_current_folder(tmp_path, monkeypatch):
    import ntkcore as nc
    from ntkcore.experiments.output import dataset_source
    seen = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        monkeypatch.chdir(tmp_path / sub)
        ds = nc.load_dataset("digits", n_train=60, n_test=5)
        seen.append(dataset_identity(ds))
        assert dataset_source(ds) == "sklearn.datasets.load_digits (embedded)"
    assert seen[0] == seen[1] and str(tmp_path) not in json.dumps(seen[0])


# --------------------------------------------------------------------------- through the CLI
def test_resume_with_other_files_behind_the_same_data_root_is_refused(tmp_path, monkeypatch):
    from data_fixtures import write_mnist
    import ntkcore.experiments.influence_run as ir
    for name, seed in (("a", 0), ("b", 1)):
        write_mnist(tmp_path / name / "data", n_train=60, n_test=10, seed=seed)
    args = ("influence", "--dataset", "mnist", "--data-root", "data", "--n-test", 5,
            "--out", tmp_path / "out", *TINY)
    monkeypatch.setattr(ir, "kernel_influence",
                        lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.chdir(tmp_path / "a")
    assert invoke(*args).exit_code == 130
    monkeypatch.chdir(tmp_path / "b")
    one_line_error(invoke(*args), "other settings", "data")


@pytest.mark.parametrize("arch", ["relu", "attn"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, arch):
    import ntkcore.experiments.influence_run as ir
    real = ir.kernel_influence
    args = ("influence", "--n-train", 60, "--n-test", 5, "--arch", arch, *TINY)
    monkeypatch.setattr(ir, "kernel_influence",
                        lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert invoke(*args, "--out", tmp_path / "r").exit_code == 130
    monkeypatch.setattr(ir, "kernel_influence", real)
    assert invoke(*args, "--out", tmp_path / "r").exit_code == 0
    assert invoke(*args, "--out", tmp_path / "f").exit_code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "r" / "influence.npz")["scores"],
                                  np.load(tmp_path / "f" / "influence.npz")["scores"])


def test_an_unreadable_model_pt_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    import ntkcore.experiments.influence_run as ir
    real = ir.kernel_influence
    args = ("influence", "--n-train", 60, "--n-test", 5, "--out", tmp_path / "r", *TINY)
    monkeypatch.setattr(ir, "kernel_influence",
                        lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert invoke(*args).exit_code == 130
    monkeypatch.setattr(ir, "kernel_influence", real)
    (tmp_path / "r" / "model.pt").write_bytes(b"")
    one_line_error(invoke(*args), "model.pt", "--overwrite")
    # garbage bytes: torch's own first line suggested weights_only=False (unpickling it).
    # The file's fingerprint catches it first; a run recorded before fingerprints loads it
    (tmp_path / "r" / "model.pt").write_bytes(b"PK\x03\x04 not a checkpoint" * 10)
    err = one_line_error(invoke(*args), "model.pt", "was changed", "--overwrite")
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    del manifest["stages"]["training"]["fingerprints"]
    (tmp_path / "r" / "run.json").write_text(json.dumps(manifest))
    err = one_line_error(invoke(*args), "model.pt", "not a readable state_dict",
                         "--overwrite")
    assert "weights_only" not in err


def test_large_npz_files_are_stored_plain(tmp_path, monkeypatch):
    """Compressing 2 GB of float32 scores took ~90 s of a 99 s influence stage (H200 run,
    n = 50 000, T = 10 000) to save ~6 %; above COMPRESS_NPZ_BYTES arrays are stored plain."""
    import zipfile

    from ntkcore.experiments import atomic as output  # the writers live there
    monkeypatch.setattr(output, "COMPRESS_NPZ_BYTES", 1000)
    rng = np.random.default_rng(0)
    small, big = rng.standard_normal(10), rng.standard_normal((30, 20))
    output.atomic_write_npz(tmp_path / "small.npz", a=small)
    output.atomic_write_npz(tmp_path / "big.npz", a=big, labels=np.arange(5))
    kinds = {name: {i.compress_type for i in zipfile.ZipFile(tmp_path / name).infolist()}
             for name in ("small.npz", "big.npz")}
    assert kinds == {"small.npz": {zipfile.ZIP_DEFLATED}, "big.npz": {zipfile.ZIP_STORED}}
    with np.load(tmp_path / "big.npz") as z:
        assert np.array_equal(z["a"], big) and np.array_equal(z["labels"], np.arange(5))
    assert not list(tmp_path.glob(".*.tmp"))


def test_overwrite_never_deletes_result_named_files_no_manifest_lists(tmp_path):
    """A user's --weights w/model.pt with --out w: the refusal used to say "pass
    --overwrite", which then deleted the weights the same command was about to load."""
    (tmp_path / "model.pt").write_bytes(b"the user's weights")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="no ntkcore run manifest"):
            RunFolder(tmp_path, "cmd", CFG, overwrite=overwrite)
    assert (tmp_path / "model.pt").read_bytes() == b"the user's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_failed_first_run_leaves_a_users_empty_folder_as_it_was(tmp_path):
    """The folder existed (empty) before the run: a failure removes the run's lock file but
    not the folder."""
    out = tmp_path / "mine"
    out.mkdir()
    with pytest.raises(RuntimeError):
        with RunFolder(out, "cmd", CFG):
            raise RuntimeError("boom")
    assert out.is_dir() and list(out.iterdir()) == []
