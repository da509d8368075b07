"""Nystrom kernel ridge regression: A ~ F F^T + lam I, inverted by Woodbury [appendix D.1].

With the low-rank factor F (n, k) of :func:`landmarks.nystrom_factor` (F F^T = K_nJ K_JJ^-1
K_Jn), the approximate system matrix A_hat = F F^T + lam I has the exact inverse (Woodbury)

    A_hat^-1 = (I - E E^T) / lam,    E = F L^-T,    L L^T = lam I_k + F^T F  (k x k Cholesky).

Everything the influence formula needs follows in O(n k^2) flops and O(n k) memory:

- alpha = A_hat^-1 Y = (Y - E (E^T Y)) / lam                                   [B.12]
- diag(A_hat^-1)_j = (1 - ||E_j||^2) / lam        (exact diagonal of the approximation)
- K_test A_hat^-1 = (K_test - (K_test E) E^T) / lam                   (T n k flops)

No n x n array is formed: F comes from ``op.columns`` (the eNTK tiles of the sampled columns).
The Cholesky of lam I + F^T F has condition number <= (lam + ||F||^2) / lam = cond(A_hat), so
it is as well posed as the problem itself; F is never squared into a pseudo-inverse of K_JJ.

Because K - F F^T = R is PSD, A_hat <= A, hence diag(A_hat^-1) >= diag(A^-1), and as a
preconditioner the eigenvalues of A_hat^-1 A lie in [1, 1 + ||R||_2 / lam], with
||R||_2 <= tr(R) = tr(K) - ||F||_F^2 (reported as ``residual_trace``).
"""

from __future__ import annotations

import numpy as np

from ..backend import backend_for
from ..errors import NotPSDError
from .base import KRRFit, Timer
from .landmarks import as_operator, check_landmarks, check_rank, nystrom_factor

#: Rank used when none is given (and the memory budget allows it): O(n r^2) work stays
#: minutes at n = 60 000 on two cores; raise it for accuracy (see bench/RESULTS.md).
DEFAULT_RANK = 2000


class NystromInverse:
    """A_hat^-1 = (I - E E^T) / lam for A_hat = F F^T + lam I (see module docstring).

    Attributes
    ----------
    E : (n, k) whitened factor F L^-T.
    lam : float.
    info : dict of landmark diagnostics (see :func:`nystrom_factor`).
    """

    def __init__(self, F, lam: float, info: dict):
        be = backend_for(F)
        xp = be.xp
        self.lam = float(lam)
        self.info = info
        k = F.shape[1]
        if k == 0:
            self.E = F
            return
        M = F.T @ F
        M[xp.arange(k), xp.arange(k)] += lam
        try:
            L = be.cholesky(M, overwrite=True)
        except np.linalg.LinAlgError as exc:  # lam I + F^T F is SPD for lam > 0
            raise NotPSDError(f"nystrom: lam I + F^T F is not positive definite ({exc}); "
                              f"lam={lam:g} is too small for float64") from None
        self.E = _right_trsm_lt(be, L, F)

    @property
    def rank(self) -> int:
        return int(self.E.shape[1])

    def apply(self, V):
        """A_hat^-1 V for V (n, s) (or (n,))."""
        E = self.E
        return (V - E @ (E.T @ V)) / self.lam

    def right_apply(self, Kt):
        """Kt A_hat^-1 for Kt (T, n) (A_hat^-1 is symmetric)."""
        E = self.E
        return (Kt - (Kt @ E) @ E.T) / self.lam

    def diag(self):
        """(n,) exact diagonal of A_hat^-1, O(n k)."""
        E = self.E
        return (1.0 - (E * E).sum(axis=1)) / self.lam

    def diagnostics(self) -> dict:
        d = {k: v for k, v in self.info.items() if k != "pivots"}
        d["nystrom_kappa_bound"] = 1.0 + self.info["residual_trace"] / self.lam
        return d


def _right_trsm_lt(be, L, F):
    """F L^-T (triangular solve from the right; in place on F's memory on the CPU)."""
    if be.name == "cpu":
        from scipy.linalg import blas
        return blas.dtrsm(1.0, L, np.asfortranarray(F), side=1, lower=1, trans_a=1,
                          overwrite_b=1)
    return be.solve_triangular(L, F.T, lower=True).T


def nystrom_inverse(K, lam: float, *, rank: int | None = None, landmarks: str = "rpcholesky",
                    seed: int = 0, timer: Timer | None = None) -> NystromInverse:
    """Build :class:`NystromInverse` for A = K + lam I from an array or kernel operator."""
    op = as_operator(K)
    rank = check_rank(DEFAULT_RANK if rank is None else rank, op.n)
    check_landmarks(landmarks)
    timer = timer or Timer()
    with timer("landmarks"):
        F, info = nystrom_factor(op, rank, landmarks=landmarks, seed=seed)
    with timer("woodbury"):
        return NystromInverse(F, lam, info)


def nystrom_fit(K, Y, lam: float, *, rank: int | None = None, landmarks: str = "rpcholesky",
                seed: int = 0, check: bool = True, overwrite_k: bool = False,
                timer: Timer | None = None) -> KRRFit:
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
    check, overwrite_k : accepted for the common solver interface; K is never modified and the
        exact solver's A.8 checks do not apply (the approximation error is reported instead).
    timer : Timer collecting stage times ("landmarks", "woodbury", "alpha", "diag_inv",
        "right_solve").

    Returns
    -------
    KRRFit with ``solver="nystrom"``: ``alpha`` = A_hat^-1 Y, ``diag_inv`` = the exact
    diagonal of A_hat^-1, ``right_solve(K_test)`` = K_test A_hat^-1. ``diagnostics``: the
    rank used, landmark method, dropped landmarks, ``residual_trace`` = tr(K - K_hat) (an
    upper bound on ||K - K_hat||_2), its share of tr(K), and ``nystrom_kappa_bound``.
    """
    timer = timer or Timer()
    inv = nystrom_inverse(K, lam, rank=rank, landmarks=landmarks, seed=seed, timer=timer)
    with timer("alpha"):
        alpha = inv.apply(Y)
    with timer("diag_inv"):
        diag_inv = inv.diag()
    diagnostics = inv.diagnostics()
    diagnostics["approximation"] = (f"Nystrom rank {inv.rank} ({landmarks}): scores are exact "
                                    f"for A_hat = K_hat + lam I, K_hat = K_nS K_SS^+ K_Sn")

    def right_solve(K_test):
        """(T, n) K_test A_hat^-1 from the low-rank form."""
        with timer("right_solve"):
            return inv.right_apply(K_test)

    return KRRFit(alpha=alpha, diag_inv=diag_inv, right_solve=right_solve, solver="nystrom",
                  diagnostics=diagnostics, timings=timer.seconds)
