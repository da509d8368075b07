"""Inverse of a lower-triangular matrix by block rows, in GEMMs (the GPU's trtri).

CuPy has no triangular inverse (cuSOLVER's trtri is not wrapped), and a trsm against the
identity, L X = I, costs n^3 flops because trsm cannot know that I is triangular. This
computes X = L^-1 at about the triangular count, n^3/3 (1 + 1.5 b / n) flops, with
the block-row recurrence of X L = I, read row block by row block [B.12]:

    X[I, I]   = L[I, I]^-1
    X[I, :i0] = -L[I, I]^-1  sum_{J < I} L[I, J:I] X[J:I, J]

Block row I needs only the rows of X above it, and each product touches only the nonzero
(lower) part of X, one block column J at a time: sum over I, J of 2 b^2 (i0 - j0) flops is
n^3/3. Every step is a GEMM or a triangular solve with b rows, the shapes cuBLAS runs near its
peak. Used by the exact solver on the GPU; backend-generic, so the CPU tests hold it against
LAPACK's trtri.
"""

from __future__ import annotations

from ..backend import Backend
from ..kernels.strided_blas import gemm, has_blas_layout, trsm_lower

GPU_INV_BLOCK = 2048  # rows per block: 1.5 b / n over n^3/3 flops (6 % at n = 50 000), n^2/2b^2 GEMMs
#: The exact solver's GPU inverse: "rows" (:func:`tri_inv_blocked`) or "columns"
#: (:func:`tri_inv_columns`). At n = 50 000 on the H200 of bench/RESULTS.md (gpu_factor,
#: 2026-11-28) rows took 0.91-0.97 s at b = 1024-4096 (0.91 s, 48.5 TFLOP/s, at 2048) and
#: columns 0.99-1.17 s.
GPU_INV_METHOD = "rows"
RIGHT_APPLY_BLOCK = 2048  # columns per GEMM of right_apply_inverse: b / n extra flops (4 %)


def tri_inv_blocked(be: Backend, L, *, out=None, block: int | None = None):
    """X = L^-1 for lower-triangular L (n, n); strictly upper part of X zero.

    Every step works on views of L and X in place (``kernels.strided_blas``): the GEMMs write
    their block of X directly (alpha = -1), the b-row solves run on X's own rows, and no
    operand is copied (CuPy's ``matmul`` would copy each strided view it is given).

    Parameters
    ----------
    be : backend of L.
    L : (n, n) float lower-triangular (only the lower triangle is read).
    out : (n, n) array to write X into (memory that is free to destroy, not L's); default new.
    block : rows per block row (default ``GPU_INV_BLOCK``).

    Returns
    -------
    X : ``out`` (or a new array) holding L^-1.
    """
    xp = be.xp
    n = L.shape[0]
    block = int(block or GPU_INV_BLOCK)
    X = xp.empty((n, n), dtype=L.dtype) if out is None else out
    X.fill(0)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        Lii = L[i0:i1, i0:i1]
        d = xp.arange(i0, i1)
        X[d, d] = 1
        trsm_lower(X[i0:i1, i0:i1], Lii)  # X[I, I] = L[I, I]^-1
        if i0 == 0:
            continue
        for j0 in range(0, i0, block):  # X[I, :I] = -L[I, :I] X[:I, :I], lower blocks only
            j1 = min(i0, j0 + block)
            gemm(X[i0:i1, j0:j1], L[i0:i1, j0:i0], X[j0:i0, j0:j1], alpha=-1.0)
        trsm_lower(X[i0:i1, :i0], Lii)
    return X


def tri_inv_columns(be: Backend, L, *, out=None, block: int | None = None):
    """X = L^-1 by block columns, one trsm each: X[j0:, J] = L[j0:, j0:]^-1 [I; 0].

    The other way to the same X as :func:`tri_inv_blocked`: n/b calls instead of n^2/2b^2,
    each a solve with a tall triangle, about n^3/3 (1 + 1.5 b / n) flops in all (a trsm cannot
    skip the zero rows under the identity block). Which of the two runs faster is a property
    of cuBLAS's trsm on the card; ``bench/gpu_factor.py`` times both. Same parameters and
    result as :func:`tri_inv_blocked`.
    """
    xp = be.xp
    n = L.shape[0]
    block = int(block or GPU_INV_BLOCK)
    X = xp.empty((n, n), dtype=L.dtype) if out is None else out
    X.fill(0)
    d = xp.arange(n)
    X[d, d] = 1
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        trsm_lower(X[j0:, j0:j1], L[j0:, j0:])
    return X


def tri_inv_columns_flops(n: int, block: int | None = None) -> float:
    """Flops of :func:`tri_inv_columns`: sum over block columns of (n - j0)^2 b."""
    block = int(block or GPU_INV_BLOCK)
    return float(sum((n - j0) ** 2 * (min(n, j0 + block) - j0) for j0 in range(0, n, block)))


def right_apply_inverse(be: Backend, K_test, X, *, block: int | None = None):
    """(T, n) K_test X^T X for X = L^-1 lower triangular (n, n): K_test A^-1 with A = L L^T
    [B.12], by block-column GEMMs over the lower triangle of X, 2 T n^2 (1 + b / n) flops
    (``right_apply_flops``). The GEMMs read X's diagonal b x b blocks whole, so X's strict
    upper triangle must be zero inside them (``tri_inv_blocked`` / ``tri_inv_columns`` leave
    it so); above the diagonal blocks X is not read.

    Z = K_test X^T, block column J = [j0, j1):  Z[:, J] = K_test[:, :j1] X[J, :j1]^T
    W = Z X,                                    W[:, J] = Z[:, j0:] X[j0:, J]
    (X[J, j1:] and X[:j0, J] are zero). W is written over Z in increasing J through a (T, b)
    buffer, since later blocks read Z only from column j1 on: one new (T, n) array in all. The
    GPU's right solve: the flops of two trsm with L, as GEMMs; at n = 50 000, T = 10 000 on the
    H200 of bench/RESULTS.md it took 0.98-0.99 s where the two trsm took 1.07 s. K_test is not
    modified.
    """
    xp = be.xp
    T, n = K_test.shape
    block = int(block or RIGHT_APPLY_BLOCK)
    if K_test.dtype != X.dtype or not has_blas_layout(K_test):
        # cuBLAS reads X's dtype, through one unit stride and a positive leading dimension
        # (a reversed, broadcast or no-unit-stride view, even 1 x 1, is copied)
        K_test = K_test.astype(X.dtype, order="C", copy=True)
    Z = xp.empty((T, n), dtype=X.dtype)
    if T == 0 or n == 0:
        return Z
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        gemm(Z[:, j0:j1], K_test[:, :j1], X[j0:j1, :j1], trans_b=True)
    buf = xp.empty((T, min(block, n)), dtype=X.dtype)
    for j0 in range(0, n, block):
        j1 = min(n, j0 + block)
        part = buf[:, :j1 - j0]
        gemm(part, Z[:, j0:], X[j0:, j0:j1])
        Z[:, j0:j1] = part
    return Z


def right_apply_flops(n: int, T: int, block: int | None = None) -> float:
    """Flops :func:`right_apply_inverse` executes: sum over J of 2 T b (j1 + n - j0)."""
    block = int(block or RIGHT_APPLY_BLOCK)
    return float(sum(2.0 * T * (min(n, j0 + block) - j0) * (min(n, j0 + block) + n - j0)
                     for j0 in range(0, n, block)))


def tri_inv_gpu(be: Backend, L, *, out=None):
    """L^-1 by the method ``GPU_INV_METHOD`` names (the exact solver's entry point)."""
    fn = tri_inv_columns if GPU_INV_METHOD == "columns" else tri_inv_blocked
    return fn(be, L, out=out)


def tri_inv_flops(n: int, block: int | None = None) -> float:
    """Flops :func:`tri_inv_blocked` executes at this n and block: the GEMMs plus the b-row
    solves, counted as cuBLAS runs them (the diagonal block's trsm against I costs b^3, as
    :func:`tri_inv_columns_flops` counts its trsm's zero rows).

    About n^3/3 (1 + 1.5 b / n): the GEMMs come to n^3/3 to second order, and each block row
    adds one b-row solve over its i0 columns (b n^2 / 2 in all).
    """
    block = int(block or GPU_INV_BLOCK)
    starts = list(range(0, n, block))
    total = 0.0
    for i0 in starts:
        bi = min(n, i0 + block) - i0
        total += float(bi) ** 3 + float(bi) ** 2 * i0  # trsm against I (executed), solve over i0
        for j0 in range(0, i0, block):
            bj = min(i0, j0 + block) - j0
            total += 2.0 * bi * bj * (i0 - j0)
    return total


__all__ = ["tri_inv_blocked", "tri_inv_flops", "tri_inv_columns", "tri_inv_columns_flops",
           "GPU_INV_BLOCK", "GPU_INV_METHOD", "tri_inv_gpu", "right_apply_inverse",
           "right_apply_flops", "RIGHT_APPLY_BLOCK"]
