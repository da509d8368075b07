"""Tiling layer (STYLE rule 10): tile sizes from a memory budget, tile index iteration.

Kernels see one tile; this module decides how big a tile is and which tiles to visit.
"""

from __future__ import annotations

import math

from .._units import format_bytes
from ..backend import Backend
from ..errors import MemoryBudgetError

# Default share of free memory a tiled routine may use for its temporaries (the output is
# counted separately): leaves room for the caller's arrays and the BLAS workspace.
DEFAULT_TEMP_FRACTION = 0.25


def tile_rows(bytes_per_row_pair: float, bytes_per_row: float, *, budget: int,
              n: int, minimum: int = 64, maximum: int = 4096) -> int:
    """Largest tile t (rows) with t^2 * bytes_per_row_pair + t * bytes_per_row <= budget.

    Clamped to [minimum, maximum] and to n. A budget too small for ``minimum`` rows still
    returns ``minimum`` (the caller's output dominates memory anyway).
    """
    a, b = float(bytes_per_row_pair), float(bytes_per_row)
    t = (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a) if a > 0 else budget / max(b, 1)
    t = int(max(minimum, min(maximum, t)))
    return max(1, min(n, t))


def tiles(n: int, t: int):
    """Row ranges (start, stop) covering 0..n in steps of t."""
    return [(s, min(n, s + t)) for s in range(0, n, t)]


def check_output_fits(shape, itemsize: int, backend: Backend, *, what: str,
                      fraction: float = 0.8):
    """Refuse up front (MemoryBudgetError) when an output of ``shape`` will not fit.

    The message gives the estimate, the budget, and for square outputs the n that would fit.
    """
    need = itemsize
    for s in shape:
        need *= int(s)
    free = backend.free_memory_bytes()
    budget = int(free * fraction)
    if need > budget:
        n_fit = None
        if len(shape) == 2 and shape[0] == shape[1]:
            n_fit = int(math.sqrt(budget / itemsize))
        hint = f"; n <= {n_fit} would fit" if n_fit else ""
        raise MemoryBudgetError(
            f"{what}: needs {format_bytes(need)} for a {'x'.join(map(str, shape))} array but "
            f"only {format_bytes(budget)} of {backend.name} memory is available{hint} "
            f"(or use solver='nystrom'/'cg', which never form the n x n matrix)",
            needed_bytes=need, budget_bytes=budget, n_fit=n_fit)
    return need
