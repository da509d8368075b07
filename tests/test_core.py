"""Core numerics against the float64 references in tests/reference.py."""

import numpy as np
import pytest

import ntkcore as nc
from ntkcore import errors
from ntkcore.solvers.operator import DenseKernel, ReluNTKOperator

from conftest import assert_close
from reference import (gram_power_naive, loo_influence_bruteforce, loo_residuals_bruteforce,
                       relu_ntk_infinite_naive, relu_ntk_naive, rownorm)


def unit_rows(rng, n, d):
    return rownorm(rng.standard_normal((n, d)))


# ----------------------------------------------------------------------------- public API
def test_every_public_name_imports():
    for name in nc.__all__:
        assert getattr(nc, name) is not None, name


def test_import_is_light():
    import subprocess
    import sys
    code = "import sys, ntkcore; assert 'torch' not in sys.modules and 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- gram.py
@pytest.mark.parametrize("n,d", [(12, 30), (40, 7)])
def test_gram_power_matches_naive_on_both_sides(rng, n, d):
    X = unit_rows(rng, n, d)
    for p in (1, 2, 3):
        assert_close(nc.gram_power(X, p), gram_power_naive(X, p), what=f"G^{p}")


def test_attention_features_train_rows_equal_query_path(rng):
    X = unit_rows(rng, 25, 10)
    train = nc.attention_features(X)
    query = nc.attention_features(X, Q=X)
    assert_close(train, rownorm(X @ X.T @ X), what="rownorm(X X^T X)")
    assert_close(query, train, what="query path on the training rows")
    Q = unit_rows(rng, 4, 10)
    assert_close(nc.attention_features(X, Q), rownorm((X.T @ X @ Q.T).T), what="M q")


def test_attention_gram_is_g_cubed(rng):
    """Thm 4.1: the Gram matrix of the (unnormalized) attention features is G^3."""
    X = unit_rows(rng, 15, 40)
    F = nc.attention_features(X, normalize=False)
    assert_close(F @ F.T, nc.gram_power(X, 3), what="K_LinAttn = G^3")


def test_kappa_cubed_identity_full_rank(rng):
    """Thm 4.7: kappa(G^3) = kappa(G)^3 for full-rank X (n <= d), within 1e-6 relative."""
    X = unit_rows(rng, 20, 60)
    s = nc.spectrum(X)
    assert np.isfinite(s.kappa) and s.rank == 20
    assert abs(s.kappa_cubed - s.kappa ** 3) / s.kappa ** 3 < 1e-6
    ev = np.linalg.eigvalsh(X @ X.T)
    assert abs(s.kappa - ev[-1] / ev[0]) / s.kappa < 1e-10


def test_spectrum_effective_kappa_when_n_exceeds_d(rng):
    X = unit_rows(rng, 50, 6)
    s = nc.spectrum(X)
    assert s.kappa == float("inf") and s.rank == 6
    ev = np.linalg.eigvalsh(X.T @ X)
    assert abs(s.kappa_effective - ev[-1] / ev[0]) / s.kappa_effective < 1e-10
    assert abs(s.kappa_cubed_effective - s.kappa_effective ** 3) / s.kappa_effective ** 3 < 1e-6
    assert s.notes


# ----------------------------------------------------------------------------- eNTK
@pytest.mark.parametrize("tile", [1, 7, 64, None])
@pytest.mark.parametrize("train_a", [False, True])
def test_relu_ntk_matches_naive(rng, tile, train_a):
    X = unit_rows(rng, 23, 9)
    W = 0.01 * rng.standard_normal((37, 9))  # m = 37: not a multiple of 8 or 32
    K = nc.relu_ntk(X, W, train_a=train_a, tile=tile)
    assert_close(K, relu_ntk_naive(X, W, train_a=train_a), what="relu_ntk")
    assert np.array_equal(K, K.T), "symmetric output must be exactly symmetric"
    X2 = unit_rows(rng, 5, 9)
    assert_close(nc.relu_ntk(X, W, X2, train_a=train_a, tile=tile),
                 relu_ntk_naive(X, W, X2, train_a=train_a), what="cross block")


def test_relu_ntk_single_row_and_general_a(rng):
    X = unit_rows(rng, 1, 5)
    W = rng.standard_normal((10, 5))
    assert_close(nc.relu_ntk(X, W), relu_ntk_naive(X, W), what="n = 1")
    # +-1 output weights leave the W-part unchanged (a_r^2 = 1) [Thm B.12]
    a = rng.choice([-1.0, 1.0], size=(10, 3))
    assert_close(nc.relu_ntk(X, W, a=a), relu_ntk_naive(X, W), what="+-1 a")


def test_relu_ntk_infinite_matches_naive(rng):
    X = rng.standard_normal((13, 6))
    X2 = rng.standard_normal((4, 6))
    assert_close(nc.relu_ntk_infinite(X), relu_ntk_infinite_naive(X), what="K_inf")
    assert_close(nc.relu_ntk_infinite(X, X2), relu_ntk_infinite_naive(X, X2), what="K_inf cross")


def test_finite_width_ntk_approaches_infinite_width(rng):
    """Law of large numbers [Thm 4.2]: error shrinks ~ m^-1/2 for Gaussian W."""
    X = unit_rows(rng, 8, 5)
    K_inf = nc.relu_ntk_infinite(X)
    errs = [np.abs(nc.relu_ntk(X, rng.standard_normal((m, 5))) - K_inf).max()
            for m in (100, 40000)]
    assert errs[1] < errs[0] / 5


# ----------------------------------------------------------------------------- influence
def _problem(rng, n, C, T=6, d=7, m=40):
    X = unit_rows(rng, n, d)
    W = rng.standard_normal((m, d))
    Xt = unit_rows(rng, T, d)
    K = nc.relu_ntk(X, W)
    Kt = nc.relu_ntk(Xt, W, X)
    if C == 1:
        Y = rng.choice([-1.0, 1.0], size=(n, 1))
        Yt = rng.choice([-1.0, 1.0], size=(T, 1))
    else:
        Y = np.eye(C)[rng.integers(0, C, n)]
        Yt = np.eye(C)[rng.integers(0, C, T)]
    return K, Y, Kt, Yt


@pytest.mark.parametrize("C", [1, 4])
def test_loo_influence_equals_bruteforce_refitting(rng, C):
    """Sherman-Morrison LOO vs refitting without each point, n = 300 (relative error <= 1e-8)."""
    K, Y, Kt, Yt = _problem(rng, 300, C)
    lam = 1e-2
    res = nc.loo_influence(K, Y, Kt, Yt, lam=lam, top_k=5)
    ref = loo_influence_bruteforce(K, Y, Kt, Yt, lam)
    # 1e-8: the refits solve 300 systems of condition ~1e4; both sides agree to ~1e-12 here.
    assert_close(res.scores, ref, rtol=1e-8, what="scores")
    assert_close(res.loo_residuals, loo_residuals_bruteforce(K, Y, lam), rtol=1e-8, what="LOO res")
    assert_close(res.predictions, Kt @ np.linalg.solve(K + lam * np.eye(300), Y), rtol=1e-10,
                 what="predictions")
    np.testing.assert_array_equal(res.top_helpful[:, 0], np.argmax(ref, axis=1))
    np.testing.assert_array_equal(res.top_harmful[:, 0], np.argmin(ref, axis=1))
    checks = res.diagnostics["checks"]
    assert checks == {"symmetric": True, "psd": True, "well_conditioned": True,
                      "inverse_accurate": True}


def test_loo_influence_accepts_operator_and_1d_targets(rng):
    X = unit_rows(rng, 60, 5)
    W = rng.standard_normal((30, 5))
    y = rng.choice([-1.0, 1.0], size=60)
    op = ReluNTKOperator(X, W)
    Kt = op.cross(X[:4])
    a = nc.loo_influence(op, y, Kt, y[:4], lam=1e-2, solver="exact")
    b = nc.loo_influence(nc.relu_ntk(X, W), y[:, None], Kt, y[:4, None], lam=1e-2)
    assert_close(a.scores, b.scores, what="operator vs dense")
    assert "kernel_assembly" in a.timings


def test_operators_agree_with_dense(rng):
    X = unit_rows(rng, 50, 6)
    W = rng.standard_normal((33, 6))
    K = relu_ntk_naive(X, W, train_a=True)
    V = rng.standard_normal((50, 3))
    for op in (DenseKernel(K), ReluNTKOperator(X, W, train_a=True, tile=16)):
        assert_close(op.diag(), np.diag(K), what="diag")
        assert_close(op.columns([3, 7]), K[:, [3, 7]], what="columns")
        assert_close(op.matmat(V), K @ V, what="matmat")


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_get_typed_errors(rng):
    K, Y, Kt, Yt = _problem(rng, 30, 3)
    with pytest.raises(errors.ParameterError, match="lam"):
        nc.loo_influence(K, Y, Kt, Yt, lam=0.0)
    bad = K.copy()
    bad[0, 1] = np.nan
    with pytest.raises(errors.NonFiniteError, match="K"):
        nc.loo_influence(bad, Y, Kt, Yt)
    with pytest.raises(errors.ShapeError, match="inconsistent numbers of samples"):
        nc.loo_influence(K, Y[:-1], Kt, Yt)
    with pytest.raises(errors.ShapeError, match="K_test"):
        nc.loo_influence(K, Y, Kt[:, :-1], Yt)
    asym = K.copy()
    asym[0, 1] += 1.0
    with pytest.raises(errors.NotSymmetricError):
        nc.loo_influence(asym, Y, Kt, Yt)
    with pytest.raises(errors.NotPSDError):
        nc.loo_influence(-K, Y, Kt, Yt, lam=1e-6)
    with pytest.raises(errors.ShapeError):
        nc.relu_ntk(np.ones((3, 4)), np.ones((5, 3)))
    with pytest.raises(errors.ParameterError):
        nc.loo_influence(K, Y, Kt, Yt, solver="magic")
    with pytest.raises(errors.NonFiniteError):
        nc.gram(np.array([[1.0, np.inf]]))
    with pytest.raises(errors.ParameterError):
        nc.gram_power(np.ones((2, 2)), 0)


def test_too_large_for_memory_is_refused_up_front(rng, monkeypatch):
    monkeypatch.setenv("NTKCORE_MEMORY_LIMIT", str(200 * 200 * 8))
    X = unit_rows(rng, 300, 4)
    with pytest.raises(errors.MemoryBudgetError, match=r"n <= \d+ would fit") as info:
        nc.relu_ntk(X, rng.standard_normal((8, 4)))
    assert info.value.n_fit is not None and info.value.n_fit < 300


def test_device_cuda_without_gpu_is_a_clear_error():
    from ntkcore.backend import get_backend, gpu_available
    if gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(errors.BackendError, match="cuda"):
        get_backend("cuda")
