"""Closed-form empirical NTK of the two-layer ReLU network [eq. 2, Thm 4.2, Thm B.5].

f(x) = m^-1/2 sum_r a_r relu(w_r . x), W (m, d) trainable, a fixed +-1 signs. Its eNTK is

    K(x, x') = (1/m) sum_r 1[w_r.x > 0] 1[w_r.x' > 0] <x, x'>  =  ((S S'^T) / m) * (X X'^T)

(elementwise product), S = 1[X W^T > 0]. One scalar kernel serves all C outputs [Thm B.12].
If a is trained too, add (1/m) relu(X W^T) relu(X' W^T)^T.

Assembly is blocked over row tiles: activation patterns are kept bit-packed (m/8 bytes a row),
each tile unpacks its rows, multiplies the pattern counts (exact in float32: 0/1 entries, sums
<= m < 2^24) into the float64 inner-product tile in place. For X2 = None only the upper
triangle of tiles is computed and mirrored. Peak memory: the output plus O(tile * (d + m)).

With CuPy inputs and a host (NumPy) ``out``, K is assembled on the GPU in row panels sized
from free device memory and streamed into ``out`` (ntkcore.kernels.host_panels): device
memory O(panel rows * n2), for an n whose n x n matrix does not fit on the device.
"""

from __future__ import annotations

import numpy as np

from .._validate import (
    as_float_matrix,
    check_cols,
    check_count,
    check_flag,
    check_min_cols,
    check_result_finite,
    shares_memory,
)
from ..backend import backend_for, is_gpu_array
from ..errors import BackendError, ParameterError, ShapeError
from .tiling import DEFAULT_TEMP_FRACTION, check_output_fits, tile_rows, tiles


def activation_bits(X, W, xp=np):
    """Activation patterns 1[X W^T > 0], compactly stored.

    NumPy: bit-packed (n, ceil(m/8)) uint8, big-endian bits. CuPy (whose packbits has no
    ``axis``): a (n, m) bool array, 1 byte a pattern (the fused CUDA path in
    ntkcore.kernels packs its own 32-bit words).
    """
    S = X @ W.T > 0
    return np.packbits(S, axis=1) if xp is np else S


def _unpack(bits, m, xp, dtype):
    if xp is np:
        return np.unpackbits(bits, axis=1, count=m).astype(dtype)
    return bits.astype(dtype)


def relu_ntk(X, W, X2=None, a=None, train_a: bool = False, *, tile: int | None = None,
             out=None):
    """Empirical NTK of f(x) = m^-1/2 a^T relu(W x), blocked over row tiles.

    Parameters
    ----------
    X : (n, d) array
        Inputs to the two-layer head (raw rows for 2L-ReLU, attention features for MLP-Attn).
    W : (m, d) array
        First-layer weights (trained weights give the empirical NTK of the trained net).
    X2 : (n2, d) array, optional
        Second set of rows; default X (then K is symmetric and only half the tiles are computed).
    a : (m,) or (m, C) array, optional
        Output weights (a scalar is refused: pass ``np.full(m, a)``). The W-part does not
        depend on a for +-1 signs (a_r^2 = 1) [Thm B.12]; for general (trained) a it is
        weighted by a_r^2 of output 0 (pass an (m,) vector to choose another output).
    train_a : bool, default False
        Add the output-layer term (1/m) relu(X W^T) relu(X2 W^T)^T.
    tile : int >= 1, optional
        Rows per tile (default from 25% of free memory).
    out : (n, n2) float64 array, optional
        Written in place and returned. On the inputs' device; or, for CuPy inputs, a
        C-contiguous host (NumPy) array: K is then computed on the GPU in row panels (rows
        from free device memory, never the whole K on the device) and copied into it
        through pinned staging buffers, which is how an n x n matrix larger than the GPU is
        formed (any host array serves; it need not be pinned itself).

    Returns
    -------
    K : (n, n2) float64 array on the inputs' device (``out`` when given).

    Raises
    ------
    ShapeError : d = 0, W or X2 with another d, m = 0, a or out of the wrong shape.
    ParameterError : out not float64, read-only, or (host out) not C-contiguous.
    BackendError : inputs on two devices, or a CuPy out for NumPy inputs.
    MemoryBudgetError : out=None and K does not fit on the device (the message gives the
        estimate, the host ``out`` and the Nystrom/CG alternatives), or with a host out not
        even one row panel fits; raised before any work.
    NonFiniteError : NaN/Inf in the inputs, or a kernel that overflowed (rescale X or W).
    """
    X = check_min_cols(as_float_matrix(X, "X", dtype=np.float64), "X")
    W = as_float_matrix(W, "W", dtype=np.float64)
    check_cols(X, W, "X", "W")
    sym = X2 is None
    X2 = X if sym else as_float_matrix(X2, "X2", dtype=np.float64)
    if not sym:
        check_cols(X, X2, "X", "X2")
    be = backend_for(X, W, None if sym else X2)
    xp = be.xp
    n, n2, m = X.shape[0], X2.shape[0], W.shape[0]
    if m < 1:
        raise ShapeError(f"W: expected at least one hidden unit (m >= 1 rows), got shape "
                         f"{tuple(W.shape)}")
    train_a = check_flag(train_a, "train_a")
    if tile is not None:
        tile = check_count(tile, "tile")
    weights = neuron_weights(a, m, xp)
    host_out = check_out_arg(out, (n, n2), xp, X, W, None if sym else X2)
    if out is None:
        check_output_fits((n, n2), 8, be, what="relu_ntk output", host_out=True)
        out = xp.empty((n, n2), dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported here
        if host_out:  # checks the panels for overflow as they pass
            return _assemble_host(X, W, X2, sym, weights, train_a, tile, out, be)
        K = _assemble(X, W, X2, sym, weights, train_a, tile, out, be)
    return check_result_finite(K, "relu_ntk")


def _assemble(X, W, X2, sym, weights, train_a, tile, out, be):
    """relu_ntk's tiles into ``out`` (inputs validated)."""
    xp = be.xp
    n, n2, m = X.shape[0], X2.shape[0], W.shape[0]
    if weights is None:
        # +-1 output weights (a_r^2 = 1): fused bit-packed kernels, Numba on the CPU and CUDA
        # on the GPU (ntkcore.kernels, issue 3); general a keeps the pattern GEMM below.
        from ..kernels import relu_ntk_fused
        return relu_ntk_fused(X, W, None if sym else X2, train_a=train_a, tile=tile, out=out,
                              backend=be)
    if tile is None:
        tile = _pattern_tile(max(n, n2), m, train_a,
                             int(be.free_memory_bytes() * DEFAULT_TEMP_FRACTION))
    bits = activation_bits(X, W, xp)
    bits2 = bits if sym else activation_bits(X2, W, xp)
    return _pattern_tiles(X, W, X2, bits, bits2, sym, weights, train_a, tile, out, xp)


def _pattern_scratch(m, train_a):
    """Temporary bytes of a general-a tile: (per tile entry, per tile row). Per entry: the
    float64 pattern counts (train_a: H_i H_j^T and its scaled copy); per row: the weighted
    patterns of the row tile and the unpacked ones of the column tile (train_a: X W^T, H_i,
    H_j)."""
    return 8 * (1 + (1 if train_a else 0)), 8 * m * (2 + (2 if train_a else 0))


def _pattern_tile(n, m, train_a, budget):
    pair, row = _pattern_scratch(m, train_a)
    return tile_rows(pair, row, budget=budget, n=n)


def _pattern_tiles(X, W, X2, bits, bits2, sym, weights, train_a, tile, out, xp):
    """The general-a tile loop into ``out`` (patterns given; sym: X2 is X, bits2 is bits)."""
    n, n2, m = X.shape[0], X2.shape[0], W.shape[0]
    # Patterns are 0/1, so their counts are exact in float32; general (trained) output weights
    # a_r^2 are not, and then the pattern product runs in float64.
    pat_dtype = np.float32 if weights is None else np.float64
    for (i0, i1) in tiles(n, tile):
        Si = _unpack(bits[i0:i1], m, xp, pat_dtype)
        if weights is not None:
            Si *= weights[None, :]
        Hi = xp.maximum(X[i0:i1] @ W.T, 0) if train_a else None
        for (j0, j1) in tiles(n2, tile):
            if sym and j1 <= i0:
                continue  # lower-triangle tile: mirrored below
            block = out[i0:i1, j0:j1]
            _relu_ntk_tile(block, X[i0:i1], X2[j0:j1], Si, bits2[j0:j1], m, xp)
            if train_a:
                Hj = Hi if (sym and i0 == j0) else xp.maximum(X2[j0:j1] @ W.T, 0)
                block += (Hi @ Hj.T) / m
            if sym and j0 > i0:
                out[j0:j1, i0:i1] = block.T
    if sym:
        _symmetrize_diagonal_tiles(out, tile)
    return out


def _assemble_host(X, W, X2, sym, weights, train_a, tile, out, be):
    """relu_ntk into the host array ``out`` from CuPy inputs, by row panels (see
    ntkcore.kernels.host_panels); general a runs the pattern loop on each panel."""
    from ..kernels import host_panels
    if weights is None:
        return host_panels.relu_ntk_host(X, W, None if sym else X2, train_a=train_a,
                                         tile=tile, out=out, backend=be)
    xp = be.xp
    n, n2, m = X.shape[0], X2.shape[0], W.shape[0]
    if n == 0 or n2 == 0:
        return out
    free = be.free_memory_bytes()
    t = min(tile, max(n, n2)) if tile else _pattern_tile(max(n, n2), m, train_a,
                                                         int(free * DEFAULT_TEMP_FRACTION))
    pair, row = _pattern_scratch(m, train_a)
    rows = host_panels.plan_rows(n, n2, free=free, temp_bytes=t * t * pair + t * row,
                                 fixed_bytes=m * (n + (0 if sym else n2)) + 8 * m,
                                 what="relu_ntk output (host assembly)")
    bits = _device_bits(X, W, t, xp)
    bits2 = bits if sym else _device_bits(X2, W, t, xp)

    def fill(i0, i1, c0, panel):  # the panel as a non-symmetric block: rows i0:i1, cols c0:
        _pattern_tiles(X[i0:i1], W, X2[c0:], bits[i0:i1], bits2[c0:], False, weights,
                       train_a, t, panel, xp)

    return host_panels.assemble_into_host(fill, out, sym=sym, rows=rows, backend=be,
                                          what="relu_ntk")


def _device_bits(X, W, t, xp):
    """activation_bits on the GPU ((n, m) bool), from t-row blocks of X W^T (never all)."""
    bits = xp.empty((X.shape[0], W.shape[0]), dtype=bool)
    for r0, r1 in tiles(X.shape[0], t):
        bits[r0:r1] = activation_bits(X[r0:r1], W, xp)
    return bits


def _relu_ntk_tile(block, Xi, Xj, Si, bits_j, m, xp):
    """block <- ((Si Sj^T) / m) * (Xi Xj^T), in place (Si float32 already unpacked)."""
    xp.matmul(Xi, Xj.T, out=block)
    counts = Si @ _unpack(bits_j, m, xp, Si.dtype).T  # float32: exact integer counts
    block *= counts
    block *= 1.0 / m


def _symmetrize_diagonal_tiles(out, tile):
    """Diagonal tiles are computed in full; average with their transpose for exact symmetry."""
    n = out.shape[0]
    for (i0, i1) in tiles(n, tile):
        blk = out[i0:i1, i0:i1]
        blk += blk.T.copy()
        blk *= 0.5


def check_out_arg(out, shape, xp, *inputs, names=("X", "W", "X2")) -> bool:
    """Validate a kernel's ``out`` (None passes); True when it is a host array for CuPy
    inputs (assembly into host memory). A device ``out`` must not overlap the inputs, which
    the kernels read while writing it."""
    if out is None:
        return False
    host_out = _check_out(out, shape, xp)
    if not host_out:
        for arr, name in zip(inputs, names):
            if arr is not None and shares_memory(out, arr):
                raise ParameterError(f"out: shares memory with {name}, which is read while "
                                     f"out is written; pass a separate array")
    return host_out


def _check_out(out, shape, xp):
    """``out`` must be a writeable float64 array of ``shape`` on the inputs' device, or for
    CuPy inputs a C-contiguous host array (written in place: an integer or float32 ``out``
    would truncate or round the kernel silently). Returns whether it is such a host array."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise ParameterError(f"out: expected a float64 array of shape {shape}, got "
                             f"{type(out).__name__}")
    on_host = isinstance(out, np.ndarray)
    if (xp is np and not on_host) or (xp is not np and not (on_host or is_gpu_array(out))):
        raise BackendError("out: expected an array on the inputs' device (NumPy for NumPy "
                           "inputs; CuPy, or a host NumPy array to assemble into, for CuPy "
                           "inputs), got " + type(out).__module__ + "." + type(out).__name__)
    if tuple(out.shape) != shape:
        raise ShapeError(f"out: expected shape {shape}, got {tuple(out.shape)}")
    if out.dtype != np.float64:
        raise ParameterError(f"out: expected dtype float64, got {out.dtype}")
    if on_host and not out.flags.writeable:
        raise ParameterError("out: expected a writeable array, got a read-only one")
    host_out = on_host and xp is not np
    if host_out and not out.flags.c_contiguous:
        raise ParameterError(f"out: expected a C-contiguous host array (whole rows are "
                             f"copied into it), got one with strides {out.strides}; pass "
                             f"numpy.empty({shape})")
    return host_out


def neuron_weights(a, m: int, xp):
    """Per-neuron weights a_r^2 of the W-part [Thm 4.2] as an (m,) float64 array on ``xp``'s
    device; None when ``a`` is None or every a_r^2 is 1 (the +-1 case: the fused kernels).

    ``a`` is (m,) or (m, C) (then output 0's column); a scalar, another number of dims or
    rows, complex or non-finite values raise ParameterError / ShapeError / NonFiniteError.
    """
    if a is None:
        return None
    if not hasattr(a, "shape"):  # a list: ragged nesting is a shape error
        try:
            a = np.asarray(a)
        except (ValueError, TypeError) as exc:
            raise ShapeError(f"a: expected an (m,) or (m, C) array, got {exc}") from None
    shape = tuple(a.shape)
    if len(shape) == 0:
        raise ParameterError(f"a: expected an (m,) or (m, C) array of output weights, got the "
                             f"scalar {a!r} (for equal weights pass np.full({m}, a))")
    if len(shape) > 2 or shape[0] != m or 0 in shape:
        raise ShapeError(f"a: expected shape ({m},) or ({m}, C) (one row per hidden unit), "
                         f"got {shape}")
    a = as_float_matrix(a, "a", dtype=np.float64, allow_1d=True)
    a0 = xp.asarray(a[:, 0])
    w = a0 * a0
    if bool(xp.all(w == 1.0)):
        return None
    return w
