"""Raw cuBLAS / cuSOLVER calls (``cupy_backends.cuda.libs``) on the simulator's memory.

ntkcore's ``kernels.strided_blas`` passes pointers and leading dimensions, as C code would; a
wrong ld, offset, transpose flag or triangle there gives wrong numbers on a GPU. Here each
pointer is resolved to the simulated allocation that holds it, and the column-major matrix
(rows, cols, ld) it names becomes a NumPy view of that memory. Strict where the libraries
are: a matrix reaching outside its allocation, ld < rows, an output overlapping an input
element, host scalars read outside host pointer mode all raise; ``beta = 0`` never reads C;
syrk / trsm / potrf read and write only the triangle they are given; potrf reports no NaN
pivot (cuSOLVER need not), so callers must find NaN factors themselves.
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

OP_N, OP_T = 0, 1
LOWER, UPPER = 0, 1
LEFT, RIGHT = 0, 1
NON_UNIT = 0
HOST, DEVICE = 0, 1
CALLS = []  # (function name, m, n, k) of every call, for tests that count them


def _allocation(ptr, allocations):
    """(buffer, offset of ptr in it, end of the usable bytes) of the device allocation
    holding ptr; ``allocations()`` yields (buffer, first usable byte, end) of each."""
    for buf, lo, hi in allocations():
        if buf.ctypes.data + lo <= ptr < buf.ctypes.data + hi:
            return buf, ptr - buf.ctypes.data, hi
    raise AssertionError(f"simulated cuBLAS: pointer {ptr:#x} is in no device allocation")


def _matrix(ptr, rows, cols, ld, allocations, dtype=np.float64, what="matrix"):
    """The column-major (rows, cols) matrix at ptr with leading dimension ld, as a view."""
    if ld < max(1, rows):
        raise AssertionError(f"simulated cuBLAS: {what}: ld={ld} < rows={rows}")
    buf, offset, end = _allocation(ptr, allocations)
    item = np.dtype(dtype).itemsize
    last = offset + ((rows - 1) + (cols - 1) * ld) * item + item if rows and cols else offset
    if last > end:
        raise AssertionError(f"simulated cuBLAS: {what} ({rows} x {cols}, ld {ld}) reaches "
                             f"{last - end} bytes past its allocation")
    raw = buf.ravel(order="K")  # the allocation's bytes in memory order (C- or F-ordered)
    assert np.shares_memory(raw, buf), "simulated cuBLAS: allocation is not one block"
    return np.ndarray((rows, cols), dtype=dtype, buffer=raw.view(np.uint8),
                      offset=offset, strides=(item, ld * item))


def _addresses(view):
    rows, cols = np.indices(view.shape, dtype=np.int64)
    return (view.ctypes.data + rows * view.strides[0] + cols * view.strides[1]).ravel()


def _no_overlap(out, *inputs, what):
    written = _addresses(out)
    for x in inputs:
        if np.intersect1d(written, _addresses(x)).size:
            raise AssertionError(f"simulated cuBLAS: {what}: output overlaps an input")


def _op(x, flag):
    return x.T if flag == OP_T else x


def make_libs(allocations):
    """(cublas, cusolver, device) stand-in modules over the simulator's allocations
    (``allocations()`` yields (buffer, first usable byte, end) of each live one)."""
    state = {"mode": HOST}

    def scalar(ptr):
        if state["mode"] != HOST:
            raise AssertionError("simulated cuBLAS: host scalar read in device pointer mode")
        return ctypes.c_double.from_address(ptr).value

    def mat(ptr, rows, cols, ld, what):
        return _matrix(ptr, rows, cols, ld, allocations, what=what)

    def dgemm(handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        CALLS.append(("dgemm", m, n, k))
        a = mat(A, *((m, k) if transa == OP_N else (k, m)), lda, "A")
        b = mat(B, *((k, n) if transb == OP_N else (n, k)), ldb, "B")
        c = mat(C, m, n, ldc, "C")
        _no_overlap(c, a, b, what="dgemm")
        prod = scalar(alpha) * (_op(a, transa) @ _op(b, transb)) if k else np.zeros((m, n))
        beta_v = scalar(beta)
        c[...] = prod if beta_v == 0.0 else prod + beta_v * c

    def dsyrk(handle, uplo, trans, n, k, alpha, A, lda, beta, C, ldc):
        CALLS.append(("dsyrk", n, n, k))
        a = mat(A, *((n, k) if trans == OP_N else (k, n)), lda, "A")
        c = mat(C, n, n, ldc, "C")
        _no_overlap(c, a, what="dsyrk")
        m = _op(a, trans)
        rows, cols = np.tril_indices(n) if uplo == LOWER else np.triu_indices(n)
        prod = scalar(alpha) * (m @ m.T)[rows, cols] if k else 0.0
        beta_v = scalar(beta)
        c[rows, cols] = prod if beta_v == 0.0 else prod + beta_v * c[rows, cols]

    def dtrsm(handle, side, uplo, trans, diag, m, n, alpha, A, lda, B, ldb):
        CALLS.append(("dtrsm", m, n, m if side == LEFT else n))
        size = m if side == LEFT else n
        a = mat(A, size, size, lda, "A")
        b = mat(B, m, n, ldb, "B")
        _no_overlap(b, a, what="dtrsm")
        lower = uplo == LOWER
        tri = np.tril(a) if lower else np.triu(a)  # the other triangle is never read
        if side == LEFT:
            x = scipy.linalg.solve_triangular(tri, b, lower=lower, trans=int(trans == OP_T),
                                              check_finite=False)
        else:  # X op(A) = B  <=>  op(A)^T X^T = B^T
            x = scipy.linalg.solve_triangular(tri, b.T, lower=lower, trans=int(trans != OP_T),
                                              check_finite=False).T
        b[...] = scalar(alpha) * x

    def getPointerMode(handle):
        return state["mode"]

    def setPointerMode(handle, mode):
        state["mode"] = mode

    def dpotrf_bufferSize(handle, uplo, n, A, lda):
        return 64 + n

    def dpotrf(handle, uplo, n, A, lda, work, lwork, devInfo):
        CALLS.append(("dpotrf", n, n, n))
        a = mat(A, n, n, lda, "A")
        _matrix(work, lwork, 1, max(1, lwork), allocations, what="workspace")
        info = _matrix(devInfo, 1, 1, 1, allocations, dtype=np.int32, what="devInfo")
        lower = uplo == LOWER
        rows, cols = np.tril_indices(n) if lower else np.triu_indices(n)
        tri = np.array(a)[rows, cols]
        if np.isnan(tri).any():  # cuSOLVER need not report a NaN pivot: the worst case
            a[rows, cols] = np.nan
            info[0, 0] = 0
            return
        factor, code = scipy.linalg.lapack.dpotrf(np.array(a), lower=int(lower), clean=0)
        a[rows, cols] = factor[rows, cols]
        info[0, 0] = code

    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.__dict__.update(
        CUBLAS_OP_N=OP_N, CUBLAS_OP_T=OP_T, CUBLAS_FILL_MODE_LOWER=LOWER,
        CUBLAS_FILL_MODE_UPPER=UPPER, CUBLAS_SIDE_LEFT=LEFT, CUBLAS_SIDE_RIGHT=RIGHT,
        CUBLAS_DIAG_NON_UNIT=NON_UNIT, CUBLAS_POINTER_MODE_HOST=HOST,
        CUBLAS_POINTER_MODE_DEVICE=DEVICE, dgemm=dgemm, dsyrk=dsyrk, dtrsm=dtrsm,
        getPointerMode=getPointerMode, setPointerMode=setPointerMode)
    cusolver = types.ModuleType("cupy_backends.cuda.libs.cusolver")
    cusolver.__dict__.update(dpotrf=dpotrf, dpotrf_bufferSize=dpotrf_bufferSize)
    device = types.SimpleNamespace(get_cublas_handle=lambda: 1, get_cusolver_handle=lambda: 2)
    return cublas, cusolver, device
