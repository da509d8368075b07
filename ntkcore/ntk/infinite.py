"""Infinite-width NTK of the two-layer ReLU network with first-layer training [Thm 4.2].

K_inf(x, x') = <x, x'> (pi - theta) / (2 pi),  theta = angle(x, x')

(the arc-cosine kernel of order 0 times the linear kernel: E_w[1[w.x>0] 1[w.x'>0]] = (pi - theta)/(2 pi)
for isotropic Gaussian w). Its ridge predictor is the f_NTK of the NTK-distance experiment
[Table 1]. Blocked over row tiles; elementwise after one GEMM per tile.
"""

from __future__ import annotations

import numpy as np

from .._validate import as_float_matrix, check_cols
from ..backend import backend_for
from .tiling import check_output_fits


def relu_ntk_infinite(X, X2=None):
    """Infinite-width ReLU NTK (arc-cosine form).

    Parameters
    ----------
    X : (n, d) array
    X2 : (n2, d) array, optional (default X)

    Returns
    -------
    (n, n2) float64 array on the inputs' device. Rows of zero norm give zero rows.
    """
    X = as_float_matrix(X, "X", dtype=np.float64)
    sym = X2 is None
    X2 = X if sym else as_float_matrix(X2, "X2", dtype=np.float64)
    if not sym:
        check_cols(X, X2, "X", "X2")
    be = backend_for(X, None if sym else X2)
    xp = be.xp
    check_output_fits((X.shape[0], X2.shape[0]), 8, be, what="relu_ntk_infinite output")
    dots = X @ X2.T
    n1 = xp.linalg.norm(X, axis=1)
    n2 = n1 if sym else xp.linalg.norm(X2, axis=1)
    denom = n1[:, None] * n2[None, :]
    cos = xp.divide(dots, denom, out=xp.zeros_like(dots), where=denom > 0)
    xp.clip(cos, -1.0, 1.0, out=cos)
    theta = xp.arccos(cos)
    if sym:
        # arccos near 1 turns rounding of cos into ~sqrt(eps) error in theta; on the diagonal
        # the angle is exactly 0.
        idx = xp.arange(theta.shape[0])
        theta[idx, idx] = 0.0
    K = dots * (np.pi - theta) / (2 * np.pi)
    if sym:
        K = (K + K.T) * 0.5
    return K
