"""Gram matrices, Gram powers, linearized-attention features and spectra [Thm 4.1, 4.7].

All functions accept NumPy or CuPy arrays and return the same kind (dispatch via backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._validate import (
    as_float_matrix,
    as_scalar,
    check_cols,
    check_count,
    check_flag,
    check_min_cols,
    check_result_finite,
    is_finite_number,
)
from .backend import backend_for
from .errors import ConvergenceError, ParameterError, ShapeError


def gram(X, X2=None):
    """Gram matrix X X2^T.

    Parameters
    ----------
    X : (n, d) array
    X2 : (n2, d) array, optional (default X; then the result is exactly symmetric)

    Returns
    -------
    (n, n2) array, same kind and dtype as X.

    Raises
    ------
    ShapeError : d = 0, or X2 with another d. NonFiniteError : NaN/Inf in the inputs, or a
    result that overflowed (rescale the inputs). MemoryBudgetError : the result does not fit
    in free memory (raised before any work).
    """
    X = check_min_cols(as_float_matrix(X, "X"), "X")
    if X2 is not None:
        X2 = as_float_matrix(X2, "X2")
        check_cols(X, X2, "X", "X2")
    _check_fits(X, X.shape[0] if X2 is None else X2.shape[0], 1, "gram")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        if X2 is None:
            G = _symmetrized(_self_gram(X))  # exact symmetry regardless of BLAS blocking
        else:
            G = X @ X2.T
    return check_result_finite(G, "gram")


#: rows and columns of the blocks :func:`_symmetrized` averages (8 MB of float64 each)
_SYMMETRIZE_BLOCK = 1024


def _check_fits(X, n2, copies, what):
    """MemoryBudgetError up front unless ``copies`` (n, n2) arrays of X's dtype fit."""
    from .ntk.tiling import check_output_fits
    check_output_fits((X.shape[0], n2), X.dtype.itemsize, backend_for(X), copies=copies,
                      what=f"{what} output", alternative="")


def _symmetrized(G):
    """G <- (G + G^T) / 2 in place, one pair of blocks at a time (no n x n temporary):
    entry (i, j) and (j, i) both become (G_ij + G_ji) * 0.5, exactly symmetric."""
    n = G.shape[0]
    step = _SYMMETRIZE_BLOCK
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        for j0 in range(i0, n, step):
            j1 = min(n, j0 + step)
            upper, lower = G[i0:i1, j0:j1], G[j0:j1, i0:i1]
            mean = (upper + lower.T) * 0.5
            upper[...] = mean
            lower[...] = mean.T
    return G


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

    Raises
    ------
    ParameterError : p not an integer >= 1 (bools are refused). ShapeError : d = 0.
    NonFiniteError : NaN/Inf in X, or a result that overflowed (rescale X or lower p).
    """
    X = check_min_cols(as_float_matrix(X, "X"), "X")
    p = check_count(p, "p")
    n, d = X.shape
    xp = backend_for(X).xp
    # peak: the result alone (n > d), or the power's result, base and new product (n <= d)
    _check_fits(X, n, 1 if n > d else 3, f"gram_power(p={p})")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        if n > d:
            M = X.T @ X  # (d, d)
            inner = _matrix_power(M, p - 1, xp)
            out = X @ inner @ X.T
        else:
            out = _matrix_power(X @ X.T, p, xp)
        out = _symmetrized(out)
    return check_result_finite(out, f"gram_power(p={p})")


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
    """Unit rows (zero rows stay zero); each row is first divided by its largest |entry|, so
    that the norm of a finite row never overflows."""
    peak = xp.abs(A).max(axis=1, keepdims=True)  # d >= 1 (checked by the caller)
    A = A / xp.where(peak > 0, peak, 1.0)
    norms = xp.linalg.norm(A, axis=1, keepdims=True)
    norms = xp.where(norms > 0, norms, 1.0)
    return A / norms


#: |exponent| of the largest |entry| of X up to which products of a few factors of X (X M,
#: G^3) can neither overflow nor underflow: such an X is used as it is (no copy)
_SAFE_EXPONENT = 48


def _binary_scale(A, xp):
    """(A 2^-e, e): A scaled by a power of two (exact) so that its largest |entry| lies in
    [0.5, 1), when that entry lies outside 2^+-_SAFE_EXPONENT; else (A, 0), A itself. Scale-free
    results (unit rows, condition numbers) computed from the returned A neither overflow nor
    underflow in products of up to six factors (G^3)."""
    if not A.size:
        return A, 0
    top = max(float(A.max()), -float(A.min()))  # no |A| temporary
    if top == 0.0:
        return A, 0
    e = math.frexp(top)[1]
    if abs(e) <= _SAFE_EXPONENT:
        return A, 0
    return xp.ldexp(A, -e), e  # elementwise: 2^-e itself may not be a float64


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

    Raises
    ------
    ShapeError : d = 0, or Q with another d. ParameterError : normalize not a bool.
    NonFiniteError : NaN/Inf in the inputs, or features that overflowed (rescale X).
    """
    X = check_min_cols(as_float_matrix(X, "X"), "X")
    if Q is not None:
        Q = as_float_matrix(Q, "Q")
        check_cols(X, Q, "X", "Q")
    normalize = check_flag(normalize, "normalize")
    xp = backend_for(X).xp
    if normalize:  # rownorm(c^3 X M) = rownorm(X M): X (and Q) scaled by powers of two, so
        X = _binary_scale(X, xp)[0]  # tiny or huge rows neither under- nor overflow
        Q = None if Q is None else _binary_scale(Q, xp)[0]
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        M = X.T @ X
        F = check_result_finite(X @ M if Q is None else Q @ M, "attention_features")
    return _rownorm(F, xp) if normalize else F


@dataclass
class SpectrumResult:
    """Eigen-spectrum of G = X X^T and the condition numbers of Theorem 4.7.

    Attributes
    ----------
    eigenvalues : (min(n, d),) descending nonzero-side eigenvalues of G (from the cheaper side),
        on X's device (NumPy or CuPy)
    kappa : lambda_1 / lambda_n of G (inf when G is singular, i.e. n > d or rank-deficient)
    kappa_effective : lambda_1 / lambda_r over the numerically nonzero eigenvalues (Remark B.11)
    kappa_cubed : kappa(G^3) from the eigenvalues of the matrix G^3 (Theorem 4.7: = kappa^3)
    kappa_cubed_effective : the same over the top ``rank`` eigenvalues
    rank : numerical rank used for kappa_effective
    n, d : shape of X
    """

    eigenvalues: object
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
    X : (n, d) array, NumPy or CuPy (the eigenvalues are returned on X's device; the
        condition numbers and rank are Python numbers).
    rank_rtol : float >= 0, optional
        Eigenvalues at or below rank_rtol * lambda_1 count as zero
        (default: max(n, d) * eps(float64), the usual numerical-rank threshold).

    Raises
    ------
    ShapeError : no rows or no columns. ParameterError : rank_rtol not a finite number >= 0.
    NonFiniteError : NaN/Inf in X, or the eigenvalues of G overflowed float64 (rescale X;
        the condition numbers are scale-free and computed on X scaled by a power of two).
    ConvergenceError : the eigensolver did not converge.
    """
    X = check_min_cols(as_float_matrix(X, "X", dtype=np.float64), "X")
    if X.shape[0] == 0:
        raise ShapeError(f"X: expected at least one row (a Gram matrix with a spectrum), got "
                         f"shape {tuple(X.shape)}")
    if rank_rtol is not None:
        value = as_scalar(rank_rtol)
        if not (is_finite_number(value) and value >= 0):
            raise ParameterError(f"rank_rtol: expected a finite number >= 0, got "
                                 f"{rank_rtol!r}")
        rank_rtol = float(value)
    be = backend_for(X)
    xp = be.xp
    n, d = X.shape
    # On X 2^-e (exact): the condition numbers and the rank are scale-free, and the scaled
    # G and G^3 neither overflow nor underflow (X 1e-55 gave kappa(G^3) = inf, X 1e-165 "G is
    # singular"); only the reported eigenvalues are scaled back, by 4^e.
    Xs, e = _binary_scale(X, xp)
    small = Xs @ Xs.T if n <= d else Xs.T @ Xs
    # kappa(G^3) from the matrix G^3 itself (not by cubing lambda), so that the identity
    # kappa(G^3) = kappa(G)^3 of Theorem 4.7 is a check, not a tautology. The nonzero
    # spectrum of G^3 is that of small^3 (X^T X)^3 or (X X^T)^3 on the smaller side.
    cube = small @ small @ small
    ev_scaled = _descending_eigenvalues(be, small)  # on X's device
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported here
        ev = check_result_finite(xp.ldexp(ev_scaled, 2 * e) if e else ev_scaled,
                                 "spectrum: the eigenvalues of X X^T")
    lam1 = float(ev_scaled[0])
    rtol = max(n, d) * np.finfo(np.float64).eps if rank_rtol is None else rank_rtol
    rank = int(xp.count_nonzero(ev_scaled > rtol * lam1)) if lam1 > 0 else 0  # a prefix
    notes = []
    full_rank = n <= d and rank == n
    kappa = lam1 / float(ev_scaled[-1]) if full_rank else float("inf")
    kappa_eff = lam1 / float(ev_scaled[rank - 1]) if rank else float("inf")
    if not full_rank:
        notes.append(f"G is singular (n={n}, d={d}, rank={rank}); kappa(G) is infinite, "
                     f"effective kappa over {rank} nonzero eigenvalues reported")
    ev3 = _descending_eigenvalues(be, cube)
    top3_last = float(ev3[rank - 1]) if rank else 0.0
    kappa3_eff = float(ev3[0]) / top3_last if rank and top3_last > 0 else float("inf")
    kappa3 = kappa3_eff if full_rank else float("inf")
    return SpectrumResult(eigenvalues=ev, kappa=kappa, kappa_effective=kappa_eff,
                          kappa_cubed=kappa3, kappa_cubed_effective=kappa3_eff, rank=rank,
                          n=n, d=d, notes=notes)


def _descending_eigenvalues(be, S):
    """Eigenvalues of the symmetric part of S, descending, clipped at 0, on S's device."""
    try:
        ev = be.eigvalsh((S + S.T) * 0.5)
    except np.linalg.LinAlgError as exc:
        raise ConvergenceError(f"spectrum: the eigensolver did not converge on the "
                               f"{S.shape[0]} x {S.shape[0]} Gram matrix ({exc})") from None
    return be.xp.maximum(ev[::-1], 0.0)
