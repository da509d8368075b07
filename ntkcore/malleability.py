"""Influence malleability metrics [Def 3.4, eq. 4; A.4.2; Def C.10] and the Figure 4 grouping.

All functions take NumPy (or array-like) scores and return Python floats / NumPy arrays; no
torch. Scores follow :func:`ntkcore.loo_influence`: positive = helpful.

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

from .errors import EmptySelectionError, NonFiniteError, ParameterError, ShapeError

__all__ = ["high_influence_set", "flip_rate", "spearman", "topk_stability",
           "intrinsic_sensitivity", "kernel_lipschitz", "LipschitzEstimate", "mean_ci95",
           "complexity_by_decile", "ComplexityDeciles"]


# --------------------------------------------------------------------------- validation

def _vector(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 1:
        raise ShapeError(f"{name}: expected a 1-D array of scores (n,), got shape {a.shape}")
    if a.size == 0:
        raise EmptySelectionError(f"{name}: expected at least one score, got an empty array")
    if not np.isfinite(a).all():
        raise NonFiniteError(f"{name}: expected finite scores, got NaN or Inf")
    return a


def _pair(a, b, names=("a", "b")):
    """Validate two score arrays of the same shape: (n,) or (T, n) (rows = test points)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim not in (1, 2):
        raise ShapeError(f"{names[0]}: expected shape (n,) or (T, n), got {a.shape}")
    if a.shape != b.shape:
        raise ShapeError(f"{names[0]} and {names[1]}: expected the same shape (one score per "
                         f"training slot), got {a.shape} and {b.shape}")
    return a, b


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not (0.0 < float(tau) < 1.0):
        raise ParameterError(f"tau: expected a value in (0, 1), got {tau!r}")
    return float(tau)


# --------------------------------------------------------------------------- Def 3.4

def high_influence_set(I, tau: float = 0.1) -> np.ndarray:
    """Indices of the high-influence set H_tau = {i : I_i > quantile(I, 1 - tau)} [Def 3.4].

    Parameters
    ----------
    I : (n,) array of influence scores (positive = helpful).
    tau : float in (0, 1), default 0.1
        Selection threshold (0.1 = top 10 %). The quantile is NumPy's default (linear
        interpolation), and the inequality is strict, exactly as in Def 3.4; with n = 1000 and
        no ties |H| = 100.

    Returns
    -------
    (|H|,) int64 indices, ascending.

    Raises
    ------
    EmptySelectionError
        No score exceeds the quantile (e.g. all scores tied).
    """
    I = _vector(I, "I")
    tau = _check_tau(tau)
    q = np.quantile(I, 1.0 - tau)
    H = np.flatnonzero(I > q)
    if H.size == 0:
        raise EmptySelectionError(
            f"I: no score exceeds its {1 - tau:.3g}-quantile {q:.6g} (all scores tied?), so the "
            f"high-influence set is empty")
    return H


def _flip_rate_1d(a, b, tau):
    H = high_influence_set(a, tau)
    return float(np.mean(np.sign(a[H]) != np.sign(b[H])))


def flip_rate(I_orig, I_adv, tau: float = 0.1):
    """Influence flip rate [Def 3.4, eq. 4]: share of H_tau(I_orig) whose sign changes.

    FlipRate = |{i in H_tau : sign(I_orig_i) != sign(I_adv_i)}| / |H_tau|, with
    H_tau = :func:`high_influence_set` (I_orig, tau). ``sign`` is NumPy's (sign(0) = 0, so a
    score that becomes exactly 0 counts as a flip).

    Parameters
    ----------
    I_orig, I_adv : (n,) or (T, n) arrays
        Original and perturbed scores of the same training slots (``I_adv[..., i]`` is the score
        of whatever occupies slot i after the intervention, e.g. the adversarial version of
        point i). A (T, n) pair is scored row by row (one test point per row).
    tau : float in (0, 1), default 0.1

    Returns
    -------
    float in [0, 1] for 1-D input; (T,) array for 2-D input.
    """
    a, b = _pair(I_orig, I_adv, ("I_orig", "I_adv"))
    if a.ndim == 1:
        return _flip_rate_1d(a, _vector(b, "I_adv"), tau)
    return np.array([_flip_rate_1d(a[t], _vector(b[t], "I_adv"), tau)
                     for t in range(a.shape[0])])


# --------------------------------------------------------------------------- ranks

def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (scipy's method='average')."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    n = a.size
    # start of each run of equal values in sorted order
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n)  # exclusive
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def _spearman_1d(a, b):
    ra = _average_ranks(a)
    rb = _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    if den == 0.0:
        return float("nan")  # a constant input has no ranking (scipy also returns nan)
    return float(np.clip((ra @ rb) / den, -1.0, 1.0))


def spearman(a, b):
    """Spearman rank correlation rho between two score vectors [A.4.2].

    Pearson correlation of the average ranks (ties share the mean of their ranks), which equals
    ``scipy.stats.spearmanr(a, b).statistic`` and, without ties, the A.4.2 formula
    1 - 6 sum d_i^2 / (n (n^2 - 1)).

    Parameters
    ----------
    a, b : (n,) or (T, n) arrays (rows scored separately)

    Returns
    -------
    float in [-1, 1] (NaN when either input is constant or n < 2); (T,) array for 2-D input.
    """
    a, b = _pair(a, b)
    if a.ndim == 1:
        a, b = _vector(a, "a"), _vector(b, "b")
        return _spearman_1d(a, b) if a.size > 1 else float("nan")
    return np.array([spearman(a[t], b[t]) for t in range(a.shape[0])])


def _top_k(a, k):
    return np.argsort(-a, kind="mergesort")[:k]


def topk_stability(a, b, k: int):
    """Top-K stability |T_K(a) & T_K(b)| / K [A.4.2].

    T_K(v) are the indices of the K largest scores (the K most helpful training points); ties
    at the boundary are broken by the lower index (stable sort), so the result is deterministic.

    Parameters
    ----------
    a, b : (n,) or (T, n) arrays over the same training slots.
    k : int, 1 <= k <= n

    Returns
    -------
    float in [0, 1]; (T,) array for 2-D input.
    """
    a, b = _pair(a, b)
    n = a.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ParameterError(f"k: expected an integer in 1..{n}, got {k!r}")
    if a.ndim == 2:
        return np.array([topk_stability(a[t], b[t], k) for t in range(a.shape[0])])
    a, b = _vector(a, "a"), _vector(b, "b")
    return len(np.intersect1d(_top_k(a, k), _top_k(b, k))) / k


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
    if not (np.isfinite(L_K) and L_K >= 0):
        raise ParameterError(f"L_K: expected a finite value >= 0, got {L_K!r}")
    if not (lam > 0):
        raise ParameterError(f"lam: expected a value > 0, got {lam!r}")
    y = np.asarray(y, dtype=np.float64)
    if not np.isfinite(y).all():
        raise NonFiniteError("y: expected finite targets, got NaN or Inf")
    return float(L_K) * float(np.linalg.norm(y.ravel())) / float(lam) ** 2


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
    P = np.asarray(points, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] < 1:
        raise ShapeError(f"points: expected a non-empty 2-D array (s, d), got shape {P.shape}")
    if not (h > 0):
        raise ParameterError(f"h: expected a value > 0, got {h!r}")
    if isinstance(n_random, bool) or int(n_random) != n_random or n_random < 0:
        raise ParameterError(f"n_random: expected an integer >= 0, got {n_random!r}")
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
            J = np.asarray(jacobian(x), dtype=np.float64)
            _, sv, vt = np.linalg.svd(J, full_matrices=False)
            jac_norm[j] = float(sv[0])
            dirs.append(vt[0])
        if n_random:
            R = rng.standard_normal((int(n_random), d))
            R /= np.linalg.norm(R, axis=1, keepdims=True)
            dirs.extend(R)
        D = np.asarray(dirs)
        rows = np.asarray(kernel_rows(np.vstack([x[None, :], x[None, :] + h * D])))
        diff = rows[1:] - rows[0][None, :]
        per_point[j] = float(np.max(np.linalg.norm(diff, axis=1)) / h)
    desc = (f"max over {s} points x and {int(n_random)} random unit directions"
            f"{' + the top singular direction of dk/dx' if jacobian is not None else ''}"
            f" of ||k(x + h u) - k(x)||_2 / h, h = {h:g}")
    return LipschitzEstimate(value=float(per_point.max()), per_point=per_point,
                             jacobian_norm=jac_norm, h=float(h), n_random=int(n_random),
                             estimator=desc)


# --------------------------------------------------------------------------- intervals

def mean_ci95(values) -> dict:
    """Mean and 95 % confidence interval (Student t, n - 1 degrees of freedom).

    half = t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1). NaN values
    (an undefined metric for some test point) are dropped and counted.

    Returns
    -------
    dict with ``mean``, ``lo``, ``hi``, ``half_width``, ``n`` (values used), ``n_nan``
    (dropped). With n = 1 the interval is NaN; with n = 0 everything is NaN.
    """
    from scipy.stats import t as student_t

    v = np.asarray(values, dtype=np.float64).ravel()
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
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.ndim == 1:
        alpha = alpha[:, None]
    S = np.asarray(scores, dtype=np.float64)
    S = S[None, :] if S.ndim == 1 else S
    n = alpha.shape[0]
    if K is None:
        # (K + lam I) alpha = Y  =>  K alpha = Y - lam alpha: no kernel needed.
        if Y is None or lam is None:
            raise ParameterError("K=None needs Y and lam (K alpha = Y - lam alpha)")
        Y = np.asarray(Y, dtype=np.float64).reshape(alpha.shape)
        K_alpha = Y - lam * alpha
        k_shape = None  # no kernel on this route (nothing n x n is allocated)
    else:
        K = np.asarray(K, dtype=np.float64)
        K_alpha = None
        k_shape = K.shape
    if (K_alpha is None and k_shape != (n, n)) or S.ndim != 2 or S.shape[1] != n:
        raise ShapeError(f"K, alpha, scores: expected (n, n), (n, C), (T, n) with one n, got "
                         f"{k_shape}, {alpha.shape}, {S.shape}")
    if isinstance(n_groups, bool) or not 1 <= int(n_groups) <= n:
        raise ParameterError(f"n_groups: expected an integer in 1..{n}, got {n_groups!r}")
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
