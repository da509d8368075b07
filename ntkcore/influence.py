"""Exact leave-one-out influence of every training point on every test prediction [Def 3.3].

With A = K + lam I, C = A^-1, alpha = C Y and f(x) = k(x)^T alpha, removing point i gives
f^{-i}(x) = f(x) - (k(x)^T C e_i) alpha_i / C_ii (the block-inverse form of Sherman-Morrison
for deleting row and column i: (A_{-i})^-1 = C_{-i,-i} - C_{-i,i} C_{i,-i} / C_ii). The proof of
Thm B.9 prints C - C e_i e_i^T C / (1 + C_ii), which is the inverse of A + e_i e_i^T (a point
added to the diagonal), not of A without point i; the code uses the deletion form, and
tests/reference.py checks it against refitting without point i. So with

    B = K_test C (T x n),  U = B / diag(C),  r_t = f(x_t) - y_t,

    I(i, t) = 1/2 (||f^{-i}(x_t) - y_t||^2 - ||f(x_t) - y_t||^2)
            = U_ti (U_ti / 2 * ||alpha_i||^2 - r_t . alpha_i)

Positive = helpful (removing i raises the test loss). The LOO residual of point i is
alpha_i / C_ii = y_i - f^{-i}(x_i). No refitting, one factorisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._validate import (
    as_float_matrix,
    check_count,
    check_flag,
    check_kernel_matrix,
    check_min_cols,
    check_positive,
    check_rows,
    check_result_finite,
    is_kernel_operator,
    may_share_memory,
)
from .backend import backend_for
from .errors import NonFiniteError, ParameterError, ShapeError
from .solvers import get_solver
from .solvers.operator import DenseKernel, checked_operator
from .solvers.base import Timer


@dataclass
class InfluenceResult:
    """Output of :func:`loo_influence`.

    Attributes
    ----------
    scores : (T, n) I(i, t); positive = helpful. None when only top-k was requested.
    alpha : (n, C) A^-1 Y.
    predictions : (T, C) kernel predictor f(x_t) = K_test alpha.
    loo_residuals : (n, C) y_i - f^{-i}(x_i) = alpha_i / C_ii.
    diag_inv : (n,) diag(A^-1).
    top_helpful, top_harmful : (T, min(k, n)) indices of the k largest / smallest scores per
        test point (when ``top_k`` was given; a k above n ranks all n).
    diagnostics : dict of A.8 checks and solver reports.
    timings : dict of seconds per stage.
    solver : the solver that ran.
    """

    scores: object
    alpha: object
    predictions: object
    loo_residuals: object
    diag_inv: object
    solver: str
    top_helpful: object = None
    top_harmful: object = None
    diagnostics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def influence_scores(B, diag_inv, alpha, residuals):
    """I = U * (U/2 * ||alpha_i||^2 - r_t . alpha_i), U = B / diag_inv  [Def 3.3 via Thm B.9].

    Parameters
    ----------
    B : (T, n) K_test A^-1
    diag_inv : (n,) diag(A^-1), every entry > 0
    alpha : (n, C), or (n,) for C = 1
    residuals : (T, C) f(x_t) - y_t, or (T,) for C = 1

    Array-likes (NumPy, CuPy, torch CPU tensors, lists) are accepted; integers, bools,
    float16 and long double become float64, float32 B stays float32 (the other operands are cast to B's dtype). CuPy
    inputs stay on the device.

    Returns
    -------
    (T, n) scores (a new array; B is not modified). One fused pass over B (Numba on the CPU,
    CUDA on the GPU: ntkcore.kernels, issue 3); no (T, n) temporaries.

    Raises
    ------
    ShapeError : wrong dims, C = 0, or sizes that do not fit together (the message names both
    arguments and their shapes). ParameterError : complex or non-numeric values, or an entry
    of diag_inv <= 0. NonFiniteError : NaN or Inf.
    """
    from .kernels import influence_scores_fused
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported here
        scores = influence_scores_fused(*_scoring_inputs(B, diag_inv, alpha, residuals))
    return check_result_finite(scores, "influence scores")


def _check_score_bound(B, diag_inv, alpha, residuals):
    """NonFiniteError when the scores could overflow B's dtype; for the top-k path, which
    keeps no scores to check afterwards (a NaN score would simply never be ranked).

    Both kernels compute the folded form b (b g_i - r_t . alpha'_i) with alpha'_i = alpha_i /
    d_i and g_i = ||alpha'_i||^2 / 2. Per training point i: |I(t, i)| <= b_i (b_i g_i +
    rho a_i) with b_i = max_t |B_ti|, a_i = max_c |alpha'_ic| and rho = max_t ||r_t||_1; g_i
    itself must be finite too. From alpha' (scaled first), not ||alpha_i||^2 / d_i^2: alpha
    ~ 1e154 overflows the square where d_i ~ 1e160 makes the scores ~ 1. Column reductions of
    B (no T x n temporary); per column, so one outlying training point does not loosen every
    other column's bound.
    """
    xp = backend_for(B).xp
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow here is the answer
        bmax = xp.maximum(B.max(axis=0), -B.min(axis=0)).astype(np.float64)
        folded = alpha.astype(np.float64) / diag_inv.astype(np.float64)[:, None]
        g = 0.5 * (folded * folded).sum(axis=1)
        rho = float(abs(residuals).astype(np.float64).sum(axis=1).max())
        a = abs(folded).max(axis=1)
        bound = max(float((bmax * (bmax * g + rho * a)).max()), float(g.max()))
    if not bound <= 0.5 * float(np.finfo(B.dtype).max):
        raise NonFiniteError(
            f"influence scores: they can overflow {B.dtype} (bound {bound:.3g}): K, Y or the "
            f"test targets are too large in magnitude; rescale them")


def _scoring_inputs(B, diag_inv, alpha, residuals):
    """influence_scores' operands validated (see its docstring for the rules)."""
    B = as_float_matrix(B, "B")
    diag_inv = as_float_matrix(diag_inv, "diag_inv", ndim=1)
    alpha = check_min_cols(as_float_matrix(alpha, "alpha", allow_1d=True), "alpha",
                           "output column (C >= 1)")
    residuals = as_float_matrix(residuals, "residuals", allow_1d=True)
    T, n = B.shape
    if diag_inv.shape[0] != n:
        raise ShapeError(f"B and diag_inv: expected diag_inv of shape ({n},) for B of shape "
                         f"{tuple(B.shape)}, got {tuple(diag_inv.shape)}")
    if alpha.shape[0] != n:
        raise ShapeError(f"B and alpha: expected alpha with {n} rows for B of shape "
                         f"{tuple(B.shape)}, got {tuple(alpha.shape)}")
    if tuple(residuals.shape) != (T, alpha.shape[1]):
        raise ShapeError(f"residuals: expected shape ({T}, {alpha.shape[1]}) for B of shape "
                         f"{tuple(B.shape)} and alpha of shape {tuple(alpha.shape)}, got "
                         f"{tuple(residuals.shape)}")
    if not bool((diag_inv > 0).all()):
        raise ParameterError("diag_inv: expected diag(A^-1) > 0 (A positive definite), got "
                             "an entry <= 0")
    return B, diag_inv, alpha, residuals


def _private_result(B, *inputs) -> bool:
    """Whether the scores may overwrite B in place: a writeable, C-contiguous float array of
    its own, overlapping none of ``inputs`` (arrays still read afterwards; None skipped)."""
    flags = getattr(B, "flags", None)
    if flags is None or not flags.c_contiguous or not getattr(flags, "writeable", True):
        return False
    if B.dtype not in (np.float64, np.float32):
        return False
    return not any(a is not None and hasattr(a, "shape") and may_share_memory(B, a)
                   for a in inputs)


def loo_influence(K, Y, K_test, Y_test, lam: float = 1e-3, solver: str = "auto", *,
                  top_k: int | None = None, keep_scores: bool = True, check: bool = True,
                  overwrite_k: bool = False, **solver_options) -> InfluenceResult:
    """Exact (or approximate) LOO influence of every training point on every test point.

    Parameters
    ----------
    K : (n, n) symmetric PSD kernel matrix, or a kernel operator (Nystrom/CG solvers).
    Y : (n, C) or (n,) targets: one-hot for C classes, +-1 for binary.
    K_test : (T, n) kernel between test and training points (``operator.cross(X_test)``).
    Y_test : (T, C) or (T,) test targets, encoded like Y.
    lam : float > 0, default 1e-3 (the paper's ridge, A.3.1).
    solver : "auto" | "exact" | "nystrom" | "cg". "auto" picks exact when the n x n float64
        matrix fits the device's memory comfortably (see solvers.auto).
    top_k : int, optional
        Also return the k most helpful / harmful training indices per test point (all n
        of them, ranked, when k > n).
    keep_scores : bool, default True
        Keep the full (T, n) score matrix (False with top_k keeps only the indices).
    check : bool, default True
        Run the A.8 checks (symmetry, conditioning, PSD, inversion accuracy) into diagnostics.
    overwrite_k : bool, default False
        Let the exact solver factor K in place (K is destroyed); ``solver="auto"`` then plans
        for the smaller footprint (on the GPU 16 n^2 bytes instead of 24 n^2). An input that
        shares memory with K (``K_test`` a view of the same buffer, e.g. self-influence
        ``loo_influence(K, Y, K, Y, overwrite_k=True)``, or Y / Y_test) is read before K is
        destroyed: the smaller of K_test and K is copied first (Y and Y_test always), so the
        scores are those of the untouched inputs.

    Returns
    -------
    InfluenceResult
    """
    lam = check_positive(lam, "lam")
    dense = not is_kernel_operator(K)
    asym = None
    if dense:  # finite, square and symmetric: one read of K
        K, asym = check_kernel_matrix(K, "K", dtype=np.float64)
    elif isinstance(K, DenseKernel):  # the same check of the caller's matrix behind it (the
        asym = check_kernel_matrix(K.K, "K")[1]  # packed, Nystrom and CG solvers read one side)
    else:  # a caller's own operator: missing members and a NaN diagonal named, not crashed on
        K = checked_operator(K)
    Y = as_float_matrix(Y, "Y", dtype=np.float64, allow_1d=True)
    Y_test = as_float_matrix(Y_test, "Y_test", dtype=np.float64, allow_1d=True)
    K_test = as_float_matrix(K_test, "K_test", dtype=np.float64)
    n = K.shape[0]
    check_rows(K, Y, "K", "Y")
    check_min_cols(Y, "Y", "output column (C >= 1)")
    if K_test.shape[1] != n:
        raise ShapeError(f"K_test: expected {n} columns (one per training point), got shape "
                         f"{tuple(K_test.shape)}")
    check_rows(K_test, Y_test, "K_test", "Y_test")
    if Y.shape[1] != Y_test.shape[1]:
        raise ShapeError(f"Y and Y_test: inconsistent numbers of outputs: "
                         f"[{Y.shape[1]}, {Y_test.shape[1]}]")
    if n == 0 or K_test.shape[0] == 0:
        raise ShapeError(f"K and K_test: expected at least one training and one test point, "
                         f"got n={n}, T={K_test.shape[0]}")
    if top_k is not None:
        top_k = check_count(top_k, "top_k")
    keep_scores = check_flag(keep_scores, "keep_scores")
    check = check_flag(check, "check")
    if not keep_scores and top_k is None:
        raise ParameterError("keep_scores=False needs top_k (otherwise nothing is returned)")
    overwrite_k = check_flag(overwrite_k, "overwrite_k")
    if overwrite_k and (dense or isinstance(K, DenseKernel)):
        flags = (K if dense else K.K).flags
        if not getattr(flags, "writeable", True):
            raise ParameterError("overwrite_k: expected a writeable K to factor in place, got a "
                                 "read-only array (e.g. a read-only memory map); pass "
                                 "overwrite_k=False, or a writeable copy")
    if overwrite_k and (dense or isinstance(K, DenseKernel)):  # DenseKernel: the caller's K
        K_test, Y, Y_test, overwrite_k = _unshare_from_k(K if dense else K.K, K_test, Y,
                                                         Y_test)

    choose, fit_fn = get_solver(solver)
    name, options, reason = choose(K, lam, overwrite_k=overwrite_k, n_test=K_test.shape[0],
                                   n_outputs=Y.shape[1], **solver_options)
    timer = Timer(backend_for(K_test).synchronize)  # GPU stages end when their work does
    eager = {"K_test": K_test} if name == "exact" else {}  # packed storage solves it in the fit
    fit = fit_fn(name)(K, Y, lam, check=check, overwrite_k=overwrite_k, timer=timer, **options,
                       **eager)
    B = fit.right_solve(K_test)
    with timer("scoring"):
        predictions = K_test @ fit.alpha
        residuals = predictions - Y_test
        hi = lo = None
        if not keep_scores:  # nothing to check afterwards: bound the scores first
            _check_score_bound(B, fit.diag_inv, fit.alpha, residuals)
        # B is the solve's own temporary: the scores overwrite it (one T x n array fewer,
        # and no write-allocate reads of a fresh one: 0.60-0.77 of the time on two cores, RESULTS)
        out = B if _private_result(B, K if dense else None, K_test, Y_test, fit.alpha,
                                   fit.diag_inv) else None
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
            if top_k is None:  # the fit's own outputs: no need to validate them again
                from .kernels import influence_scores_fused
                scores = influence_scores_fused(B, fit.diag_inv, fit.alpha, residuals,
                                                out=out)
            else:  # scoring and per-row top-k in one pass; no (T, n) buffer unless kept
                from .kernels import influence_topk_fused
                top = influence_topk_fused(B, fit.diag_inv, fit.alpha, residuals, top_k,
                                           keep_scores=keep_scores,
                                           out=out if keep_scores else None)
                scores, hi, lo = top.scores, top.helpful, top.harmful
        if keep_scores:
            check_result_finite(scores, "influence scores")
        del B
    loo_res = fit.alpha / fit.diag_inv[:, None]
    diagnostics = dict(fit.diagnostics)
    diagnostics["solver_reason"] = reason
    if asym is not None:
        diagnostics["symmetry_rel"] = asym
    checks = _a8_verdicts(diagnostics)
    if "psd" not in checks:
        checks["not_measured"] = (
            "psd, conditioning and inverse accuracy: they need the exact solver with check=True"
            + ("" if fit.solver.startswith("exact") else
               f"; the {fit.solver} solver reports its own error measures in these diagnostics"))
    diagnostics["checks"] = checks
    return InfluenceResult(scores=scores if keep_scores else None, alpha=fit.alpha,
                           predictions=predictions, loo_residuals=loo_res, diag_inv=fit.diag_inv,
                           solver=fit.solver, top_helpful=hi, top_harmful=lo,
                           diagnostics=diagnostics, timings=dict(timer.seconds))


def _unshare_from_k(K, K_test, Y, Y_test):
    """(K_test, Y, Y_test, overwrite_k) safe to use after K is factored in place.

    Y and Y_test sharing memory with K are copied. K_test sharing it: the smaller of the two
    is copied -- K_test itself, or K (by not overwriting it: the solver then factors a copy).
    """
    Y = Y.copy() if may_share_memory(Y, K) else Y
    Y_test = Y_test.copy() if may_share_memory(Y_test, K) else Y_test
    if may_share_memory(K_test, K):
        if K_test.size <= K.size:
            K_test = K_test.copy()
        else:
            return K_test, Y, Y_test, False
    return K_test, Y, Y_test, True


# A.8 thresholds, as in the paper.
A8_TAU = 1e-12
A8_COND_MAX = 1e12


def _a8_verdicts(d: dict) -> dict:
    """Pass/fail of each A.8 check that was measured (missing measurements say so).

    PSD is judged relative to the kernel's scale, lambda_min(K) > -tau ||K|| (DESIGN, A.8):
    with the exact spectrum against its largest eigenvalue, otherwise against ||A||_1
    (``A_norm_1``, an upper bound on ||K||_2 + lam).
    """
    out = {}
    if "symmetry_rel" in d:
        out["symmetric"] = bool(d["symmetry_rel"] < 1e3 * np.finfo(np.float64).eps)
    if "lambda_min_K" in d:  # exact spectrum: decisive
        out["psd"] = bool(d["lambda_min_K_rel"] > -A8_TAU)
        out["well_conditioned"] = bool(d["cond_A"] < A8_COND_MAX)
        return _with_inverse(out, d)
    if "cond_A_estimate" in d:
        out["well_conditioned"] = bool(d["cond_A_estimate"] < A8_COND_MAX)
    psd = _psd_from_estimates(d)
    if psd is not None:
        out["psd"] = psd
    return _with_inverse(out, d)


def _psd_from_estimates(d: dict):
    """PSD verdict without the spectrum: True, False, "inconclusive", or None (not measured).

    The subspace-iteration estimate approaches lambda_min(K) from above, so it can only
    disprove PSD: False when it lies below -tau and below the float32 rounding of the factor
    (``lambda_min_resolution``), where its sign means something; this is judged first. Else
    the lower bound 1 / ||A^-1||_1 - lam above -tau gives True: ||A^-1||_1 is LAPACK pocon's
    (or the same Hager method's) estimate from below, not a proof. Anything else:
    "inconclusive".
    """
    scale = d.get("A_norm_1", 1.0) or 1.0
    bound = d.get("lambda_min_K_rel_lower_bound")
    if "lambda_min_K_estimate" in d:  # first: a disproof outranks an estimated bound
        est = d["lambda_min_K_estimate"] / scale
        res = d.get("lambda_min_resolution", 0.0) / scale
        if est <= -max(res, A8_TAU):
            return False
    if bound is not None and bound > -A8_TAU:
        return True
    if "lambda_min_K_estimate" in d:
        return "inconclusive"
    return None if bound is None else "inconclusive"


#: inverse_accurate: ||A^-1 (A V) - V||_F / ||V||_F on random probes V below this. The paper
#: (A.8, item 3) writes tau = 1e-12 for the whole ||A^-1 A - I||_F, which float64 reaches only
#: for kappa(A) near 1e3 (the residual is about kappa eps); its own conditioning bound allows
#: kappa up to 1e12. 1e-6 flags a solve that lost more than ten of its sixteen digits; the
#: measured residual is reported beside the verdict, to hold to a stricter bound.
INVERSE_RESIDUAL_MAX = 1e-6


def _with_inverse(out: dict, d: dict) -> dict:
    if d.get("inverse_residual_probe") is not None:
        out["inverse_accurate"] = bool(d["inverse_residual_probe"] < INVERSE_RESIDUAL_MAX)
    return out
