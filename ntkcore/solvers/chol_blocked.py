"""Cholesky factorisation in place by block columns, its updates as large GEMMs (GPU potrf).

cuSOLVER's potrf reached 33 TFLOP/s at n = 50 000 on the H200 of bench/RESULTS.md, 0.68 of
the card's DGEMM rate, and CuPy's ``cholesky`` first copies the matrix. This is the
left-looking (Crout) block algorithm [B.12], in place on the lower triangle of A, one block
column J = [j0, j1) at a time:

    A[J, J]   -= L[J, :j0] L[J, :j0]^T          (syrk, b x b, inner j0)
    A[j1:, J] -= L[j1:, :j0] L[J, :j0]^T        (gemm, (n - j1) x b, inner j0; see DIAG_UPDATE)
    L[J, J]    = chol(A[J, J])                  (potrf on one b x b block)
    L[j1:, J]  = A[j1:, J] L[J, J]^-T           (trsm, (n - j1) x b)

Flops n^3/3 (1 + O(b/n)), almost all in n/b GEMMs whose inner dimension grows to n, the shape
cuBLAS runs nearest its peak. Every block is a strided view handed to cuBLAS / cuSOLVER
without a copy (``kernels.strided_blas``); the only temporaries are potrf's workspace. The
diagonal blocks' devInfo go to one device array, read once at the end. Backend-generic: on
NumPy views the same steps run through NumPy / SciPy, so the CPU tests hold it against LAPACK.
"""

from __future__ import annotations

import numpy as np

from ..backend import Backend
from ..kernels.strided_blas import gemm, potrf_lower, syrk_lower, trsm_lower

# columns per block: n/b GEMMs; the potrf / trsm on b columns are O(b/n). At n = 50 000 on the
# H200 (bench/gpu_factor.py, 2026-11-28) b = 1024 to 4096 with syrk all took 0.94 s; 4096 was
# the fastest by under 1 ms.
GPU_CHOL_BLOCK = 4096
#: How the diagonal block's update A[J, J] -= L[J, :j0] L[J, :j0]^T is done: "syrk" (its lower
#: triangle, b^2 j0 flops) or "gemm" (folded into the panel's GEMM, which then covers the whole
#: block: b^2 j0 more flops, b n^2 / 2 in all, but one call at GEMM speed per block column).
#: Which is faster depends on cuBLAS's syrk rate; bench/gpu_factor.py times both.
DIAG_UPDATE = "syrk"


def cholesky_blocked(be: Backend, A, *, block: int | None = None):
    """Lower Cholesky factor of symmetric positive definite A (n, n), in A's memory.

    Parameters
    ----------
    be : backend of A.
    A : (n, n) float64, C- or F-ordered; only its lower triangle is read. Overwritten: on
        return its lower triangle holds L (A = L L^T) and its strict upper triangle zeros.
    block : columns per block column (default ``GPU_CHOL_BLOCK``).

    Returns
    -------
    A, holding L.

    Raises
    ------
    numpy.linalg.LinAlgError when A is not positive definite (the leading minor that failed is
    named); A then holds a partial factor.
    """
    xp = be.xp
    n = A.shape[0]
    block = int(block or GPU_CHOL_BLOCK)
    starts = list(range(0, n, block))
    gpu = be.name == "cuda"
    info = xp.zeros(len(starts), dtype=np.int32) if gpu else None
    for slot, j0 in enumerate(starts):
        j1 = min(n, j0 + block)
        diag = A[j0:j1, j0:j1]
        if j0 > 0 and DIAG_UPDATE == "gemm":  # the strict upper part of A[J, J] is scratch
            gemm(A[j0:, j0:j1], A[j0:, :j0], A[j0:j1, :j0], trans_b=True, alpha=-1.0, beta=1.0)
        elif j0 > 0:
            syrk_lower(diag, A[j0:j1, :j0], alpha=-1.0, beta=1.0)
            if j1 < n:
                gemm(A[j1:, j0:j1], A[j1:, :j0], A[j0:j1, :j0], trans_b=True, alpha=-1.0,
                     beta=1.0)
        code = potrf_lower(diag, info, slot)
        if not gpu and code:
            _raise_not_pd(j0 + code)
        if j1 < n:
            trsm_lower(A[j1:, j0:j1], diag, side="right", trans=True)
    if gpu:
        codes = be.to_host(info)
        failed = np.flatnonzero(codes)
        if failed.size:
            _raise_not_pd(starts[failed[0]] + int(codes[failed[0]]))
        if n and not bool(xp.isfinite(A[n - 1, n - 1])):  # a NaN pivot need not set devInfo
            raise np.linalg.LinAlgError("the factor is not finite (NaN pivot): A is not "
                                        "positive definite or not finite")
    _zero_strict_upper(xp, A, block)
    return A


def _zero_strict_upper(xp, A, block: int):
    """Zeros above the diagonal, block row by block row (no n x n temporary)."""
    n = A.shape[0]
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        A[i0:i1, i1:] = 0
        A[i0:i1, i0:i1] = xp.tril(A[i0:i1, i0:i1])
    return A


def _raise_not_pd(minor: int):
    raise np.linalg.LinAlgError(f"the leading minor of order {minor} is not positive definite")


def cholesky_blocked_flops(n: int, block: int | None = None, diag_update: str | None = None
                           ) -> float:
    """Flops of :func:`cholesky_blocked`: n^3/3 + O(n^2 b), the potrf / trsm / syrk included
    (the "gemm" diagonal update adds b^2 j0 per block column, b n^2 / 2 in all)."""
    block = int(block or GPU_CHOL_BLOCK)
    diag = 2.0 if (diag_update or DIAG_UPDATE) == "gemm" else 1.0
    total = 0.0
    for j0 in range(0, n, block):
        b = min(n, j0 + block) - j0
        rest = n - j0 - b
        total += diag * b * b * j0 + 2.0 * rest * b * j0 + b ** 3 / 3 + float(b) ** 2 * rest
    return total


__all__ = ["cholesky_blocked", "cholesky_blocked_flops", "GPU_CHOL_BLOCK", "DIAG_UPDATE"]
