"""Datasets: embedded digits, MNIST, Fashion-MNIST, CIFAR-10 and seeded synthetic data.

Every loader returns a :class:`Dataset` holding pixels in [0, 1] (flattened, float64) and
labels as indices ``0..C-1`` into the selected classes. The model inputs are
``Dataset.preprocess(pixels)``: the paper's Table 5 normalization ``(x - mean) / std`` (per
channel for CIFAR-10), then every row scaled to unit L2 norm (appendix A.1, as Theorem 4.1
assumes). Attacks perturb pixels and pass them through ``preprocess`` (NumPy or torch,
differentiable).

No network is needed: ``digits`` is embedded in scikit-learn, ``synthetic`` is generated,
Fashion-MNIST is found where Debian's ``dataset-fashion-mnist`` installs it, and MNIST /
Fashion-MNIST / CIFAR-10 are read from torchvision's on-disk formats (see
:mod:`ntkcore._formats` for the formats and the search order).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from . import _formats
from ._dataset import Dataset
from ._validate import check_count, check_flag
from ._units import format_bytes
from .errors import (
    CorruptDataError,
    DataNotFoundError,
    EmptySelectionError,
    MemoryBudgetError,
    ParameterError,
    UnknownDatasetError,
)

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "synthetic")

_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "fmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar_10": "cifar10"}

DIGIT_NAMES = tuple(str(k) for k in range(10))
FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck")

#: digits has no official split: the first 1437 of scikit-learn's 1797 images (80 %) train,
#: the last 360 test (every class has 141..146 training and 33..37 test images).
DIGITS_N_TRAIN = 1437
#: Mean and std of all digits training pixels (all classes, scaled to [0, 1] by /16); the
#: digits analogue of Table 5's constants, fixed so a class subset does not move them.
DIGITS_MEAN, DIGITS_STD = 0.30538611256089077, 0.3755071088307581

#: An integer class id or count as typed: ASCII digits only (str.isdigit() also accepts "²",
#: which int() refuses).
_INT_TOKEN = re.compile(r"-?[0-9]+")

#: synthetic defaults when n_train / n_test / dim are not given.
SYNTHETIC_DEFAULTS = {"n_train": 1000, "n_test": 200, "dim": 64}


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset (``dim``/``image_shape`` None: any, i.e. synthetic)."""

    name: str
    dim: int | None
    image_shape: tuple | None
    mean: tuple
    std: tuple
    class_names: tuple
    source: str


DATASET_INFO = {
    "digits": DatasetInfo("digits", 64, (8, 8), (DIGITS_MEAN,), (DIGITS_STD,), DIGIT_NAMES,
                          "scikit-learn load_digits (embedded, 1797 images, 8x8, 0..16)"),
    "mnist": DatasetInfo("mnist", 784, (28, 28), (0.13,), (0.31,), DIGIT_NAMES,
                         "MNIST IDX files (60 000 train, 10 000 test)"),
    "fashion-mnist": DatasetInfo("fashion-mnist", 784, (28, 28), (0.29,), (0.35,),
                                 FASHION_NAMES, "Fashion-MNIST IDX files (60 000 / 10 000)"),
    "cifar10": DatasetInfo("cifar10", 3072, (3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                           CIFAR10_NAMES, "CIFAR-10 python batches (50 000 / 10 000)"),
    "synthetic": DatasetInfo("synthetic", None, None, (0.5,), (0.5,), DIGIT_NAMES,
                             "seeded Gaussian class mixture squashed to [0, 1] (any n, d)"),
}


def canonical_name(name) -> str:
    """Lower-cased dataset name with aliases resolved ("CIFAR-10" -> "cifar10").

    Raises
    ------
    UnknownDatasetError
        The name is not one of :data:`DATASETS` (the message lists them).
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise UnknownDatasetError(
            f"dataset: expected one of {', '.join(DATASETS)}, got {name!r}")
    return key


def parse_classes(spec="10", *, n_classes: int = 10, class_names=None) -> tuple:
    """Turn a class specification into a tuple of original class ids (paper A.2.2).

    Parameters
    ----------
    spec : str, int or sequence of int/str, default "10"
        A single integer ``k`` (``"10"``, ``5``) selects the first ``k`` classes ``0..k-1``;
        a comma- or space-separated list (``"3,8"``, ``(3, 8)``) selects exactly those, in the
        order given (the order fixes the label indices: ``y == 0`` is the first listed).
        With ``class_names``, names are accepted too (``"automobile,airplane"``).
    n_classes : int, default 10
        Number of classes of the dataset; ids must lie in ``0..n_classes-1``.
    class_names : sequence of str, optional
        Names for matching non-numeric entries, case-insensitively.

    Returns
    -------
    tuple of int
        At least two distinct class ids.

    Raises
    ------
    EmptySelectionError
        The specification selects nothing (``""``, ``0``, ``()``).
    ParameterError
        Unknown or out-of-range ids, duplicates, a single class, or ``k > n_classes``.
    """
    single = None
    if isinstance(spec, (bool, np.bool_)):
        raise ParameterError(f"classes: expected a count or a list of class ids, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        single = int(spec)
    elif isinstance(spec, str):
        # commas separate when present, so names with spaces ("Ankle boot,Bag") stay whole
        parts = spec.split(",") if "," in spec else spec.split()
        tokens = [t.strip() for t in parts if t.strip()]
        if len(tokens) == 1 and "," not in spec and _INT_TOKEN.fullmatch(tokens[0]):
            single = int(tokens[0])
    else:
        try:
            tokens = list(spec)
        except TypeError:
            raise ParameterError(
                f"classes: expected a count or a list of class ids, got {spec!r}") from None
    if single is not None:
        if single <= 0:
            raise EmptySelectionError(f"classes: expected at least 2 classes, got {spec!r}")
        if single == 1 or single > n_classes:
            raise ParameterError(
                f"classes: expected a class count in 2..{n_classes}, got {single}")
        return tuple(range(single))
    if not tokens:
        raise EmptySelectionError(f"classes: expected at least 2 classes, got {spec!r}")
    lookup = {str(n).lower(): k for k, n in enumerate(class_names or ())}
    ids = []
    for t in tokens:
        if isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)):
            k = int(t)
        elif isinstance(t, str) and _INT_TOKEN.fullmatch(t.strip()):
            k = int(t)
        elif isinstance(t, str) and t.strip().lower() in lookup:
            k = lookup[t.strip().lower()]
        else:
            known = f" or a name in {list(class_names)}" if class_names else ""
            raise ParameterError(
                f"classes: expected class ids 0..{n_classes - 1}{known}, got {t!r}")
        if not 0 <= k < n_classes:
            raise ParameterError(f"classes: expected class ids 0..{n_classes - 1}, got {k}")
        ids.append(k)
    if len(set(ids)) != len(ids):
        raise ParameterError(f"classes: expected distinct class ids, got {ids}")
    if len(ids) < 2:
        raise ParameterError(f"classes: expected at least 2 classes, got {ids}")
    return tuple(ids)


# --------------------------------------------------------------------------- loading

def find_dataset(name, root=None) -> str | None:
    """Where ``name``'s files would be read from, or None if they are not on disk.

    ``digits`` and ``synthetic`` need no files and give a descriptive string.
    """
    name = canonical_name(name)
    check_root_type(root)
    if name == "digits":
        return "sklearn.datasets.load_digits (embedded)"
    if name == "synthetic":
        return "generated (seeded)"
    found = _formats.find_dir(name, root)
    return None if found is None else str(found)


def check_root_type(root):
    """ParameterError unless ``root`` is None, a str or a path-like object."""
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise ParameterError(f"root: expected a folder path (str or path-like), got "
                             f"{type(root).__name__} {root!r}")


def dataset_status(root=None) -> list:
    """``[(name, path_or_None), ...]`` for every dataset in :data:`DATASETS` (``ntkcore info``)."""
    return [(name, find_dataset(name, root)) for name in DATASETS]


def check_data_root(name: str, root, download: bool = False):
    """DataNotFoundError when an explicit ``root`` does not exist (with ``download`` it may:
    the download creates it) or is not a folder, rather than reading the data from another
    folder; None and existing folders pass. Where no folder holds ``name``'s files either,
    the message is the usual not-found one (every folder tried, the fixes)."""
    if root is None:
        return
    from pathlib import Path
    path = Path(root).expanduser()
    if path.is_dir() or (download and not path.exists()):
        return
    what = "is not a folder" if path.exists() else "does not exist"
    if name in ("digits", "synthetic"):
        source = "embedded in scikit-learn" if name == "digits" else "generated"
        raise DataNotFoundError(f"data_root: {root} {what}; {name} is {source} and reads no "
                                f"files, so drop --data-root (root=)")
    if name in _formats._SUBDIRS and _formats.find_dir(name) is None:
        raise _formats.not_found_error(name, root, extra=f"(The data root {root} {what}.)")
    raise DataNotFoundError(f"data_root: {root} {what}; expected the folder holding the "
                            f"dataset files (or --download, download=True, to create it and "
                            f"fetch them)")


def _check_count(value, name: str, minimum: int):
    """None (the default), or ``value`` as an int >= ``minimum`` (see _validate.check_count)."""
    return None if value is None else check_count(value, name, minimum)


def _read_raw(name: str, root, download: bool) -> dict:
    """Full uint8/int arrays of an on-disk or embedded dataset plus its source and scale."""
    if name == "digits":
        x, y = _formats.read_digits()  # integer values 0..16
        n = DIGITS_N_TRAIN
        return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:],
                "scale": 16.0, "source": find_dataset("digits"), "test_offset": n}
    folder = _formats.find_dir(name, root)
    if folder is None:
        if not download:
            raise _formats.not_found_error(name, root)
        folder = _formats.download(name, root)
    elif root is not None and folder not in _formats._root_dirs(name, root):
        import warnings
        warnings.warn(f"{name}: the data root {root} holds no {name} files; reading them from "
                      f"{folder}", stacklevel=3)
    reader = _formats.read_cifar10 if name == "cifar10" else _formats.read_idx_dataset
    raw = reader(folder)
    dim = DATASET_INFO[name].dim
    if raw["x_train"].shape[1] != dim:
        raise CorruptDataError(
            f"{folder}: expected {name} images of {dim} pixels, got {raw['x_train'].shape[1]}")
    raw.update(scale=255.0, source=str(folder))
    return raw


def _subset(labels, classes, n, rng, split: str, name: str):
    """Sorted original indices of a seeded random subset of the selected classes."""
    idx = np.flatnonzero(np.isin(labels, classes))
    if n == 0:
        return idx[:0]
    if idx.size == 0:
        raise EmptySelectionError(
            f"{name}: classes {list(classes)} have no {split} samples")
    if n is not None and n > idx.size:
        raise ParameterError(
            f"n_{split}: expected at most {idx.size} (the {split} samples of classes "
            f"{list(classes)} in {name}), got {n}")
    chosen = rng.permutation(idx)[: idx.size if n is None else n]
    return np.sort(chosen)


def _require_every_class(y, classes, name: str, n_train, seed: int):
    """EmptySelectionError unless every selected class has a training label in ``y`` (0..C-1).

    A seeded subset is uniformly random, so a small ``n_train`` can miss a class; training on
    the rest would silently solve a different problem (a "binary" run on one class).
    """
    counts = np.bincount(y, minlength=len(classes))
    empty = [classes[k] for k in range(len(classes)) if counts[k] == 0]
    if empty:
        raise EmptySelectionError(
            f"{name}: the training subset (n_train={n_train}, seed={seed}) has no samples of "
            f"class{'es' if len(empty) > 1 else ''} {', '.join(map(str, empty))}; expected at "
            f"least one of each of the {len(classes)} selected classes. Fix: a larger n_train "
            f"(--n-train; at least {len(classes)}) or another seed (--seed)")


def synthetic_bytes(n_train: int, n_test: int, dim: int) -> int:
    """Peak bytes of generating synthetic data: the ten float64 class means, the float64
    pixels and int64 labels of both splits, plus about three (n, dim) float64 temporaries of
    the larger split."""
    return 8 * 10 * dim + 8 * (dim + 1) * (n_train + n_test) + 24 * dim * max(n_train, n_test)


def _check_synthetic_fits(n_train: int, n_test: int, dim: int):
    """MemoryBudgetError, before allocating, when the request exceeds the available host RAM
    (not NTKCORE_MEMORY_LIMIT, which budgets the kernel and solver work)."""
    from . import backend
    need = synthetic_bytes(n_train, n_test, dim)
    free = backend.host_available_bytes()
    if need > free:
        # the dimension is the cause when one sample per split would not fit either
        fix = ("a smaller dim (--dim)" if synthetic_bytes(1, 1, dim) > free else
               "fewer samples (--n-train, --n-test) or a smaller dim (--dim)")
        raise MemoryBudgetError(
            f"synthetic: n_train={n_train}, n_test={n_test}, dim={dim} needs about "
            f"{format_bytes(need)} to generate, over the {format_bytes(free)} of available "
            f"memory; ask for {fix}", needed_bytes=need, budget_bytes=free)


def _synthetic(classes, n_train, n_test, dim, seed):
    """Seeded Gaussian class mixture, pixels = sigmoid(mu_c + noise), class means per seed.

    The ten class means ``mu_c ~ N(0, I_d)`` depend only on (seed, dim), so a class subset
    draws from the same mixture as the full set; samples use independent streams for train
    and test.
    """
    ss = np.random.SeedSequence([seed, dim])
    s_means, s_train, s_test = ss.spawn(3)
    means = np.random.default_rng(s_means).standard_normal((10, dim))
    out = []
    for s, n in ((s_train, n_train), (s_test, n_test)):
        rng = np.random.default_rng(s)
        y = rng.integers(len(classes), size=n).astype(np.int64)
        z = means[np.asarray(classes)[y]] + rng.standard_normal((n, dim))
        out += [1.0 / (1.0 + np.exp(-z)), y]
    return out


def load_dataset(name, *, root=None, classes="10", n_train=None, n_test=None, seed=42,
                 download=False, dim=None) -> Dataset:
    """Load a dataset, keep the chosen classes and draw seeded train/test subsets.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` (aliases such as ``"cifar-10"``, ``"fashion_mnist"`` accepted).
    root : str or Path, optional
        Folder with the files (flat or torchvision's layout); searched before
        ``$NTKCORE_DATA``, ``~/.cache/ntkcore/data`` and (Fashion-MNIST) the Debian folder.
    classes : str, int or sequence, default "10"
        See :func:`parse_classes`: ``"10"`` all, ``"5"`` the first five, ``"3,8"`` a pair.
    n_train, n_test : int, optional
        Subset sizes; None takes every sample of the selected classes (synthetic: 1000 and 200).
        The subset is ``sort(permutation(indices of selected classes)[:n])`` drawn with
        independent streams of ``np.random.SeedSequence(seed)`` for train and test, so it is
        reproducible, and a smaller ``n`` with the same seed gives a subset of a larger one
        (for the file-based sets; ``synthetic`` generates n points, so a smaller n with the
        same seed gives the same labels as the larger draw's first n but other pixels).
        It is uniformly random, not stratified (class shares follow the data, as in the
        paper's random subsets); a draw that leaves a selected class without training
        samples is refused (EmptySelectionError) rather than trained on fewer classes. The
        test subset may miss classes.
    seed : int, default 42
    download : bool, default False
        Fetch missing MNIST/Fashion-MNIST/CIFAR-10 files with torchvision (needs a network).
    dim : int, optional
        Input dimension of ``synthetic`` data (default 64); an error for other datasets.

    Returns
    -------
    Dataset

    Raises
    ------
    UnknownDatasetError, DataNotFoundError, CorruptDataError
    MemoryBudgetError
        Synthetic data larger than the available memory (checked before allocating).
    EmptySelectionError
        A selected class has no training sample in the files or in the seeded subset.
    ParameterError
        ``n_train`` above the available count (which the message names), bad classes, ...
    """
    name = canonical_name(name)
    info = DATASET_INFO[name]
    cls = parse_classes(classes, n_classes=len(info.class_names), class_names=info.class_names)
    n_train = _check_count(n_train, "n_train", 1)
    n_test = _check_count(n_test, "n_test", 0)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed: expected an integer >= 0, got {seed!r}")
    seed = int(seed)
    dim = _check_count(dim, "dim", 1)
    download = check_flag(download, "download")
    check_root_type(root)
    check_data_root(name, root, download)
    if dim is not None and name != "synthetic":
        raise ParameterError(f"dim: only synthetic data takes a dimension, got dim={dim} "
                             f"for {name} (fixed at {info.dim})")
    names = tuple(info.class_names[k] for k in cls)

    if name == "synthetic":
        d = dim or SYNTHETIC_DEFAULTS["dim"]
        nt = SYNTHETIC_DEFAULTS["n_train"] if n_train is None else n_train
        ne = SYNTHETIC_DEFAULTS["n_test"] if n_test is None else n_test
        _check_synthetic_fits(nt, ne, d)
        px_tr, y_tr, px_te, y_te = _synthetic(cls, nt, ne, d, seed)
        _require_every_class(y_tr, cls, name, nt, seed)
        side = math.isqrt(d)
        shape = (side, side) if side * side == d else (d,)
        return Dataset(name, cls, names, shape, info.mean, info.std, px_tr, y_tr, px_te, y_te,
                       np.arange(nt), np.arange(ne), source=find_dataset(name), seed=seed)

    raw = _read_raw(name, root, download)
    missing = [k for k in cls if not np.any(raw["y_train"] == k)]
    if missing:
        raise EmptySelectionError(
            f"{name}: classes {missing} have no train samples in {raw['source']}")
    s_train, s_test = np.random.SeedSequence(seed).spawn(2)
    i_tr = _subset(raw["y_train"], cls, n_train, np.random.default_rng(s_train), "train", name)
    i_te = _subset(raw["y_test"], cls, n_test, np.random.default_rng(s_test), "test", name)
    remap = np.full(10, -1, dtype=np.int64)
    remap[list(cls)] = np.arange(len(cls))
    y_train = remap[raw["y_train"][i_tr]]
    _require_every_class(y_train, cls, name, i_tr.size, seed)

    def pixels(x, i):
        return x[i].astype(np.float64) / raw["scale"]

    return Dataset(name, cls, names, info.image_shape, info.mean, info.std,
                   pixels(raw["x_train"], i_tr), y_train,
                   pixels(raw["x_test"], i_te), remap[raw["y_test"][i_te]],
                   i_tr.astype(np.int64), i_te.astype(np.int64) + raw.get("test_offset", 0),
                   source=raw["source"], seed=seed)


__all__ = ["DATASETS", "DATASET_INFO", "DatasetInfo", "Dataset", "load_dataset",
           "parse_classes", "canonical_name", "find_dataset", "dataset_status"]
