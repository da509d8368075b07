"""Row-block features, tile contractions and the blocked loop of :func:`empirical_ntk`.

For a block of rows, :meth:`Engine.features` returns

* ``J`` (b, C, P_j): per-example Jacobians of every jacobian group (``vmap(jacrev)`` over the
  rows, restricted to those parameters) and per-example weight gradients D^T A of every
  structured "outer" group, side by side;
* ``gram``: for each structured "gram" group its factors A (b, L, k) and D (C, b, L, o).

:meth:`Engine.contract` adds J_I J_J^T (one GEMM) and, per gram group,
sum_{l,l'} (A_l . A'_l') (D_l . D'_l') to a kernel tile. :meth:`Engine.ntvp` adds the
NTK-vector-product groups: Jacobian rows of a few X2 points, pushed through the X block by
``jvp``. :func:`run_blocked` visits panels and stream blocks (see ``_entk_cost.plan_blocks``)
and mirrors tiles when X2 is X.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.func import jacrev, jvp, vmap

from ._entk_capture import factor_pass, weight_grad
from ._entk_cost import is_alloc_failure


class Feats:
    """Features of a block of b rows; every tensor leads with the row dimension.

    ``J`` (b, C, P_j) or None; ``gram`` key -> dict ``A`` (b, L, k) or None, ``Dt``
    (b, L, C*o) (the cotangents, output-major inside each position), ``Ds`` (b, C*o) or None
    (sum over positions, for a bias when L > 1 or the weight is not selected).
    """

    __slots__ = ("b", "J", "gram")

    def __init__(self, b, J=None, gram=None):
        self.b, self.J, self.gram = b, J, gram if gram is not None else {}

    def rows(self, a, z):
        if (a, z) == (0, self.b):
            return self
        J = None if self.J is None else self.J[a:z]
        gram = {k: {f: (None if t is None else t[a:z]) for f, t in g.items()}
                for k, g in self.gram.items()}
        return Feats(z - a, J, gram)

    def put(self, a, f):
        """Copy block ``f`` into rows a.. of this (preallocated, zero-initialised) panel."""
        z = a + f.b
        if f.J is not None:
            if self.J is None:
                self.J = f.J.new_zeros((self.b,) + tuple(f.J.shape[1:]))
            self.J[a:z] = f.J
        for k, g in f.gram.items():
            mine = self.gram.setdefault(k, {})
            for name, t in g.items():
                if t is None:
                    mine.setdefault(name, None)
                    continue
                if mine.get(name) is None:
                    mine[name] = t.new_zeros((self.b,) + tuple(t.shape[1:]))
                mine[name][a:z] = t


class Engine:
    """Feature passes and tile contractions for one planned problem.

    Parameters
    ----------
    call : (tensors, x) -> model output
    tensors : dict name -> tensor (parameters and buffers, compute dtype and device)
    sel : LongTensor of kept output indices (C)
    groups : planned :class:`~ntkcore.ntk._entk_cost.Group` list
    full : bool, "full" (n, n2, C, C) blocks instead of the trace
    """

    def __init__(self, call, tensors, sel, groups, full):
        self.call, self.tensors, self.sel, self.full = call, tensors, sel, full
        self.C = int(sel.numel())
        self.gram = {g.site["key"]: g.site for g in groups if g.method == "gram"}
        self.outer = {g.site["key"]: g.site for g in groups if g.method == "outer"}
        self.struct = {**self.gram, **self.outer}
        self.jac_names = [nm for g in groups if g.strategy == "jacobian" for nm in g.names]
        self.ntvp_names = [nm for g in groups if g.strategy == "ntvp" for nm in g.names]
        #: set when torch.func.vmap cannot batch the model's ops (e.g. nn.LSTM's fused
        #: kernel): per-example transforms then run one row / tangent at a time
        self.unbatched = None

    # ---- features --------------------------------------------------------------------------
    def _single(self, names):
        call, tensors, sel = self.call, self.tensors, self.sel

        def f(p, x):
            full = dict(tensors)
            full.update(p)
            return call(full, x.unsqueeze(0)).reshape(-1)[sel]
        return f, {nm: tensors[nm] for nm in names}

    def jacobian_rows(self, names, xb):
        """Per-example Jacobians {name: (b, C, *shape)} of the outputs w.r.t. ``names``."""
        f, p = self._single(names)
        return self._batched(lambda: vmap(jacrev(f), in_dims=(None, 0))(p, xb),
                             lambda: _stack([jacrev(f)(p, x) for x in xb]))

    def _batched(self, batched, looped):
        """``batched()`` (a vmap), or ``looped()`` once vmap has failed on this model: some
        ops have no batching rule (nn.LSTM's fused kernel raises a RuntimeError under vmap),
        while the same transform on one example works.

        An allocation failure (``is_alloc_failure``) is not a missing batching rule: it
        propagates (``empirical_ntk`` reports it as a MemoryBudgetError) instead of switching
        to the slower loop. The loop runs with the oneDNN (mkldnn) and cuDNN backends off: their
        fused RNN kernels have no backward under torch.func transforms (CPU float32 nn.LSTM:
        "Expected a proper Tensor but got None ... 'workspace'"), torch's native RNN kernels do.
        """
        if self.unbatched is None:
            try:
                return batched()
            except RuntimeError as e:
                if is_alloc_failure(e):
                    raise
                self.unbatched = f"{type(e).__name__}: {e}"
        with _native_kernels():
            return looped()

    def features(self, xb):
        b, C = xb.shape[0], self.C
        parts, gram = [], {}
        if self.struct:
            fac = factor_pass(self.call, self.tensors, xb, self.sel, self.struct)
            for key, site in self.gram.items():
                if key in fac:
                    A, D = fac[key]
                    Dt = D.permute(1, 2, 0, 3).reshape(b, D.shape[2], -1)
                    Ds = Dt.sum(1) if site["b"] and (A is None or Dt.shape[1] > 1) else None
                    gram[key] = {"A": A, "Dt": Dt, "Ds": Ds}
            for key, site in self.outer.items():
                A, D = fac.get(key, (None, None))
                for nm in (site["w"], site["b"]):
                    if nm is None:
                        continue
                    t = self.tensors[nm]
                    if D is None:
                        parts.append(t.new_zeros(b, C, t.numel()))
                    elif nm == site["w"]:
                        parts.append(weight_grad(A, D, site["orient"], t.shape).reshape(b, C, -1))
                    else:
                        parts.append(D.sum(2).permute(1, 0, 2))
                del A, D
            del fac
        if self.jac_names:
            J = self.jacobian_rows(self.jac_names, xb)
            parts += [J[nm].reshape(b, C, -1) for nm in self.jac_names]
            del J
        if not parts:
            Jm = None
        elif len(parts) == 1:
            Jm = parts[0].contiguous()
        else:
            Jm = torch.cat(parts, dim=2)
        return Feats(b, Jm, gram)

    # ---- contractions ----------------------------------------------------------------------
    def contract(self, fi, fj, out):
        """out (bi, bj) or (bi, bj, C, C) += NTK tile between two feature blocks."""
        bi, bj, C = fi.b, fj.b, self.C
        if fi.J is not None:
            if self.full:
                G = fi.J.reshape(bi * C, -1) @ fj.J.reshape(bj * C, -1).T
                out += G.view(bi, C, bj, C).permute(0, 2, 1, 3)
            else:
                out.addmm_(fi.J.reshape(bi, -1), fj.J.reshape(bj, -1).T)
        for key, site in self.gram.items():
            if key in fi.gram and key in fj.gram:
                self._gram(fi.gram[key], fj.gram[key], site, out)

    def _gram(self, gi, gj, site, out):
        Ai, Aj, Di, Dj = gi["A"], gj["A"], gi["Dt"], gj["Dt"]
        bi, Li, Co = Di.shape
        bj, Lj = Dj.shape[0], Dj.shape[1]
        C = self.C
        o = Co // C
        w, b = Ai is not None and Aj is not None, site["b"] is not None
        single = Li == 1 and Lj == 1
        if not self.full:
            if single:
                GD = Di.reshape(bi, Co) @ Dj.reshape(bj, Co).T
                if b:
                    out += GD
                if w:
                    GD.mul_(Ai.reshape(bi, -1) @ Aj.reshape(bj, -1).T)
                    out += GD
                return
            if w:
                GA = Ai.reshape(bi * Li, -1) @ Aj.reshape(bj * Lj, -1).T
                GA.mul_(Di.reshape(bi * Li, Co) @ Dj.reshape(bj * Lj, Co).T)
                out += GA.view(bi, Li, bj, Lj).sum((1, 3))
                del GA
            if b:
                out.addmm_(gi["Ds"], gj["Ds"].T)
            return
        # full: out[i, j, c, d] += sum_{l,l'} (A_il . A_jl') (D_cil . D_djl')
        if b:
            Si = (Di.reshape(bi, Co) if single else gi["Ds"]).reshape(bi * C, o)
            Sj = (Dj.reshape(bj, Co) if single else gj["Ds"]).reshape(bj * C, o)
            out += (Si @ Sj.T).view(bi, C, bj, C).permute(0, 2, 1, 3)
        if not w:
            return
        GA = Ai.reshape(bi * Li, -1) @ Aj.reshape(bj * Lj, -1).T  # (bi Li, bj Lj)
        if single:
            GD = Di.reshape(bi * C, o) @ Dj.reshape(bj * C, o).T
            out += GD.view(bi, C, bj, C).permute(0, 2, 1, 3) * GA[:, :, None, None]
            return
        Dall = Dj.reshape(bj * Lj * C, o)
        GA = GA.view(bi, Li, bj, Lj, 1)
        Dc = Di.view(bi, Li, C, o)
        for c in range(C):
            GDc = (Dc[:, :, c].reshape(bi * Li, o) @ Dall.T).view(bi, Li, bj, Lj, C)
            out[:, :, c, :] += (GDc * GA).sum((1, 3))

    def ntvp(self, XI, XJ, out):
        """out (bi, bj[, C, C]) += NTK-vector-product groups' tile K[I, J].

        The Jacobian rows J_d(x_j) of the X2 chunk (vjp, C per point) are the tangents of
        one ``jvp`` through the X block each: (J(X_I) J_d(x_j)^T)[i, c] = K[i, j, c, d].
        """
        bi, bj, C = XI.shape[0], XJ.shape[0], self.C
        Jj = self.jacobian_rows(self.ntvp_names, XJ)
        p = {nm: self.tensors[nm] for nm in self.ntvp_names}
        tang = {nm: Jj[nm].reshape(bj * C, *p[nm].shape) for nm in self.ntvp_names}
        del Jj
        call, tensors, sel = self.call, self.tensors, self.sel

        def f(q):
            full = dict(tensors)
            full.update(q)
            return call(full, XI).reshape(bi, -1)[:, sel]

        with warnings.catch_warnings():  # torch's jvp decompositions, first use only
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated",
                                    category=FutureWarning)
            one = lambda t: jvp(f, (p,), (t,))[1]
            R = self._batched(
                lambda: vmap(one)(tang),
                lambda: torch.stack([one({nm: t[k] for nm, t in tang.items()})
                                     for k in range(bj * C)]))
            R = R.view(bj, C, bi, C)  # [j,d,i,c]
        if self.full:
            out += R.permute(2, 0, 3, 1)
        else:
            out += R.diagonal(dim1=1, dim2=3).sum(-1).T


@contextlib.contextmanager
def _native_kernels():
    """oneDNN (mkldnn) and cuDNN off for the block, only their ``enabled`` flags touched
    (``torch.backends.*.flags`` would also reset determinism / TF32 settings)."""
    mk, cu = torch.backends.mkldnn, torch.backends.cudnn
    saved = mk.enabled, cu.enabled
    mk.enabled, cu.enabled = False, False
    try:
        yield
    finally:
        mk.enabled, cu.enabled = saved


def _stack(dicts):
    """[{name: tensor}] per example -> {name: stacked tensor} (what vmap would return)."""
    return {nm: torch.stack([d[nm] for d in dicts]) for nm in dicts[0]}


def _ranges(start, stop, step):
    return [(a, min(stop, a + step)) for a in range(start, stop, step)]


def _contract_tiled(eng, fi, fj, out, work, work_pair):
    """eng.contract in sub-tiles of fi rows so a tile's workspace stays under ``work``."""
    t = int(max(1, work // max(work_pair * fj.b, 1)))
    for a, z in _ranges(0, fi.b, t):
        eng.contract(fi.rows(a, z), fj, out[a:z])


def _mirror(K, r, s, full):
    """K[s, r] = K[r, s]^T (with the output pair swapped for "full")."""
    blk = K[r[0]:r[1], s[0]:s[1]]
    K[s[0]:s[1], r[0]:r[1]] = blk.permute(1, 0, 3, 2) if full else blk.T


def run_blocked(eng, X, X2, K, blocks):
    """Fill K (n, n2[, C, C]) with the non-ntvp groups, panel by panel.

    A panel of X rows is computed in stream-sized blocks into one preallocated feature
    store, then contracted against itself (X2 None: upper block-rows, mirrored) and against
    every stream block of X2 (X2 None: the rows after the panel only, mirrored).
    Returns the number of feature rows computed.
    """
    if not eng.struct and not eng.jac_names:
        return 0
    sym = X2 is None
    n = X.shape[0]
    n2 = n if sym else X2.shape[0]
    bp, bs = blocks["panel"], blocks["stream"]
    work, wp = blocks["work_bytes"], blocks["work_pair"]
    computed = 0
    for p0, p1 in _ranges(0, n, bp):
        P = Feats(p1 - p0)
        for a, z in _ranges(p0, p1, bs):
            P.put(a - p0, eng.features(X[a:z]))
            computed += z - a
        if sym:  # K[p, p]: block-rows of the upper triangle, each mirrored below
            t = int(max(1, min(bs, work // max(wp * P.b, 1))))
            for a, z in _ranges(0, P.b, t):
                rest = P.rows(a, P.b)
                _contract_tiled(eng, P.rows(a, z), rest, K[p0 + a:p0 + z, p0 + a:p1], work, wp)
                if p0 + z < p1:
                    _mirror(K, (p0 + a, p0 + z), (p0 + z, p1), eng.full)
            stream = _ranges(p1, n, bs)
        else:
            stream = _ranges(0, n2, bs)
        for rs in stream:
            fs = eng.features((X if sym else X2)[rs[0]:rs[1]])
            computed += rs[1] - rs[0]
            _contract_tiled(eng, P, fs, K[p0:p1, rs[0]:rs[1]], work, wp)
            if sym:
                _mirror(K, (p0, p1), rs, eng.full)
            del fs
        del P
    return computed


def symmetrize_diagonal(K, step, full):
    """Average diagonal tiles with their transpose (K = K^T exactly when X2 is X)."""
    for a, z in _ranges(0, K.shape[0], step):
        blk = K[a:z, a:z]
        blk.copy_(0.5 * (blk + (blk.permute(1, 0, 3, 2) if full else blk.T)))


def run_ntvp(eng, X, X2, K, rows, chunk):
    """Add the ntvp groups to K: X blocks of ``rows`` x X2 chunks of ``chunk`` points."""
    if not eng.ntvp_names:
        return
    sym = X2 is None
    n = X.shape[0]
    Y = X if sym else X2
    for i0, i1 in _ranges(0, n, rows):
        for j0, j1 in _ranges(i0 if sym else 0, Y.shape[0], chunk):
            tile = torch.zeros_like(K[i0:i1, j0:j1])
            eng.ntvp(X[i0:i1], Y[j0:j1], tile)
            K[i0:i1, j0:j1] += tile
            if sym and j1 > i1:  # mirror the part right of this row block
                s0 = max(j0, i1)
                part = tile[:, s0 - j0:]
                K[s0:j1, i0:i1] += part.permute(1, 0, 3, 2) if eng.full else part.T
