"""``ntkcore spectrum``: spectral amplification of linearized attention [Thm 4.7, Remark B.11].

For the model inputs X (n, d) of the chosen data (Table 5 normalisation, unit rows):

- kappa(G), G = X X^T; when n > d, G is singular and the effective kappa_d = lambda_1 / lambda_r
  over the r nonzero eigenvalues is reported instead (Remark B.11);
- kappa(G^3) measured from the eigenvalues of the matrix G^3 itself (``ntkcore.spectrum``), and
  the check kappa(G^3) = kappa(G)^3 as the relative difference |kappa(G^3) - kappa(G)^3| /
  kappa(G)^3 (effective values when n > d);
- the width the theorem asks for: the proof of Thm 4.7 needs m >> kappa(G)^6 n log n (natural
  log) for the finite-width MLP-Attn NTK to concentrate at the scale of its smallest eigenvalue;
  reported with the effective kappa when n > d;
- for comparison, the condition number of the Gram matrix of the row-normalised attention
  features rownorm(X X^T X) that MLP-Attn actually feeds its head (Remark 4.8: the
  normalisation keeps the amplification only approximately).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from .pipeline import DataOptions, experiment_settings


@dataclass
class SpectrumConfig(DataOptions):
    """Options of ``ntkcore spectrum`` (n_test is unused: the spectrum is of the training set)."""

    seed: int = 42


def _rel(a, b):
    if not (np.isfinite(a) and np.isfinite(b)) or b == 0:
        return float("nan")
    return abs(a - b) / abs(b)


def spectrum_report(X, *, seed: int = 42) -> dict:
    """Theorem 4.7 quantities for inputs X (n, d); see the module docstring.

    The identity kappa(G^3) = kappa(G)^3 is numerically checkable only while kappa(G)^3 is well
    below 1/eps(float64) ~ 4.5e15 (beyond that the small eigenvalues of G^3 drown in the
    rounding error of its largest). It is therefore also checked on a seeded full-rank subset
    of min(n, d // 2) rows (``full_rank_check``), where Theorem 4.7's rank(X) = n holds.
    """
    from ..gram import attention_features, spectrum

    sp = spectrum(X)
    n, d = X.shape
    full = np.isfinite(sp.kappa)
    k = sp.kappa if full else sp.kappa_effective
    k3 = sp.kappa_cubed if full else sp.kappa_cubed_effective
    att = spectrum(attention_features(X))
    k_att = att.kappa if np.isfinite(att.kappa) else att.kappa_effective
    notes = list(sp.notes)
    if np.isfinite(k) and k ** 3 * np.finfo(np.float64).eps > 1e-3:
        notes.append(f"kappa(G)^3 = {k ** 3:.3g} is beyond float64 resolution "
                     f"(1/eps = {1 / np.finfo(np.float64).eps:.2g}): the measured kappa(G^3) "
                     f"is not meaningful here; see the full-rank subset check")
    m = max(min(n, d // 2), 2)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(m, n), replace=False))
    sub = spectrum(X[rows])
    ks = sub.kappa if np.isfinite(sub.kappa) else sub.kappa_effective
    ks3 = sub.kappa_cubed if np.isfinite(sub.kappa) else sub.kappa_cubed_effective
    check = {"n": int(rows.size), "full_rank": bool(np.isfinite(sub.kappa)), "kappa": ks,
             "kappa_cubed_measured": ks3, "kappa_cubed_predicted": ks ** 3,
             "relative_difference": _rel(ks3, ks ** 3)}
    return {
        "n": n, "d": d, "rank": sp.rank, "full_rank": bool(full),
        "full_rank_check": check,
        "lambda_max": float(sp.eigenvalues[0]) if sp.eigenvalues.size else float("nan"),
        "lambda_min_nonzero": float(sp.eigenvalues[sp.rank - 1]) if sp.rank else float("nan"),
        "kappa": sp.kappa, "kappa_effective": sp.kappa_effective,
        "kappa_used": k, "kappa_used_is_effective": not full,
        "kappa_cubed_measured": k3, "kappa_cubed_predicted": k ** 3,
        "kappa_cubed_relative_difference": _rel(k3, k ** 3),
        "kappa_attention_features": k_att,
        "width_required": k ** 6 * n * math.log(n) if n > 1 else float("nan"),
        "width_required_formula": "m >> kappa(G)^6 n ln n (proof of Thm 4.7)",
        "notes": notes, "eigenvalues": sp.eigenvalues,
        "attention_eigenvalues": att.eigenvalues,
    }


def run_spectrum(cfg: SpectrumConfig, out_dir=None, *, overwrite: bool = False,
                 progress: bool = True, log=print) -> dict:
    """Compute the Theorem 4.7 report; write table.md, results.json and the spectrum plot."""
    from ..data import load_dataset
    from .output import RunFolder, atomic_write_json, atomic_write_text
    from .plots import spectrum_figure

    s = asdict(cfg)
    t0 = time.perf_counter()
    ds = load_dataset(s["dataset"], root=s["data_root"], classes=s["classes"],
                      n_train=s["n_train"], n_test=0, seed=s["seed"], download=s["download"],
                      dim=s.get("dim"))
    log(f"data: {ds.name} classes={list(ds.classes)} ({', '.join(ds.class_names)}) "
        f"n_train={ds.n_train} d={ds.dim}")
    config, about = experiment_settings(s, ds)
    folder = (RunFolder(out_dir, "spectrum", config, about=about, overwrite=overwrite)
              if out_dir is not None else contextlib.nullcontext())
    with folder as run:
        rep = spectrum_report(ds.X_train, seed=s["seed"])
        results = {"command": "spectrum", "config": s,
                   "data": {"name": ds.name, "classes": list(ds.classes),
                            "class_names": list(ds.class_names), "n_train": ds.n_train,
                            "dim": ds.dim, "source": ds.source},
                   "report": rep, "seconds": time.perf_counter() - t0}
        results["table"] = format_table(results)
        if run is None:
            return results
        spectrum_figure(run.output("spectrum.png"), rep["eigenvalues"],
                        attention_eigenvalues=rep["attention_eigenvalues"],
                        title=f"Spectrum of G = XX^T, {ds.name} classes {list(ds.classes)}, "
                              f"n={ds.n_train}")
        results["files"] = ["table.md", "results.json", "spectrum.png", "run.json"]
        atomic_write_text(run.output("table.md"), results["table"])
        atomic_write_json(run.output("results.json"), results)
        run.finish()
    return results


def format_table(results: dict) -> str:
    r, ds = results["report"], results["data"]
    eff = " (effective, n > d or rank-deficient)" if r["kappa_used_is_effective"] else ""
    rows = [("n x d", f"{r['n']} x {r['d']} (rank {r['rank']})"),
            ("lambda_1 / lambda_min nonzero", f"{r['lambda_max']:.4g} / "
                                               f"{r['lambda_min_nonzero']:.4g}"),
            ("kappa(G)" + eff, f"{r['kappa_used']:.6g}"),
            ("kappa(G^3) measured", f"{r['kappa_cubed_measured']:.6g}"),
            ("kappa(G)^3", f"{r['kappa_cubed_predicted']:.6g}"),
            ("relative difference", f"{r['kappa_cubed_relative_difference']:.2e}"),
            ("kappa of the row-normalised attention-feature Gram",
             f"{r['kappa_attention_features']:.6g}"),
            ("width required, kappa^6 n ln n", f"{r['width_required']:.3g}")]
    c = r["full_rank_check"]
    rows += [(f"subset check (n={c['n']}, {'full rank' if c['full_rank'] else 'rank-deficient'}):"
              " kappa(G)", f"{c['kappa']:.6g}"),
             ("subset: kappa(G^3) measured / kappa(G)^3",
              f"{c['kappa_cubed_measured']:.6g} / {c['kappa_cubed_predicted']:.6g}"),
             ("subset: relative difference", f"{c['relative_difference']:.2e}")]
    lines = [f"# Spectral amplification (Theorem 4.7) — {ds['name']}, classes {ds['classes']}",
             "", "| Quantity | Value |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    if r["notes"]:
        lines += [""] + [f"- {nt}" for nt in r["notes"]]
    return "\n".join(lines) + "\n"
