"""``ntkcore malleability``: influence flip rate, Spearman rho, top-K stability and intrinsic
sensitivity of 2L-ReLU and MLP-Attn under FGSM / PGD / MIM [Def 3.4, Sec 5.3-5.4, Tables 2-4,
Figure 2, Def C.10, Figure 4].

Protocol, per architecture (and per training mode: standard, and PGD-AT with ``adv_train``):

1. Train the network (pipeline.train_network) and compute the exact LOO influence scores
   I_orig (T, n) of every training point on ``test_points`` seeded test points, on the
   closed-form eNTK of the trained weights (pipeline.kernel_influence).
2. Attack every training point once per attack, against the trained network's own training
   loss at its own label: L_inf in pixel space [0, 1] with clamping, gradients through the
   dataset normalisation (FGSM eps; PGD eps, step, iters; MIM = PGD with momentum).
   For MLP-Attn the attention operator M = X^T X is a fixed buffer during the attack.
3. Interventions, for each test point t with H_t = top-tau set of I_orig[t] [Def 3.4]:

   - Transformed: training rows in H_t replaced by their adversarial versions (per attack).
   - Adversarial: every training row replaced by its adversarial version (per attack).
   - Curated: rows in H_t removed (attack-independent).

   The perturbed scores are computed (exact solver; the A.8 checks run on the original
   kernel only, to keep the many re-solves cheap) on the perturbed training set with the trained weights
   kept (default) or after retraining from the same seed (``retrain``). For MLP-Attn the
   attention operator is then recomputed over the perturbed training set,
   M' = X'^T X' (``model.set_attention``), and both training and test features are
   rownorm(x M'): this recomputation is the Gram coupling of Proposition 4.5 -- perturbing the
   points of H_t moves every feature, not only theirs. 2L-ReLU has no such coupling.

Index correspondence: slot i of the perturbed training set holds the adversarial version of
point i (Transformed/Adversarial), so I_adv[i] is the score of x_i^adv and is compared with
I_orig[i]; the flip rate is over H_t (eq. 4), Spearman rho over all n slots, top-K stability
over the K most helpful slots. Curated: the removed points have no score, so every metric
compares the n - |H_t| remaining points, I_orig restricted to them against their new scores,
and the flip rate uses H'_t = the top-tau set of that restriction (the next most helpful
points).

Each metric is averaged over the test points with a 95 % t-interval (mean_ci95).
Intrinsic sensitivity S = L_K ||Y||_F / lam^2 [Def C.10], L_K from
:func:`ntkcore.malleability.kernel_lipschitz` on the trained eNTK rows k(x) = K_m(x, X_train)
(attention operator fixed), at seeded training points.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from .._validate import check_epochs, check_flag, is_finite_number
from ..errors import ParameterError
from .pipeline import DataOptions, apply_preset, check_lam, check_seed, experiment_settings
from .. import malleability as mm
from .malleability_report import ARCH_LABEL, format_table, write_outputs

ARCHS = ("relu", "attn")
ATTACKS = ("fgsm", "pgd", "mim")
INTERVENTIONS = ("curated", "transformed", "adversarial")

#: quick: a few minutes on 2 CPU cores on digits; paper: Sec 5.1 / A.3 (full training set).
PRESETS = {
    "quick": {"width": 256, "epochs": 30, "n_train": 500},
    "paper": {"width": 1024, "epochs": 500, "n_train": None},
}
#: above this many training points the dense K for Figure 4 (n x n float64) is skipped.
COMPLEXITY_MAX_N = 20000


@dataclass
class MalleabilityConfig(DataOptions):
    """Options of ``ntkcore malleability`` (same names and defaults; None = from ``preset``)."""

    test_points: int = 20
    archs: tuple = ARCHS
    attacks: tuple = ATTACKS
    interventions: tuple = INTERVENTIONS
    eps: float = 0.3
    step: float = 0.01
    iters: int = 40
    momentum: float = 0.9
    width: int | None = None
    epochs: int | None = None
    preset: str = "quick"
    lam: float = 1e-3
    tau: float = 0.1
    topk: int = 10
    retrain: bool = False
    adv_train: bool = False
    lipschitz_points: int = 8
    lipschitz_directions: int = 8
    seed: int = 42
    device: str = "auto"

    def resolved(self) -> dict:
        """Effective settings (preset filled in), validated; raises ParameterError."""
        d = apply_preset(self, PRESETS)
        for key, allowed in (("archs", ARCHS), ("attacks", ATTACKS),
                             ("interventions", INTERVENTIONS)):
            vals = tuple(d[key])
            bad = [v for v in vals if v not in allowed]
            if bad or not vals or len(set(vals)) != len(vals):
                raise ParameterError(f"{key}: expected distinct values from {allowed}, "
                                     f"got {list(vals)}")
            d[key] = vals
        for key in ("width", "test_points", "topk", "iters", "lipschitz_points"):
            _int_at_least(d[key], key, 1)
        _int_at_least(d["epochs"], "epochs", 0)
        check_epochs(d["epochs"])
        _int_at_least(d["lipschitz_directions"], "lipschitz_directions", 0)
        from ..nn.attacks import _check_budget
        _check_budget(d["eps"], d["step"], d["iters"], d["momentum"])  # finite, as the attacks
        check_lam(d["lam"])
        if not (is_finite_number(d["tau"]) and 0 < d["tau"] < 1):
            raise ParameterError(f"tau: expected a value in (0, 1), got {d['tau']!r}")
        check_seed(d["seed"])
        for key in ("retrain", "adv_train"):
            d[key] = check_flag(d[key], key)
        return d


def _int_at_least(v, name, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ParameterError(f"{name}: expected an integer >= {lo}, got {v!r}")


# --------------------------------------------------------------------------- building blocks

def attack_pixels(model, dataset, attack: str, *, eps: float = 0.3, step: float = 0.01,
                  iters: int = 40, momentum: float = 0.9, batch_size: int = 2048,
                  progress: bool = False):
    """Adversarial versions of every training image against ``model``'s training loss.

    Parameters
    ----------
    model : trained TwoLayerNet / MLPAttn (attention operator fixed during the attack).
    dataset : ntkcore.data.Dataset (its ``pixels_train``, labels and ``preprocess``).
    attack : "fgsm" | "pgd" | "mim"
    eps, step, iters, momentum : the attack settings (Sec 5.1 defaults).

    Returns
    -------
    (n, d) float64 pixels in [0, 1] with ||x_adv - x||_inf <= eps, and a dict with the mean
    per-sample loss before and after the attack.
    """
    import torch

    from ..nn import fgsm, mim, model_loss_fn, pgd
    from tqdm.auto import tqdm

    if attack not in ATTACKS:
        raise ParameterError(f"attack: expected one of {ATTACKS}, got {attack!r}")
    y = dataset.Y_train if dataset.binary else dataset.y_train
    P = dataset.pixels_train
    out = np.empty_like(P, dtype=np.float64)
    before = after = 0.0
    for i0 in tqdm(range(0, P.shape[0], batch_size), disable=not progress,
                   desc=f"attack {attack}", unit="batch", leave=False):
        x = torch.from_numpy(np.ascontiguousarray(P[i0:i0 + batch_size], dtype=np.float64))
        fn = model_loss_fn(model, dataset.preprocess, y[i0:i0 + batch_size])
        if attack == "fgsm":
            xa = fgsm(fn, x, eps)
        elif attack == "pgd":
            xa = pgd(fn, x, eps, step, iters)
        else:
            xa = mim(fn, x, eps, step, iters, momentum)
        with torch.no_grad():
            before += float(fn(x).sum())
            after += float(fn(xa).sum())
        out[i0:i0 + batch_size] = xa.numpy()
    n = max(P.shape[0], 1)
    return out, {"loss_before": before / n, "loss_after": after / n,
                 "max_abs_delta": float(np.max(np.abs(out - P))) if P.size else 0.0}


def replace_training(dataset, *, pixels=None, keep=None):
    """A copy of ``dataset`` with new training pixels and/or only the rows ``keep``."""
    px = dataset.pixels_train if pixels is None else pixels
    y, idx = dataset.y_train, dataset.train_indices
    if keep is not None:
        px, y, idx = px[keep], y[keep], idx[keep]
    return dataclasses.replace(dataset, pixels_train=px, y_train=y, train_indices=idx)


class _Scorer:
    """Influence of the training points on the chosen test points, for a (perturbed) set."""

    def __init__(self, model, dataset, settings, test_sel, adv_eps, progress):
        self.model = model
        self.X_orig = dataset.X_train
        self.s = settings
        self.sel = test_sel
        self.adv_eps = adv_eps
        self.progress = progress
        self.trainings = 0

    def __call__(self, ds, rows=None):
        """(len(rows), n') scores of ds's training points on test points ``sel[rows]``."""
        from .pipeline import kernel_influence, train_network

        sel = self.sel if rows is None else self.sel[rows]
        X_test, Y_test = ds.X_test[sel], ds.Y_test[sel]
        s = self.s
        if s["retrain"]:
            model, _ = train_network(ds, self.model.arch, s["width"], epochs=s["epochs"],
                                     lam=s["lam"], seed=s["seed"], adv_eps=self.adv_eps,
                                     progress=False, device=s["device"])
            self.trainings += 1
            res, _ = kernel_influence(model, ds, lam=s["lam"], device=s["device"],
                                      X_test=X_test, Y_test=Y_test, check=False)
            return _host(res.scores)
        model = self.model
        attn = model.arch == "attn"
        if attn:  # Gram coupling (Prop 4.5): attention recomputed over the perturbed set
            model.set_attention(ds.X_train)
        try:
            res, _ = kernel_influence(model, ds, lam=s["lam"], device=s["device"],
                                      X_test=X_test, Y_test=Y_test, check=False)
        finally:
            if attn:  # back to the attention over the original training set
                model.set_attention(self.X_orig)
        return _host(res.scores)


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def kernel_lipschitz_of(model, X_train, *, n_points=8, n_random=8, h=1e-2, seed=0):
    """L_K of the trained eNTK rows k(x) = K_m(x, X_train), attention operator fixed, and its
    profile over finite-difference steps (:func:`ntkcore.malleability.lipschitz_by_step`).

    Uses :func:`ntkcore.malleability.kernel_lipschitz` with the model's closed-form eNTK and
    the local Jacobian dk/dx = diag(s(x)) Phi J_phi(x) (activation pattern s frozen;
    J_phi by autograd through the feature map; identity for 2L-ReLU), at ``n_points`` seeded
    training points.
    """
    import torch
    from torch.autograd.functional import jacobian as autograd_jacobian

    from ..nn import closed_form_entk

    rng = np.random.default_rng(seed)
    pts = X_train[np.sort(rng.choice(X_train.shape[0], min(n_points, X_train.shape[0]),
                                     replace=False))]
    F = model.features_numpy(X_train)
    W = model.W_numpy()
    SF = (F @ W.T > 0).astype(np.float64)
    m64 = copy.deepcopy(model).double().cpu()  # the Jacobian is taken at host points

    def rows(Q):
        return closed_form_entk(model, Q, X_train)

    def jac(x):
        phi = model.features_numpy(x[None, :])
        s = SF @ (phi @ W.T > 0).astype(np.float64)[0] / W.shape[0]  # (n,)
        J_phi = autograd_jacobian(lambda z: m64.features(z[None, :])[0],
                                  torch.from_numpy(x.copy())).numpy()
        return (s[:, None] * F) @ J_phi

    estimate = mm.kernel_lipschitz(rows, pts, jacobian=jac, n_random=n_random, h=h, seed=seed)
    profile = mm.lipschitz_by_step(rows, pts, n_random=max(1, n_random), seed=seed)
    return estimate, profile


# --------------------------------------------------------------------------- one model

def _check_curated_sizes(n: int, tau: float, k: int):
    """Refuse, before any training, sizes for which Curated's metrics mean nothing.

    Curated removes H_t (about ceil(tau n) points, fewer with ties) and compares the scores of
    the rest: at most n - ceil(tau n) points in the worst case. Top-K stability over them is 1
    by definition when K reaches their count, and their own top tau is empty when
    tau (n - ceil(tau n)) < 1.
    """
    rest = n - math.ceil(tau * n - 1e-9)  # tau n as typed, not 1 ulp above an integer
    if tau * rest < 1:
        raise ParameterError(f"tau: Curated keeps {rest} of n_train={n} points, and the top "
                             f"tau={tau:g} of {rest} points is empty; lower --tau or raise "
                             f"--n-train (or leave Curated out of --interventions)")
    if k >= rest:
        raise ParameterError(f"topk: expected K < {rest} (the n_train - ceil(tau n_train) points "
                             f"Curated keeps; n_train={n}, tau={tau:g}), got {k}; top-K "
                             f"stability over all of them is 1 by definition")


def _metrics(I0, I1, tau, k):
    return {"flip_rate": mm.flip_rate(I0, I1, tau), "spearman": mm.spearman(I0, I1),
            "topk": mm.topk_stability(I0, I1, k)}


def _summarise(per_point: list) -> dict:
    out = {}
    for key in ("flip_rate", "spearman", "topk"):
        vals = [p[key] for p in per_point]
        out[key] = {**mm.mean_ci95(vals), "values": vals}
    return out


def evaluate_model(model, ds, s, sel, *, adv_eps=None, progress=True, log=print) -> dict:
    """All interventions x attacks for one trained model; returns its results dict."""
    from tqdm.auto import tqdm

    from ..nn import closed_form_entk, predict
    from .pipeline import accuracy_from_outputs, kernel_influence

    timings = {}
    t0 = time.perf_counter()
    res0, _ = kernel_influence(model, ds, lam=s["lam"], device=s["device"],
                               X_test=ds.X_test[sel], Y_test=ds.Y_test[sel])
    I0 = _host(res0.scores)
    timings["influence"] = time.perf_counter() - t0
    T, n = I0.shape
    H = [mm.high_influence_set(I0[t], s["tau"]) for t in range(T)]
    scorer = _Scorer(model, ds, s, sel, adv_eps, progress)
    result = {"test_accuracy_network": accuracy_from_outputs(ds, predict(model, ds.X_test),
                                                             ds.y_test),
              "test_accuracy_kernel_shown": accuracy_from_outputs(
                  ds, _host(res0.predictions), ds.y_test[sel]),
              "high_influence_set_size": [int(h.size) for h in H],
              "positive_share_of_H": float(np.mean([np.mean(I0[t, H[t]] > 0)
                                                    for t in range(T)])),
              "interventions": {}, "attacks": {}}
    #: the scores after each intervention, (T, n) on the original training slots (Curated:
    #: NaN at the removed H_t), saved beside I_orig so every metric can be recomputed
    perturbed = {}

    if "curated" in s["interventions"]:
        t0 = time.perf_counter()
        pts = []
        for t in tqdm(range(T), disable=not progress, desc=f"{model.arch} curated",
                      leave=False):
            keep = np.setdiff1d(np.arange(n), H[t])
            I1 = scorer(replace_training(ds, keep=keep), rows=[t])[0]
            perturbed.setdefault("curated", np.full((T, n), np.nan))[t, keep] = I1
            pts.append(_metrics(I0[t, keep], I1, s["tau"], s["topk"]))
        result["interventions"]["curated"] = {"none": _summarise(pts)}
        timings["curated"] = time.perf_counter() - t0

    for attack in s["attacks"]:
        t0 = time.perf_counter()
        adv, stats = attack_pixels(model, ds, attack, eps=s["eps"], step=s["step"],
                                   iters=s["iters"], momentum=s["momentum"], progress=progress)
        result["attacks"][attack] = stats
        timings[f"attack_{attack}"] = time.perf_counter() - t0
        if "transformed" in s["interventions"]:
            t0 = time.perf_counter()
            pts = []
            for t in tqdm(range(T), disable=not progress,
                          desc=f"{model.arch} transformed {attack}", leave=False):
                px = ds.pixels_train.copy()
                px[H[t]] = adv[H[t]]
                I1 = scorer(replace_training(ds, pixels=px), rows=[t])[0]
                perturbed.setdefault(f"transformed_{attack}", np.empty((T, n)))[t] = I1
                pts.append(_metrics(I0[t], I1, s["tau"], s["topk"]))
            result["interventions"].setdefault("transformed", {})[attack] = _summarise(pts)
            timings[f"transformed_{attack}"] = time.perf_counter() - t0
        if "adversarial" in s["interventions"]:
            t0 = time.perf_counter()
            I1 = scorer(replace_training(ds, pixels=adv))
            perturbed[f"adversarial_{attack}"] = np.asarray(I1)
            pts = [_metrics(I0[t], I1[t], s["tau"], s["topk"]) for t in range(T)]
            result["interventions"].setdefault("adversarial", {})[attack] = _summarise(pts)
            timings[f"adversarial_{attack}"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    lip, profile = kernel_lipschitz_of(model, ds.X_train, n_points=s["lipschitz_points"],
                                       n_random=s["lipschitz_directions"], seed=s["seed"])
    result["intrinsic"] = {
        "L_K": lip.value, "L_K_per_point": lip.per_point, "jacobian_norm": lip.jacobian_norm,
        "y_norm": float(np.linalg.norm(ds.Y_train)), "lam": s["lam"],
        "S": mm.intrinsic_sensitivity(lip.value, ds.Y_train, s["lam"]),
        "estimator": lip.estimator,
        "L_K_by_step": {f"{h:g}": v for h, v in profile.items()},
        "S_by_step": {f"{h:g}": mm.intrinsic_sensitivity(v, ds.Y_train, s["lam"])
                      for h, v in profile.items()}}
    timings["lipschitz"] = time.perf_counter() - t0

    if n <= COMPLEXITY_MAX_N:
        K = closed_form_entk(model, ds.X_train)
        dec = mm.complexity_by_decile(K, _host(res0.alpha), I0)
        result["complexity"] = {"mean_complexity": dec.mean_complexity,
                                "mean_influence": dec.mean_influence,
                                "total_complexity": dec.total_complexity,
                                "definition": "c_i = alpha_i . (K alpha)_i (share of ||f||_H^2);"
                                              " groups by mean influence over the test points"}
        result["_deciles"] = dec
    result["retrainings"] = scorer.trainings
    result["timings"] = timings
    result["_scores"] = {"original": I0, **perturbed}
    return result


# --------------------------------------------------------------------------- driver

def load_for(cfg, s):
    """Load the data of resolved settings ``s``; a preset's n_train is capped at what the
    selected classes have (digits 3,8 has 287 training images), an explicit one is not."""
    from ..data import load_dataset

    kw = dict(root=s["data_root"], classes=s["classes"], n_test=s["n_test"], seed=s["seed"],
              download=s["download"], dim=s.get("dim"))
    n = s["n_train"]
    if cfg.n_train is None and n is not None:
        available = load_dataset(s["dataset"], n_train=None, **{**kw, "n_test": 0}).n_train
        n = min(n, available)
    return load_dataset(s["dataset"], n_train=n, **kw)


def run_malleability(cfg: MalleabilityConfig, out_dir=None, *, overwrite: bool = False,
                     progress: bool = True, log=print) -> dict:
    """Run the malleability experiment; write table.md, results.json, figures to ``out_dir``.

    Each finished (architecture, training) run is kept in ``out_dir`` as it completes; the
    same command rerun on an unfinished folder resumes, skipping the runs already finished.
    Returns the results dict (also written as results.json when ``out_dir`` is given).
    """
    import contextlib

    from .output import RunFolder
    from .pipeline import torch_device, train_network

    s = cfg.resolved()
    t_all = time.perf_counter()
    ds = load_for(cfg, s)
    if s["test_points"] > ds.n_test:
        raise ParameterError(f"test_points: expected at most {ds.n_test} (the test set size), "
                             f"got {s['test_points']}")
    if s["topk"] >= ds.n_train:  # the top K of all n points are all n points: stability 1
        raise ParameterError(f"topk: expected K < n_train ({ds.n_train}), got {s['topk']}; "
                             f"top-K stability over all training points is 1 by definition")
    if "curated" in s["interventions"]:
        _check_curated_sizes(ds.n_train, s["tau"], s["topk"])
    from ..nn._memory import check_model_fits
    for arch in s["archs"]:  # refused before any training
        check_model_fits(arch, ds.dim, s["width"], ds.Y_train.shape[1],
                         device=torch_device(s["device"]))
    sel = np.sort(np.random.default_rng(s["seed"]).choice(ds.n_test, s["test_points"],
                                                          replace=False))
    log(f"data: {ds.name} classes={list(ds.classes)} ({', '.join(ds.class_names)}) "
        f"n_train={ds.n_train} n_test={ds.n_test} d={ds.dim}; {len(sel)} test points")
    config, about = experiment_settings(s, ds)
    folder = (RunFolder(out_dir, "malleability", config, about=about, overwrite=overwrite)
              if out_dir else contextlib.nullcontext())
    with folder as run:
        modes = [("standard", None)] + ([("adv-trained", s["eps"])] if s["adv_train"] else [])
        runs, scores = [], {}
        for mode, adv_eps in modes:
            for arch in s["archs"]:
                key = f"{arch}_{mode}"
                if run is not None and run.done(key):
                    log(f"[{mode}] {ARCH_LABEL[arch]}: resumed (finished by an earlier run "
                        f"of these settings)")
                    r, scores[key] = _load_run(run, key)
                    runs.append(r)
                    continue
                log(f"[{mode}] {ARCH_LABEL[arch]}: training width {s['width']}, "
                    f"{s['epochs']} epochs")
                t0 = time.perf_counter()
                model, tr = train_network(ds, arch, s["width"], epochs=s["epochs"],
                                          lam=s["lam"], seed=s["seed"], adv_eps=adv_eps,
                                          progress=progress, device=s["device"])
                t_train = time.perf_counter() - t0
                r = evaluate_model(model, ds, s, sel, adv_eps=adv_eps, progress=progress,
                                   log=log)
                r["timings"]["training"] = t_train
                r.update(arch=arch, training=mode, train_accuracy=tr.train_accuracy,
                         final_objective=tr.history[-1] if tr.history else None)
                scores[key] = r.pop("_scores")
                runs.append(r)
                if run is not None:  # a long run keeps what it finished if it stops later
                    _save_run(run, key, r, scores[key])
        results = {"command": "malleability", "config": s,
                   "data": {"name": ds.name, "classes": list(ds.classes),
                            "class_names": list(ds.class_names), "n_train": ds.n_train,
                            "n_test": ds.n_test, "dim": ds.dim, "binary": ds.binary,
                            "source": ds.source},
                   "test_points": sel, "runs": runs,
                   "seconds": time.perf_counter() - t_all}
        results["table"] = format_table(results)
        if run is not None:
            write_outputs(run, results, scores)
            run.finish(drop=[_partial_name(k) for k in scores])
        for r in runs:
            r.pop("_deciles", None)
        return results


def _partial_name(key: str) -> str:
    return f"partial_{key}.npz"


def _save_run(run, key, r, scores):
    """Keep one finished run: its arrays in partial_<key>.npz, its metrics in the manifest."""
    from dataclasses import asdict

    from .output import atomic_write_npz
    dec = r.get("_deciles")
    arrays = {f"scores__{name}": v for name, v in scores.items()}
    if dec is not None:
        arrays.update({f"deciles_{k}": np.asarray(v) for k, v in asdict(dec).items()})
    atomic_write_npz(run.output(_partial_name(key)), **arrays)
    run.record(key, [_partial_name(key)],
               result={k: v for k, v in r.items() if not k.startswith("_")})


def _load_run(run, key):
    """(run dict, scores) of a run finished by an earlier invocation (see _save_run)."""
    r = dict(run.info(key, require=("result",))["result"])
    z = run.load_npz(_partial_name(key))
    scores = ({"original": z["scores"]} if "scores" in z else  # before session 6
              {k[len("scores__"):]: v for k, v in z.items() if k.startswith("scores__")})
    fields = {k[len("deciles_"):]: v for k, v in z.items() if k.startswith("deciles_")}
    if fields:
        fields["total_complexity"] = float(fields["total_complexity"])
        r["_deciles"] = mm.ComplexityDeciles(**fields)
    return r, scores
