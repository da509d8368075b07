"""Solver routes against the float64 references of tests/reference.py (brute-force refitting,
the closed form at n = 1, the explicit inverse of the Nystrom approximation), at the shapes and
layouts the other files leave out: CG scores at full and low preconditioner rank, n = 1,
T = 1 with 1-D binary targets, F-ordered / strided / float32 inputs, uniform landmarks below
full rank, the device routes on the CUDA simulator (compared with refitting, not with the CPU
path), and float32 packed panels within a kappa-derived bound. Found by the session-13 audit of
reference coverage; all passed when added."""

import warnings

import numpy as np
import pytest

import ntkcore as nc
from conftest import assert_close
from ntkcore.solvers import exact_packed
from ntkcore.solvers.operator import ReluNTKOperator
from reference import loo_influence_bruteforce, loo_residuals_bruteforce, relu_ntk_naive
from test_exact_packed import _relu_problem

LAM = 0.1
EPS32 = float(np.finfo(np.float32).eps)


def _problem(n, T, C, seed=0, d=7, m=45):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + T, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    W = rng.standard_normal((m, d))
    if C == 1:
        Y, Yt = rng.choice([-1.0, 1.0], size=n), rng.choice([-1.0, 1.0], size=T)
    else:
        Y, Yt = np.eye(C)[rng.integers(0, C, n)], np.eye(C)[rng.integers(0, C, T)]
    return X[:n], X[n:], W, Y, Yt


def _relu(n, T, C, seed=0, d=7, m=45):
    """(K, Y, K_test, Y_test) of a finite-width ReLU NTK on unit rows (:func:`_problem`)."""
    X, Xt, W, Y, Yt = _problem(n, T, C, seed=seed, d=d, m=m)
    return nc.relu_ntk(X, W), Y, nc.relu_ntk(Xt, W, X), Yt


# -------------------------------------------------- CG scores never checked against refitting
@pytest.mark.parametrize("C,T", [(3, 6), (1, 1)])
def test_cg_full_rank_preconditioner_scores_equal_refitting(C, T):
    """At rank = n the control variate is diag of the exact inverse (Woodbury at full rank), so
    diag(A^-1) is exact up to the CG tolerance and the scores must match refitting."""
    n = 80
    K, Y, Kt, Yt = _relu(n, T, C, seed=1)
    ref = loo_influence_bruteforce(K, Y.reshape(n, -1), Kt, Yt.reshape(T, -1), LAM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="cg", rank=n, tol=1e-12,
                               progress=False)
    assert_close(res.scores, ref, rtol=1e-6, what="cg full-rank scores vs refitting")
    assert_close(res.loo_residuals, loo_residuals_bruteforce(K, Y.reshape(n, -1), LAM),
                 rtol=1e-6, what="cg LOO residuals")


@pytest.mark.parametrize("C,T", [(3, 6), (1, 1)])
def test_cg_low_rank_preconditioner_scores_near_refitting(C, T):
    """Default (low) preconditioner rank, many probes: scores within the diag estimate's noise."""
    n = 80
    K, Y, Kt, Yt = _relu(n, T, C, seed=2)
    ref = loo_influence_bruteforce(K, Y.reshape(n, -1), Kt, Yt.reshape(T, -1), LAM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="cg", rank=10, tol=1e-10,
                               probes=20000, progress=False)
    # diag(A^-1) relative SE small with 20000 probes + control variate; scores ~ 1/diag^2
    err = np.abs(res.scores - ref).max() / np.abs(ref).max()
    assert err < 5e-2


# -------------------------------------------------- n = 1 (removing the only point)
@pytest.mark.parametrize("solver,opts", [("exact", {}), ("exact", {"storage": "packed"}),
                                         ("nystrom", {"rank": 1}),
                                         ("cg", {"rank": 1, "tol": 1e-12})])
def test_single_training_point_closed_form(solver, opts):
    """n = 1: f^{-1} = 0, so I(t) = 1/2 (||y_t||^2 - ||f(x_t) - y_t||^2), f = k_t y / (k + lam)."""
    k, lam = 2.0, 0.5
    K = np.array([[k]])
    Y = np.array([[1.0, -2.0]])
    Kt = np.array([[0.7], [-1.3], [0.1]])
    Yt = np.array([[0.5, 1.0], [-1.0, 0.0], [2.0, 2.0]])
    f = Kt * Y / (k + lam)
    want = 0.5 * ((Yt ** 2).sum(1) - ((f - Yt) ** 2).sum(1))[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = nc.loo_influence(K, Y, Kt, Yt, lam=lam, solver=solver, top_k=1, **opts)
    assert_close(res.scores, want, rtol=1e-10, what=f"{solver} n=1")
    assert_close(res.loo_residuals, Y, rtol=1e-10, what="LOO residual of the only point = y")


# -------------------------------------------------- T = 1, C = 1 (1-D) per solver vs refitting
@pytest.mark.parametrize("solver,opts,rtol", [
    ("exact", {}, 1e-8), ("exact", {"storage": "packed"}, 1e-8),
    ("nystrom", {"rank": 60}, 1e-7), ("nystrom", {"rank": 60, "landmarks": "uniform"}, 1e-7)])
@pytest.mark.parametrize("keep", [True, False])
def test_binary_one_test_point_each_solver(solver, opts, rtol, keep):
    K, y, Kt, yt = _relu(60, 1, 1, seed=3)
    ref = loo_influence_bruteforce(K, y[:, None], Kt, yt[:, None], LAM)
    res = nc.loo_influence(K, y, Kt, yt, lam=LAM, solver=solver, top_k=4, keep_scores=keep,
                           **opts)
    if keep:
        assert_close(res.scores, ref, rtol=rtol, what=f"{solver} T=1 C=1")
    assert np.array_equal(res.top_helpful[0], np.argsort(-ref[0], kind="stable")[:4])
    assert np.array_equal(res.top_harmful[0], np.argsort(ref[0], kind="stable")[:4])


# -------------------------------------------------- input layouts / dtypes into loo_influence
@pytest.mark.parametrize("layout", ["K_test F-order", "K_test strided", "K F-order",
                                    "float32 K, K_test", "Y strided"])
@pytest.mark.parametrize("solver,opts", [("exact", {}), ("exact", {"storage": "packed"}),
                                         ("nystrom", {"rank": 50})])
def test_layouts_and_dtypes_vs_refitting(layout, solver, opts):
    n, T, C = 50, 5, 3
    K, Y, Kt, Yt = _relu(n, T, C, seed=4)
    if layout == "float32 K, K_test":
        K, Kt = K.astype(np.float32), Kt.astype(np.float32)
    ref = loo_influence_bruteforce(K.astype(np.float64), Y, Kt.astype(np.float64), Yt, LAM)
    if layout == "K_test F-order":
        Kt = np.asfortranarray(Kt)
    elif layout == "K_test strided":
        wide = np.zeros((T, 2 * n))
        wide[:, ::2] = Kt
        Kt = wide[:, ::2]
    elif layout == "K F-order":
        K = np.asfortranarray(K)
    elif layout == "Y strided":
        wide = np.zeros((n, 2 * C))
        wide[:, 1::2] = Y
        Y = wide[:, 1::2]
    res = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver=solver, **opts)
    assert_close(res.scores, ref, rtol=1e-7, what=f"{solver} {layout}")


# -------------------------------------------------- uniform landmarks below full rank
@pytest.mark.parametrize("diag_correction", [True, False])
def test_nystrom_uniform_low_rank_is_exact_for_its_own_approximation(diag_correction):
    from ntkcore.solvers.landmarks import nystrom_factor
    from ntkcore.solvers.nystrom import nystrom_fit
    from ntkcore.solvers.operator import DenseKernel
    K, Y, Kt, _ = _relu(120, 5, 3, seed=7)
    F, info = nystrom_factor(DenseKernel(K), 30, landmarks="uniform", seed=3)
    Khat = F @ F.T
    Ahat = Khat + LAM * np.eye(120) + (np.diag(np.diag(K - Khat)) if diag_correction else 0)
    Ainv = np.linalg.inv(Ahat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = nystrom_fit(K, Y, LAM, rank=30, seed=3, landmarks="uniform",
                          diag_correction=diag_correction)
    assert_close(fit.alpha, Ainv @ Y, rtol=1e-9, what="alpha")
    assert_close(fit.diag_inv, np.diag(Ainv), rtol=1e-9, what="diag")
    assert_close(fit.right_solve(Kt), Kt @ Ainv, rtol=1e-9, what="right_solve")


@pytest.mark.parametrize("cholesky", ["blocked", "cusolver"])
@pytest.mark.parametrize("n,T,C,overwrite_k,keep", [(97, 1, 1, False, True), (61, 5, 3, True, True),
                                                    (97, 4, 2, False, False),
                                                    (1, 2, 1, False, True)])
def test_device_exact_vs_refitting(sim_cupy, monkeypatch, cholesky, n, T, C, overwrite_k, keep):
    from ntkcore.solvers import chol_blocked, exact, tri_inverse
    monkeypatch.setattr(exact, "GPU_CHOLESKY", cholesky)
    monkeypatch.setattr(chol_blocked, "GPU_CHOL_BLOCK", 24)
    monkeypatch.setattr(tri_inverse, "GPU_INV_BLOCK", 20)
    monkeypatch.setattr(tri_inverse, "RIGHT_APPLY_BLOCK", 17)
    cp = sim_cupy
    X, Xt, W, Y, Yt = _problem(n, T, C, seed=n + T)
    lam = 0.1
    Kh, Kth = nc.relu_ntk(X, W), nc.relu_ntk(Xt, W, X)
    Y2, Yt2 = Y.reshape(n, -1), Yt.reshape(T, -1)
    if n == 1:  # f^{-1} = 0
        f = Kth @ (Y2 / (Kh + lam))
        ref = 0.5 * ((Yt2 ** 2).sum(1) - ((f - Yt2) ** 2).sum(1))[:, None]
    else:
        ref = loo_influence_bruteforce(Kh, Y2, Kth, Yt2, lam)
    Xd, Wd = cp.asarray(X), cp.asarray(W)
    res = nc.loo_influence(nc.relu_ntk(Xd, Wd), cp.asarray(Y), nc.relu_ntk(cp.asarray(Xt), Wd, Xd),
                           cp.asarray(Yt), lam=lam, solver="exact", top_k=3, keep_scores=keep,
                           overwrite_k=overwrite_k)
    if keep:
        assert_close(res.scores.get(), ref, rtol=1e-8, what="device exact vs refitting")
    k = min(3, n)
    assert np.array_equal(res.top_helpful.get(), np.argsort(-ref, axis=1, kind="stable")[:, :k])
    assert np.array_equal(res.top_harmful.get(), np.argsort(ref, axis=1, kind="stable")[:, :k])
    if n > 1:
        assert_close(res.loo_residuals.get(), loo_residuals_bruteforce(Kh, Y2, lam), rtol=1e-8,
                     what="device LOO residuals")


@pytest.mark.parametrize("solver,opts", [("nystrom", {"rank": 70}),
                                         ("nystrom", {"rank": 70, "landmarks": "uniform"}),
                                         ("cg", {"rank": 70, "tol": 1e-12})])
def test_device_approx_full_rank_vs_refitting(sim_cupy, solver, opts):
    cp = sim_cupy
    n, T, C = 70, 1, 1
    X, Xt, W, Y, Yt = _problem(n, T, C, seed=5)
    lam = 0.1
    ref = loo_influence_bruteforce(nc.relu_ntk(X, W), Y[:, None], nc.relu_ntk(Xt, W, X),
                                   Yt[:, None], lam)
    Xd, Wd = cp.asarray(X), cp.asarray(W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = nc.loo_influence(ReluNTKOperator(Xd, Wd, tile=16), cp.asarray(Y),
                               nc.relu_ntk(cp.asarray(Xt), Wd, Xd), cp.asarray(Yt), lam=lam,
                               solver=solver, **opts)
    assert_close(res.scores.get(), ref, rtol=1e-6, what=f"device {solver} full rank")


@pytest.mark.parametrize("lam", [0.1, 1e-2])
def test_float32_packed_within_kappa_eps32_of_refitting(monkeypatch, lam):
    monkeypatch.setattr(exact_packed, "PANEL", 32)
    X, Xt, W, Y, Yt = _relu_problem(n=150, T=8)
    K, Kt = relu_ntk_naive(X, W), relu_ntk_naive(Xt, W, X)
    ev = np.linalg.eigvalsh(K)
    kappa = (ev[-1] + lam) / (ev[0] + lam)
    ref = loo_influence_bruteforce(K, Y, Kt, Yt, lam)
    got = nc.loo_influence(ReluNTKOperator(X, W, tile=32), Y, Kt, Yt, lam=lam, solver="exact",
                           precision="float32")
    tol = 20 * kappa * EPS32  # scores are quadratic in A^-1: a few kappa eps32, x10 margin
    assert_close(got.scores, ref, rtol=tol, what=f"float32 scores (kappa {kappa:.3g})")
    assert_close(got.diag_inv, np.diag(np.linalg.inv(K + lam * np.eye(150))), rtol=tol,
                 what="float32 diag")
