"""Stochastic estimate of diag(A^-1) with a control variate (for the CG solver).

Estimator (Hutchinson 1989 / Bekas, Kokiopoulou, Saad 2007, with a control variate): for
Rademacher probes z_1..z_s (entries +-1, independent) and any symmetric P^-1 whose diagonal is
known exactly (here the Nystrom approximation A_hat^-1, see nystrom.py),

    diag(A^-1) ~ diag(P^-1) + (1/s) sum_k z_k * ((A^-1 - P^-1) z_k)        (* elementwise)

is unbiased, because E[z z^T] = I gives E[z * (M z)] = diag(M) for every M. Entry j of one
sample equals M_jj + sum_{l != j} M_jl z_j z_l, so its variance is sum_{l != j} M_jl^2 with
M = A^-1 - P^-1: the better P^-1, the smaller the error. The standard error of each entry is
estimated by the sample standard deviation over probes / sqrt(s) (reported, with its median
and maximum relative to the estimate).

The estimate is then kept inside the interval every SPD matrix's inverse diagonal obeys:
1 / A_jj <= (A^-1)_jj (Cauchy-Schwarz), (A^-1)_jj <= 1 / lam for A = K + lam I, K PSD, and,
when P <= A (plain Nystrom: K - K_hat is PSD), (A^-1)_jj <= (P^-1)_jj. Entries moved onto a
bound are counted, reported, and warned about.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..backend import backend_for
from ..errors import ParameterError


def rademacher(n: int, s: int, *, seed: int = 0, xp=np):
    """(n, s) float64 matrix of independent +-1 entries (NumPy generator, moved to ``xp``)."""
    Z = np.random.default_rng(seed).integers(0, 2, size=(n, s)).astype(np.float64) * 2.0 - 1.0
    return xp.asarray(Z)


def control_variate_diag(Z, AinvZ, PinvZ, diag_P):
    """diag(A^-1) estimate and per-entry standard error from probe solves.

    Parameters
    ----------
    Z : (n, s) Rademacher probes, s >= 2.
    AinvZ : (n, s) A^-1 Z (e.g. from CG).
    PinvZ : (n, s) P^-1 Z.
    diag_P : (n,) exact diag(P^-1).

    Returns
    -------
    estimate : (n,) diag(P^-1) + mean_k z_k * ((A^-1 - P^-1) z_k)
    stderr : (n,) sample standard deviation over the s probes / sqrt(s)
    """
    s = Z.shape[1]
    if s < 2:
        raise ParameterError(f"probes: expected at least 2 probes (for a standard error), got {s}")
    xp = backend_for(Z).xp
    samples = Z * (AinvZ - PinvZ)  # (n, s): one unbiased sample of diag(A^-1 - P^-1) per column
    estimate = diag_P + samples.mean(axis=1)
    stderr = xp.std(samples, axis=1, ddof=1) / np.sqrt(s)
    return estimate, stderr


def clip_to_bounds(estimate, lower, upper, *, what: str = "diag(A^-1) estimate"):
    """Keep ``estimate`` within [lower, upper] (visible: returns the count and warns)."""
    xp = backend_for(estimate).xp
    low = estimate < lower
    high = estimate > upper
    n_clipped = int(xp.count_nonzero(low)) + int(xp.count_nonzero(high))
    if n_clipped:
        warnings.warn(f"{what}: {n_clipped} of {estimate.shape[0]} entries fell outside the "
                      f"bounds that hold for every SPD A (1/A_jj <= (A^-1)_jj, and the upper "
                      f"bound given) and were moved onto them; use more "
                      f"probes or a higher preconditioner rank", RuntimeWarning, stacklevel=3)
        estimate = xp.minimum(xp.maximum(estimate, lower), upper)
    return estimate, n_clipped


#: Warn when the median relative standard error of a diag(A^-1) estimate exceeds this: the
#: influence of point i scales with 1 / diag(A^-1)_i squared, so 5 % there is ~10 % in scores.
DIAG_SE_WARN = 0.05


def summarize_stderr(estimate, stderr, *, solver: str, advice: str, stacklevel: int) -> dict:
    """Scalar summaries of the relative standard error (for diagnostics / summary.json); a
    RuntimeWarning, from ``solver`` with ``advice``, when the median exceeds DIAG_SE_WARN,
    attributed ``stacklevel`` frames up (the caller of the public function)."""
    rel = backend_for(stderr).to_host(stderr / estimate)
    summary = {"diag_inv_rel_stderr_median": float(np.median(rel)),
               "diag_inv_rel_stderr_max": float(np.max(rel))}
    if summary["diag_inv_rel_stderr_median"] > DIAG_SE_WARN:
        warnings.warn(f"{solver}: the diag(A^-1) estimate is noisy (median relative standard "
                      f"error {summary['diag_inv_rel_stderr_median']:.2g} > {DIAG_SE_WARN}; "
                      f"scores scale with 1 / diag(A^-1)^2, so about twice that in scores); "
                      f"{advice}", RuntimeWarning, stacklevel=stacklevel + 1)
    return summary
