"""Malleability metrics [Def 3.4, A.4.2, Def C.10] on hand-made inputs with known answers."""

import numpy as np
import pytest
from scipy import stats

from ntkcore import flip_rate, spearman, topk_stability
from ntkcore.errors import EmptySelectionError, ParameterError, ShapeError
from ntkcore.malleability import (complexity_by_decile, high_influence_set,
                                  intrinsic_sensitivity, kernel_lipschitz, mean_ci95)
from reference import spearman_naive


def test_high_influence_set_is_strictly_above_the_quantile():
    I = np.arange(1.0, 21.0)  # quantile(0.9) = 18.1 -> {19, 20}
    assert high_influence_set(I, 0.1).tolist() == [18, 19]
    assert high_influence_set(I, 0.25).tolist() == [15, 16, 17, 18, 19]  # q = 15.25


def test_flip_rate_counts_sign_changes_inside_H_only():
    I = np.arange(1.0, 21.0)
    adv = I.copy()
    adv[19] = -1.0  # one of the two H points flips
    adv[:10] = -5.0  # flips outside H do not count
    assert flip_rate(I, adv, tau=0.1) == 0.5
    adv[18] = 0.0  # sign 0 differs from +1: counts as a flip
    assert flip_rate(I, adv, tau=0.1) == 1.0
    assert flip_rate(I, I, tau=0.1) == 0.0


def test_flip_rate_rows_are_test_points():
    a = np.vstack([np.arange(10.0), -np.arange(10.0)])
    b = np.vstack([-np.arange(10.0), -np.arange(10.0)])
    # row 0: H = {9} flips; row 1: H = {0} (value 0 > quantile -0.9), sign 0 -> 0: no flip
    np.testing.assert_array_equal(flip_rate(a, b), [1.0, 0.0])


def test_flip_rate_rejects_bad_input():
    with pytest.raises(EmptySelectionError):
        flip_rate(np.ones(5), np.ones(5))  # all tied: nothing above the quantile
    with pytest.raises(ShapeError):
        flip_rate(np.ones(5), np.ones(4))
    with pytest.raises(ParameterError):
        flip_rate(np.arange(5.0), np.arange(5.0), tau=1.0)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 40))
        a = rng.integers(0, 4, n).astype(float)  # many ties
        b = rng.integers(0, 4, n).astype(float)
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            continue
        # average ranks + Pearson: same arithmetic as scipy up to rounding
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


@pytest.mark.parametrize("chunk", [1 << 22, 61])  # one chunk; chunks of 2 rows (n = 30)
def test_row_metrics_equal_their_one_row_values_with_ties(monkeypatch, chunk):
    """(T, n) input is computed for all rows at once (one sort, one searchsorted): each row
    must equal scipy / the 1-D call on that row, ties and a constant row included."""
    rng = np.random.default_rng(7)
    import ntkcore.malleability as mall
    monkeypatch.setattr(mall, "ROW_CHUNK_ENTRIES", chunk)
    A = rng.integers(0, 5, (12, 30)).astype(float)
    B = rng.integers(0, 5, (12, 30)).astype(float)
    A[3] = 2.0  # constant row: rho is NaN
    rho = spearman(A, B)
    for t in range(12):
        want = np.nan if t == 3 else stats.spearmanr(A[t], B[t]).statistic
        np.testing.assert_allclose(rho[t], want, atol=1e-12)
    A[3] = np.arange(30.0)
    for k in (1, 7, 30):
        np.testing.assert_array_equal(topk_stability(A, B, k),
                                      [topk_stability(A[t], B[t], k) for t in range(12)])
    A, B = A + rng.standard_normal(A.shape), B + rng.standard_normal(B.shape) - 2
    np.testing.assert_array_equal(flip_rate(A, B, tau=0.2),
                                  [flip_rate(A[t], B[t], tau=0.2) for t in range(12)])
    A[5] = 1.0  # all tied: H is empty, and the message names the row whatever the chunking
    with pytest.raises(EmptySelectionError, match=r"\(row 5\)"):
        flip_rate(A, B)


def test_spearman_known_values_and_reference_formula():
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == 1.0
    assert spearman(x, -x) == -1.0
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(50), rng.standard_normal(50)  # no ties: A.4.2 formula holds
    assert spearman(a, b) == pytest.approx(spearman_naive(a, b), abs=1e-12)
    assert np.isnan(spearman(np.ones(5), x[:5]))
    np.testing.assert_allclose(spearman(np.vstack([x, x]), np.vstack([x, -x])), [1.0, -1.0])


def test_topk_stability_known_answers():
    a = np.array([5.0, 4, 3, 2, 1])
    b = a[::-1].copy()
    assert topk_stability(a, b, 2) == 0.0
    assert topk_stability(a, b, 3) == pytest.approx(1 / 3)  # {0,1,2} & {4,3,2}
    assert topk_stability(a, a, 5) == 1.0
    with pytest.raises(ParameterError):
        topk_stability(a, b, 6)


def test_mean_ci95_is_the_t_interval():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    r = mean_ci95(v)
    half = stats.t.ppf(0.975, 3) * v.std(ddof=1) / 2.0
    assert r["mean"] == 2.5 and r["half_width"] == pytest.approx(half, rel=1e-12)
    r = mean_ci95([1.0, np.nan, 3.0])
    assert r["n"] == 2 and r["n_nan"] == 1 and r["mean"] == 2.0


def test_intrinsic_sensitivity_definition():
    assert intrinsic_sensitivity(2.0, np.array([3.0, 4.0]), 0.1) == pytest.approx(1000.0)
    with pytest.raises(ParameterError):
        intrinsic_sensitivity(2.0, np.ones(3), 0.0)


def test_kernel_lipschitz_exact_for_a_linear_kernel():
    # k(x) = X x is linear, so the ratio along the top singular direction is sigma_max exactly
    rng = np.random.default_rng(2)
    X = rng.standard_normal((30, 6))
    sigma = np.linalg.norm(X, 2)
    est = kernel_lipschitz(lambda Q: Q @ X.T, X[:4], jacobian=lambda x: X, n_random=3)
    assert est.value == pytest.approx(sigma, rel=1e-10)
    np.testing.assert_allclose(est.jacobian_norm, sigma, rtol=1e-12)
    rand_only = kernel_lipschitz(lambda Q: Q @ X.T, X[:4], n_random=5)
    assert rand_only.value <= sigma * (1 + 1e-12)  # sampled directions: a lower bound



def test_lipschitz_profile_is_flat_for_a_smooth_kernel_and_not_for_a_jump():
    """lipschitz_by_step: the linear kernel's ratio is the same at every step (the same seeded
    directions); a kernel row that jumps by 1 across a hyperplane (like a ReLU eNTK entry
    where an activation flips) gives a ratio that grows like 1/h for steps that cross it."""
    from ntkcore.malleability import LIPSCHITZ_STEPS, lipschitz_by_step
    rng = np.random.default_rng(4)
    X = rng.standard_normal((20, 5))
    flat = lipschitz_by_step(lambda Q: Q @ X.T, X[:3], n_random=4)
    assert list(flat) == list(LIPSCHITZ_STEPS)
    values = np.array(list(flat.values()))
    np.testing.assert_allclose(values, values[0], rtol=1e-9)
    assert values[0] <= np.linalg.norm(X, 2) * (1 + 1e-12)
    w = np.array([1.0, 0, 0, 0, 0])
    x0 = np.array([[1e-4, 0.3, 0.2, 0.1, 0.0]])  # 1e-4 from the jump
    jump = lipschitz_by_step(lambda Q: (Q @ w > 0).astype(float)[:, None] * np.ones((1, 3)),
                             x0, steps=(1.0, 0.1, 0.01, 0.001), n_random=64)
    ratios = np.array(list(jump.values()))
    assert np.all(np.diff(ratios) > 0)  # smaller steps that cross the jump: larger ratio
    assert ratios[-1] == pytest.approx(np.sqrt(3) / 1e-3, rel=1e-12)

def test_complexity_by_decile_decomposes_the_rkhs_norm():
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((40, 5))
    K = Z @ Z.T
    alpha = rng.standard_normal((40, 2))
    scores = rng.standard_normal((3, 40))
    dec = complexity_by_decile(K, alpha, scores)
    assert dec.total_complexity == pytest.approx(np.trace(alpha.T @ K @ alpha), rel=1e-12)
    assert np.bincount(dec.group).tolist() == [4] * 10
    assert np.all(np.diff(dec.mean_influence) > 0)  # group 1 most harmful ... 10 most helpful
    assert dec.mean_complexity.sum() * 4 == pytest.approx(dec.total_complexity, rel=1e-12)


def test_kappa_identity_on_a_full_rank_X():
    from ntkcore.experiments.spectrum_exp import spectrum_report

    rng = np.random.default_rng(4)
    X = rng.standard_normal((20, 50))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    rep = spectrum_report(X)
    assert rep["full_rank"]
    # kappa ~ 10: kappa^3 ~ 1e3, eigen-solver error ~ kappa^3 * n * eps, far below 1e-9
    assert rep["kappa_cubed_relative_difference"] < 1e-9
    ev = np.linalg.eigvalsh(X @ X.T)
    assert rep["kappa"] == pytest.approx(ev[-1] / ev[0], rel=1e-10)


def test_complexity_without_the_kernel_matches_the_kernel_route():
    """K alpha = Y - lam alpha for the fit that produced alpha: same deciles without K."""
    from ntkcore.malleability import complexity_by_decile
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((40, 6))
    K = Z @ Z.T
    Y = np.eye(3)[rng.integers(0, 3, 40)]
    lam = 1e-2
    alpha = np.linalg.solve(K + lam * np.eye(40), Y)
    scores = rng.standard_normal((5, 40))
    a = complexity_by_decile(K, alpha, scores)
    b = complexity_by_decile(None, alpha, scores, Y=Y, lam=lam)
    np.testing.assert_allclose(b.complexity, a.complexity, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(b.group, a.group)


def test_complexity_without_the_kernel_allocates_nothing_n_by_n():
    """The route ``ntkcore influence`` takes: at n = 60 000 an n x n float64 array (even an
    untouched np.empty) is 26.8 GiB and failed the run after the solve."""
    import tracemalloc

    from ntkcore.malleability import complexity_by_decile
    n, C, T = 4000, 3, 2
    rng = np.random.default_rng(4)
    alpha = rng.standard_normal((n, C))
    Y = np.eye(C)[rng.integers(0, C, n)]
    scores = rng.standard_normal((T, n))
    tracemalloc.start()
    dec = complexity_by_decile(None, alpha, scores, Y=Y, lam=1e-3)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dec.complexity.shape == (n,)
    assert peak < 0.05 * 8 * n * n, f"peak {peak / 2**20:.1f} MiB"
