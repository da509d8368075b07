"""ntkcore: NTK-based data attribution — Gram powers, blocked eNTK, exact LOO influence.

The public API is listed in ``__all__``. Imports are lazy: ``import ntkcore`` loads only NumPy;
torch, SciPy's LAPACK wrappers, Numba and CuPy load when a function that needs them is first used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "gram": "ntkcore.gram",
    "gram_power": "ntkcore.gram",
    "attention_features": "ntkcore.gram",
    "spectrum": "ntkcore.gram",
    "SpectrumResult": "ntkcore.gram",
    "relu_ntk": "ntkcore.ntk.relu",
    "relu_ntk_infinite": "ntkcore.ntk.infinite",
    "empirical_ntk": "ntkcore.ntk.empirical",
    "loo_influence": "ntkcore.influence",
    "influence_scores": "ntkcore.influence",
    "InfluenceResult": "ntkcore.influence",
    "DenseKernel": "ntkcore.solvers.operator",
    "ReluNTKOperator": "ntkcore.solvers.operator",
    "flip_rate": "ntkcore.malleability",
    "spearman": "ntkcore.malleability",
    "topk_stability": "ntkcore.malleability",
    "load_dataset": "ntkcore.data",
    "get_backend": "ntkcore.backend",
    "gpu_available": "ntkcore.backend",
}

__all__ = sorted(_EXPORTS) + ["errors", "__version__"]

# The function ``gram`` shares its name with the module ntkcore/gram.py; importing the functions
# eagerly (NumPy only, cheap) binds ``ntkcore.gram`` to the function, not the module.
from .gram import SpectrumResult, attention_features, gram, gram_power, spectrum  # noqa: E402


def __getattr__(name):
    if name == "errors":
        return importlib.import_module("ntkcore.errors")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ntkcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
