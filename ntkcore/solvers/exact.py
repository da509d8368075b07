"""Exact kernel ridge regression by float64 Cholesky [B.12, Thm B.9; checks of A.8].

A = K + lam I = L L^T.  alpha = A^-1 Y by two triangular solves.  diag(A^-1) from the
triangular inverse: A^-1 = L^-T L^-1, so (A^-1)_ii is the squared norm of column i of L^-1
(no general inverse of A is ever formed).  K_test A^-1 = (K_test L^-T) L^-1 by two triangular
multiplies: BLAS trmm on the CPU, block-column GEMMs over L^-1 on the GPU.  Flops: n^3/3
(potrf; on the GPU in place by block columns, ``chol_blocked``) + n^3/3 (trtri; on the GPU by
block rows in GEMMs, ``tri_inverse``) + 2 T n^2 (the two multiplies) + O(n^2 C).
"""

from __future__ import annotations

import numpy as np

from ..backend import Backend, backend_for
from ..errors import NotPSDError
from ..kernels.triangular import abs_row_sums_and_product, lower_gram_apply
from .base import KRRFit, Timer

#: The GPU factorisation: "blocked" (``chol_blocked``: in place, its updates as large cuBLAS
#: GEMMs) or "cusolver" (CuPy's cholesky: cuSOLVER potrf on a new copy). At n = 50 000 on the
#: H200 of bench/RESULTS.md (``bench/gpu_factor.py``, 2026-11-28) the blocked one took 0.94 s,
#: cuSOLVER's potrf alone 1.24 s.
GPU_CHOLESKY = "blocked"


def exact_fit(K, Y, lam: float, *, overwrite_k: bool = False, check: bool = True,
              timer: Timer | None = None) -> KRRFit:
    """Factor A = K + lam I once and expose alpha, diag(A^-1) and right solves.

    Parameters
    ----------
    K : (n, n) float64 symmetric PSD kernel matrix (validated by the caller).
    Y : (n, C) float64 targets (one-hot, or a +-1 column for binary).
    lam : float > 0, ridge.
    overwrite_k : bool, default False
        Reuse K's memory for the factor (K is destroyed); halves peak memory for large n. The
        A.8 checks read what they need from K first, so none is lost.
    check : bool, default True
        Run the A.8 numerical checks (cheap estimators; see ``_diagnostics``).

    Returns
    -------
    KRRFit with ``solver="exact"``.
    """
    be = backend_for(K)
    xp = be.xp
    timer = timer or Timer(be.synchronize)
    n = K.shape[0]
    if check:  # everything the A.8 checks need from K, read before K may be overwritten
        with timer("checks"):
            anorm, probe = _read_k_for_checks(be, K, lam)
            spectrum = _exact_spectrum(be, K, lam) if n <= EXACT_SPECTRUM_MAX_N else None
    with timer("cholesky"):
        A = K if overwrite_k else K.copy()
        diag_idx = xp.arange(n)
        A[diag_idx, diag_idx] += lam
        L = _cholesky(be, A, lam)
        if L is not A:
            del A  # CuPy's cholesky returns a new array: free the working copy at once
    diagnostics = {"A_norm_1": anorm} if check else {}
    if check and be.name == "cpu":
        with timer("checks"):
            diagnostics.update(_condition_estimate(be, anorm, L, lam))
    with timer("alpha"):
        Z = be.solve_triangular(L, Y, lower=True)
        alpha = be.solve_triangular(L, Z, lower=True, trans=1)
    with timer("triangular_inverse"):
        # CPU: trtri in place of L. GPU: by block rows in GEMMs, into K's memory when it may
        # be overwritten; L is kept for the right solves.
        Linv = _tri_inv(be, L, scratch=K if overwrite_k else None)
        diag_inv = be.sum_of_squares(Linv, axis=0)
    if be.name == "cpu":
        del L  # its memory is Linv's

    def right_solve(K_test):
        """(T, n) K_test A^-1 = (K_test L^-T) L^-1: two trmm (CPU) or block-column GEMMs
        over L^-1 (GPU), 2 T n^2 flops."""
        with timer("right_solve"):
            return _right_apply(be, K_test, Linv)

    if check:
        with timer("checks"):
            if be.name == "cuda":  # power iterations by GEMMs with L^-1, not 4-column trsms
                diagnostics.update(_condition_estimate(be, anorm, L, lam, Linv=Linv))
            diagnostics.update(_inverse_residual(probe, Linv))
            diagnostics.update(spectrum or _lambda_min_estimate(be, Linv, lam))
            _cap_bound_at_estimate(diagnostics)
    if be.name == "cuda":
        del L  # only the checks read it; the right solves use L^-1
    return KRRFit(alpha=alpha, diag_inv=diag_inv, right_solve=right_solve, solver="exact",
                  diagnostics=diagnostics, timings=timer.seconds)


def _cap_bound_at_estimate(d: dict) -> None:
    """The estimated lower bound on lambda_min(K) (from ||A^-1||_1 estimated from below)
    cannot honestly exceed the subspace estimate, which approaches lambda_min(K) from above:
    where it does, the estimate of ||A^-1||_1 fell short, and the bound takes the estimate."""
    est, low = d.get("lambda_min_K_estimate"), d.get("lambda_min_K_lower_bound")
    if est is not None and low is not None and low > est:
        d["lambda_min_K_lower_bound"] = est
        d["lambda_min_K_rel_lower_bound"] = est / d["A_norm_1"]


def _cholesky(be: Backend, A, lam):
    try:
        if be.name == "cuda" and GPU_CHOLESKY == "blocked":
            from .chol_blocked import cholesky_blocked
            from ..kernels.strided_blas import has_blas_layout
            if not has_blas_layout(A):  # one unit stride, positive leading dimension
                A = A.copy(order="C")
            L = cholesky_blocked(be, A)  # in A's memory
        else:
            L = be.cholesky(A, overwrite=True)
    except np.linalg.LinAlgError as exc:
        raise NotPSDError(f"K + lam*I is not positive definite (lam={lam:g}): {exc}; K has an "
                          f"eigenvalue below -lam, or lam is below the rounding of K (about "
                          f"1e-16 ||K|| per entry). Check the kernel (is it a valid NTK?) or "
                          f"raise lam") from None
    if be.name == "cuda" and not bool(be.xp.isfinite(L[-1, -1])):
        # potrf's devInfo is checked (Backend.cholesky), but a NaN pivot need not set it:
        # NaN then reaches the last entry of the factor.
        raise NotPSDError(f"K + lam*I is not positive definite (lam={lam:g}); raise lam")
    return L


def _tri_inv(be: Backend, L, scratch=None):
    """L^-1 for lower-triangular L: LAPACK trtri in place on the CPU; on the GPU by blocks
    (``tri_inverse.GPU_INV_METHOD``: block rows in GEMMs, or block columns by trsm; about
    n^3/3 flops, not the n^3 of a trsm against I), into ``scratch`` (an n x n array that may
    be destroyed, e.g. the factored K, unless it holds L) when given."""
    if be.name == "cpu":
        from scipy.linalg import lapack
        Linv, info = lapack.dtrtri(L, lower=1, overwrite_c=1)
        if info != 0:
            raise NotPSDError(f"triangular inverse failed (LAPACK info={info})")
        return Linv  # scipy's cholesky leaves the strict upper triangle zero; trtri keeps it
    from .tri_inverse import tri_inv_gpu
    usable = (scratch is not None and scratch is not L and scratch.shape == L.shape
              and scratch.dtype == L.dtype and scratch.flags.c_contiguous)
    return tri_inv_gpu(be, L, out=scratch if usable else None)


def _right_apply(be: Backend, K_test, Linv):
    """K_test L^-T L^-1 by two BLAS trmm (CPU) or block-column GEMMs (GPU)."""
    if be.name != "cpu":
        from .tri_inverse import right_apply_inverse
        return right_apply_inverse(be, K_test, Linv)
    from scipy.linalg import blas
    # On the transpose: (K_test A^-1)^T = L^-T (L^-1 K_test^T), left-side trmm on K_test^T,
    # a free Fortran-order view of a C-order K_test. One (n, T) copy (the first trmm's
    # output, updated in place by the second), returned transposed as a C-order (T, n): the
    # right-side form copied K_test into Fortran order, then made Z and a C-order copy of it.
    Z = blas.dtrmm(1.0, Linv, np.asarray(K_test).T, side=0, lower=1, trans_a=0)
    Z = blas.dtrmm(1.0, Linv, Z, side=0, lower=1, trans_a=1, overwrite_b=1)
    return Z.T


# Up to this n the A.8 checks use the exact spectrum (eigvalsh costs ~3x the Cholesky here).
EXACT_SPECTRUM_MAX_N = 2000


def _exact_spectrum(be: Backend, K, lam):
    """lambda_min(K) and kappa(K + lam I) from the full eigenvalue decomposition (A.8)."""
    ev = be.to_host(be.eigvalsh(K))
    top = float(ev[-1])
    return {"lambda_min_K": float(ev[0]),
            "lambda_min_K_rel": float(ev[0]) / top if top > 0 else float(ev[0]),
            "cond_A": (top + lam) / (float(ev[0]) + lam),
            "spectrum_method": "exact eigvalsh"}


def _lambda_min_estimate(be: Backend, Linv, lam, *, block: int = 8, iters: int = 6):
    """lambda_min(K) from subspace iteration on A^-1 = L^-T L^-1 (block of 8, 6 steps).

    The Ritz value approaches 1/lambda_min(A) from below, so the estimate of lambda_min(K)
    approaches the truth from above; it is labelled an estimate, not a bound. Each step reads
    the lower triangle of L^-1 twice (:func:`~ntkcore.kernels.triangular.lower_gram_apply`,
    memory-bound: ~0.06 s at n = 8000 on 2 cores).
    """
    xp = be.xp
    n = Linv.shape[0]
    V = xp.asarray(np.random.default_rng(2).standard_normal((n, min(block, n))))
    for _ in range(iters):
        V, _ = xp.linalg.qr(lower_gram_apply(Linv, V))
    H = V.T @ lower_gram_apply(Linv, V)
    top = float(be.to_host(xp.linalg.eigvalsh((H + H.T) * 0.5))[-1])
    lam_min_A = 1.0 / top
    return {"lambda_min_K_estimate": lam_min_A - lam,
            "lambda_min_estimator": f"{iters} subspace iterations (block {block}) on A^-1"}


def _condition_estimate(be: Backend, anorm, L, lam, Linv=None):
    """A.8 conditioning and PSD checks from the Cholesky factor, O(n^2).

    CPU: LAPACK pocon's 1-norm estimate of kappa_1(A) (an upper bound on kappa_2 up to the
    estimator's accuracy) and lambda_min(A) >= 1 / ||A^-1||_1, giving a lower bound on
    lambda_min(K). GPU: 30 block power iterations on A = L L^T and on A^-1 = L^-T L^-1, all
    GEMMs that stream the factors at memory bandwidth (a 4-column trsm would walk the diagonal
    blocks one after another; ``Linv`` exists by then).
    """
    xp = be.xp
    if be.name == "cpu":
        from scipy.linalg import lapack
        rcond, info = lapack.dpocon(L, anorm, uplo="L")
        inv_norm1 = 1.0 / (rcond * anorm) if rcond > 0 else float("inf")
        lam_min_lower = 1.0 / inv_norm1 - lam
        return {"cond_A_estimate": 1.0 / rcond if rcond > 0 else float("inf"),
                "cond_estimator": "LAPACK dpocon 1-norm estimate",
                "lambda_min_K_lower_bound": lam_min_lower,
                "lambda_min_K_rel_lower_bound": lam_min_lower / anorm,
                "cholesky_succeeded": True}
    n = L.shape[0]
    rng = xp.random.default_rng(0) if hasattr(xp.random, "default_rng") else xp.random
    V = rng.standard_normal((n, 4))
    # the unit blocks are scaled so that A v and A^-1 v stay near 1 (||A|| <= anorm,
    # ||A^-1|| <= 1 / lam): at lam = 1e308 A v overflowed and A^-1 v underflowed to 0
    top = _power(lambda v: L @ (L.T @ v), V, xp, scale=1.0 / anorm)
    if Linv is not None:
        bottom = 1.0 / _power(lambda v: Linv.T @ (Linv @ v), V, xp, scale=lam)
    else:
        bottom = 1.0 / _power(lambda v: be.solve_triangular(
            L, be.solve_triangular(L, v, lower=True), lower=True, trans=1), V, xp, scale=lam)
    return {"cond_A_estimate": top / bottom, "cond_estimator": "30 block power iterations",
            "lambda_min_K_estimate": bottom - lam, "cholesky_succeeded": True}


def _power(apply, V, xp, iters: int = 30, scale: float = 1.0):
    """Largest ||apply(v)|| / ||v|| over the block power iterates of V (orthonormal columns
    times ``scale``, so that apply(V) neither overflows nor underflows)."""
    V, _ = xp.linalg.qr(V)
    for _ in range(iters):
        V, _ = xp.linalg.qr(apply(V * scale))
    W = apply(V * scale)
    return float(xp.max(xp.linalg.norm(W, axis=0))) / scale


def _read_k_for_checks(be: Backend, K, lam, probes: int = 8):
    """What the A.8 checks need from K, read before the factorisation may overwrite it, in one
    pass over K: ||K + lam I||_1 (the max absolute row sum of symmetric K, plus lam) and the
    inversion probes (V, A V), V random (n x 8: eight columns cost one pass, as four would)."""
    xp = be.xp
    n = K.shape[0]
    rng = xp.random.default_rng(1) if hasattr(xp.random, "default_rng") else xp.random
    V = rng.standard_normal((n, probes))  # drawn on K's device: nothing crosses the bus
    V /= xp.abs(V).max()  # |entries| <= 1: lam V cannot overflow (lam = 1e308 gave NaN)
    if be.name == "cpu" and K.flags.f_contiguous and not K.flags.c_contiguous:
        K = K.T  # the same symmetric matrix, in the row order the kernel streams
    row_abs, KV = abs_row_sums_and_product(K, V)
    return float(row_abs.max()) + lam, (V, KV + lam * V)


def _inverse_residual(probe, Linv):
    """A.8 inversion accuracy ||A^-1 (A V) - V||_F / ||V||_F on the probes of
    :func:`_read_k_for_checks`."""
    V, AV = probe
    xp = backend_for(V).xp
    back = lower_gram_apply(Linv, AV)
    res = float(xp.linalg.norm(back - V) / xp.linalg.norm(V))
    return {"inverse_residual_probe": res,
            "inverse_residual_estimator": f"{V.shape[1]} random probes"}
