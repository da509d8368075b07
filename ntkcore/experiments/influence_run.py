"""``ntkcore influence``: train the network, build its eNTK, score every training point.

Stages (each timed): data, training, LOO influence (kernel assembly, factorisation, scoring),
writing. Outputs, each written atomically into the output folder:

- ``model.pt``       trained weights (written right after training, so a later failure keeps them:
                     the command rerun on the folder with the same training settings resumes
                     from them instead of training, whatever its solver or display options)
- ``influence.npz``  scores (T, n), train/test indices into the original files, labels,
                     kernel predictions, network outputs, LOO residuals, top-k indices,
                     alpha (the "solve" stage: reused when only display options change)
- ``summary.json``   config, versions, timings, diagnostics, accuracies, top-5 helpful/harmful
                     training points for each shown test point
- ``influence_examples.png``  most helpful / harmful training images for a few test points
                     (the paper's Figure 3)
- ``run.json``       the manifest: command, settings, finished stages, files (see output.py)
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np

from ..backend import get_backend
from ..errors import ParameterError
from .output import (RunFolder, atomic_savefig, atomic_write_json, atomic_write_npz,
                     check_folder_name)
from .pipeline import (InfluenceConfig, accuracy_from_outputs, check_solver_fits, config_dict,
                       kernel_influence, load_data, run_settings, train_network,
                       training_identity)

# Scores above this many entries are stored as float32 (halves the file; stated in summary).
FLOAT64_SCORE_LIMIT = 2 ** 27


def run_influence(cfg: InfluenceConfig, out_dir, *, overwrite: bool = False,
                  progress: bool = True, log=print) -> dict:
    """Run the whole influence job and write its outputs; returns the summary dict.

    A run in ``out_dir`` with the same training settings (:func:`training_identity`) is
    resumed, unfinished or finished: the model it trained is loaded from its ``model.pt``
    instead of trained again, and the rest (solve, scores, figures) is computed with this
    run's settings. Other training settings are refused unless ``overwrite``.
    """
    cfg.validate()
    check_folder_name(out_dir)  # before the data, not after the training
    epochs = cfg.resolved_epochs()
    be = get_backend(cfg.device)  # validates the device before any work
    timings = {}

    with _StageBar(["data", "training", "influence", "writing"], enabled=progress) as stages:
        t0 = time.perf_counter()
        ds = load_data(cfg)
        timings["data"] = time.perf_counter() - t0
        stages.done()
        log(f"data: {ds.name} classes={list(ds.classes)} n_train={ds.n_train} n_test={ds.n_test} "
            f"d={ds.dim} ({ds.source or 'generated'})")
        if ds.n_test < 1:
            raise ParameterError("n_test: influence is scored on test points; expected at least "
                                 "one, got 0")
        check_solver_fits(cfg, ds.n_train, be.name, n_test=ds.n_test,  # refused before training
                          n_outputs=ds.Y_train.shape[1])
        identity = training_identity(cfg, ds, be.name)
        config, about = run_settings(cfg, ds, be.name, identity)
        with RunFolder(out_dir, "influence", config, identity=identity, about=about,
                       overwrite=overwrite) as run:
            return _stages(run, cfg, ds, be, epochs, timings, stages, progress, log)


def _stages(run, cfg, ds, be, epochs, timings, stages, progress, log) -> dict:
    """Training (or its resume from model.pt), influence and writing, into ``run``."""
    out = run.path
    t0 = time.perf_counter()
    resumed_training = run.done("training")
    if resumed_training:
        trained = run.info("training", require=TRAINING_INFO)
        model = _load_model(ds, cfg, out / "model.pt", be.name)
        changed = (f"; {', '.join(run.changed)} changed, computing the rest again"
                   if run.changed else "")
        log(f"training: reusing the trained model from {out / 'model.pt'} (same training "
            f"settings{changed})")
    else:
        run.forget("solve")  # its scores belong to the model trained before, if any
        model, train_res = train_network(ds, cfg.arch, cfg.width, epochs=epochs, lam=cfg.lam,
                                         seed=cfg.seed, progress=progress, device=be.name)
        _save_model(model, run.output("model.pt"))
        trained = {"epochs": train_res.epochs, "final_objective":  # keys: TRAINING_INFO
                   train_res.history[-1] if train_res.history else None,
                   "train_accuracy": train_res.train_accuracy,
                   "training_device": str(next(model.parameters()).device)}
        run.record("training", ["model.pt"], **trained)
    timings["training"] = time.perf_counter() - t0
    stages.done()

    import torch
    with torch.no_grad():
        from ..nn import predict
        net_out_test = predict(model, ds.X_test)
    net_acc = accuracy_from_outputs(ds, net_out_test, ds.y_test)

    t0 = time.perf_counter()
    solved = _solve(run, cfg, ds, model, be, net_out_test, log)
    timings["influence"] = time.perf_counter() - t0
    stages.done()
    scores, preds = solved["scores"], solved["kernel_predictions"]
    kernel_acc = accuracy_from_outputs(ds, preds, ds.y_test)

    t0 = time.perf_counter()
    shown = _shown_test_points(ds, cfg.show)
    top = _top_table(ds, scores, shown, cfg.top_k)
    fig_path = (_figure(ds, scores, shown, cfg.top_k, run.output("influence_examples.png"))
                if shown else None)  # --show 0: no figure
    from .complexity import complexity_figure
    deciles = complexity_figure(None, solved["alpha"], scores,
                                run.output("complexity_deciles.png"), Y=ds.Y_train,
                                lam=cfg.lam,
                                n_groups=min(10, ds.n_train),
                                title=f"Figure 4: {ds.name}, {cfg.arch}")
    timings["writing"] = time.perf_counter() - t0
    stages.done()

    summary = {
        "command": "influence",
        "config": config_dict(cfg),
        "versions": versions(),
        "device": be.name,
        "training_device": trained["training_device"],
        "data": {"name": ds.name, "source": ds.source, "classes": list(ds.classes),
                 "class_names": list(ds.class_names), "n_train": ds.n_train,
                 "n_test": ds.n_test, "dim": ds.dim, "binary": ds.binary},
        "training": {"epochs": trained["epochs"],
                     "final_objective": trained["final_objective"],
                     "train_accuracy": trained["train_accuracy"],
                     "resumed_from_model_pt": resumed_training},
        "accuracy": {"network_test": net_acc, "kernel_predictor_test": kernel_acc},
        "solver": solved["solver"],
        "solver_reason": solved["diagnostics"].get("solver_reason"),
        "diagnostics": solved["diagnostics"],
        "timings": {**timings, "influence_stages": solved["influence_stages"]},
        "scores_reused_from_influence_npz": solved["reused"],
        "scores_dtype": str(scores.dtype),
        "top_influences": top,
        "complexity_by_influence_decile": {
            "definition": "c_i = alpha_i . (K alpha)_i (share of ||f||_H^2); groups by mean "
                          "influence over test points, 1 = most harmful",
            "mean_complexity": deciles.mean_complexity, "mean_influence": deciles.mean_influence},
        "files": ["model.pt", "influence.npz", "summary.json",
                  *([Path(fig_path).name] if fig_path else []),  # --show 0: no figure
                  "complexity_deciles.png", "run.json"],
    }
    atomic_write_json(run.output("summary.json"), summary)
    run.finish()
    return summary


#: settings the solve depends on beyond the trained model (its stage is redone when one changes)
SOLVE_FIELDS = ("solver", "solver_options", "device_resolved", "top_k")
#: what the "training" and "solve" stages record, read back when a run resumes
TRAINING_INFO = ("epochs", "final_objective", "train_accuracy", "training_device")
SOLVE_INFO = ("solver", "diagnostics", "influence_stages")


def _solve(run, cfg, ds, model, be, net_out_test, log) -> dict:
    """The LOO influence of the trained model, written to influence.npz and recorded as the
    "solve" stage; reused from there when an earlier run of this folder finished it with the
    same SOLVE_FIELDS (e.g. only ``--show`` changed); a model trained again has had that
    record forgotten first (:func:`_stages`). Host arrays and the solve's report."""
    path = run.file("influence.npz")
    if run.done("solve"):
        keys = ("scores", "kernel_predictions", "alpha")
        stored = run.load_npz("influence.npz", keys)
        arrays = {k: stored[k] for k in keys}
        log(f"influence: reusing the scores from {path} (same solver settings)")
        return {**arrays, **run.info("solve", require=SOLVE_INFO), "reused": True}
    res, _ = kernel_influence(model, ds, lam=cfg.lam, solver=cfg.solver, device=be.name,
                              top_k=cfg.top_k, **cfg.solver_options)
    be.synchronize()
    store32 = res.scores.size > FLOAT64_SCORE_LIMIT  # stored (and then used) as float32
    # converted where they are (on a GPU: half the bytes to copy, no host-side pass)
    scores = be.to_host(res.scores.astype(np.float32 if store32 else np.float64, copy=False))
    arrays = {"scores": scores,
              "kernel_predictions": be.to_host(res.predictions),
              "alpha": be.to_host(res.alpha)}
    return write_solve(run, ds, res, be, arrays, network_outputs=net_out_test)


def write_solve(run, ds, res, be, arrays: dict, **extra) -> dict:
    """Write influence.npz (``arrays`` and ``extra``, with the data's indices and labels, the
    LOO residuals and the top-k lists of ``res``) and record it as the "solve" stage of
    ``run``. Returns ``arrays`` with the stage's info (solver, diagnostics, timings)."""
    atomic_write_npz(run.output("influence.npz"), **arrays, **extra,
                     train_indices=ds.train_indices, test_indices=ds.test_indices,
                     y_train=ds.y_train, y_test=ds.y_test,
                     loo_residuals=be.to_host(res.loo_residuals),
                     top_helpful=be.to_host(res.top_helpful),
                     top_harmful=be.to_host(res.top_harmful))
    report = {"solver": res.solver, "diagnostics": res.diagnostics,
              "influence_stages": res.timings}
    run.record("solve", ["influence.npz"], depends_on=SOLVE_FIELDS, **report)
    return {**arrays, **run.info("solve"), "reused": False}


class _StageBar:
    """A progress bar over the pipeline's stages (training has its own per-epoch bar).

    Shown on a terminal only, and cleared when the run ends, by an error too: an error line
    then starts a line of its own instead of following the bar's text, and stderr that is a
    file or a pipe gets no carriage returns.
    """

    def __init__(self, names, *, enabled: bool):
        self.names = list(names)
        self.i = 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=len(self.names), desc=f"stage: {self.names[0]}", unit="stage",
                            leave=False, disable=None)  # None: off unless stderr is a terminal

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def done(self):
        self.i += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.i < len(self.names):
                self.bar.set_description(f"stage: {self.names[self.i]}")


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("ntkcore", "numpy", "scipy", "numba", "torch", "cupy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _save_model(model, path):
    import io

    import torch

    from .output import atomic_write_bytes
    buf = io.BytesIO()
    # host tensors, so the file loads on a machine without the GPU it was trained on
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_model(ds, cfg, path, device: str):
    """The network ``cfg`` describes, with the weights an earlier run saved to ``path``."""
    import torch

    from ..errors import CorruptDataError
    from ..nn import make_model
    from .pipeline import torch_device
    model = make_model(cfg.arch, ds.X_train, cfg.width, 1 if ds.binary else ds.n_classes,
                       seed=cfg.seed, device=torch_device(device))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say so, never a traceback
        # (not torch's own first line: for a damaged file it suggests weights_only=False,
        # i.e. unpickling whatever the file holds)
        raise CorruptDataError(f"{path}: cannot resume from it (not a readable state_dict: "
                               f"{type(exc).__name__}); pass --overwrite to train again"
                               ) from None
    try:
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - wrong keys or shapes, or not a dict at all
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CorruptDataError(f"{path}: cannot resume from it ({first}); pass --overwrite to "
                               f"train again") from None
    if hasattr(model, "set_attention"):
        # M = X^T X in float64 from the (identical, hashed) training rows, exactly as the
        # run that trained it had it; the state holds only its float32 cast
        model.set_attention(ds.X_train)
    return model


def top_indices(scores_row, k: int):
    """(helpful, harmful): of one row's k largest scores those > 0, and of its k smallest those
    < 0, ties to the smaller index (the order of TopK and of a stable argsort). A point whose
    removal would not lower (raise) the test loss is listed as neither: with fewer than k
    positive scores "helpful" is shorter than k rather than padded with harmful points."""
    top = np.argsort(-scores_row, kind="stable")[:k]
    bottom = np.argsort(scores_row, kind="stable")[:k]
    return top[scores_row[top] > 0], bottom[scores_row[bottom] < 0]


def _shown_test_points(ds, k: int):
    """The first ``k`` test points (the subset is already a seeded random draw)."""
    return list(range(min(k, ds.n_test)))


def _top_table(ds, scores, shown, k):
    rows = []
    for t in shown:
        helpful, harmful = top_indices(scores[t], k)
        entry = lambda i: {"train_position": int(i), "train_index": int(ds.train_indices[i]),
                           "label": ds.class_names[int(ds.y_train[i])],
                           "score": float(scores[t, i])}
        rows.append({"test_position": t, "test_index": int(ds.test_indices[t]),
                     "label": ds.class_names[int(ds.y_test[t])],
                     "helpful": [entry(i) for i in helpful],
                     "harmful": [entry(i) for i in harmful]})
    return rows


#: Images per side in Figure 3 (the summary and influence.npz keep all top_k).
FIGURE_MAX_K = 8
#: Test points (rows) in Figure 3; summary.json lists every shown point. A figure of
#: thousands of rows would take minutes and an image no viewer opens.
FIGURE_MAX_ROWS = 20


def _figure(ds, scores, shown, k, path):
    """Figure 3: each shown test image (the first FIGURE_MAX_ROWS), its k (at most
    FIGURE_MAX_K) most helpful and most harmful training images.

    One axes, each image drawn into its own cell (column c, row r: x in [c, c + 1], y in
    [r, r + 1]) with its title above it: 2k + 1 subplots per row and a tight layout over them
    took about 2 s of the quickstart's writing stage, this about 0.3 s."""
    k = min(k, FIGURE_MAX_K)
    shown = shown[:FIGURE_MAX_ROWS]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = max(1, len(shown)), 2 * k + 1
    fig = plt.figure(figsize=(1.3 * cols, 1.5 * rows + 0.3))
    ax = fig.add_axes((0.005, 0.0, 0.99, 1.0 - 0.3 / (1.5 * rows + 0.3)))
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)  # row 0 at the top
    ax.axis("off")
    test_imgs = ds.as_images(ds.pixels_test[shown]) if shown else []
    gray = len(ds.image_shape) != 3
    for r, t in enumerate(shown):
        helpful, harmful = top_indices(scores[t], k)
        picks = [(test_imgs[r], ds.class_names[int(ds.y_test[t])])]
        for kind, idx in (("+", helpful), ("-", harmful)):
            for i in idx:
                picks.append((ds.as_images(ds.pixels_train[[i]])[0],
                              f"{kind} {ds.class_names[int(ds.y_train[i])]}\n"
                              f"{scores[t, i]:+.1e}"))
        # a row with fewer than k helpful points leaves blanks before the harmful ones
        cells = list(range(1 + len(helpful))) + list(range(1 + k, 1 + k + len(harmful)))
        for c, (img, title) in zip(cells, picks):
            img = np.clip(img, 0, 1)
            if img.ndim == 1:  # synthetic data of a non-square dimension: a strip
                img, top = img[None, :], r + 0.55
            else:
                top = r + 0.3
            ax.imshow(img, cmap="gray" if gray else None, aspect="auto",
                      extent=(c + 0.1, c + 0.9, r + 0.95, top), interpolation="nearest")
            ax.text(c + 0.5, top - 0.03, title, ha="center", va="bottom", fontsize=6)
    fig.suptitle("Most helpful (+) and harmful (-) training points per test point", fontsize=8)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path
