"""BLAS-3 and Cholesky on 2-D views of a larger matrix, in place, with no copies.

The blocked factorisations (``solvers.chol_blocked``, ``solvers.tri_inverse``) work on blocks of
one n x n array: ``A[j0:, :j0]`` and the like. CuPy's ``matmul`` and ``cupy.cublas.gemm`` copy
such a view (it is neither C- nor F-contiguous) before calling cuBLAS, and cannot accumulate
into one (``out=`` must be contiguous): at n = 50 000 that is tens of GB of extra traffic and a
block-sized temporary per call. Here a view with one unit stride is handed to cuBLAS /
cuSOLVER directly, as a pointer and a leading dimension:

* a row-major view (strides (ld, 1) in elements) is, to column-major cuBLAS, its transpose
  stored with leading dimension ld; a column-major view (strides (1, ld)) is itself.
* every call is rewritten for the stored matrices: C = alpha op(A) op(B) + beta C on a
  row-major C becomes C^T = alpha op(B)^T op(A)^T + beta C^T; a left solve on a row-major B
  becomes a right solve; "lower" on a row-major view is "upper" of the stored matrix.

NumPy views run the same operations with NumPy / SciPy (in place, same semantics: ``beta = 0``
never reads C, ``syrk`` and ``potrf`` touch only the named triangle), so the blocked
algorithms are testable on the CPU against LAPACK. Inputs are trusted (float64, 2-D, one unit
stride, shapes consistent); callers are the solvers, not users.
"""

from __future__ import annotations

import numpy as np

from ..backend import Backend, is_gpu_array


# ----------------------------------------------------------------------------- stored layout
def _stored(x):
    """(pointer, ld, rows, cols, row_major) of the column-major matrix cuBLAS sees for view x.

    row_major: the stored matrix is x^T (x has unit column stride); rows/cols are the stored
    matrix's. A view with a single row or column is taken in the layout that needs no copy.
    """
    return (x.data.ptr,) + _layout(x)


def _layout(x):
    """(ld, rows, cols, row_major) of view x (see ``_stored``); ValueError when x has no unit
    stride with a leading dimension at least its extent (reversed, broadcast, overlapping)."""
    r, c = x.shape
    s0, s1 = (s // x.itemsize for s in x.strides)
    if s0 == 1 and (s1 >= max(1, r) or c == 1):  # column-major (or one column)
        return max(1, r, s1 if c > 1 else r), r, c, False
    if s1 == 1 and (s0 >= max(1, c) or r == 1):  # row-major (or one row)
        return max(1, c, s0 if r > 1 else c), c, r, True
    raise ValueError(f"strided_blas: a view needs one unit stride, got strides {x.strides}")


def has_blas_layout(x) -> bool:
    """Whether the 2-D view x can go to the calls here as it is (``_layout`` accepts it)."""
    try:
        _layout(x)
    except ValueError:
        return False
    return True


def _libs():
    """(cupy.cuda.device, cuBLAS, cuSOLVER): CuPy's handles and its raw library bindings."""
    from cupy_backends.cuda.libs import cublas, cusolver  # noqa: PLC0415 - optional, heavy
    return Backend("cuda").xp.cuda.device, cublas, cusolver


class _HostScalars:
    """alpha / beta as host pointers, cuBLAS in host pointer mode for the call."""

    def __init__(self, cublas, handle, *values):
        self._cublas, self._handle = cublas, handle
        self._values = np.array(values, dtype=np.float64)

    def ptr(self, i):
        return self._values.ctypes.data + 8 * i

    def __enter__(self):
        self._mode = self._cublas.getPointerMode(self._handle)
        self._cublas.setPointerMode(self._handle, self._cublas.CUBLAS_POINTER_MODE_HOST)
        return self

    def __exit__(self, *exc):
        self._cublas.setPointerMode(self._handle, self._mode)


# ----------------------------------------------------------------------------- operations
def gemm(c, a, b, *, alpha: float = 1.0, beta: float = 0.0, trans_a: bool = False,
         trans_b: bool = False):
    """c <- alpha op(a) op(b) + beta c in place; op(x) = x.T when trans_x. c (m, n),
    op(a) (m, k), op(b) (k, n); with beta = 0, c is not read (it may hold NaN). Returns c."""
    k = a.shape[0] if trans_a else a.shape[1]
    if c.size == 0:
        return c
    if not is_gpu_array(c):
        prod = (a.T if trans_a else a) @ (b.T if trans_b else b) if k else np.zeros(c.shape)
        if beta == 0.0:
            np.multiply(prod, alpha, out=c)
        else:
            c *= beta
            c += alpha * prod
        return c
    device, cublas, _ = _libs()
    handle = device.get_cublas_handle()
    pc, ldc, m, n, c_rm = _stored(c)
    pa, lda, _, _, a_rm = _stored(a)
    pb, ldb, _, _, b_rm = _stored(b)
    # column-major C: C = op(a) op(b). Row-major C: its stored C^T = op(b)^T op(a)^T.
    first = (pb, ldb, trans_b ^ b_rm ^ True) if c_rm else (pa, lda, trans_a ^ a_rm)
    second = (pa, lda, trans_a ^ a_rm ^ True) if c_rm else (pb, ldb, trans_b ^ b_rm)
    ops = [cublas.CUBLAS_OP_T if t else cublas.CUBLAS_OP_N for t in (first[2], second[2])]
    with _HostScalars(cublas, handle, alpha, beta) as s:
        cublas.dgemm(handle, ops[0], ops[1], m, n, k, s.ptr(0), first[0], first[1],
                     second[0], second[1], s.ptr(1), pc, ldc)
    return c


def syrk_lower(c, a, *, alpha: float = 1.0, beta: float = 0.0):
    """Lower triangle of c <- alpha a a^T + beta c in place; c (m, m), a (m, k). The strict
    upper triangle of c is not touched. Returns c."""
    m, k = a.shape
    if m == 0:
        return c
    if not is_gpu_array(c):
        rows, cols = np.tril_indices(m)
        prod = (a @ a.T)[rows, cols] if k else 0.0
        c[rows, cols] = alpha * prod + (beta * c[rows, cols] if beta != 0.0 else 0.0)
        return c
    device, cublas, _ = _libs()
    handle = device.get_cublas_handle()
    pc, ldc, _, _, c_rm = _stored(c)
    pa, lda, _, _, a_rm = _stored(a)
    # lower of a row-major c is upper of the stored c^T (= c, symmetric result); the product
    # a a^T of the stored S_a is S_a S_a^T (op N) when a is column-major, S_a^T S_a (op T) if not
    uplo = cublas.CUBLAS_FILL_MODE_UPPER if c_rm else cublas.CUBLAS_FILL_MODE_LOWER
    op = cublas.CUBLAS_OP_T if a_rm else cublas.CUBLAS_OP_N
    with _HostScalars(cublas, handle, alpha, beta) as s:
        cublas.dsyrk(handle, uplo, op, m, k, s.ptr(0), pa, lda, s.ptr(1), pc, ldc)
    return c


def trsm_lower(b, l, *, side: str = "left", trans: bool = False, alpha: float = 1.0):
    """b <- alpha op(l)^-1 b (side "left") or alpha b op(l)^-1 (side "right") in place, l
    lower triangular (its strict upper part is not read), op(l) = l.T when trans. Returns b."""
    if b.size == 0:
        return b
    left = side == "left"
    if not is_gpu_array(b):
        from scipy.linalg import solve_triangular  # noqa: PLC0415
        if left:
            b[...] = alpha * solve_triangular(l, b, lower=True, trans=int(trans),
                                              check_finite=False)
        else:  # b op(l)^-1 = (op(l)^-T b^T)^T
            b[...] = alpha * solve_triangular(l, b.T, lower=True, trans=int(not trans),
                                              check_finite=False).T
        return b
    device, cublas, _ = _libs()
    handle = device.get_cublas_handle()
    pb, ldb, m, n, b_rm = _stored(b)
    pl, ldl, _, _, l_rm = _stored(l)
    # a row-major b is stored transposed: a left solve becomes a right one with op(l)^T; a
    # row-major l is stored as l^T, upper triangular, and op(l) = op'(l^T) with the flag flipped
    side_c = cublas.CUBLAS_SIDE_RIGHT if (left == b_rm) else cublas.CUBLAS_SIDE_LEFT
    uplo = cublas.CUBLAS_FILL_MODE_UPPER if l_rm else cublas.CUBLAS_FILL_MODE_LOWER
    op = cublas.CUBLAS_OP_T if (trans ^ l_rm ^ b_rm) else cublas.CUBLAS_OP_N
    with _HostScalars(cublas, handle, alpha) as s:
        cublas.dtrsm(handle, side_c, uplo, op, cublas.CUBLAS_DIAG_NON_UNIT, m, n, s.ptr(0),
                     pl, ldl, pb, ldb)
    return b


def potrf_lower(a, info=None, slot: int = 0):
    """Lower Cholesky factor of the square view a in place (a = L L^T; the strict upper part
    is neither read nor written).

    CPU: returns LAPACK's info (0 on success, j > 0 when the leading minor j is not positive
    definite). GPU: cuSOLVER writes its devInfo into ``info[slot]`` (an int32 device array, so
    that a blocked factorisation checks every block with one read at the end) and returns None.
    """
    m = a.shape[0]
    if m == 0:
        return 0 if not is_gpu_array(a) else None
    if not is_gpu_array(a):
        from scipy.linalg import lapack  # noqa: PLC0415
        rows, cols = np.tril_indices(m)
        factor, code = lapack.dpotrf(np.ascontiguousarray(a), lower=1, clean=0)
        a[rows, cols] = factor[rows, cols]
        return int(code)
    device, cublas, cusolver = _libs()
    handle = device.get_cusolver_handle()
    pa, lda, _, _, a_rm = _stored(a)
    uplo = cublas.CUBLAS_FILL_MODE_UPPER if a_rm else cublas.CUBLAS_FILL_MODE_LOWER
    lwork = cusolver.dpotrf_bufferSize(handle, uplo, m, pa, lda)
    work = Backend("cuda").xp.empty(max(1, lwork), dtype=np.float64)
    cusolver.dpotrf(handle, uplo, m, pa, lda, work.data.ptr, lwork,
                    info.data.ptr + 4 * slot)
    return None


__all__ = ["gemm", "syrk_lower", "trsm_lower", "potrf_lower", "has_blas_layout"]
