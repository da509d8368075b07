"""Kernel 2 drivers: fused LOO influence scores and per-row top-k on either backend.

I(i, t) = U (U/2 ||alpha_i||^2 - r_t . alpha_i),  U = B / diag(A^-1),  B = K_test A^-1
[Def 3.3 via Thm B.9]. One pass over B (T x n); the cross term r_t . alpha_i is formed on
the fly (C multiply-adds per entry) instead of as a second T x n matrix. Top-k keeps the k
largest ("most helpful") and k smallest ("most harmful") scores per test row while scanning,
so no T x n buffer is needed unless the caller keeps the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import Backend
from ..ntk.tiling import DEFAULT_TEMP_FRACTION, tile_rows, tiles

_TOPK_CHUNK_BYTES = 8 << 20  # scores of one CPU top-k chunk: stays in a 16-32 MB L3


@dataclass
class TopK:
    """Per-row top-k of the influence scores (rows = test points).

    helpful, harmful : (T, k) int64 indices of the largest / smallest scores, best first
        (ties to the smaller index, the order of a stable argsort).
    helpful_scores, harmful_scores : (T, k) the matching scores.
    scores : (T, n) every score when requested, else None.
    """

    helpful: object
    harmful: object
    helpful_scores: object
    harmful_scores: object
    scores: object = None


def _prepare(B, diag_inv, alpha, residuals, xp):
    """Operands of the kernels: B with contiguous rows, 1-D diag, alpha (n, C), R (T, C)."""
    if B.dtype not in (np.float64, np.float32):  # the kernels are built for these two
        B = B.astype(np.float64)
    dt = B.dtype
    if B.strides[1] != B.itemsize or B.strides[0] % B.itemsize:
        B = xp.ascontiguousarray(B)  # the kernels step rows by whole entries
    dinv = xp.ascontiguousarray(diag_inv, dtype=dt).reshape(-1)
    C = alpha.shape[1] if alpha.ndim == 2 else 1  # explicit: reshape(0, -1) is ambiguous
    alpha = alpha.reshape(alpha.shape[0], C).astype(dt, copy=False)
    R = xp.ascontiguousarray(residuals.reshape(residuals.shape[0], C), dtype=dt)
    return B, dinv, alpha, R


def _folded_operands(dinv, alpha, xp):
    """The CUDA kernels' (dinv (n,), half_sq (n,), alphaT (C, n)) in the CPU kernel's folded
    form, from diag_inv (n,) and alpha (n, C): alpha'_i =
    alpha_i / dinv_i (scaled first: ||alpha_i||^2 alone overflows at |alpha| ~ 1e154, where
    dinv_i may be 1e160), half_sq = ||alpha'_i||^2 / 2 and dinv = 1 (the kernels' U = B / 1 =
    B exactly). So both backends compute b (b g_i - r . alpha'_i), with the same bound."""
    folded = alpha / dinv[:, None]
    half_sq = xp.ascontiguousarray(0.5 * xp.einsum("ic,ic->i", folded, folded))
    return xp.ones_like(dinv), half_sq, xp.ascontiguousarray(folded.T)


def influence_scores_fused(B, diag_inv, alpha, residuals, *, out=None,
                           backend: Backend | None = None):
    """(T, n) influence scores in one pass over B.

    Parameters
    ----------
    B : (T, n) K_test A^-1, float64 (or float32).
    diag_inv : (n,) diag(A^-1).
    alpha : (n, C) A^-1 Y.
    residuals : (T, C) f(x_t) - y_t.
    out : (T, n) C-contiguous array to write, optional; may be ``B`` itself (in place, saves
        a T x n buffer).

    Returns
    -------
    out : (T, n) scores, positive = helpful.
    """
    be = backend or _backend_of(B)
    xp = be.xp
    B, dinv, alpha, R = _prepare(B, diag_inv, alpha, residuals, xp)
    if out is None:
        out = xp.empty(B.shape, dtype=B.dtype)
    if B.size == 0:  # T = 0 or n = 0: nothing to score (and no kernel launch of size 0)
        return out
    if be.name == "cuda":
        from . import cuda
        S = out if _kernel_writes(out, B) else xp.empty_like(B)
        cuda.influence_scores(B, *_folded_operands(dinv, alpha, xp), R, S)
        if S is not out:
            out[...] = S
    else:
        _cpu_scorer(dinv, alpha)(B, R, out)
    return out


def influence_topk_fused(B, diag_inv, alpha, residuals, k: int, *, keep_scores: bool = False,
                         out=None, backend: Backend | None = None) -> TopK:
    """Top-k most helpful and most harmful training points per test point, fused with scoring.

    Parameters as :func:`influence_scores_fused`; ``k`` is clipped to n. With
    ``keep_scores`` every score is also written (into ``out`` when given; it may be ``B``).
    Without it the scores stream through a bounded buffer (CPU: about 8 MB, at least 4 rows,
    so for small T x n it may hold them all; on the GPU, k > 16 or more than 5632 classes in
    float64 use row chunks whose size comes from free memory).

    Returns
    -------
    TopK
    """
    be = backend or _backend_of(B)
    xp = be.xp
    B, dinv, alpha, R = _prepare(B, diag_inv, alpha, residuals, xp)
    T, n = B.shape
    k = int(min(k, n))
    if keep_scores and out is None:
        out = xp.empty(B.shape, dtype=B.dtype)
    hi_idx = xp.empty((T, k), dtype=np.int64)
    lo_idx = xp.empty((T, k), dtype=np.int64)
    hi_val = xp.empty((T, k), dtype=B.dtype)
    lo_val = xp.empty((T, k), dtype=B.dtype)
    if T == 0 or k == 0:
        return TopK(hi_idx, lo_idx, hi_val, lo_val, out if keep_scores else None)
    if be.name == "cpu":
        _topk_cpu_chunked(B, dinv, alpha, R, k, hi_idx, hi_val, lo_idx, lo_val,
                          out if keep_scores else None)
    else:
        from . import cuda
        ones, half_sq, alphaT = _folded_operands(dinv, alpha, xp)
        S = out if not keep_scores or _kernel_writes(out, B) else xp.empty_like(B)
        if k <= cuda.TOPK_MAX and alpha.shape[1] * B.itemsize <= cuda.TOPK_SHARED_MAX:
            cuda.influence_topk(B, ones, half_sq, alphaT, R, k, hi_idx, hi_val, lo_idx,
                                lo_val, S if keep_scores else None)
        else:
            _topk_gpu_chunked(be, B, ones, half_sq, alphaT, R, k, hi_idx, hi_val, lo_idx,
                              lo_val, S if keep_scores else None)
        if keep_scores and S is not out:
            out[...] = S
    return TopK(hi_idx, lo_idx, hi_val, lo_val, out if keep_scores else None)


def _kernel_writes(out, B) -> bool:
    """Whether the scoring kernels can write ``out`` directly: B's dtype, adjacent entries
    in a row, rows a whole number of entries apart (they address it as out[t * ld + i])."""
    return (out.dtype == B.dtype and (out.shape[1] <= 1 or out.strides[1] == out.itemsize)
            and out.strides[0] % out.itemsize == 0)


def _cpu_scorer(dinv, alpha):
    """``score(B, R, out)`` for row chunks of one problem: the register-blocked tile kernel
    (:mod:`.numba_tile`, any class count), its per-column operands packed once here,
    straight from alpha. An ``out`` the tile cannot write directly (another dtype than B's,
    columns that are not contiguous, or rows that do not start a whole number of entries apart)
    is filled through a buffer of B's layout."""
    from . import numba_tile
    g, alpha_blocks = numba_tile.pack_operands(dinv, alpha)

    def score(B, R, out):
        if _kernel_writes(out, B):
            numba_tile.score_rows(B, g, alpha_blocks, R, out)
        else:
            buffer = np.empty(B.shape, dtype=B.dtype)
            numba_tile.score_rows(B, g, alpha_blocks, R, buffer)
            out[...] = buffer
    return score


def _topk_cpu_chunked(B, dinv, alpha, R, k, hi_idx, hi_val, lo_idx, lo_val, S):
    """Top-k on the CPU: score a chunk of test rows (small enough to stay in the last-level
    cache, or straight into ``S`` when the scores are kept), then scan it with two heaps."""
    from . import numba_kernels as nk
    T, n = B.shape
    rows = max(4, min(T, _TOPK_CHUNK_BYTES // max(1, n * B.itemsize)) // 4 * 4)
    buf = None if S is not None else np.empty((min(rows, T), n), dtype=B.dtype)
    score = _cpu_scorer(dinv, alpha)
    for t0, t1 in tiles(T, rows):
        chunk = S[t0:t1] if S is not None else buf[:t1 - t0]
        score(B[t0:t1], R[t0:t1], chunk)
        nk.topk_scan(chunk, k, hi_idx[t0:t1], hi_val[t0:t1], lo_idx[t0:t1], lo_val[t0:t1])


def _topk_gpu_chunked(be, B, dinv, half_sq, alphaT, R, k, hi_idx, hi_val, lo_idx, lo_val, S):
    """k > 16 on the GPU: score a chunk of rows, then a stable sort per row (chunk x n only)."""
    from . import cuda
    xp = be.xp
    T, n = B.shape
    budget = int(be.free_memory_bytes() * DEFAULT_TEMP_FRACTION)
    # per row: the scores buffer and -scores (itemsize n each), the int64 sort order and the
    # sort's own key and index copies (about 32 n); one order alive at a time
    per_row = n * (2 * B.itemsize + 32)
    rows = tile_rows(0, per_row, budget=budget, n=T, minimum=1, maximum=T)
    buf = None if S is not None else xp.empty((rows, n), dtype=B.dtype)
    for t0, t1 in tiles(T, rows):
        chunk = S[t0:t1] if S is not None else buf[:t1 - t0]
        cuda.influence_scores(B[t0:t1], dinv, half_sq, alphaT, R[t0:t1], chunk)
        for largest, idx, val in ((True, hi_idx, hi_val), (False, lo_idx, lo_val)):
            order = xp.argsort(-chunk if largest else chunk, axis=1, kind="stable")  # CuPy's
            top = order[:, :k].copy()  # only kind; the full order is freed here
            del order
            idx[t0:t1] = top
            val[t0:t1] = xp.take_along_axis(chunk, top, axis=1)


def _backend_of(B) -> Backend:
    from ..backend import is_gpu_array
    return Backend("cuda" if is_gpu_array(B) else "cpu")
