"""Layer factors for the structured eNTK path: capture inputs A and output cotangents D.

A parameter whose every use is ``F.linear`` / ``conv1d`` / ``conv2d`` (``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d``) or a matmul with the parameter (or its transpose) as the right
operand has a per-example Jacobian that factorises: for output c,

    d f_c(x) / d W = sum_l D_c[l]^T A[l]        (A[l]: layer input at position l, D_c[l] =
                                                  d f_c / d z[l], z the layer output)

so the eNTK term of W is sum_{l,l'} (A[l] . A'[l']) (D_c[l] . D'_c'[l']) and never needs a
per-example weight gradient. This module records, during one forward pass under a
``TorchFunctionMode``, every such call on a selected parameter: its input (unfolded into
patches for convolutions) and a zero tensor added to its output whose gradient is D. One
backward per output direction (C in all, for the whole row block) then yields D for every
layer at once.

Any other use of a selected tensor that yields a tensor (elementwise, a slice, a cast, a
call whose leading dimension is not the batch; reading ``.shape`` does not count) marks it
"other": such parameters go through Jacobian contraction instead. :func:`verify_groups` also checks the factorisation against true
per-example gradients on a few probe rows before the plan trusts it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import NtkcoreError

_LINEAR = {F.linear}
_CONV = {torch.conv2d: 2, torch.conv1d: 1}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
           torch.Tensor.mm}
_T_GETTERS = (torch.Tensor.T.__get__, torch.Tensor.mT.__get__)
_TRANSPOSE = {torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose,
              torch.Tensor.permute, torch.permute}


def _pair(v, k):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * k


class Use:
    """One recorded call on a structured weight: input, conv geometry, and the output probe."""

    __slots__ = ("kind", "inp", "conv", "orient", "eps", "k", "o")

    def __init__(self, kind, inp, conv, orient, eps, k, o):
        self.kind, self.inp, self.conv, self.orient, self.eps = kind, inp, conv, orient, eps
        self.k, self.o = k, o

    def positions(self):
        """L: positions per example (1 for a plain (b, p_in) Linear input)."""
        if self.kind == "linear":
            return int(math.prod(self.inp.shape[1:-1]))
        return int(math.prod(self.eps.shape[2:]))

    def factor_a(self):
        """A: (b, L, k) layer inputs (unfolded patches for a convolution)."""
        b = self.inp.shape[0]
        if self.kind == "linear":
            return self.inp.reshape(b, -1, self.inp.shape[-1])
        x, (ks, stride, pad, dil) = self.inp, self.conv
        if x.dim() == 3:  # conv1d as a conv2d of height 1
            x = x.unsqueeze(2)
        cols = F.unfold(x, ks, dilation=dil, padding=pad, stride=stride)  # (b, k, L)
        return cols.transpose(1, 2)

    def factor_d(self, grad):
        """D: (C, b, L, o) from the gradient of the output probe, shape (C, *out.shape)."""
        c, b = grad.shape[0], grad.shape[1]
        if self.kind == "linear":
            return grad.reshape(c, b, -1, self.o)
        return grad.reshape(c, b, self.o, -1).transpose(2, 3)


class Capture(TorchFunctionMode):
    """Record structured calls on the selected tensors during one forward pass.

    Parameters
    ----------
    tensors : dict name -> tensor
        The selected parameter tensors exactly as passed to ``functional_call`` (matched by
        identity).
    batch : int
        Rows in this forward (a call whose input or output does not lead with it is "other").
    inject : bool
        Add a zero probe (requires grad) to each recorded output so its gradient is D.
    count : bool
        Also count activation elements and flops (the probe pass of the cost model).
    """

    def __init__(self, tensors, batch, *, inject=True, count=False):
        super().__init__()
        self.ids = {id(t): name for name, t in tensors.items()}
        self._keep = list(tensors.values())
        self.batch = batch
        self.inject = inject
        self.count = count
        self.transposed = {}     # id(view) -> (name, view)
        self.uses = {}           # weight key -> list[Use]
        self.bias_of = {}        # bias name -> set of weight keys
        self.weight_bias = {}    # weight key -> set of bias names (None when absent)
        self.other = set()       # names used some other way
        self.act = 0             # elements produced by every op (count mode)
        self.flops = 0.0         # 2 * multiply-adds of linear/conv/matmul calls (count mode)

    # ---- helpers -------------------------------------------------------------------------
    def _name(self, t):
        return self.ids.get(id(t)) if isinstance(t, torch.Tensor) else None

    def _mark_args(self, args, kwargs):
        for a in _flat(list(args) + list(kwargs.values())):
            if isinstance(a, torch.Tensor):
                nm = self._name(a)
                if nm is None and id(a) in self.transposed:
                    nm = self.transposed[id(a)][0]
                if nm:
                    self.other.add(nm)

    def _record(self, key, bias_name, use, out):
        self.uses.setdefault(key, []).append(use)
        self.weight_bias.setdefault(key, set()).add(bias_name)
        if bias_name:
            self.bias_of.setdefault(bias_name, set()).add(key)
        if self.inject:
            eps = torch.zeros_like(out, requires_grad=True)
            use.eps = eps
            return out + eps
        use.eps = out.detach()
        return out

    # ---- the mode ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = None
        if func in _LINEAR:
            out = self._linear(func, args, kwargs)
        elif func in _CONV:
            out = self._conv(func, args, kwargs)
        elif func in _MATMUL:
            out = self._matmul(func, args, kwargs)
        elif func in _T_GETTERS or func in _TRANSPOSE:
            out = self._transpose(func, args, kwargs)
        if out is None:
            out = func(*args, **kwargs)
            if self.ids and any(isinstance(t, torch.Tensor) for t in
                                _flat(out if isinstance(out, (tuple, list)) else [out])):
                self._mark_args(args, kwargs)  # a tensor computed from a selected one
        if self.count:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.act += t.numel()
        return out

    def _transpose(self, func, args, kwargs):
        name = self._name(args[0]) if args else None
        if name is None or args[0].dim() != 2:
            return None
        if func in (torch.Tensor.transpose, torch.transpose, torch.Tensor.permute,
                    torch.permute):
            dims = [d % 2 for d in (args[1:] if len(args) > 2 else _flat(args[1:]))]
            if sorted(dims) != [0, 1] or (func in (torch.Tensor.permute, torch.permute)
                                          and dims != [1, 0]):
                return None
        res = func(*args, **kwargs)
        self.transposed[id(res)] = (name, res)
        return res

    def _linear(self, func, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        wn, bn = self._name(w), self._name(b)
        if wn is None and bn is None:
            return None
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != self.batch \
                or w.dim() != 2:
            return None
        out = func(*args, **kwargs)
        if self.count:
            self.flops += 2.0 * x.numel() * w.shape[0]
        use = Use("linear", x.detach(), None, "W", None, w.shape[1], w.shape[0])
        key = wn if wn else ("#" + (bn or ""))
        return self._record(key, bn, use, out)

    def _conv(self, func, args, kwargs):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        a = dict(zip(names, args))
        a.update(kwargs)
        x, w, b = a["input"], a["weight"], a.get("bias")
        wn, bn = self._name(w), self._name(b)
        if wn is None and bn is None:
            return None
        nd = _CONV[func]
        ks = tuple(w.shape[2:])
        stride, dil = _pair(a.get("stride", 1), nd), _pair(a.get("dilation", 1), nd)
        pad = a.get("padding", 0)
        if isinstance(pad, str):
            if pad == "valid":
                pad = (0,) * nd
            else:  # "same": symmetric only when every dilation*(k-1) is even
                tot = [d * (k - 1) for d, k in zip(dil, ks)]
                if any(t % 2 for t in tot):
                    return None
                pad = tuple(t // 2 for t in tot)
        pad = _pair(pad, nd)
        if a.get("groups", 1) != 1 or x.dim() != nd + 2 or x.shape[0] != self.batch:
            return None
        out = func(*args, **kwargs)
        if nd == 1:
            ks, stride, pad, dil = (1,) + ks, (1,) + stride, (0,) + pad, (1,) + dil
        k = int(math.prod(w.shape[1:]))
        if self.count:
            self.flops += 2.0 * out.numel() * k
        use = Use("conv", x.detach(), (ks, stride, pad, dil), "W", None, k, w.shape[0])
        key = wn if wn else ("#" + (bn or ""))
        return self._record(key, bn, use, out)

    def _matmul(self, func, args, kwargs):
        if len(args) != 2 or kwargs:
            return None
        x, y = args
        if self._name(x) is not None or not isinstance(y, torch.Tensor):
            return None
        if id(y) in self.transposed:
            name, orient = self.transposed[id(y)][0], "W"     # x @ W^T, W (o, k)
        else:
            name, orient = self._name(y), "P"                  # x @ P,   P (k, o)
        if name is None or y.dim() != 2:
            return None
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != self.batch:
            return None
        out = func(*args, **kwargs)
        if self.count:
            self.flops += 2.0 * x.numel() * y.shape[1]
        use = Use("linear", x.detach(), None, orient, None, y.shape[0], y.shape[1])
        return self._record(name, None, use, out)


def _flat(args):
    out = []
    for a in args:
        out.extend(a if isinstance(a, (tuple, list)) else [a])
    return out


def structured_groups(cap, selected):
    """Structured groups found by a probe capture.

    Returns
    -------
    dict weight key -> info dict: ``w`` (weight name or None), ``b`` (bias name or None),
    ``kind`` ("linear" | "conv"), ``L`` (positions summed over uses), ``k``, ``o``,
    ``orient`` ("W": x W^T, "P": x P). Only families whose members are used solely in
    recorded calls, with one consistent bias and one (k, o, orientation), qualify.
    """
    groups = {}
    for key, biases in cap.weight_bias.items():
        wname = None if key.startswith("#") else key
        uses = cap.uses[key]
        if len(biases) != 1 or len({(u.orient, u.k, u.o, u.kind) for u in uses}) != 1:
            continue
        bname = next(iter(biases))
        if any(nm in cap.other for nm in (wname, bname) if nm):
            continue
        if bname and cap.bias_of.get(bname, set()) != {key}:
            continue
        if wname is not None and wname in cap.bias_of:
            continue
        u = uses[0]
        groups[key] = dict(w=wname, b=bname if bname in selected else None, kind=u.kind,
                           L=sum(x.positions() for x in uses), k=u.k, o=u.o, orient=u.orient)
    return groups


class StructureError(NtkcoreError, RuntimeError):
    """A parameter planned as structured was used, in this row block, in a way the capture
    cannot factorise (e.g. a shape that matched the probe batch only by coincidence)."""

    def __init__(self, names):
        super().__init__(
            f"params {names}: used outside F.linear/conv/matmul-with-batch-rows in this row "
            f"block, so the structured path cannot account for them; pass "
            f"strategy={{{names[0]!r}: 'jacobian'}} (or strategy='jacobian')")


def _capture_names(groups):
    return {nm for g in groups.values() for nm in (g["w"], g["b"]) if nm}


def factor_pass(call, tensors, xb, sel, groups, *, need_a=True):
    """One forward under :class:`Capture` and one backward per kept output (C in all).

    Parameters
    ----------
    call : (tensors, x) -> model output (b, ...)
    tensors : dict of all parameters and buffers for ``functional_call``.
    xb : (b, ...) row block.
    sel : LongTensor of the output indices kept (C of them).
    groups : structured groups (see :func:`structured_groups`).
    need_a : bool
        Also return the inputs A (False: only D, enough for bias-only groups).

    Returns
    -------
    dict key -> (A (b, L, k) or None, D (C, b, L, o)); all uses of a weight are concatenated
    along L, so tied weights and repeated calls get their cross-position terms exactly.
    """
    b = xb.shape[0]
    names = _capture_names(groups)
    cap = Capture({k: tensors[k] for k in names}, b, inject=True)
    with torch.enable_grad():
        with cap:
            out = call(tensors, xb)
        if names & cap.other:
            raise StructureError(sorted(names & cap.other))
        out = out.reshape(b, -1)[:, sel]
        C = out.shape[1]
        uses = [(key, u) for key in groups for u in cap.uses.get(key, [])]
        if not uses:
            return {}
        eps = [u.eps for _, u in uses]
        # one backward per output (measured faster than is_grads_batched, whose legacy vmap
        # falls back to loops for ops such as max_pool2d's backward); rows are independent,
        # so the gradient of sum_i f_c(x_i) w.r.t. row i's probe is d f_c(x_i) / d z_i
        grads = [torch.empty((C,) + tuple(e.shape), dtype=e.dtype, device=e.device)
                 for e in eps]
        for c in range(C):
            gc = torch.autograd.grad(out[:, c].sum(), eps, retain_graph=c < C - 1,
                                     allow_unused=True)
            for buf, g in zip(grads, gc):
                if g is None:  # this output does not depend on the layer
                    buf[c].zero_()
                else:
                    buf[c] = g
    res = {}
    for (key, u), g in zip(uses, grads):
        A = u.factor_a() if (need_a and groups[key]["w"]) else None
        res.setdefault(key, []).append((A, u.factor_d(g)))
    return {key: (_cat([p[0] for p in parts], 1), _cat([p[1] for p in parts], 2))
            for key, parts in res.items()}


def _cat(ts, dim):
    if ts[0] is None:
        return None
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


def weight_grad(A, D, orient, shape):
    """Per-example, per-output weight gradient sum_l D[c,i,l]^T A[i,l]: (b, C, *shape)."""
    g = torch.einsum("cilo,ilk->icok", D, A)
    if orient == "P":
        g = g.transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], *shape)


def probe(call, tensors, selected, xp, sel):
    """Count activations and flops on probe rows and find the structured groups.

    Returns
    -------
    dict: ``act_per_row`` (elements every op produced, per row), ``flops_per_row``
    (linear/conv/matmul), ``C`` (outputs kept), ``groups`` (:func:`structured_groups`).
    """
    b = xp.shape[0]
    cap = Capture({k: tensors[k] for k in selected}, b, inject=False, count=True)
    with torch.no_grad(), cap:
        out = call(tensors, xp)
    C = out.reshape(b, -1)[:, sel].shape[1]
    return dict(act_per_row=max(cap.act / b, 1.0), flops_per_row=max(cap.flops / b, 1.0),
                C=C, groups=structured_groups(cap, selected))


def verify_groups(call, tensors, xp, sel, groups, rtol):
    """Keep the structured groups whose factorised per-example gradients are exact.

    For each probe row x_i and a random output direction v_i, the true gradient of
    v_i . f(x_i) (a backward on that row alone) must equal sum_c v_ic sum_l D^T A from the
    batched factor pass (bias: sum_l D). A failure (a weight also used in a way the capture
    does not see, a model that mixes rows, ...) sends the group to Jacobian contraction.

    Returns
    -------
    (kept groups, dropped {key: reason})
    """
    if not groups:
        return {}, {}
    fac = factor_pass(call, tensors, xp, sel, groups)
    names = sorted(_capture_names(groups))
    b = xp.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(0)
    V, true = None, []
    for i in range(b):
        sub = dict(tensors)
        for nm in names:
            sub[nm] = tensors[nm].detach().requires_grad_(True)
        with torch.enable_grad():
            out = call(sub, xp[i:i + 1]).reshape(1, -1)[:, sel]
            if V is None:
                V = torch.randn(b, out.shape[1], generator=gen, dtype=torch.float64).to(out)
            gr = torch.autograd.grad((out[0] * V[i]).sum(), [sub[nm] for nm in names],
                                     allow_unused=True)
        true.append({nm: (x if x is not None else torch.zeros_like(sub[nm]))
                     for nm, x in zip(names, gr)})
    kept, dropped = {}, {}
    for key, g in groups.items():
        if key not in fac:
            kept[key] = g  # not reached by the probe rows: nothing to contradict
            continue
        A, D = fac[key]
        Dv = torch.einsum("cilo,ic->ilo", D, V)[None]
        ok = True
        for nm in (g["w"], g["b"]):
            if nm is None:
                continue
            shape = tensors[nm].shape
            if nm == g["w"]:
                est = weight_grad(A, Dv, g["orient"], shape)[:, 0]
            else:
                est = Dv[0].sum(1).reshape(b, *shape)
            ref = torch.stack([t[nm] for t in true])
            scale = float(ref.abs().max()) or 1.0
            if est.shape != ref.shape or float((est - ref).abs().max()) > rtol * scale:
                ok = False
        if ok:
            kept[key] = g
        else:
            dropped[key] = "factorised gradient differs from autograd on the probe rows"
    return kept, dropped
