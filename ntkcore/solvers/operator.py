"""Kernel operators: what the Nystrom and CG solvers need of K without the n x n matrix.

An operator has ``n``, ``dtype``, ``shape``, and

- ``diag()``          (n,)      K_ii
- ``columns(idx)``    (n, r)    K[:, idx]
- ``block(i0, i1, j0, j1)``     K[i0:i1, j0:j1] (the packed exact solver's tiles)
- ``matmat(V)``       (n, k)    K @ V, assembled tile by tile (memory O(n * tile))
- ``cross(X_query)``  (T, n)    the test block K(X_query, X) as a dense array
- ``dense()``         (n, n)    the whole matrix (only when it fits; the exact solver's input)
- ``xp``              optional: the array module of its arrays (default: that of ``diag()``)

:class:`DenseKernel` wraps an existing array; :class:`ReluNTKOperator` assembles eNTK tiles of
the two-layer net from features and weights on demand, so the kernel itself is never stored.
A caller's own operator needs ``shape``, ``diag`` and ``columns`` (all Nystrom calls; without
them it is read as an array); CG adds ``matmat``, exact ``dense`` (``block`` for packed
storage). :func:`checked_operator` names a missing member instead of failing inside a solver.
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
from ..errors import NonFiniteError, ParameterError, ShapeError
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


def _check_range(i0, i1, j0, j1, n):
    """ParameterError unless 0 <= i0 <= i1 <= n and 0 <= j0 <= j1 <= n (integers): a slice
    would clip an out-of-range block silently."""
    for lo, hi, what in ((i0, i1, "rows"), (j0, j1, "columns")):
        lo, hi = check_count(lo, f"block {what} start", minimum=0), \
            check_count(hi, f"block {what} stop", minimum=0)
        if not lo <= hi <= n:
            raise ParameterError(f"block: expected {what} {lo}:{hi} within 0:{n}")


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
        _check_range(i0, i1, j0, j1, self.n)
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
        _check_range(i0, i1, j0, j1, self.n)
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


#: the members of the protocol a solver may call
_PROTOCOL = ("diag", "columns", "block", "matmat", "cross", "dense")


def checked_operator(K):
    """``K`` itself for ntkcore's operators; a caller's operator behind :class:`_CallerOperator`."""
    if isinstance(K, (DenseKernel, ReluNTKOperator)):
        return K
    return _CallerOperator(K)


class _CallerOperator:
    """A caller's kernel operator as the solvers see it: ``xp`` from its diagonal when it has
    none, a finite-checked ``diag()``, and a protocol member it lacks as ParameterError
    naming it (instead of an AttributeError inside a solver). Other attributes pass through."""

    def __init__(self, op):
        shape = tuple(op.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ShapeError(f"K: expected a square kernel operator, got shape {shape}")
        self.op, self.n, self.shape = op, int(shape[0]), shape
        self.dtype = getattr(op, "dtype", np.float64)
        self._xp = getattr(op, "xp", None)

    @property
    def xp(self):
        if self._xp is None:
            self._xp = backend_for(self.op.diag()).xp
        return self._xp

    def diag(self):
        d = self._member("diag")()
        if not bool(backend_for(d).xp.isfinite(d).all()):
            raise NonFiniteError(f"K: the operator's diag() holds NaN or Inf "
                                 f"({type(self.op).__name__})")
        return d

    def _member(self, name):
        member = getattr(self.op, name, None)
        if not callable(member):
            raise ParameterError(f"K: the kernel operator {type(self.op).__name__} has no "
                                 f"{name}() method, which this solver calls (solver='nystrom' "
                                 f"needs only diag() and columns(); see "
                                 f"ntkcore.solvers.operator)")
        return member

    def __getattr__(self, name):  # only for names not found on the adapter itself
        if name == "op" or name.startswith("__"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        if name in _PROTOCOL:
            return self._member(name)
        return getattr(self.op, name)
