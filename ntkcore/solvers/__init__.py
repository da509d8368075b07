"""Kernel ridge solvers behind one interface (see base.KRRFit): exact, Nystrom, CG."""

from __future__ import annotations

from functools import partial

from .auto import SOLVERS, choose_solver


def fit_function(name: str):
    """The fit function for a concrete solver name."""
    if name == "exact":
        from .exact import exact_fit
        return _exact_adapter(exact_fit)
    if name == "nystrom":
        from .nystrom import nystrom_fit
        return nystrom_fit
    if name == "cg":
        from .cg import cg_fit
        return cg_fit
    from ..errors import ParameterError
    raise ParameterError(f"solver: expected 'exact', 'nystrom' or 'cg', got {name!r}")


def _exact_adapter(exact_fit):
    """The exact solver: dense storage (operators materialised after auto's check), or packed
    storage (``storage="packed"``: CPU, K assembled straight into half the memory)."""
    def fit(K, Y, lam, *, storage: str | None = None, K_test=None, precision: str = "float64",
            diag_probes: int | None = None, seed: int = 0, **kw):
        if storage == "packed":
            from .exact_packed import packed_exact_fit
            from .landmarks import as_operator
            fit = packed_exact_fit(as_operator(K), Y, lam, K_test=K_test,
                                   check=kw.get("check", True), timer=kw.get("timer"),
                                   precision=precision, diag_probes=diag_probes, seed=seed)
            fit.diagnostics["symmetry_rel"] = 0.0  # one triangle is all that is stored
            return fit
        if not hasattr(K, "ndim"):
            operator = K
            timer = kw.get("timer")
            if timer is not None:
                with timer("kernel_assembly"):
                    K = K.dense()
            else:
                K = K.dense()
            # Mirrored tiles make K symmetric by construction; measure it anyway (A.8), with
            # finiteness, in one read of K.
            from .._validate import check_kernel_matrix
            K, asym = check_kernel_matrix(K, "K")
            if getattr(operator, "dense_is_private", False):
                kw["overwrite_k"] = True  # the materialised K is ours: factor it in place
            fit = exact_fit(K, Y, lam, **kw)
            fit.diagnostics["symmetry_rel"] = asym
            return fit
        return exact_fit(K, Y, lam, **kw)
    return fit


def get_solver(requested: str):
    """(choose, fit_function) for ``requested`` in SOLVERS; validation happens in choose."""
    return partial(choose_solver, requested=requested), fit_function


__all__ = ["SOLVERS", "choose_solver", "fit_function", "get_solver"]
