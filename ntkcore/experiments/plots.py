"""Figures of the experiments (Figures 1, 2a, 2b, 4 and the Theorem 4.7 spectrum).

Matplotlib's object API only (``matplotlib.figure.Figure``, no pyplot), so drawing never
touches a global backend or opens a window; every figure is written with
:func:`ntkcore.experiments.output.atomic_savefig`.
"""

from __future__ import annotations

import numpy as np

from .output import atomic_savefig

ARCH_LABEL = {"relu": "2L-ReLU", "attn": "MLP-Attn"}
ARCH_COLOR = {"relu": "#1f77b4", "attn": "#d62728"}


def _figure(width=6.0, height=4.0):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _grouped_bars(ax, groups, series, values, errors, ylabel):
    """Bars for each group (x) and series (colours); values/errors: dict series -> list."""
    x = np.arange(len(groups))
    w = 0.8 / max(len(series), 1)
    for j, s in enumerate(series):
        err = np.asarray(errors[s], dtype=float)
        ax.bar(x + (j - (len(series) - 1) / 2) * w, values[s], w, yerr=np.nan_to_num(err),
               capsize=3, label=ARCH_LABEL.get(s, s), color=ARCH_COLOR.get(s))
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)


def bar_figure(path, groups, series, values, errors, *, ylabel, title):
    """Grouped bar chart with 95 % error bars (Figure 2a / 2b layout)."""
    fig = _figure(width=max(6.0, 1.1 * len(groups)))
    ax = fig.add_subplot()
    _grouped_bars(ax, groups, series, values, errors, ylabel)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title, fontsize=10)
    return atomic_savefig(fig, path)


def distance_figure(path, widths, distances, *, title):
    """NTK distance against width, one line per architecture (Figure 1)."""
    fig = _figure()
    ax = fig.add_subplot()
    for arch, ys in distances.items():
        ax.plot(widths, ys, "o-", label=ARCH_LABEL.get(arch, arch), color=ARCH_COLOR.get(arch))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width m")
    ax.set_ylabel(r"$\|f_m - f_{NTK}\|_F$ on the test set")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False)
    return atomic_savefig(fig, path)


def spectrum_figure(path, eigenvalues, *, attention_eigenvalues=None, title):
    """Normalised eigenvalues lambda_i / lambda_1 of G and of G^3 (log scale) [Thm 4.7]."""
    ev = np.asarray(eigenvalues, dtype=float)
    fig = _figure()
    ax = fig.add_subplot()
    pos = ev[ev > 0]
    if pos.size:
        r = pos / pos[0]
        idx = np.arange(1, r.size + 1)
        ax.semilogy(idx, r, label=r"$G = XX^T$: $\lambda_i/\lambda_1$")
        ax.semilogy(idx, r ** 3, label=r"$G^3$ (linear attention): $(\lambda_i/\lambda_1)^3$")
    if attention_eigenvalues is not None:
        ea = np.asarray(attention_eigenvalues, dtype=float)
        ea = ea[ea > 0]
        if ea.size:
            ax.semilogy(np.arange(1, ea.size + 1), ea / ea[0], "--",
                        label="Gram of row-normalised attention features")
    ax.set_xlabel("eigenvalue index i")
    ax.set_ylabel("normalised eigenvalue")
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    return atomic_savefig(fig, path)


def plot_complexity_by_decile(deciles, path, *, title="Contribution to model complexity"):
    """Figure 4 (A.7): mean complexity share (blue) and mean influence (red) per group.

    Parameters
    ----------
    deciles : :class:`ntkcore.malleability.ComplexityDeciles`
    path : output PNG path (written atomically).
    title : str

    Returns
    -------
    Path of the written file.
    """
    g = np.arange(1, deciles.mean_complexity.size + 1)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(g, deciles.mean_complexity, "o-", color="#1f77b4")
    ax.set_xlabel("influence group (1 = most harmful, %d = most helpful)" % g.size)
    ax.set_ylabel(r"mean $\alpha_i \cdot (K\alpha)_i$ (complexity share)", color="#1f77b4")
    ax.set_xticks(g)
    ax2 = ax.twinx()
    ax2.plot(g, deciles.mean_influence, "s--", color="#d62728")
    ax2.set_ylabel("mean influence score", color="#d62728")
    ax2.axhline(0.0, color="#d62728", lw=0.5, alpha=0.5)
    ax.set_title(title, fontsize=10)
    return atomic_savefig(fig, path)
