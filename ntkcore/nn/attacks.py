"""L_inf attacks in pixel space: FGSM, PGD, MIM [Sec. 5.1 "Perturbation Methods", A.4.2].

Every attack maximizes ``loss_fn(x_pixels)`` over the box {x' : ||x' - x||_inf <= eps} ∩ [0, 1]^D
and returns the perturbed pixels, detached, with the dtype and shape of ``x``. ``loss_fn``
maps a pixel batch (n, ...) to per-sample losses (n,) or to a scalar; per-sample losses are
summed, so each sample's gradient is its own. The caller composes dataset normalization +
model + loss in ``loss_fn`` (see :func:`model_loss_fn`), so gradients pass through the
preprocessing and the perturbation budget is in pixel units, as in the paper (eps = 0.3).

For MLP-Attn the attention matrix M is a buffer and stays fixed during an attack (the
attacker moves one point at a time through a frozen feature map). After perturbing training
points, recompute it with ``model.set_attention(preprocess(X_train_perturbed))`` -- the Gram
coupling of Prop. 4.5 then reaches every training feature.
"""

from __future__ import annotations

import torch

from ..errors import NonFiniteError, ParameterError
from .._validate import check_nonnegative
from ._loss import per_sample_loss, targets


def _check_pixels(x) -> torch.Tensor:
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if x.ndim < 1 or x.shape[0] < 1:
        raise ParameterError(f"x: expected a batch of pixels (n, ...), got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("x: expected finite pixels, got NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise ParameterError(f"x: expected pixels in [0, 1], got range [{lo:.3g}, {hi:.3g}]")
    return x.detach()


def _check_budget(eps, step=None, iters=None, momentum=None):
    """ParameterError unless eps (and momentum) are finite numbers >= 0, step a finite
    number > 0 and iters an integer >= 1 (None: not used by the attack)."""
    from .._validate import check_count, check_positive
    for name, value in (("eps", eps), ("momentum", momentum)):
        if value is not None:
            check_nonnegative(value, name)
    if step is not None:
        check_positive(step, "step")
    if iters is not None:
        check_count(iters, "iters")


def _grad(loss_fn, x: torch.Tensor) -> torch.Tensor:
    """d sum(loss_fn(x)) / dx, leaving parameter .grad untouched."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        (g,) = torch.autograd.grad(loss.sum(), x)
    return g


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Clamp into the eps-ball around x and into [0, 1] (both boxes, so the order is free)."""
    return torch.clamp(torch.minimum(torch.maximum(x_adv, x - eps), x + eps), 0.0, 1.0)


def fgsm(loss_fn, x, eps: float = 0.3):
    """Fast gradient sign method: x' = clip(x + eps * sign(grad loss_fn(x))).

    Parameters
    ----------
    loss_fn : callable, pixels (n, ...) -> (n,) or scalar loss to increase.
    x : (n, ...) tensor of pixels in [0, 1].
    eps : float, default 0.3
        L_inf budget in pixel units.

    Returns
    -------
    (n, ...) detached tensor, ||x' - x||_inf <= eps, x' in [0, 1].
    """
    x = _check_pixels(x)
    _check_budget(eps)
    g = _grad(loss_fn, x)
    return _project(x + eps * torch.sign(g), x, eps).detach()


def pgd(loss_fn, x, eps: float = 0.3, step: float = 0.01, iters: int = 40, *,
        random_start: bool = False, generator: torch.Generator | None = None):
    """Projected gradient ascent under L_inf (Madry et al.) [Sec. 5.1: eps 0.3, 0.01, 40].

    x_{k+1} = Proj(x_k + step * sign(grad loss_fn(x_k))), Proj onto the eps-ball and [0, 1].

    Parameters
    ----------
    loss_fn, x, eps
        As in :func:`fgsm`.
    step : float, default 0.01
        Step size alpha per iteration.
    iters : int, default 40
    random_start : bool, default False
        Start from a uniform point of the eps-ball (used for adversarial training).
    generator : torch.Generator, optional
        Seeds the random start (CPU generator).

    Returns
    -------
    (n, ...) detached tensor inside the eps-ball and [0, 1].
    """
    x = _check_pixels(x)
    _check_budget(eps, step, iters)
    x_adv = x.clone()
    if random_start and eps > 0:
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype)
        x_adv = _project(x + (2 * u.to(x.device) - 1) * eps, x, eps)
    for _ in range(int(iters)):
        g = _grad(loss_fn, x_adv)
        x_adv = _project(x_adv + step * torch.sign(g), x, eps)
    return x_adv.detach()


def mim(loss_fn, x, eps: float = 0.3, step: float = 0.01, iters: int = 40,
        momentum: float = 0.9):
    """Momentum iterative method (Dong et al.) [Sec. 5.1: decay 0.9].

    g <- mu g + grad / ||grad||_1 (per sample), x <- Proj(x + step * sign(g)).

    Parameters
    ----------
    loss_fn, x, eps, step, iters
        As in :func:`pgd`.
    momentum : float, default 0.9
        Decay factor mu.

    Returns
    -------
    (n, ...) detached tensor inside the eps-ball and [0, 1].
    """
    x = _check_pixels(x)
    _check_budget(eps, step, iters, momentum)
    x_adv = x.clone()
    acc = torch.zeros_like(x)
    for _ in range(int(iters)):
        g = _grad(loss_fn, x_adv)
        l1 = g.reshape(g.shape[0], -1).abs().sum(dim=1)
        l1 = torch.where(l1 > 0, l1, torch.ones_like(l1)).reshape((-1,) + (1,) * (g.ndim - 1))
        acc = momentum * acc + g / l1
        x_adv = _project(x_adv + step * torch.sign(acc), x, eps)
    return x_adv.detach()


def model_loss_fn(model, preprocess, y, loss: str = "auto"):
    """loss_fn(pixels) -> per-sample training loss of ``model`` on ``preprocess(pixels)``.

    Parameters
    ----------
    model : TwoLayerNet or MLPAttn (any module with ``n_outputs`` and a float parameter).
    preprocess : callable or None
        Differentiable torch map pixels (n, ...) -> model inputs (n, d) (dataset normalization,
        flatten, unit rows). None means the pixels are the inputs.
    y : labels/targets as accepted by ``train`` (see ``ntkcore.nn._loss``).
    loss : {"auto", "ce", "mse"}

    Returns
    -------
    callable; its per-sample losses are l(f(x_i), y_i) (no 1/2n, no regularizer).
    """
    p = next(model.parameters())
    n = y.shape[0] if hasattr(y, "shape") else len(y)
    kind, t = targets(y, n, model.n_outputs, loss, device=p.device, dtype=p.dtype)
    return _loss_fn_from_targets(model, preprocess, t, kind)


def _loss_fn_from_targets(model, preprocess, t, kind):
    p = next(model.parameters())

    def loss_fn(x_pixels):
        # the attack's pixels may live on the host while the model trained on the GPU: the
        # move is differentiable, so gradients still reach the pixels
        z = x_pixels if preprocess is None else preprocess(x_pixels)
        return per_sample_loss(model(z.to(device=p.device, dtype=p.dtype)), t, kind)

    return loss_fn
