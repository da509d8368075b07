"""Targets and per-sample losses shared by training and the attacks [A.3.2].

Accepted labels ``y`` (NumPy array or torch tensor, n rows):

* loss "ce" (cross-entropy, needs C >= 2): integer class labels (n,) in [0, C).
* loss "mse" with C = 1 (binary): integer labels (n,) in {0, 1} (0 -> -1, 1 -> +1) or in
  {-1, +1}; or float targets (n,) / (n, 1) used as given (normally +-1).
* loss "mse" with C > 1: integer labels (n,) -> one-hot rows (the KRR targets Y), or float
  targets (n, C) used as given.
* "auto" picks "mse" when C = 1 and "ce" otherwise.

Per-sample losses: ce -> -log softmax(f(x))_y; mse -> ||f(x) - y||^2 (summed over outputs).
The training objective is (1/2n) sum_i l_i + (lam/2) ||theta - theta_0||^2.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NonFiniteError, ParameterError, ShapeError

LOSSES = ("auto", "ce", "mse")


def resolve_loss(loss: str, n_outputs: int) -> str:
    if loss not in LOSSES:
        raise ParameterError(f"loss: expected one of {LOSSES}, got {loss!r}")
    if loss == "auto":
        return "mse" if n_outputs == 1 else "ce"
    if loss == "ce" and n_outputs < 2:
        raise ParameterError("loss: 'ce' needs n_outputs >= 2; use 'mse' with +-1 targets "
                             "for a single output")
    return loss


def _is_integer(y: torch.Tensor) -> bool:
    return not (y.is_floating_point() or y.is_complex())


def targets(y, n: int, n_outputs: int, loss: str, *, device=None, dtype=torch.float32):
    """Validate labels and return (kind, target tensor) for ``per_sample_loss``.

    kind "ce": long (n,) labels. kind "mse": float (n, C) targets in ``dtype``.
    """
    kind = resolve_loss(loss, n_outputs)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    y = y.detach().to(device)
    if y.shape[0] != n:
        raise ShapeError(f"X and y: inconsistent numbers of samples: [{n}, {y.shape[0]}]")
    if kind == "ce":
        if y.ndim != 1 or not _is_integer(y):
            raise ShapeError(f"y: expected integer class labels of shape (n,) for loss 'ce', "
                             f"got {tuple(y.shape)} {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_outputs):
            raise ParameterError(f"y: expected labels in [0, {n_outputs}), got range "
                                 f"[{int(y.min())}, {int(y.max())}]")
        return kind, y.long()
    if _is_integer(y):
        if y.ndim != 1:
            raise ShapeError(f"y: expected integer labels of shape (n,), got {tuple(y.shape)}")
        vals = set(torch.unique(y).tolist())
        if n_outputs == 1:
            if vals <= {0, 1}:
                t = y.to(dtype) * 2 - 1
            elif vals <= {-1, 1}:
                t = y.to(dtype)
            else:
                raise ParameterError(f"y: expected binary labels in {{0, 1}} or {{-1, +1}} for "
                                     f"one output, got values {sorted(vals)[:5]}")
            return kind, t[:, None]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_outputs):
            raise ParameterError(f"y: expected labels in [0, {n_outputs}), got range "
                                 f"[{int(y.min())}, {int(y.max())}]")
        return kind, F.one_hot(y.long(), n_outputs).to(dtype)
    t = y.to(dtype)
    if t.ndim == 1 and n_outputs == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[1] != n_outputs:
        raise ShapeError(f"y: expected float targets of shape (n, {n_outputs}), "
                         f"got {tuple(y.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError("y: expected finite targets, got NaN or Inf")
    return kind, t


def per_sample_loss(out: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """(batch,) losses l(f(x_i), y_i): cross-entropy or squared error summed over outputs."""
    if kind == "ce":
        return F.cross_entropy(out, target, reduction="none")
    return ((out - target) ** 2).sum(dim=1)
