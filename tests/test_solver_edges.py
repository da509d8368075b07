"""Edge cases of loo_influence and the solvers: PSD verdicts relative to ||K||, indefinite
kernels under every solver, Woodbury cancellation at tiny lam, typed errors for bad inputs and
options, the CG front end's SciPy conventions and the memory-budget suggestions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ntkcore as nc
from ntkcore import errors
from ntkcore.solvers.auto import (check_solver_options, choose_solver, exact_bytes, largest_n,
                                  packed_exact_bytes)
from ntkcore.solvers.cg import block_cg, cg, cg_fit
from ntkcore.solvers.nystrom import nystrom_fit

LAM = 1e-3


def _spectrum_kernel(rng, eigenvalues):
    """Symmetric K = Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    n = len(eigenvalues)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    K = (Q * np.asarray(eigenvalues)) @ Q.T
    return 0.5 * (K + K.T)


def _targets(rng, n, T=3, C=2):
    Y = np.eye(C)[rng.integers(0, C, n)]
    Yt = np.eye(C)[rng.integers(0, C, T)]
    return Y, rng.standard_normal((T, n)) * 0.1, Yt


def _smooth_kernel(rng, n, d=10):
    X = rng.standard_normal((n, d))
    return X @ X.T / d + 0.5 * np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / d)


# ------------------------------------------------------------------ PSD verdicts (A.8)
def test_psd_verdict_is_relative_to_the_kernel_scale(rng):
    """A PSD X X^T scaled by 1e3 has eigvalsh round-off near -1e-10 in absolute terms,
    -1e-16 relative: it passes (DESIGN: lambda_min(K) > -1e-12 relative to ||K||)."""
    X = rng.standard_normal((80, 5))
    K = 1e3 * (X @ X.T)  # rank 5: 75 eigenvalues that are zero up to rounding
    Y, Kt, Yt = _targets(rng, 80)
    d = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="exact").diagnostics
    assert d["lambda_min_K_rel"] > -1e-12
    assert d["checks"]["psd"] is True


def test_an_estimate_from_above_never_proves_psd(rng):
    """Slightly indefinite K (lambda_min = -1e-5 among 500 eigenvalues in [0, 1e-4]): the dense
    solver's exact spectrum fails it; the packed solver's subspace estimate cannot see it, and
    says "inconclusive", not "psd": True."""
    ev = np.concatenate([np.linspace(0, 1e-4, 500), np.linspace(0.1, 5, 99), [-1e-5]])
    K = _spectrum_kernel(rng, ev)
    Y, Kt, Yt = _targets(rng, 600)
    dense = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="exact").diagnostics
    assert dense["checks"]["psd"] is False
    packed = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="exact",
                              storage="packed").diagnostics
    assert packed["lambda_min_K_estimate"] > -1e-5  # from above: it missed the eigenvalue
    assert packed["checks"]["psd"] == "inconclusive"


def test_an_estimate_below_minus_tau_disproves_psd(rng):
    """An isolated eigenvalue -5e-4 (A = K + lam I still SPD): the estimate finds it -> False."""
    ev = np.concatenate([np.linspace(0.1, 5, 199), [-5e-4]])
    K = _spectrum_kernel(rng, ev)
    Y, Kt, Yt = _targets(rng, 200)
    packed = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="exact",
                              storage="packed").diagnostics
    assert packed["lambda_min_K_estimate"] == pytest.approx(-5e-4, rel=1e-3)
    assert packed["checks"]["psd"] is False



@pytest.mark.parametrize("order", ["C", "F"])
def test_dense_solver_estimates_above_the_exact_spectrum_size(rng, monkeypatch, order):
    """Beyond EXACT_SPECTRUM_MAX_N the dense solver's A.8 checks come from one pass over K
    (1-norm and probes) and subspace iteration on L^-T L^-1 (the Numba triangle kernels):
    they find an isolated eigenvalue -5e-4, the 1-norm, and an accurate inverse."""
    from ntkcore.solvers import exact
    monkeypatch.setattr(exact, "EXACT_SPECTRUM_MAX_N", 0)
    ev = np.concatenate([np.linspace(0.1, 5, 198), [-5e-4]])
    K = np.asarray(_spectrum_kernel(rng, ev), order=order)
    Y, Kt, Yt = _targets(rng, 199)
    d = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="exact").diagnostics
    assert "lambda_min_K" not in d  # the estimators ran, not eigvalsh
    assert d["lambda_min_K_estimate"] == pytest.approx(-5e-4, rel=1e-3)
    assert d["checks"]["psd"] is False
    assert d["A_norm_1"] == pytest.approx(np.abs(K).sum(axis=1).max() + LAM, rel=1e-13)
    assert d["inverse_residual_probe"] < 1e-10

# ------------------------------------------------------------------ indefinite kernels
def test_every_solver_refuses_a_clearly_indefinite_kernel(rng):
    ev = np.linspace(0.01, 2, 60)
    ev[0] = -0.5
    K = _spectrum_kernel(rng, ev)
    Y, Kt, Yt = _targets(rng, 60)
    for solver, opts in [("exact", {}), ("exact", {"storage": "packed"}),
                         ("nystrom", {"rank": 60}), ("cg", {"rank": 20, "progress": False})]:
        with pytest.raises(errors.NotPSDError):
            nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver=solver, **opts)


def test_nystrom_negative_diagonal_is_not_psd(rng):
    K = _smooth_kernel(rng, 30)
    K[4, 4] = -1.0
    Y, Kt, Yt = _targets(rng, 30)
    with pytest.raises(errors.NotPSDError, match="diag"):
        nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="nystrom", rank=10)


def test_near_singular_message_names_rounding(rng):
    X = rng.standard_normal((40, 3))
    with pytest.raises(errors.NotPSDError, match="rounding"):
        nc.loo_influence(X @ X.T, *_targets(rng, 40), lam=1e-18, solver="exact")


# ------------------------------------------------------------------ Woodbury cancellation
def test_nystrom_woodbury_cancellation_is_estimated_warned_and_refused(rng):
    """Full-rank Nystrom equals exact, but its Woodbury form cancels at tiny lam however well
    A is conditioned. The reported estimate must cover the observed error of diag(A^-1);
    above 1e-6 it warns, above 1e-2 it refuses."""
    n = 200
    K = _smooth_kernel(rng, n)
    Y, Kt, Yt = _targets(rng, n)
    for lam in (1e-5, 1e-9, 1e-11):
        exact = nc.loo_influence(K, Y, Kt, Yt, lam=lam, solver="exact")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = nystrom_fit(K, Y, lam, rank=n)
        est = fit.diagnostics["woodbury_diag_rel_error_estimate"]
        observed = float(np.max(np.abs(fit.diag_inv - exact.diag_inv) / exact.diag_inv))
        assert observed <= est <= 100 * max(observed, 1e-15), (lam, observed, est)
        assert any("Woodbury" in str(w.message) for w in caught) == (est > 1e-6), lam
    with pytest.raises(errors.ParameterError, match="Woodbury"):
        nystrom_fit(K, Y, 1e-14, rank=n)


# ------------------------------------------------------------------ bad inputs are typed
@pytest.mark.parametrize("lam", [np.inf, "1e-3", True, np.array([1e-3, 1e-3]), 0.0, np.nan])
def test_lam_must_be_a_finite_positive_number(rng, lam):
    K = _smooth_kernel(rng, 10)
    with pytest.raises(errors.ParameterError, match="lam"):
        nc.loo_influence(K, *_targets(rng, 10), lam=lam)


@pytest.mark.parametrize("top_k", [2.5, True, "2", 0])
def test_top_k_must_be_a_positive_integer(rng, top_k):
    K = _smooth_kernel(rng, 10)
    with pytest.raises(errors.ParameterError, match="top_k"):
        nc.loo_influence(K, *_targets(rng, 10), top_k=top_k)


def test_arrays_that_are_not_real_matrices_are_typed_errors(rng):
    K = _smooth_kernel(rng, 10)
    Y, Kt, Yt = _targets(rng, 10)
    with pytest.raises(errors.ParameterError, match="real numbers"):
        nc.loo_influence(K.astype(complex), Y, Kt, Yt)
    with pytest.raises(errors.ParameterError, match="K"):
        nc.loo_influence(None, Y, Kt, Yt)
    with pytest.raises(errors.ShapeError, match="K"):
        nc.loo_influence([[1.0, 0.0], [0.0]], Y, Kt, Yt)  # ragged
    # a plain nested list is an array like any other
    res = nc.loo_influence(K.tolist(), Y.tolist(), Kt.tolist(), Yt.tolist(), solver="exact")
    ref = nc.loo_influence(K, Y, Kt, Yt, solver="exact")
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-12)


def test_no_test_points_is_a_shape_error(rng):
    K = _smooth_kernel(rng, 10)
    Y, Kt, Yt = _targets(rng, 10)
    for solver in ("exact", "nystrom", "cg"):
        with pytest.raises(errors.ShapeError, match="test point"):
            nc.loo_influence(K, Y, Kt[:0], Yt[:0], solver=solver)


@pytest.mark.parametrize("options,needle", [
    ({"tol": np.inf}, "tol"), ({"tol": 1.0}, "tol"), ({"tol": "1e-5"}, "tol"),
    ({"atol": -1.0}, "atol"), ({"atol": np.inf}, "atol"), ({"maxiter": 2.5}, "maxiter"),
    ({"maxiter": 0}, "maxiter"), ({"rank": 2.5}, "rank"), ({"rank": "5"}, "rank"),
    ({"probes": 1}, "probes")])
def test_solver_options_are_validated_before_any_work(options, needle):
    with pytest.raises(errors.ParameterError, match=needle):
        check_solver_options("cg", options)


# ------------------------------------------------------------------ cg front end
def test_cg_follows_scipy_conventions_and_refuses_bad_input(rng):
    A = _smooth_kernel(rng, 30) + 0.1 * np.eye(30)
    b = rng.standard_normal(30)
    shapes = []
    x, info = cg(A, b, rtol=1e-10, callback=lambda xk: shapes.append(xk.shape))
    assert info == 0 and shapes and set(shapes) == {(30,)}  # the iterate in b's shape
    np.testing.assert_allclose(A @ x, b, rtol=0, atol=1e-8 * np.linalg.norm(b))
    with pytest.raises(errors.ShapeError, match="A"):
        cg(A[:10, :10], b)
    with pytest.raises(errors.NonFiniteError):
        cg(A, np.r_[b[:-1], np.nan])
    with pytest.raises(errors.ParameterError, match="rtol"):
        cg(A, b, rtol=np.inf)
    with pytest.raises(errors.ShapeError, match="B"):
        cg(A, np.zeros((30, 1, 1)))


def test_cg_tolerance_below_rounding_is_named_as_such(rng):
    A = _smooth_kernel(rng, 40) + 1e-3 * np.eye(40)
    x, info = cg(A, rng.standard_normal((40, 2)), rtol=1e-20, maxiter=2000)
    assert info != 0
    res = block_cg(A, rng.standard_normal((40, 2)), rtol=1e-20, maxiter=2000,
                   stall_window=5000)
    assert "rounding" in res.reason or "maxiter" in res.reason
    assert "inconsistent operator" not in res.reason


def test_cg_fit_refuses_an_infinite_tolerance(rng):
    K = _smooth_kernel(rng, 20)
    with pytest.raises(errors.ParameterError, match="tol"):
        cg_fit(K, np.ones((20, 1)), LAM, tol=np.inf, rank=5, progress=False)


# ------------------------------------------------------------------ reports
def test_memory_refusals_suggest_an_n_that_really_fits():
    for n, budget, precision in [(3000, 6e7, "float32"), (3000, 6e7, "float64"),
                                 (14000, 1e9, "float64")]:
        K = np.empty((n, n))  # never written: only its shape and device are read
        with pytest.raises(errors.MemoryBudgetError) as info:
            choose_solver(K, LAM, requested="exact", memory_budget=int(budget),
                          storage="packed", precision=precision)
        n_fit = info.value.n_fit
        assert packed_exact_bytes(n_fit, precision) <= budget
        assert packed_exact_bytes(n_fit + 1, precision) > budget
    assert largest_n(lambda m: exact_bytes(m), 8 * 2 * 100 * 100) == 100


def test_approximate_solvers_say_what_the_a8_checks_did_not_measure(rng):
    K = _smooth_kernel(rng, 30)
    Y, Kt, Yt = _targets(rng, 30)
    for solver in ("nystrom", "cg"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checks = nc.loo_influence(K, Y, Kt, Yt, solver=solver, rank=10,
                                      **({"progress": False} if solver == "cg" else {})
                                      ).diagnostics["checks"]
        assert checks["symmetric"] is True and "psd" not in checks
        assert solver in checks["not_measured"]


def test_zero_d_arrays_and_whole_floats_are_numbers(rng):
    """A lam computed by a reduction (a 0-d array) and counts given as whole floats are what
    they say; only non-whole or non-numeric values are refused."""
    K = _smooth_kernel(rng, 20)
    Y, Kt, Yt = _targets(rng, 20)
    ref = nc.loo_influence(K, Y, Kt, Yt, lam=1e-3, top_k=3, solver="exact")
    res = nc.loo_influence(K, Y, Kt, Yt, lam=np.array(1e-3), top_k=np.array(3), solver="exact")
    np.testing.assert_array_equal(res.scores, ref.scores)
    np.testing.assert_array_equal(res.top_helpful, ref.top_helpful)
    a = nc.loo_influence(K, Y, Kt, Yt, solver="nystrom", rank=10.0)
    b = nc.loo_influence(K, Y, Kt, Yt, solver="nystrom", rank=10)
    np.testing.assert_array_equal(a.scores, b.scores)
    X, W = rng.standard_normal((6, 3)), rng.standard_normal((4, 3))
    np.testing.assert_array_equal(nc.relu_ntk(X, W, train_a=1), nc.relu_ntk(X, W, train_a=True))


def test_a_kernel_psd_only_to_float32_rounding_runs_under_every_solver(rng):
    """K = X X^T formed in float32 has eigenvalues down to about -4e-5 here; K + lam I is
    positive definite, so the exact solver runs (psd: False), and so must Nystrom and CG."""
    X = rng.standard_normal((600, 40)).astype(np.float32)
    K = (X @ X.T).astype(np.float64)
    Y, Kt, Yt = _targets(rng, 600)
    exact = nc.loo_influence(K, Y, Kt, Yt, lam=1e-2, solver="exact")
    assert exact.diagnostics["checks"]["psd"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for solver, opts in [("nystrom", {"rank": 100}), ("cg", {"rank": 100, "progress": False,
                                                               "tol": 1e-6})]:
            nc.loo_influence(K, Y, Kt, Yt, lam=1e-2, solver=solver, **opts)


def test_a_dense_kernel_operator_is_not_factored_in_place(rng):
    """DenseKernel.dense() hands back the caller's K: the exact solver copies it (only
    operators that assemble a new matrix are factored in place), and the scores equal those
    of the plain array."""
    from ntkcore.solvers.operator import DenseKernel
    X = rng.standard_normal((60, 7))
    K = X @ X.T
    before = K.copy()
    Y, Kt, Yt = _targets(rng, 60)
    via_operator = nc.loo_influence(DenseKernel(K), Y, Kt, Yt, lam=LAM, solver="exact")
    assert np.array_equal(K, before)
    plain = nc.loo_influence(before, Y, Kt, Yt, lam=LAM, solver="exact")
    np.testing.assert_allclose(via_operator.scores, plain.scores, rtol=0, atol=1e-12)


def test_a_dense_kernel_operator_with_overwrite_k_still_reads_an_aliased_k_test(rng):
    """overwrite_k=True on DenseKernel(K) lets the solver factor the caller's K; a K_test that
    is that same memory (self-influence) is copied first, as for a plain array."""
    from ntkcore.solvers.operator import DenseKernel
    X = rng.standard_normal((50, 6))
    Kc = np.asfortranarray(X @ X.T)
    Y = _targets(rng, 50)[0]
    expected = nc.loo_influence(Kc.copy(), Y, Kc.copy(), Y, lam=1e-2, solver="exact").scores
    got = nc.loo_influence(DenseKernel(Kc), Y, Kc, Y, lam=1e-2, solver="exact",
                           overwrite_k=True).scores
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
