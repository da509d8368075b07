"""Driver of the square-matrix check: finiteness, ||K||_F^2 and ||K - K^T||_F^2 in one read of
K (the A.8 symmetry check and the NaN/Inf check of a kernel matrix, fused).

NumPy input runs the Numba kernel of :mod:`.numba_validation`, CuPy input the CUDA kernel of
``matrix_stats.cu`` (its two numbers come back in one device-to-host copy). Both read each
tile pair (I, J), (J, I) with I <= J once and sum in float64 (float32 K too).

Finiteness costs nothing extra: a NaN or Inf entry makes the sum of squares NaN or Inf. So does
overflow of finite entries (|K_ij| above ~1e154), and squares of entries below ~1e-154
underflow: whenever the sums are not finite or are tiny, the driver looks again (the rescue,
taken for such inputs only): an explicit finiteness check, then max |K|, then the same pass
on 2^k K with 2^k max |K| in [0.5, 1) (a power of two: exact), whose scale it returns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..backend import is_gpu_array

#: CPU: parts of equal tile-pair counts (parallel tasks). Fixed, not the thread count, so the
#: sums are the same bits for any number of threads.
CPU_PARTS = 64
#: GPU: blocks of the fixed grid over the tile pairs (~8 per SM on an H100/H200: all resident).
GPU_BLOCKS = 1024
#: below this sum of squares the differences of entries near rtol * max|K| would lose digits
#: to underflow (they square below 2^-1022): rescale
_TINY_SUM = 2.0 ** -600
#: the rescue's scale stays within 2^-1000 .. 2^1000 (representable, never subnormal)
_MAX_EXPONENT = 1000
#: entries per row block of the rescue's max |K| (a temporary of at most 128 MB)
_BLOCK_ENTRIES = 1 << 24


class MatrixStats(NamedTuple):
    """Result of :func:`square_matrix_stats`.

    finite : whether every entry of K is finite (when False the sums are NaN).
    fro2 : sum over i, j of (scale K_ij)^2.
    asym2 : sum over i != j of (scale K_ij - scale K_ji)^2.
    scale : a power of two, 1.0 unless the squares of K's entries leave float64's range.
    """

    finite: bool
    fro2: float
    asym2: float
    scale: float = 1.0

    @property
    def rel_asymmetry(self) -> float:
        """||K - K^T||_F / ||K||_F (0 for K = 0); the scale cancels."""
        if not self.fro2 > 0:
            return 0.0
        return math.sqrt(self.asym2) / math.sqrt(self.fro2)


def square_matrix_stats(K) -> MatrixStats:
    """Finiteness, sum of squares and squared asymmetry of a square matrix in one read.

    Parameters
    ----------
    K : (n, n) float64 or float32 NumPy (CPU) or CuPy (GPU) array, C- or F-contiguous (an
        F-ordered K is read as K^T, a C-ordered view of the same entries: the sums agree).

    Returns
    -------
    MatrixStats
        ``(finite, fro2, asym2, scale)``; sqrt(asym2 / fro2) is the relative asymmetry
        ||K - K^T||_F / ||K||_F (``rel_asymmetry``).

    Raises ValueError for other shapes, dtypes or layouts (callers with a strided view use
    the blocked NumPy/CuPy path of :func:`ntkcore._validate.check_square_symmetric`).
    """
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(K.shape)}")
    if K.dtype not in (np.float64, np.float32):
        raise ValueError(f"expected float64 or float32, got {K.dtype}")
    if not K.flags.c_contiguous:
        if not K.flags.f_contiguous:
            raise ValueError("expected a C- or F-contiguous matrix")
        K = K.T
    if K.shape[0] == 0:
        return MatrixStats(True, 0.0, 0.0)
    fro2, asym2 = _one_pass(K, 1.0)
    if math.isfinite(fro2) and math.isfinite(asym2) and fro2 >= _TINY_SUM:
        return MatrixStats(True, fro2, asym2)
    return _rescue(K)


def _rescue(K) -> MatrixStats:
    """NaN/Inf entry, or squares out of float64's range: which one, and the sums rescaled."""
    from .._validate import all_finite
    if not all_finite(K):
        return MatrixStats(False, math.nan, math.nan)
    top = max_abs(K)
    if top == 0.0:
        return MatrixStats(True, 0.0, 0.0)
    exponent = max(-_MAX_EXPONENT, min(_MAX_EXPONENT, -math.frexp(top)[1]))
    scale = math.ldexp(1.0, exponent)
    fro2, asym2 = _one_pass(K, scale)
    return MatrixStats(True, fro2, asym2, scale)


def max_abs(K) -> float:
    """max |K_ij| of a finite K, by row blocks (bounded temporaries)."""
    rows = max(1, _BLOCK_ENTRIES // K.shape[1])
    return max(float(abs(K[r0:r0 + rows]).max()) for r0 in range(0, K.shape[0], rows))


def _one_pass(K, scale: float):
    """(fro2, asym2) of scale * K, K C-contiguous and n >= 1, on K's device."""
    n = K.shape[0]
    if is_gpu_array(K):
        from ..backend import Backend
        from . import cuda
        xp = Backend("cuda").xp
        nt = -(-n // cuda.MS_BLOCK[0])  # tiles of MS_TILE = blockDim.x
        blocks = min(GPU_BLOCKS, nt * (nt + 1) // 2)
        partial = xp.empty((blocks, 2), dtype=np.float64)
        out = xp.empty(2, dtype=np.float64)
        fro2, asym2 = cuda.matrix_stats(K, scale, partial, out).get()  # the one copy back
        return float(fro2), float(asym2)
    from . import numba_validation as nv
    nt = -(-n // nv.TILE)
    pairs = nt * (nt + 1) // 2
    parts = min(CPU_PARTS, pairs)
    bounds = np.arange(parts + 1, dtype=np.int64) * pairs // parts  # strictly increasing
    partial = np.empty((parts, 2))
    nv.square_stats(K, np.float64(scale), bounds, partial)
    return float(partial[:, 0].sum()), float(partial[:, 1].sum())
