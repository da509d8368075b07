"""Products with a few columns for the A.8 checks, one read of the big matrix per pass.

* :func:`lower_gram_apply` — A^-1 V = L^-T (L^-1 V) from the inverse Cholesky factor
  (subspace iteration for lambda_min(K), the inverse-residual probes).
* :func:`abs_row_sums_and_product` — ||K||_1 (row sums of |K|, K symmetric) and K V in one
  read of K (the 1-norm for pocon and the probes A V, taken before K may be overwritten).

NumPy inputs run the Numba kernels of :mod:`.numba_tri` (eight columns a call, the matrix
streamed once per pass: ~8 GB/s on the 2-core machine of bench/RESULTS.md, where OpenBLAS's
8-column GEMM reaches ~6 and a plain streaming pass ~30); CuPy inputs run cuBLAS GEMMs.
"""

from __future__ import annotations

import numpy as np

from ..backend import backend_for, is_gpu_array

#: rows of the triangle are split into this many parts per thread (equal areas), for balance
_PARTS_PER_THREAD = 4


def _numba_ready(M) -> bool:
    return (isinstance(M, np.ndarray) and M.dtype == np.float64 and M.ndim == 2
            and M.flags.c_contiguous)


def _column_blocks(V):
    """(k0, k1, VT) per block of 8 columns of V (n, k), VT (8, n) C order, zero padded."""
    from .numba_tri import COLS
    n, k = V.shape
    for k0 in range(0, k, COLS):
        k1 = min(k, k0 + COLS)
        VT = np.zeros((COLS, n))
        VT[:k1 - k0] = V[:, k0:k1].T
        yield k0, k1, VT


def _area_bounds(n: int, parts: int, *, upper: bool = False) -> np.ndarray:
    """Row boundaries splitting a triangle of an n x n matrix into parts of equal area (the
    lower triangle's rows grow with i, the upper's shrink)."""
    frac = np.arange(parts + 1) / parts
    cut = np.sqrt(frac) if not upper else 1.0 - np.sqrt(1.0 - frac)
    bounds = np.minimum(n, np.ceil(n * cut)).astype(np.int64)
    bounds[0], bounds[-1] = 0, n
    return bounds


def lower_gram_apply(Linv, V):
    """A^-1 V = Linv^T (Linv V), Linv (n, n) lower triangular (its upper part is not read on
    the CPU), V (n, k). Returns (n, k) on V's device.

    CPU: C-ordered Linv runs the lower-triangle kernel; F-ordered Linv (LAPACK's trtri
    output) runs the upper-triangle kernel on Linv^T, a C-ordered view: no copy either way.
    """
    if is_gpu_array(Linv):
        return Linv.T @ (Linv @ V)
    Linv = np.asarray(Linv)
    V = np.asarray(V, dtype=np.float64).reshape(Linv.shape[0], -1)
    if _numba_ready(Linv):
        matrix, upper = Linv, False
    elif _numba_ready(Linv.T):
        matrix, upper = Linv.T, True
    else:
        return Linv.T @ (Linv @ V)
    import numba

    from .numba_tri import COLS, tri_kernels
    lower_kernel, upper_kernel, _ = tri_kernels()
    n = Linv.shape[0]
    parts = _PARTS_PER_THREAD * numba.get_num_threads()
    bounds = _area_bounds(n, parts, upper=upper)
    partial = np.empty((parts, COLS, n))
    out = np.empty_like(V)
    outT = np.empty((COLS, n))
    for k0, k1, VT in _column_blocks(V):
        (upper_kernel if upper else lower_kernel)(matrix, VT, outT, bounds, partial)
        out[:, k0:k1] = outT[:k1 - k0].T
    return out


def _abs_row_sums_tiled(K, tile: int = 1024):
    """sum_j |K[i, j]| by blocks of rows: no temporary the size of K (NumPy or CuPy)."""
    xp = backend_for(K).xp
    out = xp.empty(K.shape[0], dtype=K.dtype)
    for i0 in range(0, K.shape[0], tile):
        out[i0:i0 + tile] = abs(K[i0:i0 + tile]).sum(axis=1)
    return out


def abs_row_sums_and_product(K, V):
    """(sum_j |K[i, j]| : (n,), K V : (n, k)) for K (n, m), V (m, k): one read of K per eight
    columns of V on the CPU (Numba), row blocks and a GEMM otherwise (no temporary the size of
    K). Returns arrays on K's device."""
    if is_gpu_array(K) or not _numba_ready(K):
        return _abs_row_sums_tiled(K), K @ V
    V = np.asarray(V, dtype=np.float64).reshape(K.shape[1], -1)
    from .numba_tri import COLS, tri_kernels
    _, _, rows_pass = tri_kernels()
    n = K.shape[0]
    out = np.empty((n, V.shape[1]))
    rowabs = np.empty(n)
    YT = np.empty((COLS, n))
    for k0, k1, VT in _column_blocks(V):
        rows_pass(K, VT, YT, rowabs)
        out[:, k0:k1] = YT[:k1 - k0].T
    return rowabs, out
