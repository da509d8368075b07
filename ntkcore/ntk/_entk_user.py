"""User-model entry points over :func:`~ntkcore.ntk.empirical.empirical_ntk`.

* :func:`load_user_model` builds a model from ``"module:factory"`` or
  ``"path/to/file.py:factory"`` and loads a state_dict (``torch.load(weights_only=True)``);
  the CLI's ``ntkcore influence --model module:factory --weights file.pt`` calls it.
* :func:`influence_for_model` computes the eNTK of that model on the training and test rows
  and the exact LOO influence through it (:func:`ntkcore.loo_influence`);
  :func:`model_kernels` is its kernel half (the CLI's ``--model`` route solves on its device).

Both are re-exported by ``ntkcore.ntk.empirical``.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import CorruptDataError, DataNotFoundError, ParameterError, ShapeError


def influence_for_model(model, X, Y, X_test, Y_test, *, lam=1e-3, solver="auto",
                        outputs="mean", params=None, strategy="auto", memory_budget=None,
                        dtype="float64", device=None, **influence_options):
    """LOO influence of every training row on every test row through the model's eNTK.

    K = eNTK(X, X) and K_test = eNTK(X_test, X) from :func:`empirical_ntk`, then
    :func:`ntkcore.loo_influence` (KRR with ridge ``lam`` [B.12], Sherman-Morrison LOO
    [Def 3.3]) on the host in float64.

    Parameters
    ----------
    model : torch.nn.Module (e.g. from :func:`load_user_model`)
    X : (n, ...) training rows;  Y : (n, C) or (n,) targets (one-hot / +-1)
    X_test : (T, ...) test rows;  Y_test : (T, C) or (T,)
    lam : float, default 1e-3
    solver : "auto" | "exact" | "nystrom" | "cg", default "auto"
    outputs : "mean" | "trace" | int, default "mean"
        The scalar kernel: "mean" = trace / C (for the paper's two-layer net exactly
        ``relu_ntk``, so ``lam`` means what it means there), "trace" = sum over outputs, or
        one output's kernel.
    params, strategy, memory_budget, device : as in :func:`empirical_ntk`.
    dtype : default "float64" (the solve runs in float64; see DESIGN "Precision").
    **influence_options : passed to :func:`ntkcore.loo_influence` (top_k, check, ...).

    Returns
    -------
    InfluenceResult with ``.scores`` (T, n); ``diagnostics["entk"]`` holds both eNTK reports.
    """
    from ..influence import loo_influence

    _check_rows_match(X, Y, X_test, Y_test)  # named as the caller named them, before the eNTK
    K, K_test, entk = model_kernels(model, X, X_test, outputs=outputs, params=params,
                                    strategy=strategy, memory_budget=memory_budget,
                                    dtype=dtype, device=device)
    res = loo_influence(_host64(K), Y, _host64(K_test), Y_test, lam=lam, solver=solver,
                        **influence_options)
    res.diagnostics["entk"] = entk
    return res


def _check_rows_match(X, Y, X_test, Y_test):
    """ShapeError unless X_test has X's feature shape, Y one row per row of X and Y_test one
    per row of X_test (otherwise the eNTK's and loo_influence's messages name X2 and K)."""
    shape = {name: tuple(a.shape) if hasattr(a, "shape") else np.shape(a)
             for name, a in (("X", X), ("Y", Y), ("X_test", X_test), ("Y_test", Y_test))}
    if any(len(s) == 0 for s in shape.values()):
        return  # a scalar: the checks of empirical_ntk and loo_influence name it
    if shape["X_test"][1:] != shape["X"][1:]:
        raise ShapeError(f"X and X_test: expected the same feature shape, got "
                         f"{shape['X'][1:]} and {shape['X_test'][1:]}")
    for rows, targets in (("X", "Y"), ("X_test", "Y_test")):
        if shape[rows][0] != shape[targets][0]:
            raise ShapeError(f"{rows} and {targets}: expected one target row per input row, "
                             f"got {shape[rows][0]} and {shape[targets][0]}")


def model_kernels(model, X, X_test, *, outputs="mean", params=None, strategy="auto",
                  memory_budget=None, dtype="float64", device=None):
    """The scalar eNTK blocks K = eNTK(X, X) (n, n) and K_test = eNTK(X_test, X) (T, n).

    Options as in :func:`influence_for_model`. Returns (K, K_test, info): NumPy arrays when X
    is NumPy, else tensors on the compute device; ``info`` holds both eNTK reports.
    """
    from .empirical import empirical_ntk

    if isinstance(outputs, str) and outputs not in ("mean", "trace"):
        raise ParameterError(f"outputs: expected 'mean', 'trace' or an output index, got "
                             f"{outputs!r} (influence needs one scalar kernel)")
    mode = "trace" if outputs == "mean" else outputs
    kw = dict(outputs=mode, params=params, strategy=strategy, memory_budget=memory_budget,
              dtype=dtype, device=device, return_report=True)
    K, rep = empirical_ntk(model, X, **kw)
    K_test, rep_t = empirical_ntk(model, X_test, X, **kw)
    if outputs == "mean":
        K /= rep.C
        K_test /= rep.C
    return K, K_test, {"train": rep.as_dict(), "test": rep_t.as_dict(), "kernel": outputs}


def _host64(K):
    if not isinstance(K, np.ndarray):
        K = K.detach().cpu().numpy()
    return np.asarray(K, dtype=np.float64)


def load_user_model(spec, weights=None, *, factory_kwargs=None):
    """Build a user's model from ``"module:factory"`` or ``"path/to/file.py:factory"``.

    Parameters
    ----------
    spec : str
        Importable module (or a .py file path) and the name of a callable returning an
        ``nn.Module`` (or of a module instance), separated by the last ":".
    weights : str or Path, optional
        A state_dict saved with ``torch.save``, read with ``torch.load(weights_only=True)``
        on the CPU (a dict holding it under "state_dict" or "model_state_dict" also works)
        and loaded strictly.
    factory_kwargs : dict, optional
        Keyword arguments for the factory.

    Returns
    -------
    torch.nn.Module in eval mode.

    Raises
    ------
    ParameterError : malformed spec, import failure (an exception or ``sys.exit()`` while
        importing the file or calling the factory; KeyboardInterrupt propagates), missing
        factory, not a Module, or a state_dict that does not fit the model.
    DataNotFoundError : the model file or weights file does not exist.
    CorruptDataError : the weights file cannot be read as a state_dict.
    """
    import torch
    if not isinstance(spec, (str, os.PathLike)) or ":" not in str(spec):
        raise ParameterError(f"spec: expected 'module:factory' or 'path/to/file.py:factory', "
                             f"got {spec!r}")
    target, attr = str(spec).rsplit(":", 1)
    if not target or not all(p.isidentifier() for p in attr.split(".")):
        raise ParameterError(f"spec: expected 'module:factory' with a Python name after ':', "
                             f"got {spec!r}")
    module = _import_target(target)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ParameterError(f"spec: {target!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj(**(factory_kwargs or {}))
        except (Exception, SystemExit) as e:  # the user's factory failed: say where
            raise ParameterError(f"spec: calling {spec} failed: {type(e).__name__}: {e}") from e
    else:
        raise ParameterError(f"spec: expected {attr!r} to be callable, got "
                             f"{type(obj).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise ParameterError(f"spec: expected {spec} to return a torch.nn.Module, got "
                             f"{type(model).__name__}")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise DataNotFoundError(f"weights: file not found: {path} (save one with "
                                    f"torch.save(model.state_dict(), path))")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CorruptDataError(f"weights: cannot read {path} as a state_dict with "
                                   f"torch.load(weights_only=True): {type(e).__name__}: "
                                   f"{e}") from e
        if isinstance(sd, dict):
            for key in ("state_dict", "model_state_dict"):
                if isinstance(sd.get(key), dict):
                    sd = sd[key]
                    break
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor)
                                               for v in sd.values()):
            raise CorruptDataError(f"weights: expected a state_dict (name -> tensor) in "
                                   f"{path}, got {type(sd).__name__}")
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ParameterError(f"weights: the state_dict in {path} does not fit the model "
                                 f"from {spec}: {e}") from e
    return model.eval()


#: the module name prefix of user model files loaded by path
USER_MODULE_PREFIX = "_ntkcore_user_model_"


def _import_target(target):
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise DataNotFoundError(f"spec: model file not found: {path}")
        name = f"{USER_MODULE_PREFIX}{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)  # .py, .pyc, .so
        if spec is None:  # no suffix Python knows: read it as source
            loader = importlib.machinery.SourceFileLoader(name, str(path))
            spec = importlib.util.spec_from_file_location(name, path, loader=loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # sys.exit() at import too; not Ctrl-C
            del sys.modules[name]
            raise ParameterError(f"spec: importing {path} failed: {type(e).__name__}: "
                                 f"{e}") from e
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ParameterError(f"spec: cannot import module {target!r}: {e}") from e
    except (Exception, SystemExit) as e:  # the module itself failed (or exited) at import
        raise ParameterError(f"spec: importing module {target!r} failed: "
                             f"{type(e).__name__}: {e}") from e
