"""The paper's pipeline as library functions: data -> trained network -> eNTK -> LOO influence.

Every CLI command and experiment is a thin shell over these (STYLE rule 12), so a pipeline
calling ``run_influence(InfluenceConfig(...))`` gets exactly what ``ntkcore influence`` prints.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .._validate import check_seed  # noqa: F401 - the experiments import it from here
from ..backend import backend_for, get_backend
from ..errors import ParameterError

# Quick default (finishes in well under a minute on 2 cores on digits) and the paper's settings.
PRESETS = {
    "quick": {"epochs": 30},
    "paper": {"epochs": 500},  # A.3.1: Adam 1e-3, batch 128, 500 epochs, lam 1e-3
}


@dataclass
class DataOptions:
    """Data options shared by every command: which data set, where, which classes, how many."""

    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    classes: str = "10"
    n_train: int | None = None
    n_test: int | None = None
    dim: int | None = None  # synthetic only


def apply_preset(cfg, presets: dict) -> dict:
    """``asdict(cfg)`` with every None option filled from ``presets[cfg.preset]``."""
    if cfg.preset not in presets:
        raise ParameterError(f"preset: expected one of {tuple(presets)}, got {cfg.preset!r}")
    d = asdict(cfg)
    for key, val in presets[cfg.preset].items():
        if d[key] is None:
            d[key] = val
    return d


#: Largest ridge the CLI takes: the trained networks' objective (lam/2)||theta - theta_0||^2
#: must stay finite in float32.
MAX_LAM = 1e6


def check_lam(lam) -> float:
    """``lam`` as a float, or ParameterError unless 0 < lam <= MAX_LAM: the one ridge rule
    of every command (influence, malleability, distance)."""
    from .._validate import check_positive
    lam = check_positive(lam, "lam")
    if lam > MAX_LAM:  # beyond it the objective overflows float32 training
        raise ParameterError(f"lam: expected a value <= {MAX_LAM:g}, got {lam!r}")
    return lam


def check_solver_uses(solver: str, options: dict) -> None:
    """ParameterError naming an option the explicitly chosen ``solver`` does not use (e.g.
    rank with 'exact', tol with 'nystrom'); 'auto' keeps every option (its choice decides)."""
    from ..solvers.auto import SOLVER_OPTIONS
    if solver == "auto" or solver not in SOLVER_OPTIONS:
        return
    for name in options:
        if name not in SOLVER_OPTIONS[solver]:
            users = [s for s, names in SOLVER_OPTIONS.items() if name in names]
            raise ParameterError(f"{name}: not used by solver={solver!r}; drop it, or choose "
                                 f"a solver that uses it ({', '.join(users)})")


@dataclass
class InfluenceConfig(DataOptions):
    """Options of ``ntkcore influence`` (same names, same defaults)."""

    arch: str = "relu"
    width: int = 1024
    epochs: int | None = None  # None: from the preset
    preset: str = "quick"
    lam: float = 1e-3
    device: str = "auto"
    seed: int = 42
    solver: str = "auto"
    solver_options: dict = field(default_factory=dict)
    show: int = 5  # test points shown in the summary and the figure
    top_k: int = 5

    def validate(self) -> "InfluenceConfig":
        """Check every option before any work starts (bad input fails in milliseconds)."""
        from .._validate import check_count
        from ..backend import DEVICES
        check_lam(self.lam)
        for name in ("width", "n_train", "top_k"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name, minimum=1)
        for name in ("n_test", "show"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name, minimum=0)
        check_seed(self.seed)
        if self.arch not in ("relu", "attn"):
            raise ParameterError(f"arch: expected 'relu' or 'attn', got {self.arch!r}")
        if self.device not in DEVICES:
            raise ParameterError(f"device: expected one of {DEVICES}, got {self.device!r}")
        self.resolved_epochs()
        if not isinstance(self.solver_options, dict):
            raise ParameterError(f"solver_options: expected a dict of solver options, got "
                                 f"{type(self.solver_options).__name__}")
        from ..solvers.auto import check_solver_options
        check_solver_options(self.solver, self.solver_options)
        check_solver_uses(self.solver, self.solver_options)
        return self

    def resolved_epochs(self) -> int:
        if self.preset not in PRESETS:
            raise ParameterError(f"preset: expected one of {tuple(PRESETS)}, got {self.preset!r}")
        from .._validate import check_epochs
        epochs = PRESETS[self.preset]["epochs"] if self.epochs is None else self.epochs
        return check_epochs(epochs)


def load_data(cfg: InfluenceConfig):
    from ..data import load_dataset
    return load_dataset(cfg.dataset, root=cfg.data_root, classes=cfg.classes,
                        n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed,
                        download=cfg.download, dim=cfg.dim)


def torch_device(device: str = "cpu"):
    """The torch device for training on ``device`` ("auto" | "cpu" | "cuda"): the GPU when
    the run uses it and torch sees it, else the CPU (CuPy beside a CPU-only torch trains on
    the CPU)."""
    import torch

    from ..backend import resolve_device
    on_gpu = resolve_device(device) == "cuda" and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


def train_network(dataset, arch: str, width: int, *, epochs: int, lam: float = 1e-3,
                  seed: int = 42, adv_eps: float | None = None, progress: bool = True,
                  X_train=None, device: str = "cpu"):
    """Build and train the paper's architecture on ``dataset`` [A.1, A.3].

    Parameters
    ----------
    dataset : ntkcore.data.Dataset
    arch : "relu" (2L-ReLU) or "attn" (MLP-Attn, attention over the training rows)
    width : hidden units m
    epochs, lam, seed : training settings (A.3); loss is cross-entropy for C > 2 classes,
        MSE against +-1 targets for binary (A.3.2).
    adv_eps : PGD adversarial training budget (Table 4), or None.
    X_train : (n, d) preprocessed training rows, default ``dataset.X_train`` (pass perturbed
        rows to retrain after an intervention).
    device : "auto" | "cpu" | "cuda", the device of the run; the GPU trains where torch has
        CUDA (see :func:`torch_device`), and frees torch's cached GPU memory afterwards so the
        kernel stage (CuPy) can plan with it.

    Returns
    -------
    (model, TrainResult)
    """
    from ..nn import make_model, train

    if adv_eps is not None and X_train is not None:
        raise ParameterError("X_train: adversarial training perturbs the pixels, so it cannot "
                             "train on given rows; pass a dataset with the new pixels instead")
    X = dataset.X_train if X_train is None else X_train
    n_out = 1 if dataset.binary else dataset.n_classes
    dev = torch_device(device)
    model = make_model(arch, X, width, n_out, seed=seed, device=dev)
    y = dataset.Y_train if dataset.binary else dataset.y_train
    if adv_eps is None:
        result = train(model, X, y, epochs=epochs, lam=lam, seed=seed, progress=progress)
    else:
        pixels = dataset.pixels_train
        result = train(model, pixels, y, epochs=epochs, lam=lam, seed=seed, progress=progress,
                       preprocess=dataset.preprocess, adv_eps=adv_eps)
    if dev.type == "cuda":
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return model, result


def network_features(model, X_train, X_test, *, device: str = "auto"):
    """Inputs to the two-layer head for training and test rows, float64, on ``device``.

    MLP-Attn: rownorm(X X^T X) for training rows and rownorm(M q) for test rows, M = X^T X of
    the training set the model was built on (test points attended through the training set).
    """
    be = get_backend(device)
    F = be.asarray(model.features_numpy(X_train))
    Ft = be.asarray(model.features_numpy(X_test))
    W = be.asarray(model.W_numpy())
    return F, Ft, W


def kernel_influence(model, dataset, *, lam: float = 1e-3, solver: str = "auto",
                     device: str = "auto", top_k: int | None = None, X_train=None, X_test=None,
                     Y_train=None, Y_test=None, **solver_options):
    """LOO influence [Def 3.3] on the closed-form eNTK of the trained ``model`` [Thm 4.2].

    The kernel is given to the solver as a matrix-free operator, so an approximate solver never
    forms the n x n matrix and the exact one forms it once (timed as ``kernel_assembly``).

    Returns
    -------
    (InfluenceResult, seconds spent assembling K_test)
    """
    from ..influence import loo_influence
    from ..solvers.operator import ReluNTKOperator

    X_train = dataset.X_train if X_train is None else X_train
    X_test = dataset.X_test if X_test is None else X_test
    Y_train = dataset.Y_train if Y_train is None else Y_train
    Y_test = dataset.Y_test if Y_test is None else Y_test
    F, Ft, W = network_features(model, X_train, X_test, device=device)
    # The W-part of the eNTK weights neuron r by a_r^2 [Thm 4.2, B.5]: 1 for the +-1 signs,
    # not once a has trained. With C outputs the ridge regression's one scalar kernel is the
    # output average (1/C) sum_c K_c (= empirical_ntk(outputs="trace") / C), whose weights are
    # mean_c a_rc^2; for C = 1 that is the eNTK itself.
    a = None
    if hasattr(model, "a_numpy"):
        a_host = model.a_numpy().reshape(W.shape[0], -1)
        a = get_backend(device).asarray(np.sqrt(np.mean(a_host * a_host, axis=1)))
    op = ReluNTKOperator(F, W, a=a, train_a=getattr(model, "train_a", False))
    be = backend_for(F)
    t0 = time.perf_counter()
    K_test = op.cross(Ft)
    be.synchronize()  # a host clock around GPU work reads nothing without it
    t_cross = time.perf_counter() - t0
    xp = op.xp
    res = loo_influence(op, xp.asarray(Y_train), K_test, xp.asarray(Y_test), lam=lam,
                        solver=solver, top_k=top_k, **solver_options)
    res.timings["kernel_test_assembly"] = t_cross
    return res, t_cross


#: Options that choose the data (with its content hash, they identify it); data_root and
#: download only say where to find it.
DATA_FIELDS = ("dataset", "classes", "n_train", "n_test", "dim")
#: Options the trained network depends on, besides the data and the resolved epochs.
TRAINING_FIELDS = ("arch", "width", "lam", "seed")


def data_identity(cfg: DataOptions, ds) -> dict:
    """The data options that choose the data, and the hash of what was loaded."""
    from .output import dataset_identity
    return {**{k: getattr(cfg, k) for k in DATA_FIELDS}, "data": dataset_identity(ds)}


def training_identity(cfg: InfluenceConfig, ds, device: str) -> dict:
    """What the trained network (``model.pt``) depends on: the data, the architecture, width,
    lam, seed, the preset-resolved epochs and the device torch trains on (``device`` "auto"
    and "cpu" that both train on the CPU are the same). Solver, solve device and display
    options are not part of it: changing them reuses the trained model."""
    return {**data_identity(cfg, ds), **{k: getattr(cfg, k) for k in TRAINING_FIELDS},
            "epochs": cfg.resolved_epochs(), "training_device": torch_device(device).type}


class _PlannedKernel:
    """What :func:`ntkcore.solvers.auto.choose_solver` reads of the kernel a run will build:
    its shape, the device it lives on and whether the solver may factor it in place."""

    def __init__(self, n: int, device: str, private: bool):
        self.shape = (n, n)
        self.X = get_backend(device).asarray(np.zeros((1, 1)))
        self.dense_is_private = private


def check_solver_fits(cfg: InfluenceConfig, n: int, device: str, *, n_test: int,
                      n_outputs: int, private: bool = True) -> None:
    """Refuse, before any training or kernel work, a solver request that cannot fit an
    n x n kernel on ``device``: the check (and message) the solve itself would make later.

    n_test, n_outputs : T and C of the solve, whose (T, n) B and scores count too (as
        ``loo_influence`` counts them).
    private : the kernel will be an operator the exact solver materialises and factors in
        place (the built-in networks' eNTK); False for a dense eNTK (``--model``).

    Raises
    ------
    MemoryBudgetError, ParameterError : as ``choose_solver`` would at solve time.
    """
    from ..solvers.auto import choose_solver
    if n < 1:
        return  # nothing to plan; the run refuses empty data with its own message
    choose_solver(_PlannedKernel(n, device, private), cfg.lam, requested=cfg.solver,
                  n_test=n_test, n_outputs=n_outputs, **cfg.solver_options)


#: Options that say where to find things, not what to compute: recorded, never compared.
LOCATION_FIELDS = ("data_root", "download", "device")


def run_settings(cfg: InfluenceConfig, ds, device: str, identity: dict, *,
                 drop=()) -> tuple:
    """(config, about) of an influence run folder: the settings its results depend on (the
    resolved device instead of the one typed), and where the data and device came from."""
    from .output import dataset_source
    config = {**{k: v for k, v in config_dict(cfg).items()
                 if k not in LOCATION_FIELDS and k not in drop},
              **identity, "device_resolved": device}
    about = {**{k: getattr(cfg, k) for k in LOCATION_FIELDS}, "data_source": dataset_source(ds)}
    return config, about


def experiment_settings(settings: dict, ds) -> tuple:
    """(config, about) of a ``distance`` / ``malleability`` / ``spectrum`` run folder: the
    resolved settings with the data's identity and, where the command trains on a device, the
    device torch resolves (not the one typed); where the data came from (``data_root``,
    ``download``, the source folder) goes to ``about``: recorded, never compared."""
    from .output import dataset_identity, dataset_source
    config = {k: v for k, v in settings.items() if k not in LOCATION_FIELDS}
    if "device" in settings:
        config["device_resolved"] = torch_device(settings["device"]).type
    config["data"] = dataset_identity(ds)
    about = {**{k: settings[k] for k in LOCATION_FIELDS if k in settings},
             "data_source": dataset_source(ds)}
    return config, about


def config_dict(cfg: InfluenceConfig) -> dict:
    d = asdict(cfg)
    d["epochs"] = cfg.resolved_epochs()
    return d


def accuracy_from_outputs(dataset, outputs, y) -> float:
    pred = dataset.labels_from_outputs(np.asarray(outputs))
    return float(np.mean(pred == np.asarray(y))) if len(y) else float("nan")
