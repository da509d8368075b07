"""Kernel operators: what the Nystrom and CG solvers need of K without the n x n matrix.

An operator has ``n``, ``dtype``, ``shape``, and

- ``diag()``          (n,)      K_ii
- ``columns(idx)``    (n, r)    K[:, idx]
- ``block(i0, i1, j0, j1)``     K[i0:i1, j0:j1] (the packed exact solver's tiles)
- ``matmat(V)``       (n, k)    K @ V, assembled tile by tile (memory O(n * tile))
- ``cross(X_query)``  (T, n)    the test block K(X_query, X) as a dense array
- ``dense()``         (n, n)    the whole matrix (only when it fits; the exact solver's input)

:class:`DenseKernel` wraps an existing array; :class:`ReluNTKOperator` assembles eNTK tiles of
the two-layer net from features and weights on demand, so the kernel itself is never stored.
"""

from __future__ import annotations

import numpy as np

from .._validate import (
    as_float_matrix,
    check_cols,
    check_count,
    check_flag,
    check_min_cols,
)
from ..backend import backend_for
from ..errors import ParameterError, ShapeError
from ..ntk.relu import neuron_weights, relu_ntk
from ..ntk.tiling import tiles


def _check_columns(idx, n, xp):
    """``idx`` as an integer index array with every entry in [0, n), else ParameterError."""
    idx = xp.asarray(idx)
    if idx.dtype.kind not in "iu" or idx.ndim != 1:
        raise ParameterError(f"idx: expected a 1-D array of column indices, got dtype "
                             f"{idx.dtype} and shape {tuple(idx.shape)}")
    if idx.size and not (int(idx.min()) >= 0 and int(idx.max()) < n):
        raise ParameterError(f"idx: expected column indices in [0, {n}), got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
    return idx


def _check_block(V, n, xp):
    """``V`` for ``matmat``: (n,) or (n, k) real numbers on the operator's device, else
    ShapeError (shape) or ParameterError (complex, string, object: casting would drop the
    imaginary part or fail deep inside)."""
    V = xp.asarray(V)
    if V.dtype.kind not in "biuf":
        raise ParameterError(f"V: expected real numbers, got dtype {V.dtype}")
    if V.ndim not in (1, 2) or V.shape[0] != n:
        raise ShapeError(f"V: expected shape ({n},) or ({n}, k) for an operator of shape "
                         f"({n}, {n}), got {tuple(V.shape)}")
    return V


class DenseKernel:
    """Operator view of a dense (n, n) kernel matrix (ShapeError unless square)."""

    def __init__(self, K):
        self.K = as_float_matrix(K, "K", dtype=np.float64)
        if self.K.shape[0] != self.K.shape[1]:
            raise ShapeError(f"K: expected a square matrix, got shape {tuple(self.K.shape)}")
        self.n = self.K.shape[0]
        self.shape = self.K.shape
        self.dtype = self.K.dtype
        self.xp = backend_for(self.K).xp

    def diag(self):
        return self.xp.diagonal(self.K).copy()

    def columns(self, idx):
        return self.K[:, _check_columns(idx, self.n, self.xp)]

    def block(self, i0, i1, j0, j1):
        return self.K[i0:i1, j0:j1]

    def matmat(self, V):
        return self.K @ _check_block(V, self.n, self.xp)

    def dense(self):
        return self.K


class ReluNTKOperator:
    """Matrix-free closed-form eNTK of the two-layer ReLU net [Thm 4.2, B.5]:

        K = ((S diag(a^2) S^T) / m) * (X X^T)  (+ (1/m) relu(X W^T) relu(X W^T)^T if a trains)

    Parameters
    ----------
    X : (n, d) inputs to the two-layer head (raw rows or attention features).
    W : (m, d) trained first-layer weights.
    a : (m,) output weights, optional (default: +-1 signs, a_r^2 = 1). Trained output weights
        are no longer +-1 and weight each neuron's pattern term by a_r^2; an (m, C) array
        uses output 0's column, as :func:`ntkcore.relu_ntk` does.
    train_a : bool, add the output-layer term (see :func:`ntkcore.relu_ntk`).
    tile : int >= 1, rows per tile for ``matmat`` (default 1024): memory O(tile * n).
    """

    #: ``dense()`` assembles a new matrix nobody else holds: the exact solver may factor it
    #: in place. Operators without this flag (``DenseKernel`` hands back the caller's K) are
    #: copied first unless the caller passed ``overwrite_k=True``.
    dense_is_private = True

    def __init__(self, X, W, *, a=None, train_a: bool = False, tile: int = 1024):
        self.X = check_min_cols(as_float_matrix(X, "X", dtype=np.float64), "X")
        self.W = as_float_matrix(W, "W", dtype=np.float64)
        check_cols(self.X, self.W, "X", "W")
        if self.W.shape[0] < 1:
            raise ShapeError(f"W: expected at least one hidden unit (m >= 1 rows), got shape "
                             f"{tuple(self.W.shape)}")
        self.train_a = check_flag(train_a, "train_a")
        self.tile = check_count(tile, "tile")
        self.n = self.X.shape[0]
        self.shape = (self.n, self.n)
        self.dtype = np.dtype(np.float64)
        self.xp = backend_for(self.X, self.W).xp
        #: (m,) per-neuron weights a_r^2 of the pattern term, None for +-1 output weights
        self.weights = neuron_weights(a, self.W.shape[0], self.xp)
        # what relu_ntk is given: output 0's column of a (None keeps the fused +-1 path)
        self.a = None if self.weights is None else \
            self.xp.asarray(as_float_matrix(a, "a", dtype=np.float64, allow_1d=True)[:, 0])

    def diag(self):
        """K_ii = (sum_r a_r^2 1[w_r.x_i > 0] / m) ||x_i||^2 (+ ||relu(W x_i)||^2 / m)."""
        xp = self.xp
        m = self.W.shape[0]
        active = xp.empty(self.n, dtype=np.float64)
        for i0, i1 in tiles(self.n, self.tile):  # row blocks: O(tile * m) memory
            on = self.X[i0:i1] @ self.W.T > 0
            active[i0:i1] = on.sum(axis=1) if self.weights is None else \
                on.astype(np.float64) @ self.weights
        d = active / m * backend_for(self.X).sum_of_squares(self.X, axis=1)
        if self.train_a:
            for i0, i1 in tiles(self.n, self.tile):
                H = xp.maximum(self.X[i0:i1] @ self.W.T, 0)
                d[i0:i1] += backend_for(H).sum_of_squares(H, axis=1) / m
        return d

    def _kernel(self, X, X2=None):
        return relu_ntk(X, self.W, X2, a=self.a, train_a=self.train_a, tile=self.tile)

    def columns(self, idx):
        return self._kernel(self.X, self.X[_check_columns(idx, self.n, self.xp)])

    def rows(self, i0: int, i1: int):
        return self._kernel(self.X[i0:i1], self.X)

    def block(self, i0, i1, j0, j1):
        return self._kernel(self.X[i0:i1], self.X[j0:j1])

    def matmat(self, V):
        """K @ V for V (n, k), one (tile, n) block of K at a time."""
        xp = self.xp
        V = _check_block(V, self.n, xp)
        out = xp.empty((self.n,) + V.shape[1:], dtype=np.float64)
        for i0, i1 in tiles(self.n, self.tile):
            out[i0:i1] = self.rows(i0, i1) @ V
        return out

    def cross(self, X_query):
        """(T, n) K(X_query, X)."""
        Xq = as_float_matrix(X_query, "X_query", dtype=np.float64)
        check_cols(Xq, self.X, "X_query", "X")
        return self._kernel(Xq, self.X)

    def dense(self):
        return relu_ntk(self.X, self.W, a=self.a, train_a=self.train_a)
