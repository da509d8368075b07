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


def relu_ntk_infinite(X, X2=None):
    """Infinite-width ReLU NTK (arc-cosine form), tiled (kernel 3 of ntkcore.kernels).

    theta comes from acos of the Gram entries, except where |cos theta| > 1 - 1e-3 (equal,
    nearly equal or opposite rows): there it is recomputed as 2 atan2(|u - v|, |u + v|) from
    the unit rows u, v, so every entry is accurate to rounding (acos alone loses half the
    digits near |cos theta| = 1).

    Parameters
    ----------
    X : (n, d) array
    X2 : (n2, d) array, optional (default X; then K is exactly symmetric)

    Returns
    -------
    (n, n2) float64 array on the inputs' device. Rows of zero norm give zero rows.

    Raises
    ------
    ShapeError : d = 0, or X2 with another d. NonFiniteError : NaN/Inf in the inputs, or a
    kernel that overflowed float64 (rescale X).
    """
    from ..kernels import relu_ntk_infinite_fused

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
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported here
        K = relu_ntk_infinite_fused(X, X2, backend=be)
    return check_result_finite(K, "relu_ntk_infinite")
