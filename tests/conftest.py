"""Shared test configuration: tolerances keyed by dtype (STYLE rule 6) and backend params."""

import os

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

# Relative tolerances by dtype, derived from machine epsilon: a few hundred ulps covers the
# reordering of sums between blocked/tiled code and the naive reference at the sizes we test.
RTOL = {np.float64: 500 * np.finfo(np.float64).eps, np.float32: 500 * np.finfo(np.float32).eps}


def assert_close(actual, expected, *, rtol=None, dtype=np.float64, what=""):
    """Max-abs error relative to max |expected| (scale-aware; robust where expected ~ 0)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    rtol = RTOL[dtype] if rtol is None else rtol
    scale = max(float(np.max(np.abs(expected))), np.finfo(np.float64).tiny)
    err = float(np.max(np.abs(actual - expected))) / scale if expected.size else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"
    return err


def krr_problem(rng, n=40, T=5, C=3, d=6):
    """A small well-posed LOO problem: K = X X^T + I (n x n), one-hot Y (n, C), the linear
    test kernel K_test = X_t X^T (T, n) and one-hot Y_test."""
    X = rng.standard_normal((n, d))
    Xt = rng.standard_normal((T, d))
    K = X @ X.T + np.eye(n)
    Y = np.eye(C)[rng.integers(0, C, n)]
    Yt = np.eye(C)[rng.integers(0, C, T)]
    return K, Y, Xt @ X.T, Yt


def _gpu():
    from ntkcore.backend import gpu_available
    return gpu_available()


requires_gpu = pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU with CuPy")


def _sim_skip_reason():
    """Why the CUDA simulator (tests/simgpu) cannot stand in for a GPU here, or None."""
    if _gpu():
        return "a real GPU is present: the 'cuda' params run there instead"
    from simgpu.kernels import compiler
    return None if compiler() else "no C++ compiler (g++) for the CUDA simulator"


requires_sim = pytest.mark.skipif(_sim_skip_reason() is not None,
                                  reason=str(_sim_skip_reason()))

# Backends a kernel or GPU-path test runs on: the CPU, a real GPU where one exists, and else
# the CUDA simulator (CuPy stand-in + the .cu sources compiled for the CPU; tests/simgpu).
BACKENDS = ["cpu", pytest.param("cuda", marks=requires_gpu),
            pytest.param("cuda-sim", marks=requires_sim)]


@pytest.fixture
def backend(request, monkeypatch):
    """Indirect ``backend`` param: "cpu" | "cuda"; "cuda-sim" installs the simulator and
    gives "cuda" (ntkcore then takes its GPU code paths on the stand-in)."""
    if request.param == "cuda-sim":
        from simgpu import cupy_shim
        cupy_shim.install(monkeypatch)
        return "cuda"
    return request.param


@pytest.fixture
def sim_cupy(monkeypatch):
    """The CuPy stand-in, installed (for tests of GPU paths that need no real GPU)."""
    if _sim_skip_reason() is not None:
        pytest.skip(_sim_skip_reason())
    from simgpu import cupy_shim
    return cupy_shim.install(monkeypatch)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _single_thread_torch():
    """Tiny test matrices: one torch thread is faster than two on a loaded 2-core machine."""
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


_single_thread_torch()
