"""CUDA kernels through ``cupy.RawModule``: loading, caching and one-tile launch wrappers.

Sources are the ``.cu`` files beside this module, read with :mod:`importlib.resources`, and
compiled by NVRTC once per (source, dtype, device, defines) in a process (STYLE rule 9;
CuPy also caches the binaries on disk). CuPy is reached through :mod:`ntkcore.backend`, the
only module that imports it. Each wrapper launches one kernel over one tile and validates
nothing (the drivers in :mod:`ntkcore.kernels.assembly` and ``.scoring`` do).

Integer kernel parameters are 64-bit and passed as ``numpy.int64``; reals are passed as the
kernel's dtype (CuPy would otherwise pass Python ints as int64 and floats as float64, which
silently misreads 32-bit parameters).
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np

from ..backend import Backend

SOURCES = {  # name -> the files that make up its source, in order
    "entk": ("tile_common.cuh", "entk_tile.cu"),
    "influence": ("influence_score.cu",),
    "infinite": ("tile_common.cuh", "ntk_infinite.cu"),
    "stats": ("matrix_stats.cu",),
}
_CTYPE = {np.dtype(np.float64): "double", np.dtype(np.float32): "float"}
TILE = 64          # output tile edge of entk_tile / arccos_tile (NTK_TILE in the sources)
TOPK_MAX = 16      # largest register-resident top-k list (influence_topk)
# influence_topk keeps R[t, :] in dynamic shared memory beside its static merge lists (3 KiB
# in float64 at TOPK = 16, nvcc --resource-usage, sm_90); a launch asks for at most the 48 KiB
# default, so C * itemsize above this takes the chunked path (C > 5632 classes in float64)
TOPK_SHARED_MAX = 48 * 1024 - 4 * 1024
SC_ROWS = 8        # test rows per thread in influence_scores
TK_THREADS = 256   # threads per block in influence_topk
MS_BLOCK = (32, 8)  # threads per block of matrix_stats (MS_TILE x MS_ROWS in the source)


def _cp():
    return Backend("cuda").xp


def source(name: str) -> str:
    """Text of one kernel source (``name`` a key of SOURCES): its files joined in order."""
    here = resources.files("ntkcore.kernels")
    return "\n".join(here.joinpath(f).read_text() for f in SOURCES[name])


def compile_options(dtype, defines=()) -> tuple:
    """NVRTC options for ``dtype`` (float64 or float32) plus ``-DNAME=VALUE`` defines."""
    opts = [f"-DNTK_REAL={_CTYPE[np.dtype(dtype)]}"]
    opts += [f"-D{k}={v}" for k, v in defines]
    return tuple(opts)


@functools.lru_cache(maxsize=None)
def _module(name: str, dtype_str: str, device_id: int, defines: tuple):
    cp = _cp()
    with cp.cuda.Device(device_id):
        mod = cp.RawModule(code=source(name), options=compile_options(dtype_str, defines))
        mod.compile()  # surface compile errors here, once
    return mod


def kernel(name: str, func: str, dtype, defines=()):
    """Cached ``RawKernel`` ``func`` from source ``name`` for the current device."""
    cp = _cp()
    dev = cp.cuda.Device().id
    return _module(name, np.dtype(dtype).str, dev, tuple(defines)).get_function(func)


def _i(x):
    return np.int64(x)


#: grid.y of the tile kernels covers the rows, TILE per block, at most 65535 blocks
GRID_Y_MAX = 65535
TILE_ROWS_MAX = GRID_Y_MAX * TILE


def _grid2(ni, nj):
    return ((nj + TILE - 1) // TILE, (ni + TILE - 1) // TILE)


# ----------------------------------------------------------------------------- kernel 1
def pack_signs(Z, P):
    """P[r, w] <- packed bits 1[Z[r, 32 w + b] > 0] (uint32 words, padding bits zero).

    Z : (rows, m) float, rows C-contiguous (row stride may exceed m); P : (rows, words) uint32.
    """
    rows, m = Z.shape
    if rows == 0:
        return P
    words = P.shape[1]
    threads = 256
    total = rows * words * 32
    blocks = (total + threads - 1) // threads
    k = kernel("entk", "pack_signs", Z.dtype)
    k((blocks,), (threads,), (Z, _i(rows), _i(m), _i(Z.strides[0] // Z.itemsize), P,
                              _i(words), _i(P.strides[0] // P.itemsize)))
    return P


def entk_tile(G, E, Pi, Pj, out, outT, inv_m, *, mirror: bool, diag: bool):
    """out <- G * popcount(Pi & Pj^T) * inv_m (+ E * inv_m); optionally mirrored into outT.

    G, E : (ni, nj) contiguous scratch tiles (E may be None); Pi (ni, words), Pj (nj, words)
    uint32 views sharing one row stride; out a view whose (i, j) entry is the destination,
    outT (mirror) a view whose (j, i) entry is. ``diag``: i0 == j0 of a symmetric K.
    """
    ni, nj = G.shape
    if ni == 0 or nj == 0:
        return
    dt = G.dtype
    k = kernel("entk", "entk_tile", dt)
    ld = out.strides[0] // out.itemsize
    has_e = E is not None
    E_arg = E if has_e else G
    outT_arg = outT if mirror else out
    k(_grid2(ni, nj), (16, 16),
      (G, _i(G.strides[0] // G.itemsize), E_arg, _i(E_arg.strides[0] // E_arg.itemsize),
       np.int32(has_e), Pi, Pj, _i(Pi.strides[0] // Pi.itemsize), _i(Pi.shape[1]),
       out, _i(ld), outT_arg, np.int32(mirror), _i(ni), _i(nj), dt.type(inv_m),
       np.int32(diag)))


# ----------------------------------------------------------------------------- kernel 3
def arccos_tile(G, norm_i, norm_j, out, outT, *, mirror: bool, diag: bool):
    """out <- g (pi - acos(g / (|x_i||x_j|))) / (2 pi) on a Gram tile; mirrored as entk_tile."""
    ni, nj = G.shape
    if ni == 0 or nj == 0:
        return
    k = kernel("infinite", "arccos_tile", G.dtype)
    outT_arg = outT if mirror else out
    k(_grid2(ni, nj), (16, 16),
      (G, _i(G.strides[0] // G.itemsize), norm_i, norm_j, out,
       _i(out.strides[0] // out.itemsize), outT_arg, np.int32(mirror), _i(ni), _i(nj),
       np.int32(diag)))


# ----------------------------------------------------------------------------- kernel 2
def influence_scores(B, dinv, half_sq, alphaT, R, S):
    """S <- U (U h - R alpha^T), U = B / dinv; one pass over B. S may be B."""
    T, n = B.shape
    if T == 0 or n == 0:
        return S
    C = alphaT.shape[0]
    k = kernel("influence", "influence_scores", B.dtype)
    threads = 256
    step = 65535 * SC_ROWS  # grid.y is limited to 65535 blocks
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        grid = ((n + threads - 1) // threads, (t1 - t0 + SC_ROWS - 1) // SC_ROWS)
        Bc, Rc, Sc = B[t0:t1], R[t0:t1], S[t0:t1]
        k(grid, (threads,), (Bc, _i(B.strides[0] // B.itemsize), dinv, half_sq, alphaT, Rc,
                             _i(C), _i(t1 - t0), _i(n), Sc, _i(S.strides[0] // S.itemsize)))
    return S


def topk_width(k: int) -> int:
    """Register list length compiled for a request of k (a power of two >= k)."""
    w = 1
    while w < k:
        w *= 2
    return w


def influence_topk(B, dinv, half_sq, alphaT, R, k, hi_idx, hi_val, lo_idx, lo_val, S):
    """Per-row top-k (k <= TOPK_MAX) of the fused scores; S (or None) receives every score."""
    T, n = B.shape
    C = alphaT.shape[0]
    dt = B.dtype
    width = topk_width(k)
    kern = kernel("influence", "influence_topk", dt, (("TOPK", width),))
    keep = S is not None
    S_arg = S if keep else B
    kern((T,), (TK_THREADS,),
         (B, _i(B.strides[0] // B.itemsize), dinv, half_sq, alphaT, R, _i(C), _i(n), _i(k),
          hi_idx, hi_val, lo_idx, lo_val, S_arg, _i(S_arg.strides[0] // S_arg.itemsize),
          np.int32(keep)),
         shared_mem=int(max(C, 1) * dt.itemsize))


# ----------------------------------------------------------------------------- matrix check
def matrix_stats(K, scale, partial, out):
    """out[0], out[1] <- sum (s K)^2, sum_{i != j} (s K_ij - s K_ji)^2 in one read of K.

    K : (n, n), rows contiguous (row stride ``ld``), n >= 1; scale s a float; partial
    (blocks, 2) float64 scratch, one row per block of the first launch; out (2,) float64.
    Both launches are queued; nothing is copied to the host.
    """
    n = K.shape[0]
    blocks = partial.shape[0]
    ld = K.strides[0] // K.itemsize
    kernel("stats", "matrix_stats", K.dtype)((blocks,), MS_BLOCK,
                                             (K, _i(n), _i(ld), np.float64(scale), partial))
    kernel("stats", "matrix_stats_sum", K.dtype)((1,), MS_BLOCK, (partial, _i(blocks), out))
    return out
