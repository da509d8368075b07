"""Solver choice: exact when the float64 n x n work fits comfortably, else an approximation.

``choose_solver(K, lam, requested="auto", memory_budget=None, **options)`` returns
``(name, options, reason)``; the reason is printed by the CLI and stored in summary.json.
"""

from __future__ import annotations

from ..backend import backend_for
from ..errors import ParameterError

SOLVERS = ("auto", "exact", "nystrom", "cg")

# The exact solver holds K and one n x n working copy (factor, then its inverse).
EXACT_COPIES = 2
# "Comfortably": the exact solver may use at most this share of the budget.
COMFORT = 0.7


def exact_bytes(n: int) -> int:
    return EXACT_COPIES * 8 * n * n


def choose_solver(K, lam, *, requested: str = "auto", memory_budget: int | None = None,
                  **options):
    if requested not in SOLVERS:
        raise ParameterError(f"solver: expected one of {SOLVERS}, got {requested!r}")
    n = K.shape[0]
    if requested != "auto":
        return requested, options, f"solver={requested!r} requested"
    if memory_budget is None:
        x = K if hasattr(K, "ndim") else getattr(K, "X", None)
        memory_budget = backend_for(x).free_memory_bytes()
    need = exact_bytes(n)
    if need <= COMFORT * memory_budget:
        return "exact", options, (f"exact: n={n} needs {need / 2**30:.2f} GiB for the float64 "
                                  f"factorisation, within {COMFORT:.0%} of the "
                                  f"{memory_budget / 2**30:.1f} GiB budget")
    return "nystrom", options, (f"nystrom: exact would need {need / 2**30:.1f} GiB, over "
                                f"{COMFORT:.0%} of the {memory_budget / 2**30:.1f} GiB budget")
