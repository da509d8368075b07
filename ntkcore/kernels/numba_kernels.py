"""Numba CPU twins of the CUDA kernels (same algorithms, one tile at a time).

All kernels are ``njit(cache=True)`` (most ``parallel=True``), compiled once per process and
cached on disk (STYLE rule 9); ``fastmath`` is off, so results round like the NumPy references.
They validate nothing: the callers in :mod:`ntkcore.kernels` check shapes, dtypes and contiguity.

Bit layout of packed activation patterns (CPU): ``PT[w, r]`` (``uint64``, shape
(ceil(m/64), n)) holds bit ``b`` = 1[z_{r, 64 w + b} > 0]; padding bits (64 w + b >= m) are 0,
so they never count. The transposed layout puts consecutive rows of one word next to each
other, which lets the popcount loop run across columns j in SIMD lanes (AVX-512 VPOPCNTQ or
the popcnt instruction: LLVM recognises the bit-twiddling sequence in ``_popcount64``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_ONE = np.uint64(1)


@njit(inline="always", cache=True)
def _popcount64(x):
    """Number of set bits of a uint64 (SWAR sequence; LLVM folds it into ctpop)."""
    x = x - ((x >> _ONE) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


@njit(parallel=True, cache=True)
def pack_signs(Z, PT, r0):
    """PT[:, r0 + r] <- bits 1[Z[r, :] > 0] (64 per word, padding bits zero), in place.

    Z : (rows, m) float array (a block of X W^T); PT : (ceil(m/64), n) uint64.
    """
    rows, m = Z.shape
    words = PT.shape[0]
    for r in prange(rows):
        for w in range(words):
            word = np.uint64(0)
            base = 64 * w
            top = min(64, m - base)
            for b in range(top):
                if Z[r, base + b] > 0.0:
                    word |= _ONE << np.uint64(b)
            PT[w, r0 + r] = word


@njit(inline="always", cache=True)
def _count_into(cnt, row, pi):
    """cnt[j] += popcount(pi & row[j]) over one word of every column (SIMD across j)."""
    for jj in range(cnt.shape[0]):
        cnt[jj] += _popcount64(pi & row[jj])


@njit(cache=True)
def tile_pairs(n, n2, tile, sym):
    """(npairs, 4) int64 rows (i0, i1, j0, j1) of the tile pairs to visit; sym: j0 >= i0."""
    nbi = (n + tile - 1) // tile
    nbj = (n2 + tile - 1) // tile
    count = 0
    for bi in range(nbi):
        count += nbj - bi if sym else nbj
    pairs = np.empty((count, 4), dtype=np.int64)
    p = 0
    for bi in range(nbi):
        for bj in range(bi if sym else 0, nbj):
            pairs[p, 0] = bi * tile
            pairs[p, 1] = min(n, (bi + 1) * tile)
            pairs[p, 2] = bj * tile
            pairs[p, 3] = min(n2, (bj + 1) * tile)
            p += 1
    return pairs


@njit(inline="always", cache=True)
def _mirror_pair(out, i0, i1, j0, j1):
    """out[j, i] <- out[i, j] for the pair's entries with j > i (writes run along rows j)."""
    for j in range(j0, j1):
        top = min(i1, j)
        for i in range(i0, top):
            out[j, i] = out[i, j]


@njit(parallel=True, cache=True)
def entk_scale(out, PT, PT2, inv_m, sym, mirror, pairs):
    """Fused eNTK pass [Thm 4.2]: out[i, j] <- out[i, j] * popcount(P_i & P2_j) * inv_m.

    ``out`` (n, n2) must hold the Gram matrix X X2^T (for ``sym``, at least its upper
    triangle j >= i; only that triangle is read and scaled). PT, PT2: packed patterns
    (words, n) / (words, n2). ``pairs`` from :func:`tile_pairs` (one parallel task each).
    With ``mirror`` (needs ``sym``) the scaled upper triangle is copied to the lower one, so K
    is exactly symmetric.
    """
    words = PT.shape[0]
    for p in prange(pairs.shape[0]):
        i0, i1, j0, j1 = pairs[p, 0], pairs[p, 1], pairs[p, 2], pairs[p, 3]
        cnt = np.empty(j1 - j0, dtype=np.uint64)
        for i in range(i0, i1):
            js = max(j0, i) if sym else j0  # first column computed in this row
            c = cnt[:j1 - js]
            c[:] = 0
            for w in range(words):
                pi = PT[w, i]
                if pi != 0:
                    _count_into(c, PT2[w, js:j1], pi)
            orow = out[i, js:j1]
            for q in range(j1 - js):
                orow[q] = orow[q] * (np.float64(c[q]) * inv_m)
        if mirror:
            _mirror_pair(out, i0, i1, j0, j1)


@njit(parallel=True, cache=True)
def mirror_upper(out, pairs):
    """out[j, i] <- out[i, j] for every j > i (pairs from ``tile_pairs(n, n, t, True)``)."""
    for p in prange(pairs.shape[0]):
        _mirror_pair(out, pairs[p, 0], pairs[p, 1], pairs[p, 2], pairs[p, 3])


@njit(parallel=True, cache=True)
def copy_into(src, dst, r0, c0):
    """dst[r0 + i, c0 + j] <- src[i, j], rows in parallel: a host copy near memory bandwidth
    (NumPy's assignment runs on one core)."""
    for i in prange(src.shape[0]):
        drow = dst[r0 + i, c0:c0 + src.shape[1]]
        srow = src[i]
        for j in range(srow.shape[0]):
            drow[j] = srow[j]


@njit(parallel=True, cache=True)
def arccos_scale(out, norms, norms2, sym, pairs):
    """Infinite-width ReLU NTK on a Gram matrix, in place [Thm 4.2]:

    out[i, j] <- g (pi - acos(clip(g / (|x_i| |x2_j|), -1, 1))) / (2 pi), g = out[i, j];
    zero where a norm is zero. With ``sym`` only the upper triangle is read, the diagonal is
    set to g / 2 exactly (theta = 0; acos(1 - ulp) would add ~1e-8) and the result mirrored.
    """
    inv_2pi = 1.0 / (2.0 * math.pi)
    for p in prange(pairs.shape[0]):
        i0, i1, j0, j1 = pairs[p, 0], pairs[p, 1], pairs[p, 2], pairs[p, 3]
        for i in range(i0, i1):
            js = max(j0, i) if sym else j0
            for j in range(js, j1):
                g = out[i, j]
                den = norms[i] * norms2[j]
                v = 0.0
                if sym and i == j:
                    v = 0.5 * g
                elif den > 0.0:
                    c = g / den
                    c = min(1.0, max(-1.0, c))
                    v = g * (math.pi - math.acos(c)) * inv_2pi
                out[i, j] = v
        if sym:
            _mirror_pair(out, i0, i1, j0, j1)


# ----------------------------------------------------------------------------- top-k
@njit(inline="always", cache=True)
def _worse(v1, i1, v2, i2):
    """Ordering of the top-k lists: larger value first, ties to the smaller index."""
    return v1 < v2 or (v1 == v2 and i1 > i2)


@njit(cache=True)
def _sift_down(hv, hi, size, pos):
    """Restore the min-heap (root = worst entry) below ``pos``."""
    while True:
        left = 2 * pos + 1
        if left >= size:
            return
        child = left
        right = left + 1
        if right < size and _worse(hv[right], hi[right], hv[left], hi[left]):
            child = right
        if _worse(hv[child], hi[child], hv[pos], hi[pos]):
            hv[pos], hv[child] = hv[child], hv[pos]
            hi[pos], hi[child] = hi[child], hi[pos]
            pos = child
        else:
            return


@njit(cache=True)
def _heap_offer(hv, hi, size, k, v, i):
    """Offer (v, i) to a heap holding the ``size`` best so far; returns the new size."""
    if size < k:
        pos = size
        hv[pos] = v
        hi[pos] = i
        while pos > 0:  # sift up
            parent = (pos - 1) // 2
            if _worse(hv[pos], hi[pos], hv[parent], hi[parent]):
                hv[pos], hv[parent] = hv[parent], hv[pos]
                hi[pos], hi[parent] = hi[parent], hi[pos]
                pos = parent
            else:
                break
        return size + 1
    if _worse(hv[0], hi[0], v, i):
        hv[0] = v
        hi[0] = i
        _sift_down(hv, hi, size, 0)
    return size


@njit(cache=True)
def _heap_drain(hv, hi, size, idx_out, val_out, sign):
    """Write the heap best-first into idx_out / val_out (values multiplied back by sign)."""
    for pos in range(size - 1, -1, -1):
        idx_out[pos] = hi[0]
        val_out[pos] = sign * hv[0]
        size -= 1
        hv[0] = hv[size]
        hi[0] = hi[size]
        _sift_down(hv, hi, size, 0)


_SCAN = 32  # scores per block of the top-k scan: one vectorised test per block


@njit(parallel=True, cache=True)
def topk_scan(S, k, hi_idx, hi_val, lo_idx, lo_val):
    """Per-row top-k of scores already computed: hi_* <- the k largest of each row of S
    (best first), lo_* <- the k smallest; ties to the smaller index (stable argsort order).

    S : (rows, n); the outputs are (rows, k). Two size-k heaps per row. Each block of _SCAN
    scores is first tested in SIMD against both heap roots (the current k-th best); only a
    block holding a candidate is walked entry by entry, so most scores cost one compare.
    """
    rows, n = S.shape
    for t in prange(rows):
        hv = np.empty(k)
        hx = np.empty(k, dtype=np.int64)
        lv = np.empty(k)
        lx = np.empty(k, dtype=np.int64)
        nh = 0
        nl = 0
        srow = S[t]
        for b0 in range(0, n, _SCAN):
            b1 = min(n, b0 + _SCAN)
            if nh == k and nl == k:
                top = hv[0]
                bottom = -lv[0]
                block = srow[b0:b1]
                hits = 0
                for q in range(b1 - b0):
                    v = block[q]
                    # >= / <= keep ties (NaN compares false on both sides: caught below)
                    hits += (v >= top) | (v <= bottom) | (v != v)
                if hits == 0:
                    continue
            for i in range(b0, b1):
                s = srow[i]
                if nh < k or not _worse(s, i, hv[0], hx[0]):
                    nh = _heap_offer(hv, hx, nh, k, s, i)
                if nl < k or not _worse(-s, i, lv[0], lx[0]):
                    nl = _heap_offer(lv, lx, nl, k, -s, i)
        _heap_drain(hv, hx, nh, hi_idx[t], hi_val[t], 1.0)
        _heap_drain(lv, lx, nl, lo_idx[t], lo_val[t], -1.0)
