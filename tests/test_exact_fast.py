"""The packed exact solver's opt-in approximations: float32 panels and the probe estimate of
diag(A^-1); their validation in auto, the API and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

import ntkcore as nc
from ntkcore.errors import ParameterError
from ntkcore.influence import _a8_verdicts
from ntkcore.solvers import exact_packed
from ntkcore.solvers.auto import check_solver_options, choose_solver, packed_exact_bytes
from ntkcore.solvers.exact_packed import (assemble_packed, cholesky_panels,
                                          estimated_inverse_diagonal, inverse_diagonal,
                                          packed_exact_fit, solve_panels, solver_label)
from ntkcore.solvers.operator import DenseKernel, ReluNTKOperator

from conftest import assert_close
from reference import relu_ntk_naive
from test_exact_packed import LAM, _relu_problem, _spd


@pytest.mark.parametrize("n,panel", [(1, 4), (9, 4), (70, 16)])
def test_float32_panels_factor_and_solve_in_float32(n, panel):
    rng = np.random.default_rng(3 + n)
    A = _spd(rng, n) + 0.5 * np.eye(n)  # kappa ~ 1e2: float32 answers good to ~1e-5
    P, _, _ = assemble_packed(DenseKernel(A), 0.0, panel=panel, dtype=np.float32)
    assert all(b.dtype == np.float32 for b in P.blocks)
    assert cholesky_panels(P) == 0
    V = rng.standard_normal((n, 3))
    X = solve_panels(P, V)
    assert X.dtype == np.float32
    Ainv = np.linalg.inv(A)
    assert_close(X, Ainv @ V, rtol=1e-4, what="float32 A^-1 V")
    assert_close(inverse_diagonal(P), np.diag(Ainv), rtol=1e-4, what="float32 diag(A^-1)")
    assert inverse_diagonal(P).dtype == np.float64
    # float64 panels of the same matrix agree to float64 rounding: the float32 path is the
    # only thing that changed
    P64, _, _ = assemble_packed(DenseKernel(A), 0.0, panel=panel)
    cholesky_panels(P64)
    assert_close(solve_panels(P64, V), Ainv @ V, rtol=1e-10, what="float64 A^-1 V")


def test_float32_panels_take_half_the_bytes():
    assert exact_packed.packed_bytes(1000, itemsize=4) * 2 == exact_packed.packed_bytes(1000)
    # (the float64 assembly tile and panel of L^-1 are the same in both)
    assert packed_exact_bytes(100_000, "float32") < 0.55 * packed_exact_bytes(100_000)


def test_probe_diagonal_is_unbiased_with_the_stated_error():
    """E[(L^-T z)^2] = diag(A^-1): with s probes each entry is diag * chi2_s / s, so its
    relative error has standard deviation sqrt(2/s); a 5-sigma bound over 40 entries fails
    by chance with probability ~2e-5."""
    rng = np.random.default_rng(5)
    n, s = 40, 20_000
    A = _spd(rng, n, rank=8) + 0.05 * np.eye(n)
    exact = np.diag(np.linalg.inv(A))
    P, _, _ = assemble_packed(DenseKernel(A), 0.0, panel=16)
    cholesky_panels(P)
    est, stderr = estimated_inverse_diagonal(P, s, seed=1, block=3000)
    sigma = np.sqrt(2 / s)
    assert np.all(est > 0)
    assert np.max(np.abs(est / exact - 1)) < 5 * sigma
    # the reported standard error is the sample one: close to sqrt(2/s) * diag
    assert_close(stderr / est, np.full(n, sigma), rtol=0.1, what="relative stderr")
    # the mean relative error over entries shrinks like 1/sqrt(s) (not a biased estimate)
    assert abs(np.mean(est / exact - 1)) < 5 * sigma / np.sqrt(n)
    # independent of the block size the probes are solved in
    est2, _ = estimated_inverse_diagonal(P, 64, seed=2, block=64)
    est3, _ = estimated_inverse_diagonal(P, 64, seed=2, block=10)
    assert_close(est2, est3, rtol=1e-12, what="same probes, other block size")
    assert np.max(np.abs(est2 / exact - 1)) < 6 * np.sqrt(2 / 64)


@pytest.mark.parametrize("precision,probes", [("float32", None), ("float32", 4000),
                                              ("float64", 4000)])
def test_fast_fit_is_close_to_exact_influence(precision, probes, monkeypatch):
    monkeypatch.setattr(exact_packed, "PANEL", 32)
    X, Xt, W, Y, Yt = _relu_problem(n=150, T=8)
    op = ReluNTKOperator(X, W, tile=32)
    K = relu_ntk_naive(X, W)
    Kt = relu_ntk_naive(Xt, W, X)
    lam = 0.1  # kappa(A) = 53 here (test_reference_routes holds float32 to 20 kappa eps32)
    exact = nc.loo_influence(K, Y, Kt, Yt, lam=lam, solver="exact")
    fast = nc.loo_influence(op, Y, Kt, Yt, lam=lam, solver="exact", precision=precision,
                            diag_probes=probes)
    assert fast.solver == solver_label(precision, probes) != "exact"
    assert fast.diagnostics["precision"] == precision
    scale = np.abs(exact.scores).max()
    if probes is None:  # float32 alone: every output within float32 rounding times kappa
        assert np.abs(fast.scores - exact.scores).max() < 1e-3 * scale
        assert_close(fast.diag_inv, exact.diag_inv, rtol=1e-3, what="diag")
    else:  # the diagonal carries sqrt(2/4000) = 2.2 % noise; scores move with U^2
        rel = np.abs(fast.diag_inv / exact.diag_inv - 1)
        assert np.median(rel) < 2 * np.sqrt(2 / probes) and rel.max() < 6 * np.sqrt(2 / probes)
        assert fast.diagnostics["diag_inv_rel_stderr_median"] == pytest.approx(
            np.sqrt(2 / probes), rel=0.2)
        assert "probes" in fast.diagnostics["diag_inv_estimator"]
        rho = np.mean([np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]
                       for a, b in zip(fast.scores, exact.scores)])
        assert rho > 0.99
    assert_close(fast.predictions, exact.predictions, rtol=1e-3 if precision == "float32"
                 else 1e-9, what="predictions")


def test_float32_psd_verdict_is_inconclusive_within_its_rounding():
    d = {"lambda_min_K_estimate": -1e-8, "lambda_min_resolution": 1e-6,
         "cond_A_estimate": 1e5, "inverse_residual_probe": 1e-4}
    assert _a8_verdicts(d) == {"well_conditioned": True, "psd": "inconclusive",
                               "inverse_accurate": False}
    assert _a8_verdicts({**d, "lambda_min_K_estimate": -1e-5})["psd"] is False
    # an estimate from above proves nothing on the positive side, within rounding or not;
    # a lower bound above -tau does
    assert _a8_verdicts({**d, "lambda_min_K_estimate": 1e-3})["psd"] == "inconclusive"
    assert _a8_verdicts({**d, "lambda_min_K_estimate": 1e-8})["psd"] == "inconclusive"
    assert _a8_verdicts({**d, "lambda_min_K_rel_lower_bound": -1e-14})["psd"] is True
    # float64 (no resolution reported): a negative estimate fails as before
    assert _a8_verdicts({"lambda_min_K_estimate": -1e-8, "cond_A_estimate": 1.0})["psd"] is False


def test_precision_and_probes_choose_packed_storage_and_are_validated():
    X, Xt, W, Y, Yt = _relu_problem(n=60)
    op = ReluNTKOperator(X, W)
    big = 1 << 34
    name, opts, reason = choose_solver(op, LAM, requested="exact", precision="float32",
                                       memory_budget=big)
    assert (name, opts["storage"], opts["precision"]) == ("exact", "packed", "float32")
    assert "float32 (approximate)" in reason
    # auto with an option only the exact solver has means exact
    name, opts, reason = choose_solver(op, LAM, diag_probes=256, memory_budget=big)
    assert (name, opts["storage"], opts["diag_probes"]) == ("exact", "packed", 256)
    assert "256 probes" in reason
    for bad, match in ((dict(precision="float16"), "precision"),
                       (dict(diag_probes=1), "diag_probes"),
                       (dict(diag_probes=2.5), "diag_probes"),
                       (dict(diag_probes=True), "diag_probes")):
        with pytest.raises(ParameterError, match=match):
            choose_solver(op, LAM, requested="exact", memory_budget=big, **bad)
        with pytest.raises(ParameterError, match=match):
            check_solver_options("exact", bad)
    with pytest.raises(ParameterError, match="storage='dense'"):
        choose_solver(op, LAM, requested="exact", storage="dense", precision="float32",
                      memory_budget=big)
    # the float32 memory model refuses what float64 would, at a smaller n
    with pytest.raises(nc.errors.MemoryBudgetError, match="float32 packed"):
        choose_solver(op, LAM, requested="exact", precision="float32", memory_budget=1000)


def test_packed_fit_labels_and_seeds_its_probes():
    X, Xt, W, Y, Yt = _relu_problem(n=50)
    op = ReluNTKOperator(X, W)
    a = packed_exact_fit(op, Y, LAM, diag_probes=16, seed=3)
    b = packed_exact_fit(op, Y, LAM, diag_probes=16, seed=3)
    c = packed_exact_fit(op, Y, LAM, diag_probes=16, seed=4)
    assert np.array_equal(a.diag_inv, b.diag_inv) and not np.array_equal(a.diag_inv, c.diag_inv)
    assert a.solver == "exact[diag from 16 probes]"
    assert solver_label() == "exact" and solver_label("float32") == "exact[float32]"


def test_a_seed_without_diag_probes_is_reported_as_unused():
    """The exact solver draws only diag_probes' probes: a seed alone is named as unused."""
    from ntkcore.solvers.auto import choose_solver
    K = np.eye(50)
    for requested in ("exact", "auto"):
        name, opts, reason = choose_solver(K, 1e-3, requested=requested, seed=3)
        assert name == "exact" and "seed" not in opts
        assert "(seed not used by this solver)" in reason
    name, opts, reason = choose_solver(K, 1e-3, requested="exact", seed=3, diag_probes=8)
    assert opts["seed"] == 3 and "seed not used" not in reason


@pytest.mark.parametrize("n", [60, 2100])  # exact spectrum / subspace estimate of lambda_min
def test_factoring_k_in_place_keeps_every_a8_check(n):
    """overwrite_k reads what the A.8 checks need from K before factoring it: the same
    diagnostics as without it (the probes are seeded)."""
    from ntkcore.solvers.exact import exact_fit
    rng = np.random.default_rng(n)
    G = rng.standard_normal((n, 40))
    K = G @ G.T / 40
    Y = rng.standard_normal((n, 2))
    kept = exact_fit(K.copy(), Y, 1e-2)
    inplace = exact_fit(K.copy(), Y, 1e-2, overwrite_k=True)
    assert inplace.diagnostics["inverse_residual_probe"] is not None
    for key, value in kept.diagnostics.items():
        if isinstance(value, float):
            assert inplace.diagnostics[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key
        else:
            assert inplace.diagnostics[key] == value, key
    np.testing.assert_allclose(inplace.diag_inv, kept.diag_inv, rtol=1e-12)
