"""`ntkcore influence` / `ntkcore info` end to end, on digits and on tiny files in real formats."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ntkcore.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import write_cifar10, write_mnist  # noqa: E402

TINY = ["--width", "64", "--epochs", "2", "--quiet"]


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def one_line_error(result, *needles):
    assert result.exit_code != 0
    err = result.stderr.strip() if hasattr(result, "stderr") else result.output.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("arch", ["relu", "attn"])
def test_influence_on_digits_writes_everything(tmp_path, arch):
    out = tmp_path / "run"
    r = invoke("influence", "--n-train", 150, "--n-test", 12, "--arch", arch, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    for name in ("model.pt", "influence.npz", "summary.json", "influence_examples.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "complexity_deciles.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["arch"] == arch
    assert summary["solver"] == "exact"
    assert all(v is True for v in summary["diagnostics"]["checks"].values())
    assert len(summary["top_influences"]) == 5
    top = summary["top_influences"][0]
    assert len(top["helpful"]) == 5 and top["helpful"][0]["score"] >= top["harmful"][0]["score"]
    data = np.load(out / "influence.npz")
    assert data["scores"].shape == (12, 150) and np.isfinite(data["scores"]).all()
    assert data["top_helpful"][0, 0] == np.argmax(data["scores"][0])
    assert "stage" in r.output and "training" in r.output


def test_rerun_needs_overwrite(tmp_path):
    out = tmp_path / "run"
    assert invoke("influence", "--n-train", 60, "--n-test", 5, "--out", out, *TINY).exit_code == 0
    r = invoke("influence", "--n-train", 60, "--n-test", 5, "--out", out, *TINY)
    one_line_error(r, "--overwrite")
    r = invoke("influence", "--n-train", 60, "--n-test", 5, "--out", out, "--overwrite", *TINY)
    assert r.exit_code == 0


def test_interrupted_run_resumes_from_its_trained_model(tmp_path, monkeypatch):
    """Stopped after training, the same command resumes without training again; other
    settings are refused (naming what differs) rather than mixed into the folder."""
    import ntkcore.experiments.influence_run as ir
    real_influence, real_train = ir.kernel_influence, ir.train_network

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    args = ("influence", "--n-train", 60, "--n-test", 5, "--out", out, *TINY)
    monkeypatch.setattr(ir, "kernel_influence", interrupted)
    r = invoke(*args)
    assert r.exit_code == 130 and (out / "model.pt").exists()
    assert not (out / "summary.json").exists()
    saved = (out / "model.pt").read_bytes()
    one_line_error(invoke(*args[:-len(TINY)], "--seed", 7, *TINY), "seed", "--overwrite")
    assert (out / "model.pt").read_bytes() == saved  # the refused run touched nothing

    def no_training(*a, **kw):
        raise AssertionError("trained again")

    monkeypatch.setattr(ir, "kernel_influence", real_influence)
    monkeypatch.setattr(ir, "train_network", no_training)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["resumed_from_model_pt"] is True
    monkeypatch.setattr(ir, "train_network", real_train)
    fresh = tmp_path / "fresh"
    assert invoke(*args[:5], "--out", fresh, *TINY).exit_code == 0
    np.testing.assert_array_equal(np.load(out / "influence.npz")["scores"],
                                  np.load(fresh / "influence.npz")["scores"])


def test_overwrite_clears_the_old_run_before_any_work(tmp_path, monkeypatch):
    """A failed --overwrite run must not leave the previous run's results beside its own
    model (one folder, one run)."""
    import ntkcore.experiments.influence_run as ir
    out = tmp_path / "run"
    assert invoke("influence", "--n-train", 60, "--n-test", 5, "--out", out, *TINY
                  ).exit_code == 0
    monkeypatch.setattr(ir, "kernel_influence", lambda *a, **kw: 1 / 0)
    r = invoke("influence", "--n-train", 60, "--n-test", 5, "--out", out, "--overwrite",
               "--seed", 3, *TINY)
    assert r.exit_code != 0
    assert sorted(p.name for p in out.iterdir()) == [".run.lock", "model.pt", "run.json"]
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["config"]["seed"] == 3 and list(manifest["stages"]) == ["training"]


def test_output_files_follow_the_umask(tmp_path):
    import os
    out = tmp_path / "run"
    assert invoke("influence", "--n-train", 60, "--n-test", 5, "--out", out, *TINY
                  ).exit_code == 0
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "summary.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = invoke("influence", "--n-train", 60, "--n-test", 5, "--out", tmp_path / "afile" / "sub",
               *TINY)
    one_line_error(r, "cannot create")


@pytest.mark.parametrize("gz,layout", [(True, "flat"), (False, "torchvision")])
def test_influence_on_tiny_mnist_files(tmp_path, gz, layout):
    root = write_mnist(tmp_path / "data", 40, 10, gz=gz, layout=layout)
    r = invoke("influence", "--dataset", "mnist", "--data-root", root, "--classes", "3,8",
               "--out", tmp_path / "o", *TINY)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["data"]["binary"] and summary["data"]["dim"] == 784


def test_influence_on_tiny_cifar10_files(tmp_path):
    root = write_cifar10(tmp_path / "data", 40, 10)
    r = invoke("influence", "--dataset", "cifar10", "--data-root", root, "--out",
               tmp_path / "o", *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["data"]["dim"] == 3072


def test_missing_cifar10_names_the_path_and_the_fix(tmp_path):
    r = invoke("influence", "--dataset", "cifar10", "--width", "1024", "--data-root",
               tmp_path / "nowhere", "--out", tmp_path / "o")
    one_line_error(r, "nowhere", "--download")


def test_corrupt_file_is_reported(tmp_path):
    root = write_mnist(tmp_path / "data", 20, 5, gz=False)
    img = next(Path(root).rglob("train-images-idx3-ubyte"))
    img.write_bytes(img.read_bytes()[:100])  # truncated
    r = invoke("influence", "--dataset", "mnist", "--data-root", root, "--out", tmp_path / "o",
               *TINY)
    one_line_error(r, "train-images")


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "imagenet"], "imagenet"),
    (["--lam", "0"], "lam"),
    (["--lam", "-1"], "lam"),
    (["--classes", "0"], "class"),
    (["--width", "0"], "width"),
    (["--n-train", "999999"], "n_train"),
    (["--diag-probes", "1"], "diag_probes"),
])
def test_bad_input_one_line_nonzero_exit(tmp_path, args, needle):
    r = invoke("influence", "--out", tmp_path / "o", *TINY, *args)  # args last: they win
    one_line_error(r, needle)


def test_bad_solver_options_fail_before_training(tmp_path):
    r = invoke("influence", "--out", tmp_path / "o", *TINY, "--diag-probes", "0")
    one_line_error(r, "diag_probes")
    assert not (tmp_path / "o" / "model.pt").exists()


def test_too_large_for_memory_prints_estimate_and_fitting_n(tmp_path):
    r = invoke("influence", "--n-train", 300, "--n-test", 5, "--solver", "exact",
               "--out", tmp_path / "o", *TINY, env={"NTKCORE_MEMORY_LIMIT": str(100 * 100 * 8)})
    one_line_error(r, "KiB", "would fit")  # 703 KiB over a 78.1 KiB budget


def test_info_lists_backends_and_datasets():
    r = invoke("info")
    assert r.exit_code == 0
    for needle in ("numpy", "numba", "cuda", "digits", "fashion-mnist", "cifar10"):
        assert needle in r.output


MODEL_FILE = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.LayerNorm(192), nn.Linear(192, 10))
'''


def test_influence_for_a_users_own_model(tmp_path):
    import torch
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    ns = {}
    exec(MODEL_FILE, ns)
    model = ns["make"]()
    with torch.no_grad():
        model[-1].bias.add_(0.5)  # weights that differ from the factory's
    torch.save(model.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "o"
    r = invoke("influence", "--model", f"{path}:make", "--weights", tmp_path / "w.pt",
               "--model-input", "images", "--n-train", 40, "--n-test", 6, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["input"] == "images" and summary["solver"] == "exact"
    assert np.load(out / "influence.npz")["scores"].shape == (6, 40)


def test_bad_model_spec_is_one_line(tmp_path):
    r = invoke("influence", "--model", "no_such_module_xyz:make", "--out", tmp_path / "o")
    one_line_error(r, "no_such_module_xyz")
    r = invoke("influence", "--weights", tmp_path / "w.pt", "--out", tmp_path / "o2")
    assert r.exit_code != 0


@pytest.mark.parametrize("args,solver", [
    (["--solver", "nystrom", "--rank", "60", "--landmarks", "uniform"], "nystrom"),
    (["--solver", "cg", "--tol", "1e-8", "--rank", "60"], "cg"),
    (["--solver", "auto"], "nystrom"),  # exact does not fit the 1.5 MB budget below
    (["--solver", "exact", "--precision", "float32", "--diag-probes", "64"],
     "exact[float32, diag from 64 probes]"),
])
def test_approximate_solvers_from_the_cli(tmp_path, args, solver):
    out = tmp_path / "o"
    # 1.5 MB: exact (1.4 MiB) does not fit 70% of it; Nystrom with the operator's caches, one
    # row block and the (T, n) arrays, all of which auto now counts, does
    auto = solver == "nystrom" and "auto" in args
    env = {"NTKCORE_MEMORY_LIMIT": str(1_500_000)} if auto else None
    r = invoke("influence", "--n-train", 300, "--n-test", 5, "--out", out, *TINY, *args, env=env)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["solver"] == solver
    assert summary["solver_reason"]


def test_synthetic_data_of_any_dimension(tmp_path):
    r = invoke("influence", "--dataset", "synthetic", "--dim", 30, "--n-train", 80, "--n-test", 4,
               "--out", tmp_path / "o", *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["data"]["dim"] == 30
    one_line_error(invoke("influence", "--dim", 30, "--out", tmp_path / "p", *TINY), "dim")


def test_large_score_sets_are_stored_as_float32(tmp_path, monkeypatch):
    """Above FLOAT64_SCORE_LIMIT entries the scores are converted before the copy to the host
    and stored (and shown) as float32; the stored values equal the float64 run's, rounded."""
    from ntkcore.experiments import influence_run
    r = invoke("influence", "--n-train", 60, "--n-test", 5, "--out", tmp_path / "f64", *TINY)
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(influence_run, "FLOAT64_SCORE_LIMIT", 100)
    r = invoke("influence", "--n-train", 60, "--n-test", 5, "--out", tmp_path / "f32", *TINY)
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "f64" / "influence.npz") as a, \
            np.load(tmp_path / "f32" / "influence.npz") as b:
        assert a["scores"].dtype == np.float64 and b["scores"].dtype == np.float32
        assert np.array_equal(b["scores"], a["scores"].astype(np.float32))
