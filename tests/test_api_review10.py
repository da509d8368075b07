"""Public-API edge cases found in the session-10 review. Each test failed (a wrong diagnostic,
an untyped exception or a false overflow) before its fix; numbers are checked against
tests/reference.py."""

import numpy as np
import pytest

import ntkcore as nc
from ntkcore import errors

from conftest import assert_close, krr_problem
from reference import loo_influence_bruteforce


def _problem(rng, n=40, T=5, C=3):
    return krr_problem(rng, n, T, C, d=6)


@pytest.mark.parametrize("solver,options", [("exact", {"storage": "packed"}),
                                            ("nystrom", {"rank": 40}), ("cg", {})])
def test_an_asymmetric_dense_kernel_operator_is_refused(rng, solver, options):
    """DenseKernel(K) with K[5, 0] off by 0.5: the packed solver read one triangle and
    reported symmetry_rel = 0 and checks['symmetric'] = True; Nystrom and CG never checked.
    A plain array K was already refused."""
    K, Y, Kt, Yt = _problem(rng)
    bad = K.copy()
    bad[5, 0] += 0.5
    with pytest.raises(errors.NotSymmetricError):
        nc.loo_influence(nc.DenseKernel(bad), Y, Kt, Yt, lam=0.1, solver=solver, **options)
    res = nc.loo_influence(nc.DenseKernel(K), Y, Kt, Yt, lam=0.1, solver=solver, **options)
    assert res.diagnostics["symmetry_rel"] == 0.0 and res.diagnostics["checks"]["symmetric"]
    if solver == "exact":
        assert_close(res.scores, loo_influence_bruteforce(K, Y, Kt, Yt, 0.1), rtol=1e-9,
                     what="packed scores")


@pytest.mark.parametrize("wrap", [False, True])
def test_overwrite_k_with_a_read_only_k_is_typed(rng, tmp_path, wrap):
    """overwrite_k=True with a read-only K (a flag, or np.load(mmap_mode='r')) raised a bare
    ValueError ('assignment destination is read-only') from inside the exact solver."""
    K, Y, Kt, Yt = _problem(rng)
    np.save(tmp_path / "K.npy", K)
    mapped = np.load(tmp_path / "K.npy", mmap_mode="r")
    frozen = K.copy()
    frozen.flags.writeable = False
    for ro in (mapped, frozen):
        arg = nc.DenseKernel(ro) if wrap else ro
        with pytest.raises(errors.ParameterError, match="read-only"):
            nc.loo_influence(arg, Y, Kt, Yt, lam=0.1, overwrite_k=True)
        res = nc.loo_influence(nc.DenseKernel(ro) if wrap else ro, Y, Kt, Yt, lam=0.1)
        assert_close(res.scores, loo_influence_bruteforce(K, Y, Kt, Yt, 0.1), rtol=1e-9,
                     what="without overwrite_k")


@pytest.mark.filterwarnings("error::RuntimeWarning")  # CG's residual norms overflowed too
@pytest.mark.parametrize("scale", [1e155, 1e-150])
@pytest.mark.parametrize("kw", [{}, {"top_k": 3}, {"solver": "cg"}])
def test_scores_do_not_change_when_k_and_lam_scale_together(rng, scale, kw):
    """K, K_test and lam times 1e155 leave the scores unchanged, but the CPU scorer folded
    1/diag(A^-1)^2 (1e310: inf) into ||alpha_i||^2 (1e-310) and reported an overflow."""
    K, Y, Kt, Yt = _problem(rng)
    ref = loo_influence_bruteforce(K, Y, Kt, Yt, 0.1)
    res = nc.loo_influence(K * scale, Y, Kt * scale, Yt, lam=0.1 * scale, **kw)
    assert_close(res.scores, ref, rtol=1e-6 if kw.get("solver") == "cg" else 1e-9,
                 what=f"scores at scale {scale:g}")


@pytest.mark.parametrize("solver,options", [
    ("nystrom", {"seed": -1}), ("cg", {"seed": 1.5}), ("exact", {"seed": "a", "diag_probes": 16}),
    ("nystrom", {"diag_correction": "no"}), ("exact", {"keep_scores": "no"}),
    ("exact", {"check": "no"})])
def test_bad_option_values_are_typed(rng, solver, options):
    """seed=-1 raised a bare ValueError and seed=1.5 or 'a' a TypeError; the strings 'no' for
    keep_scores, check or diag_correction were taken as True."""
    K, Y, Kt, Yt = _problem(rng)
    name = next(iter(options))
    with pytest.raises(errors.ParameterError, match=name):
        nc.loo_influence(K, Y, Kt, Yt, lam=0.1, solver=solver, **options)


@pytest.mark.parametrize("dtype", [np.float16, np.longdouble])
def test_scores_of_other_float_widths(rng, dtype):
    """float16 or long double B failed inside the Numba kernel (NotImplementedError,
    TypingError); such input is now scored in float64, like integers."""
    B = rng.standard_normal((4, 30))
    d, a, r = rng.random(30) + 0.5, rng.standard_normal((30, 2)), rng.standard_normal((4, 2))
    Bw = B.astype(dtype)
    want = nc.influence_scores(Bw.astype(np.float64), d, a, r)
    got = nc.influence_scores(Bw, d, a, r)
    assert got.dtype == np.float64
    assert_close(got, want, what=str(dtype))
    from ntkcore.kernels import influence_scores_fused
    assert_close(influence_scores_fused(Bw, d, a, r), want, what=f"kernel, {dtype}")


def test_cg_refuses_a_complex_right_hand_side(rng):
    """cg(A, b + 1j b) dropped the imaginary part with only a ComplexWarning and returned
    info = 0 with the solution of the real part."""
    from ntkcore.solvers.cg import cg
    K, _, _, _ = _problem(rng)
    b = rng.standard_normal(K.shape[0])
    with pytest.raises(errors.ParameterError, match="real numbers"):
        cg(K, b + 1j * b)
    x, info = cg(K, b, rtol=1e-12)
    assert info == 0
    assert_close(x, np.linalg.solve(K, b), rtol=1e-9, what="real b")


def test_cg_tolerance_beyond_float64_is_not_called_indefinite(rng):
    """tol=1e-200: the residual's r^T M r underflowed to exactly 0 and CG reported a
    breakdown, 'K has an eigenvalue below -lam' (NotPSDError), for a valid NTK."""
    X, Xt = rng.standard_normal((200, 8)), rng.standard_normal((5, 8))
    W = rng.standard_normal((8, 8))
    K, Kt = nc.relu_ntk(X, W), nc.relu_ntk(Xt, W, X)
    Y, Yt = np.eye(3)[rng.integers(0, 3, 200)], np.eye(3)[rng.integers(0, 3, 5)]
    with pytest.raises(errors.ConvergenceError, match="float64"):
        nc.loo_influence(K, Y, Kt, Yt, lam=1e-3, solver="cg", tol=1e-200)
