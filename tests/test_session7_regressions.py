"""Regressions the session-7 diff review found in that session's own changes, each with a
test that failed before its fix: auto and explicit exact planning the (T, n) arrays
differently, the CLI's before-training check not counting them, RPCholesky sampling
columns that could only be dropped, relu_ntk refusing an out= that does not overlap its
inputs, and the top-k overflow bound refusing finite scores because of one outlier."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import ntkcore as nc
from ntkcore.errors import MemoryBudgetError
from ntkcore.solvers.auto import choose_solver, packed_exact_bytes

from conftest import assert_close
from reference import relu_ntk_naive

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import TINY, invoke, one_line_error  # noqa: E402


def _fake_kernel(n):
    """An (n, n) CPU array that costs 8 bytes (the planner reads only its shape)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1), (n, n), (0, 0))


def test_auto_and_explicit_exact_count_the_scores_alike():
    """auto chose packed exact on the factor's size alone while an explicit 'exact' (which
    counts the (T, n) B and scores) refused the same problem."""
    n, T = 3000, 2000
    scoring = 16 * T * n
    budget = (packed_exact_bytes(n) + scoring / 2) / 0.7  # the factor fits, with scores not
    K = _fake_kernel(n)
    name, opts, reason = choose_solver(K, 1e-3, memory_budget=budget, n_test=T, n_outputs=10)
    assert name == "nystrom", (name, opts, reason)
    # an explicit request may use the whole budget (auto keeps 30 % spare)
    tight = packed_exact_bytes(n) + scoring / 2
    with pytest.raises(MemoryBudgetError) as info:
        choose_solver(K, 1e-3, requested="exact", memory_budget=tight, n_test=T,
                      n_outputs=10)
    n_fit = info.value.n_fit  # the size the message offers must really fit
    assert 0 < n_fit < n
    assert packed_exact_bytes(n_fit) + scoring * n_fit / n <= tight
    # options only exact has send auto to exact, with the same counts
    budget32 = packed_exact_bytes(n, "float32") + scoring / 2
    with pytest.raises(MemoryBudgetError):
        choose_solver(K, 1e-3, memory_budget=budget32, n_test=T, n_outputs=10,
                      precision="float32", diag_probes=64)


def test_cli_refuses_before_training_when_the_scores_do_not_fit(tmp_path):
    """The check before training planned without T: the network trained, then the solve
    refused."""
    out = tmp_path / "o"
    r = invoke("influence", "--dataset", "synthetic", "--n-train", 3000, "--n-test", 2000,
               "--solver", "exact", "--out", out, *TINY, env={"NTKCORE_MEMORY_LIMIT": "1e8"})
    one_line_error(r, "budget")
    assert not (out / "model.pt").exists()


def test_rpcholesky_does_not_sample_columns_below_the_pivot_tolerance():
    """On an exactly low-rank K the new stop rule kept drawing columns whose residual was
    rounding noise, only to drop them: 994 of 4000 points at rank 30."""
    rng = np.random.default_rng(0)
    n, d = 3000, 10
    X = rng.standard_normal((n + 20, d)) / np.sqrt(d)
    K, Kt = X[:n] @ X[:n].T, X[n:] @ X[:n].T
    Y, Yt = np.eye(3)[rng.integers(0, 3, n)], np.eye(3)[rng.integers(0, 3, 20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = nc.loo_influence(K, Y, Kt, Yt, lam=1e-3, solver="nystrom", rank=200)
    diag = res.diagnostics
    assert diag["rank"] == d
    assert diag["landmarks_dropped"] < 150, diag["landmarks_dropped"]


def test_relu_ntk_out_beside_its_input_in_one_array():
    """Column blocks of one array do not overlap; a bounds check refused them."""
    rng = np.random.default_rng(1)
    big = rng.standard_normal((50, 60))
    X, out = big[:, :10], big[:, 10:60]
    W = rng.standard_normal((20, 10))
    expected = relu_ntk_naive(X.copy(), W)
    assert_close(nc.relu_ntk(X, W, out=out), expected, what="relu_ntk into a column block")


def test_score_bound_is_per_training_point():
    """One training point with norm 1e5 made the global bound 2e19 x the largest score, so
    top_k with keep_scores=False refused scores that keep_scores=True returned finite."""
    rng = np.random.default_rng(1)
    n, T, C = 300, 20, 10
    X = rng.standard_normal((n + T, 50))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    X[0] *= 1e5
    K_all = X @ X.T
    K, Kt = K_all[:n, :n].copy(), K_all[n:, :n].copy()
    Y, Yt = np.eye(C)[rng.integers(0, C, n)], np.eye(C)[rng.integers(0, C, T)]
    base = nc.loo_influence(K, Y, Kt, Yt, lam=1e-3, solver="exact", top_k=3)
    s = np.sqrt(4e289 / np.abs(base.scores).max())  # largest score about 4e289
    full = nc.loo_influence(K, Y * s, Kt, Yt * s, lam=1e-3, solver="exact", top_k=3)
    top = nc.loo_influence(K, Y * s, Kt, Yt * s, lam=1e-3, solver="exact", top_k=3,
                           keep_scores=False)
    assert np.isfinite(full.scores).all()
    assert np.array_equal(top.top_helpful, full.top_helpful)
    assert np.array_equal(top.top_harmful, full.top_harmful)
