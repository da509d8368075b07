"""Boundary validation shared by the public functions (STYLE rule 3: validate once, at the edge).

Messages name the argument and say "expected ..., got ...". Inner loops and kernels validate
nothing.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import is_gpu_array
from .errors import NonFiniteError, NotSymmetricError, ParameterError, ShapeError


def _xp(a):
    if is_gpu_array(a):
        import cupy
        return cupy
    import numpy
    return numpy


def untracked(a):
    """A torch tensor without its autograd history (NumPy refuses a tensor that requires
    grad), bfloat16 widened to float32 (NumPy has no bfloat16); anything else unchanged."""
    detach = getattr(a, "detach", None)
    if callable(detach) and type(a).__module__.startswith("torch"):
        a = detach()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()  # exact: every bfloat16 is a float32
    return a


def is_kernel_operator(K) -> bool:
    """True for a kernel operator (``shape``, ``diag()``, ``columns(idx)``, see
    solvers.operator); anything else is read as an array."""
    return all(callable(getattr(K, f, None)) for f in ("diag", "columns")) \
        and hasattr(K, "shape") and not hasattr(K, "ndim")


def as_float_matrix(a, name: str, *, ndim: int = 2, dtype=None, allow_1d: bool = False):
    """Return ``a`` as a floating array of ``ndim`` dims on its own device, finite-checked.

    Integer/bool input, float16 and long double become float64; float32 stays float32
    unless ``dtype`` is given.
    A 1-D input with ``allow_1d`` becomes a column (n,) -> (n, 1).
    """
    a = _as_float(a, name, ndim=ndim, dtype=dtype, allow_1d=allow_1d)
    if not all_finite(a):
        raise NonFiniteError(_non_finite_message(name))
    return a


def _as_float(a, name: str, *, ndim: int = 2, dtype=None, allow_1d: bool = False):
    """:func:`as_float_matrix` without its finiteness check."""
    xp = _xp(a)
    try:
        a = xp.asarray(untracked(a))
    except (ValueError, TypeError) as exc:  # ragged nested lists, unconvertible objects
        raise ShapeError(f"{name}: expected a {ndim}-D numeric array, got {type(a).__name__} "
                         f"({exc})") from None
    if a.dtype.kind not in "biuf":
        raise ParameterError(f"{name}: expected real numbers, got dtype {a.dtype}")
    if allow_1d and a.ndim == 1:
        a = a[:, None]
    if a.ndim != ndim:
        raise ShapeError(f"{name}: expected a {ndim}-D array, got shape {tuple(a.shape)}")
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    elif a.dtype not in (xp.float64, xp.float32):  # integers, bools, float16, long double
        a = a.astype(xp.float64)
    return a


def _non_finite_message(name: str) -> str:
    return f"{name}: expected finite values, got NaN or Inf"


def check_rows(a, b, name_a: str, name_b: str):
    if a.shape[0] != b.shape[0]:
        raise ShapeError(f"{name_a} and {name_b}: inconsistent numbers of samples: "
                         f"[{a.shape[0]}, {b.shape[0]}]")


def check_cols(a, b, name_a: str, name_b: str):
    if a.shape[1] != b.shape[1]:
        raise ShapeError(f"{name_a} and {name_b}: inconsistent feature dimensions: "
                         f"[{a.shape[1]}, {b.shape[1]}]")


def check_min_cols(a, name: str, what: str = "feature column (d >= 1)"):
    """ShapeError unless the 2-D ``a`` has at least one column (``what`` names it)."""
    if a.shape[1] < 1:
        raise ShapeError(f"{name}: expected at least one {what}, got shape {tuple(a.shape)}")
    return a


def may_share_memory(a, b) -> bool:
    """Whether two arrays of one device may overlap in memory (a bounds check, no scan)."""
    if is_gpu_array(a) != is_gpu_array(b):
        return False
    return bool(_xp(a).may_share_memory(a, b))


def shares_memory(a, b) -> bool:
    """Whether two arrays of one device overlap: exactly for NumPy (two column blocks of one
    matrix do not overlap, though their bounds do), by bounds for CuPy; a NumPy check too
    costly to settle counts as overlapping."""
    if is_gpu_array(a) != is_gpu_array(b):
        return False
    if is_gpu_array(a):
        return may_share_memory(a, b)
    try:
        return bool(np.shares_memory(a, b, max_work=1 << 20))
    except np.exceptions.TooHardError:
        return True


#: entries per block of :func:`all_finite` (a boolean temporary of at most 16 MB)
FINITE_CHECK_ENTRIES = 1 << 24


def all_finite(a) -> bool:
    """Whether every entry of ``a`` is finite: one pass by row blocks, so the boolean
    temporary stays under FINITE_CHECK_ENTRIES bytes for any size."""
    if a.size == 0:
        return True
    xp = _xp(a)
    if a.ndim == 0:
        return bool(xp.isfinite(a))
    rows = max(1, FINITE_CHECK_ENTRIES // max(1, a.size // a.shape[0]))
    return all(bool(xp.isfinite(a[i0:i0 + rows]).all()) for i0 in range(0, a.shape[0], rows))


def check_result_finite(out, what: str):
    """``out``, or NonFiniteError when it holds NaN or Inf.

    For results computed from inputs already checked finite: a NaN or Inf there is float
    overflow. One pass over ``out`` by row blocks (a bounded temporary, any size). Call sites
    compute under ``np.errstate(over="ignore", invalid="ignore")`` so that the error, not
    NumPy's RuntimeWarning, reports it.
    """
    if not all_finite(out):
        raise NonFiniteError(f"{what}: the result overflowed {out.dtype} (NaN or Inf from "
                             f"finite inputs); rescale the inputs")
    return out


def as_scalar(value):
    """A 0-d array (NumPy's or CuPy's, e.g. a reduction's result) as its Python number;
    anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def is_real_number(value) -> bool:
    """A real number that is not a bool (after :func:`as_scalar`)."""
    value = as_scalar(value)
    return not isinstance(value, (bool, np.bool_)) and isinstance(
        value, (int, float, np.integer, np.floating))


def is_finite_number(value) -> bool:
    """A real number (not a bool) that is finite as a float64: an int past float64's range
    (about 1.8e308) is not, where ``math.isfinite`` would raise OverflowError on it."""
    value = as_scalar(value)
    if not is_real_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


#: the largest count accepted: counts index NumPy / torch int64 arrays
COUNT_MAX = 2**63 - 1


def check_positive(value, name: str) -> float:
    """``value`` as a float, or ParameterError unless it is a finite real number > 0."""
    value = as_scalar(value)
    if not is_real_number(value):
        raise ParameterError(f"{name}: expected a number > 0, got {value!r}")
    if not (is_finite_number(value) and value > 0):
        raise ParameterError(f"{name}: expected a finite value > 0, got {_shown(value)}")
    return float(value)


def check_nonnegative(value, name: str) -> float:
    """``value`` as a float, or ParameterError unless it is a finite real number >= 0."""
    if not (is_finite_number(value) and as_scalar(value) >= 0):
        raise ParameterError(f"{name}: expected a finite value >= 0, got {_shown(value)}")
    return float(as_scalar(value))


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int in [0, 2^63) (torch's and NumPy's seeds), else ParameterError."""
    return check_count(seed, name, minimum=0)


def check_count(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, or ParameterError unless it is an integer in [``minimum``,
    COUNT_MAX] (a float with an integer value, such as 20.0, counts; 2.5 does not)."""
    value = as_scalar(value)
    whole = is_finite_number(value) and float(value).is_integer()
    if not whole or not minimum <= value <= COUNT_MAX:
        big = is_real_number(value) and value > COUNT_MAX
        raise ParameterError(f"{name}: expected an integer >= {minimum}"
                             f"{' and at most 2^63 - 1' if big else ''}, got {_shown(value)}")
    return int(value)


def _shown(value) -> str:
    """``repr(value)``, shortened for a number of hundreds of digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:12]}...({len(text)} digits)"


#: the most training epochs accepted (the paper trains 500); far more only overflowed
#: inside the progress bar, after the data had been loaded
MAX_EPOCHS = 1_000_000


def check_epochs(value, name: str = "epochs") -> int:
    """``value`` as an int, or ParameterError unless it is an integer in [0, MAX_EPOCHS]."""
    value = check_count(value, name, minimum=0)
    if value > MAX_EPOCHS:
        raise ParameterError(f"{name}: expected at most {MAX_EPOCHS:,}, got {value!r}")
    return value


def check_flag(value, name: str) -> bool:
    """``value`` as a bool, or ParameterError unless it is True/False (or 0/1)."""
    value = as_scalar(value)
    if not (isinstance(value, (bool, np.bool_, int, np.integer)) and value in (0, 1)):
        raise ParameterError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_square_symmetric(K, name: str = "K", *, rtol: float | None = None):
    """Raise unless K is square and symmetric to ``rtol`` relative (Frobenius) asymmetry.

    Returns the measured relative asymmetry ||K - K^T||_F / ||K||_F (the A.8 symmetry check).
    Default rtol: 1e3 * eps(dtype), loose enough for kernels assembled in tiles.
    """
    _check_square(K, name)
    xp = _xp(K)
    scale = 1.0
    norm = _frobenius_norm(K, xp)
    if not 2.0 ** -300 < norm < math.inf:  # squares left float64, or K = 0, or not finite
        if not all_finite(K):
            raise NonFiniteError(_non_finite_message(name))
        from .kernels.validation import max_abs
        top = max_abs(K)
        if top > 0:  # an exact power of two brings max |K| to [0.5, 1)
            scale = math.ldexp(1.0, -math.frexp(top)[1])
            norm = _frobenius_norm(K, xp, scale)
    asym = _asymmetry_norm(K, xp, scale) / norm if norm > 0 else 0.0
    return _check_asymmetry(asym, K.dtype, name, rtol)


def check_kernel_matrix(K, name: str = "K", *, dtype=None, rtol: float | None = None):
    """(K, asym): ``K`` as a square float matrix on its own device, checked finite and
    symmetric in one read of it.

    The checks of :func:`as_float_matrix` (same conversions, ``dtype`` as there) and of
    :func:`check_square_symmetric` (same ``rtol``, same errors and messages) fused: one
    :func:`ntkcore.kernels.square_matrix_stats` pass gives finiteness, ||K||_F and
    ||K - K^T||_F. NonFiniteError comes before ShapeError (not square) and NotSymmetricError.
    ``asym`` is the relative asymmetry ||K - K^T||_F / ||K||_F (0 for K = 0). A strided view
    (neither C- nor F-contiguous) takes the two separate blocked passes instead.
    """
    K = _as_float(K, name, dtype=dtype)
    if K.shape[0] != K.shape[1] or not (K.flags.c_contiguous or K.flags.f_contiguous) \
            or K.dtype not in (np.float64, np.float32):
        if not all_finite(K):
            raise NonFiniteError(_non_finite_message(name))
        return K, check_square_symmetric(K, name, rtol=rtol)
    from .kernels.validation import square_matrix_stats
    stats = square_matrix_stats(K)
    if not stats.finite:
        raise NonFiniteError(_non_finite_message(name))
    return K, _check_asymmetry(stats.rel_asymmetry, K.dtype, name, rtol)


def _check_square(K, name: str):
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ShapeError(f"{name}: expected a square matrix, got shape {tuple(K.shape)}")


def _check_asymmetry(asym: float, dtype, name: str, rtol: float | None) -> float:
    """``asym``, or NotSymmetricError when it exceeds ``rtol`` (default 1e3 * eps(dtype))."""
    if rtol is None:
        rtol = 1e3 * float(np.finfo(dtype).eps)
    if asym > rtol:
        raise NotSymmetricError(f"{name}: expected a symmetric kernel matrix, got relative "
                                f"asymmetry ||K - K^T||_F / ||K||_F = {asym:.3g} > {rtol:.1g}")
    return asym


def _frobenius_norm(K, xp, scale: float = 1.0, rows: int = 2048) -> float:
    """||scale K||_F; by row blocks on the GPU (CuPy's norm squares K into a full temporary)
    and whenever K is scaled (no n x n temporary)."""
    if xp.__name__ == "numpy" and scale == 1.0:
        return float(xp.linalg.norm(K))
    total = 0.0
    for i0 in range(0, K.shape[0], rows):
        blk = K[i0:i0 + rows] * scale
        total += float((blk * blk).sum())
    return total ** 0.5


def _asymmetry_norm(K, xp, scale: float = 1.0, tile: int = 2048) -> float:
    """||scale (K - K^T)||_F over the upper tiles only: O(tile^2) temporaries, never n x n
    (each tile scaled before the difference, which could overflow otherwise)."""
    n = K.shape[0]
    total = 0.0
    for i0 in range(0, n, tile):
        i1 = min(n, i0 + tile)
        for j0 in range(i0, n, tile):
            j1 = min(n, j0 + tile)
            d = K[i0:i1, j0:j1] * scale - K[j0:j1, i0:i1].T * scale
            total += (1.0 if i0 == j0 else 2.0) * float((d * d).sum())
    return total ** 0.5
