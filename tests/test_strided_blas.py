"""BLAS-3 on strided views (ntkcore.kernels.strided_blas) and the blocked Cholesky built on it.

On "cuda-sim" the raw cuBLAS / cuSOLVER calls run on the simulator's memory (tests/simgpu/
blas.py): pointers, leading dimensions, transpose flags and triangles are resolved as the
libraries would, so a wrong ld or flag gives wrong numbers or an out-of-allocation error here
as on a GPU. Every operand is a view inside a larger C- or F-ordered array (offset, ld >
rows), outputs with beta = 0 and never-read triangles hold NaN.
"""

import itertools

import numpy as np
import pytest

from ntkcore.backend import Backend
from ntkcore.kernels import strided_blas as sb
from ntkcore.solvers.chol_blocked import cholesky_blocked, cholesky_blocked_flops

from conftest import BACKENDS, assert_close


def _view(backend, M, order, pad=(2, 3)):
    """M as a view at offset (1, 2) inside a larger device array of the given order."""
    xp = Backend(backend).xp
    r, c = M.shape
    big = np.full((r + pad[0], c + pad[1]), np.nan)
    big[1:1 + r, 2:2 + c] = M
    dev = xp.asarray(np.asarray(big, order=order))
    if order == "F" and not dev.flags.f_contiguous:  # CuPy's asarray keeps F order; be sure
        dev = xp.asarray(np.ascontiguousarray(big.T)).T
    return dev[1:1 + r, 2:2 + c]


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


LAYOUTS = list(itertools.product("CF", repeat=3))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("orders", LAYOUTS)
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False),
                                             (True, True)])
def test_gemm_on_views(backend, orders, trans_a, trans_b):
    rng = np.random.default_rng(3)
    m, n, k = 5, 4, 6
    A = rng.standard_normal((k, m) if trans_a else (m, k))
    B = rng.standard_normal((n, k) if trans_b else (k, n))
    C0 = rng.standard_normal((m, n))
    op = lambda x, t: x.T if t else x  # noqa: E731
    for alpha, beta in ((1.0, 0.0), (-1.0, 1.0), (0.5, -2.0)):
        c = _view(backend, C0 if beta else np.full((m, n), np.nan), orders[0])
        a, b = _view(backend, A, orders[1]), _view(backend, B, orders[2])
        out = sb.gemm(c, a, b, alpha=alpha, beta=beta, trans_a=trans_a, trans_b=trans_b)
        assert out is c
        want = alpha * op(A, trans_a) @ op(B, trans_b) + (beta * C0 if beta else 0)
        assert_close(_host(c), want, rtol=1e-13, what=f"gemm alpha={alpha} beta={beta}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("orders", list(itertools.product("CF", repeat=2)))
def test_syrk_lower_touches_only_the_lower_triangle(backend, orders):
    rng = np.random.default_rng(4)
    m, k = 6, 4
    A = rng.standard_normal((m, k))
    C0 = rng.standard_normal((m, m))
    C0[np.triu_indices(m, 1)] = np.nan  # the strict upper part is neither read nor written
    c, a = _view(backend, C0, orders[0]), _view(backend, A, orders[1])
    sb.syrk_lower(c, a, alpha=-1.0, beta=1.0)
    got = _host(c)
    lower = np.tril_indices(m)
    assert_close(got[lower], (C0 - A @ A.T)[lower], rtol=1e-13, what="syrk lower")
    assert np.isnan(got[np.triu_indices(m, 1)]).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("orders", list(itertools.product("CF", repeat=2)))
@pytest.mark.parametrize("side,trans", [("left", False), ("left", True), ("right", False),
                                        ("right", True)])
def test_trsm_lower_reads_only_the_lower_triangle(backend, orders, side, trans):
    rng = np.random.default_rng(5)
    s, r = 5, 3
    L = np.tril(rng.standard_normal((s, s))) + 4 * np.eye(s)
    L_poisoned = L + np.triu(np.full((s, s), np.nan), 1)
    B = rng.standard_normal((s, r) if side == "left" else (r, s))
    b, l_view = _view(backend, B, orders[0]), _view(backend, L_poisoned, orders[1])
    sb.trsm_lower(b, l_view, side=side, trans=trans, alpha=2.0)
    opL = L.T if trans else L
    want = 2.0 * (np.linalg.solve(opL, B) if side == "left" else np.linalg.solve(opL.T, B.T).T)
    assert_close(_host(b), want, rtol=1e-12, what=f"trsm {side} trans={trans}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("order", "CF")
def test_potrf_lower_in_place(backend, order):
    rng = np.random.default_rng(6)
    s = 7
    G = rng.standard_normal((s, s + 2))
    A = G @ G.T + 0.5 * np.eye(s)
    a = _view(backend, A + np.triu(np.full((s, s), np.nan), 1), order)
    xp = Backend(backend).xp
    info = xp.zeros(3, dtype=np.int32)
    code = sb.potrf_lower(a, info, 1)
    got = _host(a)
    if backend == "cpu":
        assert code == 0
    else:
        assert _host(info).tolist() == [0, 0, 0]
    assert_close(np.tril(got), np.linalg.cholesky(A), rtol=1e-13, what="potrf")
    assert np.isnan(got[np.triu_indices(s, 1)]).all()


# ----------------------------------------------------------------------------- blocked Cholesky
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n,block,order", [(1, 4, "C"), (7, 3, "C"), (64, 16, "F"),
                                           (100, 33, "C"), (50, 64, "C"), (130, 32, "F")])
@pytest.mark.parametrize("diag_update", ["syrk", "gemm"])
def test_blocked_cholesky_equals_lapack(backend, n, block, order, diag_update, monkeypatch):
    from ntkcore.solvers import chol_blocked
    monkeypatch.setattr(chol_blocked, "DIAG_UPDATE", diag_update)
    rng = np.random.default_rng(n + block)
    G = rng.standard_normal((n, n + 5))
    A = G @ G.T / n + 0.1 * np.eye(n)
    xp = Backend(backend).xp
    dev = xp.asarray(np.asarray(A + np.triu(np.full((n, n), np.nan), 1), order=order))
    L = cholesky_blocked(Backend(backend), dev, block=block)
    assert L is dev, "the factor is written in A's memory"
    got = _host(L)
    assert_close(got, np.linalg.cholesky(A), rtol=1e-12, what="blocked Cholesky vs LAPACK")
    assert not np.triu(got, 1).any(), "strictly upper part must be zero"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("bad", [0, 5, 9])
def test_blocked_cholesky_names_the_minor_that_fails(backend, bad):
    n = 10
    A = np.eye(n)
    A[bad, bad] = -1.0
    dev = Backend(backend).xp.asarray(A)
    with pytest.raises(np.linalg.LinAlgError, match=f"order {bad + 1} is not positive"):
        cholesky_blocked(Backend(backend), dev, block=4)


def test_blocked_cholesky_copies_nothing(sim_cupy):
    """In place: beyond A, only potrf's workspace, the devInfo array and one b x b block at a
    time (the zeroing of the diagonal blocks' upper part) are allocated."""
    from simgpu import blas, cupy_shim
    n, block = 300, 64
    rng = np.random.default_rng(1)
    G = rng.standard_normal((n, n))
    A = sim_cupy.asarray(G @ G.T / n + np.eye(n))
    base = cupy_shim.MEMORY["live"]
    cupy_shim.reset_peak()
    del blas.CALLS[:]
    cholesky_blocked(Backend("cuda"), A, block=block)
    extra = cupy_shim.MEMORY["peak"] - base
    assert extra <= 8 * (block * block + 64 + block) + 64, extra
    calls = [c[0] for c in blas.CALLS]
    blocks = -(-n // block)
    assert calls.count("dpotrf") == blocks and calls.count("dgemm") == blocks - 2
    assert calls.count("dsyrk") == blocks - 1 and calls.count("dtrsm") == blocks - 1


def test_flop_count_is_about_the_cholesky_count():
    n = 50_000
    assert n ** 3 / 3 < cholesky_blocked_flops(n, 1024, "syrk") < 1.04 * n ** 3 / 3
    gemm_extra = cholesky_blocked_flops(n, 1024, "gemm") - cholesky_blocked_flops(n, 1024, "syrk")
    assert gemm_extra == pytest.approx(1024 * n ** 2 / 2, rel=0.03)
    assert cholesky_blocked_flops(10, 16) == pytest.approx(10 ** 3 / 3)


@pytest.mark.parametrize("overwrite_k", [False, True])
def test_exact_solver_with_the_blocked_cholesky_matches_the_cpu(sim_cupy, monkeypatch,
                                                               overwrite_k):
    """loo_influence on device arrays with exact.GPU_CHOLESKY = "blocked" (several blocks, a
    ragged last one) against the CPU's LAPACK path; with overwrite_k the factor is K's memory,
    so L^-1 must not be built there too."""
    import ntkcore as nc
    from ntkcore.solvers import chol_blocked, exact, tri_inverse
    monkeypatch.setattr(exact, "GPU_CHOLESKY", "blocked")
    monkeypatch.setattr(chol_blocked, "GPU_CHOL_BLOCK", 32)
    monkeypatch.setattr(tri_inverse, "GPU_INV_BLOCK", 48)
    cp = sim_cupy
    rng = np.random.default_rng(2)
    n, T, C = 120, 9, 3
    X, Xt, W = (rng.standard_normal(s) for s in ((n, 7), (T, 7), (50, 7)))
    Y, Yt = np.eye(C)[rng.integers(0, C, n)], np.eye(C)[rng.integers(0, C, T)]
    cpu = nc.loo_influence(nc.relu_ntk(X, W), Y, nc.relu_ntk(Xt, W, X), Yt, lam=0.1,
                           solver="exact")
    Xd, Wd = cp.asarray(X), cp.asarray(W)
    gpu = nc.loo_influence(nc.relu_ntk(Xd, Wd), cp.asarray(Y), nc.relu_ntk(cp.asarray(Xt), Wd, Xd),
                           cp.asarray(Yt), lam=0.1, solver="exact", overwrite_k=overwrite_k)
    assert_close(gpu.scores.get(), cpu.scores, rtol=1e-10, what="blocked-Cholesky scores")
    assert_close(gpu.diag_inv.get(), cpu.diag_inv, rtol=1e-10, what="diag(A^-1)")
    assert gpu.diagnostics["checks"]["psd"] is True, gpu.diagnostics["checks"]


def test_exact_solver_with_the_blocked_cholesky_refuses_an_indefinite_k(sim_cupy, monkeypatch):
    import ntkcore as nc
    from ntkcore import errors
    from ntkcore.solvers import chol_blocked, exact
    monkeypatch.setattr(exact, "GPU_CHOLESKY", "blocked")
    monkeypatch.setattr(chol_blocked, "GPU_CHOL_BLOCK", 4)
    K = np.eye(10)
    K[7, 7] = -1.0
    with pytest.raises(errors.NotPSDError, match="not positive definite"):
        nc.loo_influence(sim_cupy.asarray(K), sim_cupy.asarray(np.ones((10, 1))),
                         sim_cupy.asarray(np.eye(10)[:2]), sim_cupy.asarray(np.ones((2, 1))),
                         lam=1e-3, solver="exact")


def test_gpu_factor_bench_runs_at_toy_size(sim_cupy, tmp_path):
    """bench/gpu_factor.py (the stage sweep owed to a GPU run) at n = 150 on the simulator:
    every row is produced and every factor's residual is at rounding level."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import gpu_factor
    del gpu_factor.ROWS[:]
    gpu_factor.TUNED.clear()
    out, tuned = tmp_path / "factor.md", tmp_path / "factor.json"
    rc = gpu_factor.main(["--n", "150", "--chol-blocks", "32,64", "--inv-blocks", "48",
                          "--gemm", "64", "--d", "12", "--m", "40", "--reps", "1",
                          "--out", str(out), "--json", str(tuned)])
    import json
    settings = json.loads(tuned.read_text())
    assert settings["GPU_CHOLESKY"] in ("cusolver", "blocked")
    assert settings["GPU_CHOL_BLOCK"] in (32, 64) and settings["DIAG_UPDATE"] in ("syrk", "gemm")
    assert settings["GPU_INV_METHOD"] in ("rows", "columns") and settings["GPU_INV_BLOCK"] == 48
    text = out.read_text()
    assert rc == 0, text
    for what in ("cupy.linalg.cholesky", "potrf alone", "chol_blocked b=32 diag=syrk",
                 "chol_blocked b=64 diag=gemm", "potrf b=32 (one", "syrk b=32", "trsm (",
                 "tri_inv_blocked b=48", "tri_inv_columns b=48", "trsm against I",
                 "check_square_symmetric"):
        assert what in text, what
    residuals = [float(r[5].split("residual ")[1].split(";")[0]) for r in gpu_factor.ROWS
                 if "residual" in str(r[5])]
    assert len(residuals) == 5 and max(residuals) < 1e-13, residuals  # potrf + 2 x 2 blocked
    inverse = [r for r in gpu_factor.ROWS if r[1].startswith("tri_inv_")]
    assert len(inverse) == 2 and max(float(r[5].split("= ")[1]) for r in inverse) < 1e-13, inverse


def test_blocked_cholesky_refuses_a_nan_factor(sim_cupy):
    """cuSOLVER need not report a NaN pivot (the simulator reports none): the factorisation
    must find the NaN itself, not return it as a factor."""
    A = np.eye(10)
    A[6, 6] = np.nan
    with pytest.raises(np.linalg.LinAlgError, match="not finite"):
        cholesky_blocked(Backend("cuda"), sim_cupy.asarray(A), block=4)


def test_exact_solver_with_the_blocked_cholesky_takes_a_strided_view(sim_cupy, monkeypatch):
    """A device K that is a view with no unit stride, factored in place (overwrite_k): the
    blocked factorisation needs one unit stride, so it works on a contiguous copy."""
    import ntkcore as nc
    from ntkcore.solvers import chol_blocked, exact
    monkeypatch.setattr(exact, "GPU_CHOLESKY", "blocked")
    monkeypatch.setattr(chol_blocked, "GPU_CHOL_BLOCK", 8)
    rng = np.random.default_rng(4)
    n = 30
    G = rng.standard_normal((n, n))
    K = G @ G.T / n
    big = np.zeros((2 * n, 2 * n))
    big[::2, ::2] = K
    Y, Kt = np.eye(2)[rng.integers(0, 2, n)], K[:5]
    want = nc.loo_influence(K, Y, Kt, Y[:5], lam=0.1, solver="exact").scores
    got = nc.loo_influence(sim_cupy.asarray(big)[::2, ::2], sim_cupy.asarray(Y),
                           sim_cupy.asarray(Kt), sim_cupy.asarray(Y[:5]), lam=0.1,
                           solver="exact", overwrite_k=True).scores
    assert_close(got.get(), want, rtol=1e-10, what="strided K, blocked Cholesky")


def test_gpu_check_tuned_tolerates_a_missing_settings_file(sim_cupy, monkeypatch, tmp_path):
    """gpu_factor killed by its time limit before any setting: gpu_check --tuned runs (b)
    with the library's defaults and says so."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    import gpu_check
    monkeypatch.setattr(gpu_check, "ROWS", [])
    monkeypatch.setattr(gpu_check, "NOTES", [])
    out = tmp_path / "check.md"
    rc = gpu_check.main(["--quick", "--skip", "correct,entk,influence,numba", "--out", str(out),
                         "--tuned", str(tmp_path / "missing.json")])
    text = out.read_text()
    assert rc == 0 and "unreadable: FileNotFoundError" in text and "defaults are used" in text
