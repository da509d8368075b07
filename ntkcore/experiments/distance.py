"""``ntkcore distance``: distance of the trained finite network from its infinite-width NTK
predictor across widths [Table 1, Figure 1, Sec 5.2].

For each architecture and width m in 4, 8, ..., ``max_width`` (powers of two):

    D(m) = ||f_m(X_test) - f_NTK(X_test)||_F   (Frobenius norm over the T x C output matrix)

- f_m: the network trained at width m (pipeline.train_network: Adam, lam, epochs; cross-entropy
  for multi-class, squared error against +-1 for binary, A.3.2), evaluated on every test point.
- f_NTK: kernel ridge regression with the infinite-width NTK
  K_inf(x, x') = <x, x'> (pi - theta) / (2 pi) (``relu_ntk_infinite``) on the same inputs the
  head sees -- the unit-norm rows for 2L-ReLU, the attention features rownorm(x X^T X) for
  MLP-Attn -- with the same lam and targets Y (one-hot, or +-1 for binary):
  f_NTK(X_test) = K_inf(X_test, X) (K_inf(X, X) + lam I)^-1 Y. It does not depend on m.

The RMS per entry D / sqrt(T C) is reported too, since D grows with the test-set size T and the
paper's T (10 000) differs from ours. With cross-entropy training the network's logits and the
ridge predictor's regression outputs live on different scales; that is the paper's protocol as
we read it (A.3.2 and Sec 5.1), and it is stated in the table.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from .._validate import check_count, check_epochs
from .pipeline import DataOptions, apply_preset, check_lam, check_seed, experiment_settings

ARCHS = ("relu", "attn")
ARCH_LABEL = {"relu": "2L-ReLU", "attn": "MLP-Attn"}
PRESETS = {
    "quick": {"max_width": 256, "epochs": 30, "n_train": 500},
    "paper": {"max_width": 4096, "epochs": 500, "n_train": None},
}


@dataclass
class DistanceConfig(DataOptions):
    """Options of ``ntkcore distance`` (None = from ``preset``)."""

    archs: tuple = ARCHS
    min_width: int = 4
    max_width: int | None = None
    epochs: int | None = None
    preset: str = "quick"
    lam: float = 1e-3
    seed: int = 42

    def resolved(self) -> dict:
        d = apply_preset(self, PRESETS)
        vals = tuple(d["archs"])
        if not vals or any(a not in ARCHS for a in vals) or len(set(vals)) != len(vals):
            raise ParameterError(f"archs: expected distinct values from {ARCHS}, got {list(vals)}")
        d["archs"] = vals
        for key in ("min_width", "max_width"):
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 \
                    or v & (v - 1):
                raise ParameterError(f"{key}: expected a power of two >= 1, got {v!r}")
        if d["max_width"] < d["min_width"]:
            raise ParameterError(f"max_width: expected >= min_width ({d['min_width']}), "
                                 f"got {d['max_width']}")
        e = d["epochs"]
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 0:
            raise ParameterError(f"epochs: expected an integer >= 0, got {e!r}")
        check_epochs(e)
        check_lam(d["lam"])
        check_seed(d["seed"])
        return d


def widths_between(lo: int, hi: int) -> list:
    """Powers of two lo, 2 lo, ..., hi (lo an integer >= 1; nothing when lo > hi)."""
    out, m, hi = [], check_count(lo, "lo"), check_count(hi, "hi", minimum=0)
    while m <= hi:
        out.append(m)
        m *= 2
    return out


def ntk_predictor(F_train, Y, F_test, lam: float) -> np.ndarray:
    """f_NTK(X_test) = K_inf(F_test, F) (K_inf(F, F) + lam I)^-1 Y (float64 Cholesky).

    F_train (n, d), Y (n, C) or (n,) finite targets, F_test (T, d), lam a finite number > 0
    (ParameterError, ShapeError or NonFiniteError otherwise)."""
    from scipy.linalg import cho_factor, cho_solve

    from .._validate import as_float_matrix, check_positive, check_rows
    from ..ntk.infinite import relu_ntk_infinite

    lam = check_positive(lam, "lam")
    F_train = as_float_matrix(F_train, "F_train", dtype=np.float64)
    vector = np.ndim(Y) == 1
    Y = as_float_matrix(Y, "Y", dtype=np.float64, allow_1d=True)
    check_rows(F_train, Y, "F_train", "Y")
    K = relu_ntk_infinite(F_train)
    K[np.diag_indices_from(K)] += lam
    alpha = cho_solve(cho_factor(K, lower=True, overwrite_a=True), Y)
    out = relu_ntk_infinite(F_test, F_train) @ alpha
    return out[:, 0] if vector else out


def run_distance(cfg: DistanceConfig, out_dir=None, *, overwrite: bool = False,
                 progress: bool = True, log=print) -> dict:
    """Train every (architecture, width), measure D(m); write table.md, results.json, figure."""
    from tqdm.auto import tqdm

    from ..nn import make_model, predict
    from .malleability import load_for
    from .output import RunFolder, atomic_write_json, atomic_write_text
    from .pipeline import accuracy_from_outputs, train_network
    from .plots import distance_figure

    s = cfg.resolved()
    t_all = time.perf_counter()
    ds = load_for(cfg, s)
    if ds.n_test < 1:
        raise ParameterError("n_test: the NTK distance compares test outputs; expected at least "
                             "one test point, got 0")
    from ..nn._memory import check_model_fits
    for arch in s["archs"]:  # the widest network, refused before any training
        check_model_fits(arch, ds.dim, s["max_width"], ds.Y_train.shape[1], power_of_two=True)
    config, about = experiment_settings(s, ds)
    folder = (RunFolder(out_dir, "distance", config, about=about, overwrite=overwrite)
              if out_dir else contextlib.nullcontext())
    with folder as run:
        log(f"data: {ds.name} classes={list(ds.classes)} ({', '.join(ds.class_names)}) "
            f"n_train={ds.n_train} n_test={ds.n_test} d={ds.dim}")
        widths = widths_between(s["min_width"], s["max_width"])
        Y = ds.Y_train
        T, C = ds.n_test, Y.shape[1]
        per_arch = {}
        for arch in s["archs"]:
            # the head's inputs do not depend on the width: build them from a width-1 model
            probe = make_model(arch, ds.X_train, 1, C, seed=s["seed"])
            F, Ft = probe.features_numpy(ds.X_train), probe.features_numpy(ds.X_test)
            t0 = time.perf_counter()
            f_ntk = ntk_predictor(F, Y, Ft, s["lam"])
            rows = []
            for m in tqdm(widths, disable=not progress, desc=f"distance {arch}", unit="width"):
                key = f"{arch}_width{m}"
                if run is not None and run.done(key):  # finished by an earlier run: resumed
                    rows.append(run.info(key)["row"])
                    continue
                t1 = time.perf_counter()
                model, tr = train_network(ds, arch, m, epochs=s["epochs"], lam=s["lam"],
                                          seed=s["seed"], progress=False)
                f_m = predict(model, ds.X_test)
                D = float(np.linalg.norm(f_m - f_ntk))
                rows.append({"width": m, "distance": D, "rms": D / np.sqrt(T * C),
                             "net_test_accuracy": accuracy_from_outputs(ds, f_m, ds.y_test),
                             "train_accuracy": tr.train_accuracy,
                             "seconds": time.perf_counter() - t1})
                if run is not None:
                    run.record(key, row=rows[-1])
            per_arch[arch] = {"ntk_test_accuracy": accuracy_from_outputs(ds, f_ntk, ds.y_test),
                              "ntk_output_norm": float(np.linalg.norm(f_ntk)), "widths": rows,
                              "seconds": time.perf_counter() - t0}
            per_arch[arch]["monotone"] = _trend([r["distance"] for r in rows])
        results = {"command": "distance", "config": s,
                   "data": {"name": ds.name, "classes": list(ds.classes),
                            "class_names": list(ds.class_names), "n_train": ds.n_train,
                            "n_test": ds.n_test, "dim": ds.dim, "binary": ds.binary,
                            "source": ds.source},
                   "norm": "Frobenius over the T x C test outputs", "widths": widths,
                   "archs": per_arch, "seconds": time.perf_counter() - t_all}
        results["table"] = format_table(results)
        if run is not None:
            distance_figure(run.output("fig1_ntk_distance.png"), widths,
                            {a: [r["distance"] for r in v["widths"]] for a, v in per_arch.items()},
                            title=f"NTK distance, {ds.name} classes {list(ds.classes)}")
            results["files"] = ["table.md", "results.json", "fig1_ntk_distance.png", "run.json"]
            atomic_write_text(run.output("table.md"), results["table"])
            atomic_write_json(run.output("results.json"), results)
            run.finish()
        return results


def _trend(d) -> str:
    """How the distance moves with width: "n/a" for one width, else "decreasing" /
    "increasing" (strictly, every step), "flat" (all equal) or "non-monotonic"."""
    steps = np.diff(np.asarray(d, dtype=float))
    if steps.size == 0:
        return "n/a"
    if (steps < 0).all():
        return "decreasing"
    if (steps > 0).all():
        return "increasing"
    return "flat" if (steps == 0).all() else "non-monotonic"


def format_table(results: dict) -> str:
    """Table 1 layout: one row per architecture, one column per width."""
    s, ds, widths = results["config"], results["data"], results["widths"]
    lines = [f"# NTK distance ||f_m - f_NTK||_F — {ds['name']}, classes {ds['classes']}, "
             f"n_train={ds['n_train']}, n_test={ds['n_test']}, {s['epochs']} epochs, "
             f"lam {s['lam']}", "",
             "Frobenius norm over the T x C test outputs (RMS per entry in parentheses). "
             + ("Networks trained with cross-entropy (logits) against a ridge predictor of "
                "one-hot targets." if not ds["binary"] else
                "Binary: networks trained with squared error on +-1 targets."), "",
             "| Model | " + " | ".join(f"m={m}" for m in widths) + " | trend | NTK acc. |",
             "|---|" + "---|" * (len(widths) + 2)]
    for arch, v in results["archs"].items():
        cells = [f"{r['distance']:.2f} ({r['rms']:.3f})" for r in v["widths"]]
        lines.append(f"| {ARCH_LABEL[arch]} | " + " | ".join(cells)
                     + f" | {v['monotone']} | {v['ntk_test_accuracy']:.3f} |")
    lines += ["", "Network test accuracy per width:", "",
              "| Model | " + " | ".join(f"m={m}" for m in widths) + " |",
              "|---|" + "---|" * len(widths)]
    for arch, v in results["archs"].items():
        lines.append(f"| {ARCH_LABEL[arch]} | " + " | ".join(
            f"{r['net_test_accuracy']:.3f}" for r in v["widths"]) + " |")
    return "\n".join(lines) + "\n"
