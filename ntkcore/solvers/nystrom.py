"""Nystrom kernel ridge regression: A ~ F F^T + D, inverted by Woodbury [appendix D.1].

With the low-rank factor F (n, k) of :func:`landmarks.nystrom_factor` (F F^T = K_hat =
K_nJ K_JJ^-1 K_Jn) the approximate system matrix is

    A_hat = F F^T + D,   D = lam I                          (``diag_correction=False``)
                         D = lam I + diag(K - K_hat)         (``diag_correction=True``, default)

The second form keeps the exact diagonal of K (the "FITC" correction of Snelson & Ghahramani
2006): the part of K the landmarks miss is replaced by its diagonal instead of by nothing.
At lam = 1e-3 on eNTK kernels, whose eigenvalues mostly lie far above lam, this matters: the
plain form treats every direction outside the landmark span as if its eigenvalue were 0, so
A_hat^-1 there is 1/lam, orders of magnitude too large (bench/RESULTS.md measures both). Both
forms are exact at full rank (K_hat = K, diag(K - K_hat) = 0).

Woodbury with s = D^-1/2 (a vector), G = diag(s) F, L L^T = I_k + G^T G (k x k Cholesky),
E = G L^-T (n, k):

    A_hat^-1 = diag(s) (I - E E^T) diag(s)

and everything the influence formula needs follows in O(n k^2) flops and O(n k) memory:

- alpha = A_hat^-1 Y                                                            [B.12]
- diag(A_hat^-1)_j = s_j^2 (1 - ||E_j||^2)        (exact diagonal of the approximation)
- K_test A_hat^-1 = ((K_test diag(s)) - (K_test diag(s) E) E^T) diag(s)   (T n k flops)

No n x n array is formed: F comes from ``op.columns`` (the eNTK tiles of the sampled columns).
The Cholesky of I + G^T G has condition number <= cond(A_hat), and K_JJ is never inverted
(the factor comes from a pivoted Cholesky, landmarks.py). The form is not as well posed as
the problem at tiny lam, though: 1 - ||E_j||^2 cancels when D_jj is small against the kernel,
with a relative error of about eps sqrt(k) ||E_j||^2 / (1 - ||E_j||^2) however well A_hat is
conditioned. That estimate is reported (``woodbury_diag_rel_error_estimate``), warned about
above 1e-6 and refused above 1e-2 (``_check_cancellation``).

Plain form only: K - F F^T = R is PSD, so A_hat <= A, diag(A_hat^-1) >= diag(A^-1), and as a
preconditioner the eigenvalues of A_hat^-1 A lie in [1, 1 + ||R||_2 / lam], with
||R||_2 <= tr(R) = tr(K) - ||F||_F^2 (``residual_trace``; ``nystrom_kappa_bound``).
"""

from __future__ import annotations

import warnings

import numpy as np

from .._validate import check_positive
from ..backend import backend_for
from ..errors import NotPSDError, ParameterError
from ..ntk.tiling import tiles
from .base import KRRFit, Timer
from .landmarks import as_operator, check_landmarks, check_rank, nystrom_factor

#: Rank used when none is given (and the memory budget allows it): O(n r^2) work stays
#: minutes at n = 60 000 on two cores; raise it for accuracy (see bench/RESULTS.md).
DEFAULT_RANK = 2000
#: Warn when tr(K - K_hat) / n exceeds this share of lam (see _report_missed_mass): at 0.064
#: the measured Spearman against exact was 0.92 (under the 0.99 bar), so warn well below it.
MISSED_OVER_LAM_WARN = 0.01
#: Estimated relative error of diag(A_hat^-1) from cancellation in the Woodbury form (see
#: _cancellation_error): warn above the first, refuse above the second (at 1e-2 the measured
#: scores were already 14 % off and 6 % of their signs wrong).
WOODBURY_WARN = 1e-6
WOODBURY_FAIL = 1e-2
#: Warn when the factor ended below the requested rank while tr|K - K_hat| / lam, a bound on the
#: relative change of A^-1 it causes, exceeds this (the same level as WOODBURY_WARN).
UNFACTORED_WARN = 1e-6
#: Test rows per block of ``right_apply``: its temporaries are 8 RIGHT_BLOCK (n + k) bytes,
#: within the (n, 128) column blocks solvers.auto plans for.
RIGHT_BLOCK = 128


class NystromInverse:
    """A_hat^-1 = diag(s) (I - E E^T) diag(s) for A_hat = F F^T + D (see module docstring).

    Parameters
    ----------
    F : (n, k) low-rank factor (overwritten: E is computed in its memory).
    lam : float > 0.
    info : dict from :func:`nystrom_factor` (``residual_diag`` is used when ``diag_correction``).
    diag_correction : bool, D = lam I + diag(K - F F^T) instead of lam I; negative residual
        entries (K PSD only to rounding, at most ~lam in size) count as 0 there, and are
        reported by the factor (``residual_trace``, ``residual_diag_min``).

    Attributes
    ----------
    E : (n, k) whitened factor; s : (n,) D^-1/2; lam; info; diag_correction.
    """

    def __init__(self, F, lam: float, info: dict, *, diag_correction: bool = True):
        be = backend_for(F)
        xp = be.xp
        self.lam = float(lam)
        self.info = info
        self.diag_correction = bool(diag_correction)
        n, k = F.shape
        if diag_correction:
            D = xp.asarray(np.clip(info["residual_diag"], 0.0, None)) + lam
        else:
            D = xp.full(n, lam, dtype=np.float64)
        self.s = 1.0 / xp.sqrt(D)
        self.diag_rel_error_estimate = 0.0
        if k == 0:
            self.E = F
            self._e_sq = xp.zeros(n, dtype=F.dtype)
            return
        F *= self.s[:, None]  # G = diag(s) F, in place
        M = F.T @ F
        M[xp.arange(k), xp.arange(k)] += 1.0
        try:
            L = be.cholesky(M, overwrite=True)
        except np.linalg.LinAlgError as exc:  # I + G^T G is SPD in exact arithmetic
            raise NotPSDError(f"nystrom: I + G^T G is not positive definite ({exc}); "
                              f"lam={lam:g} is too small for float64") from None
        self.E = _right_trsm_lt(be, L, F)
        self._e_sq = be.sum_of_squares(self.E, axis=1)
        self.diag_rel_error_estimate = _cancellation_error(be, self._e_sq, k)

    @property
    def rank(self) -> int:
        return int(self.E.shape[1])

    def apply(self, V):
        """A_hat^-1 V for V (n, s) (or (n,))."""
        E = self.E
        sc = self.s if V.ndim == 1 else self.s[:, None]
        out = V * sc  # updated in place: one (n, s) temporary besides the result
        out -= E @ (E.T @ out)
        out *= sc
        return out

    def right_apply(self, Kt):
        """Kt A_hat^-1 for Kt (T, n) (A_hat^-1 is symmetric): a new (T, n) array, computed in
        it ``RIGHT_BLOCK`` rows at a time, so the temporaries are one (RIGHT_BLOCK, n) and
        one (RIGHT_BLOCK, k) array whatever T is."""
        E, s = self.E, self.s[None, :]
        xp = backend_for(E).xp
        T = Kt.shape[0]
        out = xp.empty((T, E.shape[0]), dtype=np.float64)
        for t0, t1 in tiles(T, RIGHT_BLOCK):
            blk = out[t0:t1]
            xp.multiply(Kt[t0:t1], s, out=blk)
            blk -= (blk @ E) @ E.T
            blk *= s
        return out

    def diag(self):
        """(n,) exact diagonal of A_hat^-1, O(n k)."""
        return (1.0 - self._e_sq) * self.s * self.s

    def diagnostics(self) -> dict:
        d = {k: v for k, v in self.info.items() if k not in ("pivots", "residual_diag")}
        d["diag_correction"] = self.diag_correction
        d["woodbury_diag_rel_error_estimate"] = self.diag_rel_error_estimate
        if not self.diag_correction:
            d["nystrom_kappa_bound"] = 1.0 + self.info["residual_trace"] / self.lam
        return d


def _cancellation_error(be, e_sq, k: int) -> float:
    """Rounding error of diag(A_hat^-1)_j = s_j^2 (1 - ||E_j||^2), relative, worst j.

    The subtraction cancels: ||E_j||^2 -> 1 where D_jj is small against the kernel (tiny lam,
    and a landmark span that holds e_j), so the relative error is about
    eps sqrt(k) ||E_j||^2 / (1 - ||E_j||^2), whatever cond(A_hat) is. The factor 3 sqrt(k)
    covers what was measured at full rank k = 200, lam = 1e-5 .. 1e-14 (the observed worst
    error was 1.5-2.4 eps sqrt(k) c).
    inf when some 1 - ||E_j||^2 <= 0 (the diagonal entry has no correct digit left).
    """
    gap = 1.0 - e_sq
    if not bool(be.xp.all(gap > 0)):
        return float("inf")
    worst = float(be.xp.max(e_sq / gap))
    return 3.0 * np.sqrt(k) * np.finfo(np.float64).eps * worst


def _check_cancellation(inv: NystromInverse, solver: str = "nystrom") -> None:
    """Warn above WOODBURY_WARN and refuse above WOODBURY_FAIL (see _cancellation_error).

    The CG solver applies the same test: its diag(A^-1) estimate adds probe samples to the
    Woodbury diag(A_hat^-1) (the control variate), so it inherits that error as a bias the
    probes' standard error does not show.
    """
    err = inv.diag_rel_error_estimate
    if err <= WOODBURY_WARN:
        return
    what = "diag(A_hat^-1)" if solver == "nystrom" else \
        "diag(A_hat^-1), the control variate of the diag(A^-1) estimate,"
    msg = (f"{solver}: lam={inv.lam:g} is so small against the kernel that the Woodbury form "
           f"loses digits in float64: {what} has an estimated relative error of {err:.2g}")
    if err > WOODBURY_FAIL:
        raise ParameterError(msg + "; raise lam, or use solver='exact'")
    warnings.warn(msg + "; scores carry that error", stacklevel=4)


def _report_missed_mass(diagnostics: dict, *, n: int, lam: float) -> None:
    """Add ``missed_over_lam`` = tr(K - K_hat) / (n lam) to ``diagnostics`` and warn above
    ``MISSED_OVER_LAM_WARN``.

    The mean diagonal of K that the landmarks miss, in units of the ridge: where it is large,
    A_hat differs from A by more than lam in directions the influence scores depend on, and
    the rankings move far from exact. Measured on Fashion-MNIST eNTKs (bench/RESULTS.md):
    5.4 gave Spearman 0.71-0.84 against exact, 0.064 (lam = 1) gave 0.92; only CG reached 0.99.
    """
    ratio = diagnostics["residual_trace"] / (n * lam)
    diagnostics["missed_over_lam"] = ratio
    if ratio > MISSED_OVER_LAM_WARN:
        warnings.warn(
            f"nystrom: the landmarks miss {ratio:.3g} x lam of K's diagonal per point "
            f"(tr(K - K_hat)/n = {ratio * lam:.3g}); scores are exact only for the "
            f"approximation and rankings can differ widely from exact ones; raise rank, or use "
            f"solver='cg' (it solves the exact A to a residual tolerance tol; its error is "
            f"bounded by about cond(A) * tol, not by the rank)", stacklevel=3)


def _report_unfactored(diagnostics: dict, *, lam: float) -> None:
    """Add ``residual_over_lam`` = tr|K - K_hat| / lam to ``diagnostics`` and warn above
    ``UNFACTORED_WARN`` when the factor ended below the requested rank.

    For PSD K - K_hat, ||A^-1 - A_hat^-1|| <= ||A^-1|| tr(K - K_hat) / lam: the ratio bounds
    the relative change of A^-1. A factor ends early only when no pivot candidate is left (the
    residual lies below the pivot tolerance, or is negative: K is PSD only to rounding) or
    when the ratio is below landmarks.STOP_RTOL; in the first case the requested rank could
    not be reached, and the scores can differ from exact ones by about this ratio.
    """
    ratio = diagnostics["residual_trace"] / lam
    diagnostics["residual_over_lam"] = ratio
    k, r = diagnostics["rank"], diagnostics["rank_requested"]
    if k < r and ratio > UNFACTORED_WARN:
        warnings.warn(
            f"nystrom: the factor ended at rank {k} of {r} requested ({diagnostics['stopped']});"
            f" the residual it leaves, sum |diag(K - K_hat)| = "
            f"{diagnostics['residual_trace']:.3g} (most negative entry "
            f"{diagnostics['residual_diag_min']:.3g}), is {ratio:.3g} x lam, so scores can "
            f"differ from exact ones by about that relative amount; use solver='exact', or "
            f"raise lam", RuntimeWarning, stacklevel=3)


def _right_trsm_lt(be, L, F):
    """F L^-T (triangular solve from the right; in place on F's memory on the CPU)."""
    if be.name == "cpu":
        from scipy.linalg import blas
        return blas.dtrsm(1.0, L, np.asfortranarray(F), side=1, lower=1, trans_a=1,
                          overwrite_b=1)
    return be.solve_triangular(L, F.T, lower=True).T


def nystrom_inverse(K, lam: float, *, rank: int | None = None, landmarks: str = "rpcholesky",
                    seed: int = 0, diag_correction: bool = True,
                    timer: Timer | None = None) -> NystromInverse:
    """Build :class:`NystromInverse` for A = K + lam I from an array or kernel operator
    (ParameterError unless lam is a finite number > 0)."""
    lam = check_positive(lam, "lam")
    op = as_operator(K)
    rank = check_rank(DEFAULT_RANK if rank is None else rank, op.n)
    check_landmarks(landmarks)
    timer = timer or Timer()
    with timer("landmarks"):
        F, info = nystrom_factor(op, rank, landmarks=landmarks, seed=seed, ridge=lam)
    with timer("woodbury"):
        return NystromInverse(F, lam, info, diag_correction=diag_correction)


def nystrom_fit(K, Y, lam: float, *, rank: int | None = None, landmarks: str = "rpcholesky",
                seed: int = 0, diag_correction: bool = True, check: bool = True,
                overwrite_k: bool = False, timer: Timer | None = None) -> KRRFit:
    """Kernel ridge regression with the Nystrom approximation K ~ K_nS K_SS^+ K_Sn.

    Parameters
    ----------
    K : (n, n) array or kernel operator (``n``, ``diag()``, ``columns(idx)``). With an operator
        (e.g. :class:`ReluNTKOperator`) only r columns of K are ever assembled.
    Y : (n, C) float64 targets.
    lam : float > 0, ridge.
    rank : int, default ``DEFAULT_RANK`` (2000), capped at n. Number of landmarks r; cost
        O(n r^2) flops, memory 8 n r bytes (plus one (n, 128) column block).
    landmarks : "uniform" | "rpcholesky", default "rpcholesky" (randomly pivoted Cholesky).
    seed : int, default 0, seed of the landmark draw.
    diag_correction : bool, default True, A_hat = K_hat + diag(K - K_hat) + lam I (keeps the
        exact diagonal of K; far more accurate at small lam, same cost). False: the textbook
        A_hat = K_hat + lam I.
    check, overwrite_k : accepted for the common solver interface; K is never modified and the
        exact solver's A.8 checks do not apply (the approximation error is reported instead).
    timer : Timer collecting stage times ("landmarks", "woodbury", "alpha", "diag_inv",
        "right_solve").

    Returns
    -------
    KRRFit with ``solver="nystrom"``: ``alpha`` = A_hat^-1 Y, ``diag_inv`` = the exact
    diagonal of A_hat^-1, ``right_solve(K_test)`` = K_test A_hat^-1. ``diagnostics``: the
    rank used, landmark method, dropped landmarks, ``residual_trace`` = tr(K - K_hat) (an
    upper bound on ||K - K_hat||_2 for PSD residuals), its share of tr(K), ``residual_over_lam``,
    ``missed_over_lam``, why the factor ended (``stopped``), ``diag_correction``.

    Warns (RuntimeWarning) when the factor ended below ``rank`` with a residual above 1e-6 lam
    (``UNFACTORED_WARN``), when tr(K - K_hat) / n exceeds 0.01 lam, and when the Woodbury form
    loses digits (refuses beyond 1e-2 estimated relative error).
    """
    timer = timer or Timer()
    inv = nystrom_inverse(K, lam, rank=rank, landmarks=landmarks, seed=seed,
                          diag_correction=diag_correction, timer=timer)
    _check_cancellation(inv)
    with timer("alpha"):
        alpha = inv.apply(Y)
    with timer("diag_inv"):
        diag_inv = inv.diag()
    diagnostics = inv.diagnostics()
    _report_missed_mass(diagnostics, n=int(diag_inv.shape[0]), lam=lam)
    _report_unfactored(diagnostics, lam=lam)
    corr = " + diag(K - K_hat)" if diag_correction else ""
    diagnostics["approximation"] = (f"Nystrom rank {inv.rank} ({landmarks}): scores are exact "
                                    f"for A_hat = K_hat{corr} + lam I, K_hat = K_nS K_SS^+ K_Sn")

    def right_solve(K_test):
        """(T, n) K_test A_hat^-1 from the low-rank form."""
        with timer("right_solve"):
            return inv.right_apply(K_test)

    return KRRFit(alpha=alpha, diag_inv=diag_inv, right_solve=right_solve, solver="nystrom",
                  diagnostics=diagnostics, timings=timer.seconds)
