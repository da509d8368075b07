"""Kernel routes against the float64 references of tests/reference.py and torch autograd, where
the other files leave gaps: the symmetric general-a eNTK over several tiles (the mirror path),
the public influence_scores on other layouts and dtypes, packed-word boundaries of m, the cached
operator with trained output weights over column tiles, public layouts of relu_ntk / the
infinite NTK / gram, gram_power past p = 3, the spectrum's eigenvalues, and empirical_ntk's
structured routes for conv1d, per-position Linear and scalar outputs. Found by the session-13
audit of reference coverage; all passed when added."""

import numpy as np
import pytest
import torch
from torch import nn

import ntkcore as nc
from conftest import BACKENDS, assert_close
from ntkcore import kernels as K
from ntkcore.backend import Backend
from ntkcore.ntk.empirical import empirical_ntk
from reference import autograd_entk_generic, relu_ntk_infinite_naive, relu_ntk_naive

def _to(backend, *arrays):
    xp = Backend(backend).xp
    return [None if a is None else xp.asarray(a) for a in arrays]


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


# -------------------------------------------- general (trained) a WITHOUT train_a, ragged tiles
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n,n2,m,tile,train_a", [(23, None, 37, 7, False), (23, 5, 37, 7, False),
                                                 (1, None, 70, None, False), (30, 11, 65, 4, True)])
def test_relu_ntk_general_a_vs_naive(backend, n, n2, m, tile, train_a):
    rng = np.random.default_rng(n + m)
    X = rng.standard_normal((n, 6))
    W = rng.standard_normal((m, 6))
    X2 = None if n2 is None else rng.standard_normal((n2, 6))
    a = rng.uniform(0.2, 2.0, size=(m, 2)) * rng.choice([-1, 1], size=(m, 2))
    Xd, Wd, X2d, ad = _to(backend, X, W, X2, a)
    got = _host(nc.relu_ntk(Xd, Wd, X2d, a=ad, train_a=train_a, tile=tile))
    assert_close(got, relu_ntk_naive(X, W, X2, a=a, train_a=train_a), what="general a")
    if n2 is None:
        assert np.array_equal(got, got.T)


# -------------------------------------------- public influence_scores: layouts and mixed dtypes
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", ["B F-order", "B column-strided", "float32 B, float64 rest",
                                  "alpha 1-D C=1", "alpha F-order"])
def test_public_influence_scores_layouts(backend, kind):
    rng = np.random.default_rng(3)
    T, n, C = 7, 45, 3 if kind != "alpha 1-D C=1" else 1
    B = rng.standard_normal((T, n))
    dinv = rng.random(n) + 0.5
    alpha = rng.standard_normal((n, C))
    R = rng.standard_normal((T, C))
    U = B / dinv
    ref = U * (U / 2 * (alpha ** 2).sum(1) - R @ alpha.T)
    dtype = np.float64
    Bin, ain, Rin = B, alpha, R
    if kind == "B F-order":
        Bin = np.asfortranarray(B)
    elif kind == "B column-strided":
        wide = np.zeros((T, 2 * n))
        wide[:, ::2] = B
        Bin = wide[:, ::2]
    elif kind == "float32 B, float64 rest":
        Bin = B.astype(np.float32)
        dtype = np.float32
        U = Bin.astype(np.float64) / dinv
        ref = U * (U / 2 * (alpha ** 2).sum(1) - R @ alpha.T)
    elif kind == "alpha 1-D C=1":
        ain, Rin = alpha[:, 0], R[:, 0]
    elif kind == "alpha F-order":
        ain = np.asfortranarray(alpha)
    xp = Backend(backend).xp
    args = [xp.asarray(a) for a in (Bin, dinv, ain, Rin)]
    if kind in ("B F-order", "alpha F-order") and xp is not np:
        args = [xp.asfortranarray(a) if a.ndim == 2 else a for a in args]
    if kind == "B column-strided" and xp is not np:
        wide = xp.zeros((T, 2 * n))
        wide[:, ::2] = xp.asarray(B)
        args[0] = wide[:, ::2]
    got = nc.influence_scores(*args)
    assert got.dtype == dtype
    assert_close(_host(got), ref, dtype=dtype, what=kind)


# -------------------------------------------- word-boundary widths: m = 1, 32, 33, 63, 64, 65, 96
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("m", [1, 32, 33, 63, 64, 65, 96, 129])
@pytest.mark.parametrize("train_a", [False, True])
def test_relu_ntk_fused_word_boundaries(backend, m, train_a):
    rng = np.random.default_rng(m)
    X = rng.standard_normal((37, 5))
    X2 = rng.standard_normal((9, 5))
    W = rng.standard_normal((m, 5))
    Xd, Wd, X2d = _to(backend, X, W, X2)
    for x2, x2d in ((None, None), (X2, X2d)):
        got = _host(K.relu_ntk_fused(Xd, Wd, x2d, train_a=train_a, tile=16))
        assert_close(got, relu_ntk_naive(X, W, x2, train_a=train_a), what=f"m={m}")


# -------------------------------------------- cached operator with trained a, column tiles
def test_cached_operator_general_a_column_tiles():
    from ntkcore.solvers.landmarks import CachedReluNTK
    from ntkcore.solvers.operator import ReluNTKOperator
    rng = np.random.default_rng(9)
    X = rng.standard_normal((40, 6))
    W = rng.standard_normal((33, 6))
    a = rng.uniform(0.3, 1.7, 33)
    Xq = rng.standard_normal((7, 6))
    for train_a in (False, True):
        op = CachedReluNTK(ReluNTKOperator(X, W, a=a, train_a=train_a, tile=8))
        op.COL_TILE = 16
        Kref = relu_ntk_naive(X, W, a=a, train_a=train_a)
        assert_close(op.rows(5, 31), Kref[5:31], what="rows, column tiles")
        assert_close(op.cross(Xq), relu_ntk_naive(Xq, W, X, a=a, train_a=train_a), what="cross")
        assert_close(op.diag(), np.diag(Kref), what="diag")
        assert_close(op.matmat(np.eye(40)[:, :5]), Kref[:, :5], what="matmat")


# -------------------------------------------- public layouts/dtypes never compared with a reference
def test_public_layouts_vs_naive():
    rng = np.random.default_rng(21)
    X = rng.standard_normal((31, 6))
    X2 = rng.standard_normal((8, 6))
    W = rng.standard_normal((41, 6))
    # relu_ntk: F-ordered float32 X, column-strided W (both cast/copied to float64 by the API)
    Wwide = np.zeros((41, 12))
    Wwide[:, ::2] = W
    got = nc.relu_ntk(np.asfortranarray(X.astype(np.float32)), Wwide[:, ::2], tile=9)
    x32 = X.astype(np.float32).astype(np.float64)  # what the float32 input holds
    assert_close(got, relu_ntk_naive(x32, W), what="relu_ntk layouts")
    # relu_ntk_infinite into an F-ordered out (the copy path of relu_ntk_infinite_fused)
    out = np.asfortranarray(np.full((31, 8), np.nan))
    nc.relu_ntk_infinite(X, X2, out=out)
    assert_close(out, relu_ntk_infinite_naive(X, X2), what="K_inf into F-ordered out")
    out = np.asfortranarray(np.full((31, 31), np.nan))
    nc.relu_ntk_infinite(X, out=out)
    assert_close(out, relu_ntk_infinite_naive(X), what="K_inf sym into F-ordered out")
    # gram(X, X2): the cross Gram product is only ever compared with its own host call
    assert_close(nc.gram(X, X2), np.einsum("id,jd->ij", X, X2), what="gram cross")
    assert_close(nc.gram(X.astype(np.float32), X2.astype(np.float32)),
                 x32 @ X2.astype(np.float32).astype(np.float64).T,
                 dtype=np.float32, what="gram float32 cross")
    # gram_power p = 4, 5 (binary powering with more steps than the suite's p <= 3)
    from reference import gram_power_naive
    Xs = X[:12] / np.linalg.norm(X[:12], axis=1, keepdims=True)
    for p in (4, 5):
        assert_close(nc.gram_power(Xs, p), gram_power_naive(Xs, p), what=f"G^{p} n>d")
        Xw = rng.standard_normal((5, 9)) / 3
        assert_close(nc.gram_power(Xw, p), gram_power_naive(Xw, p), what=f"G^{p} n<=d")


# -------------------------------------------- spectrum's eigenvalues (the suite checks only kappas)
@pytest.mark.parametrize("n,d,scale", [(20, 60, 1.0), (50, 6, 1.0), (20, 60, 1e-150),
                                       (50, 6, 1e150)])
def test_spectrum_eigenvalues_vs_eigvalsh(n, d, scale):
    rng = np.random.default_rng(n + d)
    X = rng.standard_normal((n, d))
    s = nc.spectrum(X * scale)
    G = X @ X.T
    ref = np.sort(np.linalg.eigvalsh(G))[::-1][:min(n, d)]
    got = np.asarray(s.eigenvalues) / scale / scale
    assert_close(got, ref, rtol=1e-12, what="eigenvalues of X X^T")
    ev3 = np.sort(np.linalg.eigvalsh(np.linalg.matrix_power(G, 3)))[::-1][:min(n, d)]
    assert abs(s.kappa_cubed_effective - ev3[0] / ev3[s.rank - 1]) <= 1e-8 * s.kappa_cubed_effective


STRATS = ["auto", "structured", "structured-gram", "structured-outer", "jacobian", "ntvp"]


class Seq1d(nn.Module):
    def __init__(self, C=2):
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, padding="same", dilation=2)
        self.c2 = nn.Conv1d(4, 5, 3, stride=2)
        self.tok = nn.Linear(5, 6)  # applied per position: input (b, L, 5)
        self.out = nn.Linear(6, C)

    def forward(self, x):  # x (b, 3, 11)
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))          # (b, 5, 5)
        h = torch.tanh(self.tok(h.transpose(1, 2)))  # (b, 5, 6)
        return self.out(h.mean(1))


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 7)
        self.P = nn.Parameter(torch.randn(7, 1))

    def forward(self, x):
        return (torch.relu(self.l1(x)) @ self.P).reshape(-1)  # (b,)


@pytest.mark.parametrize("strategy", STRATS)
@pytest.mark.parametrize("outputs", ["trace", "full", 1])
def test_conv1d_and_sequence_linear_vs_autograd(strategy, outputs):
    torch.manual_seed(0)
    model = Seq1d().double()
    rng = np.random.default_rng(0)
    X, X2 = rng.standard_normal((5, 3, 11)), rng.standard_normal((3, 3, 11))
    got = empirical_ntk(model, X, X2, outputs=outputs, strategy=strategy)
    assert_close(got, autograd_entk_generic(model, X, X2, outputs), rtol=1e-10,
                 what=f"{strategy} {outputs}")


@pytest.mark.parametrize("strategy", STRATS)
def test_scalar_output_single_rows(strategy):
    torch.manual_seed(1)
    model = Scalar().double()
    rng = np.random.default_rng(1)
    X = rng.standard_normal((1, 4))
    X2 = rng.standard_normal((1, 4))
    for x2, outputs in ((None, "trace"), (X2, "trace"), (X2, "full"), (None, 0)):
        K = empirical_ntk(model, X, x2, outputs=outputs, strategy=strategy)
        assert_close(K, autograd_entk_generic(model, X, x2, outputs), rtol=1e-10,
                     what=f"{strategy} n=1 {outputs}")
