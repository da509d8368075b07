"""The report of ``ntkcore malleability``: the paper's table layouts (Tables 2-4), the full
metric grid, the intrinsic-sensitivity table (Def C.10), and the files of a finished run
(table.md, results.json, scores.npz, Figures 2a/2b and 4).

The experiment itself is :mod:`ntkcore.experiments.malleability`; this module only formats
and writes what it computed.
"""

from __future__ import annotations

import numpy as np

ATTACK_LABEL = {"fgsm": "FGSM", "pgd": "PGD", "mim": "MIM"}
INTERVENTION_LABEL = {"curated": "Curated", "transformed": "Transformed",
                      "adversarial": "Adversarial"}
ARCH_LABEL = {"relu": "2L-ReLU", "attn": "MLP-Attn"}


def _percent(tau: float) -> str:
    """tau as a percentage with the digits it needs: 0.1 -> "10%", 0.001 -> "0.1%"."""
    return f"{100 * tau:.3g}%"


def _fmt(summary, scale=1.0, digits=1):
    m, h = summary["mean"], summary["half_width"]
    if not np.isfinite(m):
        return "n/a"
    hs = f" ± {h * scale:.{digits}f}" if np.isfinite(h) else ""
    return f"{m * scale:.{digits}f}{hs}"


def format_table(results: dict) -> str:
    """Markdown tables in the paper's layout (Tables 2/3, 4) plus the full metric grid."""
    s = results["config"]
    runs = results["runs"]
    ds = results["data"]
    T = len(results["test_points"])
    lines = [f"# Influence malleability — {ds['name']}, classes {ds['classes']} "
             f"({', '.join(ds['class_names'])}), n_train={ds['n_train']}, width {s['width']}, "
             f"{s['epochs']} epochs, eps {s['eps']}, tau {s['tau']}, "
             f"{'retrained' if s['retrain'] else 'weights kept'} after the intervention", "",
             f"Mean ± 95 % t-interval half-width over {T} test points.", ""]
    std = [r for r in runs if r["training"] == "standard"]
    if "transformed" in s["interventions"]:
        title = "Table 3 layout (binary)" if ds["binary"] else "Table 2 layout"
        lines += [f"## {title}: flip rate (%) of the top {_percent(s['tau'])} (Transformed)", "",
                  "| Model | " + " | ".join(ATTACK_LABEL[a] for a in s["attacks"]) + " |",
                  "|---|" + "---|" * len(s["attacks"])]
        for r in std:
            tr = r["interventions"]["transformed"]
            lines.append(f"| {ARCH_LABEL[r['arch']]} | " + " | ".join(
                _fmt(tr[a]["flip_rate"], 100) for a in s["attacks"]) + " |")
        lines.append("")
        adv = [r for r in runs if r["training"] == "adv-trained"]
        if adv and "pgd" in s["attacks"]:
            lines += ["## Table 4 layout: PGD flip rate (%), standard vs adversarially trained",
                      "", "| Model | Standard | Adv-Trained |", "|---|---|---|"]
            for r, ra in zip(std, adv):
                lines.append(f"| {ARCH_LABEL[r['arch']]} | "
                             f"{_fmt(r['interventions']['transformed']['pgd']['flip_rate'], 100)}"
                             f" | {_fmt(ra['interventions']['transformed']['pgd']['flip_rate'], 100)} |")
            lines.append("")
    lines += ["## All interventions", "",
              "| Model | Training | Intervention | Attack | Flip rate (%) | Spearman rho | "
              f"Top-{s['topk']} stability |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        for iv in s["interventions"]:
            for atk, summ in r["interventions"].get(iv, {}).items():
                lines.append(f"| {ARCH_LABEL[r['arch']]} | {r['training']} | "
                             f"{INTERVENTION_LABEL[iv]} | {ATTACK_LABEL.get(atk, '—')} | "
                             f"{_fmt(summ['flip_rate'], 100)} | {_fmt(summ['spearman'], 1, 3)} | "
                             f"{_fmt(summ['topk'], 1, 2)} |")
    lines += ["", "## Intrinsic sensitivity S = L_K ‖Y‖_F / lam^2 (Def C.10)", "",
              "| Model | Training | L_K | ‖Y‖_F | S | test acc. (net) | train acc. |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        i = r["intrinsic"]
        lines.append(f"| {ARCH_LABEL[r['arch']]} | {r['training']} | {i['L_K']:.4g} | "
                     f"{i['y_norm']:.4g} | {i['S']:.4g} | {r['test_accuracy_network']:.3f} | "
                     f"{r['train_accuracy']:.3f} |")
    if runs:
        lines += ["", f"L_K estimator: {runs[0]['intrinsic']['estimator']}.", "",
                  "The same ratio at other steps h (random directions only): a finite-width "
                  "ReLU eNTK jumps where an activation flips, so the ratio depends on h; "
                  "compare S across architectures at one h.", "",
                  "| Model | Training | " + " | ".join(
                      f"L_K (h={h})" for h in runs[0]["intrinsic"]["L_K_by_step"]) + " |",
                  "|---|---|" + "---|" * len(runs[0]["intrinsic"]["L_K_by_step"])]
        for r in runs:
            by_step = r["intrinsic"]["L_K_by_step"]
            lines.append(f"| {ARCH_LABEL[r['arch']]} | {r['training']} | "
                         + " | ".join(f"{v:.4g}" for v in by_step.values()) + " |")
    lines += ["", "Curated removes H_t; its metrics compare the remaining points (flip rate over "
              "the top tau of the remaining original scores)."]
    return "\n".join(lines) + "\n"


def write_outputs(run, results, scores):
    """table.md, results.json, scores.npz and the figures, each registered in ``run`` first."""
    from .output import atomic_write_json, atomic_write_npz, atomic_write_text
    from .plots import bar_figure, plot_complexity_by_decile

    s = results["config"]
    std = [r for r in results["runs"] if r["training"] == "standard"]
    out = run.output
    files = ["table.md", "results.json", "scores.npz", "run.json"]
    archs = [r["arch"] for r in std]
    if "transformed" in s["interventions"]:
        vals = {r["arch"]: [100 * r["interventions"]["transformed"][a]["flip_rate"]["mean"]
                            for a in s["attacks"]] for r in std}
        errs = {r["arch"]: [100 * r["interventions"]["transformed"][a]["flip_rate"]["half_width"]
                            for a in s["attacks"]] for r in std}
        bar_figure(out("fig2a_flip_rate.png"), [ATTACK_LABEL[a] for a in s["attacks"]], archs,
                   vals, errs, ylabel=f"flip rate of top {_percent(s['tau'])} (%)",
                   title="Influence flip rate by perturbation type (Transformed)")
        files.append("fig2a_flip_rate.png")
    groups, keys = [], []
    for iv in s["interventions"]:
        for atk in (["none"] if iv == "curated" else s["attacks"]):
            groups.append(INTERVENTION_LABEL[iv] + ("" if atk == "none"
                                                    else f"\n{ATTACK_LABEL[atk]}"))
            keys.append((iv, atk))
    vals = {r["arch"]: [r["interventions"][iv][atk]["spearman"]["mean"] for iv, atk in keys]
            for r in std}
    errs = {r["arch"]: [r["interventions"][iv][atk]["spearman"]["half_width"]
                        for iv, atk in keys] for r in std}
    bar_figure(out("fig2b_spearman.png"), groups, archs, vals, errs,
               ylabel="Spearman rho (original vs perturbed)",
               title="Influence rank correlation by intervention")
    files.append("fig2b_spearman.png")
    for r in results["runs"]:
        dec = r.get("_deciles")
        if dec is not None:
            name = f"fig4_complexity_{r['arch']}_{r['training']}.png"
            plot_complexity_by_decile(dec, out(name), title=f"{ARCH_LABEL[r['arch']]} "
                                      f"({r['training']}): complexity vs influence group")
            files.append(name)
    flat = {(key if name == "original" else f"{key}__{name}"): v
            for key, by_name in scores.items() for name, v in by_name.items()}
    atomic_write_npz(out("scores.npz"), test_points=results["test_points"], **flat)
    results["files"] = files
    atomic_write_text(out("table.md"), results["table"])
    atomic_write_json(out("results.json"),
                      {**results, "runs": [{k: v for k, v in r.items() if k != "_deciles"}
                                           for r in results["runs"]]})
