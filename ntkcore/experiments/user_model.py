"""``ntkcore influence --model module:factory [--weights file.pt]``: a user's own trained model.

The model is built by the user's factory, its state_dict loaded, and evaluated (eval mode) on the
same preprocessed data rows the paper's networks see: ``(n, d)`` rows by default, or images
``(n, C, H, W)`` with ``model_input="images"``. Its empirical NTK (sum over outputs / C, the
generic blocked route of ``ntkcore.empirical_ntk``) feeds the same exact LOO influence and the
same output files as the built-in architectures; no training happens here.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import ParameterError
from .influence_run import FLOAT64_SCORE_LIMIT, _figure, _top_table, versions
from .output import atomic_write_json, atomic_write_npz, prepare_output_dir
from .pipeline import InfluenceConfig, accuracy_from_outputs, config_dict, load_data

MODEL_INPUTS = ("rows", "images")


def model_inputs(ds, X, how: str):
    """Rows (n, d) as the model wants them: unchanged, or reshaped to (n, C, H, W)."""
    if how not in MODEL_INPUTS:
        raise ParameterError(f"model_input: expected one of {MODEL_INPUTS}, got {how!r}")
    if how == "rows":
        return X
    shape = tuple(ds.image_shape)
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise ParameterError(f"model_input='images' needs image data, {ds.name} has shape {shape}")
    return X.reshape((X.shape[0],) + shape)


def run_user_model_influence(cfg: InfluenceConfig, spec: str, weights, out_dir, *,
                             overwrite: bool = False, progress: bool = True, log=print,
                             model_input: str = "rows") -> dict:
    import torch

    from ..ntk.empirical import influence_for_model, load_user_model

    cfg.validate()
    out = prepare_output_dir(out_dir, overwrite=overwrite)
    timings = {}
    t0 = time.perf_counter()
    ds = load_data(cfg)
    timings["data"] = time.perf_counter() - t0
    log(f"data: {ds.name} classes={list(ds.classes)} n_train={ds.n_train} n_test={ds.n_test}")
    t0 = time.perf_counter()
    model = load_user_model(spec, weights)
    timings["model_load"] = time.perf_counter() - t0
    Xtr = torch.as_tensor(model_inputs(ds, ds.X_train, model_input))
    Xte = torch.as_tensor(model_inputs(ds, ds.X_test, model_input))
    with torch.no_grad():
        probe = model(Xte[:1].to(next(model.parameters()).dtype))
    n_out = probe.shape[-1] if probe.ndim > 1 else 1
    Y, Yt = ds.Y_train, ds.Y_test
    if Y.shape[1] != n_out:
        raise ParameterError(f"model: expected {Y.shape[1]} outputs for {ds.n_classes} classes "
                             f"({'binary: one output' if ds.binary else 'one per class'}), "
                             f"got {n_out}")
    t0 = time.perf_counter()
    res = influence_for_model(model, Xtr, Y, Xte, Yt, lam=cfg.lam, solver=cfg.solver,
                              top_k=cfg.top_k, **cfg.solver_options)
    timings["influence"] = time.perf_counter() - t0
    with torch.no_grad():
        net_out = model(Xte.to(next(model.parameters()).dtype)).double().cpu().numpy()
    net_out = net_out.reshape(len(net_out), -1)
    scores = np.asarray(res.scores)
    shown = list(range(min(cfg.show, ds.n_test)))
    t0 = time.perf_counter()
    store32 = scores.size > FLOAT64_SCORE_LIMIT
    atomic_write_npz(out / "influence.npz",
                     scores=scores.astype(np.float32 if store32 else np.float64),
                     train_indices=ds.train_indices, test_indices=ds.test_indices,
                     y_train=ds.y_train, y_test=ds.y_test, kernel_predictions=res.predictions,
                     network_outputs=net_out, loo_residuals=res.loo_residuals,
                     top_helpful=res.top_helpful, top_harmful=res.top_harmful)
    fig = _figure(ds, scores, shown, cfg.top_k, out / "influence_examples.png")
    timings["writing"] = time.perf_counter() - t0
    summary = {
        "command": "influence",
        "model": {"spec": spec, "weights": str(weights) if weights else None,
                  "input": model_input, "outputs": n_out},
        "config": config_dict(cfg),
        "versions": versions(),
        "device": "cpu",
        "data": {"name": ds.name, "source": ds.source, "classes": list(ds.classes),
                 "n_train": ds.n_train, "n_test": ds.n_test, "dim": ds.dim,
                 "binary": ds.binary},
        "accuracy": {"network_test": accuracy_from_outputs(ds, net_out, ds.y_test),
                     "kernel_predictor_test": accuracy_from_outputs(ds, res.predictions,
                                                                    ds.y_test)},
        "solver": res.solver,
        "solver_reason": res.diagnostics.get("solver_reason"),
        "diagnostics": res.diagnostics,
        "timings": {**timings, "influence_stages": res.timings},
        "scores_dtype": "float32" if store32 else "float64",
        "top_influences": _top_table(ds, scores, shown, cfg.top_k),
        "files": ["influence.npz", "summary.json", fig.name],
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
