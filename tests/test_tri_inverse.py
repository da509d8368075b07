"""The GPU's triangular inverse (block rows in GEMMs) against LAPACK's trtri, on the CPU."""

import numpy as np
import pytest
from scipy.linalg import lapack

from ntkcore.backend import Backend
from ntkcore.solvers.tri_inverse import (tri_inv_blocked, tri_inv_columns, tri_inv_columns_flops,
                                         tri_inv_flops)

from conftest import assert_close


@pytest.mark.parametrize("n,block", [(1, 4), (7, 3), (64, 16), (100, 33), (50, 64)])
@pytest.mark.parametrize("method", [tri_inv_blocked, tri_inv_columns])
def test_blocked_inverse_equals_trtri(n, block, method):
    rng = np.random.default_rng(n + block)
    G = rng.standard_normal((n, n + 5))
    L = np.linalg.cholesky(G @ G.T / n + 0.1 * np.eye(n))
    L_poisoned = L + np.triu(np.full((n, n), np.nan), 1)  # only the lower triangle is read
    out = np.full((n, n), 7.0)  # any scratch: overwritten entirely
    X = method(Backend("cpu"), L_poisoned, out=out, block=block)
    assert X is out
    ref, info = lapack.dtrtri(L.copy(), lower=1)
    assert info == 0
    assert_close(X, ref, rtol=1e-12, what="blocked L^-1 vs trtri")
    assert not np.triu(X, 1).any(), "strictly upper part must be zero"


def test_flop_count_is_about_the_triangular_count():
    """n^3/3 (1 + 1.5 b / n), against n^3 for a trsm against the identity: at n = 50 000 and
    b = 2048, 1.06 n^3/3. One block is one trsm against I: b^3, as executed."""
    n = 50_000
    assert n ** 3 / 3 < tri_inv_flops(n) < 1.07 * n ** 3 / 3
    assert tri_inv_flops(n) == pytest.approx(n ** 3 / 3 * (1 + 1.5 * 2048 / n), rel=0.01)
    assert tri_inv_flops(100, block=200) == pytest.approx(100 ** 3)
    assert tri_inv_flops(100, block=200) == tri_inv_columns_flops(100, block=200)


def test_column_inverse_flops_are_about_the_triangular_count():
    n = 50_000
    assert n ** 3 / 3 < tri_inv_columns_flops(n, 2048) < 1.07 * n ** 3 / 3
    assert tri_inv_columns_flops(10, 16) == 10 ** 3


@pytest.mark.parametrize("method", ["blocked", "columns"])
def test_inverse_on_the_simulated_gpu_equals_trtri(sim_cupy, method):
    """Both inverses through the raw cuBLAS calls (strided views, no copies) on the simulator."""
    from ntkcore.solvers import tri_inverse
    fn = {"blocked": tri_inverse.tri_inv_blocked, "columns": tri_inverse.tri_inv_columns}[method]
    n = 130
    rng = np.random.default_rng(9)
    G = rng.standard_normal((n, n + 5))
    L = np.linalg.cholesky(G @ G.T / n + 0.1 * np.eye(n))
    out = sim_cupy.full((n, n), np.nan)
    X = fn(Backend("cuda"), sim_cupy.asarray(L + np.triu(np.full((n, n), np.nan), 1)),
           out=out, block=32)
    ref, _ = lapack.dtrtri(L.copy(), lower=1)
    assert_close(X.get(), ref, rtol=1e-12, what=f"{method} L^-1 on the simulator")


@pytest.mark.parametrize("n,T,block", [(1, 3, 4), (7, 5, 3), (64, 9, 16), (100, 1, 33),
                                       (50, 20, 64), (40, 0, 8)])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_right_apply_inverse_equals_k_test_times_a_inverse(n, T, block, layout, monkeypatch):
    """K_test L^-T L^-1 by block-column GEMMs against the float64 K_test A^-1 of a dense
    solve. L^-1's strict upper triangle outside its diagonal blocks is NaN (it must not be
    read), K_test is unchanged, and the flops the GEMMs execute are what right_apply_flops
    counts."""
    from ntkcore.solvers import tri_inverse
    from ntkcore.solvers.tri_inverse import right_apply_flops, right_apply_inverse
    rng = np.random.default_rng(n + T + block)
    G = rng.standard_normal((n, n + 5))
    A = G @ G.T / n + 0.1 * np.eye(n)
    X = tri_inv_blocked(Backend("cpu"), np.linalg.cholesky(A), block=block)
    blocks = [(j0, min(n, j0 + block)) for j0 in range(0, n, block)]
    outside = np.triu(np.ones((n, n), dtype=bool), 1)
    for j0, j1 in blocks:
        outside[j0:j1, j0:j1] = False
    X[outside] = np.nan
    Kt = rng.standard_normal((T, 2 * n))[:, ::2] if layout == "strided" else \
        np.asarray(rng.standard_normal((T, n)), order=layout)
    before = Kt.copy()
    executed = []
    real_gemm = tri_inverse.gemm

    def counting_gemm(c, a, b, **kw):
        k = a.shape[0] if kw.get("trans_a") else a.shape[1]
        executed.append(2.0 * c.shape[0] * c.shape[1] * k)
        return real_gemm(c, a, b, **kw)

    monkeypatch.setattr(tri_inverse, "gemm", counting_gemm)
    B = right_apply_inverse(Backend("cpu"), Kt, X, block=block)
    assert B.shape == (T, n)
    if T:
        assert_close(B, np.linalg.solve(A, Kt.T).T, rtol=1e-10, what="K_test A^-1")
    assert np.array_equal(Kt, before), "K_test must not be modified"
    assert sum(executed) == right_apply_flops(n, T, block)


def test_right_apply_flops_are_about_two_t_n_squared():
    from ntkcore.solvers.tri_inverse import right_apply_flops
    n, T = 50_000, 10_000
    assert 2 * T * n ** 2 < right_apply_flops(n, T) < 1.05 * 2 * T * n ** 2
