"""Bad input at the public entry points: a typed error from ntkcore.errors, never a bare
NumPy/torch exception and never a silently wrong number (DESIGN, "Errors and bad input").
Results that are returned are checked against tests/reference.py."""

import warnings

import numpy as np
import pytest

import ntkcore as nc
from ntkcore import errors

from conftest import assert_close
from reference import (autograd_entk_generic, loo_influence_bruteforce, relu_ntk_naive,
                       rownorm)

LAM = 1e-2


def _problem(n=12, T=5, C=3, d=4, seed=2):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + T, d))
    K_all = nc.relu_ntk_infinite(X)
    Y_all = np.eye(C)[rng.integers(0, C, n + T)]
    return K_all, Y_all, n


def _scoring_ref(B, dinv, alpha, res):
    U = B / dinv
    return U * (U / 2 * (alpha ** 2).sum(1) - res @ alpha.T)


# ------------------------------------------------------------------ 1. influence_scores
@pytest.fixture
def scoring(rng):
    T, n, C = 4, 9, 3
    return (rng.standard_normal((T, n)), rng.uniform(0.5, 2, n), rng.standard_normal((n, C)),
            rng.standard_normal((T, C)))


@pytest.mark.parametrize("bad", [
    lambda B, d, a, r: (B, d[:5], a, r),          # diag_inv too short
    lambda B, d, a, r: (B, d, a[:5], r),          # alpha too short
    lambda B, d, a, r: (B, d, a, r[:2]),          # residuals: wrong T
    lambda B, d, a, r: (B, d, a, r[:, :2]),       # residuals: wrong C
    lambda B, d, a, r: (B[0], d, a, r[:1]),       # B 1-D
    lambda B, d, a, r: (B, d, a[:, :0], r[:, :0]),  # C = 0
], ids=["dinv-len", "alpha-len", "res-T", "res-C", "B-1d", "C0"])
def test_influence_scores_rejects_shapes_that_do_not_fit(scoring, bad):
    with pytest.raises(errors.ShapeError):
        nc.influence_scores(*bad(*scoring))


def test_influence_scores_rejects_bad_values(scoring):
    B, dinv, alpha, res = scoring
    with pytest.raises(errors.ParameterError, match="B"):
        nc.influence_scores(B + 1j, dinv, alpha, res)
    with pytest.raises(errors.NonFiniteError, match="B"):
        nc.influence_scores(B * np.nan, dinv, alpha, res)
    for bad in (-dinv, 0 * dinv):
        with pytest.raises(errors.ParameterError, match="diag_inv"):
            nc.influence_scores(B, bad, alpha, res)


def test_influence_scores_converts_array_likes(scoring):
    import torch
    B, dinv, alpha, res = scoring
    ref = _scoring_ref(B, dinv, alpha, res)
    assert_close(nc.influence_scores(B.tolist(), dinv.tolist(), alpha.tolist(), res.tolist()),
                 ref, what="lists")
    assert_close(nc.influence_scores(*(torch.tensor(v) for v in scoring)), ref, what="torch")
    Bi = np.arange(B.size).reshape(B.shape) % 5 - 2
    got = nc.influence_scores(Bi, dinv, alpha, res)
    assert got.dtype == np.float64
    assert_close(got, _scoring_ref(Bi.astype(float), dinv, alpha, res), what="int B")
    assert_close(nc.influence_scores(B, dinv, alpha[:, 0], res[:, 0]),
                 _scoring_ref(B, dinv, alpha[:, :1], res[:, :1]), what="1-D alpha (C = 1)")


def test_influence_scores_validates_on_the_device(sim_cupy, scoring):
    cp = sim_cupy
    B, dinv, alpha, res = (cp.asarray(v) for v in scoring)
    out = nc.influence_scores(B, dinv, alpha, res)
    assert isinstance(out, cp.ndarray)
    assert_close(out.get(), _scoring_ref(*scoring), what="device scores")
    with pytest.raises(errors.ShapeError):
        nc.influence_scores(B, dinv[:5], alpha, res)


# ------------------------------------------------- 2. overwrite_k with inputs sharing K's memory
def test_overwrite_k_self_influence_matches_refitting():
    K_all, Y_all, n = _problem()
    K, Y = K_all[:n, :n].copy(), Y_all[:n]
    ref = loo_influence_bruteforce(K, Y, K, Y, LAM)
    Kc = K.copy()
    got = nc.loo_influence(Kc, Y, Kc, Y, LAM, solver="exact", overwrite_k=True).scores
    assert_close(got, ref, rtol=1e-9, what="K_test is K")


def test_overwrite_k_with_k_test_a_view_of_the_same_buffer():
    """K = KA[:n, :n] and K_test = KA[:, :n] (train rows included): K_test is the larger, so
    K is the one copied (not overwritten)."""
    K_all, Y_all, n = _problem()
    ref = loo_influence_bruteforce(K_all[:n, :n], Y_all[:n], K_all[:, :n], Y_all, LAM)
    KA = K_all.copy()
    got = nc.loo_influence(KA[:n, :n], Y_all[:n], KA[:, :n], Y_all, LAM, solver="exact",
                           overwrite_k=True).scores
    assert_close(got, ref, rtol=1e-9, what="K_test = KA[:, :n]")


def test_overwrite_k_with_targets_that_are_entries_of_k():
    """Y and Y_test views of K's own entries (real-valued targets): read before K is
    destroyed."""
    K_all, _, n = _problem()
    K, T = K_all[:n, :n].copy(), 4
    Y, Yt, Kt = K[:, :2].copy(), K[:T, 2:4].copy(), K_all[n:n + T, :n]
    ref = loo_influence_bruteforce(K, Y, Kt, Yt, LAM)
    got = nc.loo_influence(K, K[:, :2], Kt, K[:T, 2:4], LAM, solver="exact",
                           overwrite_k=True).scores
    assert_close(got, ref, rtol=1e-9, what="Y = K[:, :2], Y_test = K[:T, 2:4]")


# ----------------------------------------------------------------------------- 3. d = 0
@pytest.mark.parametrize("call", [
    lambda X: nc.relu_ntk_infinite(X),
    lambda X: nc.relu_ntk(X, np.zeros((4, 0))),
    lambda X: nc.relu_ntk(X, np.zeros((4, 0)), train_a=True),
    lambda X: nc.ReluNTKOperator(X, np.zeros((4, 0))),
    lambda X: nc.gram(X),
    lambda X: nc.gram_power(X, 3),
    lambda X: nc.attention_features(X),
    lambda X: nc.spectrum(X),
], ids=["relu_ntk_infinite", "relu_ntk", "relu_ntk-train_a", "operator", "gram",
        "gram_power", "attention_features", "spectrum"])
def test_zero_features_is_a_shape_error(call, capfd):
    with pytest.raises(errors.ShapeError, match="d >= 1"):
        call(np.zeros((10, 0)))
    assert "illegal value" not in capfd.readouterr().err  # OpenBLAS was never called


# ------------------------------------------------------------------ 4. spectrum rank_rtol
@pytest.mark.parametrize("rtol", [np.nan, -1.0, -1, "a", np.inf, True, [1]])
def test_spectrum_rank_rtol_must_be_a_finite_number_at_least_zero(rng, rtol):
    with pytest.raises(errors.ParameterError, match="rank_rtol"):
        nc.spectrum(rng.standard_normal((3, 5)), rank_rtol=rtol)


def test_spectrum_rank_rtol_zero_and_numpy_scalars_work(rng):
    X = rng.standard_normal((3, 5))
    assert nc.spectrum(X, rank_rtol=0).rank == 3
    assert nc.spectrum(X, rank_rtol=np.float64(2.0)).rank == 0  # every eigenvalue <= 2 lam_1


# -------------------------------------------------------- 5. overflow from finite input
@pytest.mark.parametrize("call", [
    lambda X: nc.gram(X * 1e200),
    lambda X: nc.gram(X * 1e200, X[:3] * 1e200),
    lambda X: nc.gram_power(X * 1e200, 3),
    lambda X: nc.gram_power(X, 1000),
    lambda X: nc.gram_power(X * 10, 200),
    lambda X: nc.relu_ntk(X * 1e200, np.ones((16, X.shape[1]))),
    lambda X: nc.relu_ntk(X * 1e200, np.ones((16, X.shape[1])), a=np.arange(16.0)),
    lambda X: nc.relu_ntk_infinite(X * 1e200),
    lambda X: nc.relu_ntk_infinite(X * 1e160),
    lambda X: nc.spectrum(X * 1e200),  # its eigenvalues ~1e400 themselves overflow
    # (attention_features of X 1e200 and spectrum of X 1e60, whose G^3 alone overflowed, are
    # scale-free and now computed on X scaled by a power of two: test_api_review11)
], ids=["gram", "gram-X2", "gram_power", "gram_power-p1000", "gram_power-p200",
        "relu_ntk", "relu_ntk-a", "relu_ntk_infinite", "relu_ntk_infinite-1e160",
        "spectrum"])
def test_overflow_is_a_non_finite_error_without_a_warning(rng, call):
    X = rng.standard_normal((6, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning before the error
        with pytest.raises(errors.NonFiniteError, match="overflowed"):
            call(X)


def test_attention_features_of_huge_rows_are_still_unit_rows(rng):
    """Features near the float64 limit: rownorm must not overflow into zeros or NaN."""
    X = rng.standard_normal((6, 4))
    F = X @ (X.T @ X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = nc.attention_features(X * 1e100)  # X M entries ~ 1e300, finite
    assert_close(got, rownorm(F), what="rownorm of ~1e300 rows")


# ------------------------------------------------------- 6./7. loo_influence: C = 0, budget
def test_loo_influence_with_no_targets_is_a_shape_error():
    K_all, Y_all, n = _problem()
    with pytest.raises(errors.ShapeError, match="C >= 1"):
        nc.loo_influence(K_all[:n, :n], Y_all[:n, :0], K_all[n:, :n], Y_all[n:, :0], LAM)


@pytest.mark.parametrize("budget", ["x", float("inf"), [10**9]])
def test_memory_budget_must_be_a_positive_finite_number(budget):
    K_all, Y_all, n = _problem()
    with pytest.raises(errors.ParameterError, match="memory_budget"):
        nc.loo_influence(K_all[:n, :n], Y_all[:n], K_all[n:, :n], Y_all[n:], LAM,
                         memory_budget=budget)


# ------------------------------------------------------------------- 8. dataset request size
def test_synthetic_request_beyond_memory_is_refused_before_allocating(monkeypatch):
    with pytest.raises(errors.MemoryBudgetError, match="GiB") as info:
        nc.load_dataset("synthetic", n_train=10**12)
    assert info.value.needed_bytes > 10**12 * 64 * 8
    from ntkcore import backend
    monkeypatch.setattr(backend, "host_available_bytes", lambda: 10**6)  # a 1 MB machine
    with pytest.raises(errors.MemoryBudgetError):
        nc.load_dataset("synthetic", n_train=10_000)
    ds = nc.load_dataset("synthetic", n_train=50, n_test=10, dim=16)  # well within 1 MB
    assert ds.pixels_train.shape == (50, 16)


# ------------------------------------------------------------------------ 9. empirical_ntk
@pytest.fixture
def mlp():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).double()


def _module(forward):
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3).double()

        def forward(self, x):
            return forward(self.lin, x)
    return M()


def test_empirical_ntk_device_must_be_a_torch_device(mlp, rng):
    with pytest.raises(errors.ParameterError, match="device"):
        nc.empirical_ntk(mlp, rng.standard_normal((5, 4)), device="tpu")


@pytest.mark.parametrize("forward,err,match", [
    (lambda lin, x: (lin(x), x), errors.ParameterError, "return a tensor"),
    (lambda lin, x: lin(x)[:1], errors.ShapeError, "one row per input row"),
    (lambda lin, x: lin(x).sum(), errors.ShapeError, "one row per input row"),
], ids=["tuple", "drops-rows", "scalar"])
def test_empirical_ntk_model_output_must_be_rows(rng, forward, err, match):
    with pytest.raises(err, match=match):
        nc.empirical_ntk(_module(forward), rng.standard_normal((5, 4)))


def test_empirical_ntk_reports_inputs_the_model_cannot_take(mlp, rng):
    X = rng.standard_normal((5, 4))
    with pytest.raises(errors.ShapeError, match="could not be applied to X.*shapes"):
        nc.empirical_ntk(mlp, X[:, :3])
    with pytest.raises(errors.ParameterError, match="could not be applied to X.*dtype"):
        nc.empirical_ntk(mlp, rng.integers(0, 3, (5, 4)))


def test_empirical_ntk_refuses_negative_output_index(mlp, rng):
    X = rng.standard_normal((5, 4))
    with pytest.raises(errors.ParameterError, match="outputs"):
        nc.empirical_ntk(mlp, X, outputs=-1)
    assert_close(nc.empirical_ntk(mlp, X, outputs=2), autograd_entk_generic(mlp, X, outputs=2),
                 rtol=1e-10, what="outputs=2")


# ---------------------------------------------------------------------- 10. operator methods
def test_operator_methods_check_their_arguments(rng):
    X, W = rng.standard_normal((12, 4)), rng.standard_normal((40, 4))
    K = relu_ntk_naive(X, W)
    for op in (nc.ReluNTKOperator(X, W), nc.DenseKernel(K)):
        with pytest.raises(errors.ShapeError, match="V"):
            op.matmat(np.ones((5, 2)))
        with pytest.raises(errors.ParameterError, match="idx"):
            op.columns(np.array([100]))
        with pytest.raises(errors.ParameterError, match="idx"):
            op.columns(np.array([-1]))
        assert_close(op.matmat(np.ones(12)), K @ np.ones(12), what="matmat 1-D")
        assert_close(op.columns(np.array([0, 3])), K[:, [0, 3]], what="columns")
    with pytest.raises(errors.ShapeError, match="square"):
        nc.DenseKernel(K[:, :5])


# ------------------------------------------------------------------------ 11. loose checks
def test_counts_and_flags_are_checked_alike(rng):
    X = rng.standard_normal((6, 4))
    with pytest.raises(errors.ParameterError, match="p"):
        nc.gram_power(X, True)
    assert_close(nc.gram_power(X, 2.0), nc.gram_power(X, 2), rtol=0, what="p = 2.0")
    with pytest.raises(errors.ParameterError, match="normalize"):
        nc.attention_features(X, normalize="no")
    a, b = rng.standard_normal(20), rng.standard_normal(20)
    assert nc.topk_stability(a, b, 2.0) == nc.topk_stability(a, b, 2)
    for k in (True, 2.5, 21):
        with pytest.raises(errors.ParameterError, match="k"):
            nc.topk_stability(a, b, k)
    K_all, Y_all, n = _problem()
    args = (K_all[:n, :n], Y_all[:n], K_all[n:, :n], Y_all[n:], LAM)
    r2f, r2 = nc.loo_influence(*args, top_k=2.0), nc.loo_influence(*args, top_k=2)
    np.testing.assert_array_equal(r2f.top_helpful, r2.top_helpful)
    with pytest.raises(errors.ParameterError, match="top_k"):
        nc.loo_influence(*args, top_k=True)


# ----------------------------------------------------- 12. auto plans for overwrite_k's memory
def test_auto_plans_the_in_place_footprint_with_overwrite_k(sim_cupy):
    """On the GPU the exact solver needs 3 n x n arrays, 2 with overwrite_k: a budget between
    the two is exact only with overwrite_k."""
    from ntkcore.solvers.auto import choose_solver
    cp = sim_cupy
    K_all, Y_all, n = _problem(n=60, T=7)
    budget = int(2.5 * 8 * n * n / 0.7)  # 2 arrays fit within 70 %, 3 do not
    K = cp.asarray(K_all[:n, :n])
    res = nc.loo_influence(K.copy(), cp.asarray(Y_all[:n]), cp.asarray(K_all[n:, :n]),
                           cp.asarray(Y_all[n:]), LAM, memory_budget=budget, overwrite_k=True)
    assert res.solver == "exact"
    assert choose_solver(K, LAM, memory_budget=budget, overwrite_k=True)[0] == "exact"
    with pytest.raises(errors.MemoryBudgetError):  # 3 arrays do not fit; Nystrom neither
        choose_solver(K, LAM, memory_budget=budget)
    ref = loo_influence_bruteforce(K_all[:n, :n], Y_all[:n], K_all[n:, :n], Y_all[n:], LAM)
    assert_close(res.scores.get(), ref, rtol=1e-9, what="exact with overwrite_k on device")


# --------------------------------------------------------------- 13. spectrum stays on device
def test_spectrum_of_device_input_is_on_the_device(sim_cupy, rng):
    cp = sim_cupy
    X = rng.standard_normal((5, 8))
    host, dev = nc.spectrum(X), nc.spectrum(cp.asarray(X))
    assert isinstance(dev.eigenvalues, cp.ndarray)
    assert_close(dev.eigenvalues.get(), host.eigenvalues, rtol=1e-10, what="eigenvalues")
    for field in ("kappa", "kappa_effective", "kappa_cubed", "kappa_cubed_effective"):
        assert isinstance(getattr(dev, field), float)
        assert getattr(dev, field) == pytest.approx(getattr(host, field), rel=1e-10), field
    assert dev.rank == host.rank == 5
