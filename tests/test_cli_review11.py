"""CLI edge cases found in the session-11 review; each test failed before its fix."""

import json

import numpy as np

from test_cli import invoke, one_line_error

SMALL = ("--n-train", 40, "--n-test", 6, "--width", 8, "--epochs", 1, "--quiet")


def _model_file(tmp_path, body: str, name="m.py"):
    path = tmp_path / name
    path.write_text("import torch\n\n\ndef make():\n    torch.manual_seed(0)\n" + body)
    return path


LINEAR = "    return torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), " \
         "torch.nn.Linear(16, 10)).double()\n"


def test_a_damaged_manifest_of_ours_is_replaced_by_overwrite(tmp_path):
    """run.json damaged (a field of the wrong type, or truncated): the refusal said "pass
    --overwrite", and --overwrite then refused because of the results the manifest no
    longer listed -- a loop only deleting files by hand could end."""
    out = tmp_path / "o"
    assert invoke("influence", *SMALL, "--out", out).exit_code == 0
    good = (out / "run.json").read_text()
    for damaged in (good.replace('"complete": true', '"complete": "yes"'), good[:60]):
        assert '"ntkcore_run"' in damaged and damaged != good
        (out / "run.json").write_text(damaged)
        one_line_error(invoke("influence", *SMALL, "--out", out), "damaged", "--overwrite")
        r = invoke("influence", *SMALL, "--out", out, "--overwrite")
        assert r.exit_code == 0, r.output
        assert json.loads((out / "run.json").read_text())["complete"] is True


def test_a_damaged_manifest_that_may_not_be_ours_does_not_promise_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text("{\"note\": ")  # no marker: maybe not ours
    (out / "model.pt").write_bytes(b"the user's weights")
    for extra in ((), ("--overwrite",)):
        err = one_line_error(invoke("influence", *SMALL, "--out", out, *extra), "damaged",
                             "model.pt", "move them away")
        assert "pass --overwrite" not in err
    assert (out / "model.pt").read_bytes() == b"the user's weights"


def test_a_finished_run_missing_a_result_file_is_completed_without_retraining(tmp_path):
    """influence.npz deleted from a finished run: the rerun said "already holds finished
    results" and only --overwrite (retraining) got it back."""
    out = tmp_path / "o"
    assert invoke("influence", *SMALL, "--out", out).exit_code == 0
    scores = np.load(out / "influence.npz")["scores"]
    (out / "influence.npz").unlink()
    r = invoke("influence", *SMALL, "--out", out)
    assert r.exit_code == 0, r.output
    assert "reusing the trained model" in r.output
    np.testing.assert_array_equal(np.load(out / "influence.npz")["scores"], scores)


def test_a_model_changed_under_the_same_spec_is_not_resumed(tmp_path):
    """The run identity held the spec string only: after the file's model changed (other
    layers, same spec), a --show rerun reported "same model and data" and kept the old
    model's scores and accuracies."""
    path = _model_file(tmp_path, LINEAR)
    out = tmp_path / "o"
    args = ("influence", "--model", f"{path}:make", "--n-train", 40, "--n-test", 6, "--quiet",
            "--out", out)
    assert invoke(*args).exit_code == 0
    r = invoke(*args, "--show", 3)  # same model: the scores are reused
    assert r.exit_code == 0, r.output
    assert json.loads((out / "summary.json").read_text())["scores_reused_from_influence_npz"]
    path.write_text(path.read_text().replace("torch.nn.ReLU()", "torch.nn.Tanh()"))
    one_line_error(invoke(*args, "--show", 2), "other settings", "model_content")
    path.write_text(path.read_text().replace("manual_seed(0)", "manual_seed(1)"))
    one_line_error(invoke(*args, "--show", 2), "other settings", "model_content")


def test_a_model_with_nan_outputs_is_an_error_not_an_accuracy(tmp_path):
    """One NaN weight: every network output NaN, and summary.json reported network_test
    accuracy 0.1 (argmax over NaN) with exit code 0."""
    path = _model_file(tmp_path, "    m = torch.nn.Linear(64, 10).double()\n"
                                 "    with torch.no_grad():\n"
                                 "        m.weight[0, 0] = float('nan')\n    return m\n")
    r = invoke("influence", "--model", f"{path}:make", "--n-train", 40, "--n-test", 6,
               "--quiet", "--out", tmp_path / "o")
    one_line_error(r, "NaN or Inf on 6 of 6 test rows")


def test_a_model_that_changes_its_input_in_place_is_refused(tmp_path):
    """forward doing x.mul_(2) doubled the shared data arrays (they went in through
    torch.as_tensor), every eNTK block saw other inputs, and the kernel predictor's accuracy
    collapsed (0.05 against 0.70) with exit code 0."""
    path = _model_file(tmp_path, (
        "    class Doubling(torch.nn.Module):\n"
        "        def __init__(self):\n"
        "            super().__init__()\n"
        "            self.lin = torch.nn.Linear(64, 10).double()\n"
        "        def forward(self, x):\n"
        "            return self.lin(x.mul_(2))\n"
        "    return Doubling()\n"))
    r = invoke("influence", "--model", f"{path}:make", "--n-train", 40, "--n-test", 6,
               "--quiet", "--out", tmp_path / "o")
    one_line_error(r, "changes its input in place", "x * 2")


def test_a_blank_data_root_is_refused_like_a_blank_out(tmp_path):
    """--data-root '' (an empty shell variable) silently read the current folder."""
    for command in ("influence", "spectrum", "distance", "malleability"):
        r = invoke(command, "--data-root", "", "--out", tmp_path / "o")
        one_line_error(r, "--data-root", "expected a folder")
    err = one_line_error(invoke("influence", "--out", "   "), "expected a folder name")
    assert "'   '" in err  # the value as typed, not collapsed to one space


def test_a_class_name_with_a_slash_makes_one_default_folder():
    from ntkcore.cli.experiments_cmds import _default_out
    assert _default_out("spectrum", "fashion-mnist", "T-shirt/top,Bag") == \
        "runs/spectrum-fashion-mnist-T-shirt_top_Bag"
    assert _default_out("spectrum", "mnist", "3, 8") == "runs/spectrum-mnist-3_8"


def test_the_model_fingerprint_sees_state_structure_and_shapes():
    """Shapes were taken after flattening ((2, 3) and (3, 2) buffers of the same bytes
    matched); extra state, lazy and sparse entries crashed the run (internal error)."""
    import torch

    from ntkcore.experiments.user_model import model_fingerprint

    def with_buffer(shape):
        m = torch.nn.Module()
        m.register_buffer("b", torch.arange(6.0).reshape(shape))
        return m
    assert model_fingerprint("m:f", with_buffer((2, 3)))["state"] != \
        model_fingerprint("m:f", with_buffer((3, 2)))["state"]
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)  # other weights: the state differs, the structure not
    fa, fb = model_fingerprint("m:f", a), model_fingerprint("m:f", b)
    assert fa["state"] != fb["state"] and fa["structure"] == fb["structure"]
    relu = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    tanh = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    tanh.load_state_dict(relu.state_dict())  # same state, other structure
    fr, ft = model_fingerprint("m:f", relu), model_fingerprint("m:f", tanh)
    assert fr["state"] == ft["state"] and fr["structure"] != ft["structure"]

    class Extra(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass
    sparse = torch.nn.Linear(3, 2)
    sparse.register_buffer("s", torch.eye(3).to_sparse())
    for model in (Extra(), torch.nn.LazyLinear(2), sparse):
        assert len(model_fingerprint("m:f", model)["state"]) == 32


def test_a_model_whose_state_alone_changed_is_not_resumed(tmp_path, monkeypatch):
    """Same source file, same structure, other weights (the seed from the environment):
    only the state hash tells the two models apart."""
    path = tmp_path / "seeded.py"
    path.write_text("import os\nimport torch\n\n\ndef make():\n"
                    "    torch.manual_seed(int(os.environ['NTKCORE_TEST_SEED']))\n"
                    "    return torch.nn.Linear(64, 10).double()\n")
    args = ("influence", "--model", f"{path}:make", "--n-train", 40, "--n-test", 6, "--quiet",
            "--out", tmp_path / "o")
    monkeypatch.setenv("NTKCORE_TEST_SEED", "0")
    assert invoke(*args).exit_code == 0
    monkeypatch.setenv("NTKCORE_TEST_SEED", "1")
    one_line_error(invoke(*args, "--show", 2), "other settings", "model_content")


def test_overwrite_of_a_damaged_manifest_deletes_no_file_it_cannot_name(tmp_path):
    """A model.pt the damaged run never listed (say, the --weights being read) was deleted
    by name; now the new run only replaces what it writes itself."""
    import torch
    path = _model_file(tmp_path, "    return torch.nn.Linear(64, 10).double()\n")
    out = tmp_path / "o"
    args = ("influence", "--model", f"{path}:make", "--n-train", 40, "--n-test", 6,
            "--quiet", "--out", out)
    assert invoke(*args).exit_code == 0
    import importlib.util
    spec = importlib.util.spec_from_file_location("m_for_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.make().state_dict(), out / "model.pt")
    weights = (out / "model.pt").read_bytes()
    (out / "run.json").write_text((out / "run.json").read_text()[:60])  # truncated, ours
    r = invoke(*args, "--weights", out / "model.pt", "--overwrite")
    assert r.exit_code == 0, r.output
    assert (out / "model.pt").read_bytes() == weights


def test_a_finished_malleability_run_missing_a_file_is_still_refused(tmp_path):
    """Its partial files are dropped when it finishes, so no stage is left to reuse:
    resuming would have rerun the whole experiment (hours with --preset paper) unasked."""
    args = ("malleability", "--n-train", 60, "--n-test", 30, "--test-points", 3, "--archs",
            "relu", "--attacks", "fgsm", "--interventions", "curated", "--width", 8,
            "--epochs", 1, "--quiet", "--out", tmp_path / "m")
    assert invoke(*args).exit_code == 0
    (tmp_path / "m" / "table.md").unlink()
    one_line_error(invoke(*args), "finished results", "--overwrite")
