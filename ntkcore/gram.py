"""Gram matrices, Gram powers, linearized-attention features and spectra [Thm 4.1, 4.7].

All functions accept NumPy or CuPy arrays and return the same kind (dispatch via backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._validate import as_float_matrix, check_cols
from .backend import backend_for
from .errors import ParameterError, ShapeError


def gram(X, X2=None):
    """Gram matrix X X2^T.

    Parameters
    ----------
    X : (n, d) array
    X2 : (n2, d) array, optional (default X; then the result is exactly symmetric)

    Returns
    -------
    (n, n2) array, same kind and dtype as X.
    """
    X = as_float_matrix(X, "X")
    if X2 is None:
        G = _self_gram(X)
        return (G + G.T) * 0.5  # exact symmetry regardless of BLAS blocking
    X2 = as_float_matrix(X2, "X2")
    check_cols(X, X2, "X", "X2")
    return X @ X2.T


def _self_gram(X):
    """X X^T; on the CPU above ``SYRK_MAX_N`` rows by row-block GEMMs, because OpenBLAS's
    threaded SYRK (NumPy's X @ X.T) segfaulted there (see ntkcore.kernels.assembly)."""
    from .kernels.assembly import GRAM_ROWS, SYRK_MAX_N
    from .ntk.tiling import tiles
    n = X.shape[0]
    if n <= SYRK_MAX_N or backend_for(X).name != "cpu":
        return X @ X.T
    G = np.empty((n, n), dtype=X.dtype)
    for i0, i1 in tiles(n, GRAM_ROWS):
        G[i0:i1] = X[i0:i1] @ X.T
    return G


def gram_power(X, p: int):
    """(X X^T)^p computed on the cheaper side [Thm 4.1; Remark 4.8 for p = 2k+1].

    When n > d the d x d side is cheaper: (X X^T)^p = X (X^T X)^(p-1) X^T, costing
    O(n d^2 + p d^3 + n^2 d) instead of O(p n^3). Otherwise repeated squaring on the n x n side.

    Parameters
    ----------
    X : (n, d) array
    p : int >= 1

    Returns
    -------
    (n, n) symmetric array.
    """
    X = as_float_matrix(X, "X")
    if not isinstance(p, (int, np.integer)) or p < 1:
        raise ParameterError(f"p: expected an integer >= 1, got {p!r}")
    n, d = X.shape
    xp = backend_for(X).xp
    if n > d:
        M = X.T @ X  # (d, d)
        inner = _matrix_power(M, p - 1, xp)
        out = X @ inner @ X.T
    else:
        out = _matrix_power(X @ X.T, p, xp)
    return (out + out.T) * 0.5


def _matrix_power(A, p, xp):
    """A^p by binary powering (p >= 0)."""
    result = xp.eye(A.shape[0], dtype=A.dtype)
    base = A
    while p:
        if p & 1:
            result = result @ base
        p >>= 1
        if p:
            base = base @ base
    return result


def _rownorm(A, xp):
    norms = xp.linalg.norm(A, axis=1, keepdims=True)
    norms = xp.where(norms > 0, norms, 1.0)
    return A / norms


def attention_features(X, Q=None, normalize: bool = True):
    """Linearized-attention features [Def 3.1, A.1], transductive over the training set X.

    Training rows: rownorm(X X^T X) = rownorm(X M) with M = X^T X (d x d).
    Query rows q: rownorm(M q) (= rownorm(q^T M) since M is symmetric).
    Cost O(n d^2 + T d^2); never forms the n x n Gram matrix.

    Parameters
    ----------
    X : (n, d) training rows (the whole training set).
    Q : (T, d) query rows, optional (default X).
    normalize : bool, default True
        L2-normalize each output row (the paper feeds unit rows to the MLP).

    Returns
    -------
    (T, d) array (or (n, d) when Q is None).
    """
    X = as_float_matrix(X, "X")
    xp = backend_for(X).xp
    M = X.T @ X
    if Q is None:
        F = X @ M
    else:
        Q = as_float_matrix(Q, "Q")
        check_cols(X, Q, "X", "Q")
        F = Q @ M
    return _rownorm(F, xp) if normalize else F


@dataclass
class SpectrumResult:
    """Eigen-spectrum of G = X X^T and the condition numbers of Theorem 4.7.

    Attributes
    ----------
    eigenvalues : (min(n, d),) descending nonzero-side eigenvalues of G (from the cheaper side)
    kappa : lambda_1 / lambda_n of G (inf when G is singular, i.e. n > d or rank-deficient)
    kappa_effective : lambda_1 / lambda_r over the numerically nonzero eigenvalues (Remark B.11)
    kappa_cubed : kappa(G^3) from the eigenvalues of the matrix G^3 (Theorem 4.7: = kappa^3)
    kappa_cubed_effective : the same over the top ``rank`` eigenvalues
    rank : numerical rank used for kappa_effective
    n, d : shape of X
    """

    eigenvalues: np.ndarray
    kappa: float
    kappa_effective: float
    kappa_cubed: float
    kappa_cubed_effective: float
    rank: int
    n: int
    d: int
    notes: list = field(default_factory=list)


def spectrum(X, *, rank_rtol: float | None = None) -> SpectrumResult:
    """Eigenvalues of G = X X^T and kappa(G), effective kappa_d, kappa(G^3) [Thm 4.7, Remark B.11].

    The nonzero eigenvalues of X X^T equal those of X^T X, so the smaller side is
    diagonalised (cost O(min(n,d)^3 + n d min(n,d))). When n > d, G has n - d zero eigenvalues
    and kappa(G) is infinite; the effective kappa_d = lambda_1 / lambda_d is reported instead.

    Parameters
    ----------
    X : (n, d) array
    rank_rtol : eigenvalues below rank_rtol * lambda_1 count as zero
        (default: max(n, d) * eps(float64), the usual numerical-rank threshold).
    """
    X = as_float_matrix(X, "X", dtype=np.float64)
    if X.shape[0] == 0:
        raise ShapeError(f"X: expected at least one row (a Gram matrix with a spectrum), got "
                         f"shape {tuple(X.shape)}")
    be = backend_for(X)
    n, d = X.shape
    small = X @ X.T if n <= d else X.T @ X
    ev = be.to_host(be.eigvalsh((small + small.T) * 0.5))[::-1].copy()
    ev = np.clip(ev, 0.0, None)
    lam1 = float(ev[0]) if ev.size else 0.0
    rtol = max(n, d) * np.finfo(np.float64).eps if rank_rtol is None else rank_rtol
    nonzero = ev[ev > rtol * lam1] if lam1 > 0 else ev[:0]
    rank = int(nonzero.size)
    notes = []
    full_rank = n <= d and rank == n
    kappa = lam1 / float(ev[-1]) if full_rank else float("inf")
    kappa_eff = lam1 / float(nonzero[-1]) if rank else float("inf")
    if not full_rank:
        notes.append(f"G is singular (n={n}, d={d}, rank={rank}); kappa(G) is infinite, "
                     f"effective kappa over {rank} nonzero eigenvalues reported")
    # kappa(G^3) from the matrix G^3 itself (not by cubing lambda), so that the identity
    # kappa(G^3) = kappa(G)^3 of Theorem 4.7 is a check, not a tautology. The nonzero spectrum
    # of G^3 is that of small^3 (X^T X)^3 or (X X^T)^3 on the smaller side.
    cube = small @ small @ small
    ev3 = np.clip(be.to_host(be.eigvalsh((cube + cube.T) * 0.5))[::-1], 0.0, None)
    top3 = ev3[:rank] if rank else ev3[:0]
    kappa3_eff = float(top3[0] / top3[-1]) if rank and top3[-1] > 0 else float("inf")
    kappa3 = kappa3_eff if full_rank else float("inf")
    return SpectrumResult(eigenvalues=ev, kappa=kappa, kappa_effective=kappa_eff,
                          kappa_cubed=kappa3, kappa_cubed_effective=kappa3_eff, rank=rank,
                          n=n, d=d, notes=notes)
