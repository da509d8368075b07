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


def _gpu():
    from ntkcore.backend import gpu_available
    return gpu_available()


requires_gpu = pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU with CuPy")


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
