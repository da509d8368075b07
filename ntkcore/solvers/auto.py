"""Solver choice: exact when the float64 n x n work fits comfortably (dense, else packed),
else Nystrom.

``choose_solver(K, lam, requested="auto", memory_budget=None, **options)`` returns
``(name, options, reason)``; the reason is printed by the CLI and stored in summary.json.

Memory model (bytes, float64):

- exact: ``EXACT_COPIES`` (2) n x n arrays on the CPU (K or its materialised copy, and the
  factor / its triangular inverse, both in place), i.e. 16 n^2; on the GPU
  ``EXACT_COPIES_GPU`` (3): K, the copy of K + lam I that the blocked Cholesky factors in
  place, and L^-1 (built by block rows in GEMMs), 24 n^2; 16 n^2 with ``overwrite_k``, where K
  itself is factored (with ``GPU_CHOLESKY = "cusolver"``, CuPy's new factor, and L^-1 in K's
  memory), as for a kernel operator, which the solver materialises and factors in place; held
  by tests/test_gpu_paths.py on the CUDA simulator's allocation counter;
- exact in packed storage (CPU): the lower triangle in column panels and one assembly tile,
  about 4 n^2 (the dense solver is not used on the CPU above ``CPU_DENSE_MAX_N``);
- Nystrom / CG preconditioner at rank r: the factor F (n, r), one (n, r) temporary, the
  (r, r) Gram matrix and its Cholesky factor, and two (n, 128) column blocks:
  8 (2 n r + 2 r^2 + 256 n); ``right_apply`` works in (128, n) row blocks within the latter;
- besides the factor (``fixed_bytes``): the kernel operator's caches (a ReluNTKOperator's
  activation patterns, n m bytes, and relu(X W^T), 8 n m more with ``train_a``:
  landmarks.CachedReluNTK), for CG the ``CG_ARRAYS`` (n, s) float64 block vectors of the fit
  (s = C + probes) and one (tile, n) row block of K with its tile temporaries, and, when the
  caller says how many test rows it will score (``n_test``), the (T, n) B = K_test A^-1 and
  the (T, n) scores (16 T n bytes), which the caller holds but the solve makes (loo_influence
  writes the scores over B when B is the solve's own, so 8 T n of them is a kept margin).

"Comfortably" means within ``COMFORT`` (70 %) of the budget; the budget is ``memory_budget``
when given, else the free memory of the device K lives on (host RAM for NumPy inputs).
``auto`` picks exact when it fits, else (CPU) exact in packed storage
(``storage="packed"``, see exact_packed.py) when that fits, else Nystrom (randomly pivoted
Cholesky landmarks) at the largest rank whose factor fits, at most ``AUTO_MAX_RANK`` unless
``rank`` is given. A request that cannot fit at all is refused up front with
:class:`MemoryBudgetError`.
"""

from __future__ import annotations

import math

import numpy as np

from .._validate import check_count, check_flag, check_positive
from ..backend import backend_for
from ..errors import MemoryBudgetError, ParameterError
from .cg import CG_ARRAYS, DEFAULT_PROBES
from .landmarks import DEFAULT_BLOCK, check_rank

SOLVERS = ("auto", "exact", "nystrom", "cg")

# The exact solver holds K and one n x n working copy (factor, then its inverse).
EXACT_COPIES = 2
EXACT_COPIES_GPU = 3
# "Comfortably": a solver may plan to use at most this share of the budget.
COMFORT = 0.7
#: Smallest rank worth running; below it auto refuses rather than return noise.
MIN_RANK = 16
#: auto's rank cap when the user gives none: O(n r^2) flops must stay minutes on a laptop.
AUTO_MAX_RANK = 8192
#: Largest n the dense exact solver takes on the CPU (see _dense_allowed): its whole pipeline
#: ran at n = 14 000; SciPy's dpotrf alone ran at 15 000 and segfaulted at 16 000.
CPU_DENSE_MAX_N = 14_000
#: Options each solver accepts (besides check / overwrite_k / timer).
SOLVER_OPTIONS = {
    "exact": ("storage", "precision", "diag_probes", "seed"),
    "nystrom": ("rank", "landmarks", "seed", "diag_correction"),
    "cg": ("rank", "landmarks", "seed", "diag_correction", "tol", "atol", "maxiter", "probes",
           "progress"),
}
_ALL_OPTIONS = sorted(set().union(*SOLVER_OPTIONS.values()))


def exact_bytes(n: int, *, gpu: bool = False, private: bool = False) -> int:
    """Bytes of the dense exact solver; ``private``: K is factored in place -- an operator
    the solver materialises itself, or a dense K given with ``overwrite_k`` (one n x n array
    fewer on the GPU)."""
    copies = (EXACT_COPIES_GPU - (1 if private else 0)) if gpu else EXACT_COPIES
    return copies * 8 * n * n


def packed_exact_bytes(n: int, precision: str = "float64") -> int:
    """The packed exact solver: its panels (float64 or float32), one float64 assembly tile
    and one float64 panel of L^-1."""
    from .exact_packed import PANEL, PRECISIONS, TILE_BYTES, packed_bytes
    itemsize = np.dtype(PRECISIONS[precision]).itemsize
    return (packed_bytes(n, itemsize=itemsize) + min(TILE_BYTES, 8 * n * PANEL)
            + 8 * n * min(n, PANEL))


def _on_cpu(K) -> bool:
    x = K if hasattr(K, "ndim") else getattr(K, "X", getattr(K, "K", None))
    return backend_for(x).name == "cpu"


def _packed_possible(K) -> bool:
    """Packed storage is a CPU solver (a dense K is read block by block into it)."""
    return _on_cpu(K)


def _dense_allowed(K, n: int) -> bool:
    """SciPy's dpotrf (OpenBLAS 0.3.31, 2 threads) segfaulted on our 2-core machine from
    n = 16 000 (NumPy's X @ X.T, a threaded SYRK, from 26 000); above CPU_DENSE_MAX_N the
    CPU uses the packed solver, whose products are all panel GEMMs and w x w factorisations."""
    return n <= CPU_DENSE_MAX_N or not _on_cpu(K)


#: the most diag(A^-1) probes accepted: s probes cost about s n^2 flops against n^3 / 3 for
#: the exact diagonal, so more than this only pays for n above about 200 000 (a huge count
#: ran out of memory listing its probe blocks, after training)
MAX_DIAG_PROBES = 65536


def _packed_approximations(opts) -> list:
    """Validate the packed solver's approximation options; one phrase for each one asked."""
    from .exact_packed import PRECISIONS
    out = []
    precision = opts.get("precision", "float64")
    if precision not in PRECISIONS:
        raise ParameterError(f"precision: expected one of {tuple(PRECISIONS)}, got "
                             f"{precision!r}")
    if precision != "float64":
        out.append(f"precision={precision} (approximate)")
    probes = opts.get("diag_probes")
    if probes is not None:
        if isinstance(probes, bool) or not isinstance(probes, (int, np.integer)) \
                or not 2 <= probes <= MAX_DIAG_PROBES:
            raise ParameterError(
                f"diag_probes: expected an integer in [2, {MAX_DIAG_PROBES}], got {probes!r} "
                f"(s probes cost about s n^2 flops, the exact diagonal n^3 / 3: past n / 3 "
                f"probes, leave diag_probes out)")
        out.append(f"diag(A^-1) estimated from {probes} probes (relative standard error "
                   f"{math.sqrt(2 / probes):.2g})")
    return out


def nystrom_bytes(n: int, rank: int) -> int:
    return 8 * (2 * n * rank + 2 * rank * rank + 2 * DEFAULT_BLOCK * n)


def operator_bytes(K) -> int:
    """Bytes the solvers' view of kernel operator ``K`` caches (landmarks.as_operator): a
    ReluNTKOperator's (n, m) uint8 activation patterns, plus its (n, m) float64 relu(X W^T)
    with ``train_a``; 0 for a dense K."""
    from .operator import ReluNTKOperator
    if type(K) is not ReluNTKOperator:
        return 0
    n, m = int(K.n), int(K.W.shape[0])
    return n * m * (9 if K.train_a else 1)


def matmat_bytes(K) -> int:
    """Temporaries of one K @ V by a kernel operator (CG's product): one (tile, n) float64 row
    block of K and, per column tile c, the (tile, c) products and the (c, m) float32 pattern
    copy (landmarks.CachedReluNTK.rows). 0 for a dense K (the (n, s) product is a CG array)."""
    from .landmarks import CachedReluNTK
    from .operator import ReluNTKOperator
    if type(K) is not ReluNTKOperator:
        return 0
    n, m, t = int(K.n), int(K.W.shape[0]), min(int(K.tile), int(K.n))
    c = min(n, CachedReluNTK.COL_TILE)
    return 8 * t * n + 12 * t * m + c * (4 * m + 24 * t)


def cg_bytes(n: int, s: int) -> int:
    """The block vectors of one block CG solve with s right-hand sides."""
    return CG_ARRAYS * 8 * n * s


def scoring_bytes(n: int, n_test: int | None, n_outputs: int | None = None) -> int:
    """The (T, n) B = K_test A^-1 and scores, and the (T, C) residuals, that every solver's
    caller holds while scoring (0 when T is not known)."""
    if not n_test:
        return 0
    return 16 * int(n_test) * int(n) + 8 * int(n_test) * int(n_outputs or 1)


def fixed_bytes(K, solver: str, *, n_test: int | None = None, n_outputs: int | None = None,
                probes: int | None = None) -> int:
    """What ``solver`` (nystrom | cg) allocates for K besides its rank-r factor: operator
    caches, the (T, n) B and scores when ``n_test`` is known, and for CG its fit's block
    vectors (C + probes columns; C = 1 when ``n_outputs`` is unknown) and one operator
    product's temporaries."""
    n = int(K.shape[0])
    out = operator_bytes(K) + scoring_bytes(n, n_test, n_outputs)
    if solver == "cg":
        s = int(n_outputs or 1) + int(probes or DEFAULT_PROBES)
        out += cg_bytes(n, s) + matmat_bytes(K)
    return out


def max_rank(n: int, budget: float, fixed: float = 0.0) -> int:
    """Largest r <= n with nystrom_bytes(n, r) + fixed <= COMFORT * budget (0 when none
    fits); ``fixed``: the solver's other allocations (see fixed_bytes)."""
    room = (COMFORT * budget - fixed) / 8 - 2 * DEFAULT_BLOCK * n
    if room <= 0:
        return 0
    # 2 r^2 + 2 n r - room <= 0
    r = (-2 * n + math.sqrt(4 * n * n + 8 * room)) / 4
    return int(max(0, min(n, math.floor(r))))


def largest_n(needs, budget: float) -> int:
    """Largest n with ``needs(n) <= budget`` for a byte model increasing in n (0 if none)."""
    lo, hi = 0, 1
    while needs(hi) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if needs(mid) <= budget else (lo, mid)
    return lo


def _gib(b) -> str:
    from .._units import format_bytes
    return format_bytes(b)


def _budget(K, memory_budget):
    if memory_budget is not None:
        return check_positive(memory_budget, "memory_budget (bytes)"), "given memory_budget"
    x = K if hasattr(K, "ndim") else getattr(K, "X", None)
    be = backend_for(x)
    free = float(be.free_memory_bytes())
    from ..backend import memory_limit_from_env
    limit = memory_limit_from_env()
    if limit is not None and free >= limit:  # the cap, not the machine, is what limits
        return free, f"NTKCORE_MEMORY_LIMIT on {be.name} memory"
    return free, f"free {be.name} memory"


def _split_options(name, options):
    """(options for ``name``, names dropped because ``name`` does not use them)."""
    keep = {k: v for k, v in options.items() if k in SOLVER_OPTIONS[name]}
    dropped = [k for k in options if k not in SOLVER_OPTIONS[name]]
    if name == "exact" and "seed" in keep and "diag_probes" not in keep:
        del keep["seed"]  # the exact solver draws nothing but diag_probes' probes
        dropped.append("seed")
    return keep, sorted(dropped)


def _note(dropped):
    return f" ({', '.join(dropped)} not used by this solver)" if dropped else ""


def check_solver_options(requested: str, options: dict) -> dict:
    """Validate a solver name and its options before any work (the data is not needed);
    returns the options without ``None`` values.

    Raises
    ------
    ParameterError : unknown solver or option, or a bad precision / diag_probes / rank / seed
        / diag_correction / progress / CG value.
    """
    if requested not in SOLVERS:
        raise ParameterError(f"solver: expected one of {SOLVERS}, got {requested!r}")
    unknown = sorted(k for k in options if k not in _ALL_OPTIONS)
    if unknown:
        raise ParameterError(f"solver options: expected names among {_ALL_OPTIONS}, got "
                             f"{unknown}")
    options = {k: v for k, v in options.items() if v is not None}
    _packed_approximations(options)
    if "rank" in options:
        check_rank(options["rank"], 1)
    if "seed" in options:  # NumPy's default_rng takes integers >= 0
        options["seed"] = check_count(options["seed"], "seed", minimum=0)
    if "diag_correction" in options:
        options["diag_correction"] = check_flag(options["diag_correction"], "diag_correction")
    if "progress" in options:  # None (bars on a terminal only) was dropped above
        options["progress"] = check_flag(options["progress"], "progress")
    from .cg import check_cg_options
    check_cg_options(**{k: options[k] for k in ("tol", "atol", "maxiter", "probes")
                        if k in options})
    return options


def choose_solver(K, lam, *, requested: str = "auto", memory_budget: int | None = None,
                  overwrite_k: bool = False, n_test: int | None = None,
                  n_outputs: int | None = None, **options):
    """Pick the solver for A = K + lam I and say why.

    Parameters
    ----------
    K : (n, n) array or kernel operator (only ``K.shape`` / the device are used).
    lam : float, ridge (not used by the choice; kept for the common signature).
    requested : "auto" | "exact" | "nystrom" | "cg".
    memory_budget : int or float > 0, optional, bytes the solver may plan for (default: free
        memory of K's device).
    overwrite_k : bool, default False, whether the exact solver may factor a dense K in place
        (``loo_influence(..., overwrite_k=True)``): on the GPU it then needs one n x n array
        fewer, as for an operator (see ``exact_bytes``).
    n_test, n_outputs : int, optional, the T test rows the caller will score and the C
        columns of Y. Known, the (T, n) B = K_test A^-1 and scores (16 T n bytes) are planned
        for with every solver, and CG's fit block vectors with C + probes columns (C = 1 when
        unknown). None: not counted (the caller must leave room for them).
    **options : solver options; ``None`` values mean "default" and are dropped.
        nystrom: rank, landmarks ("uniform" | "rpcholesky"), seed, diag_correction.
        cg: rank, landmarks, seed, diag_correction (preconditioner), tol, atol, maxiter,
        probes, progress.

    Returns
    -------
    name : the concrete solver ("exact" | "nystrom" | "cg").
    options : the options to pass to its fit function.
    reason : one line for the CLI and summary.json.

    Raises
    ------
    ParameterError : unknown solver or option.
    MemoryBudgetError : the request cannot fit the budget (message names what would).
    """
    options = check_solver_options(requested, options)
    n_test, n_outputs = (None if v is None else check_count(v, name, minimum=0)
                         for v, name in ((n_test, "n_test"), (n_outputs, "n_outputs")))
    n = int(K.shape[0])
    budget, source = _budget(K, memory_budget)
    counts = {"n_test": n_test, "n_outputs": n_outputs}
    r_fit = max_rank(n, budget, fixed_bytes(K, "nystrom", **counts))
    # the (T, n) B and scores, when the caller says T: planned with every solver
    scoring = scoring_bytes(n, n_test, n_outputs)
    # K factored in place: an operator whose dense() is a new matrix, or overwrite_k
    in_place = overwrite_k or (not hasattr(K, "ndim") and getattr(K, "dense_is_private", False))
    need = exact_bytes(n, gpu=not _on_cpu(K), private=in_place) + scoring
    if requested == "exact":
        opts, dropped = _split_options("exact", options)
        storage = opts.get("storage")
        if storage not in (None, "dense", "packed"):
            raise ParameterError(f"storage: expected 'dense' or 'packed', got {storage!r}")
        if storage == "packed" and not _packed_possible(K):
            raise ParameterError("storage='packed' is a CPU solver; K is on the GPU")
        approx = _packed_approximations(opts)
        if approx:
            if not _packed_possible(K):
                raise ParameterError(f"{' and '.join(approx)}: options of the packed exact "
                                     f"solver, which runs on the CPU; K is on the GPU (where "
                                     f"float64 runs at the float32 rate)")
            if storage == "dense":
                raise ParameterError(f"{' and '.join(approx)}: options of packed storage; "
                                     f"got storage='dense'")
            storage = "packed"
        if storage == "dense" and not _dense_allowed(K, n):
            raise ParameterError(f"storage='dense': on the CPU the dense exact solver takes "
                                 f"n <= {CPU_DENSE_MAX_N} (OpenBLAS's "
                                 f"dpotrf segfaulted from n = 16 000 here); got n={n}; use "
                                 f"storage='packed'")
        if storage is None and _packed_possible(K) and (
                not _dense_allowed(K, n) or need > COMFORT * budget):
            storage = "packed"
        if storage == "packed":
            precision = opts.get("precision", "float64")
            need_packed = packed_exact_bytes(n, precision) + scoring
            if need_packed > budget:
                n_fit = largest_n(lambda m: packed_exact_bytes(m, precision)
                                  + scoring * m / n, budget)
                alt = (f"solver='nystrom' (rank <= {r_fit} fits) or 'cg'" if r_fit >= MIN_RANK
                       else "more memory")
                raise MemoryBudgetError(
                    f"exact: n={n} needs {_gib(need_packed)} even in {precision} packed "
                    f"storage, over the {_gib(budget)} budget ({source}); about n <= {n_fit} "
                    f"would fit, or use {alt}",
                    needed_bytes=need_packed, budget_bytes=int(budget), n_fit=n_fit)
            opts["storage"] = "packed"
            return "exact", opts, ("solver='exact' requested; packed storage "
                                   f"({_gib(need_packed)})" + "".join(f", {a}" for a in approx)
                                   + _note(dropped))
        if 8 * n * n > budget:
            gpu = not _on_cpu(K)
            n_fit = largest_n(lambda m: exact_bytes(m, gpu=gpu, private=in_place)
                              + scoring * m / n, budget)
            alt = (f"solver='nystrom' (rank <= {r_fit} fits) or 'cg'" if r_fit >= MIN_RANK
                   else "more memory")
            raise MemoryBudgetError(
                f"exact: n={n} needs at least {_gib(8 * n * n)} for one float64 "
                f"n x n array, over the {_gib(budget)} budget ({source}); n <= {n_fit} would "
                f"fit its whole working set, or use {alt}",
                needed_bytes=8 * n * n, budget_bytes=int(budget), n_fit=n_fit)
        opts.pop("storage", None)
        return "exact", opts, "solver='exact' requested" + _note(dropped)
    if requested in ("nystrom", "cg"):
        opts, dropped = _split_options(requested, options)
        from .nystrom import DEFAULT_RANK
        rank = check_rank(opts.get("rank", DEFAULT_RANK), n)
        fixed = fixed_bytes(K, requested, probes=opts.get("probes"), **counts)
        need_r = nystrom_bytes(n, rank) + fixed
        if need_r > budget:
            r_ok = max_rank(n, budget / COMFORT, fixed)  # the whole budget, as tested here
            raise MemoryBudgetError(
                f"{requested}: rank {rank} at n={n} needs {_gib(need_r)} (the factor "
                f"{_gib(nystrom_bytes(n, rank))}, the rest {_gib(fixed)}: operator caches"
                f"{', CG block vectors' if requested == 'cg' else ''}"
                f"{', the (T, n) B and scores' if n_test else ''}), over the {_gib(budget)} "
                f"budget ({source}); "
                + (f"rank <= {r_ok} fits" if r_ok >= 1 else "no rank fits in this budget"),
                needed_bytes=need_r, budget_bytes=int(budget))
        opts["rank"] = rank
        if requested == "cg":  # block vectors of each solve: the fit's share and what is left
            s_fit = int(n_outputs or 1) + int(opts.get("probes", DEFAULT_PROBES))
            opts["memory_budget"] = int(budget - need_r + cg_bytes(n, s_fit))
        return requested, opts, f"solver={requested!r} requested (rank {rank})" + _note(dropped)
    # auto
    if any(options.get(k) is not None for k in ("storage", "precision", "diag_probes")):
        # options only the exact solver has: exact
        return choose_solver(K, lam, requested="exact", memory_budget=memory_budget,
                             overwrite_k=overwrite_k, **counts, **options)
    if need <= COMFORT * budget and _dense_allowed(K, n):
        opts, dropped = _split_options("exact", options)
        return "exact", opts, (f"exact: n={n} needs {_gib(need)} for the float64 "
                               f"factorisation, within {COMFORT:.0%} of the {_gib(budget)} "
                               f"budget ({source})" + _note(dropped))
    if _packed_possible(K) and packed_exact_bytes(n) + scoring <= COMFORT * budget:
        opts, dropped = _split_options("exact", options)
        opts["storage"] = "packed"
        why = ("" if _dense_allowed(K, n) else
               f"; dense is not used on the CPU above n={CPU_DENSE_MAX_N}")
        return "exact", opts, (f"exact in packed storage: n={n} needs "
                               f"{_gib(packed_exact_bytes(n) + scoring)} (dense would need "
                               f"{_gib(need)}{why}), within {COMFORT:.0%} of the "
                               f"{_gib(budget)} budget ({source}); "
                               f"about n^3 flops (3x faster, approximate: precision='float32', "
                               f"diag_probes=1024)" + _note(dropped))
    opts, dropped = _split_options("nystrom", options)
    if r_fit < MIN_RANK:
        raise MemoryBudgetError(
            f"auto: neither exact ({_gib(need)}) nor Nystrom at rank {MIN_RANK} "
            f"({_gib(nystrom_bytes(n, MIN_RANK) + fixed_bytes(K, 'nystrom', **counts))}, "
            f"with operator caches{' and the (T, n) B and scores' if n_test else ''}) fits "
            f"{COMFORT:.0%} of the {_gib(budget)} budget ({source}) at n={n}",
            needed_bytes=nystrom_bytes(n, MIN_RANK) + fixed_bytes(K, "nystrom", **counts),
            budget_bytes=int(budget))
    if "rank" in opts:
        rank = min(int(opts["rank"]), r_fit)
        why = (f"rank {rank} (requested {opts['rank']}" +
               (f", capped to the {r_fit} that fits)" if rank < opts["rank"] else ")"))
    else:
        rank = min(r_fit, AUTO_MAX_RANK)
        why = (f"rank {rank}, the largest whose factor fits" if rank == r_fit else
               f"rank {rank} (memory allows {r_fit}; capped at AUTO_MAX_RANK for time, pass "
               f"rank= to go higher)")
    opts["rank"] = rank
    opts.setdefault("landmarks", "rpcholesky")
    return "nystrom", opts, (f"nystrom: exact would need {_gib(need)}, over {COMFORT:.0%} of "
                             f"the {_gib(budget)} budget ({source}); {why}" + _note(dropped))
