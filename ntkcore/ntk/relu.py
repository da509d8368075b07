"""Closed-form empirical NTK of the two-layer ReLU network [eq. 2, Thm 4.2, Thm B.5].

f(x) = m^-1/2 sum_r a_r relu(w_r . x), W (m, d) trainable, a fixed +-1 signs. Its eNTK is

    K(x, x') = (1/m) sum_r 1[w_r.x > 0] 1[w_r.x' > 0] <x, x'>  =  ((S S'^T) / m) * (X X'^T)

(elementwise product), S = 1[X W^T > 0]. One scalar kernel serves all C outputs [Thm B.12].
If a is trained too, add (1/m) relu(X W^T) relu(X' W^T)^T.

Assembly is blocked over row tiles: activation patterns are kept bit-packed (m/8 bytes a row),
each tile unpacks its rows, multiplies the pattern counts (exact in float32: 0/1 entries, sums
<= m < 2^24) into the float64 inner-product tile in place. For X2 = None only the upper
triangle of tiles is computed and mirrored. Peak memory: the output plus O(tile * (d + m)).
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
from ..backend import backend_for
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
    out : (n, n2) float64 array on the inputs' device, optional
        Written in place and returned.

    Returns
    -------
    K : (n, n2) float64 array on the inputs' device.

    Raises
    ------
    ShapeError : d = 0, W or X2 with another d, m = 0, a or out of the wrong shape.
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
    if out is None:
        check_output_fits((n, n2), 8, be, what="relu_ntk output")
        out = xp.empty((n, n2), dtype=np.float64)
    else:
        _check_out(out, (n, n2), xp)
        for arr, name in ((X, "X"), (W, "W"), (X2, "X2")):
            if shares_memory(out, arr):  # the kernels read it while writing out
                raise ParameterError(f"out: shares memory with {name}, which is read while "
                                     f"out is written; pass a separate array")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported here
        K = _assemble(X, W, X2, sym, weights, train_a, tile, out, be)
    return check_result_finite(K, "relu_ntk")


def _assemble(X, W, X2, sym, weights, train_a, tile, out, be):
    """relu_ntk's tiles into ``out`` (inputs validated)."""
    xp = be.xp
    n, d = X.shape
    n2 = X2.shape[0]
    m = W.shape[0]
    if weights is None:
        # +-1 output weights (a_r^2 = 1): fused bit-packed kernels, Numba on the CPU and CUDA
        # on the GPU (ntkcore.kernels, issue 3); general a keeps the pattern GEMM below.
        from ..kernels import relu_ntk_fused
        return relu_ntk_fused(X, W, None if sym else X2, train_a=train_a, tile=tile, out=out,
                              backend=be)
    if tile is None:
        budget = int(be.free_memory_bytes() * DEFAULT_TEMP_FRACTION)
        # per tile: float32 pattern-count tile + (train_a) float64 tile; per row: d + m floats
        tile = tile_rows(4 + (8 if train_a else 0), 8 * d + 12 * m, budget=budget,
                         n=max(n, n2))
    bits = activation_bits(X, W, xp)
    bits2 = bits if sym else activation_bits(X2, W, xp)
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


def _check_out(out, shape, xp):
    """``out`` must be a float64 array of ``shape`` on the inputs' device (written in place:
    an integer or float32 ``out`` would truncate or round the kernel silently)."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        raise ParameterError(f"out: expected a float64 array of shape {shape}, got "
                             f"{type(out).__name__}")
    if (xp is np) != isinstance(out, np.ndarray):
        raise BackendError("out: expected an array on the inputs' device (NumPy for NumPy "
                           "inputs, CuPy for CuPy inputs), got " + type(out).__module__ + "."
                           + type(out).__name__)
    if tuple(out.shape) != shape:
        raise ShapeError(f"out: expected shape {shape}, got {tuple(out.shape)}")
    if out.dtype != np.float64:
        raise ParameterError(f"out: expected dtype float64, got {out.dtype}")


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
