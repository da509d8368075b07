"""Library API findings of session 13; each test failed before its fix."""

import tracemalloc

import numpy as np
import pytest


def _peak_bytes(fn):
    """(fn(), the peak bytes traced while it ran, allocations before it excluded)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _imported_after(code: str, module: str) -> bool:
    """Whether ``module`` is in sys.modules after ``code`` ran in a fresh interpreter."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\n"
                           f"print({module!r} in sys.modules)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip() == "True"


def _spd(n, seed=0):
    X = np.random.default_rng(seed).standard_normal((n, 40))
    return X @ X.T


def test_the_cpu_cholesky_factors_in_place_when_allowed():
    """SciPy copied a C-order A into Fortran order before potrf: 'overwrite' factored a copy,
    one more n x n array than the memory plan counts."""
    from ntkcore.backend import get_backend
    A = _spd(300) + 0.1 * np.eye(300)
    want = np.linalg.cholesky(A)
    L = get_backend("cpu").cholesky(A, overwrite=True)
    assert np.shares_memory(L, A)
    np.testing.assert_allclose(L, want, rtol=1e-12, atol=1e-12)


def test_the_exact_solver_peaks_at_the_copies_its_plan_counts():
    """exact_bytes plans EXACT_COPIES (K and one working array) n x n arrays; the hidden
    Fortran copy made it three at the peak."""
    from ntkcore.solvers.auto import EXACT_COPIES
    from ntkcore.solvers.exact import exact_fit
    n = 800
    K, Y = _spd(n), np.random.default_rng(1).standard_normal((n, 3))
    for overwrite, extra in ((False, EXACT_COPIES - 1), (True, EXACT_COPIES - 2)):
        fit, peak = _peak_bytes(lambda: exact_fit(K.copy(), Y, 0.1, overwrite_k=overwrite,
                                                  check=False))
        # the K passed in (one n x n) is counted in the peak too; slack: Y, alpha, probes
        assert peak <= (1 + extra + 0.1) * 8 * n * n, (overwrite, peak / (8 * n * n))
        assert np.all(fit.diag_inv > 0)


def test_a_machine_without_the_cuda_driver_does_not_import_cupy():
    """is_gpu_array(a NumPy array) and device="auto" imported CuPy (0.2 s, ~170 MB) on every
    CPU machine, only to find no GPU."""
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("the CUDA driver is here: CuPy is rightly imported to count devices")
    except OSError:
        pass
    assert not _imported_after("import numpy as np\n"
                               "from ntkcore.backend import is_gpu_array, resolve_device\n"
                               "assert not is_gpu_array(np.zeros(2))\n"
                               "assert resolve_device('auto') == 'cpu'", "cupy")


def test_digits_are_scikit_learns_without_importing_it():
    """load_dataset("digits") imported sklearn.datasets (0.75-0.94 s of the quickstart) to
    read a 1797-row file; it now reads that file itself, with the same values."""
    from sklearn.datasets import load_digits

    from ntkcore._formats import read_digits
    x, y = read_digits()
    bunch = load_digits()
    np.testing.assert_array_equal(x, bunch.data)
    np.testing.assert_array_equal(y, bunch.target)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert not _imported_after("from ntkcore.data import load_dataset\n"
                               "load_dataset('digits')", "sklearn")


def _rbf_problem(n=300, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    sq = (X ** 2).sum(1)
    K = np.exp(-0.5 * np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0))
    Y = np.eye(3)[rng.integers(0, 3, n)]
    return K, Y


def test_cg_atol_does_not_cut_the_probe_solves_short():
    """cg_fit passed its atol to the 64 probe solves too: a loose atol stopped them early and
    biased diag(A^-1) (16 % at n = 600 in the review) while the reported standard error stayed
    small. The probe columns run on rtol alone, so their estimate is the same whatever atol is
    (up to rounding: products over other column sets round differently, ~1e-9 here)."""
    from ntkcore.solvers.cg import cg_fit
    from ntkcore.solvers.operator import DenseKernel
    K, Y = _rbf_problem()
    n = K.shape[0]
    tight = cg_fit(DenseKernel(K), Y, 1e-2, tol=1e-6, rank=60, progress=False)
    loose = cg_fit(DenseKernel(K), Y, 1e-2, tol=1e-6, atol=0.5 * np.sqrt(n), rank=60,
                   progress=False)
    np.testing.assert_allclose(loose.diag_inv, tight.diag_inv, rtol=1e-6)
    assert loose.diagnostics["cg_probe_atol"] == 0.0


def test_a_slow_cg_solve_is_not_stopped_as_stagnated_when_maxiter_allows_it():
    """The stagnation window was a fixed 100 iterations: a solve that converges in ~1100
    (preconditioned CG's residual is not monotone) was stopped after 102 as "stagnated", and
    the advice to raise maxiter could not help. The window is now a quarter of maxiter."""
    from ntkcore.solvers.cg import cg_fit
    from ntkcore.solvers.operator import DenseKernel
    rng = np.random.default_rng(6)
    X = rng.standard_normal((800, 4))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    sq = (X ** 2).sum(1)
    K = np.exp(-2.0 * np.maximum(sq[:, None] + sq[None, :] - 2 * X @ X.T, 0))
    K = 0.5 * (K + K.T)
    Y = np.eye(3)[rng.integers(0, 3, 800)]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the noisy-diag warning of rank 50
        fit = cg_fit(DenseKernel(K), Y, 1e-4, tol=1e-2, rank=50, maxiter=5000,
                     progress=False)
    assert fit.diagnostics["cg_fit_converged"]
    A = K + 1e-4 * np.eye(800)
    res = np.linalg.norm(Y - A @ fit.alpha, axis=0) / np.linalg.norm(Y, axis=0)
    assert res.max() <= 1e-2


def test_a_few_diag_probes_in_the_packed_solver_warn():
    """diag_probes=2..16 gave scores off by 0.5-400x with no warning (1 / diag^2 of a
    two-probe mean has no finite expectation); the CG estimator already warned."""
    import warnings

    import ntkcore as nc
    from ntkcore.solvers.operator import ReluNTKOperator
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 10))
    Xt = rng.standard_normal((4, 10))
    W = rng.standard_normal((64, 10))
    Y = np.eye(3)[rng.integers(0, 3, 120)]
    Yt = np.eye(3)[rng.integers(0, 3, 4)]
    op = ReluNTKOperator(X, W)
    Kt = op.cross(Xt)
    for probes, noisy in ((4, True), (2000, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nc.loo_influence(op, Y, Kt, Yt, lam=0.1, solver="exact", diag_probes=probes)
        said = [str(w.message) for w in caught if "diag(A^-1) estimate is noisy" in str(w.message)]
        assert bool(said) == noisy, (probes, said)
        if noisy:
            assert "raise diag_probes" in said[0] and "800 probes" in said[0]


def test_the_cg_right_solve_keeps_to_its_room_and_reports_the_worst_chunk():
    """The right solve kept every chunk's result (solution blocks too) until the end, and
    block CG holds ~11 (n, s) arrays where CG_ARRAYS counted 8: its peak above the output was
    1.4-12x the room it was given. Its true-residual maximum came from one chunk only."""
    import gc
    import warnings

    from ntkcore.solvers.cg import CG_ARRAYS, cg_fit
    from ntkcore.solvers.operator import DenseKernel
    K, Y = _rbf_problem(n=600, d=6, seed=2)
    rng = np.random.default_rng(3)
    Kt = K[rng.choice(600, 60, replace=False)] * rng.uniform(0.5, 1.5, (60, 1))
    cols = 6
    room = CG_ARRAYS * 8 * 600 * cols
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit = cg_fit(DenseKernel(K), Y, 1e-3, rank=100, tol=1e-4, memory_budget=room,
                     progress=False)
    gc.collect()
    Z, peak = _peak_bytes(lambda: fit.right_solve(Kt))
    assert fit.diagnostics["cg_right_solve_chunks"] == 10
    assert peak - Z.nbytes <= room, (peak - Z.nbytes) / room
    A = K + 1e-3 * np.eye(600)
    true = np.linalg.norm(Kt.T - A @ Z.T, axis=0) / np.linalg.norm(Kt, axis=1)
    assert fit.diagnostics["cg_right_solve_true_residual_max"] == pytest.approx(true.max(),
                                                                                 rel=1e-6)


def test_the_packed_exact_solver_can_prove_psd_as_the_dense_one_does():
    """Packed storage reported psd "inconclusive" on every PSD kernel: it had only the
    subspace estimate, which approaches lambda_min from above and can disprove PSD but never
    prove it. It now has the dense path's pocon-style bound 1 / ||A^-1||_1 - lam."""
    import ntkcore as nc
    from ntkcore.solvers.operator import ReluNTKOperator
    rng = np.random.default_rng(4)
    X = rng.standard_normal((300, 12))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    W = rng.standard_normal((128, 12))
    op = ReluNTKOperator(X, W)
    Kt = op.cross(X[:5] + 0.1)
    Y = np.eye(3)[rng.integers(0, 3, 300)]
    packed = nc.loo_influence(op, Y, Kt, Y[:5], lam=1e-3, solver="exact", storage="packed")
    dense = nc.loo_influence(op.dense(), Y, Kt, Y[:5], lam=1e-3, solver="exact")
    assert packed.diagnostics["checks"]["psd"] is True
    assert packed.diagnostics["lambda_min_K_lower_bound"] == pytest.approx(
        dense.diagnostics["lambda_min_K_lower_bound"], rel=1e-8)
    from ntkcore.solvers.exact_packed import _inverse_norm1
    A = op.dense() + 1e-3 * np.eye(300)
    exact = np.abs(np.linalg.inv(A)).sum(axis=0).max()
    est = _inverse_norm1(lambda V: np.linalg.solve(A, V), 300)
    assert exact / 3 <= est <= exact * (1 + 1e-12)  # from below, as pocon's estimate


def test_the_cpu_right_solve_makes_no_copy_besides_its_result():
    """K_test A^-1 copied K_test into Fortran order, made Z and then a C-order copy of it:
    2 (T, n) arrays at the peak besides the input, where one (the result) is needed."""
    from ntkcore.solvers.exact import exact_fit
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 30))
    K = X @ X.T
    Kt = rng.standard_normal((400, 30)) @ X.T
    fit = exact_fit(K.copy(), rng.standard_normal((500, 2)), 0.1, check=False)
    B, peak = _peak_bytes(lambda: fit.right_solve(Kt))
    assert peak <= 1.1 * Kt.nbytes, peak / Kt.nbytes
    assert B.flags.c_contiguous and B.shape == Kt.shape
    want = np.linalg.solve(K + 0.1 * np.eye(500), Kt.T).T
    np.testing.assert_allclose(B, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


# ------------------------------------------------ second review of this session's changes

def test_an_estimate_that_disproves_psd_outranks_the_estimated_bound():
    """Hager's ||A^-1||_1 estimate can fall below ||A^-1||_2 for an A built against it, so
    the packed solver's new bound said psd=True for lambda_min(K) = -0.1 while its subspace
    estimate (-0.0995, from above: a disproof) said otherwise."""
    import ntkcore as nc
    from ntkcore.influence import _psd_from_estimates
    from ntkcore.solvers.operator import DenseKernel
    n = 64
    one = np.ones(n) / np.sqrt(n)
    v = np.zeros(n)
    v[[0, 1]], v[[2, 3]] = 0.5, -0.5  # orthogonal to the estimator's two start vectors
    K = 0.5 * np.outer(one, one) + (np.eye(n) - np.outer(one, one)) - 1.1 * np.outer(v, v)
    rng = np.random.default_rng(0)
    Y = np.eye(2)[rng.integers(0, 2, n)]
    res = nc.loo_influence(DenseKernel(K), Y, rng.standard_normal((3, n)), Y[:3], lam=1.0,
                           solver="exact", storage="packed")
    d = res.diagnostics
    assert d["checks"]["psd"] is False
    assert d["lambda_min_K_lower_bound"] <= d["lambda_min_K_estimate"] + 1e-12
    assert _psd_from_estimates({"lambda_min_K_estimate": -0.1, "A_norm_1": 1.0,
                                "lambda_min_K_rel_lower_bound": 0.5}) is False


def test_block_cg_takes_an_integer_right_hand_side():
    """The in-place column norms divided an integer B in place (UFuncTypeError)."""
    from ntkcore.solvers.cg import block_cg
    A = _spd(50) + np.eye(50)
    B = np.arange(100, dtype=np.int64).reshape(50, 2) % 7
    res = block_cg(A, B, rtol=1e-10)
    assert res.info == 0
    np.testing.assert_allclose(A @ res.X, B, rtol=1e-7, atol=1e-7)


def test_noisy_diagonal_warnings_point_at_the_callers_line():
    """The packed solver's warning pointed inside ntkcore (one frame more than CG's)."""
    import warnings

    import ntkcore as nc
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 10))
    K, Kt = X @ X.T / 10, rng.standard_normal((3, 10)) @ X.T / 10
    Y = np.eye(2)[rng.integers(0, 2, 200)]
    for kw in (dict(solver="cg", probes=2, rank=5), dict(solver="exact", diag_probes=2)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nc.loo_influence(K, Y, Kt, Y[:3], lam=1e-2, **kw)
        noisy = [w for w in caught if "noisy" in str(w.message)]
        assert noisy and all(w.filename == __file__ for w in noisy), (kw, [
            (w.filename, w.lineno) for w in noisy])


def test_the_cpu_cholesky_leaves_a_read_only_matrix_alone():
    from ntkcore.backend import get_backend
    A = _spd(40) + np.eye(40)
    A.setflags(write=False)
    before = A.copy()
    L = get_backend("cpu").cholesky(A, overwrite=True)
    np.testing.assert_array_equal(A, before)
    np.testing.assert_allclose(L @ L.T, A, rtol=1e-12, atol=1e-12)


def test_the_dense_paths_estimated_bound_is_capped_at_the_subspace_estimate(monkeypatch):
    """Above EXACT_SPECTRUM_MAX_N the dense path reported pocon's "lower bound" 0.5 for a K
    whose lambda_min is -0.1 (its subspace estimate said -0.0995; the verdict was right)."""
    import ntkcore as nc
    from ntkcore.solvers import exact
    monkeypatch.setattr(exact, "EXACT_SPECTRUM_MAX_N", 0)
    n = 64
    one = np.ones(n) / np.sqrt(n)
    v = np.zeros(n)
    v[[0, 1]], v[[2, 3]] = 0.5, -0.5
    K = 0.5 * np.outer(one, one) + (np.eye(n) - np.outer(one, one)) - 1.1 * np.outer(v, v)
    rng = np.random.default_rng(0)
    Y = np.eye(2)[rng.integers(0, 2, n)]
    d = nc.loo_influence(K, Y, rng.standard_normal((3, n)), Y[:3], lam=1.0,
                         solver="exact").diagnostics
    assert d["checks"]["psd"] is False
    assert d["lambda_min_K_lower_bound"] <= d["lambda_min_K_estimate"]
    assert d["lambda_min_K_rel_lower_bound"] == pytest.approx(
        d["lambda_min_K_lower_bound"] / d["A_norm_1"])
