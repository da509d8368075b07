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
# Share of free memory an output (check_output_fits), or everything a host-assembled output
# keeps on the device (its panels, temporaries and fixed arrays), may take.
OUTPUT_FRACTION = 0.8
# Largest row panel of a host-assembled output: each has a pinned host twin, and a
# device-to-host copy reaches the link's speed far below this size.
PANEL_MAX_BYTES = 256 << 20


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


_SOLVERS_WITHOUT_K = "or use solver='nystrom'/'cg', which never form the n x n matrix"


def check_output_fits(shape, itemsize: int, backend: Backend, *, what: str,
                      fraction: float = OUTPUT_FRACTION, host_out: bool = False,
                      copies: int = 1, alternative: str = _SOLVERS_WITHOUT_K):
    """Refuse up front (MemoryBudgetError) when an output of ``shape`` (``copies`` arrays of
    it at the peak, with the caller's temporaries) will not fit.

    The message gives the estimate, the budget, and for square outputs the n that would fit;
    with ``host_out`` (the caller accepts a host ``out``) on CUDA it also names assembly into
    host memory, and it ends with ``alternative``, the way round it ('' for none).
    """
    need = itemsize * copies
    for s in shape:
        need *= int(s)
    free = backend.free_memory_bytes()
    budget = int(free * fraction)
    if need > budget:
        n_fit = None
        if len(shape) == 2 and shape[0] == shape[1]:
            n_fit = int(math.sqrt(budget / (itemsize * copies)))
        hint = f"; n <= {n_fit} would fit" if n_fit else ""
        host = ""
        if host_out and backend.name == "cuda":
            host = (f"; or pass a host array out=numpy.empty({tuple(int(s) for s in shape)}) "
                    f"to assemble it tile by tile into host memory")
        raise MemoryBudgetError(
            f"{what}: needs {format_bytes(need)} for {_arrays(copies, shape)} but "
            f"only {format_bytes(budget)} of {backend.name} memory is available{hint}{host}"
            + (f" ({alternative})" if alternative else ""),
            needed_bytes=need, budget_bytes=budget, n_fit=n_fit)
    return need


def _arrays(copies: int, shape) -> str:
    """'a 3x4 array' or '3 arrays of 3x4'."""
    dims = "x".join(map(str, shape))
    return f"a {dims} array" if copies == 1 else f"{copies} arrays of {dims}"


def panel_rows(n: int, n2: int, *, budget: int, entry_bytes: int = 16,
               max_bytes: int = PANEL_MAX_BYTES, what: str) -> int:
    """Rows t of the panels an (n, n2) float64 output assembled into host memory passes
    through: the largest t with ``t * n2 * entry_bytes <= budget`` (entry_bytes: device bytes
    per panel entry, 16 for two float64 panels), a panel at most ``max_bytes``, t <= n.

    Raises MemoryBudgetError, up front, when not even one row fits.
    """
    need = int(entry_bytes) * int(n2)
    if need > budget:
        raise MemoryBudgetError(
            f"{what}: panels of one {n2}-entry row need {format_bytes(need)} of device memory "
            f"but only {format_bytes(max(budget, 0))} is left for them (use "
            f"solver='nystrom'/'cg', which never form the n x n matrix)",
            needed_bytes=need, budget_bytes=max(budget, 0))
    t = min(budget // need, max(1, int(max_bytes) // (8 * max(int(n2), 1))))
    return max(1, min(int(n), int(t)))
