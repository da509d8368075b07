"""Influence malleability metrics [Def 3.4, eq. 4; A.4.2; Def C.10] and the Figure 4 grouping.

The score metrics (high_influence_set, flip_rate, spearman, topk_stability) take NumPy or CuPy
scores and compute where they live, a (T, n) pair in chunks of rows (no Python loop per row,
temporaries bounded by ``ROW_CHUNK_ENTRIES``); they return Python floats
for 1-D input and arrays on the inputs' device for 2-D input. The other functions are
host-side (NumPy in, floats / NumPy out). No torch. Scores follow :func:`ntkcore.loo_influence`:
positive = helpful.

- :func:`high_influence_set`  H_tau = {i : I_i > quantile(I, 1 - tau)}            [Def 3.4]
- :func:`flip_rate`           |{i in H_tau : sign(I_orig_i) != sign(I_adv_i)}| / |H_tau| [eq. 4]
- :func:`spearman`            Spearman rho with average ranks for ties (= scipy.stats.spearmanr)
- :func:`topk_stability`      |T_K(orig) & T_K(adv)| / K                          [A.4.2]
- :func:`intrinsic_sensitivity`  S = L_K ||y||_2 / lam^2                           [Def C.10]
- :func:`kernel_lipschitz`    sampled estimate of L_K (the estimator is stated there)
- :func:`mean_ci95`           mean and 95 % t-interval over test points
- :func:`complexity_by_decile`  RKHS-norm share of each training point, grouped by influence
  decile (Figure 4, A.7)

Index correspondence: ``I_orig[i]`` and ``I_adv[i]`` must refer to the same training slot i
(the original point and whatever replaced it, e.g. its adversarial version). Callers that
remove points compare the remaining points only (see ``ntkcore.experiments.malleability``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._validate import (as_scalar, check_count, check_positive, check_seed, is_finite_number,
                        untracked)
from .backend import backend_for
from .errors import EmptySelectionError, NonFiniteError, ParameterError, ShapeError

__all__ = ["high_influence_set", "flip_rate", "spearman", "topk_stability",
           "intrinsic_sensitivity", "kernel_lipschitz", "LipschitzEstimate", "mean_ci95",
           "complexity_by_decile", "ComplexityDeciles"]


# --------------------------------------------------------------------------- validation

def _scores(a, name: str, xp, *, ndims=(1, 2)):
    """``a`` as float64 on its own device, (n,) or (T, n), real, non-empty and finite."""
    a = _real_array(a, name, xp)
    if a.ndim not in ndims:
        want = "(n,)" if ndims == (1,) else "(n,) or (T, n)"
        raise ShapeError(f"{name}: expected scores of shape {want}, got {tuple(a.shape)}")
    if a.size == 0:
        raise EmptySelectionError(f"{name}: expected at least one score, got an empty array")
    if not bool(xp.isfinite(a).all()):
        raise NonFiniteError(f"{name}: expected finite scores, got NaN or Inf")
    return a


def _real_array(a, name: str, xp=np):
    """``a`` as a float64 array; complex, string or object input is refused (casting would
    drop the imaginary part or fail deep inside), as is a ragged nesting."""
    try:
        a = xp.asarray(untracked(a))
    except (ValueError, TypeError) as exc:
        raise ShapeError(f"{name}: expected a numeric array, got {type(a).__name__} "
                         f"({exc})") from None
    if a.dtype.kind not in "biuf":
        raise ParameterError(f"{name}: expected real numbers, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def _finite(a, name: str):
    if a.size and not bool(np.isfinite(a).all()):
        raise NonFiniteError(f"{name}: expected finite values, got NaN or Inf")
    return a


def _pair(a, b, names=("a", "b")):
    """Two score arrays of one shape, (n,) or (T, n) (rows = test points), on one device;
    returns (a, b) as (T, n) rows, whether the input was 1-D, and the array module."""
    xp = backend_for(a, b).xp
    a = _scores(a, names[0], xp)
    b = _scores(b, names[1], xp)
    if a.shape != b.shape:
        raise ShapeError(f"{names[0]} and {names[1]}: expected the same shape (one score per "
                         f"training slot), got {tuple(a.shape)} and {tuple(b.shape)}")
    one_d = a.ndim == 1
    return (a[None, :], b[None, :]) if one_d else (a, b), one_d, xp


def _result(values, one_d: bool):
    """A float for 1-D input, else the (T,) array on the input's device."""
    return float(values[0]) if one_d else values


# Entries of a (rows, n) chunk scored at once: the row metrics hold about ten arrays of the
# chunk's size (sort order, ranks, run keys, ...), so this bounds them near 300 MB.
ROW_CHUNK_ENTRIES = 1 << 22


def _by_rows(fn, A, B, xp):
    """``fn(A[rows], B[rows], first_row)`` over chunks of rows, results concatenated."""
    T, n = A.shape
    step = max(1, ROW_CHUNK_ENTRIES // max(n, 1))
    parts = [fn(A[t0:t0 + step], B[t0:t0 + step], t0) for t0 in range(0, T, step)]
    return parts[0] if len(parts) == 1 else xp.concatenate(parts)


def _check_tau(tau) -> float:
    tau = as_scalar(tau)
    if not is_finite_number(tau) or not (0.0 < float(tau) < 1.0):
        raise ParameterError(f"tau: expected a number in (0, 1), got {tau!r}")
    return float(tau)


# --------------------------------------------------------------------------- Def 3.4

def _high_influence_mask(A, tau: float, xp, first_row: int = 0, rows: int = 1):
    """(T, n) mask of H_tau for each row of A [Def 3.4]; every row must select something
    (``first_row`` / ``rows``: where A sits in the caller's rows, for the message)."""
    q = xp.quantile(A, 1.0 - tau, axis=1, keepdims=True)
    mask = A > q
    count = mask.sum(axis=1)
    empty = xp.flatnonzero(count == 0)
    if empty.size:
        t = int(empty[0])
        where = f" (row {first_row + t})" if rows > 1 else ""
        raise EmptySelectionError(
            f"I: no score exceeds its {1 - tau:.3g}-quantile {float(q[t, 0]):.6g}{where} (all "
            f"scores tied?), so the high-influence set is empty")
    return mask, count


def high_influence_set(I, tau: float = 0.1):
    """Indices of the high-influence set H_tau = {i : I_i > quantile(I, 1 - tau)} [Def 3.4].

    Parameters
    ----------
    I : (n,) array of influence scores (positive = helpful), NumPy or CuPy.
    tau : float in (0, 1), default 0.1
        Selection threshold (0.1 = top 10 %). The quantile is NumPy's default (linear
        interpolation), and the inequality is strict, exactly as in Def 3.4; with n = 1000 and
        no ties |H| = 100.

    Returns
    -------
    (|H|,) int64 indices, ascending, on I's device.

    Raises
    ------
    EmptySelectionError
        No score exceeds the quantile (e.g. all scores tied).
    """
    xp = backend_for(I).xp
    I = _scores(I, "I", xp, ndims=(1,))
    mask, _ = _high_influence_mask(I[None, :], _check_tau(tau), xp)
    return xp.flatnonzero(mask[0])


def flip_rate(I_orig, I_adv, tau: float = 0.1):
    """Influence flip rate [Def 3.4, eq. 4]: share of H_tau(I_orig) whose sign changes.

    FlipRate = |{i in H_tau : sign(I_orig_i) != sign(I_adv_i)}| / |H_tau|, with
    H_tau = :func:`high_influence_set` (I_orig, tau). ``sign`` is NumPy's (sign(0) = 0, so a
    score that becomes exactly 0 counts as a flip). H_tau is the top-tau quantile of the
    signed scores, as Def 3.4 defines it; A.4.2's "top 10% positive influence" is not enforced
    (the two differ only when fewer than tau n scores are positive; ``ntkcore malleability``
    reports the positive share of H as ``positive_share_of_H``).

    Parameters
    ----------
    I_orig, I_adv : (n,) or (T, n) arrays, NumPy or CuPy (computed where they live)
        Original and perturbed scores of the same training slots (``I_adv[..., i]`` is the score
        of whatever occupies slot i after the intervention, e.g. the adversarial version of
        point i). A (T, n) pair is scored row by row (one test point per row).
    tau : float in (0, 1), default 0.1

    Returns
    -------
    float in [0, 1] for 1-D input; (T,) array for 2-D input (on the inputs' device).
    """
    tau = _check_tau(tau)
    (A, B), one_d, xp = _pair(I_orig, I_adv, ("I_orig", "I_adv"))

    def rows(A, B, t0):
        mask, count = _high_influence_mask(A, tau, xp, t0, rows=0 if one_d else 2)
        return ((xp.sign(A) != xp.sign(B)) & mask).sum(axis=1) / count
    return _result(_by_rows(rows, A, B, xp), one_d)


# --------------------------------------------------------------------------- ranks

def _average_ranks(A, xp):
    """Row-wise ranks 1..n of (T, n) A, tied values sharing the mean of their ranks (scipy's
    method='average'), without a Python loop over rows.

    Within each sorted row, runs of equal values get run numbers 1, 2, ...; with the row
    offset t (n + 1) added they form one ascending key over all rows, so two searchsorted
    calls give every entry's run start and end at once.
    """
    T, n = A.shape
    order = xp.argsort(A, axis=1, kind="stable")
    S = xp.take_along_axis(A, order, axis=1)
    new_run = xp.ones((T, n), dtype=bool)
    new_run[:, 1:] = S[:, 1:] != S[:, :-1]
    key = (xp.cumsum(new_run, axis=1) + (xp.arange(T) * (n + 1))[:, None]).ravel()
    row_start = (xp.arange(T) * n)[:, None]
    first = xp.searchsorted(key, key, side="left").reshape(T, n) - row_start  # run start
    stop = xp.searchsorted(key, key, side="right").reshape(T, n) - row_start  # run end, excl.
    ranks = xp.empty((T, n), dtype=np.float64)
    ranks[xp.arange(T)[:, None], order] = (first + 1 + stop) / 2.0  # mean of first+1..stop
    return ranks


def spearman(a, b):
    """Spearman rank correlation rho between two score vectors [A.4.2].

    Pearson correlation of the average ranks (ties share the mean of their ranks), which equals
    ``scipy.stats.spearmanr(a, b).statistic`` and, without ties, the A.4.2 formula
    1 - 6 sum d_i^2 / (n (n^2 - 1)).

    Parameters
    ----------
    a, b : (n,) or (T, n) arrays, NumPy or CuPy (rows scored separately, in chunks of rows)

    Returns
    -------
    float in [-1, 1] (NaN when either input is constant or n < 2); (T,) array for 2-D input.
    """
    (A, B), one_d, xp = _pair(a, b)

    def rows(A, B, t0):
        ra = _average_ranks(A, xp)
        rb = _average_ranks(B, xp)
        ra -= ra.mean(axis=1, keepdims=True)
        rb -= rb.mean(axis=1, keepdims=True)
        num = (ra * rb).sum(axis=1)
        den = xp.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            # a constant input has no ranking: NaN, as scipy returns
            return xp.where(den > 0, xp.clip(num / den, -1.0, 1.0), xp.nan)
    return _result(_by_rows(rows, A, B, xp), one_d)


def topk_stability(a, b, k: int):
    """Top-K stability |T_K(a) & T_K(b)| / K [A.4.2].

    T_K(v) are the indices of the K largest scores (the K most helpful training points); ties
    at the boundary are broken by the lower index (stable sort), so the result is deterministic.

    Parameters
    ----------
    a, b : (n,) or (T, n) arrays over the same training slots, NumPy or CuPy.
    k : int, 1 <= k <= n

    Returns
    -------
    float in [0, 1]; (T,) array for 2-D input (on the inputs' device).
    """
    (A, B), one_d, xp = _pair(a, b)
    n = A.shape[1]
    k = check_count(k, "k")  # an integer >= 1; 2.0 counts, as for loo_influence's top_k
    if k > n:
        raise ParameterError(f"k: expected an integer in 1..{n}, got {k!r}")

    def rows(A, B, t0):
        idx = xp.arange(A.shape[0])[:, None]
        in_a = xp.zeros(A.shape, dtype=bool)
        in_b = xp.zeros(A.shape, dtype=bool)
        in_a[idx, xp.argsort(-A, axis=1, kind="stable")[:, :k]] = True
        in_b[idx, xp.argsort(-B, axis=1, kind="stable")[:, :k]] = True
        return (in_a & in_b).sum(axis=1) / k
    return _result(_by_rows(rows, A, B, xp), one_d)


# --------------------------------------------------------------------------- Def C.10

def intrinsic_sensitivity(L_K: float, y, lam: float) -> float:
    """Intrinsic influence sensitivity S(K, lam, y) = L_K ||y||_2 / lam^2 [Def C.10].

    Parameters
    ----------
    L_K : float >= 0
        Kernel Lipschitz constant sup_{||delta||_2 <= 1} ||k(x + delta) - k(x)||_2 [Thm C.9]
        (see :func:`kernel_lipschitz` for the estimator the experiments use).
    y : (n,) or (n, C) targets; ||y||_2 is the Euclidean (Frobenius) norm of all entries.
    lam : float > 0, ridge.
    """
    if not (is_finite_number(L_K) and L_K >= 0):
        raise ParameterError(f"L_K: expected a finite number >= 0, got {L_K!r}")
    lam = check_positive(lam, "lam")  # finite: lam = inf would give S = 0 silently
    y = _real_array(y, "y")
    if not np.isfinite(y).all():
        raise NonFiniteError("y: expected finite targets, got NaN or Inf")
    if L_K == 0 or not y.size:
        return 0.0
    top = float(np.abs(y).max())  # ||y|| = top ||y / top||: no overflow in the squares
    norm = top * float(np.linalg.norm(y.ravel() / top)) if top > 0 else 0.0
    # mantissas and exponents apart: lam^2 alone may underflow to 0, and L_K / lam overflow
    # where L_K ||y|| / lam^2 does not
    (m1, e1), (m2, e2), (m3, e3) = (math.frexp(v) for v in (float(L_K), norm, float(lam)))
    try:
        value = math.ldexp(m1 * m2 / (m3 * m3), e1 + e2 - 2 * e3)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise NonFiniteError(f"intrinsic_sensitivity: L_K ||y|| / lam^2 overflows float64 "
                             f"(L_K={L_K!r}, ||y||={norm:.3g}, lam={lam!r})")
    return value


@dataclass
class LipschitzEstimate:
    """Result of :func:`kernel_lipschitz`.

    Attributes
    ----------
    value : float, the estimate of L_K (max over points and directions).
    per_point : (s,) max ratio at each sampled point.
    jacobian_norm : (s,) spectral norm of the local Jacobian at each point (NaN without one).
    h : float, finite-difference step.
    n_random : int, random directions per point.
    estimator : str, one-line statement of the estimator.
    """

    value: float
    per_point: np.ndarray
    jacobian_norm: np.ndarray
    h: float
    n_random: int
    estimator: str = ""
    extra: dict = field(default_factory=dict)


def kernel_lipschitz(kernel_rows, points, *, jacobian=None, n_random: int = 8,
                     h: float = 1e-2, seed: int = 0) -> LipschitzEstimate:
    """Estimate L_K = sup ||k(x + delta) - k(x)||_2 / ||delta||_2 by sampled finite differences.

    Estimator (a lower bound on the true supremum, since it samples): for every point x in
    ``points`` and every unit direction u in a set D(x), the ratio
    ||k(x + h u) - k(x)||_2 / h is computed with the exact kernel, and L_K is the maximum.
    D(x) holds ``n_random`` seeded Gaussian directions normalised to unit L2 norm, plus, when
    ``jacobian`` is given, the top right singular vector of the local Jacobian dk/dx at x (the
    direction of steepest change of the kernel row; "the gradient direction"). Its spectral
    norm is reported too. For a finite-width ReLU eNTK the kernel jumps where an activation
    flips; finite differences at step h include those jumps at scale h, the Jacobian does not.

    Parameters
    ----------
    kernel_rows : callable, (q, d) array -> (q, n) array
        Kernel rows k(x) = [K(x, x_1), ..., K(x, x_n)] against the fixed training set.
    points : (s, d) array of base points x.
    jacobian : callable, (d,) array -> (n, d) array, optional
        Local Jacobian of k at x.
    n_random : int >= 0, default 8
    h : float > 0, default 1e-2
        Step (in the units of x; model inputs have unit norm, so 1e-2 is 1 % of ||x||).
    seed : int, default 0

    Returns
    -------
    LipschitzEstimate
    """
    P = _real_array(points, "points")
    if P.ndim != 2 or P.shape[0] < 1:
        raise ShapeError(f"points: expected a non-empty 2-D array (s, d), got shape {P.shape}")
    _finite(P, "points")
    h = check_positive(h, "h")
    n_random = check_count(n_random, "n_random", minimum=0)
    seed = None if seed is None else check_seed(seed)  # None: fresh entropy, as NumPy's
    if n_random == 0 and jacobian is None:
        raise ParameterError("n_random: expected >= 1 random direction when no jacobian is given")
    s, d = P.shape
    rng = np.random.default_rng(seed)
    per_point = np.empty(s)
    jac_norm = np.full(s, np.nan)
    for j in range(s):
        x = P[j]
        dirs = []
        if jacobian is not None:
            J = _real_array(jacobian(x), "jacobian(x)")
            _finite(J, "jacobian(x)")
            _, sv, vt = np.linalg.svd(J, full_matrices=False)
            jac_norm[j] = float(sv[0])
            dirs.append(vt[0])
        if n_random:
            R = rng.standard_normal((int(n_random), d))
            R /= np.linalg.norm(R, axis=1, keepdims=True)
            dirs.extend(R)
        D = np.asarray(dirs)
        rows = _real_array(kernel_rows(np.vstack([x[None, :], x[None, :] + h * D])),
                           "kernel_rows(x)")
        _finite(rows, "kernel_rows(x)")
        diff = rows[1:] - rows[0][None, :]
        per_point[j] = float(np.max(np.linalg.norm(diff, axis=1)) / h)
    desc = (f"max over {s} points x and {int(n_random)} random unit directions"
            f"{' + the top singular direction of dk/dx' if jacobian is not None else ''}"
            f" of ||k(x + h u) - k(x)||_2 / h, h = {h:g}")
    return LipschitzEstimate(value=float(per_point.max()), per_point=per_point,
                             jacobian_norm=jac_norm, h=float(h), n_random=int(n_random),
                             estimator=desc)


#: finite-difference steps of :func:`lipschitz_by_step` (model inputs have unit norm).
LIPSCHITZ_STEPS = (1.0, 0.1, 0.01, 0.001)


def lipschitz_by_step(kernel_rows, points, *, steps=LIPSCHITZ_STEPS, n_random: int = 8,
                      seed: int = 0) -> dict:
    """{h: L_K estimate at step h} from :func:`kernel_lipschitz` (random directions only, the
    same seeded directions at every step).

    Why a profile: a finite-width ReLU eNTK is piecewise smooth and jumps where an activation
    flips, so ||k(x + h u) - k(x)|| / h has no limit that bounds it: it follows the Jacobian
    for steps that cross no flip, grows like 1/h for steps that cross one, and averages over
    many flips at h ~ 1 (the paper's sup over ||delta|| <= 1). An S compares across
    architectures only at the same h; the profile shows how much it moves with h.
    """
    return {float(h): kernel_lipschitz(kernel_rows, points, n_random=n_random, h=h,
                                       seed=seed).value for h in steps}


# --------------------------------------------------------------------------- intervals

def mean_ci95(values) -> dict:
    """Mean and 95 % confidence interval (Student t, n - 1 degrees of freedom).

    half = t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1). NaN values
    (an undefined metric for some test point) are dropped and counted.

    Returns
    -------
    dict with ``mean``, ``lo``, ``hi``, ``half_width``, ``n`` (values used), ``n_nan``
    (dropped). With n = 1 the interval is NaN; with n = 0 everything is NaN.

    Raises
    ------
    ParameterError : complex or non-numeric values. NonFiniteError : an infinite value.
    """
    from scipy.stats import t as student_t

    if isinstance(values, (list, tuple)):  # None marks an undefined value, as NaN does
        values = [np.nan if v is None else v for v in values]
    v = _real_array(values, "values").ravel()
    if bool(np.isinf(v).any()):
        raise NonFiniteError("values: expected finite values or NaN (dropped), got Inf")
    keep = ~np.isnan(v)
    n_nan = int((~keep).sum())
    v = v[keep]
    n = int(v.size)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "lo": nan, "hi": nan, "half_width": nan, "n": 0, "n_nan": n_nan}
    mean = float(v.mean())
    half = float(student_t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n)) if n > 1 \
        else float("nan")
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "half_width": half, "n": n,
            "n_nan": n_nan}


# --------------------------------------------------------------------------- Figure 4

@dataclass
class ComplexityDeciles:
    """Output of :func:`complexity_by_decile` (group 1 = most harmful, last = most helpful).

    Attributes
    ----------
    complexity : (n,) per-point contribution c_i = alpha_i . (K alpha)_i.
    influence : (n,) per-point influence (mean over the given test points).
    group : (n,) int group 0..g-1 of each training point.
    mean_complexity, mean_influence : (g,) group means.
    total_complexity : float, sum_i c_i = tr(alpha^T K alpha) = ||f||_H^2.
    """

    complexity: np.ndarray
    influence: np.ndarray
    group: np.ndarray
    mean_complexity: np.ndarray
    mean_influence: np.ndarray
    total_complexity: float


def complexity_by_decile(K, alpha, scores, *, n_groups: int = 10, Y=None,
                         lam=None) -> ComplexityDeciles:
    """Contribution of each training point to model complexity, by influence group [A.7, Fig 4].

    The KRR predictor f = sum_i alpha_i k(., x_i) has squared RKHS norm
    ||f||_H^2 = tr(alpha^T K alpha) = sum_i c_i with c_i = alpha_i . (K alpha)_i (dot over the
    C outputs). c_i is point i's share of that norm, the "contribution to model complexity".
    Training points are sorted by their influence (the mean of ``scores`` over test points,
    ascending: group 1 most harmful, group ``n_groups`` most helpful) and cut into
    ``n_groups`` groups of (almost) equal size (``np.array_split`` of the sorted order).

    Parameters
    ----------
    K : (n, n) training kernel matrix (without the ridge), or None with ``Y`` and ``lam``:
        then K alpha = Y - lam alpha (exact for the fit that produced alpha), no kernel needed.
    alpha : (n,) or (n, C) dual coefficients (K + lam I)^-1 Y.
    scores : (n,) or (T, n) influence scores (positive = helpful).
    n_groups : int, default 10 (deciles)
    """
    alpha = _real_array(alpha, "alpha")
    if alpha.ndim not in (1, 2):
        raise ShapeError(f"alpha: expected shape (n,) or (n, C), got {alpha.shape}")
    if alpha.ndim == 1:
        alpha = alpha[:, None]
    S = _real_array(scores, "scores")
    S = S[None, :] if S.ndim == 1 else S
    n = alpha.shape[0]
    if K is None:
        # (K + lam I) alpha = Y  =>  K alpha = Y - lam alpha: no kernel needed.
        if Y is None or lam is None:
            raise ParameterError("K=None needs Y and lam (K alpha = Y - lam alpha)")
        lam = check_positive(lam, "lam")
        Y = _real_array(Y, "Y")
        if Y.reshape(Y.shape[0] if Y.ndim else 1, -1).shape != alpha.shape or Y.ndim > 2:
            raise ShapeError(f"Y and alpha: expected the same shape (n,) or (n, C), got "
                             f"{Y.shape} and {alpha.shape}")
        _finite(Y, "Y")
        K_alpha = Y.reshape(alpha.shape) - lam * alpha
        k_shape = None  # no kernel on this route (nothing n x n is allocated)
    else:
        K = _real_array(K, "K")
        K_alpha = None
        k_shape = K.shape
    if (K_alpha is None and k_shape != (n, n)) or S.ndim != 2 or S.shape[1] != n:
        raise ShapeError(f"K, alpha, scores: expected (n, n), (n, C), (T, n) with one n, got "
                         f"{k_shape}, {alpha.shape}, {S.shape}")
    if isinstance(n_groups, (bool, np.bool_)) or not isinstance(n_groups, (int, np.integer)) \
            or not 1 <= n_groups <= n:
        raise ParameterError(f"n_groups: expected an integer in 1..{n}, got {n_groups!r}")
    _finite(alpha, "alpha")
    _finite(S, "scores")
    if K is not None:
        _finite(K, "K")
    c = np.einsum("ic,ic->i", alpha, K @ alpha if K_alpha is None else K_alpha)
    infl = S.mean(axis=0)
    order = np.argsort(infl, kind="mergesort")
    group = np.empty(n, dtype=np.int64)
    parts = np.array_split(order, int(n_groups))
    for g, idx in enumerate(parts):
        group[idx] = g
    mc = np.array([c[idx].mean() for idx in parts])
    mi = np.array([infl[idx].mean() for idx in parts])
    return ComplexityDeciles(complexity=c, influence=infl, group=group, mean_complexity=mc,
                             mean_influence=mi, total_complexity=float(c.sum()))
