"""Figure 4 (A.7): contribution to model complexity against influence group.

For the kernel ridge predictor f = sum_i alpha_i k(., x_i) the squared RKHS norm splits as
||f||_H^2 = sum_i c_i with c_i = alpha_i . (K alpha)_i; c_i is training point i's
"contribution to model complexity". Training points are grouped into deciles of their
influence (mean over the given test points; group 1 most harmful, 10 most helpful) and the
mean c_i and mean influence of each group are drawn (a U-shaped complexity curve means the
most harmful and most helpful points carry the most complexity).

``ntkcore influence`` (or any pipeline) calls :func:`complexity_figure` with its kernel,
dual coefficients and scores.
"""

from __future__ import annotations

from ..malleability import ComplexityDeciles, complexity_by_decile
from .plots import plot_complexity_by_decile

__all__ = ["complexity_by_decile", "ComplexityDeciles", "plot_complexity_by_decile",
           "complexity_figure"]


def complexity_figure(K, alpha, scores, path, *, n_groups: int = 10,
                      title: str = "Contribution to model complexity", Y=None,
                      lam=None) -> ComplexityDeciles:
    """Group by influence decile and write the Figure 4 PNG to ``path`` (atomically).

    Parameters
    ----------
    K : (n, n) training kernel (no ridge).
    alpha : (n, C) dual coefficients (K + lam I)^-1 Y (``InfluenceResult.alpha``).
    scores : (T, n) or (n,) influence scores (``InfluenceResult.scores``; positive = helpful).
    path : PNG path.
    n_groups : int, default 10.

    Returns
    -------
    ComplexityDeciles (the numbers drawn).
    """
    dec = complexity_by_decile(K, alpha, scores, n_groups=n_groups, Y=Y, lam=lam)
    plot_complexity_by_decile(dec, path, title=title)
    return dec
