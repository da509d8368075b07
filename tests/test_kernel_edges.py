"""Edge cases of the kernel layer found in the session-7 review: an ``out`` that aliases
relu_ntk's inputs, scores that overflow, empty score inputs, a damaged or raced generated
kernel file, and the scoring kernel's leftover rows. Each test failed (wrong number, bare
exception or silent NaN) before its fix; results are checked against tests/reference.py or
the term-by-term formula."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import ntkcore as nc
from ntkcore import errors
from ntkcore.kernels import influence_topk_fused

from conftest import assert_close
from reference import relu_ntk_naive


def _scores_reference(B, dinv, alpha, R):
    U = B / dinv[None, :]
    return U * (U / 2 * np.sum(alpha ** 2, axis=1)[None, :] - R @ alpha.T)


# ------------------------------------------------------------------ relu_ntk out aliasing
@pytest.mark.parametrize("alias", ["X", "W", "X2"])
@pytest.mark.parametrize("train_a", [False, True])
def test_relu_ntk_out_sharing_an_input_is_refused(rng, alias, train_a):
    """out=X gave errors of 28 (349 with train_a) against the reference, silently."""
    X = rng.standard_normal((40, 40))
    W = rng.standard_normal((40, 40))
    X2 = rng.standard_normal((40, 40)) if alias == "X2" else None
    arrays = {"X": X, "W": W, "X2": X2}
    with pytest.raises(errors.ParameterError, match=f"shares memory with {alias}"):
        nc.relu_ntk(X, W, X2, train_a=train_a, out=arrays[alias])
    out = np.empty((40, 40))  # a separate array still works
    expected = relu_ntk_naive(X, W, X2, train_a=train_a)
    assert_close(nc.relu_ntk(X, W, X2, train_a=train_a, out=out), expected, what="relu_ntk")


# ------------------------------------------------------------------ scores that overflow
def _small_problem(rng):
    X = rng.standard_normal((25, 5))
    Xt = rng.standard_normal((4, 5))
    Y = np.eye(3)[rng.integers(0, 3, 25)]
    Yt = np.eye(3)[rng.integers(0, 3, 4)]
    return X @ X.T, Y, Xt @ X.T, Yt


@pytest.mark.parametrize("kw", [{}, {"top_k": 3}, {"top_k": 3, "keep_scores": False}])
def test_overflowing_scores_are_an_error_not_nan(rng, kw):
    """Y scaled by 1e160: 49 NaN scores came back with every A.8 check passing, and the
    top-k of an all-NaN row was reported as if it meant something."""
    K, Y, Kt, Yt = _small_problem(rng)
    with pytest.raises(errors.NonFiniteError, match="influence scores"):
        nc.loo_influence(K, Y * 1e160, Kt, Yt * 1e160, lam=0.1, **kw)
    big = nc.loo_influence(K, Y * 1e100, Kt, Yt * 1e100, lam=0.1, **kw)  # large but fine
    ref = nc.loo_influence(K, Y, Kt, Yt, lam=0.1, **kw)
    if big.scores is not None:
        assert_close(big.scores / 1e200, ref.scores, what="scores scale with Y^2")
    if big.top_helpful is not None:
        assert np.array_equal(big.top_helpful, ref.top_helpful)


def test_influence_scores_overflow_is_an_error(rng):
    B = rng.standard_normal((3, 5)) * 1e200
    with pytest.raises(errors.NonFiniteError, match="overflowed"):
        nc.influence_scores(B, np.ones(5), rng.standard_normal((5, 2)), np.ones((3, 2)))


# ------------------------------------------------------------------ empty inputs
@pytest.mark.parametrize("T,n", [(0, 37), (3, 0), (0, 0)])
def test_empty_score_inputs_give_empty_results(T, n):
    """A bare NumPy ValueError ('cannot reshape array of size 0') before."""
    args = (np.zeros((T, n)), np.ones(n), np.ones((n, 10)), np.ones((T, 10)))
    assert nc.influence_scores(*args).shape == (T, n)
    top = influence_topk_fused(*args, 3)
    assert top.helpful.shape == (T, min(3, n)) and top.harmful_scores.shape == (T, min(3, n))


# ------------------------------------------------------------------ generated kernel files
def test_damaged_generated_file_is_rewritten(tmp_path, monkeypatch):
    """A cached source that is not UTF-8 raised UnicodeDecodeError on every later run."""
    from ntkcore.kernels import _generated
    monkeypatch.setenv("NTKCORE_CACHE", str(tmp_path))
    path = _generated.write_source("score_damaged.py", "x = 1\n")
    path.write_bytes(b"\xff\xfe garbage")
    assert _generated.write_source("score_damaged.py", "x = 1\n") == path
    assert path.read_text() == "x = 1\n"


def _in_threads(count: int, fn):
    """``fn()`` from ``count`` threads released together; their results (any exception fails
    the test)."""
    barrier = threading.Barrier(count)
    results, failures = [], []

    def run():
        barrier.wait()
        try:
            results.append(fn())
        except Exception as exc:  # noqa: BLE001 -- collected and reported below
            failures.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    return results


def test_threads_writing_one_generated_file(tmp_path, monkeypatch):
    """Threads of one process shared one temp name: one renamed another's half-written file
    (a 0-byte kernel), or found its temp gone and gave up on the cache folder."""
    from ntkcore.kernels import _generated
    monkeypatch.setenv("NTKCORE_CACHE", str(tmp_path))
    text = "# " + "x" * 2_000_000 + "\ny = 2\n"
    results = _in_threads(12, lambda: _generated.write_source("race.py", text))
    assert set(results) == {tmp_path / "kernels" / "race.py"}
    assert (tmp_path / "kernels" / "race.py").read_text() == text
    assert not list((tmp_path / "kernels").glob(".*.tmp"))


def test_threads_loading_one_generated_kernel(tmp_path, monkeypatch, rng):
    from ntkcore.kernels import numba_tri
    from ntkcore.kernels.triangular import lower_gram_apply
    monkeypatch.setenv("NTKCORE_CACHE", str(tmp_path))
    numba_tri.tri_kernels.cache_clear()
    try:
        loaded = _in_threads(6, numba_tri.tri_kernels)
        assert all(len(kernels) == 3 and all(map(callable, kernels)) for kernels in loaded)
        assert len(list((tmp_path / "kernels").glob("tri_cols8_*.py"))) == 1
        Lt = np.tril(rng.standard_normal((11, 11)))
        V = rng.standard_normal((11, 3))
        assert_close(lower_gram_apply(Lt, V), Lt.T @ (Lt @ V), what="kernel")
    finally:
        numba_tri.tri_kernels.cache_clear()


# ------------------------------------------------------------------ leftover rows
@pytest.mark.parametrize("T,n", [(1, 33), (2, 16), (3, 1000), (7, 47), (5, 1)])
def test_scoring_rows_left_after_groups_of_four(rng, T, n):
    B, dinv = rng.standard_normal((T, n)), rng.random(n) + 0.5
    alpha, R = rng.standard_normal((n, 5)), rng.standard_normal((T, 5))
    assert_close(nc.influence_scores(B, dinv, alpha, R), _scores_reference(B, dinv, alpha, R),
                 what="scores")
