"""Public-API edge cases from the session-11 review, each checked against tests/reference.py."""

import numpy as np
import pytest

import ntkcore as nc

from reference import loo_influence_bruteforce


def _problem(rng, n=12, T=4, C=3):
    X = rng.standard_normal((n, 5))
    Xt = rng.standard_normal((T, 5))
    K = X @ X.T + np.eye(n)
    Y = np.eye(C)[rng.integers(0, C, n)]
    Yt = np.eye(C)[rng.integers(0, C, T)]
    return K, Y, Xt @ X.T, Yt


@pytest.mark.parametrize("solver,options", [("exact", {}), ("exact", {"storage": "packed"}),
                                            ("nystrom", {"rank": 12}), ("cg", {"tol": 1e-12})])
@pytest.mark.parametrize("keep_scores", [True, False])
def test_a_top_k_above_n_ranks_all_n_points(rng, solver, options, keep_scores):
    """top_k = 50 > n = 12 (documented): every row of top_helpful / top_harmful is a ranking
    of all n training points, largest / smallest score first, as the brute-force scores say."""
    K, Y, Kt, Yt = _problem(rng)
    ref = loo_influence_bruteforce(K, Y, Kt, Yt, 0.1)
    res = nc.loo_influence(K, Y, Kt, Yt, lam=0.1, solver=solver, top_k=50,
                           keep_scores=keep_scores, **options)
    assert res.top_helpful.shape == res.top_harmful.shape == (4, 12)
    for t in range(4):
        assert sorted(res.top_helpful[t]) == list(range(12))
        np.testing.assert_allclose(ref[t, res.top_helpful[t]], np.sort(ref[t])[::-1],
                                   rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ref[t, res.top_harmful[t]], np.sort(ref[t]), rtol=1e-6,
                                   atol=1e-12)
