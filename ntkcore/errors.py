"""Typed errors raised by ntkcore.

Every error a user can cause derives from :class:`NtkcoreError`, so a caller (and the CLI) can
catch one type and print one line. Each subclass names one kind of problem; the message says
which argument was wrong and what was expected ("expected ..., got ...").
"""

from __future__ import annotations


class NtkcoreError(Exception):
    """Base class of every error ntkcore raises on bad input or an impossible request."""


class ShapeError(NtkcoreError, ValueError):
    """Arrays whose shapes do not fit together (or a wrong number of dimensions)."""


class NonFiniteError(NtkcoreError, ValueError):
    """An input holds NaN or Inf."""


class NanError(NonFiniteError):
    """A computation produced NaN (kept distinct so callers can tell input from output)."""


class ParameterError(NtkcoreError, ValueError):
    """An option out of its range (lam <= 0, width < 1, tau outside (0, 1), ...)."""


class NotSymmetricError(NtkcoreError, ValueError):
    """A kernel matrix that should be symmetric is not (relative asymmetry above tolerance)."""


class NotPSDError(NtkcoreError, ValueError):
    """A matrix that should be positive (semi)definite is not; Cholesky failed."""


class DatasetError(NtkcoreError):
    """Base class for data problems."""


class UnknownDatasetError(DatasetError, ValueError):
    """A dataset name that ntkcore does not know."""


class DataNotFoundError(DatasetError, FileNotFoundError):
    """Dataset files are not on disk; the message names the paths tried and the fix."""


class CorruptDataError(DatasetError, ValueError):
    """A dataset file exists but cannot be parsed (bad magic number, truncated, wrong size)."""


class EmptySelectionError(DatasetError, ValueError):
    """A class selection or subset that leaves no samples."""


class MemoryBudgetError(NtkcoreError, MemoryError):
    """A request that would not fit in the memory budget; the message gives the estimate and
    the largest size (or the approximate solver) that would fit."""

    def __init__(self, message: str, *, needed_bytes: int | None = None,
                 budget_bytes: int | None = None, n_fit: int | None = None):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.budget_bytes = budget_bytes
        self.n_fit = n_fit


class BackendError(NtkcoreError, RuntimeError):
    """A requested backend (e.g. device='cuda') is not available here."""


class OutputExistsError(NtkcoreError, FileExistsError):
    """The output folder already holds results and --overwrite was not given."""


class ConvergenceError(NtkcoreError, RuntimeError):
    """An iterative solver stagnated or did not reach its tolerance (result still attached)."""

    def __init__(self, message: str, *, result=None):
        super().__init__(message)
        self.result = result


__all__ = [name for name in dir() if name.endswith("Error")]
