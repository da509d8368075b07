"""Library API findings of session 13; each test failed before its fix."""

import tracemalloc

import numpy as np


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
        tracemalloc.start()
        try:
            fit = exact_fit(K.copy(), Y, 0.1, overwrite_k=overwrite, check=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # the K passed in (one n x n) is counted in the peak too; slack: Y, alpha, probes
        assert peak <= (1 + extra + 0.1) * 8 * n * n, (overwrite, peak / (8 * n * n))
        assert np.all(fit.diag_inv > 0)


def test_a_machine_without_the_cuda_driver_does_not_import_cupy():
    """is_gpu_array(a NumPy array) and device="auto" imported CuPy (0.2 s, ~170 MB) on every
    CPU machine, only to find no GPU."""
    import ctypes
    import subprocess
    import sys

    import pytest
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("the CUDA driver is here: CuPy is rightly imported to count devices")
    except OSError:
        pass
    code = ("import sys, numpy as np\n"
            "from ntkcore.backend import is_gpu_array, resolve_device\n"
            "assert not is_gpu_array(np.zeros(2)) and resolve_device('auto') == 'cpu'\n"
            "print('cupy' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_digits_are_scikit_learns_without_importing_it():
    """load_dataset("digits") imported sklearn.datasets (0.75-0.94 s of the quickstart) to
    read a 1797-row file; it now reads that file itself, with the same values."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from ntkcore._formats import read_digits
    x, y = read_digits()
    bunch = load_digits()
    np.testing.assert_array_equal(x, bunch.data)
    np.testing.assert_array_equal(y, bunch.target)
    assert x.dtype == np.uint8 and y.dtype == np.int64
    code = ("import sys\nfrom ntkcore.data import load_dataset\nload_dataset('digits')\n"
            "print('sklearn' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
