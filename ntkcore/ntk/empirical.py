"""Empirical NTK of any torch model, blocked, and LOO influence through it.

    K(x, x')_{cd} = sum_p  d f_c(x)/d theta_p  d f_d(x')/d theta_p      (theta: the chosen
                                                                          parameters)

``outputs="trace"`` returns sum_c K_cc (n, n2) -- the scalar kernel used for ridge regression;
``"full"`` the (n, n2, C, C) blocks; an int c the kernel of output c alone. For the paper's
two-layer net f(x) = m^-1/2 a^T relu(W x) with a in {+-1}^(m x C) each output's kernel is
``relu_ntk(X, W)`` [Thm 4.2, B.5, B.12], so the trace is C times it.

How (see ``_entk_cost`` for the cost model, ``_entk_capture`` and ``_entk_jac`` for the
mechanics): parameters are grouped by layer; a layer whose weight enters only through
F.linear / conv1d / conv2d / matmul (nn.Linear, nn.Conv*d, ``x @ W.T``; found by watching
one probe forward with a ``TorchFunctionMode`` and checked against autograd on three probe
rows, see ``_entk_capture.verify_groups``) contracts through its
factors -- inputs A and output cotangents D, captured in one forward and one batched backward
for all such layers -- as (A A'^T) * (D D'^T) (summed over positions for convolutions and
sequences), costing n n2 (p_in + C p_out) instead of n n2 C p_in p_out; any other parameter
(normalisation affine, embeddings, free tensors) goes through per-example Jacobians
(``torch.func.vmap(jacrev)``) for that group only, or through NTK-vector products
(``jvp``/``vjp``) when even one row of its Jacobian is too large. Rows are blocked so the
working memory stays under ``memory_budget`` for any n; nothing holds an n x P Jacobian
beyond one panel of rows sized from the budget.

The model is evaluated in eval mode (BatchNorm uses its running statistics, dropout is off):
the kernel is that of the function the model computes in eval mode. Rows must not interact
inside a batch (true of any model in eval mode without cross-row operations).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time

import numpy as np

from .._units import format_bytes
from ..backend import host_available_bytes
from ..errors import (
    BackendError,
    MemoryBudgetError,
    NonFiniteError,
    NtkcoreError,
    ParameterError,
    ShapeError,
)
from .._validate import check_flag, is_finite_number
from ._entk_cost import EntkReport, is_alloc_failure
from ._entk_user import influence_for_model, load_user_model, model_kernels

__all__ = ["empirical_ntk", "influence_for_model", "load_user_model", "model_kernels",
           "EntkReport"]


def empirical_ntk(model, X, X2=None, *, outputs="trace", params=None, block=None,
                  strategy="auto", memory_budget=None, dtype=None, device=None,
                  return_report=False):
    """Empirical NTK of a torch model between the rows of X and X2, blocked.

    Parameters
    ----------
    model : torch.nn.Module
        Maps a batch (b, *feature_shape) to outputs (b,) or (b, C) (further output dims are
        flattened into C). Evaluated in eval mode; its training flags are restored after.
    X : (n, *feature_shape) torch.Tensor or NumPy array
        Floating rows are cast to the compute dtype; integer rows (token ids) are kept.
    X2 : (n2, *feature_shape) tensor or array, optional
        Default X: then K is symmetric and only tiles on or above the diagonal are computed.
    outputs : "trace" | "full" | int, default "trace"
        "trace": sum over outputs c of J_c(x) J_c(x')^T, shape (n, n2). "full": all pairs,
        shape (n, n2, C, C) with K[i, j, c, d] = J_c(x_i) . J_d(x'_j). int c in [0, C):
        output c only (negative indices are refused).
    params : list of str or callable, optional
        Parameters to differentiate, by name (``model.named_parameters()``), or a predicate
        ``name -> bool``. Default: every parameter with ``requires_grad``.
    block : int, optional
        Rows per feature block (default: from ``memory_budget``).
    strategy : "auto" | "structured" | "jacobian" | "ntvp" | dict, default "auto"
        "auto" picks per group by the cost model; a string forces it on every group that can
        take it ("structured" applies to factorisable layers, the rest stay "auto";
        "structured-gram" / "structured-outer" also force the contraction form); a dict maps
        layer (module path) or parameter names to strategies, other groups "auto".
    memory_budget : int, optional
        Bytes of working memory (default: half the free host or GPU memory). The returned
        kernel and the model itself are not counted.
    dtype : torch.float32 | torch.float64 | "float32" | "float64", optional
        Compute dtype (default: the model's; float32 for a float16 / bfloat16 model, whose
        own-precision kernel would keep only ~3 digits). A different dtype works on a cast
        copy (``copy.deepcopy(model).to(dtype)``), so the model's own dtype hooks run; for a
        half-precision model that is the kernel of its float32 (exactly widened) weights.
    device : str or torch.device, optional
        "cpu" or "cuda[:i]" (or the model's own device type). Default: the model's device
        (CUDA models run on the GPU). A different device works on a copy; X is moved to it.
    return_report : bool, default False
        Also return an :class:`~ntkcore.ntk._entk_cost.EntkReport` (per-group strategy,
        estimated flops and bytes, blocks, timings).

    Returns
    -------
    K : (n, n2) or (n, n2, C, C) array -- NumPy when X is NumPy, else a tensor on the
        compute device; compute dtype.
    report : EntkReport, when ``return_report``.

    Raises
    ------
    ParameterError : model not a Module, X not an array, unknown parameter names, bad
        outputs/strategy/budget values.
    ShapeError or ParameterError : the model cannot be applied to X (or X2): probed on two
        rows before anything else, the message gives the model's own error (ShapeError when
        it speaks of shapes or sizes); or its output is not a tensor with one row per input.
    ShapeError : fewer than 2 dims, no rows, or X and X2 feature shapes differ.
    BackendError / ParameterError : a device that is unavailable / not a torch device.
    NonFiniteError : NaN or Inf in X or X2, or in the kernel (the model's outputs or their
        gradients not finite at X, or J J^T overflowing the compute dtype).
    MemoryBudgetError : the output or one row's working set does not fit, or an allocation
        fails while computing (torch.OutOfMemoryError, CPU "can't allocate memory": the
        budget exceeds what is really free).
    """
    import torch

    t0 = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise ParameterError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    numpy_out = not isinstance(X, torch.Tensor)
    Xt = _as_rows(X, "X")
    X2t = None if X2 is None else _as_rows(X2, "X2")
    if X2t is not None and tuple(X2t.shape[1:]) != tuple(Xt.shape[1:]):
        raise ShapeError(f"X and X2: inconsistent feature shapes: "
                         f"[{tuple(Xt.shape[1:])}, {tuple(X2t.shape[1:])}]")
    return_report = check_flag(return_report, "return_report")
    if block is not None:
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
            raise ParameterError(f"block: expected an integer >= 1, got {block!r}")
        block = int(block)
    with _working_model(model, dtype, device) as (work, dt, dev):
        tensors = {**{k: v.detach() for k, v in work.named_parameters()},
                   **{k: v.detach() for k, v in work.named_buffers()}}
        names = _select(work, params)
        Xt = _to(Xt, dev, dt)
        X2t = None if X2t is None else _to(X2t, dev, dt)
        budget = _budget(memory_budget, dev)
        call = _caller(work)
        _check_applies(call, tensors, Xt, "X")
        if X2t is not None:
            _check_applies(call, tensors, X2t, "X2")
        try:
            with torch.no_grad():
                K, report = _compute(call, tensors, names, Xt, X2t, outputs, strategy, budget,
                                     block, dt)
        except NtkcoreError:
            raise
        except RuntimeError as e:  # an op torch.func cannot transform, even one row at a time
            if is_alloc_failure(e):  # torch.OutOfMemoryError or the CPU allocator's error
                first = (str(e).splitlines() or [""])[0]
                raise MemoryBudgetError(
                    f"memory_budget: expected {format_bytes(budget)} of working memory on "
                    f"{dev}, got an allocation failure ({type(e).__name__}: {first}); pass a "
                    f"smaller memory_budget (or block)", budget_bytes=int(budget)) from e
            raise ParameterError(
                f"model: its operations are not supported by the available eNTK strategies "
                f"(torch.func jacrev/jvp/vjp, batched by vmap or one example at a time; "
                f"strategy={strategy!r}): {type(e).__name__}: {e}") from e
    if not _all_finite(K):
        raise NonFiniteError(
            f"empirical_ntk: expected a finite kernel, got NaN or Inf ({K.dtype}): the model's "
            f"outputs or their gradients at these inputs are not finite, or J J^T overflowed; "
            f"check the weights' scale"
            + (" (or compute in float64)" if K.dtype not in (np.float64, torch.float64) else ""))
    report.seconds = time.perf_counter() - t0
    report.device = str(dev)
    if numpy_out:
        K = K.cpu().numpy()
    return (K, report) if return_report else K


def _compute(call, tensors, names, X, X2, outputs, strategy, budget, block, dt):
    """Plan (probe, verify, cost model, blocks) and run; returns (K, EntkReport)."""
    import torch

    from . import _entk_capture as cap
    from . import _entk_cost as cost
    from ._entk_jac import Engine, run_blocked, run_ntvp, symmetrize_diagonal

    n = X.shape[0]
    n2 = n if X2 is None else X2.shape[0]
    s = torch.finfo(dt).bits // 8
    # three probe rows (cycled when there are fewer), from X and X2
    probe_rows = torch.cat([X[:2], X[:1] if X2 is None else X2[:1]])
    probe_rows = probe_rows[torch.arange(3, device=X.device) % probe_rows.shape[0]]
    with torch.no_grad():
        n_out = call(tensors, probe_rows[:1]).reshape(1, -1).shape[1]
    sel, full = _outputs(outputs, n_out, X.device)
    C = int(sel.numel())
    info = cap.probe(call, tensors, names, probe_rows, sel)
    sites, dropped = cap.verify_groups(call, tensors, probe_rows, sel, info["groups"],
                                       rtol=1e-3 if s == 4 else 1e-8)
    groups = _groups(tensors, names, sites, dropped)
    overrides = cost.resolve_overrides(strategy, groups)
    cost.choose(groups, overrides, C=C, full=full, s=s, n=n, n2=n2, budget=budget)
    act = info["act_per_row"]
    feat_row = sum(g.bytes_per_row for g in groups if g.strategy != "ntvp")
    # outer groups: the unfolded inputs A and the cotangents D (twice: the per-output
    # buffers and the layout copy einsum makes) exist while the weight gradients are formed
    transient = sum(s * (g.site["L"] * (g.site["k"] + 2 * C * g.site["o"]))
                    for g in groups if g.method == "outer")
    # a feature pass holds the forward's activations and one backward's (structured: one
    # output at a time), or C backward directions at once (vmap(jacrev)), plus a copy of the
    # row features while they are assembled
    jac = any(g.strategy == "jacobian" for g in groups)
    compute_row = s * act * (3 + (C if jac else 0)) + feat_row + transient
    work_pair = max([g.work_per_pair for g in groups if g.strategy != "ntvp"] + [s * C * C])
    blocks = cost.plan_blocks(n=n, n2=n2, sym=X2 is None, feat_row=feat_row,
                              compute_row=compute_row, work_pair=work_pair, budget=budget,
                              block=block)
    p_ntvp = sum(g.numel for g in groups if g.strategy == "ntvp")
    if p_ntvp:
        blocks["ntvp_rows"], blocks["ntvp_chunk"], peak = cost.plan_ntvp(
            n=n, n2=n2, C=C, s=s, p_ntvp=p_ntvp, act_row=act, budget=budget)
        blocks["est_peak"] = max(blocks["est_peak"], peak)  # runs after the blocked pass
    shape = (n, n2, C, C) if full else (n, n2)
    _check_output(shape, s, X.device)
    K = torch.zeros(shape, dtype=dt, device=X.device)
    eng = Engine(call, tensors, sel, groups, full)
    blocks["feature_rows_computed"] = run_blocked(eng, X, X2, K, blocks)
    if p_ntvp:
        run_ntvp(eng, X, X2, K, blocks["ntvp_rows"], blocks["ntvp_chunk"])
    if X2 is None:
        symmetrize_diagonal(K, max(blocks["stream"], 1), full)
    if eng.unbatched:  # visible, not silent: the per-example loop is slower than vmap
        blocks["unbatched"] = f"vmap failed, one example at a time ({eng.unbatched})"
    fwd = info["flops_per_row"] * (1 + 2 * C)
    passes = int(any(g.strategy == "structured" for g in groups)) + \
        int(any(g.strategy == "jacobian" for g in groups))
    report = cost.EntkReport(
        groups=[g.as_dict() for g in groups], blocks=blocks, memory_budget=int(budget),
        est_peak_bytes=int(blocks["est_peak"]),
        est_feature_flops=fwd * blocks["feature_rows_computed"] * passes, n=n, n2=n2,
        outputs=outputs, C=C, dtype=str(dt).replace("torch.", ""))
    return K, report


# ---- boundary helpers ------------------------------------------------------------------------

def _as_rows(X, name):
    import torch
    if isinstance(X, np.ndarray):
        if X.dtype.kind not in "fiub":
            raise ParameterError(f"{name}: expected a numeric array, got dtype {X.dtype}")
        X = torch.from_numpy(np.ascontiguousarray(X))
    elif not isinstance(X, torch.Tensor):
        raise ParameterError(f"{name}: expected a torch.Tensor or NumPy array of rows "
                             f"(n, ...), got {type(X).__name__}")
    if X.dim() < 2:
        raise ShapeError(f"{name}: expected an array of rows (n, *feature_shape) with at "
                         f"least 2 dims, got shape {tuple(X.shape)}")
    if X.shape[0] < 1:
        raise ShapeError(f"{name}: expected at least one row, got shape {tuple(X.shape)}")
    if X.is_complex():
        raise ParameterError(f"{name}: expected real values, got dtype {X.dtype}")
    if X.is_floating_point() and not bool(torch.isfinite(X).all()):
        raise NonFiniteError(f"{name}: expected finite values, got NaN or Inf")
    return X


def _to(X, dev, dt):
    return X.to(device=dev, dtype=dt if X.is_floating_point() else X.dtype)


def _parse_dtype(dtype):
    import torch
    named = {"float32": torch.float32, "float64": torch.float64}
    if dtype is None or dtype in (torch.float32, torch.float64):
        return dtype
    if isinstance(dtype, str) and dtype in named:
        return named[dtype]
    if dtype in (np.float32, np.float64):
        return named[np.dtype(dtype).name]
    raise ParameterError(f"dtype: expected torch.float32, torch.float64, 'float32' or "
                         f"'float64', got {dtype!r}")


@contextlib.contextmanager
def _working_model(model, dtype, device):
    """The model to evaluate (a cast/moved copy when dtype/device differ), in eval mode; its
    training flags and registered parameters and buffers are restored on exit."""
    import torch
    dtype = _parse_dtype(dtype)
    first = next(iter(list(model.parameters()) + list(model.buffers())), None)
    cur_dt = first.dtype if first is not None and first.is_floating_point() else \
        torch.get_default_dtype()
    cur_dev = first.device if first is not None else torch.device("cpu")
    dev = cur_dev if device is None else _parse_device(device, cur_dev)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("device: expected an available CUDA device, got "
                           f"{str(dev)!r} but torch sees no GPU")
    if dtype is None and cur_dt in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # half-precision kernels keep ~3 digits: compute on a copy
    dt = dtype or cur_dt
    work = model if (dt == cur_dt and dev == cur_dev) else \
        copy.deepcopy(model).to(device=dev, dtype=dt)
    flags = {m: m.training for m in work.modules()}
    # torch.func.functional_call leaves a plain, grad-less tensor in place of a weight that
    # two modules share (torch 2.14): keep every registered tensor and put it back after
    state = [(m, table, name, t) for m in work.modules()
             for table in (m._parameters, m._buffers) for name, t in table.items()]
    work.eval()
    try:
        yield work, dt, dev
    finally:
        for m, f in flags.items():
            m.training = f
        for _, table, name, t in state:
            table[name] = t


def _parse_device(device, cur_dev):
    """``device`` as a torch.device of type cpu, cuda or the model's own, else
    ParameterError."""
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ParameterError(f"device: expected 'cpu', 'cuda' or 'cuda:<i>', got {device!r} "
                             f"({e})") from None
    if dev.type not in ("cpu", "cuda", cur_dev.type):
        raise ParameterError(f"device: expected 'cpu', 'cuda' or 'cuda:<i>' (or the model's "
                             f"own device type, {cur_dev.type!r}), got {device!r}")
    return dev


def _check_applies(call, tensors, X, name):
    """Run the model once on (up to) two rows of X: a failure there is X's problem (feature
    shape, dtype), reported as such before any strategy is tried; the output must be a tensor
    with one row per input row."""
    import torch
    rows = X[:2]
    try:
        with torch.no_grad():
            out = call(tensors, rows)
    except Exception as e:  # any model error, reported with its own message
        text = f"{type(e).__name__}: {e}"
        kind = ShapeError if any(w in str(e).lower() for w in ("shape", "size")) \
            else ParameterError
        raise kind(f"{name}: the model could not be applied to {name} (rows of shape "
                   f"{tuple(X.shape[1:])}, dtype {X.dtype}): {text}") from e
    if not isinstance(out, torch.Tensor):
        raise ParameterError(f"model: expected it to return a tensor of shape (b,) or "
                             f"(b, C), got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != rows.shape[0] or out[0].numel() == 0:
        raise ShapeError(f"model: expected outputs with one row per input row, (b,) or "
                         f"(b, C) with C >= 1, got shape {tuple(out.shape)} for b = "
                         f"{rows.shape[0]} rows of {name}")


def _select(model, params):
    named = dict(model.named_parameters())
    alias = {nm: nm for nm in named}
    by_id = {id(p): nm for nm, p in named.items()}
    for nm, p in model.named_parameters(remove_duplicate=False):
        alias.setdefault(nm, by_id[id(p)])
    if params is None:
        names = [nm for nm, p in named.items() if p.requires_grad]
    elif callable(params):
        names = [nm for nm in named if params(nm)]
    elif isinstance(params, (list, tuple, set)) and all(isinstance(p, str) for p in params):
        unknown = [p for p in params if p not in alias]
        if unknown:
            raise ParameterError(f"params: unknown parameter names {unknown}; the model has "
                                 f"{list(named)}")
        names = list(dict.fromkeys(alias[p] for p in params))
    else:
        raise ParameterError(f"params: expected a list of parameter names or a predicate "
                             f"name -> bool, got {params!r}")
    if not names:
        raise ParameterError("params: expected at least one parameter to differentiate, got "
                             "none (no parameter requires grad or matches)")
    return names


def _outputs(outputs, n_out, device):
    import torch
    if isinstance(outputs, str) and outputs in ("trace", "full"):
        return torch.arange(n_out, device=device), outputs == "full"
    if isinstance(outputs, (int, np.integer)) and not isinstance(outputs, bool) \
            and 0 <= outputs < n_out:
        return torch.tensor([int(outputs)], device=device), False
    raise ParameterError(f"outputs: expected 'trace', 'full' or an output index in "
                         f"[0, {n_out}), got {outputs!r}")


def _all_finite(K, rows: int = 256) -> bool:
    """Every entry of K finite, checked in blocks of rows (no n x n2 temporary)."""
    import torch
    return all(bool(torch.isfinite(K[i:i + rows]).all()) for i in range(0, K.shape[0], rows))


def _budget(memory_budget, dev):
    import torch
    if memory_budget is None:
        if dev.type == "cuda":
            return int(torch.cuda.mem_get_info(dev)[0] * 0.5)
        return int(host_available_bytes() * 0.5)
    if not (is_finite_number(memory_budget) and memory_budget > 0):
        raise ParameterError(f"memory_budget: expected a number of bytes > 0, got "
                             f"{memory_budget!r}")
    return int(memory_budget)


def _check_output(shape, itemsize, dev):
    import torch
    need = itemsize * math.prod(shape)
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else host_available_bytes()
    if need > 0.9 * free:
        raise MemoryBudgetError(
            f"empirical_ntk output: needs {format_bytes(need)} for a "
            f"{'x'.join(map(str, shape))} kernel but {format_bytes(free)} are free "
            f"(use outputs='trace' or fewer rows)", needed_bytes=need, budget_bytes=free)


def _caller(model):
    from torch.func import functional_call

    def call(tensors, x):
        return functional_call(model, tensors, (x,))
    return call


def _groups(tensors, names, sites, dropped):
    from ._entk_cost import Group, module_key
    groups, used = [], set()
    for key, site in sites.items():
        site = dict(site, key=key)
        members = tuple(nm for nm in (site["w"], site["b"]) if nm)
        used.update(members)
        kind = site["kind"] if site["kind"] == "linear" else "conv"
        groups.append(Group(module_key(members[0]), members,
                            sum(tensors[nm].numel() for nm in members), kind, site))
    rest = {}
    for nm in names:
        if nm not in used:
            rest.setdefault(module_key(nm), []).append(nm)
    for key, members in rest.items():
        why = [dropped[m] for m in members if m in dropped]
        groups.append(Group(key, tuple(members), sum(tensors[m].numel() for m in members),
                            "other", None, note=why[0] if why else ""))
    seen = {}
    for g in groups:  # two groups in one module: key them by their first parameter
        seen[g.key] = seen.get(g.key, 0) + 1
    for g in groups:
        if seen[g.key] > 1:
            g.key = g.names[0]
    return groups
