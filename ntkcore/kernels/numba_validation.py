"""Numba CPU kernel of the square-matrix check: ||K||_F^2 and ||K - K^T||_F^2 in one read of
K (the CPU twin of ``matrix_stats.cu``).

K is cut into TILE x TILE tiles; each tile pair (I, J) with I <= J is visited once. The lower
tile K[J, I] is read along its rows (its squares summed) and copied into a small buffer that
stays in L1; the upper tile K[I, J] is read along its rows, each entry meeting its mirror in a
column of the buffer (a strided read of L1, not of memory): both tiles of K are read
contiguously, and K once in all. The pairs, numbered row by row of the upper triangle of
tiles, are split into parts of equal pair counts (``bounds``, one parallel task each); each
part writes its own row of ``partial`` and the driver sums the rows in a fixed order, so the
result does not depend on the thread count.

Sums run in per-column accumulator arrays (``acc[c] += v * v`` vectorises without
reassociation; a single scalar sum would stay a serial chain without ``fastmath``).
``njit(parallel=True, cache=True)``, no fastmath, so IEEE arithmetic holds: a NaN or Inf
entry makes the sum of squares NaN or Inf (squares are >= 0: Inf never meets -Inf), which is
how the driver learns of it (:func:`ntkcore.kernels.validation.square_matrix_stats`). Validates
nothing: the driver checks shapes, dtypes and contiguity.

Measured on the 2-core machine (bench/bench_validation.py, bench/RESULTS_validation_draft.md):
about 2-2.7x the time of a one-thread ``K.sum()`` and 3.5-5.4x a parallel streaming read, at
n = 4000-10000. The tile reads (rows of 512 bytes, 64 rows apart), not the arithmetic, bound
it: larger tiles and register sums (``fastmath`` reassociation) measured within ~15 %.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

TILE = 64  # tile edge: the buffer (64 x 72 float64, 36 KB) stays in L1/L2
_PAD = 8   # buffer row padding: with a 512-byte row stride a column would fall in 8 cache sets


@njit(cache=True)
def _pair_of(q, nt):
    """(bi, bj) of the q-th tile pair of the upper triangle (bi <= bj < nt) numbered by rows."""
    bi = 0
    while q >= nt - bi:
        q -= nt - bi
        bi += 1
    return bi, bi + q


@njit(parallel=True, cache=True)
def square_stats(K, scale, bounds, partial):
    """partial[p] <- (sum of (s K_ij)^2, sum over i != j of (s K_ij - s K_ji)^2) over the
    entries of the tile pairs bounds[p] <= q < bounds[p + 1], s = ``scale``.

    K : (n, n) float64 or float32, C-contiguous (accumulated in float64).
    scale : float64, a power of two (exact), 1.0 but where the driver rescales.
    bounds : (parts + 1,) int64, increasing from 0 to nt (nt + 1) / 2, nt = ceil(n / TILE).
    partial : (parts, 2) float64, written.
    """
    n = K.shape[0]
    nt = (n + TILE - 1) // TILE
    for p in prange(bounds.shape[0] - 1):
        buf = np.zeros((TILE, TILE + _PAD), dtype=np.float64)
        fro = np.zeros(TILE)    # squares, by column within the tile
        upper = np.zeros(TILE)  # (K_ij - K_ji)^2, off-diagonal tile pairs: each {i, j} once
        diag = np.zeros(TILE)   # the same in diagonal tiles: each {i, j} twice
        q = bounds[p]
        bi, bj = _pair_of(q, nt) if q < bounds[p + 1] else (0, 0)
        while q < bounds[p + 1]:
            i0 = bi * TILE
            j0 = bj * TILE
            ni = min(n, i0 + TILE) - i0
            nj = min(n, j0 + TILE) - j0
            # lower tile K[J, I] (for I = J the tile itself): squares, and a copy into buf
            for r in range(nj):
                row = K[j0 + r, i0:i0 + ni]
                b = buf[r, :ni]
                for c in range(ni):
                    v = scale * np.float64(row[c])
                    fro[c] += v * v
                    b[c] = v
            # upper tile K[I, J] against buf's columns: K[i0 + r, j0 + c] meets K[j0 + c, i0 + r]
            if bi == bj:  # its squares are counted above
                for r in range(ni):
                    row = K[i0 + r, j0:j0 + nj]
                    for c in range(nj):
                        d = scale * np.float64(row[c]) - buf[c, r]
                        diag[c] += d * d
            else:
                for r in range(ni):
                    row = K[i0 + r, j0:j0 + nj]
                    for c in range(nj):
                        v = scale * np.float64(row[c])
                        fro[c] += v * v
                        d = v - buf[c, r]
                        upper[c] += d * d
            q += 1
            bj += 1
            if bj == nt:
                bi += 1
                bj = bi
        partial[p, 0] = fro.sum()
        partial[p, 1] = 2.0 * upper.sum() + diag.sum()
