"""Write tiny datasets in the REAL on-disk formats (IDX, CIFAR-10 python pickles) for tests.

Nothing is mocked: the loader under test reads these files exactly as it reads the real ones.
Contents are a deterministic function of (n_train, n_test, seed): :func:`fixture_arrays` gives
the same arrays, so a test can compare any pixel it wrote with what the loader returns.

Labels cycle through 0..9 before shuffling, so every class is present once ``n >= 10``.
"""

from __future__ import annotations

import gzip
import pickle
import sys
import types
from pathlib import Path

import numpy as np

MNIST_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
               "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
_TV_FOLDER = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}
CIFAR10_LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                       "dog", "frog", "horse", "ship", "truck"]


def fixture_arrays(n_train: int, n_test: int, seed: int = 0, *, dim: int = 784) -> dict:
    """The uint8 pixels (n, dim) and uint8 labels (n,) that the writers store."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        out[f"x_{split}"] = rng.integers(0, 256, size=(n, dim), dtype=np.uint8)
        out[f"y_{split}"] = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    return out


def idx_bytes(array: np.ndarray, *, magic: int | None = None) -> bytes:
    """IDX encoding of a uint8 array: magic (0x0000 08 ndim, big-endian), sizes, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 + array.ndim
    head = int(magic).to_bytes(4, "big")
    head += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return head + array.tobytes()


def write_idx(path, array: np.ndarray, *, gz: bool = False, magic: int | None = None) -> Path:
    """Write ``array`` as one IDX file at ``path`` (gzipped when ``gz``); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array, magic=magic)
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(data)
    return path


def write_mnist(root, n_train: int = 30, n_test: int = 10, *, gz: bool = True,
                layout: str = "flat", seed: int = 0, dataset: str = "mnist") -> Path:
    """Write MNIST-format IDX files (28 x 28 images) for ``dataset`` under ``root``.

    Parameters
    ----------
    layout : "flat" or "torchvision"
        "flat": files directly in ``root``; "torchvision": in ``root/MNIST/raw`` (or
        ``root/FashionMNIST/raw`` for ``dataset="fashion-mnist"``), as torchvision stores them.
    gz : bool
        Write ``*.gz`` files (as distributed) instead of raw ones.

    Returns
    -------
    Path
        ``root`` (pass it as ``root=`` / ``--data-root``).
    """
    if layout not in ("flat", "torchvision"):
        raise ValueError(f"layout: expected 'flat' or 'torchvision', got {layout!r}")
    root = Path(root)
    folder = root / _TV_FOLDER[dataset] if layout == "torchvision" else root
    arrays = fixture_arrays(n_train, n_test, seed)
    for key, stem in MNIST_FILES.items():
        a = arrays[key]
        if key.startswith("x"):
            a = a.reshape(a.shape[0], 28, 28)
        write_idx(folder / (stem + (".gz" if gz else "")), a, gz=gz)
    return root


def write_cifar10(root, n_train: int = 30, n_test: int = 10, seed: int = 0) -> Path:
    """Write CIFAR-10 python batches under ``root/cifar-10-batches-py``; return ``root``.

    The ``n_train`` training images are split over ``data_batch_1..5`` in order (as in the real
    set, where the batches concatenate to the training set); rows are channel-major uint8
    (N, 3072), labels a list of ints, plus ``batches.meta`` with ``label_names``.
    """
    root = Path(root)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = fixture_arrays(n_train, n_test, seed, dim=3072)
    parts = np.array_split(np.arange(n_train), 5)
    for k, idx in enumerate(parts, start=1):
        batch = {b"batch_label": f"training batch {k} of 5".encode(),
                 b"labels": arrays["y_train"][idx].astype(int).tolist(),
                 b"data": arrays["x_train"][idx],
                 b"filenames": [f"img_{i}.png".encode() for i in idx]}
        with open(folder / f"data_batch_{k}", "wb") as fh:
            pickle.dump(batch, fh)
    test = {b"batch_label": b"testing batch 1 of 1",
            b"labels": arrays["y_test"].astype(int).tolist(), b"data": arrays["x_test"],
            b"filenames": [f"test_{i}.png".encode() for i in range(n_test)]}
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump(test, fh)
    meta = {b"label_names": [n.encode() for n in CIFAR10_LABEL_NAMES],
            b"num_cases_per_batch": max(len(p) for p in parts), b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh)
    return root


def fake_torchvision(monkeypatch, dataset_class):
    """Make ``import torchvision.datasets`` return a module whose MNIST, FashionMNIST and
    CIFAR10 are ``dataset_class`` (to test ``--download`` without a network)."""
    fake = types.ModuleType("torchvision.datasets")
    fake.MNIST = fake.FashionMNIST = fake.CIFAR10 = dataset_class
    pkg = types.ModuleType("torchvision")
    pkg.datasets = fake
    monkeypatch.setitem(sys.modules, "torchvision", pkg)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake)
