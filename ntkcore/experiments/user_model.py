"""``ntkcore influence --model module:factory [--weights file.pt]``: a user's own trained model.

The model is built by the user's factory, its state_dict loaded, and evaluated (eval mode) on the
same preprocessed data rows the paper's networks see: ``(n, d)`` rows by default, or images
``(n, C, H, W)`` with ``model_input="images"``. Its empirical NTK (sum over outputs / C, the
generic blocked route of ``ntkcore.empirical_ntk``) feeds the same exact LOO influence and the
same output files as the built-in architectures; no training happens here.

``cfg.device`` is honoured as on the built-in route: "cuda" without a usable GPU is a
BackendError; on the GPU the eNTK runs in torch on CUDA (where torch has it) and the solve on
CuPy. The options that only shape the built-in networks (arch, width, epochs, preset) are
left out of the run's recorded config. The run's identity is the data, the model (its spec and
:func:`model_fingerprint`: source file, module tree and state_dict), its weights file's hash
and the model input: the same folder may be scored again with another solver or display
options (its previous results are replaced), but not with another model or data.
"""

from __future__ import annotations

import time

import numpy as np

from ..backend import get_backend
from ..errors import NonFiniteError, ParameterError, ShapeError
from ..ntk._entk_user import USER_MODULE_PREFIX
from .influence_run import (FLOAT64_SCORE_LIMIT, SOLVE_INFO, _figure, _top_table, versions,
                            write_solve)
from .output import RunFolder, atomic_write_json, check_folder_name
from .pipeline import (
    InfluenceConfig,
    accuracy_from_outputs,
    check_solver_fits,
    config_dict,
    data_identity,
    load_data,
    run_settings,
    torch_device,
)

MODEL_INPUTS = ("rows", "images")
#: InfluenceConfig fields that configure the built-in networks only (not a user's model).
BUILTIN_ONLY = ("arch", "width", "epochs", "preset")


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
    cfg.validate()
    check_folder_name(out_dir)  # before the data, not after the training
    be = get_backend(cfg.device)  # validates the device before any work, as run_influence
    entk_device = torch_device(be.name)
    timings = {}
    t0 = time.perf_counter()
    ds = load_data(cfg)
    timings["data"] = time.perf_counter() - t0
    log(f"data: {ds.name} classes={list(ds.classes)} n_train={ds.n_train} n_test={ds.n_test}")
    check_solver_fits(cfg, ds.n_train, be.name, n_test=ds.n_test,  # before the eNTK
                      n_outputs=ds.Y_train.shape[1], private=False)
    from ..ntk.empirical import load_user_model

    t0 = time.perf_counter()
    model = load_user_model(spec, weights)  # before the folder: its content is the identity
    timings["model_load"] = time.perf_counter() - t0
    identity = {**data_identity(cfg, ds), "model": spec, "weights": _file_hash(weights),
                "model_content": model_fingerprint(spec, model), "model_input": model_input}
    config, about = run_settings(cfg, ds, be.name, identity, drop=BUILTIN_ONLY)
    with RunFolder(out_dir, "influence", config, identity=identity, about=about,
                   overwrite=overwrite) as run:
        if run.changed:
            log(f"replacing the results in {run.path} ({', '.join(run.changed)} changed; same "
                f"model and data)")
        return _score(run, cfg, spec, weights, model, ds, be, entk_device, model_input,
                      timings)


def model_fingerprint(spec: str, model) -> dict:
    """What identifies a user's model beyond its spec string: blake2b of the source file the
    spec names (or the module's file) and, under "local_imports", of the other loaded modules
    in that file's folder tree (a helper module it imports); of the module tree as torch
    prints it (ReLU -> Tanh changes it), and of every state_dict entry (name, dtype, shape,
    bytes). A run folder scored with one model is never resumed with another that has the
    same spec."""
    import hashlib
    import importlib.util
    from pathlib import Path

    import torch

    def digest(data: bytes) -> str:
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    target = spec.rsplit(":", 1)[0]
    try:
        if target.endswith(".py") or "/" in target:
            source = Path(target)
        else:
            found = importlib.util.find_spec(target)
            source = Path(found.origin) if found and found.origin else None
        code = digest(source.read_bytes()) if source and source.is_file() else None
    except (ImportError, OSError, ValueError):
        code = None
    local = _local_imports(source, digest) if code else None
    state = hashlib.blake2b(digest_size=16)
    for name, value in sorted(model.state_dict().items()):
        state.update(f"{name}|{_entry_bytes(value, torch)!r}|".encode())
    fingerprint = {"source": code, "structure": digest(repr(model).encode()),
                   "state": state.hexdigest()}
    if local:  # only when there are some: run folders of self-contained models still resume
        fingerprint["local_imports"] = local
    return fingerprint


def _local_imports(source, digest):
    """blake2b of the sources of the loaded modules (other than ``source``) under the folder
    of ``source`` -- for a package module, of its top-level package -- outside site-packages
    and ntkcore; None when there are none. Not the running script (``__main__``, say a driver
    beside the model) nor other user models loaded by this process."""
    import sys
    from pathlib import Path
    source = source.resolve()
    root = source.parent
    while (root / "__init__.py").is_file() and (root.parent / "__init__.py").is_file():
        root = root.parent  # up to the top-level package
    found = []
    for name, module in list(sys.modules.items()):
        f = getattr(module, "__file__", None)
        if not isinstance(f, str) or not Path(f).is_absolute() \
                or name.split(".")[0] == "ntkcore" or name in ("__main__", "__mp_main__") \
                or name.startswith(USER_MODULE_PREFIX):
            continue  # (some extension modules carry a bare file name)
        path = Path(f).resolve()
        if path == source or path.suffix != ".py" or root not in path.parents \
                or {"site-packages", "dist-packages"} & set(path.parts):
            continue
        try:
            found.append((str(path.relative_to(root)), digest(path.read_bytes())))
        except OSError:  # deleted since it was imported: what ran is no longer known
            found.append((str(path.relative_to(root)), None))
    return digest(repr(sorted(found)).encode()) if found else None


def _entry_bytes(value, torch) -> bytes:
    """One state_dict entry for the fingerprint: a tensor's dtype, shape and bytes (sparse
    tensors densified); a lazy module's uninitialised parameter by its kind (its forward
    will draw it); anything else (``get_extra_state`` objects) by its repr."""
    if isinstance(value, torch.nn.parameter.UninitializedTensorMixin):
        return b"uninitialised"
    if not isinstance(value, torch.Tensor):
        return repr(value).encode()
    t = value.detach().cpu()
    if t.layout != torch.strided:
        t = t.to_dense()
    head = f"{t.dtype}|{tuple(t.shape)}|".encode()  # the shape before flattening
    return head + t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _score(run, cfg, spec, weights, model, ds, be, entk_device, model_input, timings) -> dict:
    """The user's model's eNTK, exact influence and the outputs, into ``run``; the solve is
    a stage of ``run`` (kept when a later step fails, reused by a rerun)."""
    import torch

    dtype = _model_dtype(model, spec)
    Xtr = torch.as_tensor(model_inputs(ds, ds.X_train, model_input))
    Xte = torch.as_tensor(model_inputs(ds, ds.X_test, model_input))
    row = Xte[:1].to(dtype, copy=True)
    try:
        with torch.no_grad():
            probe = model(row)
    except Exception as e:  # the user's forward failed on our rows: say on what
        raise ParameterError(f"model: {spec} failed on one row of shape "
                             f"{tuple(Xte[:1].shape)} (model_input={model_input!r}): "
                             f"{type(e).__name__}: {e}") from e
    if not torch.equal(row, Xte[:1].to(dtype)):  # x.mul_(2) in forward: every eNTK block
        # would see other inputs (and the data set's arrays would change under it)
        raise ParameterError(f"model: {spec} changes its input in place in forward (an "
                             f"in-place op on x); the eNTK needs a forward without side "
                             f"effects on its input: use the out-of-place op (x * 2, not "
                             f"x.mul_(2))")
    if not isinstance(probe, torch.Tensor):
        raise ParameterError(f"model: expected {spec} to return a tensor of shape (b,) or "
                             f"(b, C), got {type(probe).__name__}")
    if probe.ndim not in (1, 2) or probe.shape[0] != 1:  # the eNTK would flatten extra dims
        raise ShapeError(f"model: expected {spec} to return outputs of shape (b,) or (b, C) "
                         f"(one row per input row), got shape {tuple(probe.shape)} for b = 1 "
                         f"row; flatten or select the outputs in the model's forward")
    n_out = probe.shape[1] if probe.ndim == 2 else 1
    if ds.Y_train.shape[1] != n_out:
        raise ParameterError(f"model: expected {ds.Y_train.shape[1]} outputs for {ds.n_classes} classes "
                             f"({'binary: one output' if ds.binary else 'one per class'}), "
                             f"got {n_out}")
    with torch.no_grad():
        net_out = model(Xte.to(dtype)).double().cpu().numpy()
    bad = int((~np.isfinite(net_out.reshape(len(net_out), -1))).any(axis=1).sum())
    if bad:  # its accuracy would be argmax over NaN, a number that means nothing
        raise NonFiniteError(f"model: {spec} returned NaN or Inf on {bad} of {len(net_out)} "
                             f"test rows; check its weights (or inputs: model_input="
                             f"{model_input!r})")
    solved = _solve(run, cfg, ds, model, Xtr, Xte, net_out, be, entk_device, timings)
    scores, predictions, net_out = (solved["scores"], solved["kernel_predictions"],
                                    solved["network_outputs"])
    store32 = scores.dtype == np.float32
    shown = list(range(min(cfg.show, ds.n_test)))
    t0 = time.perf_counter()
    fig = (_figure(ds, scores, shown, cfg.top_k, run.output("influence_examples.png"))
           if shown else None)  # --show 0: no figure
    timings["writing"] = time.perf_counter() - t0
    summary = {
        "command": "influence",
        "model": {"spec": spec, "weights": str(weights) if weights else None,
                  "input": model_input, "outputs": n_out},
        "config": {k: v for k, v in config_dict(cfg).items() if k not in BUILTIN_ONLY},
        "versions": versions(),
        "device": be.name,
        "entk_device": str(entk_device),
        "data": {"name": ds.name, "source": ds.source, "classes": list(ds.classes),
                 "n_train": ds.n_train, "n_test": ds.n_test, "dim": ds.dim,
                 "binary": ds.binary},
        "accuracy": {"network_test": accuracy_from_outputs(ds, net_out, ds.y_test),
                     "kernel_predictor_test": accuracy_from_outputs(ds, predictions,
                                                                    ds.y_test)},
        "solver": solved["solver"],
        "solver_reason": solved["diagnostics"].get("solver_reason"),
        "diagnostics": solved["diagnostics"],
        "timings": {**timings, "influence_stages": solved["influence_stages"]},
        "scores_reused_from_influence_npz": solved["reused"],
        "scores_dtype": "float32" if store32 else "float64",
        "top_influences": _top_table(ds, scores, shown, cfg.top_k),
        "files": ["influence.npz", "summary.json", *([fig.name] if fig else []), "run.json"],
    }
    atomic_write_json(run.output("summary.json"), summary)
    run.finish()
    return summary


def _solve(run, cfg, ds, model, Xtr, Xte, net_out, be, entk_device, timings) -> dict:
    """The model's eNTK and LOO influence, written to influence.npz and recorded as the
    "solve" stage (as the built-in route does), so an interruption while the figure or the
    summary is written keeps it; reused from there by a rerun with the same SOLVE_FIELDS."""
    from ..influence import loo_influence
    from ..ntk.empirical import model_kernels

    if run.done("solve"):
        keys = ("scores", "kernel_predictions", "network_outputs")
        stored = run.load_npz("influence.npz", keys)
        arrays = {k: stored[k] for k in keys}
        return {**arrays, **run.info("solve", require=SOLVE_INFO), "reused": True}
    t0 = time.perf_counter()
    K, K_test, entk = model_kernels(model, Xtr, Xte, device=entk_device)
    res = loo_influence(_on_backend(K, be), be.asarray(ds.Y_train), _on_backend(K_test, be),
                        be.asarray(ds.Y_test), lam=cfg.lam, solver=cfg.solver,
                        top_k=cfg.top_k, **cfg.solver_options)
    res.diagnostics["entk"] = entk
    del K, K_test
    be.synchronize()
    timings["influence"] = time.perf_counter() - t0
    scores = be.to_host(res.scores)
    store32 = scores.size > FLOAT64_SCORE_LIMIT
    arrays = {"scores": scores.astype(np.float32 if store32 else np.float64),
              "kernel_predictions": be.to_host(res.predictions),
              "network_outputs": net_out.reshape(len(net_out), -1)}
    return write_solve(run, ds, res, be, arrays)


def _file_hash(path):
    """blake2b of a weights file (None without one): a resume must use the same weights."""
    if not path:
        return None
    import hashlib
    from pathlib import Path
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return str(path)  # unreadable: load_user_model says so with its own message


def _model_dtype(model, spec):
    """The dtype the model computes in (its first floating parameter or buffer); a model
    without parameters has no eNTK."""
    import torch
    params = list(model.parameters())
    if not params:
        raise ParameterError(f"model: expected a model with parameters to differentiate, got "
                             f"{spec} with none (its empirical NTK would be zero)")
    tensors = params + list(model.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()),
                torch.get_default_dtype())


def _on_backend(K, be):
    """The eNTK block (a torch tensor or NumPy array) as float64 on the run's backend: a CUDA
    tensor is shared with CuPy (no copy), a host one is copied to the device when it runs
    there."""
    import torch
    if isinstance(K, torch.Tensor):
        K = K.detach().to(torch.float64)
        if K.is_cuda and be.name == "cuda":
            torch.cuda.synchronize()  # CuPy reads the memory on its own stream
            return be.asarray(K)
        K = K.cpu().numpy()
    return be.asarray(K, dtype=np.float64)
