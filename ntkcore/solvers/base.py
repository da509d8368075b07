"""The one interface every kernel ridge solver implements (exact, Nystrom, CG).

A solver's ``fit(K, Y, lam, **options)`` returns a :class:`KRRFit` for A = K + lam I:

- ``alpha``      (n, C)  A^-1 Y                                  [B.12]
- ``diag_inv``   (n,)    diag(A^-1) (exact, or the approximation's own, or an estimate)
- ``right_solve(K_test)`` -> (T, n) K_test A^-1 (the rows of B used by LOO influence)
- ``diagnostics`` dict   A.8 checks and solver-specific error reports (never silently skipped)
- ``timings``     dict   seconds per stage

``K`` is a dense (n, n) array for the exact solver, or a kernel operator (see operator.py)
for solvers that never form the n x n matrix.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class KRRFit:
    alpha: Any
    diag_inv: Any
    right_solve: Callable[[Any], Any]
    solver: str
    diagnostics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


class Timer:
    """Accumulates wall time per named stage: ``with timer("cholesky"): ...``.

    On the GPU the caller synchronises before reading (``sync`` hook), so timings are real.
    """

    def __init__(self, sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = {}
        self._sync = sync

    @contextmanager
    def __call__(self, stage: str):
        if self._sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0
