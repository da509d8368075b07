"""Approximate solvers (issue 4): Nystrom, RPCholesky, block CG, diag(A^-1) estimator, auto.

Every check compares against a float64 reference (the exact Cholesky solver, which is itself
tested against brute-force refitting, or numpy.linalg.solve / inv on small matrices).
"""

import tracemalloc
import warnings

import numpy as np
import pytest

import ntkcore as nc
from ntkcore.errors import ConvergenceError, MemoryBudgetError, ParameterError
from ntkcore.solvers.auto import (choose_solver, exact_bytes, fixed_bytes, max_rank,
                                  nystrom_bytes)
from ntkcore.solvers.cg import block_cg, cg, cg_fit
from ntkcore.solvers.diag_estimate import control_variate_diag, rademacher
from ntkcore.solvers.exact import exact_fit
from ntkcore.solvers.landmarks import CachedReluNTK, as_operator, nystrom_factor
from ntkcore.solvers.nystrom import nystrom_fit, nystrom_inverse
from ntkcore.solvers.operator import DenseKernel, ReluNTKOperator

from conftest import assert_close
from reference import relu_ntk_naive

LAM = 1e-3


def _problem(n=150, T=7, d=12, m=64, C=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + T, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    W = rng.standard_normal((m, d))
    Y = np.eye(C)[rng.integers(0, C, n)]
    Yt = np.eye(C)[rng.integers(0, C, T)]
    return X[:n], X[n:], W, Y, Yt


class CountingOperator:
    """Operator wrapper that counts column reads and refuses the dense matrix."""

    def __init__(self, op):
        self.op, self.n, self.shape, self.dtype, self.xp = op, op.n, op.shape, op.dtype, op.xp
        self.columns_read = 0
        self.matmats = 0

    def diag(self):
        return self.op.diag()

    def columns(self, idx):
        self.columns_read += len(idx)
        return self.op.columns(idx)

    def matmat(self, V):
        self.matmats += 1
        return self.op.matmat(V)

    def dense(self):
        raise AssertionError("an approximate solver asked for the dense n x n kernel")


# ----------------------------------------------------------------------------- Nystrom


@pytest.mark.parametrize("landmarks,diag_correction",
                         [("uniform", True), ("rpcholesky", True), ("rpcholesky", False)])
def test_nystrom_full_rank_equals_exact_influence(landmarks, diag_correction):
    X, Xt, W, Y, Yt = _problem()
    op = ReluNTKOperator(X, W)
    K = relu_ntk_naive(X, W)
    Kt = relu_ntk_naive(Xt, W, X)
    exact = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="exact")
    with warnings.catch_warnings():  # nothing is missed at full rank: no accuracy warning
        warnings.simplefilter("error", UserWarning)
        approx = nc.loo_influence(op, Y, Kt, Yt, lam=LAM, solver="nystrom", rank=X.shape[0],
                                  landmarks=landmarks, diag_correction=diag_correction)
    assert approx.diagnostics["missed_over_lam"] < 1e-6
    assert approx.solver == "nystrom"
    assert approx.diagnostics["rank"] == X.shape[0]
    # At r = n, K_hat = K up to the dropped-pivot tolerance (1e-12 max diag) and rounding.
    # kappa(A) is ~1e4 here, so influence (quadratic in A^-1) agrees to ~1e-12 measured;
    # 1e-9 leaves three orders of margin for BLAS/LAPACK reordering.
    for what in ("scores", "alpha", "diag_inv", "predictions", "loo_residuals"):
        assert_close(getattr(approx, what), getattr(exact, what), rtol=1e-9, what=what)


@pytest.mark.parametrize("diag_correction", [True, False])
def test_nystrom_low_rank_is_exact_for_its_own_approximation(diag_correction):
    """At r < n the fit is exact for A_hat = F F^T (+ diag(K - F F^T)) + lam I, checked with a
    dense inverse."""
    X, Xt, W, Y, _ = _problem(n=120)
    K = relu_ntk_naive(X, W)
    Kt = relu_ntk_naive(Xt, W, X)
    F, info = nystrom_factor(DenseKernel(K), 30, landmarks="rpcholesky", seed=3)
    Khat = F @ F.T
    Ahat = Khat + LAM * np.eye(120)
    if diag_correction:
        Ahat += np.diag(np.diag(K - Khat))
    Ahat_inv = np.linalg.inv(Ahat)
    with pytest.warns(UserWarning, match="landmarks miss"):  # tr(K - K_hat)/n >> lam here
        fit = nystrom_fit(K, Y, LAM, rank=30, seed=3, diag_correction=diag_correction)
    assert fit.diagnostics["missed_over_lam"] == pytest.approx(
        np.trace(K - Khat) / (120 * LAM), rel=1e-8)
    # kappa(A_hat) <= ~1e5: a dense inverse is accurate to ~1e-11 relative.
    assert_close(fit.alpha, Ahat_inv @ Y, rtol=1e-9, what="alpha")
    assert_close(fit.diag_inv, np.diag(Ahat_inv), rtol=1e-9, what="diag")
    assert_close(fit.right_solve(Kt), Kt @ Ahat_inv, rtol=1e-9, what="right_solve")
    # tr(K - K_hat) is reported and bounds the largest eigenvalue of the residual
    assert info["residual_trace"] == pytest.approx(np.trace(K - Khat), rel=1e-8, abs=1e-10)
    assert fit.diagnostics["residual_trace"] >= np.linalg.eigvalsh(K - Khat)[-1] - 1e-10
    assert fit.diagnostics["diag_correction"] is diag_correction
    if not diag_correction:  # plain Nystrom: A_hat <= A, so its inverse diagonal is an upper bound
        assert np.all(fit.diag_inv >= np.diag(np.linalg.inv(K + LAM * np.eye(120))) - 1e-9)


def test_rpcholesky_reproduces_rank_r_matrix_and_reads_r_columns():
    rng = np.random.default_rng(1)
    n, r = 200, 17
    G = rng.standard_normal((n, r))
    K = G @ G.T
    op = CountingOperator(DenseKernel(K))
    F, info = nystrom_factor(op, r, landmarks="rpcholesky", seed=0)
    assert F.shape == (n, r)
    assert op.columns_read == r and op.matmats == 0
    assert_close(F @ F.T, K, rtol=1e-12, what="rank-r reconstruction")
    # Asking for more than the rank stops early: residual trace at rounding level.
    op2 = CountingOperator(DenseKernel(K))
    F2, info2 = nystrom_factor(op2, 3 * r, landmarks="rpcholesky", seed=0)
    assert F2.shape[1] == r
    assert info2["residual_trace_rel"] < 1e-12
    assert_close(F2 @ F2.T, K, rtol=1e-12, what="early stop")
    # uniform landmarks on a generic rank-r matrix: any r columns span it
    F3, _ = nystrom_factor(DenseKernel(K), r, landmarks="uniform", seed=5)
    assert_close(F3 @ F3.T, K, rtol=1e-10, what="uniform rank-r")


def test_rpcholesky_samples_pivots_from_the_diagonal():
    """Indices with zero diagonal are never pivots; pivots are distinct."""
    rng = np.random.default_rng(2)
    n = 300
    G = rng.standard_normal((n, 40))
    G[rng.permutation(n)[:200]] = 0.0  # 200 rows with K_ii = 0
    K = G @ G.T
    support = set(np.flatnonzero(np.diag(K) > 0))
    for seed in range(5):
        _, info = nystrom_factor(DenseKernel(K), 25, landmarks="rpcholesky", seed=seed, block=4)
        piv = info["pivots"]
        assert set(piv.tolist()) <= support
        assert len(set(piv.tolist())) == len(piv) == 25
    # one dominant diagonal entry is picked first with probability K_ii / tr(K) ~ 1
    K2 = np.diag(np.r_[1e6, np.ones(n - 1)])
    _, info = nystrom_factor(DenseKernel(K2), 1, landmarks="rpcholesky", seed=0)
    assert info["pivots"].tolist() == [0]


def test_uniform_drops_dependent_landmarks_visibly():
    rng = np.random.default_rng(3)
    G = rng.standard_normal((100, 5))
    with pytest.warns(RuntimeWarning, match="dropped"):
        F, info = nystrom_factor(DenseKernel(G @ G.T), 20, landmarks="uniform")
    assert F.shape[1] == 5 and info["landmarks_dropped"] == 15


@pytest.mark.parametrize("train_a", [False, True])
def test_cached_relu_operator_matches_reference(train_a):
    X, _, W, _, _ = _problem(n=90)
    op = CachedReluNTK(ReluNTKOperator(X, W, train_a=train_a, tile=32))
    K = relu_ntk_naive(X, W, train_a=train_a)
    idx = np.array([3, 0, 77, 41])
    V = np.random.default_rng(0).standard_normal((90, 5))
    assert_close(op.columns(idx), K[:, idx], what="columns")
    assert_close(op.rows(10, 50), K[10:50], what="rows")
    assert_close(op.matmat(V), K @ V, what="matmat")
    assert_close(op.diag(), np.diag(K), what="diag")
    Xq = _problem(n=90, T=6)[1]
    assert_close(op.cross(Xq), relu_ntk_naive(Xq, W, X, train_a=train_a), what="cross")
    op.COL_TILE = 16  # column-tiled path of rows / cross
    assert_close(op.rows(10, 50), K[10:50], what="rows, column tiles")
    assert type(as_operator(ReluNTKOperator(X, W))) is CachedReluNTK


def test_bad_options_raise():
    K = np.eye(10)
    with pytest.raises(ParameterError, match="landmarks"):
        nystrom_fit(K, np.ones((10, 1)), LAM, landmarks="kmeans")
    with pytest.raises(ParameterError, match="rank"):
        nystrom_fit(K, np.ones((10, 1)), LAM, rank=0)
    with pytest.raises(ParameterError, match="probes"):
        cg_fit(K, np.ones((10, 1)), LAM, probes=1)


# ----------------------------------------------------------------------------- CG


def _spd(n, cond, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.geomspace(1.0, cond, n)) @ Q.T


def test_cg_mirrors_scipy_and_converges():
    from scipy.sparse.linalg import cg as scipy_cg
    A = _spd(120, 1e3)
    B = np.random.default_rng(1).standard_normal((120, 4))
    X, info = cg(A, B, rtol=1e-10)
    assert info == 0
    res = np.linalg.norm(A @ X - B, axis=0) / np.linalg.norm(B, axis=0)
    assert np.all(res <= 1e-10)
    # error bound from the residual: ||x - x*|| / ||x*|| <= kappa * rtol
    assert_close(X, np.linalg.solve(A, B), rtol=1e3 * 1e-10 * 10, what="cg vs solve")
    x1, info1 = cg(A, B[:, 0], rtol=1e-10)  # 1-D in, 1-D out, like SciPy
    xs, infos = scipy_cg(A, B[:, 0], rtol=1e-10)
    assert info1 == infos == 0 and x1.shape == (120,)
    assert_close(x1, xs, rtol=1e-6, what="vs scipy")
    seen = []
    cg(A, B, rtol=1e-6, callback=lambda Xk: seen.append(Xk.shape))
    assert seen and seen[0] == (120, 4)


def test_block_cg_reports_residuals_and_preconditioning_helps():
    A = _spd(150, 1e4, seed=2)
    B = np.random.default_rng(2).standard_normal((150, 3))
    plain = block_cg(A, B, rtol=1e-8)
    M = np.linalg.inv(A + 1e-2 * np.diag(np.diag(A)))  # a good SPD preconditioner
    pre = block_cg(A, B, rtol=1e-8, M=M)
    for r in (plain, pre):
        assert r.info == 0 and r.converged.all()
        assert len(r.residual_history) == r.iterations
        assert r.residual_history[-1] <= 1e-8 < r.residual_history[0]
        assert r.true_residual.max() <= 1e-8
    assert pre.iterations < plain.iterations / 3


def test_true_residual_check_catches_a_wrong_answer():
    """An operator whose products carry 1e-4 relative noise: the recurrence residual keeps
    falling below rtol, the true residual cannot; the result must not be called converged."""
    A = _spd(100, 10.0, seed=3)
    rng = np.random.default_rng(0)

    def noisy(V):
        return A @ V + 1e-4 * np.linalg.norm(V, axis=0) * rng.standard_normal(V.shape)

    B = np.random.default_rng(4).standard_normal((100, 3))
    r = block_cg(noisy, B, rtol=1e-10, maxiter=400)
    assert r.info > 0 and not r.converged.all()
    assert r.restarts >= 1  # a claimed convergence was refuted by the true residual
    true = np.linalg.norm(A @ r.X - B, axis=0) / np.linalg.norm(B, axis=0)
    assert true.max() > 1e-10
    X, info = cg(noisy, B, rtol=1e-10, maxiter=400)
    assert info > 0


def test_stagnation_breakdown_and_maxiter_are_reported():
    A = _spd(80, 1e3, seed=5)
    B = np.random.default_rng(5).standard_normal((80, 2))
    assert cg(A, B, rtol=1e-12, maxiter=3)[1] == 3
    # indefinite: p^T A p <= 0 -> breakdown
    Aneg = A - 2.0 * np.eye(80)
    r = block_cg(Aneg, B, rtol=1e-12)
    assert r.info == -1 and "not positive definite" in r.reason
    # singular, inconsistent (b has a null-space part): the residual plateaus -> stagnation
    D = np.diag(np.r_[np.linspace(1.0, 10.0, 75), np.zeros(5)])
    r = block_cg(D, B, rtol=1e-10, stall_window=30)
    assert r.stagnated and r.info > 0 and "stagnated" in r.reason


def test_cg_fit_matches_exact_on_a_well_conditioned_problem():
    X, Xt, W, Y, _ = _problem(n=160)
    lam = 0.1  # kappa(A) ~ 1e2: CG error <= kappa * tol
    K = relu_ntk_naive(X, W)
    Kt = relu_ntk_naive(Xt, W, X)
    ex = exact_fit(K, Y, lam)
    op = CountingOperator(ReluNTKOperator(X, W, tile=40))
    with pytest.warns(RuntimeWarning, match="noisy"):  # 8 probes, rank 20: said out loud
        fit = cg_fit(op, Y, lam, tol=1e-10, rank=20, probes=8, progress=False)
    assert_close(fit.alpha, ex.alpha, rtol=1e-7, what="alpha")
    assert_close(fit.right_solve(Kt), ex.right_solve(Kt), rtol=1e-7, what="right_solve")
    d = fit.diagnostics
    assert d["cg_fit_converged"] and d["cg_right_solve_converged"]
    assert d["cg_fit_true_residual_max"] <= 1e-10 and d["cg_right_solve_true_residual_max"] <= 1e-10
    assert len(d["cg_fit_residual_history"]) == d["cg_fit_iterations"] > 0
    assert op.matmats > 0  # matrix-free: products, never the dense matrix
    # the diagonal estimate is within a few reported standard errors of the truth
    z = np.abs(fit.diag_inv - ex.diag_inv) / fit.diag_inv_stderr
    assert np.median(z) < 2.0


def test_cg_fit_not_converged_raises_with_partial_result():
    X, _, W, Y, _ = _problem(n=100)
    with pytest.raises(ConvergenceError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the diag estimate is noisy at rank 5
        cg_fit(ReluNTKOperator(X, W), Y, LAM, tol=1e-12, maxiter=2, rank=5, probes=4,
               progress=False)
    assert "not converged" in str(err.value)
    assert err.value.result.alpha.shape == (100, 3)
    assert err.value.result.diagnostics["cg_fit_converged"] is False


# ----------------------------------------------------------------------------- diag(A^-1)


def test_diag_estimator_is_unbiased_on_a_known_matrix():
    """Mean over 400 seeds of the 4-probe estimate vs the exact diag(A^-1).

    A = K + lam I with eigenvalues of K from 1e2 down to 1e-6; the control variate is the
    rank-20 Nystrom inverse, which captures the eigenvalues above ~lam / 10.
    Statistical tolerance: every entry within 4.5 standard errors of the mean (SE = spread
    over seeds / sqrt(400)); for 40 entries a false failure has probability < 3e-4 under the
    null, and the seeds are fixed, so the test is deterministic. The reported per-run standard
    error must match the observed spread within 20 %.
    """
    n, s, runs, lam = 40, 4, 400, 0.1
    K = _spd(n, 1e8, seed=6) * 1e-6  # eigenvalues 1e-6 .. 1e2
    A = K + lam * np.eye(n)
    Ainv = np.linalg.inv(A)
    truth = np.diag(Ainv)
    inv = nystrom_inverse(K, lam, rank=20, seed=0, diag_correction=False)
    est, se = [], []
    for seed in range(runs):
        Z = rademacher(n, s, seed=seed)
        e, sd = control_variate_diag(Z, Ainv @ Z, inv.apply(Z), inv.diag())
        est.append(e)
        se.append(sd)
    est, se = np.array(est), np.array(se)
    spread = est.std(axis=0, ddof=1)
    z = (est.mean(axis=0) - truth) / (spread / np.sqrt(runs))
    assert np.max(np.abs(z)) < 4.5
    ratio = np.sqrt(np.mean(se ** 2, axis=0)) / spread
    assert np.all((ratio > 0.8) & (ratio < 1.2))
    # a control variate that captures the spectrum above lam helps: plain Hutchinson
    # (P^-1 = 0) spreads much more
    plain = [control_variate_diag(Z, Ainv @ Z, 0 * Z, np.zeros(n))[0]
             for Z in (rademacher(n, s, seed=k) for k in range(100))]
    assert np.mean(np.std(plain, axis=0)) > 3 * np.mean(spread)
    # and the Nystrom diagonal is an upper bound (K - K_hat is PSD)
    assert np.all(inv.diag() >= truth * (1 - 1e-12))


# ----------------------------------------------------------------------------- auto


def test_auto_picks_exact_for_small_n():
    K = relu_ntk_naive(*_problem(n=50)[::2][:2])
    name, opts, reason = choose_solver(K, LAM, rank=10, tol=None)
    assert name == "exact" and opts == {} and "exact" in reason and "rank" in reason


def test_auto_picks_nystrom_when_exact_does_not_fit_the_budget():
    n = 2000
    X, Xt, W, Y, Yt = _problem(n=n, d=8, m=32)
    op = ReluNTKOperator(X, W)
    budget = exact_bytes(n) // 8  # exact needs 61 MiB; 7.6 MiB given
    name, opts, reason = choose_solver(op, LAM, memory_budget=budget)
    fixed = fixed_bytes(op, "nystrom")  # the operator's pattern cache counts too
    r = max_rank(n, budget, fixed)
    assert name == "nystrom" and opts["rank"] == r and 16 <= r < n
    assert nystrom_bytes(n, r) + fixed <= 0.7 * budget < nystrom_bytes(n, r + 1) + fixed
    assert "nystrom" in reason and str(r) in reason
    res = nc.loo_influence(op, Y, op.cross(Xt), Yt, lam=LAM, memory_budget=budget)
    assert res.solver == "nystrom" and res.diagnostics["rank"] <= r
    assert "budget" in res.diagnostics["solver_reason"]
    # a budget too small for anything is refused up front
    with pytest.raises(MemoryBudgetError, match="neither exact"):
        choose_solver(op, LAM, memory_budget=1000)
    with pytest.raises(MemoryBudgetError, match="rank <="):
        choose_solver(op, LAM, requested="nystrom", rank=n, memory_budget=budget)
    with pytest.raises(ParameterError, match="solver options"):
        choose_solver(op, LAM, rnak=5)


# ----------------------------------------------------------------------------- no n x n


@pytest.mark.parametrize("solver", ["nystrom", "cg"])
def test_operator_runs_never_allocate_n_by_n(solver):
    """Peak traced NumPy memory stays below half of one n x n float64 array (the tiles are
    (n/10, n); any n x n float64 allocation would fail this)."""
    n, T = 1000, 5
    X, Xt, W, Y, Yt = _problem(n=n, T=T, d=16, m=64)
    base = ReluNTKOperator(X, W, tile=n // 10)
    Kt = base.cross(Xt)
    opts = {"rank": 40} if solver == "nystrom" else {"rank": 40, "tol": 1e-3, "probes": 4,
                                                     "progress": False}
    Xs, _, Ws, Ys, _ = _problem(n=60, d=16, m=64)
    small = ReluNTKOperator(Xs, Ws)
    with warnings.catch_warnings():  # warm-up: first-use imports are not array memory
        warnings.simplefilter("ignore", RuntimeWarning)
        for op in (CountingOperator(small), small):
            nc.loo_influence(op, Ys, small.cross(Xs[:2]), Ys[:2], lam=1.0, solver=solver,
                             **opts)
    for op in (CountingOperator(base), base):  # generic path and the pattern-caching view
        tracemalloc.start()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # noisy diag estimate at rank 40
            res = nc.loo_influence(op, Y, Kt, Yt, lam=1.0, solver=solver, **opts)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert res.scores.shape == (T, n)
        assert peak < 8 * n * n / 2, f"peak {peak / 2**20:.2f} MiB"
