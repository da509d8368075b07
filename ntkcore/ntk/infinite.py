"""Infinite-width NTK of the two-layer ReLU network with first-layer training [Thm 4.2].

K_inf(x, x') = <x, x'> (pi - theta) / (2 pi),  theta = angle(x, x')

(the arc-cosine kernel of order 0 times the linear kernel: E_w[1[w.x>0] 1[w.x'>0]] = (pi - theta)/(2 pi)
for isotropic Gaussian w). Its ridge predictor is the f_NTK of the NTK-distance experiment
[Table 1]. Blocked over row tiles; elementwise after one GEMM per tile.
"""

from __future__ import annotations

import numpy as np

from .._validate import as_float_matrix, check_cols, check_min_cols, check_result_finite
from ..backend import backend_for
from .tiling import check_output_fits


def relu_ntk_infinite(X, X2=None, *, out=None):
    """Infinite-width ReLU NTK (arc-cosine form), tiled (kernel 3 of ntkcore.kernels).

    theta comes from acos of the Gram entries, except where |cos theta| > 1 - 1e-3 (equal,
    nearly equal or opposite rows): there it is recomputed as 2 atan2(|u - v|, |u + v|) from
    the unit rows u, v, so every entry is accurate to rounding (acos alone loses half the
    digits near |cos theta| = 1).

    Parameters
    ----------
    X : (n, d) array
    X2 : (n2, d) array, optional (default X; then K is exactly symmetric)
    out : (n, n2) float64 array, optional
        Written in place and returned: on the inputs' device, or for CuPy inputs a
        C-contiguous host (NumPy) array, filled by row panels computed on the GPU (as in
        :func:`ntkcore.relu_ntk`; for an n x n matrix larger than the GPU).

    Returns
    -------
    (n, n2) float64 array on the inputs' device (``out`` when given). Rows of zero norm give
    zero rows.

    Raises
    ------
    ShapeError : d = 0, X2 with another d, out of the wrong shape. ParameterError,
    BackendError : an out of another dtype, device or layout (see relu_ntk).
    MemoryBudgetError : out=None and K does not fit on the device (before any work).
    NonFiniteError : NaN/Inf in the inputs, or a kernel that overflowed float64 (rescale X).
    """
    from ..kernels import relu_ntk_infinite_fused
    from .relu import check_out_arg

    X = check_min_cols(as_float_matrix(X, "X", dtype=np.float64), "X")
    sym = X2 is None
    X2 = None if sym else as_float_matrix(X2, "X2", dtype=np.float64)
    if not sym:
        check_cols(X, X2, "X", "X2")
    be = backend_for(X, X2)
    xp = be.xp
    # the kernels read whole C-contiguous rows
    X = xp.ascontiguousarray(X)
    X2 = None if sym else xp.ascontiguousarray(X2)
    shape = (X.shape[0], (X if sym else X2).shape[0])
    host_out = check_out_arg(out, shape, xp, X, X2, names=("X", "X2"))
    if out is None:
        check_output_fits(shape, 8, be, what="relu_ntk_infinite output", host_out=True)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported here
        if host_out:  # checks the panels for overflow as they pass
            from ..kernels.host_panels import relu_ntk_infinite_host
            return relu_ntk_infinite_host(X, X2, out=out, backend=be)
        K = relu_ntk_infinite_fused(X, X2, out=out, backend=be)
    return check_result_finite(K, "relu_ntk_infinite")
