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

from .._validate import as_float_matrix, check_cols
from ..backend import backend_for
from ..ntk.relu import relu_ntk
from ..ntk.tiling import tiles


class DenseKernel:
    """Operator view of a dense (n, n) kernel matrix."""

    def __init__(self, K):
        self.K = as_float_matrix(K, "K", dtype=np.float64)
        self.n = self.K.shape[0]
        self.shape = self.K.shape
        self.dtype = self.K.dtype
        self.xp = backend_for(self.K).xp

    def diag(self):
        return self.xp.diagonal(self.K).copy()

    def columns(self, idx):
        return self.K[:, idx]

    def block(self, i0, i1, j0, j1):
        return self.K[i0:i1, j0:j1]

    def matmat(self, V):
        return self.K @ V

    def dense(self):
        return self.K


class ReluNTKOperator:
    """Matrix-free closed-form eNTK K = ((S S^T)/m) * (X X^T) of the two-layer ReLU net.

    Parameters
    ----------
    X : (n, d) inputs to the two-layer head (raw rows or attention features).
    W : (m, d) trained first-layer weights.
    train_a : bool, add the output-layer term (see :func:`ntkcore.relu_ntk`).
    tile : int, rows per tile for ``matmat`` (default 1024): memory O(tile * n).
    """

    def __init__(self, X, W, *, train_a: bool = False, tile: int = 1024):
        self.X = as_float_matrix(X, "X", dtype=np.float64)
        self.W = as_float_matrix(W, "W", dtype=np.float64)
        check_cols(self.X, self.W, "X", "W")
        self.train_a = train_a
        self.tile = int(tile)
        self.n = self.X.shape[0]
        self.shape = (self.n, self.n)
        self.dtype = np.dtype(np.float64)
        self.xp = backend_for(self.X, self.W).xp

    def diag(self):
        """K_ii = (#active units / m) ||x_i||^2 (+ ||relu(W x_i)||^2 / m)."""
        xp = self.xp
        m = self.W.shape[0]
        active = xp.empty(self.n, dtype=np.float64)
        for i0, i1 in tiles(self.n, self.tile):  # row blocks: O(tile * m) memory
            active[i0:i1] = (self.X[i0:i1] @ self.W.T > 0).sum(axis=1)
        d = active / m * xp.einsum("ij,ij->i", self.X, self.X)
        if self.train_a:
            H = xp.maximum(self.X @ self.W.T, 0)
            d += xp.einsum("ij,ij->i", H, H) / m
        return d

    def columns(self, idx):
        return relu_ntk(self.X, self.W, self.X[idx], train_a=self.train_a, tile=self.tile)

    def rows(self, i0: int, i1: int):
        return relu_ntk(self.X[i0:i1], self.W, self.X, train_a=self.train_a, tile=self.tile)

    def block(self, i0, i1, j0, j1):
        return relu_ntk(self.X[i0:i1], self.W, self.X[j0:j1], train_a=self.train_a,
                        tile=self.tile)

    def matmat(self, V):
        """K @ V for V (n, k), one (tile, n) block of K at a time."""
        xp = self.xp
        V = xp.asarray(V)
        out = xp.empty((self.n,) + V.shape[1:], dtype=np.float64)
        for i0, i1 in tiles(self.n, self.tile):
            out[i0:i1] = self.rows(i0, i1) @ V
        return out

    def cross(self, X_query):
        """(T, n) K(X_query, X)."""
        Xq = as_float_matrix(X_query, "X_query", dtype=np.float64)
        check_cols(Xq, self.X, "X_query", "X")
        return relu_ntk(Xq, self.W, self.X, train_a=self.train_a, tile=self.tile)

    def dense(self):
        return relu_ntk(self.X, self.W, train_a=self.train_a)
