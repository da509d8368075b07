"""Cost model, strategy choice and row blocking for :func:`ntkcore.empirical_ntk`.

Every selected parameter belongs to one group; each group gets one strategy:

=============  ==========================================================================
structured     Layer factors (inputs A, output cotangents D) from one shared forward and one
               batched backward per row block. Two contraction forms, picked by flops:
               ``gram``  K += sum_{l,l'} (A_l . A'_l') (D_l . D'_l')   [(A A'^T) * (D D'^T)
                         when L = 1]: n n2 L^2 (p_in + C p_out), never a weight gradient;
               ``outer`` per-example weight gradients D^T A (C p_in p_out a row), then
                         contracted like Jacobians: n n2 C p_in p_out.
jacobian       Per-example Jacobians by ``vmap(jacrev)`` for a row block and the group's
               parameters only, contracted by one GEMM: n n2 C P_g flops, C P_g a row.
ntvp           NTK-vector products: per-example Jacobians of a few X2 rows (vjp), pushed
               through the X row block by ``jvp``: n n2 C jvp-rows, memory independent of n.
=============  ==========================================================================

Flops below count multiply-adds twice; "trace" contracts C outputs, "full" C^2 pairs. The
per-row feature-pass cost (one forward plus C backward directions, about (1 + 2C) forward
flops) is shared by all structured groups (one pass) and by all jacobian groups (one pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .._units import format_bytes
from ..errors import MemoryBudgetError, ParameterError

STRATEGIES = ("auto", "jacobian", "ntvp", "structured", "structured-gram", "structured-outer")


@dataclass
class Group:
    """One parameter group and the plan for it (a row of the report)."""

    key: str
    names: tuple
    numel: int
    kind: str                  # "linear" | "conv" | "other"
    site: dict | None = None   # structured info from the probe (L, k, o, orient, w, b)
    strategy: str = ""
    method: str = ""
    flops: float = 0.0         # contraction flops for the whole (n, n2) kernel
    bytes_per_row: float = 0.0
    work_per_pair: float = 0.0  # tile workspace bytes per (row, row) pair
    note: str = ""
    auto: bool = True          # strategy chosen by the cost model (not overridden)

    def as_dict(self):
        return dict(name=self.key, params=list(self.names), n_params=self.numel,
                    kind=self.kind, strategy=self.strategy, method=self.method,
                    est_flops=self.flops, est_bytes_per_row=self.bytes_per_row,
                    est_tile_bytes_per_pair=self.work_per_pair, note=self.note)


@dataclass
class EntkReport:
    """What :func:`empirical_ntk` did: per-group strategy and cost, blocking, memory.

    Attributes
    ----------
    groups : list of dict
        One per parameter group: name, params, n_params, kind, strategy, method, est_flops
        (contraction flops for the whole kernel), est_bytes_per_row (features held per row),
        est_tile_bytes_per_pair, note.
    blocks : dict
        ``panel`` rows held, ``stream`` rows per block, ``tile`` contraction sub-tile,
        ``ntvp_rows`` / ``ntvp_chunk`` for NTK-vector products, ``feature_rows_computed``.
    memory_budget, est_peak_bytes : int
        The working-memory budget and the plan's estimate of its peak (the returned kernel
        and the model are not included).
    est_feature_flops : float
        Flops of the feature passes (forward + C backward directions per computed row).
    n, n2, outputs, C, dtype, device, seconds : as run.
    """

    groups: list = field(default_factory=list)
    blocks: dict = field(default_factory=dict)
    memory_budget: int = 0
    est_peak_bytes: int = 0
    est_feature_flops: float = 0.0
    n: int = 0
    n2: int = 0
    outputs: object = "trace"
    C: int = 0
    dtype: str = ""
    device: str = ""
    seconds: float = 0.0

    def as_dict(self):
        return dict(groups=self.groups, blocks=self.blocks, memory_budget=self.memory_budget,
                    est_peak_bytes=self.est_peak_bytes,
                    est_feature_flops=self.est_feature_flops, n=self.n, n2=self.n2,
                    outputs=self.outputs, C=self.C, dtype=self.dtype, device=self.device,
                    seconds=self.seconds)

    def __str__(self):
        head = (f"empirical_ntk n={self.n} n2={self.n2} outputs={self.outputs!r} C={self.C} "
                f"{self.dtype} on {self.device}; budget {format_bytes(self.memory_budget)}, "
                f"est. peak {format_bytes(self.est_peak_bytes)}; blocks {self.blocks}; "
                f"{self.seconds:.2f} s")
        rows = [f"  {g['name']:<28} {g['kind']:<6} {g['n_params']:>10}  "
                f"{g['strategy'] + '/' + g['method']:<24} {g['est_flops']:.2e} flop  "
                f"{g['est_bytes_per_row']:.2e} B/row {g['note']}" for g in self.groups]
        return "\n".join([head] + rows)


def module_key(name: str) -> str:
    """Report/override key of a parameter: its module path ("fc1.weight" -> "fc1")."""
    return name.rsplit(".", 1)[0] if "." in name else name


def costs(g: Group, method: str, *, C: int, full: bool, s: int, n: int, n2: int):
    """(contraction flops for the kernel, feature bytes per row, workspace bytes per pair)."""
    pairs = float(n) * float(n2)
    cc = C * C if full else C
    if method == "gram":
        L, k, o = g.site["L"], g.site["k"], g.site["o"]
        w, b = g.site["w"] is not None, g.site["b"] is not None
        flops, row, work = 0.0, 0.0, s * (C * C if full else 1)
        if w:
            flops += 2 * L * L * (k + cc * o) + 2 * L * L * (C if full else 1)
            row += L * k + C * L * o
            if L > 1:
                work += s * L * L * (3 + (C if full else 0))
        if b:
            flops += 2 * cc * o
            row += C * o if (L > 1 or not w) else 0
        return flops * pairs, row * s, work
    # jacobian / outer / ntvp hold C P_g numbers a row (ntvp: for its X2 chunk only)
    return 2.0 * cc * g.numel * pairs, float(s * C * g.numel), float(s * (C * C if full else 1))


def choose(groups, overrides, *, C, full, s, n, n2, budget):
    """Fill strategy/method/flops/bytes of every group (auto rules, then overrides).

    Auto: a structured-capable group takes the cheaper of gram and outer (gram when the
    outer features would not fit an eighth of the budget, outer when the gram tile would
    not fit a quarter); any other group takes jacobian unless C P_g numbers a row exceed an
    eighth of the budget, then ntvp.
    """
    for g in groups:
        want = overrides.get(g.key, "auto")
        if want.startswith("structured") and g.site is None:
            raise ParameterError(
                f"strategy[{g.key!r}]: expected a parameter group used only through "
                f"F.linear/conv1d/conv2d/matmul (nn.Linear, nn.Conv1d, nn.Conv2d) for "
                f"{want!r}, got kind {g.kind!r} ({g.note or 'no factorisation found'})")
        if want == "auto" and g.site is None:
            jac = costs(g, "jacobian", C=C, full=full, s=s, n=n, n2=n2)
            want = "jacobian" if jac[1] <= budget / 8 else "ntvp"
        if want in ("auto", "structured"):
            gram = costs(g, "gram", C=C, full=full, s=s, n=n, n2=n2)
            outer = costs(g, "outer", C=C, full=full, s=s, n=n, n2=n2)
            use_gram = gram[0] <= outer[0]
            if outer[1] > budget / 8:
                use_gram = True
            elif gram[2] > budget / 4:
                use_gram = False
            want = "structured-gram" if use_gram else "structured-outer"
        if want == "structured-gram":
            g.strategy, g.method = "structured", "gram"
        elif want == "structured-outer":
            g.strategy, g.method = "structured", "outer"
        elif want == "jacobian":
            g.strategy, g.method = "jacobian", "vmap-jacrev"
        else:
            g.strategy, g.method = "ntvp", "jvp-vjp"
        cost_method = "gram" if g.method == "gram" else "jacobian"
        g.flops, g.bytes_per_row, g.work_per_pair = costs(g, cost_method, C=C, full=full,
                                                          s=s, n=n, n2=n2)
        g.auto = overrides.get(g.key, "auto") == "auto"
    # the row features of all non-ntvp groups share one block: if together they leave no
    # room for a few rows, move the largest auto-chosen Jacobian groups to ntvp
    held = sum(g.bytes_per_row for g in groups if g.strategy != "ntvp")
    for g in sorted(groups, key=lambda g: -g.bytes_per_row):
        if held <= budget / 8:
            break
        if g.auto and g.strategy == "jacobian":
            held -= g.bytes_per_row
            g.strategy, g.method = "ntvp", "jvp-vjp"
            g.note = "moved to ntvp: Jacobian rows would crowd the memory budget"
    return groups


def resolve_overrides(strategy, groups):
    """Map the user's ``strategy`` (str or dict) to {group key: strategy}."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ParameterError(f"strategy: expected one of {STRATEGIES} or a dict, "
                                 f"got {strategy!r}")
        if strategy == "structured":
            return {g.key: ("structured" if g.site else "auto") for g in groups}
        if strategy in ("structured-gram", "structured-outer"):
            return {g.key: (strategy if g.site else "auto") for g in groups}
        return {g.key: strategy for g in groups}
    if not isinstance(strategy, dict):
        raise ParameterError(f"strategy: expected one of {STRATEGIES} or a dict "
                             f"{{layer or parameter name: strategy}}, got {strategy!r}")
    out = {}
    for key, val in strategy.items():
        if val not in STRATEGIES:
            raise ParameterError(f"strategy[{key!r}]: expected one of {STRATEGIES}, "
                                 f"got {val!r}")
        hit = [g for g in groups if key == g.key or key in g.names
               or g.key.startswith(key + ".") or any(nm.startswith(key + ".")
                                                     for nm in g.names)]
        if not hit:
            raise ParameterError(f"strategy: unknown layer or parameter {key!r}; groups are "
                                 f"{[g.key for g in groups]}")
        for g in hit:
            out[g.key] = val
    return out


def plan_blocks(*, n, n2, sym, feat_row, compute_row, work_pair, budget, block=None):
    """Row blocking under ``budget`` bytes of working memory.

    A *panel* of X rows keeps its features while *stream* blocks of X2 rows are computed
    and contracted against it in sub-tiles. Budget shares: panel features 1/2, one stream
    block (its features and the forward/backward that makes them) 1/4, contraction
    workspace 1/4. ``block`` fixes panel = stream = block rows instead.

    Returns
    -------
    dict panel, stream (rows), work_bytes (contraction workspace), work_pair (its bytes per
    row pair), est_peak (bytes).
    """
    per_stream = feat_row + compute_row
    if block is not None:
        bs = bp = int(block)
    else:
        bs = int(min(n2, max(1, (budget / 4) // per_stream), 4096))
        bp = int(min(n, max(1, (budget / 2) // max(feat_row, 1.0))))
    bs = max(1, min(bs, n2, n))
    bp = max(1, min(bp, n))
    work = max(budget - bp * feat_row - bs * per_stream, work_pair * max(bs, 1))
    peak = bp * feat_row + bs * per_stream + work
    need_one = feat_row + per_stream + work_pair
    if need_one > budget or (block is not None and peak > budget):
        fit = None
        if block is not None:
            fit = int(max(0, budget // max(feat_row + per_stream + block * work_pair, 1)))
        raise MemoryBudgetError(
            f"memory_budget: expected at least {format_bytes(need_one if block is None else peak)} "
            f"of working memory for {'one row' if block is None else f'block={block}'}"
            f", got {format_bytes(budget)}" + (f" (block <= {fit} would fit)" if fit else "") +
            "; raise memory_budget, or use strategy='ntvp' for groups with many parameters",
            needed_bytes=int(need_one if block is None else peak), budget_bytes=int(budget))
    return dict(panel=bp, stream=bs, work_bytes=int(work), work_pair=int(work_pair),
                est_peak=int(peak))


def rows_computed(n, n2, sym, panel):
    """Feature rows the panel loop computes (X once, X2 once per panel)."""
    panels = math.ceil(n / panel)
    if sym:
        return n + sum(max(0, n - (i + 1) * panel) for i in range(panels))
    return n + n2 * panels


def plan_ntvp(*, n, n2, C, s, p_ntvp, act_row, budget):
    """(X rows per jvp block, X2 rows per Jacobian chunk, estimated peak bytes) for the
    ntvp groups.

    Memory: chunk * C * P (Jacobian rows and tangents, twice) + chunk * C * rows * act
    (the vmapped jvp's activations and tangents, about 3 numbers per activation), so one
    product (chunk = rows = 1) needs ``2 s C P + 3 s C act`` bytes; any budget at least that
    is planned (the chunk shrinks before the rows do, so the plan is monotone in the budget).
    Preferred shares: chunk from a quarter of the budget (at most 8 points), rows from half.
    """
    jac_pt = 2 * s * C * p_ntvp            # bytes per X2 point of the chunk
    act_pt = 3 * s * C * act_row           # bytes per (X2 point, X row) of the jvp
    one = jac_pt + act_pt
    if one > budget:
        raise MemoryBudgetError(
            f"memory_budget: expected at least {format_bytes(one)} for one NTK-vector "
            f"product, got {format_bytes(budget)}", needed_bytes=int(one),
            budget_bytes=int(budget))
    chunk = int(max(1, min(n2, 8, (budget / 4) // max(jac_pt, 1), budget // one)))
    rows = int(max(1, min(n, (budget / 2) // max(chunk * act_pt, 1))))
    if jac_pt * chunk + act_pt * chunk * rows > budget:  # chunk <= budget // one: rows >= 1
        rows = int(max(1, min(n, (budget - jac_pt * chunk) // max(chunk * act_pt, 1))))
    peak = jac_pt * chunk + act_pt * chunk * rows
    return rows, chunk, int(peak)


#: substrings of torch's allocation-failure messages (CPU Linux / Windows, CUDA, MPS, XPU)
_ALLOC_FAILURE = ("can't allocate memory", "not enough memory", "out of memory")


def is_alloc_failure(e: BaseException) -> bool:
    """Whether a torch error is an allocation failure (torch.OutOfMemoryError, or a plain
    RuntimeError from the CPU allocator: "DefaultCPUAllocator: can't allocate memory")
    rather than an unsupported operation."""
    import torch
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in msg for w in _ALLOC_FAILURE)
