"""CLI edge cases: every bad input is one ``error:`` line and exit 2 (never a traceback, never
an option silently dropped, never a meaningless number with exit 0); a ``note:`` line where
an option is legitimately unused. Sizes are tiny: each test runs in seconds."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ntkcore.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import write_mnist  # noqa: E402

INF = ("--n-train", 40, "--n-test", 6, "--width", 8, "--epochs", 1, "--quiet")
MAL = ("--n-train", 30, "--n-test", 6, "--test-points", 2, "--width", 8, "--epochs", 1,
       "--archs", "relu", "--attacks", "mim", "--iters", 2, "--interventions", "adversarial",
       "--quiet")
DIST = ("--n-train", 30, "--n-test", 6, "--epochs", 1, "--archs", "relu", "--max-width", 8,
        "--quiet")
TINY = {"influence": INF, "malleability": MAL, "distance": DIST}
CXX_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
           "memory: you tried to allocate 51199999999488 bytes. Error code 12 (Cannot allocate "
           "memory)\nframe #0: c10::ThrowEnforceNotMet(char const*, int, char const*)\n"
           "frame #1: <unknown function> + 0x1234 (0x7f in libc10.so)")


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def one_line_error(r, *needles):
    assert r.exit_code == 2, (r.exit_code, r.output)
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in r.output, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------- 3. NaN / Inf in every float option
@pytest.mark.parametrize("command,option,value", [
    ("malleability", "--momentum", "inf"), ("malleability", "--momentum", "nan"),
    ("malleability", "--eps", "inf"), ("malleability", "--step", "inf"),
    ("malleability", "--tau", "nan"), ("malleability", "--lam", "nan"),
    ("influence", "--lam", "inf"), ("influence", "--lam", "nan"), ("influence", "--tol", "inf"),
    ("distance", "--lam", "nan"),
])
def test_non_finite_float_options_are_refused(tmp_path, command, option, value):
    r = invoke(command, *TINY[command], option, value, "--out", tmp_path / "o")
    one_line_error(r, option.lstrip("-"), value)
    assert not (tmp_path / "o").exists()


def test_malleability_config_refuses_infinite_momentum():
    from ntkcore.errors import ParameterError
    from ntkcore.experiments.malleability import MalleabilityConfig
    with pytest.raises(ParameterError, match="momentum"):
        MalleabilityConfig(momentum=float("inf")).resolved()


# ---------------------------------------------------- 4. top-K over all training points
@pytest.mark.parametrize("k", [30, 1000])
def test_topk_at_least_n_train_is_refused(tmp_path, k):
    r = invoke("malleability", *MAL, "--topk", k, "--out", tmp_path / "o")
    one_line_error(r, "topk", "n_train (30)")


# ---------------------------------------------------- 5. options the chosen solver ignores
@pytest.mark.parametrize("solver,option,value", [
    ("exact", "--rank", 10), ("exact", "--tol", 0.1), ("exact", "--landmarks", "uniform"),
    ("nystrom", "--tol", 0.1), ("nystrom", "--diag-probes", 8), ("cg", "--precision", "float32"),
])
def test_option_unused_by_the_named_solver_is_refused(tmp_path, solver, option, value):
    r = invoke("influence", *INF, "--solver", solver, option, value, "--out", tmp_path / "o")
    one_line_error(r, option[2:].replace("-", "_"), repr(solver))


def test_auto_notes_an_option_its_choice_does_not_use(tmp_path):
    r = invoke("influence", *INF, "--solver", "auto", "--rank", 5, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--rank" in notes[0] and "exact" in notes[0], r.stdout


# ---------------------------------------------------- 6. networks too large for memory
@pytest.mark.parametrize("command,args,says", [
    ("influence", ("--width", 99999999999), "would fit"),
    # past 2^63 - 1 (session 12: counts index int64 arrays) the option check refuses it first
    ("influence", ("--width", 9999999999999999999999), "at most 2^63 - 1"),
    ("malleability", ("--width", 99999999999), "would fit"),
    ("distance", ("--min-width", 2 ** 28, "--max-width", 2 ** 28), "would fit"),
])
def test_huge_width_is_refused_with_the_estimate(tmp_path, command, args, says):
    r = invoke(command, *TINY[command], *args, "--out", tmp_path / "o")
    err = one_line_error(r, "width", says)
    assert "alloc_cpu" not in err and "internal error" not in err


def test_torch_out_of_memory_in_training_is_one_line(tmp_path, monkeypatch):
    from ntkcore.nn.models import TwoLayerNet

    def head(self, z):
        raise RuntimeError(CXX_OOM)

    monkeypatch.setattr(TwoLayerNet, "head", head)
    r = invoke("influence", *INF, "--out", tmp_path / "o")
    err = one_line_error(r, "out of memory", "46.6 TiB")
    assert "frame #" not in err and "internal error" not in err


# ---------------------------------------------------- 7. one lam rule for every command
@pytest.mark.parametrize("command,value", [("distance", "inf"), ("distance", "1e7"),
                                           ("malleability", "1e7"), ("influence", "1e7")])
def test_lam_rule_is_the_same_everywhere(tmp_path, command, value):
    r = invoke(command, *TINY[command], "--lam", value, "--out", tmp_path / "o")
    one_line_error(r, "lam")


# ---------------------------------------------------- 8. the divergence message
def test_divergence_message_names_options_that_exist():
    from ntkcore.errors import NonFiniteError
    from ntkcore.nn import make_model, train
    X = np.random.default_rng(0).random((20, 8))
    model = make_model("relu", X, 8, 3)
    with pytest.raises(NonFiniteError) as info:
        train(model, X, np.arange(20) % 3, epochs=3, lr=1e20, progress=False)
    msg = str(info.value)
    assert "lower lr" not in msg and "lam" in msg and "API only" in msg, msg


# ---------------------------------------------------- 9. --data-root that does not exist
def test_missing_data_root_is_an_error(tmp_path):
    r = invoke("influence", *INF, "--data-root", tmp_path / "nonexist", "--out", tmp_path / "o")
    one_line_error(r, "nonexist", "does not exist", "embedded", "drop --data-root")
    r = invoke("influence", *INF, "--dataset", "synthetic", "--data-root", tmp_path / "nonexist",
               "--out", tmp_path / "o")
    one_line_error(r, "nonexist", "does not exist", "generated", "drop --data-root")
    r = invoke("info", "--data-root", tmp_path / "nonexist")
    assert r.exit_code == 0 and "does not exist" in r.stdout, r.output


def test_missing_data_root_library(tmp_path):
    from ntkcore.data import load_dataset
    from ntkcore.errors import DataNotFoundError
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_dataset("digits", root=tmp_path / "nonexist", n_train=60)
    # with download the folder may not exist yet (the download creates it)
    assert load_dataset("digits", root=tmp_path / "new", download=True, n_train=60).n_train == 60


def test_data_root_without_the_files_says_where_they_came_from(tmp_path, monkeypatch):
    from ntkcore.data import load_dataset
    write_mnist(tmp_path / "base", layout="torchvision")
    monkeypatch.setenv("NTKCORE_DATA", str(tmp_path / "base"))
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match="holds no mnist files"):
        load_dataset("mnist", root=tmp_path / "empty")


# ---------------------------------------------------- 10. advice names --dim
def test_synthetic_dimension_too_large_names_dim(tmp_path):
    r = invoke("influence", *INF, "--dataset", "synthetic", "--dim", 999999999999,
               "--out", tmp_path / "o")
    one_line_error(r, "--dim", "PiB")


def test_raw_memory_error_advice_names_dim(tmp_path, monkeypatch):
    import ntkcore.experiments.influence_run as ir

    def load(cfg):
        raise MemoryError("Unable to allocate 72.8 TiB for an array with shape "
                          "(10, 999999999999) and data type float64")

    monkeypatch.setattr(ir, "load_data", load)
    r = invoke("influence", *INF, "--out", tmp_path / "o")
    one_line_error(r, "72.8 TiB", "--dim")


# ---------------------------------------------------- 11. readable memory messages
def test_format_bytes():
    from ntkcore._units import format_bytes
    assert [format_bytes(b) for b in (0, 1000, 2000, 3.2e6, 22.9 * 2 ** 30, 7.99e13)] == \
        ["0 B", "1000 B", "1.95 KiB", "3.05 MiB", "22.9 GiB", "72.7 TiB"]


def test_small_memory_limit_is_readable(tmp_path):
    r = invoke("influence", *INF, "--out", tmp_path / "o", env={"NTKCORE_MEMORY_LIMIT": "1000"})
    err = one_line_error(r, "1000 B")
    assert "0.0 GiB" not in err


@pytest.mark.parametrize("limit", ["-5", "0", "abc", "nan"])
def test_bad_memory_limit_is_refused(tmp_path, limit):
    """A command that plans memory refuses the value before any work; help and ``info``
    (where a user looks to diagnose it) still work, and ``info`` names the problem."""
    env = {"NTKCORE_MEMORY_LIMIT": limit}
    one_line_error(invoke("influence", *INF, "--out", tmp_path / "o", env=env),
                   "NTKCORE_MEMORY_LIMIT")
    assert not (tmp_path / "o").exists()
    assert invoke("influence", "--help", env=env).exit_code == 0
    r = invoke("info", env=env)
    assert r.exit_code == 0 and "memory limit: NOT usable: NTKCORE_MEMORY_LIMIT" in r.output


def test_nystrom_says_when_no_rank_fits():
    from ntkcore.errors import MemoryBudgetError
    from ntkcore.solvers.auto import choose_solver
    with pytest.raises(MemoryBudgetError) as info:
        choose_solver(np.eye(40), 1e-3, requested="nystrom", memory_budget=1000, rank=5)
    msg = str(info.value)
    assert "no rank fits" in msg and "rank <= 0" not in msg and "1000 B" in msg, msg


# ---------------------------------------------------- 12. usage errors in one line
@pytest.mark.parametrize("args,command", [
    (("influence", "--n-train", "abc"), "influence"), (("influence", "--lam", ""), "influence"),
    (("influence", "--device", "CUDA"), "influence"),
    (("influence", "--weights", "w.pt"), "influence"),
    (("malleability", "--archs", ","), "malleability"), (("influence", "--bogus"), "influence"),
])
def test_usage_errors_are_one_line(args, command):
    err = one_line_error(invoke(*args))
    assert err.endswith(f"(see ntkcore {command} --help)"), err


def test_list_option_error_quotes_the_option_and_value():
    err = one_line_error(invoke("malleability", "--archs", ","))
    assert "'--archs'" in err and "','" in err, err


# ---------------------------------------------------- 13. blank --out, --show 0
@pytest.mark.parametrize("command", ["influence", "malleability", "spectrum"])
@pytest.mark.parametrize("out", [" ", ""])
def test_blank_out_is_refused(tmp_path, monkeypatch, command, out):
    monkeypatch.chdir(tmp_path)
    one_line_error(invoke(command, "--out", out, "--quiet"), "--out")
    assert list(tmp_path.iterdir()) == []


def test_show_zero_writes_no_figure(tmp_path):
    out = tmp_path / "o"
    r = invoke("influence", *INF, "--show", 0, "--out", out)
    assert r.exit_code == 0, r.output
    assert not (out / "influence_examples.png").exists()
    assert "influence_examples.png" not in json.loads((out / "summary.json").read_text())["files"]


# ---------------------------------------------------- 14. help, --model, float32
def test_spectrum_help_does_not_mention_presets():
    r = invoke("spectrum", "--help")
    assert r.exit_code == 0 and "preset" not in r.stdout, r.stdout


@pytest.mark.parametrize("option,value", [("--arch", "attn"), ("--width", 8), ("--epochs", 3),
                                          ("--preset", "paper")])
def test_model_refuses_builtin_network_options(tmp_path, option, value):
    r = invoke("influence", "--model", "my_model.py:make", option, value,
               "--out", tmp_path / "o")
    one_line_error(r, option, "--model")


def test_readme_says_when_complexity_figure_is_written():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `complexity_deciles"))
    assert "--model" in row, row


def test_float32_notes_the_expected_inverse_check(tmp_path):
    r = invoke("influence", *INF, "--precision", "float32", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "inverse_accurate=False" in r.stdout
    notes = [line for line in r.stdout.splitlines() if line.startswith("note:")]
    assert any("float32" in line and "expected" in line for line in notes), r.stdout


# ---------------------------------------------------- review of session 8
@pytest.mark.parametrize("extra,needles", [
    # Curated keeps n - ceil(tau n) = 27 of 30: top-27 stability over them is 1 by definition
    (("--topk", 27), ("topk", "Curated keeps")),
    # Curated keeps 30 - ceil(28.5) = 1 point, whose top 95 % is empty
    (("--tau", 0.95), ("tau", "Curated keeps 1")),
])
def test_curated_sizes_that_make_its_metrics_meaningless_are_refused_before_training(
        tmp_path, monkeypatch, extra, needles):
    import ntkcore.experiments.pipeline as pipeline
    monkeypatch.setattr(pipeline, "train_network",
                        lambda *a, **k: pytest.fail("trained before refusing"))
    args = [a if a != "adversarial" else "curated" for a in MAL]
    r = invoke("malleability", *args, *extra, "--out", tmp_path / "o")
    one_line_error(r, *needles)


@pytest.mark.parametrize("command", ["malleability", "distance"])
def test_a_seed_beyond_int64_is_one_line(tmp_path, command):
    r = invoke(command, *TINY[command], "--seed", 2 ** 64, "--out", tmp_path / "o")
    one_line_error(r, "seed", "2^63")


def test_distance_trend_labels():
    from ntkcore.experiments.distance import _trend
    assert _trend([3.0]) == "n/a"
    assert _trend([3.0, 2.0, 1.0]) == "decreasing" and _trend([1.0, 2.0]) == "increasing"
    assert _trend([2.0, 2.0]) == "flat" and _trend([2.0, 2.0, 1.0]) == "non-monotonic"


def test_flip_rate_labels_follow_tau():
    from ntkcore.experiments.malleability_report import _percent
    assert _percent(0.1) == "10%" and _percent(0.001) == "0.1%" and _percent(0.25) == "25%"


def test_sigterm_unwinds_like_ctrl_c_and_leaves_nothing_to_block_a_rerun(tmp_path, monkeypatch):
    """`timeout` / `kill` during training used to leave run.json with no finished stage, and
    the next command with other settings was refused with a false "resume" hint."""
    import os
    import signal

    import ntkcore.experiments.influence_run as ir
    real = ir.train_network
    monkeypatch.setattr(ir, "train_network",
                        lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "o"
    r = invoke("influence", *INF, "--out", out)
    assert r.exit_code == 143 and "terminated" in r.stderr, (r.exit_code, r.output)
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    monkeypatch.setattr(ir, "train_network", real)
    assert invoke("influence", *INF, "--seed", 3, "--out", out).exit_code == 0


def test_a_manifest_with_no_finished_stage_blocks_nothing(tmp_path):
    """SIGKILL leaves run.json with no finished stage: nothing to resume, so a run with other
    settings takes the folder (its partial files go) instead of being refused."""
    from ntkcore.experiments.output import RunFolder
    with RunFolder(tmp_path, "cmd", {"seed": 1}) as run:
        run.output("half.npz").write_bytes(b"partial")
        run._lock.close()  # as if killed: no close(), the manifest stays
        run._lock = None
    assert (tmp_path / "run.json").exists()
    with RunFolder(tmp_path, "cmd", {"seed": 2}) as run:
        assert not run.resumed and not (tmp_path / "half.npz").exists()
        run.finish()


def test_a_refusal_under_the_memory_cap_names_the_cap(tmp_path):
    r = invoke("influence", *INF, "--out", tmp_path / "o", env={"NTKCORE_MEMORY_LIMIT": "1e3"})
    one_line_error(r, "NTKCORE_MEMORY_LIMIT")


def test_timing_table_totals_the_top_level_stages_only():
    from ntkcore.cli._common import timing_table
    text = timing_table([("data", 0.5), ("influence", 1.0), ("  cholesky", 0.3),
                         ("writing", 0.25)])
    assert text.splitlines()[-1].split() == ["total", "1.75"]


def test_distance_width_hint_is_a_power_of_two(tmp_path):
    """--max-width takes only powers of two, so the refusal's hint must be one."""
    r = invoke("distance", *DIST[:-3], "--max-width", 2 ** 30, "--quiet", "--out", tmp_path / "o",
               env={"NTKCORE_MEMORY_LIMIT": "2e9"})
    err = one_line_error(r, "would fit")
    fit = int(err.split("width <= ")[1].split()[0])
    assert fit & (fit - 1) == 0, err
