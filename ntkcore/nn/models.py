"""The paper's two architectures as torch modules [eq. 2, Def 3.1, A.1].

Both share one two-layer head on top of a feature map phi:

    f(x) = m^-1/2 a^T relu(W phi(x)),    W (m, d) ~ N(0, kappa^2),  a (m, C) fixed +-1 signs

* 2L-ReLU (:class:`TwoLayerNet`): phi(x) = x.
* MLP-Attn (:class:`MLPAttn`): phi(x) = rownorm(M x) with M = X^T X (d, d) over the whole
  training set X (transductive linearized attention, Def 3.1). For a training row x_i this is
  row i of rownorm(X X^T X); for a query q it is rownorm(M q). Cost O(n d^2) once; the n x n
  Gram matrix is never formed.

Only W trains by default (the paper's setting); ``train_a=True`` makes a a parameter too. The
closed-form eNTK of a trained model is ``ntkcore.relu_ntk(model.features_numpy(X),
model.W_numpy())`` [Thm 4.2, B.5] (see :func:`closed_form_entk`); it is always formed in
float64 from the trained weights, whatever dtype the model trained in.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .._validate import as_float_matrix, check_count, check_positive, check_seed
from ..errors import ParameterError, ShapeError
from ._checks import check_device

ARCHS = ("relu", "attn")


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ParameterError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _as_float64_numpy(X, name: str) -> np.ndarray:
    """(n, d) float64 NumPy copy of an array, tensor or nested list, finite-checked."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().to(torch.float64).numpy()
    return as_float_matrix(X, name, dtype=np.float64)


def _rownorm_torch(Z: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm; all-zero rows stay zero (as ntkcore.gram does)."""
    norms = torch.linalg.vector_norm(Z, dim=1, keepdim=True)
    return Z / torch.where(norms > 0, norms, torch.ones_like(norms))


def _rownorm_numpy(Z: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.where(norms > 0, norms, 1.0)


def init_weights(d: int, width: int, n_outputs: int, *, kappa: float = 0.01, seed: int = 42):
    """Seeded initial weights in float64: W (m, d) ~ N(0, kappa^2), a (m, C) in {-1, +1}.

    Drawn in float64 from one ``torch.Generator`` so every dtype starts from the same numbers
    (rounded once) and the two architectures share W for equal (d, width, seed).
    """
    kappa, seed = check_positive(kappa, "kappa"), check_seed(seed)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(width, d, generator=g, dtype=torch.float64) * kappa
    a = torch.randint(0, 2, (width, n_outputs), generator=g).to(torch.float64) * 2 - 1
    return W, a


class _TwoLayerHead(nn.Module):
    """Shared head f(x) = m^-1/2 relu(phi(x) W^T) a; subclasses define ``features`` (phi)."""

    arch = ""

    def __init__(self, d, width, n_outputs, *, kappa, seed, dtype, train_a, device):
        super().__init__()
        self.d = _check_int(d, "d")
        self.width = _check_int(width, "width")
        self.n_outputs = _check_int(n_outputs, "n_outputs")
        self.kappa = check_positive(kappa, "kappa")
        self.seed = check_seed(seed)
        if dtype not in (torch.float32, torch.float64):
            raise ParameterError(f"dtype: expected torch.float32 or torch.float64, got {dtype!r}")
        device = None if device is None else check_device(device)
        self.train_a = bool(train_a)
        W, a = init_weights(self.d, self.width, self.n_outputs, kappa=kappa, seed=seed)
        self.W = nn.Parameter(W.to(dtype=dtype, device=device))
        a = a.to(dtype=dtype, device=device)
        if self.train_a:
            self.a = nn.Parameter(a)
        else:
            self.register_buffer("a", a)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d) inputs -> (batch, C) outputs m^-1/2 relu(phi(x) W^T) a [eq. 2]."""
        return self.head(self.features(x))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """The two-layer head on features z = phi(x): (batch, d) -> (batch, C)."""
        return (torch.relu(z @ self.W.T) @ self.a) / math.sqrt(self.width)

    # --- float64 NumPy views for the closed-form kernel -------------------------------------
    def W_numpy(self) -> np.ndarray:
        """Current first-layer weights as a float64 (m, d) NumPy copy."""
        return self.W.detach().cpu().to(torch.float64).numpy().copy()

    def a_numpy(self) -> np.ndarray:
        """Current output weights as a float64 (m, C) NumPy copy."""
        return self.a.detach().cpu().to(torch.float64).numpy().copy()

    def features_numpy(self, X) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, d={self.d}, width={self.width}, "
                f"n_outputs={self.n_outputs}, kappa={self.kappa}, train_a={self.train_a}")


class TwoLayerNet(_TwoLayerHead):
    """2L-ReLU: f(x) = m^-1/2 a^T relu(W x) on the (normalized) inputs [eq. 2, A.1].

    Parameters
    ----------
    d : int
        Input dimension.
    width : int
        Hidden width m (paper: 1024).
    n_outputs : int
        Number of outputs C (1 for binary +-1 regression, C classes otherwise).
    kappa : float, default 0.01
        Initialization scale, w_r ~ N(0, kappa^2 I) [A.1].
    seed : int, default 42
        Seeds W and the signs a.
    dtype : torch.float32 or torch.float64, default float32
        Training dtype. The eNTK is always formed in float64 from the weights.
    train_a : bool, default False
        Make a trainable (paper: a fixed).
    device : torch device, optional

    Attributes
    ----------
    W : Parameter (m, d);  a : buffer (m, C) of +-1 (Parameter when ``train_a``).
    """

    arch = "relu"

    def __init__(self, d: int, width: int, n_outputs: int, *, kappa: float = 0.01,
                 seed: int = 42, dtype=torch.float32, train_a: bool = False, device=None):
        super().__init__(d, width, n_outputs, kappa=kappa, seed=seed, dtype=dtype,
                         train_a=train_a, device=device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) = x (identity for 2L-ReLU)."""
        return x

    def features_numpy(self, X) -> np.ndarray:
        """(n, d) float64 NumPy copy of X (phi is the identity)."""
        X = _as_float64_numpy(X, "X")
        if X.shape[1] != self.d:
            raise ShapeError(f"X: expected {self.d} columns, got shape {X.shape}")
        return X


class MLPAttn(_TwoLayerHead):
    """MLP-Attn: the two-layer head on linearized-attention features [Def 3.1, eq. 2, A.1].

    phi(x) = rownorm(M x) with M = X_train^T X_train, computed once over the whole training set
    (transductive). On the training rows, phi(X_train) = rownorm(X X^T X); on query rows it is
    rownorm(Q M) -- the same as ``ntkcore.attention_features(X_train, Q)``.

    Parameters
    ----------
    X_train : (n, d) array or tensor
        The whole (preprocessed, unit-row) training set; only M = X^T X (d, d) is kept.
    width, n_outputs, kappa, seed, dtype, train_a, device
        As in :class:`TwoLayerNet`.

    Notes
    -----
    M is a buffer: it never trains and gradients (e.g. of attacks) flow through phi with M held
    fixed. After the training set changes (Prop. 4.5: perturbing one point changes every
    feature through M), call :meth:`set_attention` with the new set. A float64 copy of M is
    kept on the side, and the buffer is re-cast from it whenever the module changes dtype or
    device, so ``copy.deepcopy(model).double()`` has exactly M = X^T X in float64. A state
    dict holds only M in the module's dtype: after ``load_state_dict`` call
    :meth:`set_attention` with the training rows to get the float64 M back exactly (the
    CLI's resume does; without it M is the float32 cast, ~5e-8 relative).
    """

    arch = "attn"

    def __init__(self, X_train, width: int, n_outputs: int, *, kappa: float = 0.01,
                 seed: int = 42, dtype=torch.float32, train_a: bool = False, device=None):
        X = _as_float64_numpy(X_train, "X_train")
        if X.shape[0] < 1 or X.shape[1] < 1:
            raise ShapeError(f"X_train: expected a non-empty (n, d) array, got shape {X.shape}")
        super().__init__(X.shape[1], width, n_outputs, kappa=kappa, seed=seed, dtype=dtype,
                         train_a=train_a, device=device)
        self._M64 = X.T @ X
        self.register_buffer("M", torch.from_numpy(self._M64).to(dtype=dtype, device=device))
        self.register_load_state_dict_post_hook(MLPAttn._sync_after_load)

    def set_attention(self, X_train) -> None:
        """Recompute M = X_train^T X_train (in place) for a new or perturbed training set."""
        X = _as_float64_numpy(X_train, "X_train")
        if X.shape[1] != self.d:
            raise ShapeError(f"X_train: expected {self.d} columns, got shape {X.shape}")
        self._M64 = X.T @ X
        with torch.no_grad():
            self.M.copy_(torch.from_numpy(self._M64))

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        # re-cast M from the float64 copy so dtype round trips never lose M's precision
        self.M = torch.from_numpy(self._M64).to(dtype=self.M.dtype, device=self.M.device)
        return out

    @staticmethod
    def _sync_after_load(module, incompatible_keys):
        module._M64 = module.M.detach().cpu().to(torch.float64).numpy().copy()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) = rownorm(x M) for a (batch, d) tensor (M symmetric, so x M = (M x^T)^T)."""
        return _rownorm_torch(x @ self.M)

    def features_numpy(self, X) -> np.ndarray:
        """float64 features rownorm(X M) from the float64 M (matches attention_features)."""
        X = _as_float64_numpy(X, "X")
        if X.shape[1] != self.d:
            raise ShapeError(f"X: expected {self.d} columns, got shape {X.shape}")
        return _rownorm_numpy(X @ self._M64)


def make_model(arch: str, X_train, width: int, n_outputs: int, *, kappa: float = 0.01,
               seed: int = 42, dtype=torch.float32, train_a: bool = False, device=None):
    """Build the paper's architecture ``arch`` ("relu" = 2L-ReLU, "attn" = MLP-Attn).

    Parameters
    ----------
    arch : {"relu", "attn"}
    X_train : (n, d) array or tensor
        Training inputs; "relu" uses only d, "attn" forms M = X^T X from them.
    width, n_outputs, kappa, seed, dtype, train_a, device
        As in :class:`TwoLayerNet`.

    Raises
    ------
    MemoryBudgetError
        The network would not fit the device's free memory (estimate of the first layer, its
        training state and one batch of activations; checked before allocating).
    """
    from ._memory import check_model_fits, torch_memory_errors

    if arch not in ARCHS:
        raise ParameterError(f"arch: expected one of {ARCHS}, got {arch!r}")
    _check_int(width, "width")
    if not isinstance(X_train, (np.ndarray, torch.Tensor)):  # a nested list, ...
        X_train = _as_float64_numpy(X_train, "X_train")
    shape = tuple(X_train.shape)
    if len(shape) != 2:
        raise ShapeError(f"X_train: expected a 2-D array (n, d), got shape {shape}")
    if dtype in (torch.float32, torch.float64):  # any other dtype: the model says it is wrong
        check_model_fits(arch, shape[1], width, _check_int(n_outputs, "n_outputs"),
                         itemsize=torch.finfo(dtype).bits // 8, device=device)
    kw = dict(kappa=kappa, seed=seed, dtype=dtype, train_a=train_a, device=device)
    with torch_memory_errors("model"):
        if arch == "attn":
            return MLPAttn(X_train, width, n_outputs, **kw)
        return TwoLayerNet(shape[1], width, n_outputs, **kw)


def closed_form_entk(model, X, X2=None, *, output: int = 0, tile: int | None = None):
    """Closed-form float64 eNTK of a (trained) model: ``relu_ntk(phi(X), W, phi(X2))``.

    [Thm 4.2, B.5] K = ((S S2^T)/m) * (phi(X) phi(X2)^T), S = 1[phi(X) W^T > 0]; with
    ``model.train_a`` the output-layer term is added. One kernel serves all outputs while a is
    +-1 [Thm B.12]; if a has trained, ``output`` picks the column whose a_r^2 weights the W-part.

    Returns
    -------
    (n, n2) float64 NumPy array.
    """
    from ..ntk.relu import relu_ntk  # NumPy only; imported lazily to keep layers one-way

    F = model.features_numpy(X)
    F2 = None if X2 is None else model.features_numpy(X2)
    a = model.a_numpy()
    output = check_count(output, "output", minimum=0)
    if output >= a.shape[1]:
        raise ParameterError(f"output: expected 0 <= output < {a.shape[1]}, got {output!r}")
    return relu_ntk(F, model.W_numpy(), F2, a=a[:, output], train_a=model.train_a, tile=tile)
