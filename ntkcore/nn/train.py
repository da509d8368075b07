"""Training loop for the two architectures [Sec. 5.1, A.3].

Adam (lr 1e-3), batch 128, objective [A.3.2]

    L(theta) = (1/2n) sum_i l(f(x_i; theta), y_i) + (lam/2) ||theta - theta_0||^2,

l = cross-entropy (multi-class) or squared error against +-1 targets (binary); theta are the
trainable parameters (W, and a when ``train_a``), theta_0 their values when ``train`` starts.
Each mini-batch step uses the batch estimate (1/2B) sum_{i in batch} l_i + the same penalty.
Accepted labels are documented in ``ntkcore.nn._loss``.

Deterministic: batches are shuffled by a seeded ``torch.Generator`` and training runs with
deterministic algorithms on (``warn_only``; the flag ``torch.use_deterministic_algorithms``
sets, restored afterwards), so on the CPU the same seed gives the same weights bit for bit
(at a fixed thread count).

The feature map phi has no trainable parameters (MLP-Attn's M is a fixed buffer), so without
adversarial training phi(X) is computed once and each step runs only the head.

Optional PGD adversarial training (Table 4, PGD-AT eps 0.3): every batch is replaced by its
PGD perturbation in pixel space before the step; ``X`` are then pixels in [0, 1] and
``preprocess`` maps them to model inputs. MLP-Attn keeps its attention matrix M fixed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .adam import Adam

from .._validate import (check_count, check_epochs, check_nonnegative, check_positive, check_rows,
                         check_seed)
from ..errors import NonFiniteError, ParameterError, ShapeError
from ._loss import per_sample_loss, targets
from ._memory import torch_memory_errors
from .attacks import _loss_fn_from_targets, pgd


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    history : list of float
        Objective per epoch: mean over the epoch's batches (weighted by batch size) of the
        batch objective (1/2B) sum l_i + (lam/2) ||theta - theta_0||^2 (on adversarial batches
        when adversarial training).
    train_accuracy : float
        Accuracy on the clean training set after the last epoch.
    seconds : float
        Wall time of the whole call.
    epochs : int
        Epochs run (fewer than asked when the callback stopped training).
    """

    history: list = field(default_factory=list)
    train_accuracy: float = float("nan")
    seconds: float = 0.0
    epochs: int = 0


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


def _as_tensor(X, like: torch.Tensor) -> torch.Tensor:
    X = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    return X.detach().to(device=like.device, dtype=like.dtype)


def _inputs(X, preprocess):
    return X if preprocess is None else preprocess(X)


def objective(model, X, y, *, lam: float = 1e-3, loss: str = "auto", theta0=None,
              preprocess=None) -> torch.Tensor:
    """The training objective (1/2n) sum_i l(f(x_i), y_i) + (lam/2)||theta - theta_0||^2.

    Parameters
    ----------
    model : TwoLayerNet or MLPAttn
    X : (n, d) inputs (pixels when ``preprocess`` is given).
    y : labels or targets (see ``ntkcore.nn._loss``).
    lam : float, default 1e-3
    loss : {"auto", "ce", "mse"}
    theta0 : list of tensors, optional
        Reference parameters (same order as the trainable parameters); default: no penalty.

    Returns
    -------
    scalar tensor (differentiable).
    """
    lam = check_nonnegative(lam, "lam")
    p = next(model.parameters())
    Xt = _as_tensor(X, p)
    kind, t = targets(y, Xt.shape[0], model.n_outputs, loss, device=p.device, dtype=p.dtype)
    return _batch_objective(model, model(_inputs(Xt, preprocess)), t, kind, lam, theta0)


def _batch_objective(model, out, t, kind, lam, theta0):
    """(1/2B) sum_batch l(out_i, t_i) + (lam/2) ||theta - theta0||^2 for outputs ``out``."""
    data = per_sample_loss(out, t, kind).sum() / (2 * out.shape[0])
    if theta0 is None or lam == 0:
        return data
    reg = sum(((p - p0) ** 2).sum() for p, p0 in zip(_params(model), theta0))
    return data + 0.5 * lam * reg


def _deterministic(mode: bool, *, warn_only: bool) -> None:
    """torch.use_deterministic_algorithms without its first statement, which imports
    torch._inductor's config (and with it torch._dynamo: 1.3 s here) to set a flag only
    torch.compile reads; nothing here compiles. The public call where torch lacks the
    setter it wraps."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # pragma: no cover - a torch without it
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        setter(mode, warn_only=warn_only)


@torch_memory_errors("train")
def train(model, X, y, *, epochs: int, lr: float = 1e-3, batch_size: int = 128,
          lam: float = 1e-3, loss: str = "auto", seed: int = 42, progress: bool = True,
          callback=None, preprocess=None, adv_eps: float | None = None,
          adv_step: float = 0.01, adv_iters: int = 40) -> TrainResult:
    """Train ``model`` in place with Adam on the regularized objective [A.3.2].

    Parameters
    ----------
    model : TwoLayerNet or MLPAttn
        Trained in its own dtype (float32 default) and device.
    X : (n, d) array or tensor
        Model inputs; or pixels (n, ...) in [0, 1] when ``preprocess`` is given.
    y : labels or targets, n rows
        "ce": int labels (n,); "mse": binary int labels in {0,1}/{-1,+1} (-> +-1), int labels
        for C > 1 (-> one-hot), or float targets (n, C) as given.
    epochs : int
        Passes over the data (paper: 500).
    lr : float, default 1e-3
    batch_size : int, default 128
    lam : float, default 1e-3
        Weight of (lam/2) ||theta - theta_0||^2; theta_0 = parameters at the start of this call.
    loss : {"auto", "ce", "mse"}, default "auto"
        "auto": "mse" for one output, "ce" otherwise.
    seed : int, default 42
        Seeds shuffling (and PGD random starts).
    progress : bool, default True
        tqdm bar over epochs.
    callback : callable(epoch, loss, model) -> bool, optional
        Called after every epoch; a truthy return stops training.
    preprocess : callable, optional
        Differentiable torch map pixels -> model inputs; needed to attack in pixel space.
    adv_eps : float, optional
        If given, PGD adversarial training with this L_inf budget (Table 4: 0.3), random start,
        ``adv_step`` (default 0.01) and ``adv_iters`` (default 40).

    Returns
    -------
    TrainResult
    """
    t_start = time.perf_counter()
    epochs, batch_size = check_epochs(epochs), check_count(batch_size, "batch_size")
    lr, lam, seed = check_positive(lr, "lr"), check_nonnegative(lam, "lam"), check_seed(seed)
    if adv_eps is not None:
        adv_eps = check_nonnegative(adv_eps, "adv_eps")
        adv_step = check_positive(adv_step, "adv_step")
        adv_iters = check_count(adv_iters, "adv_iters")
    p = next(model.parameters())
    Xt = _as_tensor(X, p)
    if Xt.ndim < 2 or Xt.shape[0] < 1:
        raise ParameterError(f"X: expected a non-empty batch (n, ...), got shape {tuple(Xt.shape)}")
    if not bool(torch.isfinite(Xt).all()):
        raise NonFiniteError("X: expected finite values, got NaN or Inf")
    n = Xt.shape[0]
    kind, T = targets(y, n, model.n_outputs, loss, device=p.device, dtype=p.dtype)
    params = _params(model)
    theta0 = [q.detach().clone() for q in params]
    opt = Adam(params, lr=lr)  # torch.optim.Adam's update, without importing torch._dynamo
    g = torch.Generator().manual_seed(seed)
    result = TrainResult()
    Z = None
    if adv_eps is None:
        # the feature map has no trainable parameters (M is fixed): compute phi(X) once and
        # train the head on it -- same objective and gradients, a B d^2 product saved per batch
        with torch.no_grad():
            Z = torch.cat([model.features(_inputs(Xt[i:i + 4096], preprocess))
                           for i in range(0, n, 4096)])

    from tqdm.auto import tqdm

    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    _deterministic(True, warn_only=True)
    was_training = model.training
    model.train()
    try:
        bar = tqdm(range(epochs), disable=not progress, desc=f"train {model.arch}",
                   unit="epoch")
        for epoch in bar:
            perm = torch.randperm(n, generator=g).to(p.device)
            total = 0.0
            for i0 in range(0, n, batch_size):
                idx = perm[i0:i0 + batch_size]
                tb = T[idx]
                if Z is not None:
                    out = model.head(Z[idx])
                else:
                    fn = _loss_fn_from_targets(model, preprocess, tb, kind)
                    xb = pgd(fn, Xt[idx], adv_eps, adv_step, adv_iters, random_start=True,
                             generator=g)
                    out = model(_inputs(xb, preprocess))
                obj = _batch_objective(model, out, tb, kind, lam, theta0)
                opt.zero_grad()
                obj.backward()
                opt.step()
                total += float(obj.detach()) * idx.shape[0]
            epoch_loss = total / n
            if not (np.isfinite(epoch_loss) and all(bool(q.isfinite().all()) for q in params)):
                raise NonFiniteError(f"train: the objective ({epoch_loss}) or the weights "
                                     f"became NaN or Inf at epoch {epoch} (training "
                                     f"diverged); lower lam, or the learning rate "
                                     f"(lr={lr:g}, an option of the ntkcore.nn.train API only)")
            result.history.append(epoch_loss)
            result.epochs = epoch + 1
            bar.set_postfix(loss=f"{epoch_loss:.4g}")
            if callback is not None and callback(epoch, epoch_loss, model):
                break
        bar.close()
    finally:
        _deterministic(prev[0], warn_only=prev[1])
        model.train(was_training)
    result.train_accuracy = accuracy(model, Xt, y, preprocess=preprocess)
    result.seconds = time.perf_counter() - t_start
    return result


@torch.no_grad()
@torch_memory_errors("predict")
def predict(model, X, *, preprocess=None, batch_size: int = 8192) -> np.ndarray:
    """Model outputs f(X) as a float64 NumPy array (n, C), evaluated in batches."""
    batch_size = check_count(batch_size, "batch_size")
    p = next(model.parameters())
    Xt = _as_tensor(X, p)
    outs = [model(_inputs(Xt[i:i + batch_size], preprocess)).to(torch.float64).cpu()
            for i in range(0, Xt.shape[0], batch_size)]
    return torch.cat(outs).numpy() if outs else np.zeros((0, model.n_outputs))


def accuracy(model, X, y, *, preprocess=None) -> float:
    """Share of correct predictions: sign of f for one output (labels {0,1}, +-1 or float
    targets, positive = class 1), argmax of f against int labels (or argmax of (n, C) targets)."""
    out = predict(model, X, preprocess=preprocess)
    y = np.atleast_1d(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y))
    check_rows(out, y, "X", "y")
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != out.shape[1]):
        raise ShapeError(f"y: expected labels (n,) or targets (n, {out.shape[1]}), got shape "
                         f"{y.shape}")
    if out.shape[0] == 0:
        return float("nan")
    if out.shape[1] == 1:
        return float(np.mean((out[:, 0] > 0) == (y.reshape(-1) > 0)))
    labels = y if y.ndim == 1 else np.argmax(y, axis=1)
    return float(np.mean(np.argmax(out, axis=1) == labels))
