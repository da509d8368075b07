"""Exact kernel ridge regression in packed storage: half the memory of the dense exact solver.

Same answer as :mod:`.exact` [B.12, Thm B.9], but A = K + lam I lives in LAPACK's rectangular
full packed (RFP) format: the lower triangle in one array of n (n + 1) / 2 float64
(4 n^2 bytes instead of the dense solver's 16 n^2), factored and inverted in place by level-3
routines (``dpftrf``, ``dpftrs``, ``dtftri``). With it the exact solver reaches n ~ 60 000 in
24 GB of RAM (14.4 GB of packed storage), where the dense one stops near 30 000. CPU only
(cuSOLVER has no packed Cholesky); the caller gives a kernel operator, never a dense K, and K
is assembled straight into the packed array tile by tile.

Order of work (the inverse overwrites the factor, so everything that needs the factor first):

1. assemble K's lower triangle into RFP, one row tile at a time (n^2 / 2 entries computed),
   adding lam to the diagonal; the same tiles give ||A||_1 and K V for 4 probe vectors V;
2. ``dpftrf``: A = L L^T in place                                          n^3 / 3 flops
3. alpha = A^-1 Y and B = K_test A^-1 by ``dpftrs``                        2 n^2 (C + T)
4. A.8 checks from solves: the inverse residual on the probes, lambda_min by subspace
   iteration on A^-1 (6 steps of 8 vectors); kappa from ||A||_1 / lambda_min(A)
5. ``dtftri``: L^-1 in place; diag(A^-1) = squared column norms of L^-1     n^3 / 3 flops

The routines are called through SciPy's Cython LAPACK (``scipy.linalg.cython_lapack``, via
ctypes): SciPy's Python wrappers of them overflow a 32-bit size check above n = 46 340.

RFP layout used (TRANSR='N', UPLO='L'; k = ceil(n / 2), off = 1 if n is even else 0): the
array viewed C-ordered as (k, n + off) holds in row j the upper part of K's row j,
``AT[j, j + off:] = K[j, j:]``, and in front of it the lower part of K's row b = k - 1 + off + j
restricted to columns k..b, ``AT[j, :j + off] = K[b, k:b + 1]``. (Checked against LAPACK's
``dtrttf`` in the tests.)
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import BackendError, NotPSDError, ParameterError
from ..ntk.tiling import tiles
from .base import KRRFit, Timer

#: Bytes of one assembly tile (rows x n float64): large enough for BLAS-3 tiles.
TILE_BYTES = 256 << 20
#: LAPACK's 32-bit integers index the packed array: n (n + 1) / 2 must stay below 2^31.
MAX_PACKED_N = 65535
_PROBES = 4


def packed_bytes(n: int) -> int:
    """Bytes of the packed array of an n x n symmetric matrix."""
    return 8 * (n * (n + 1) // 2)


def rfp_layout(n: int):
    """(k, off): the packed array is viewed as a (k, n + off) C-ordered matrix."""
    off = 1 if n % 2 == 0 else 0
    return (n + 1) // 2, off


def rfp_diagonal_index(n: int):
    """(n,) flat positions of A_ii in the packed array."""
    k, off = rfp_layout(n)
    width = n + off
    idx = np.empty(n, dtype=np.int64)
    top = np.arange(k)
    idx[:k] = top * width + top + off
    bottom = np.arange(k, n)
    rows = bottom - (k - 1 + off)
    idx[k:] = rows * width + (bottom - k)
    return idx


def assemble_packed(op, lam: float, probes=None, *, tile: int | None = None):
    """A = K + lam I in RFP (TRANSR='N', UPLO='L'), from an operator's ``block``.

    Parameters
    ----------
    op : kernel operator with ``n`` and ``block(i0, i1, j0, j1)`` -> K[i0:i1, j0:j1].
    lam : ridge added to the diagonal.
    probes : (n, p) vectors whose product K V is accumulated from the same tiles, optional.
    tile : rows per tile (default from TILE_BYTES).

    Returns
    -------
    arf : (n (n + 1) / 2,) float64 packed A.
    abs_row_sums : (n,) sum_j |K_ij| (so ||A||_1 = max + lam).
    KV : (n, p) K @ probes, or None.
    """
    n = op.n
    k, off = rfp_layout(n)
    arf = np.empty(n * (n + 1) // 2)
    AT = arf.reshape(k, n + off)
    rows = tile or max(1, min(n, TILE_BYTES // (8 * n)))
    abs_sums = np.zeros(n)
    KV = None if probes is None else np.zeros((n, probes.shape[1]))

    def account(block, r0, r1, c0, c1):
        """Row sums and K V for K[r0:r1, c0:c1] = [its diagonal block | the rest], counting
        each unordered pair once: the rest also stands for its mirror."""
        a = np.abs(block)
        abs_sums[r0:r1] += a.sum(axis=1)
        if c0 == r0:  # diagonal block first, then columns r1:c1
            rest, rest_cols = a[:, r1 - r0:], slice(r1, c1)
        else:         # columns c0:r0 first, then the diagonal block
            rest, rest_cols = a[:, :r0 - c0], slice(c0, r0)
        abs_sums[rest_cols] += rest.sum(axis=0)
        if KV is not None:
            KV[r0:r1] += block @ probes[c0:c1]
            sub = block[:, r1 - r0:] if c0 == r0 else block[:, :r0 - c0]
            KV[rest_cols] += sub.T @ probes[r0:r1]

    for r0, r1 in tiles(k, rows):  # top rows: K[j, j:n] for j < k
        block = op.block(r0, r1, r0, n)
        for j in range(r0, r1):
            AT[j, j + off:] = block[j - r0, j - r0:]
        account(block, r0, r1, r0, n)
    for r0, r1 in tiles(n - k, rows):  # bottom rows: K[b, k:b+1] for b >= k
        b0, b1 = k + r0, k + r1
        block = op.block(b0, b1, k, b1)
        for b in range(b0, b1):
            j = b - (k - 1 + off)
            AT[j, :b - k + 1] = block[b - b0, :b - k + 1]
        account(block, b0, b1, k, b1)
    arf[rfp_diagonal_index(n)] += lam
    return arf, abs_sums, KV


def packed_exact_fit(op, Y, lam: float, *, K_test=None, check: bool = True,
                     timer: Timer | None = None, tile: int | None = None) -> KRRFit:
    """Exact KRR fit with A in packed storage (CPU); K_test A^-1 is computed during the fit.

    Parameters
    ----------
    op : kernel operator (``n``, ``block``); K is never held densely.
    Y : (n, C) float64 targets.
    lam : float > 0, ridge.
    K_test : (T, n) test kernel. The factor is overwritten by the inverse before the fit
        returns, so ``right_solve`` answers only for this same array (T = 0 when None).
    check : run the A.8 checks (inverse residual on 4 probes, lambda_min by subspace
        iteration, kappa from ||A||_1 / lambda_min(A)).
    timer : Timer ("kernel_assembly", "cholesky", "alpha", "right_solve", "checks",
        "inverse").

    Returns
    -------
    KRRFit with ``solver="exact"`` and ``diagnostics["storage"] = "packed (RFP)"``.

    Raises
    ------
    NotPSDError : K + lam I is not positive definite.
    """
    timer = timer or Timer()
    n = op.n
    if n > MAX_PACKED_N:
        raise ParameterError(f"packed exact: n={n} exceeds {MAX_PACKED_N} (LAPACK's 32-bit "
                             f"indices into the packed array); use solver='nystrom' or 'cg'")
    probes = np.random.default_rng(1).standard_normal((n, _PROBES)) if check else None
    with timer("kernel_assembly"):
        arf, abs_sums, KV = assemble_packed(op, lam, probes, tile=tile)
    with timer("cholesky"):
        info = _call("dpftrf", b"N", b"L", n, arf)
    if info != 0:
        raise NotPSDError(f"K + lam*I is not positive definite (lam={lam:g}): the packed "
                          f"Cholesky failed at column {info}; K has an eigenvalue below -lam. "
                          f"Check the kernel (is it a valid NTK?) or raise lam")

    def solve(V):
        """A^-1 V into a fresh Fortran-ordered copy (V itself, which may be a transposed
        view of the caller's K_test, is never written)."""
        X = np.array(V, dtype=np.float64, order="F")
        if X.ndim == 1:
            X = X.reshape(-1, 1, order="F")
        _call("dpftrs", b"N", b"L", n, X.shape[1], arf, X, n)
        return X

    with timer("alpha"):
        alpha = np.ascontiguousarray(solve(Y))
    B = None
    if K_test is not None:
        with timer("right_solve"):
            B = np.ascontiguousarray(solve(np.asarray(K_test).T).T)
    diagnostics = {"storage": "packed (RFP)", "packed_bytes": packed_bytes(n)}
    if check:
        with timer("checks"):
            diagnostics.update(_checks(solve, probes, KV, abs_sums, lam))
    with timer("inverse"):
        diag_inv, how = _diag_of_inverse(n, arf)
    diagnostics["diag_inv_method"] = how
    del arf

    def right_solve(Kt):
        """(T, n) K_test A^-1, computed during the fit for the K_test given there."""
        if Kt is K_test:
            return B
        raise ValueError("packed exact fit: right_solve answers only for the K_test passed "
                         "to the fit (the factor is gone)")

    return KRRFit(alpha=alpha, diag_inv=diag_inv, right_solve=right_solve, solver="exact",
                  diagnostics=diagnostics, timings=timer.seconds)


def _diag_of_inverse(n: int, arf):
    """diag(A^-1) from the packed Cholesky factor, destroying it: L^-1 in place by LAPACK
    ``dtftri`` (n^3 / 3 flops), then (A^-1)_ii = ||L^-1 e_i||^2, the squared norms of the
    columns of L^-1, read off the RFP layout. Returns (diag, method)."""
    info = _call("dtftri", b"N", b"L", b"N", n, arf)
    if info != 0:
        raise NotPSDError(f"packed triangular inverse failed (LAPACK info={info})")
    k, off = rfp_layout(n)
    AT = arf.reshape(k, n + off)
    diag = np.zeros(n)
    for j in range(k):
        row = AT[j]
        top = row[j + off:]          # column j of L^-1, rows j..n-1
        diag[j] = top @ top
        low = row[:j + off]          # row b = k - 1 + off + j of L^-1, columns k..b
        diag[k:k + j + off] += low * low
    return diag, "dtftri (L^-1 in packed storage), column norms"


# Argument kinds of the LAPACK routines used, as SciPy's Cython LAPACK declares them (every
# argument by pointer): c = char, i = int, d = double array.
_SIGNATURES = {"dpftrf": "ccid", "dpftrs": "cciiddi", "dtftri": "cccid"}


def _call(name: str, *args) -> int:
    """Call LAPACK ``name`` through SciPy's Cython LAPACK; returns INFO.

    SciPy's Python wrappers of the RFP routines check n (n + 1) / 2 in 32-bit arithmetic and
    refuse n > 46 340, although LAPACK itself indexes the packed array correctly up to
    n (n + 1) / 2 < 2^31; the Cython entry points have no such check. ``args`` are the
    routine's arguments except the trailing INFO: bytes for chars, ints, float64 arrays
    (Fortran-ordered where 2-D).
    """
    import ctypes
    func = _cython_lapack(name)
    keep, ptrs = [], []
    for kind, a in zip(_SIGNATURES[name], args):
        if kind == "c":
            ptrs.append(ctypes.c_char_p(a))
        elif kind == "i":
            v = ctypes.c_int(int(a))
            keep.append(v)
            ptrs.append(ctypes.byref(v))
        else:
            ptrs.append(ctypes.c_void_p(a.ctypes.data))
    info = ctypes.c_int(0)
    func(*ptrs, ctypes.byref(info))
    return info.value


@functools.lru_cache(maxsize=None)
def _cython_lapack(name: str):
    """A ctypes handle on SciPy's Cython LAPACK routine ``name``."""
    import ctypes

    import scipy.linalg.cython_lapack as cl
    try:
        capsule = cl.__pyx_capi__[name]
    except (AttributeError, KeyError):
        raise BackendError(f"packed exact needs LAPACK {name} from scipy.linalg.cython_lapack, "
                           f"which this SciPy does not expose") from None
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    ptr = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    kinds = {"c": ctypes.c_char_p, "i": ctypes.c_void_p, "d": ctypes.c_void_p}
    argtypes = [kinds[c] for c in _SIGNATURES[name]] + [ctypes.c_void_p]
    return ctypes.CFUNCTYPE(None, *argtypes)(ptr)


def _checks(solve, probes, KV, abs_sums, lam, *, block: int = 8, iters: int = 6) -> dict:
    """A.8 from solves with the factor: inverse residual, lambda_min(K), kappa(A) estimate."""
    back = solve(KV + lam * probes)
    residual = float(np.linalg.norm(back - probes) / np.linalg.norm(probes))
    n = probes.shape[0]
    V = np.random.default_rng(2).standard_normal((n, min(block, n)))
    for _ in range(iters):
        V, _ = np.linalg.qr(solve(V))
    H = V.T @ solve(V)
    lam_min_A = 1.0 / float(np.linalg.eigvalsh((H + H.T) * 0.5)[-1])
    anorm = float(abs_sums.max()) + lam
    return {"inverse_residual_probe": residual,
            "inverse_residual_estimator": f"{probes.shape[1]} random probes",
            "lambda_min_K_estimate": lam_min_A - lam,
            "lambda_min_estimator": f"{iters} subspace iterations (block {block}) on A^-1",
            "cond_A_estimate": anorm / lam_min_A,
            "cond_estimator": "||A||_1 / lambda_min(A) estimate (||A||_2 <= ||A||_1)",
            "cholesky_succeeded": True}
