"""Exact KRR in packed (RFP) storage: layout, fit, influence, auto's choice, memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from scipy.linalg import lapack

import ntkcore as nc
from ntkcore.errors import MemoryBudgetError, NotPSDError, ParameterError
from ntkcore.solvers.auto import (choose_solver, exact_bytes, nystrom_bytes,
                                  packed_exact_bytes)
from ntkcore.solvers.exact_packed import (assemble_packed, packed_exact_fit,
                                          rfp_diagonal_index)
from ntkcore.solvers.landmarks import as_operator
from ntkcore.solvers.operator import DenseKernel, ReluNTKOperator

from conftest import assert_close
from reference import loo_influence_bruteforce, relu_ntk_naive

LAM = 1e-2


def _spd(rng, n, rank=5):
    X = rng.standard_normal((n, rank))
    return X @ X.T + 0.1 * np.eye(n)


def _relu_problem(n=120, T=6, d=10, m=48, C=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + T, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    W = rng.standard_normal((m, d))
    return X[:n], X[n:], W, np.eye(C)[rng.integers(0, C, n)], np.eye(C)[rng.integers(0, C, T)]


@pytest.mark.parametrize("n,tile", [(1, 1), (2, 1), (3, 2), (8, 3), (101, 7), (100, 100)])
def test_assembly_matches_lapack_packing(n, tile):
    """Tile-by-tile assembly gives exactly LAPACK dtrttf's RFP array of K + lam I, plus the
    absolute row sums and K V from the same tiles."""
    rng = np.random.default_rng(n)
    K = _spd(rng, n)
    V = rng.standard_normal((n, 3))
    arf, abs_sums, KV = assemble_packed(DenseKernel(K), LAM, V, tile=tile)
    ref, info = lapack.dtrttf(K + LAM * np.eye(n), transr="N", uplo="L")
    assert info == 0 and np.array_equal(arf, ref)
    assert_close(abs_sums, np.abs(K).sum(axis=1), what="row sums")
    assert_close(KV, K @ V, what="K V")
    assert np.array_equal(arf[rfp_diagonal_index(n)], np.diag(K) + LAM)


@pytest.mark.parametrize("n", [1, 2, 57, 90])
def test_packed_fit_matches_the_dense_inverse(n):
    rng = np.random.default_rng(7 + n)
    K = _spd(rng, n)
    Y = rng.standard_normal((n, 2))
    K_test = rng.standard_normal((4, n))
    kept = K_test.copy()
    fit = packed_exact_fit(DenseKernel(K), Y, LAM, K_test=K_test, tile=5)
    Ainv = np.linalg.inv(K + LAM * np.eye(n))  # kappa <= ~1e4 here: inv accurate to ~1e-12
    assert_close(fit.alpha, Ainv @ Y, rtol=1e-10, what="alpha")
    assert_close(fit.diag_inv, np.diag(Ainv), rtol=1e-10, what="diag(A^-1)")
    assert_close(fit.right_solve(K_test), K_test @ Ainv, rtol=1e-10, what="K_test A^-1")
    assert np.array_equal(K_test, kept)  # the caller's K_test is never written
    with pytest.raises(ValueError, match="only for the K_test"):
        fit.right_solve(K_test.copy())
    d = fit.diagnostics
    assert d["storage"] == "packed (RFP)" and d["inverse_residual_probe"] < 1e-12
    ev = np.linalg.eigvalsh(K)
    assert d["lambda_min_K_estimate"] == pytest.approx(ev[0], rel=1e-6)
    assert d["cond_A_estimate"] >= (ev[-1] + LAM) / (ev[0] + LAM) * (1 - 1e-9)


@pytest.mark.parametrize("train_a", [False, True])
def test_packed_influence_equals_dense_exact_and_refitting(train_a):
    X, Xt, W, Y, Yt = _relu_problem()
    op = ReluNTKOperator(X, W, train_a=train_a, tile=32)
    K = relu_ntk_naive(X, W, train_a=train_a)
    Kt = relu_ntk_naive(Xt, W, X, train_a=train_a)
    dense = nc.loo_influence(K, Y, Kt, Yt, lam=LAM, solver="exact")
    packed = nc.loo_influence(op, Y, Kt, Yt, lam=LAM, solver="exact", storage="packed")
    assert packed.diagnostics["storage"] == "packed (RFP)"
    for what in ("scores", "alpha", "diag_inv", "predictions", "loo_residuals"):
        assert_close(getattr(packed, what), getattr(dense, what), rtol=1e-9, what=what)
    assert_close(packed.scores, loo_influence_bruteforce(K, Y, Kt, Yt, LAM), rtol=1e-8,
                 what="packed vs refitting")
    checks = packed.diagnostics["checks"]
    assert checks == {"symmetric": True, "well_conditioned": True, "psd": True,
                      "inverse_accurate": True}


def test_auto_picks_packed_between_dense_and_nystrom():
    n = 300
    X, Xt, W, Y, Yt = _relu_problem(n=n)
    op = ReluNTKOperator(X, W)
    roomy = exact_bytes(n) * 2
    assert choose_solver(op, LAM, memory_budget=roomy)[:2] == ("exact", {})
    middle = int(packed_exact_bytes(n) / 0.7) + 1
    assert exact_bytes(n) > 0.7 * middle  # dense does not fit comfortably, packed does
    name, opts, reason = choose_solver(op, LAM, memory_budget=middle)
    assert (name, opts) == ("exact", {"storage": "packed"}) and "packed" in reason
    res = nc.loo_influence(op, Y, op.cross(Xt), Yt, lam=LAM, memory_budget=middle)
    assert res.solver == "exact" and res.diagnostics["storage"] == "packed (RFP)"
    # asking for packed storage under auto means the exact solver, in packed storage
    assert choose_solver(op, LAM, memory_budget=roomy, storage="packed")[:2] == (
        "exact", {"storage": "packed"})
    tight = int(nystrom_bytes(n, 32) / 0.7) + 1
    assert packed_exact_bytes(n) > 0.7 * tight  # nor packed: Nystrom
    assert choose_solver(op, LAM, memory_budget=tight)[0] == "nystrom"
    # a dense K cannot be repacked without a second copy: auto stays dense-or-Nystrom
    assert choose_solver(relu_ntk_naive(X, W), LAM, memory_budget=middle)[0] == "nystrom"


def test_cython_lapack_route_matches_scipys_wrappers():
    """The ctypes calls into scipy.linalg.cython_lapack (used because SciPy's Python wrappers
    of the RFP routines refuse n > 46 340) give what SciPy's own wrappers give."""
    from ntkcore.solvers.exact_packed import _call
    rng = np.random.default_rng(3)
    for n in (9, 10):
        A = _spd(rng, n) + LAM * np.eye(n)
        arf, _ = lapack.dtrttf(A, transr="N", uplo="L")
        ref, info = lapack.dpftrf(n, arf, transr="N", uplo="L")
        ours = arf.copy()
        assert info == 0 and _call("dpftrf", b"N", b"L", n, ours) == 0
        assert np.array_equal(ours, ref)
        B = np.asfortranarray(rng.standard_normal((n, 3)))
        x_ref, _ = lapack.dpftrs(n, ref, B, transr="N", uplo="L")
        assert _call("dpftrs", b"N", b"L", n, 3, ours, B, n) == 0  # in place on B
        assert_close(B, x_ref, rtol=1e-13, what="dpftrs")
        assert _call("dtftri", b"N", b"L", b"N", n, ours) == 0
        Linv, _ = lapack.dtfttr(n, ours, transr="N", uplo="L")
        assert_close(np.tril(Linv), np.linalg.inv(np.linalg.cholesky(A)), rtol=1e-10,
                     what="dtftri")
    with pytest.raises(NotPSDError, match="packed Cholesky"):
        packed_exact_fit(DenseKernel(-np.eye(4)), np.ones((4, 1)), LAM)


def test_packed_requests_are_validated():
    X, Xt, W, Y, Yt = _relu_problem(n=40)
    op = ReluNTKOperator(X, W)
    with pytest.raises(ParameterError, match="storage"):
        choose_solver(op, LAM, requested="exact", storage="triangular")
    with pytest.raises(ParameterError, match="operator on the CPU"):
        choose_solver(relu_ntk_naive(X, W), LAM, requested="exact", storage="packed")
    with pytest.raises(MemoryBudgetError, match="packed storage"):
        choose_solver(op, LAM, requested="exact", storage="packed", memory_budget=1000)


def test_packed_fit_never_holds_a_dense_matrix():
    """Peak traced memory stays below one dense n x n float64 array: the packed array is
    half of it and the assembly tiles are (tile, n)."""
    n, T = 600, 4
    X, Xt, W, Y, Yt = _relu_problem(n=n, T=T)
    op = as_operator(ReluNTKOperator(X, W))
    Kt = op.cross(Xt)
    packed_exact_fit(as_operator(ReluNTKOperator(X[:30], W)), Y[:30], LAM,
                     K_test=Kt[:, :30].copy(), tile=8)  # warm-up: first-use imports
    tracemalloc.start()
    fit = packed_exact_fit(op, Y, LAM, K_test=Kt, tile=n // 20)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert fit.diag_inv.shape == (n,)
    assert peak < 0.75 * 8 * n * n, f"peak {peak / 2**20:.2f} MiB"
