"""Nystrom landmarks and the low-rank factor K ~ F F^T = K_nS K_SS^+ K_Sn [appendix D.1].

Two ways to pick the landmark set S (|S| = r):

- ``"uniform"``: r distinct indices drawn uniformly at random.
- ``"rpcholesky"``: randomly pivoted Cholesky (Chen, Epperly, Tropp, Webber 2023), blocked.
  Pivots are sampled with probability proportional to the diagonal of the residual
  K - F F^T, so the choice adapts to what the landmarks so far fail to explain. It reads only
  diag(K) and the r sampled columns of K (``op.columns``), never the whole matrix.

Stabilisation (never an explicit inverse of an ill-conditioned K_SS): every block of sampled
columns G (n, b) is factored through a *pivoted* Cholesky of its residual block H = G[S] with
LAPACK ``pstrf``. Pivots whose residual falls below ``PIVOT_RTOL * max diag(K)`` are dropped
(the dropped Schur complement is that small on the diagonal; it stays in the reported
residual), the rest give F_new = G_J L_J^-T by a triangular solve. No shift is added; dropped
landmarks are counted and reported (``landmarks_dropped``), and a warning names the count when
uniform landmarks end up below the requested rank. Cost O(n r^2) flops, memory: F (n, r) plus
one (n, b) block.

Early stop (RPCholesky): only when the positive residual diagonal of the points not yet tried
sums to at most min(TRACE_RTOL tr(K), STOP_RTOL lam) -- negligible against rounding *and*
against the ridge, so stopping cannot make the fit worse than the requested rank would by more
than a relative STOP_RTOL (||A^-1 - A_hat^-1|| <= ||A^-1|| tr(K - K_hat) / lam for PSD
K - K_hat) -- or when no candidate is left (every residual dropped or <= 0). The residual
diagonal is reported unclipped: negative entries (a K that is PSD only to rounding) count by
magnitude in ``residual_trace`` and show in ``residual_diag_min``.

Also here: :func:`as_operator` (dense arrays become :class:`DenseKernel`; a
:class:`ReluNTKOperator` gets a view that caches its bit-packed activation patterns, so each
column or row tile costs only its own products).
"""

from __future__ import annotations

import warnings

import numpy as np

from .._validate import check_count
from ..backend import backend_for
from ..errors import NotPSDError, ParameterError
from ..ntk.tiling import tiles
from .operator import DenseKernel, ReluNTKOperator

LANDMARKS = ("uniform", "rpcholesky")
#: Pivots with residual diagonal below this share of max diag(K) are dropped: a few thousand
#: ulps of the diagonal, i.e. rounding noise of an (n, r) residual update, far below any ridge
#: used in practice (lam = 1e-3 against diag(K) ~ 0.5 for unit-norm inputs).
PIVOT_RTOL = 1e-12
#: RPCholesky stops before the requested rank only once the untried residual trace is at most
#: min(TRACE_RTOL * tr(K), STOP_RTOL * lam): below rounding of K and, relative to the ridge,
#: below what a float64 solve of A resolves (the inverse moves by <= STOP_RTOL relative).
#: With lam = 0 (a bare factor) the first alone applies.
TRACE_RTOL = 1e-13
STOP_RTOL = 1e-10
#: A residual diagonal diag(K - F F^T) below -max(ridge, PSD_RTOL * max diag(K)) is refused:
#: for a PSD K it is a Schur complement's diagonal, >= 0 up to rounding; below -ridge the
#: ridge cannot absorb it (the exact solver's Cholesky of K + lam I fails on such kernels), and
#: a kernel that is PSD only to float32 rounding (eigenvalues ~ -4e-5) still passes.
PSD_RTOL = 1e-9
#: Columns read per RPCholesky round: large enough for BLAS-3 column assembly, small enough
#: that sampling adapts (Epperly et al. use blocks of this order).
DEFAULT_BLOCK = 128


def as_operator(K):
    """The operator view of ``K``: a dense (n, n) array -> DenseKernel; a ReluNTKOperator ->
    a pattern-caching view of it; any other operator is returned unchanged."""
    if hasattr(K, "ndim"):
        return DenseKernel(K)
    if type(K) is ReluNTKOperator:
        return CachedReluNTK(K)
    return K


class CachedReluNTK:
    """View of a :class:`ReluNTKOperator` that computes the activation patterns once.

    ``relu_ntk`` recomputes S = 1[X W^T > 0] for all n rows on every call (n d m flops), which
    dominates a call that only wants b << n columns. This view keeps S as an (n, m) uint8
    array (n m bytes; no bit packing, so the same code runs under CuPy, whose ``unpackbits``
    has no ``axis``) and assembles each tile ((S_i S_j^T) / m) * (X_i X_j^T) (+ the output
    layer term (1/m) relu(X_i W^T) relu(X_j W^T)^T when ``train_a``, for which relu(X W^T) is
    kept too: 8 n m bytes) from it; trained output weights (``op.weights`` = a_r^2) scale the
    row side's patterns, which are then float64. Same values as the wrapped operator (tested).
    """

    #: columns per tile when a block spans all n columns (bounds the float32 pattern copy).
    COL_TILE = 8192

    def __init__(self, op: ReluNTKOperator):
        self.op = op
        self.X, self.W, self.train_a, self.tile = op.X, op.W, op.train_a, op.tile
        self.weights = getattr(op, "weights", None)  # a_r^2, None for +-1 output weights
        self.n, self.shape, self.dtype, self.xp = op.n, op.shape, op.dtype, op.xp
        xp = self.xp
        self.m = self.W.shape[0]
        self.S = xp.empty((self.n, self.m), dtype=np.uint8)
        self.H = xp.empty((self.n, self.m), dtype=np.float64) if self.train_a else None
        for i0, i1 in tiles(self.n, self.tile):
            Z = self.X[i0:i1] @ self.W.T
            self.S[i0:i1] = Z > 0
            if self.train_a:
                self.H[i0:i1] = xp.maximum(Z, 0)

    def diag(self):
        """K_ii = (sum_r a_r^2 1[unit r active at x_i] / m) ||x_i||^2 (+ ||relu(W x_i)||^2 / m);
        a_r^2 = 1 without output weights."""
        xp = self.xp
        active = self.S.sum(axis=1, dtype=np.float64) if self.weights is None else \
            self.S.astype(np.float64) @ self.weights
        d = active / self.m * backend_for(self.X).sum_of_squares(self.X, axis=1)
        if self.train_a:
            d += backend_for(self.H).sum_of_squares(self.H, axis=1) / self.m
        return d

    def _pattern(self, S_rows):
        """Row-side patterns for ``_tile``: float32 0/1 (their counts are exact integers,
        <= m < 2^24), or float64 a_r^2-weighted with trained output weights."""
        if self.weights is None:
            return S_rows.astype(np.float32)
        return S_rows.astype(np.float64) * self.weights[None, :]

    def _tile(self, Xi, Si, Hi, cols):
        """((Si S_cols^T) / m) * (Xi X_cols^T) (+ output-layer term), Si from ``_pattern``."""
        out = Xi @ self.X[cols].T
        out *= Si @ self.S[cols].astype(Si.dtype).T
        out *= 1.0 / self.m
        if Hi is not None:
            out += (Hi @ self.H[cols].T) / self.m
        return out

    def _rows_block(self, Xi, Si, Hi, cols=None):
        """K(rows, cols) for the given row data; cols=None means all n (in column tiles)."""
        if cols is not None:
            return self._tile(Xi, Si, Hi, cols)
        out = self.xp.empty((Xi.shape[0], self.n), dtype=np.float64)
        for j0, j1 in tiles(self.n, self.COL_TILE):
            out[:, j0:j1] = self._tile(Xi, Si, Hi, slice(j0, j1))
        return out

    def columns(self, idx):
        """(n, b) K[:, idx], assembled in row tiles."""
        idx = self.xp.asarray(idx)
        out = self.xp.empty((self.n, int(idx.shape[0])), dtype=np.float64)
        for i0, i1 in tiles(self.n, self.tile):
            Hi = self.H[i0:i1] if self.train_a else None
            out[i0:i1] = self._tile(self.X[i0:i1], self._pattern(self.S[i0:i1]), Hi, idx)
        return out

    def rows(self, i0: int, i1: int):
        Hi = self.H[i0:i1] if self.train_a else None
        return self._rows_block(self.X[i0:i1], self._pattern(self.S[i0:i1]), Hi)

    def block(self, i0, i1, j0, j1):
        """K[i0:i1, j0:j1] from the cached patterns (column tiles of at most COL_TILE).

        On the CPU without the output-layer term: one GEMM X_i X_j^T into the result and the
        fused Numba pass multiplying popcount(P_i & P_j) / m in (kernel 1), from bit-packed
        patterns kept beside S (n m / 8 bytes more).
        """
        if self.xp is np and not self.train_a and self.weights is None:
            return self._block_packed_bits(i0, i1, j0, j1)
        Hi = self.H[i0:i1] if self.train_a else None
        Si = self._pattern(self.S[i0:i1])
        out = self.xp.empty((i1 - i0, j1 - j0), dtype=np.float64)
        for c0, c1 in tiles(j1 - j0, self.COL_TILE):
            out[:, c0:c1] = self._tile(self.X[i0:i1], Si, Hi, slice(j0 + c0, j0 + c1))
        return out

    def _block_packed_bits(self, i0, i1, j0, j1):
        from ..backend import Backend
        from ..kernels import numba_kernels as nk
        from ..kernels.assembly import CPU_PASS_TILE, pack_activations
        if getattr(self, "_PT", None) is None:
            self._PT = pack_activations(self.X, self.W, Backend("cpu"), tile=self.tile)
        out = np.empty((i1 - i0, j1 - j0))
        np.matmul(self.X[i0:i1], self.X[j0:j1].T, out=out)
        PTi = np.ascontiguousarray(self._PT[:, i0:i1])
        PTj = np.ascontiguousarray(self._PT[:, j0:j1])
        pairs = nk.tile_pairs(i1 - i0, j1 - j0, CPU_PASS_TILE, False)
        nk.entk_scale(out, PTi, PTj, 1.0 / self.m, False, False, pairs)
        return out

    def matmat(self, V):
        """K @ V for V (n, k), one (tile, n) block at a time: memory O(tile * n)."""
        V = self.xp.asarray(V)
        out = self.xp.empty((self.n,) + V.shape[1:], dtype=np.float64)
        for i0, i1 in tiles(self.n, self.tile):
            out[i0:i1] = self.rows(i0, i1) @ V
        return out

    def cross(self, X_query):
        """(T, n) K(X_query, X) from the cached patterns of X."""
        from .._validate import as_float_matrix, check_cols
        xp = self.xp
        Xq = as_float_matrix(X_query, "X_query", dtype=np.float64)
        check_cols(Xq, self.X, "X_query", "X")
        out = xp.empty((Xq.shape[0], self.n), dtype=np.float64)
        for q0, q1 in tiles(Xq.shape[0], self.tile):
            Z = Xq[q0:q1] @ self.W.T
            Hq = xp.maximum(Z, 0) if self.train_a else None
            out[q0:q1] = self._rows_block(Xq[q0:q1], self._pattern(Z > 0), Hq)
        return out

    @property
    def dense_is_private(self) -> bool:
        return getattr(self.op, "dense_is_private", False)

    def dense(self):
        return self.op.dense()


def check_landmarks(landmarks):
    if landmarks not in LANDMARKS:
        raise ParameterError(f"landmarks: expected one of {LANDMARKS}, got {landmarks!r}")
    return landmarks


def check_rank(rank, n):
    return min(check_count(rank, "rank"), int(n))


def nystrom_factor(op, rank: int, *, landmarks: str = "rpcholesky", seed: int = 0,
                   block: int = DEFAULT_BLOCK, ridge: float = 0.0):
    """Low-rank factor F (n, k), k <= rank, with F F^T = K_nJ K_JJ^-1 K_Jn for landmarks J.

    Parameters
    ----------
    op : kernel operator (``n``, ``diag()``, ``columns(idx)``); see :func:`as_operator`.
    rank : int, number of landmarks requested (capped at n).
    landmarks : "uniform" | "rpcholesky", default "rpcholesky" (adaptive; better for a given r).
    ridge : float, the lam of the system the factor serves: a residual diagonal below -ridge
        (or below rounding, when larger) is NotPSDError (see PSD_RTOL), and RPCholesky stops
        before ``rank`` only when the residual is negligible against it (see STOP_RTOL).
    seed : int, seed of the landmark draw (NumPy ``default_rng``).
    block : int, columns per RPCholesky round.

    Returns
    -------
    F : (n, k) float64 array, Fortran order, on the operator's device.
    info : dict with ``pivots`` (k,) int array of the landmarks kept, and the diagnostics
        ``rank_requested``, ``rank``, ``landmarks``, ``landmarks_dropped``, ``pivot_tolerance``,
        ``trace_K``, ``residual_trace`` = sum_i |diag(K - F F^T)_i| (= tr(K - F F^T) >=
        ||K - F F^T||_2 when the residual is PSD; negative entries, from a K PSD only to
        rounding, count by magnitude), ``residual_trace_rel`` (over tr(K)),
        ``residual_diag_min``, ``stopped`` (why the factor ended), and ``residual_diag`` (n,)
        host array diag(K - F F^T), unclipped.
    """
    check_landmarks(landmarks)
    n = op.n
    rank = check_rank(rank, n)
    d = op.diag()
    xp = op.xp if hasattr(op, "xp") else np
    be = backend_for(d)
    d_host = be.to_host(d).astype(np.float64).copy()
    with np.errstate(over="ignore"):  # inf past float64: only compared and reported
        trace0 = float(d_host.sum())
    tol_abs = PIVOT_RTOL * float(d_host.max()) if n else 0.0
    psd_tol = max(float(ridge), PSD_RTOL * float(np.abs(d_host).max()) if n else 0.0)
    _check_residual_diag(d_host, psd_tol)
    rng = np.random.default_rng(seed)
    F = xp.zeros((n, rank), dtype=np.float64, order="F")
    k = 0
    pivots, dropped = [], 0
    stopped = "rank reached"
    stop_abs = _stop_threshold(trace0, ridge)
    untried = np.ones(n, dtype=bool)  # points not yet offered as pivots
    if landmarks == "uniform":
        S = np.sort(rng.choice(n, size=rank, replace=False))
        k, dropped = _add_block(be, op, F, 0, S, d_host, tol_abs, psd_tol, pivots)
        if k < rank:
            stopped = f"{rank - k} landmarks dependent to tolerance (dropped)"
    else:
        while k < rank:
            # a residual at or below the pivot tolerance would be dropped: not a candidate
            # (sampling such columns only costs operator work; on an exactly low-rank K that
            # was 45 % of all points at n = 16 000)
            w = np.where(untried & (d_host > tol_abs), d_host, 0.0)
            top = float(w.max())  # weights over their largest: their sum cannot overflow
            w = w / top if top > 0 else w
            total = top * float(w.sum())  # (inf past float64 only compares with stop_abs)
            if total <= stop_abs:
                stopped = (f"residual trace of the untried points ({total:.3g}) <= "
                           f"{stop_abs:.3g}: negligible against lam and rounding")
                if total == 0.0:
                    stopped = ("no pivot candidate left (every residual is at or below the "
                               "pivot tolerance, tried, or <= 0)")
                break
            b = min(block, rank - k, int(np.count_nonzero(w)))
            S = np.sort(rng.choice(n, size=b, replace=False, p=w / w.sum()))
            untried[S] = False  # kept, or dropped below tol_abs (and only shrinking)
            kk, dr = _add_block(be, op, F, k, S, d_host, tol_abs, psd_tol, pivots)
            k += kk
            dropped += dr
    F = F[:, :k]
    residual_trace = float(np.abs(d_host).sum())
    info = {"pivots": np.asarray(pivots, dtype=np.int64), "rank_requested": rank, "rank": k,
            "landmarks": landmarks, "landmarks_dropped": dropped,
            "pivot_tolerance": tol_abs, "trace_K": trace0, "residual_trace": residual_trace,
            "residual_trace_rel": residual_trace / trace0 if trace0 > 0 else 0.0,
            "residual_diag_min": float(d_host.min()) if n else 0.0,
            "stopped": stopped, "seed": seed, "residual_diag": d_host}
    if k < rank and landmarks == "uniform":
        warnings.warn(f"nystrom: {rank - k} of {rank} uniform landmarks were numerically "
                      f"dependent (residual pivot <= {tol_abs:.2g}) and were dropped; rank "
                      f"{k} is used", RuntimeWarning, stacklevel=3)
    return F, info


def _stop_threshold(trace0: float, ridge: float) -> float:
    """Residual trace below which RPCholesky stops before the requested rank: negligible
    both against rounding of K (TRACE_RTOL tr(K)) and against the ridge (STOP_RTOL lam)."""
    floor = TRACE_RTOL * trace0
    return min(floor, STOP_RTOL * ridge) if ridge > 0 else floor


def _check_residual_diag(d_host, psd_tol: float) -> None:
    worst = float(d_host.min()) if d_host.size else 0.0
    if worst < -psd_tol:
        raise NotPSDError(f"K is not positive semidefinite: the residual diagonal of its "
                          f"low-rank factor, diag(K - K_hat), reached {worst:.3g}, below "
                          f"{-psd_tol:.2g} (the ridge, or rounding); a PSD K keeps it >= 0. "
                          f"Check the kernel (is it a valid NTK?) or raise lam")


def _add_block(be, op, F, k, S, d_host, tol_abs, psd_tol, pivots):
    """Append the pivoted-Cholesky factor of the residual columns S to F[:, k:]; update the
    residual diagonal ``d_host`` in place (NotPSDError where it turns negative beyond
    rounding). Returns (columns added, pivots dropped)."""
    from scipy.linalg import lapack
    xp = be.xp
    S_dev = xp.asarray(S)
    G = op.columns(S_dev)  # (n, b) fresh array
    if k:
        G -= F[:, :k] @ F[S_dev, :k].T
    H = be.to_host(G[S_dev])
    H = 0.5 * (H + H.T)
    c, piv, kk, info = lapack.dpstrf(H, tol=tol_abs, lower=1)
    if info < 0:  # pragma: no cover - argument error inside LAPACK
        raise RuntimeError(f"dpstrf failed (info={info})")
    if kk == 0 or float(np.max(np.diag(H))) <= tol_abs:
        kk = 0
    keep = piv[:kk] - 1
    if kk:
        L = xp.asarray(np.tril(c[:kk, :kk]))
        Gk = xp.asfortranarray(G[:, xp.asarray(keep)])
        del G
        # F_new^T = L^-1 G_J^T  (triangular solve; no inverse of K_JJ is formed)
        Fnew = be.solve_triangular(L, Gk.T, lower=True, overwrite_b=True).T
        F[:, k:k + kk] = Fnew
        d_host -= be.to_host((Fnew * Fnew).sum(axis=1))
        pivots.extend(int(s) for s in S[keep])
    _check_residual_diag(d_host, psd_tol)
    if kk:
        d_host[S[keep]] = 0.0  # kept pivots are exact (to rounding); dropped ones keep theirs
    return int(kk), int(len(S) - kk)
