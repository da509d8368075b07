"""Public-API edge cases from the session-11 review, each checked against tests/reference.py."""

import numpy as np
import pytest

import ntkcore as nc

from conftest import krr_problem
from reference import loo_influence_bruteforce


def _problem(rng, n=12, T=4, C=3):
    return krr_problem(rng, n, T, C, d=5)


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


# ---------------------------------------------------------------- scale: nothing silently wrong
def test_float32_packed_refuses_a_kernel_outside_float32s_range(rng):
    """K, K_test, lam scaled by 3e38 (or 1e-40): the float32 panels overflowed (a bare
    ZeroDivisionError) or went subnormal (LinAlgError); scaled by 1e38, a false "scores
    overflowed float64". Now a ParameterError up front; float64 stays exact there."""
    K, Y, Kt, Yt = _problem(rng)
    for s in (3e38, 1e38, 1e-40):
        with pytest.raises(nc.errors.ParameterError, match="float32.*rescale"):
            nc.loo_influence(K * s, Y, Kt * s, Yt, lam=0.1 * s, solver="exact",
                             precision="float32")
    got = nc.loo_influence(K * 1e38, Y, Kt * 1e38, Yt, lam=1e37, solver="exact",
                           storage="packed").scores
    np.testing.assert_allclose(got, loo_influence_bruteforce(K, Y, Kt, Yt, 0.1), rtol=1e-8,
                               atol=1e-12)
    # in range it runs, as an approximation of the float64 scores
    got32 = nc.loo_influence(K, Y, Kt, Yt, lam=0.1, solver="exact", precision="float32")
    np.testing.assert_allclose(got32.scores, loo_influence_bruteforce(K, Y, Kt, Yt, 0.1),
                               rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("solver", ["nystrom", "cg"])
def test_rpcholesky_landmarks_survive_a_trace_past_float64(rng, solver):
    """Every entry of K 1e306-ish finite, tr(K) = inf: the pivot weights w / tr(K) were all
    0 and rng.choice raised a bare ValueError. Scores are those of the unscaled problem."""
    X = rng.standard_normal((40, 5))
    K, Y = X @ X.T, rng.standard_normal((40, 2))
    with np.errstate(over="ignore"):
        assert np.isinf(np.trace(K * 1e306))
    ref = loo_influence_bruteforce(K, Y, K[:3], Y[:3], 1e-2)
    got = nc.loo_influence(K * 1e306, Y, K[:3] * 1e306, Y[:3], lam=1e304, solver=solver,
                           rank=40, **({"tol": 1e-10} if solver == "cg" else {}))
    np.testing.assert_allclose(got.scores, ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("storage", ["dense", "packed"])
def test_a_huge_lam_keeps_a_true_inversion_check(rng, storage):
    """lam = 1e308: lam V overflowed in the inversion probe, so inverse_residual_probe was
    NaN and checks['inverse_accurate'] False (with a RuntimeWarning) for right scores."""
    import warnings
    K, Y, Kt, Yt = _problem(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = nc.loo_influence(K, Y, Kt, Yt, lam=1e308, solver="exact", storage=storage)
    assert res.diagnostics["inverse_residual_probe"] < 1e-12
    assert res.diagnostics["checks"]["inverse_accurate"]


def test_spectrum_is_scale_free_for_tiny_and_large_inputs(rng):
    """X 1e-55 gave kappa(G^3) = inf, X 1e-165 kappa = inf and rank 0 ("G is singular") for a
    full-rank X; X 1e60 a NonFiniteError for a G^3 that is only an intermediate. The
    condition numbers do not depend on the scale; the eigenvalues scale by its square."""
    X = rng.standard_normal((4, 6))
    ref = nc.spectrum(X)
    assert abs(ref.kappa_cubed / ref.kappa ** 3 - 1) < 1e-9
    for s in (1e-55, 1e-165, 1e60, 1e150):
        got = nc.spectrum(X * s)
        assert got.rank == 4 and not got.notes
        assert abs(got.kappa / ref.kappa - 1) < 1e-12
        assert abs(got.kappa_cubed / ref.kappa_cubed - 1) < 1e-9
        np.testing.assert_allclose(got.eigenvalues, ref.eigenvalues * s * s, rtol=1e-12,
                                   atol=1e-300)
    with pytest.raises(nc.errors.NonFiniteError, match="overflowed"):
        nc.spectrum(X * 1e200)  # eigenvalues ~1e400: the result itself overflows


def test_infinite_ntk_and_attention_features_survive_tiny_and_huge_rows(rng):
    """Row norms of X 1e-200 underflowed to 0 (zero kernel rows, a RuntimeWarning) and those
    of X2 1e200 overflowed; attention_features of X 1e-120 underflowed to zero rows, and of
    X 1e200 (unit rows asked for) raised an overflow error."""
    import warnings
    from reference import rownorm
    Xa, Xb = rng.standard_normal((3, 3)), rng.standard_normal((2, 3))
    ref = nc.relu_ntk_infinite(Xa, Xb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(nc.relu_ntk_infinite(Xa * 1e-200, Xb * 1e200), ref,
                                   rtol=1e-13)
        np.testing.assert_allclose(nc.relu_ntk_infinite(Xb * 1e200, Xa * 1e-200), ref.T,
                                   rtol=1e-13)
        one_tiny_row = np.vstack([Xa, Xa[:1] * 1e-170])  # product with Xb: ~1e-170, finite
        np.testing.assert_allclose(nc.relu_ntk_infinite(one_tiny_row, Xb)[3] * 1e170, ref[0],
                                   rtol=1e-13)
        F = rownorm(Xa @ (Xa.T @ Xa))
        for s in (1e-120, 1e200):
            np.testing.assert_allclose(nc.attention_features(Xa * s), F, rtol=1e-13)


def test_intrinsic_sensitivity_never_divides_by_an_underflowed_lam_squared():
    from ntkcore.malleability import intrinsic_sensitivity
    assert intrinsic_sensitivity(2.0, [3.0, 4.0], 0.5) == pytest.approx(40.0, rel=1e-15)
    assert intrinsic_sensitivity(1.0, [1e300, 1e300], 1e10) == pytest.approx(
        np.sqrt(2) * 1e280, rel=1e-15)  # ||y||^2 overflows; ||y|| does not
    assert intrinsic_sensitivity(0.0, [1.0], 1e-300) == 0.0
    with pytest.raises(nc.errors.NonFiniteError, match="overflows"):
        intrinsic_sensitivity(1.0, [1.0], 1e-200)  # 1e400: was a bare ZeroDivisionError


# ---------------------------------------------------------------- inputs: typed, or just work
def test_torch_tensors_that_require_grad_are_read_like_any_tensor(rng):
    """NumPy refuses a tensor that requires grad: loo_influence, gram and spearman raised a
    bare RuntimeError. bfloat16 tensors were refused as "not a 2-D numeric array"."""
    torch = pytest.importorskip("torch")
    K, Y, Kt, Yt = _problem(rng)
    got = nc.loo_influence(torch.tensor(K, requires_grad=True), Y, Kt, Yt, lam=0.1).scores
    np.testing.assert_allclose(got, loo_influence_bruteforce(K, Y, Kt, Yt, 0.1), rtol=1e-8,
                               atol=1e-12)
    X = rng.standard_normal((5, 3))
    np.testing.assert_allclose(nc.gram(torch.tensor(X, requires_grad=True)), X @ X.T,
                               rtol=1e-14)
    assert nc.spearman(torch.arange(5.0, requires_grad=True), np.arange(5.0)) == 1.0
    half = torch.tensor(X).to(torch.bfloat16)
    np.testing.assert_array_equal(nc.gram(half), (lambda h: h @ h.T)(half.float().double()
                                                                      .numpy()))


def test_empirical_ntk_refuses_a_kernel_that_is_not_finite(rng):
    """Weights 1e20: J J^T overflowed float32 and came back as Inf/NaN without a word."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    X = rng.standard_normal((6, 4)).astype(np.float32)
    assert np.isfinite(nc.empirical_ntk(model, X)).all()
    with torch.no_grad():
        model[0].weight.mul_(1e20)
        model[1].weight.mul_(1e20)
    with pytest.raises(nc.errors.NonFiniteError, match="finite kernel"):
        nc.empirical_ntk(model, X)


def test_empirical_ntk_checks_its_flags_and_takes_numpy_budgets(rng):
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(4, 1).double()
    X = rng.standard_normal((6, 4))
    with pytest.raises(nc.errors.ParameterError, match="return_report"):
        nc.empirical_ntk(model, X, return_report="no")  # was a truthy string: a tuple back
    K = nc.empirical_ntk(model, X, memory_budget=np.int64(10 ** 8))  # was a ParameterError
    np.testing.assert_allclose(K, X @ X.T + 1.0, rtol=1e-12)


def test_operator_matmat_refuses_complex_and_strings(rng):
    """ReluNTKOperator.matmat(1j * ones) dropped the imaginary part (a ComplexWarning and
    zeros); strings gave a bare UFuncTypeError."""
    X = rng.standard_normal((6, 4))
    ops = [nc.ReluNTKOperator(X, rng.standard_normal((16, 4))), nc.DenseKernel(X @ X.T)]
    for op in ops:
        for V in (np.ones(6) * 1j, np.array(["a"] * 6)):
            with pytest.raises(nc.errors.ParameterError, match="real numbers"):
                op.matmat(V)


def test_cg_progress_must_be_a_flag(rng):
    K, Y, Kt, Yt = _problem(rng)
    for bad in (np.array([1, 2]), "yes"):
        with pytest.raises(nc.errors.ParameterError, match="progress"):
            nc.loo_influence(K, Y, Kt, Yt, lam=0.1, solver="cg", progress=bad)


def test_load_dataset_checks_root_and_download_types(tmp_path, monkeypatch):
    """root=123 raised a bare TypeError; download="no" counted as True and went to the
    network."""
    from ntkcore import _formats
    calls = []
    monkeypatch.setattr(_formats, "download", lambda *a, **k: calls.append(a))
    with pytest.raises(nc.errors.ParameterError, match="root"):
        nc.load_dataset("digits", root=123)
    with pytest.raises(nc.errors.ParameterError, match="download"):
        nc.load_dataset("mnist", download="no", root=tmp_path / "none")
    assert calls == []


@pytest.mark.parametrize("lam", [1e-1, 1e308])
def test_the_device_condition_estimate_survives_a_huge_lam(sim_cupy, rng, lam):
    """On the GPU the A.8 condition estimate runs block power iterations: at lam = 1e308
    A v overflowed and A^-1 v underflowed, a bare ZeroDivisionError. The unit blocks are now
    scaled by 1 / ||A||_1 and by lam; the estimate matches the true kappa(A)."""
    import warnings
    cp = sim_cupy
    K, Y, Kt, Yt = _problem(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = nc.loo_influence(cp.asarray(K), cp.asarray(Y), cp.asarray(Kt), cp.asarray(Yt),
                               lam=lam, solver="exact")
    ev = np.linalg.eigvalsh(K + lam * np.eye(len(K)))
    assert res.diagnostics["cond_A_estimate"] == pytest.approx(ev[-1] / ev[0], rel=1e-6)
    np.testing.assert_allclose(res.scores.get(), loo_influence_bruteforce(K, Y, Kt, Yt, lam),
                               rtol=1e-8, atol=1e-300)


def test_scale_free_routines_leave_ordinary_inputs_uncopied(rng, monkeypatch):
    """X within 2^+-48 is used as it is: the scaled copy (an n x d temporary, 1.2 GB at
    n = 50 000, d = 3072 on a GPU) is made only where the products could leave float64."""
    import importlib
    gram = importlib.import_module("ntkcore.gram")  # the module (nc.gram is the function)
    calls = []
    real = np.ldexp
    monkeypatch.setattr(np, "ldexp", lambda *a: calls.append(a[0].shape) or real(*a))
    X = rng.standard_normal((30, 8)) * 1e5
    nc.attention_features(X)
    nc.spectrum(X)
    assert calls == []
    nc.attention_features(X * 1e-30)  # 2^-83: scaled
    assert calls == [(30, 8)]
    assert gram._SAFE_EXPONENT == 48


def test_intrinsic_sensitivity_has_no_false_overflow():
    """L_K = 1e300, ||y|| = 1e-20, lam = 1e-10: S = 1e300, but L_K / lam overflowed first."""
    from ntkcore.malleability import intrinsic_sensitivity
    assert intrinsic_sensitivity(1e300, [1e-20], 1e-10) == pytest.approx(1e300, rel=1e-15)


@pytest.mark.parametrize("solver,options", [("exact", {}), ("exact", {"storage": "packed"}),
                                            ("nystrom", {"rank": 12}), ("cg", {"tol": 1e-12})])
def test_scores_overwrite_the_solves_own_b(rng, monkeypatch, solver, options):
    """B = K_test A^-1 is the solve's temporary: the scores are written over it (one T x n
    array fewer; 0.60-0.77 of the time on two cores, no write-allocate reads), and are
    still right."""
    import ntkcore.kernels as kernels
    seen = []
    real = kernels.influence_scores_fused

    def spy(B, *args, out=None, **kw):
        seen.append(out is B)
        return real(B, *args, out=out, **kw)
    monkeypatch.setattr(kernels, "influence_scores_fused", spy)
    K, Y, Kt, Yt = _problem(rng)
    Kt_before = Kt.copy()
    res = nc.loo_influence(K, Y, Kt, Yt, lam=0.1, solver=solver, **options)
    assert seen == [True]
    np.testing.assert_allclose(res.scores, loo_influence_bruteforce(K, Y, Kt, Yt, 0.1),
                               rtol=1e-8, atol=1e-12)
    np.testing.assert_array_equal(Kt, Kt_before)


def test_only_a_private_b_is_overwritten(rng):
    from ntkcore.influence import _private_result
    B = rng.standard_normal((4, 6))
    assert _private_result(B, None, rng.standard_normal((4, 6)))
    assert not _private_result(B, B[1:])  # shares memory with an input still read
    assert not _private_result(np.asfortranarray(B))
    ro = B.copy()
    ro.flags.writeable = False
    assert not _private_result(ro)
    assert not _private_result(B.astype(np.float16))
