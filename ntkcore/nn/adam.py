"""Adam [A.3.2: lr 1e-3, batch 128] without ``torch.optim``.

Constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (its methods are wrapped
to disable dynamo), which took 1.3 s of this machine's 13 s quickstart against 0.6 s for the
whole 30-epoch training. This class computes torch.optim.Adam's update with its defaults
(betas (0.9, 0.999), eps 1e-8, no weight decay, not amsgrad) in the order of torch's
single-tensor implementation, the one torch uses for CPU parameters, so on the CPU the
weights are the same bit for bit (tests/test_nn.py checks this against torch.optim.Adam).
"""

from __future__ import annotations

import torch

from .._validate import check_nonnegative, is_real_number
from ..errors import NonFiniteError, ParameterError


class Adam:
    """``Adam(params, lr)``: ``zero_grad()`` then, after ``backward()``, ``step()``.

    State per parameter: the first and second moment estimates m, v (zeros at the start) and
    its step count t (the steps on which it had a gradient, as torch counts them). One step,
    for each parameter p with gradient g:

        m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ParameterError unless lr and eps are finite and >= 0 and both betas in [0, 1) (as
    torch.optim.Adam); ``step`` raises NonFiniteError when lr / (1 - b1^t) overflows the
    parameters' dtype.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.eps = check_nonnegative(lr, "lr"), check_nonnegative(eps, "eps")
        try:
            betas = tuple(betas)  # any pair: tuple, list, array
        except TypeError:
            betas = (betas,)
        if not (len(betas) == 2 and all(is_real_number(b) and 0 <= b < 1 for b in betas)):
            raise ParameterError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        self.betas = tuple(float(b) for b in betas)
        self.t = [0] * len(self.params)
        self.m = [torch.zeros_like(p, memory_format=torch.preserve_format)
                  for p in self.params]
        self.v = [torch.zeros_like(p, memory_format=torch.preserve_format)
                  for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        for k, (p, m, v) in enumerate(zip(self.params, self.m, self.v)):
            if p.grad is None:
                continue
            self.t[k] += 1
            step_size = self.lr / (1 - b1 ** self.t[k])
            if step_size > torch.finfo(p.dtype).max:  # torch refuses such a scalar
                raise NonFiniteError(f"lr: the Adam step lr / (1 - beta1^t) = {step_size:g} "
                                     f"overflows {p.dtype} (training would diverge); lower "
                                     f"the learning rate")
            bias2_sqrt = (1 - b2 ** self.t[k]) ** 0.5
            g = p.grad
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)
