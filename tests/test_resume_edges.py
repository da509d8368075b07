"""Resuming by stage identity (ntkcore.experiments.output.RunFolder with ``identity=``): a run
whose training settings match reuses model.pt, whatever its solver, solve device or display
options, unfinished or finished; other training settings are refused; a solve that cannot fit
is refused before training; the data's identity does not depend on the current folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import invoke, one_line_error  # noqa: E402

TINY = ("--n-train", 60, "--n-test", 5, "--width", 16, "--epochs", 1, "--quiet")


def _no_training(*a, **kw):
    raise AssertionError("trained again")


def _manifest(out):
    return json.loads((out / "run.json").read_text())


def test_a_failed_solve_is_finished_with_another_solver_reusing_the_model(tmp_path,
                                                                          monkeypatch):
    """The reviewer's case: CG at an impossible tolerance fails after training; the same folder
    is then finished with the exact solver (and other display / device options) without
    training again, and equals a fresh exact run."""
    import ntkcore.experiments.influence_run as ir
    out = tmp_path / "D"
    r = invoke("influence", *TINY, "--solver", "cg", "--tol", "1e-300", "--out", out)
    assert r.exit_code != 0 and (out / "model.pt").exists()
    saved = (out / "model.pt").read_bytes()
    real_train = ir.train_network
    monkeypatch.setattr(ir, "train_network", _no_training)
    r = invoke("influence", *TINY, "--solver", "exact", "--show", 2, "--device", "cpu",
               "--out", out)
    assert r.exit_code == 0, r.output
    assert f"reusing the trained model from {out / 'model.pt'} (same training settings" \
        in r.output
    assert (out / "model.pt").read_bytes() == saved
    m = _manifest(out)
    assert m["complete"] and m["config"]["solver"] == "exact" and m["config"]["show"] == 2
    assert m["about"]["device"] == "cpu" and m["config"]["solver_options"] == {}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["solver"] == "exact" and summary["training"]["resumed_from_model_pt"]
    monkeypatch.setattr(ir, "train_network", real_train)
    fresh = tmp_path / "fresh"
    assert invoke("influence", *TINY, "--solver", "exact", "--out", fresh).exit_code == 0
    np.testing.assert_array_equal(np.load(out / "influence.npz")["scores"],
                                  np.load(fresh / "influence.npz")["scores"])


def test_a_finished_run_is_solved_again_and_its_old_results_do_not_survive(tmp_path,
                                                                          monkeypatch):
    import ntkcore.experiments.influence_run as ir
    out = tmp_path / "D"
    assert invoke("influence", *TINY, "--solver", "exact", "--out", out).exit_code == 0
    one_line_error(invoke("influence", *TINY, "--solver", "exact", "--out", out),
                   "finished results of these settings", "--overwrite")
    monkeypatch.setattr(ir, "train_network", _no_training)
    real_influence = ir.kernel_influence
    monkeypatch.setattr(ir, "kernel_influence", lambda *a, **kw: 1 / 0)
    r = invoke("influence", *TINY, "--solver", "nystrom", "--rank", 20, "--out", out)
    assert r.exit_code != 0
    # the exact run's results are gone (they were not nystrom's); the model stays
    assert sorted(p.name for p in out.iterdir()) == [".run.lock", "model.pt", "run.json"]
    m = _manifest(out)
    assert not m["complete"] and m["config"]["solver"] == "nystrom"
    assert m["files"] == ["model.pt"] and list(m["stages"]) == ["training"]
    monkeypatch.setattr(ir, "kernel_influence", real_influence)
    r = invoke("influence", *TINY, "--solver", "nystrom", "--rank", 20, "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "summary.json").read_text())["solver"] == "nystrom"
    assert _manifest(out)["complete"]



def test_only_display_options_changed_reuses_the_scores(tmp_path, monkeypatch):
    """--show on a finished run: the model and the solve (influence.npz) are reused, the
    figures and summary written again; a solver setting (--tol) solves again."""
    import ntkcore.experiments.influence_run as ir
    out = tmp_path / "D"
    assert invoke("influence", *TINY, "--solver", "exact", "--out", out).exit_code == 0
    saved = np.load(out / "influence.npz")["scores"]
    monkeypatch.setattr(ir, "train_network", _no_training)
    real_influence = ir.kernel_influence
    monkeypatch.setattr(ir, "kernel_influence", lambda *a, **kw: 1 / 0)
    r = invoke("influence", *TINY, "--solver", "exact", "--show", 0, "--out", out)
    assert r.exit_code == 0, r.output
    assert "reusing the scores from" in r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores_reused_from_influence_npz"] and summary["solver"] == "exact"
    assert "checks" in summary["diagnostics"] and not (out / "influence_examples.png").exists()
    np.testing.assert_array_equal(np.load(out / "influence.npz")["scores"], saved)
    r = invoke("influence", *TINY, "--solver", "cg", "--tol", 1e-8, "--out", out)
    assert r.exit_code == 1 and "ZeroDivisionError" in r.output  # it solved again: the stub
    monkeypatch.setattr(ir, "kernel_influence", real_influence)
    r = invoke("influence", *TINY, "--solver", "cg", "--tol", 1e-8, "--out", out)
    assert r.exit_code == 0 and "reusing the scores" not in r.output
    assert json.loads((out / "summary.json").read_text())["solver"].startswith("cg")

@pytest.mark.parametrize("change,named", [(("--width", 8), "width"),
                                          (("--epochs", 2), "epochs"),
                                          (("--lam", 1e-2), "lam"),
                                          (("--n-train", 50), "n_train")])
def test_other_training_settings_are_still_refused(tmp_path, change, named):
    out = tmp_path / "D"
    assert invoke("influence", *TINY, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    err = one_line_error(invoke("influence", *TINY, *change, "--solver", "cg", "--out", out),
                         "finished results with other settings", named, "--overwrite")
    assert "solver" not in err  # only what blocks the resume is named
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_preset_epochs_and_device_auto_count_as_what_they_resolve_to(tmp_path, monkeypatch):
    """--preset quick is --epochs 30; --device auto on a machine that trains on the CPU is
    --device cpu: the same training, so the model is reused."""
    import ntkcore.experiments.influence_run as ir
    from ntkcore.experiments.pipeline import torch_device
    if torch_device("auto").type != "cpu":
        pytest.skip("auto trains on the GPU here")
    out = tmp_path / "D"
    args = ("influence", "--n-train", 60, "--n-test", 5, "--width", 16, "--quiet",
            "--out", out)
    monkeypatch.setattr(ir, "kernel_influence",
                        lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert invoke(*args, "--epochs", 30, "--device", "auto").exit_code == 130
    monkeypatch.undo()
    monkeypatch.setattr(ir, "train_network", _no_training)
    r = invoke(*args, "--preset", "quick", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "(same training settings)" in r.output  # nothing that decides a result changed
    assert _manifest(out)["about"]["device"] == "cpu"


def test_an_exact_solve_that_cannot_fit_fails_before_training(tmp_path, monkeypatch):
    import ntkcore.experiments.influence_run as ir
    monkeypatch.setattr(ir, "train_network", _no_training)
    out = tmp_path / "D"
    r = invoke("influence", "--n-train", 100, "--n-test", 20, "--width", 16, "--epochs", 1,
               "--solver", "exact", "--quiet", "--out", out,
               env={"NTKCORE_MEMORY_LIMIT": "200000"})
    one_line_error(r, "exact: n=100 needs", "would fit")
    assert not out.exists()  # nothing was started


def test_a_users_model_checks_the_solver_before_its_entk(tmp_path, monkeypatch):
    import ntkcore.ntk.empirical as emp
    path = _user_model(tmp_path)
    monkeypatch.setattr(emp, "model_kernels", _no_training)
    r = invoke("influence", "--model", f"{path}:make", "--n-train", 100, "--n-test", 5,
               "--solver", "exact", "--quiet", "--out", tmp_path / "D",
               env={"NTKCORE_MEMORY_LIMIT": "200000"})
    one_line_error(r, "exact: n=100 needs")


def test_a_users_model_run_is_solved_again_but_not_with_other_weights(tmp_path):
    import torch
    path = _user_model(tmp_path)
    out = tmp_path / "D"
    args = ("influence", "--model", f"{path}:make", "--weights", tmp_path / "w.pt",
            "--n-train", 40, "--n-test", 5, "--quiet", "--out", out)
    assert invoke(*args).exit_code == 0
    r = invoke(*args, "--solver", "nystrom", "--rank", 10)
    assert r.exit_code == 0, r.output
    assert "replacing the results" in r.output
    assert json.loads((out / "summary.json").read_text())["solver"] == "nystrom"
    state = torch.load(tmp_path / "w.pt")
    state["2.bias"] += 1
    torch.save(state, tmp_path / "w.pt")
    one_line_error(invoke(*args), "other settings", "weights", "--overwrite")


def _user_model(tmp_path):
    import torch
    path = tmp_path / "tiny_model.py"
    path.write_text("import torch\n\ndef make():\n    torch.manual_seed(0)\n"
                    "    return torch.nn.Sequential(torch.nn.Linear(64, 4), torch.nn.ReLU(),\n"
                    "                               torch.nn.Linear(4, 10))\n")
    ns = {}
    exec(path.read_text(), ns)
    torch.save(ns["make"]().state_dict(), tmp_path / "w.pt")
    return path


# --------------------------------------------------------------------------- data identity
def test_digits_resumes_from_another_current_folder(tmp_path, monkeypatch):
    import ntkcore.experiments.influence_run as ir
    out = tmp_path / "D"
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.setattr(ir, "kernel_influence",
                        lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert invoke("influence", *TINY, "--out", out).exit_code == 130
    monkeypatch.setattr(ir, "kernel_influence", _real_influence())
    monkeypatch.setattr(ir, "train_network", _no_training)
    monkeypatch.chdir(tmp_path / "b")
    r = invoke("influence", *TINY, "--out", out)
    assert r.exit_code == 0, r.output
    m = _manifest(out)
    assert m["about"]["data_source"] == "sklearn.datasets.load_digits (embedded)"
    assert str(tmp_path) not in json.dumps(m["identity"]) + json.dumps(m["config"])


def test_the_same_files_under_another_path_are_the_same_data(tmp_path, monkeypatch):
    """Identity is the content hash: identical files in another folder resume (the path is
    recorded for information); other files behind the same path are refused (test_run_folder)."""
    from data_fixtures import write_mnist

    import ntkcore.experiments.influence_run as ir
    for name in ("a", "b"):
        write_mnist(tmp_path / name / "data", n_train=60, n_test=10, seed=0)
    args = ("influence", "--dataset", "mnist", "--data-root", "data", *TINY,
            "--out", tmp_path / "out")
    monkeypatch.setattr(ir, "kernel_influence",
                        lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.chdir(tmp_path / "a")
    assert invoke(*args).exit_code == 130
    assert _manifest(tmp_path / "out")["about"]["data_source"] == str(tmp_path / "a" / "data")
    monkeypatch.setattr(ir, "kernel_influence", _real_influence())
    monkeypatch.setattr(ir, "train_network", _no_training)
    monkeypatch.chdir(tmp_path / "b")
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert _manifest(tmp_path / "out")["about"]["data_source"] == str(tmp_path / "b" / "data")
    # finished: the same run from the first folder is the same settings, not other ones
    monkeypatch.chdir(tmp_path / "a")
    one_line_error(invoke(*args), "finished results of these settings")


def _real_influence():
    from ntkcore.experiments.pipeline import kernel_influence
    return kernel_influence


def _as_legacy(out, cwd):
    """Rewrite a run.json into the format ntkcore wrote before run identities (up to commit
    8ef7771): no identity / about, location options and the data's source path in the config,
    the training device only as "device_resolved", and an unfinished run."""
    m = _manifest(out)
    about = m.pop("about", {})
    m.pop("identity", None)
    cfg = m["config"]
    cfg.pop("training_device", None)
    for key in ("data_root", "download", "device"):
        if key in about:
            cfg[key] = about[key]
    cfg["data"] = {"name": cfg["data"]["name"],
                   "source": str(Path(cwd) / f"{cfg['data']['name']} (embedded)"),
                   "content_hash": cfg["data"]["content_hash"]}
    m["complete"] = False
    (out / "run.json").write_text(json.dumps(m))


def test_an_unfinished_run_from_before_identities_resumes(tmp_path, monkeypatch):
    """A run folder written by the previous release resumes with its settings (no retraining,
    the model it trained is kept) instead of being refused as "other settings (data,
    training_device)"; a finished one with the same settings is refused as finished."""
    import ntkcore.experiments.influence_run as ir
    out = tmp_path / "old"
    assert invoke("influence", *TINY, "--solver", "exact", "--out", out).exit_code == 0
    _as_legacy(out, tmp_path)
    monkeypatch.setattr(ir, "train_network", _no_training)
    r = invoke("influence", *TINY, "--solver", "exact", "--out", out)
    assert r.exit_code == 0, r.output
    assert "reusing the trained model" in r.output
    r = invoke("influence", *TINY, "--solver", "exact", "--out", out)
    assert r.exit_code != 0 and "finished results of these settings" in one_line_error(r)


def test_distance_ignores_where_the_data_came_from(tmp_path):
    """distance records --data-root (and the legacy source path) but does not compare it:
    an unfinished run resumes with another --data-root for the embedded digits."""
    out = tmp_path / "d"
    args = ("distance", "--dataset", "digits", "--n-train", 40, "--n-test", 5,
            "--max-width", 8, "--epochs", 1, "--out", out)
    (tmp_path / "dr1").mkdir()
    (tmp_path / "dr2").mkdir()
    assert invoke(*args, "--data-root", tmp_path / "dr1").exit_code == 0
    m = _manifest(out)
    m["complete"] = False
    (out / "run.json").write_text(json.dumps(m))
    r = invoke(*args, "--data-root", tmp_path / "dr2")
    assert r.exit_code == 0, r.output
    assert _manifest(out)["about"]["data_root"] == str(tmp_path / "dr2")
    _as_legacy(out, tmp_path)
    r = invoke(*args)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_users_model_run_keeps_its_solve_when_a_later_step_stops(tmp_path, monkeypatch,
                                                                   stop):
    """The --model route recorded no stage: stopped (or failing) while its figure was drawn,
    after influence.npz was written, it deleted the whole folder, the finished solve too. Now
    the solve is a stage: it survives, and the rerun reuses it without a new eNTK."""
    import ntkcore.experiments.user_model as um
    import ntkcore.ntk.empirical as emp
    path = _user_model(tmp_path)
    out = tmp_path / "D"
    args = ("influence", "--model", f"{path}:make", "--weights", tmp_path / "w.pt",
            "--n-train", 40, "--n-test", 5, "--show", 2, "--quiet", "--out", out)
    real_figure = um._figure

    def stopped(*a, **kw):
        raise stop("stopped while drawing")

    monkeypatch.setattr(um, "_figure", stopped)
    try:
        invoke(*args)
    except (KeyboardInterrupt, OSError):
        pass
    assert (out / "influence.npz").is_file(), "the finished solve was deleted"
    assert "solve" in _manifest(out)["stages"]
    with np.load(out / "influence.npz") as z:
        first = z["scores"].copy()
    monkeypatch.setattr(um, "_figure", real_figure)
    monkeypatch.setattr(emp, "model_kernels", _no_training)  # the rerun must not solve again
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores_reused_from_influence_npz"] is True
    with np.load(out / "influence.npz") as z:
        assert np.array_equal(z["scores"], first)
    assert (out / "influence_examples.png").is_file()
