"""Floors measured on this machine, in the run that uses them: the float64 GEMM rate and the
memory bandwidth of a streaming pass on all cores.

A benchmark's floor is (flops / ``gemm_rate``) or (bytes / ``stream_bandwidth``); ours / floor
is then the share of the machine's peak we reach, whatever library the alternative uses.
"""

from __future__ import annotations

import time

import numpy as np


def gemm_rate(dtype=np.float64, size: int = 4096, repeat: int = 3) -> float:
    """Best FLOP/s of one (size x size) @ (size x size) product (2 size^3 flops), warm."""
    a = np.random.default_rng(0).standard_normal((size, size)).astype(dtype)
    a @ a
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def _scale_kernel():
    import numba

    @numba.njit(parallel=True, cache=True)
    def scale_rows(B, c, S):  # S = c B: reads B once, writes S once, rows split over threads
        for i in numba.prange(B.shape[0]):
            for j in range(B.shape[1]):
                S[i, j] = c * B[i, j]
    return scale_rows


def stream_pass(B, S):
    """A callable timing one parallel streaming pass S = c B (Numba, all threads): the same
    bytes (read B, write S) and the same threads as the fused scoring kernel."""
    kern = _scale_kernel()
    kern(B[:2], 1.0001, S[:2])  # compile or load outside the timings
    return lambda: kern(B, 1.0001, S)


def stream_bandwidth(B, S, repeat: int = 5) -> float:
    """Best bytes/s of :func:`stream_pass` on B and S (2 B.nbytes per pass)."""
    run = stream_pass(B, S)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return 2 * B.nbytes / best
