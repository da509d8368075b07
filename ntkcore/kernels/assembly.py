"""Tile loops that drive kernels 1 and 3 on either backend (STYLE rule 10: kernels see one tile).

Kernel 1 (fused eNTK, [Thm 4.2, B.5]): K = ((S S2^T) / m) * (X X2^T) (+ (1/m) H H2^T with
H = relu(X W^T) when the output layer trains). Activation patterns S are never stored as
floats: they are packed straight from blocks of X W^T into machine words (CPU: uint64, layout
(words, n); GPU: uint32, layout (n, words)). For each tile pair the Gram block comes from one
BLAS/cuBLAS GEMM and the kernel multiplies popcount(P_i & P2_j) / m into it:

* CPU: one BLAS call (syrk for a symmetric K: the upper triangle, half the flops) writes the
  Gram matrix straight into the output; one parallel Numba pass over 128 x 128 tile pairs
  scales it in place and mirrors it (BLAS and Numba alternate once, not per tile).
* GPU: per tile pair, the GEMM writes a contiguous scratch tile; the CUDA kernel reads it
  once and writes the output block (and, for a symmetric K, the mirrored block).

For a symmetric K only tile pairs with j0 >= i0 are visited; diagonal tiles compute j >= i
and mirror, so K is exactly symmetric. Kernel 3 (infinite width, arc-cosine) uses the same
loop with the norms instead of the patterns.

Memory: the caller's output plus the packed patterns (n m / 8 bytes), one row block of X W^T
and, per tile, the scratch tiles (GPU) or (train_a) blocks of H. Tile rows come from a budget (a share of free memory) and are
capped where measured larger tiles stopped paying (CPU_TILE_MAX, GPU_TILE_MAX).
"""

from __future__ import annotations

import numpy as np

from ..backend import Backend
from ..ntk.tiling import DEFAULT_TEMP_FRACTION, check_output_fits, tile_rows, tiles

# CPU: row blocks of X W^T while packing (the output-layer term gets as many floats per chunk
# of neurons) are large, so BLAS and the Numba pass alternate only a few times (see
# _loop_cpu). GPU: 8192-row tiles keep each GEMM large while the diagonal-tile waste (t / n of
# the Gram flops) stays small.
CPU_TILE_MAX = 8192
GPU_TILE_MAX = 8192
CPU_PASS_TILE = 128  # tile edge of the Numba pass: a 128 x 128 float64 tile stays in L2
_EMPTY = np.empty((0, 0))


def words_for(m: int, backend: Backend) -> int:
    """Machine words per packed pattern row: ceil(m / 64) on the CPU, ceil(m / 32) on the GPU."""
    bits = 32 if backend.name == "cuda" else 64
    return (m + bits - 1) // bits


def choose_tile(backend: Backend, n: int, m: int, *, train_a: bool, tile: int | None = None,
                budget: int | None = None) -> int:
    """Rows per tile: ``tile`` if given, else from ``budget`` bytes (default: a share of free
    memory) for the scratch tiles and per-row blocks, capped per backend."""
    if tile is not None:  # on the GPU, at most what one launch's grid.y covers
        cap = _gpu_tile_rows_max() if backend.name == "cuda" else max(n, 1)
        return max(1, min(int(tile), max(n, 1), cap))
    if budget is None:
        budget = int(backend.free_memory_bytes() * DEFAULT_TEMP_FRACTION)
    pair, row = _scratch(backend, m, train_a)
    cap = GPU_TILE_MAX if backend.name == "cuda" else CPU_TILE_MAX
    return tile_rows(max(pair, 1), row, budget=budget, n=max(n, 1), maximum=cap)


def _gpu_tile_rows_max() -> int:
    from .cuda import TILE_ROWS_MAX
    return TILE_ROWS_MAX


def _scratch(backend: Backend, m: int, train_a: bool):
    """Temporary bytes of a t-row tile: (per tile entry, per tile row)."""
    pair = (8 if backend.name == "cuda" else 0) + (8 if train_a else 0)  # G, E scratch
    row = 8 * m * (1 + (2 if train_a else 0))                  # X W^T block, H_i, H_j
    return pair, row


def scratch_bytes(backend: Backend, t: int, m: int, *, train_a: bool) -> int:
    """Most temporary memory the tile loop takes with t-row tiles (what choose_tile budgets)."""
    pair, row = _scratch(backend, m, train_a)
    return t * t * pair + t * row


def pack_activations(X, W, backend: Backend, *, tile: int):
    """Packed patterns 1[X W^T > 0], computed from row blocks of X W^T (never all of it).

    Returns CPU: (ceil(m/64), n) uint64; GPU: (n, ceil(m/32)) uint32. Padding bits are zero.
    """
    n = X.shape[0]
    m = W.shape[0]
    words = words_for(m, backend)
    Wt = W.T
    if backend.name == "cuda":
        from . import cuda
        xp = backend.xp
        P = xp.empty((n, words), dtype=np.uint32)
        for r0, r1 in tiles(n, tile):
            cuda.pack_signs(X[r0:r1] @ Wt, P[r0:r1])
        return P
    from . import numba_kernels as nk
    PT = np.empty((words, n), dtype=np.uint64)
    for r0, r1 in tiles(n, tile):
        nk.pack_signs(np.ascontiguousarray(X[r0:r1] @ Wt), PT, r0)
    return PT


def relu_ntk_fused(X, W, X2=None, *, train_a: bool = False, tile: int | None = None,
                   out=None, backend: Backend | None = None):
    """Kernel-1 assembly of the closed-form eNTK (see module docstring).

    Parameters
    ----------
    X : (n, d) float64 (or float32) C-contiguous array, NumPy or CuPy.
    W : (m, d) first-layer weights, same dtype and device.
    X2 : (n2, d), optional. None: K(X, X), symmetric, half the tiles.
    train_a : add (1/m) relu(X W^T) relu(X2 W^T)^T (output weights +-1 or trained jointly).
    tile : rows per tile (default from free memory, capped per backend).
    out : (n, n2) array written in place (allocated, after a fit check, if None; one that is
        not C-contiguous is filled through a temporary).

    Returns
    -------
    out : (n, n2) array on the inputs' device.
    """
    be = backend or _backend_of(X)
    xp = be.xp
    sym = X2 is None
    n, m = X.shape[0], W.shape[0]
    n2 = n if sym else X2.shape[0]
    if out is None:
        check_output_fits((n, n2), X.dtype.itemsize, be, what="relu_ntk output")
        out = xp.empty((n, n2), dtype=X.dtype)
    elif not out.flags.c_contiguous:  # the kernels write whole rows: go through a copy
        out[...] = relu_ntk_fused(X, W, X2, train_a=train_a, tile=tile, backend=be)
        return out
    if n == 0 or n2 == 0:
        return out
    t = choose_tile(be, max(n, n2), m, train_a=train_a, tile=tile)
    Xs = X if sym else X2
    P = pack_activations(X, W, be, tile=t)
    P2 = P if sym else pack_activations(Xs, W, be, tile=t)
    inv_m = 1.0 / m
    if be.name == "cuda":
        _loop_gpu(X, Xs, W, P, P2, out, inv_m, sym, train_a, t, xp)
    else:
        _loop_cpu(X, Xs, W, P, P2, out, inv_m, sym, train_a, t)
    return out


def _pairs(n, n2, t, sym):
    for i0, i1 in tiles(n, t):
        for j0, j1 in tiles(n2, t):
            if sym and j1 <= i0:
                continue
            yield i0, i1, j0, j1


#: Above this n the symmetric Gram matrix is built from row-block GEMMs instead of one SYRK:
#: OpenBLAS 0.3.31's threaded SYRK segfaulted on our 2-core machine (NumPy's X @ X.T from
#: n = 26 000; SciPy's dpotrf, which calls it, from n = 16 000).
SYRK_MAX_N = 14_000
GRAM_ROWS = 4096


def _gram_into(out, X, Xs, sym):
    """out <- X Xs^T with one BLAS call (sym: syrk, upper triangle j >= i only; above
    SYRK_MAX_N rows, row blocks out[i0:i1, i0:] by GEMM, still only the upper part)."""
    if sym and out.flags.c_contiguous and out.shape[0] > SYRK_MAX_N:
        n = out.shape[0]
        for i0, i1 in tiles(n, GRAM_ROWS):
            out[i0:i1, i0:] = X[i0:i1] @ X[i0:].T
        return
    if sym and out.flags.c_contiguous:
        from scipy.linalg.blas import get_blas_funcs
        syrk = get_blas_funcs("syrk", (X,))
        # Fortran view: out.T is F-contiguous, and its lower triangle is out's upper one.
        res = syrk(1.0, X.T, trans=1, lower=1, c=out.T, beta=0.0, overwrite_c=1)
        if np.shares_memory(res, out):
            return
        out[...] = res.T  # the wrapper copied (unexpected layout): keep the result anyway
        return
    np.matmul(X, Xs.T, out=out)


def _add_output_layer_cpu(out, X, Xs, W, inv_m, sym, chunk):
    """out += (1/m) relu(X W^T) relu(Xs W^T)^T, over chunks of neurons (sym: upper only)."""
    from scipy.linalg.blas import get_blas_funcs
    m = W.shape[0]
    for r0, r1 in tiles(m, chunk):
        H = np.maximum(X @ W[r0:r1].T, 0.0)
        if sym and out.shape[0] > SYRK_MAX_N:  # row-block GEMMs, as in _gram_into
            for i0, i1 in tiles(out.shape[0], GRAM_ROWS):
                out[i0:i1, i0:] += inv_m * (H[i0:i1] @ H[i0:].T)
        elif sym:
            syrk = get_blas_funcs("syrk", (H,))
            res = syrk(inv_m, H.T, trans=1, lower=1, c=out.T, beta=1.0, overwrite_c=1)
            if not np.shares_memory(res, out):
                out[...] = res.T
        else:  # out.T (F-contiguous) += inv_m * H2 H^T, in place: no (n, n2) temporary
            H2 = np.maximum(Xs @ W[r0:r1].T, 0.0)
            gemm = get_blas_funcs("gemm", (H,))
            res = gemm(inv_m, H2.T, H.T, beta=1.0, c=out.T, trans_a=1, trans_b=0,
                       overwrite_c=1)
            if not np.shares_memory(res, out):
                out[...] = res.T


def _loop_cpu(X, Xs, W, PT, PT2, out, inv_m, sym, train_a, t):
    """CPU: one BLAS call for the Gram matrix, one parallel Numba pass over all tile pairs.

    BLAS and Numba each use every core; alternating them tile by tile was measured to cost
    more than the popcount work itself (their thread pools spin against each other), so the
    phases run once each.
    """
    from . import numba_kernels as nk
    n, n2 = out.shape
    _gram_into(out, X, Xs, sym)
    pairs = nk.tile_pairs(n, n2, CPU_PASS_TILE, sym)
    nk.entk_scale(out, PT, PT2, inv_m, sym, sym and not train_a, pairs)
    if train_a:
        # neurons per chunk: H (n, chunk) and H2 (n2, chunk) within the same share of memory
        # that t rows of X W^T were given
        chunk = max(1, min(W.shape[0], (t * W.shape[0]) // max(1, n + (0 if sym else n2))))
        _add_output_layer_cpu(out, X, Xs, W, inv_m, sym, chunk)
        if sym:
            nk.mirror_upper(out, pairs)


def _loop_gpu(X, Xs, W, P, P2, out, inv_m, sym, train_a, t, xp):
    from . import cuda
    Wt = W.T
    size = min(t, X.shape[0]) * min(t, Xs.shape[0])  # a short row panel needs no t x t
    G_flat = xp.empty(size, dtype=out.dtype)
    E_flat = xp.empty(size, dtype=out.dtype) if train_a else None
    Hi = None
    last_i = -1
    for i0, i1, j0, j1 in _pairs(X.shape[0], Xs.shape[0], t, sym):
        a, b = i1 - i0, j1 - j0
        G = G_flat[:a * b].reshape(a, b)
        xp.matmul(X[i0:i1], Xs[j0:j1].T, out=G)
        E = None
        if train_a:
            if i0 != last_i:
                Hi = xp.maximum(X[i0:i1] @ Wt, 0.0)
                last_i = i0
            Hj = Hi if (sym and i0 == j0) else xp.maximum(Xs[j0:j1] @ Wt, 0.0)
            E = E_flat[:a * b].reshape(a, b)
            xp.matmul(Hi, Hj.T, out=E)
        cuda.entk_tile(G, E, P[i0:i1], P2[j0:j1], out[i0:i1, j0:j1],
                       out[j0:j1, i0:i1] if sym else None, inv_m,
                       mirror=sym, diag=sym and i0 == j0)


def _norm_safe_range(dtype):
    """(lo, hi): outside it a row norm may have lost bits, vanished or overflowed, its
    squares being subnormal or infinite -- 2^-495 .. 2^496 in float64 (entries under about
    1e-149 or over 1e149), 2^-47 .. 2^48 in float32; 2^16 from the square-root limits."""
    info = np.finfo(dtype)
    return (float(np.ldexp(1.0, info.minexp // 2 + 16)),
            float(np.ldexp(1.0, info.maxexp // 2 - 16)))


def _row_norms(X, xp):
    """(n,) Euclidean row norms; rows whose squares underflowed or overflowed (X 1e-200
    against X2 1e200 gave norms 0 and inf, and a wrong kernel) are recomputed divided by
    their largest |entry|. Only those rows are copied: no n x d temporary."""
    with np.errstate(over="ignore"):
        norms = xp.linalg.norm(X, axis=1)
    lo, hi = _norm_safe_range(X.dtype)
    suspect = xp.flatnonzero((norms < lo) | (norms > hi))
    if suspect.size:
        rows = X[suspect]
        peak = xp.abs(rows).max(axis=1) if rows.shape[1] else xp.zeros(rows.shape[0])
        safe = xp.where(peak > 0, peak, 1.0)
        norms[suspect] = peak * xp.linalg.norm(rows / safe[:, None], axis=1)
    return norms


def relu_ntk_infinite_fused(X, X2=None, *, tile: int | None = None, out=None,
                            backend: Backend | None = None):
    """Kernel-3 assembly: K_inf = <x,x'> (pi - theta) / (2 pi) [Thm 4.2], tiled like kernel 1.

    X : (n, d), X2 : (n2, d) or None (symmetric, exactly), out : (n, n2) C-contiguous or None.
    Rows of zero norm give zero rows.

    The kernels take theta = acos(c), c = g / (|x| |x'|) from the Gram tile; near |c| = 1
    (equal, nearly equal or opposite rows, common in real data) acos turns the rounding of c
    into sqrt(eps) ~ 1e-8 relative error. Entries with |c| > 1 - NEAR_PARALLEL_DELTA are
    found in the Gram tiles and, after assembly, recomputed from the rows themselves as
    theta = 2 atan2(|u - v|, |u + v|) (u, v the unit rows), which is accurate to rounding.
    """
    be = backend or _backend_of(X)
    xp = be.xp
    sym = X2 is None
    Xs = X if sym else X2
    n, n2 = X.shape[0], Xs.shape[0]
    if out is None:
        check_output_fits((n, n2), X.dtype.itemsize, be, what="relu_ntk_infinite output")
        out = xp.empty((n, n2), dtype=X.dtype)
    elif not out.flags.c_contiguous:
        out[...] = relu_ntk_infinite_fused(X, X2, tile=tile, backend=be)
        return out
    if n == 0 or n2 == 0:
        return out
    if be.name == "cuda" and out.dtype != X.dtype:  # arccos_tile reads the Gram tile (out's
        X = X.astype(out.dtype)  # dtype) and the norms in one dtype
        Xs = X if sym else Xs.astype(out.dtype)
    t = choose_tile(be, max(n, n2), 0, train_a=False, tile=tile)
    norms = _row_norms(X, xp)
    norms2 = norms if sym else _row_norms(Xs, xp)
    near = []  # (I, J) index arrays of the entries to recompute (sym: I < J only)
    if be.name == "cuda":
        from . import cuda
        G_flat = xp.empty(min(t, n) * min(t, n2), dtype=out.dtype)
        for i0, i1, j0, j1 in _pairs(n, n2, t, sym):
            G = G_flat[:(i1 - i0) * (j1 - j0)].reshape(i1 - i0, j1 - j0)
            xp.matmul(X[i0:i1], Xs[j0:j1].T, out=G)
            cuda.arccos_tile(G, norms[i0:i1], norms2[j0:j1], out[i0:i1, j0:j1],
                             out[j0:j1, i0:i1] if sym else None, mirror=sym,
                             diag=sym and i0 == j0)
            near += _near_parallel(G, norms[i0:i1], norms2[j0:j1], xp, i0, j0,
                                   upper=sym and i0 == j0)
    else:
        from . import numba_kernels as nk
        _gram_into(out, X, Xs, sym)
        if sym:  # only j > i holds the Gram matrix (syrk): the strict upper part, in strips
            for r0, r1 in tiles(n, CPU_PASS_TILE):
                near += _near_parallel(out[r0:r1, r0:r1], norms[r0:r1], norms[r0:r1], xp,
                                       r0, r0, upper=True)
                if r1 < n:
                    near += _near_parallel(out[r0:r1, r1:], norms[r0:r1], norms[r1:], xp,
                                           r0, r1)
        else:
            near += _near_parallel(out, norms, norms2, xp, 0, 0)
        nk.arccos_scale(out, norms, norms2, sym, nk.tile_pairs(n, n2, CPU_PASS_TILE, sym))
    if near:
        _refine_near_parallel(out, X, Xs, norms, norms2, near, sym, xp)
    return out


#: |cos theta| above 1 - NEAR_PARALLEL_DELTA is recomputed from the rows (theta <= 0.045 rad
#: or >= pi - 0.045). acos's error is ~eps / sin(theta) in theta, so outside the band the
#: kernel stays within ~1e-14 relative of the reference (worst measured 6e-15 on clustered,
#: attention-feature and near-duplicate rows); inside it the atan2 form is exact to rounding.
#: Random rows (d = 784) never come near the band, images rarely besides exact duplicates. A
#: wider band (1e-2) made clustered data (half the pairs of digits' attention features) 4-27x
#: slower for no accuracy gained.
NEAR_PARALLEL_DELTA = 1e-3
#: Entries of the temporaries one scan or refinement step may allocate (~100 MB of float64).
SCAN_ENTRIES = 1 << 22


def _near_parallel(G, ni, nj, xp, r_off, c_off, *, upper=False):
    """Global indices of the entries of a Gram block G (rows r_off.., columns c_off..) with
    |G_ij| > (1 - delta) |x_i| |x2_j|; ``upper`` keeps j > i only (and then tolerates garbage
    below the diagonal: comparisons with NaN are False and such hits are dropped).

    Cheap when there is nothing to find: one max/min reduction per row (no temporaries of
    G's size) bounds |G_ij| / |x2_j| by max_j |G_ij| / min |x2_j| (over nonzero norms; tight
    for unit rows), and only rows that may hold a hit are compared entry by entry.
    """
    scale = 1.0 - NEAR_PARALLEL_DELTA
    if upper:
        rows = xp.arange(G.shape[0])
    else:
        peak = xp.maximum(G.max(axis=1), -G.min(axis=1))
        nj_min = xp.where(nj > 0, nj, xp.inf).min()  # a zero-norm column is never a hit
        rows = xp.nonzero(peak > scale * ni * nj_min)[0]
    found = []
    nj_safe = xp.where(nj > 0, nj, 1.0)  # G_ij = 0 where |x2_j| = 0: never a hit
    step = max(1, SCAN_ENTRIES // max(G.shape[1], 1))
    for k0, k1 in tiles(int(rows.shape[0]), step):
        r = rows[k0:k1]
        A = G[r]  # a copy (fancy index), scaled in place: |G_ij| / |x2_j|
        with np.errstate(invalid="ignore", over="ignore"):  # upper: garbage below the
            xp.abs(A, out=A)  # diagonal (an uninitialised out) may be NaN or Inf
            A /= nj_safe[None, :]
            ii, jj = xp.nonzero(A > (scale * ni[r])[:, None])
        del A
        I, J = r[ii] + r_off, jj + c_off
        if upper:
            keep = J > I
            I, J = I[keep], J[keep]
        if int(I.shape[0]):
            found.append((I, J))
    return found


def _refine_near_parallel(out, X, Xs, norms, norms2, near, sym, xp):
    """out[I, J] <- <x, x'> (pi - theta) / (2 pi) with theta = 2 atan2(|u - v|, |u + v|) (and
    the mirrored entries for a symmetric K), in chunks of pairs."""
    I = xp.concatenate([p[0] for p in near])
    J = xp.concatenate([p[1] for p in near])
    step = max(1, SCAN_ENTRIES // max(X.shape[1], 1))
    for k0, k1 in tiles(int(I.shape[0]), step):
        i, j = I[k0:k1], J[k0:k1]
        x, y = X[i], Xs[j]
        g = xp.einsum("kd,kd->k", x, y)
        u = x / norms[i][:, None]
        v = y / norms2[j][:, None]
        diff = u - v
        u += v
        theta = 2.0 * xp.arctan2(xp.sqrt(xp.einsum("kd,kd->k", diff, diff)),
                                 xp.sqrt(xp.einsum("kd,kd->k", u, u)))
        val = g * (np.pi - theta) * (0.5 / np.pi)
        out[i, j] = val
        if sym:
            out[j, i] = val


def _backend_of(X) -> Backend:
    from ..backend import is_gpu_array
    return Backend("cuda" if is_gpu_array(X) else "cpu")
