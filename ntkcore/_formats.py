"""On-disk dataset formats and where to find them (private; :mod:`ntkcore.data` is the public face).

Two formats, parsed here without torchvision:

* IDX (MNIST, Fashion-MNIST): big-endian header ``0x00 0x00 <dtype> <ndim>`` (so the magic number
  read as a big-endian int32 is 2051 for 3-D uint8 images and 2049 for 1-D uint8 labels), then
  ``ndim`` big-endian uint32 sizes, then the raw bytes. Files may be gzipped (``.gz``).
* CIFAR-10 "python version": pickled dicts ``{b"data": uint8 (N, 3072), b"labels": [int] * N}`` in
  ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``; each row is channel-major
  (1024 red, 1024 green, 1024 blue, each 32 x 32 row-major) -- the layout torchvision's
  ``ToTensor`` gives after flattening ``(C, H, W)``. Pickles are read with a restricted
  unpickler that only rebuilds NumPy arrays, so a hostile file cannot run code.

Search order for a dataset's folder (first complete match wins):

1. the explicit ``root`` argument: torchvision's layout (``root/MNIST/raw``,
   ``root/FashionMNIST/raw``, ``root/cifar-10-batches-py``), ``root/<name>`` (``root/mnist``,
   ``root/fashion-mnist``, ``root/cifar10``), then ``root`` itself (flat: a folder named for
   the dataset wins over it, since a flat folder cannot tell MNIST from Fashion-MNIST). If none of these
   is complete but one holds part of the dataset, the search stops there: a partial copy
   under a folder the user named is reported (files missing), never completed or replaced by
   a copy found elsewhere. A root holding none of the dataset's files falls through to 2.;
2. the same sub-folders (not the flat folder, which cannot tell MNIST from Fashion-MNIST) under
   ``$NTKCORE_DATA`` and then ``~/.cache/ntkcore/data``;
3. for Fashion-MNIST, the Debian package's folder :data:`DEBIAN_FASHION_DIR`
   (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

from .errors import CorruptDataError, DataNotFoundError

#: Where Debian's ``dataset-fashion-mnist`` package installs the real IDX files.
DEBIAN_FASHION_DIR = "/usr/share/datasets/fashion-mnist"

IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = CIFAR_TRAIN_FILES + ("test_batch",)

# Sub-folders (relative to a base folder) tried for each on-disk dataset, torchvision's first.
_SUBDIRS = {
    "mnist": ("MNIST/raw", "mnist"),
    "fashion-mnist": ("FashionMNIST/raw", "fashion-mnist", "fashion_mnist"),
    "cifar10": ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10"),
}
_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}


# --------------------------------------------------------------------------- search

def default_bases() -> list[Path]:
    """Base folders searched after an explicit root: $NTKCORE_DATA, ~/.cache/ntkcore/data."""
    bases = []
    env = os.environ.get("NTKCORE_DATA")
    if env:
        bases.append(Path(env).expanduser())
    bases.append(Path.home() / ".cache" / "ntkcore" / "data")
    return bases


def _root_dirs(name: str, root) -> list[Path]:
    """The folders under an explicit ``root`` that may hold ``name``: the sub-folders named for
    it, then ``root`` itself (flat)."""
    root = Path(root).expanduser()
    return [root / s for s in _SUBDIRS[name]] + [root]


def candidate_dirs(name: str, root=None) -> list[Path]:
    """Folders that may hold ``name``'s files, in search order (see the module docstring)."""
    dirs: list[Path] = []
    if root is not None:
        dirs.extend(_root_dirs(name, root))
    for base in default_bases():
        dirs.extend(base / s for s in _SUBDIRS[name])
    if name == "fashion-mnist":
        dirs.append(Path(DEBIAN_FASHION_DIR))
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _exists(path: Path, kind: str) -> bool:
    """``path.is_file()`` / ``is_dir()``; DataNotFoundError naming the path when it cannot be
    looked at (a folder without read or search permission), where pathlib would raise
    PermissionError."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except OSError as exc:
        raise DataNotFoundError(f"{path}: cannot read it ({exc.strerror or exc}); check the "
                                f"permissions of the data folder") from None


def _idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` if it exists, else ``folder/stem.gz``, else None (raw first: faster)."""
    for p in (folder / stem, folder / (stem + ".gz")):
        if _exists(p, "file"):
            return p
    return None


def _missing_in(name: str, folder: Path) -> list[str]:
    """Required file names of ``name`` absent from ``folder``."""
    if name == "cifar10":
        return [f for f in CIFAR_FILES if not _exists(folder / f, "file")]
    return [f + "[.gz]" for f in IDX_FILES if _idx_file(folder, f) is None]


def _complete(name: str, folder: Path) -> bool:
    return _exists(folder, "dir") and not _missing_in(name, folder)


def _partial_dirs(name: str, root) -> list[Path]:
    """Folders under an explicit ``root`` holding some, but not all, of ``name``'s files."""
    n_files = len(CIFAR_FILES if name == "cifar10" else IDX_FILES)
    return [d for d in _root_dirs(name, root)
            if _exists(d, "dir") and 0 < len(_missing_in(name, d)) < n_files]


def find_dir(name: str, root=None) -> Path | None:
    """First candidate folder holding every file of ``name`` (existence only, nothing parsed).

    None also when an explicit ``root`` holds only part of the dataset and no complete copy:
    the default folders are not searched then (see the module docstring).
    """
    if root is not None:
        own = [d for d in _root_dirs(name, root) if _complete(name, d)]
        if own or _partial_dirs(name, root):
            return own[0] if own else None
    for d in candidate_dirs(name, root):
        if _complete(name, d):
            return d
    return None


def not_found_error(name: str, root=None, *, extra: str = "",
                    suggest_download: bool = True) -> DataNotFoundError:
    """One-line :class:`DataNotFoundError` naming the folders tried, what is expected, the fix.

    With ``suggest_download=False`` (a download was tried and failed) the fix does not offer
    ``--download`` again.
    """
    download_fix = ("use --download (download=True) where a network is available"
                    if suggest_download else "")
    partial = _partial_dirs(name, root) if root is not None else []
    if partial:
        held = "; ".join(f"{d} (missing {', '.join(_missing_in(name, d))})" for d in partial)
        fixes = ["add the missing files", download_fix,
                 "or pass a --data-root (root=) that holds the whole dataset"]
        msg = (f"{name}: incomplete dataset in the given data root: {held}; a data root given "
               f"explicitly is not completed from other folders. "
               f"Fix: {', '.join(f for f in fixes if f)}.")
        return DataNotFoundError(msg + (" " + extra if extra else ""))
    tried = []
    for d in candidate_dirs(name, root):
        if d.is_dir():
            miss = _missing_in(name, d)
            tried.append(f"{d} (missing {', '.join(miss)})")
        else:
            tried.append(f"{d} (no such folder)")
    if name == "cifar10":
        expected = ("cifar-10-batches-py/ with " + ", ".join(CIFAR_FILES)
                    + " (the CIFAR-10 'python version')")
        fix = f"pass --data-root DIR (root=DIR in Python) or set NTKCORE_DATA=DIR with {expected}"
    else:
        files = ", ".join(f + "[.gz]" for f in IDX_FILES)
        subdirs = " or ".join(f"DIR/{s}/" for s in _SUBDIRS[name])
        fix = (f"pass --data-root DIR (root=DIR in Python) with {files} in DIR itself or in "
               f"DIR/{_SUBDIRS[name][0]}/ (torchvision's layout), or set NTKCORE_DATA=DIR with "
               f"them in {subdirs} (a flat NTKCORE_DATA folder is not read: it cannot tell "
               f"MNIST from Fashion-MNIST)")
    if download_fix:
        fix += f", or {download_fix}"
    if name == "fashion-mnist":
        fix += ", or `apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
    msg = f"{name}: dataset files not found; tried {'; '.join(tried)}. Fix: {fix}."
    if extra:
        msg += " " + extra
    return DataNotFoundError(msg)


def download(name: str, root=None) -> Path:
    """Fetch ``name`` with torchvision into ``root`` (or the first default base); return the folder.

    Any failure (no network, no torchvision, bad checksum) becomes :class:`DataNotFoundError`.
    """
    dest = Path(root).expanduser() if root is not None else default_bases()[0]
    try:
        import torchvision.datasets as tvd

        cls = getattr(tvd, _TORCHVISION_CLASS[name])
        for train in (True, False):
            cls(root=str(dest), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 -- every failure is reported the same way
        raise not_found_error(
            name, root, extra=f"Download into {dest} failed: {type(exc).__name__}: {exc}",
            suggest_download=False) from exc
    found = find_dir(name, dest)
    if found is None:
        raise not_found_error(name, dest, extra=f"Download into {dest} left no readable files.",
                              suggest_download=False)
    return found


# --------------------------------------------------------------------------- IDX

def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise CorruptDataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc


def read_idx(path, *, magic: int) -> np.ndarray:
    """Parse one uint8 IDX file (gzipped or not) into an array of its stored shape.

    Parameters
    ----------
    path : str or Path
    magic : int
        Expected magic number: :data:`IDX_IMAGES_MAGIC` (2051) or :data:`IDX_LABELS_MAGIC` (2049).

    Raises
    ------
    CorruptDataError
        Wrong magic number, header or payload shorter (or longer) than the header says, a
        size of 0 in the header (no samples), or a file that cannot be read or decompressed;
        the message names the file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise CorruptDataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise CorruptDataError(
            f"{path}: bad IDX magic number: expected {magic}, got {got}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptDataError(f"{path}: truncated IDX header ({len(raw)} of {header} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    size = math.prod(shape)  # Python ints: sizes up to (2**32 - 1)**255 cannot overflow
    payload = len(raw) - header
    if payload != size:
        what = "truncated" if payload < size else "oversized"
        raise CorruptDataError(
            f"{path}: {what} IDX data: header says shape {shape} ({size} bytes), "
            f"file holds {payload} bytes")
    if size == 0:
        raise CorruptDataError(
            f"{path}: empty IDX data: expected at least one sample, header says shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, H*W) uint8 and labels (N,) int64 of ``split`` ("train"/"t10k") in ``folder``."""
    img_p = _idx_file(folder, f"{split}-images-idx3-ubyte")
    lab_p = _idx_file(folder, f"{split}-labels-idx1-ubyte")
    images = read_idx(img_p, magic=IDX_IMAGES_MAGIC)
    labels = read_idx(lab_p, magic=IDX_LABELS_MAGIC).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise CorruptDataError(
            f"{img_p}: expected 28 x 28 images (IDX shape (N, 28, 28)), header says "
            f"{images.shape}")
    if images.shape[0] != labels.shape[0]:
        raise CorruptDataError(
            f"{img_p}, {lab_p}: inconsistent numbers of samples: "
            f"[{images.shape[0]}, {labels.shape[0]}]")
    if labels.size and labels.max() > 9:
        raise CorruptDataError(f"{lab_p}: expected labels 0..9, got {int(labels.max())}")
    return images.reshape(images.shape[0], -1), labels, [str(img_p), str(lab_p)]


# --------------------------------------------------------------------------- CIFAR-10 pickles

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # bytes in a Python 3 pickle of protocol 0-2: encode(str, latin1)
}


class _Unfilled(np.ndarray):
    """An array the pickle created with ``_reconstruct``: its memory is uninitialised until the
    pickle's BUILD step sets its state. :func:`_filled` refuses one that was never set (a
    crafted pickle could otherwise hand back process memory as pixels)."""

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__["ntkcore_filled"] = True


def _reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` for plain arrays, as :class:`_Unfilled`."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to rebuild an array of type {subtype!r}")
    return np.ndarray.__new__(_Unfilled, shape, dtype)


def _filled(value, path: Path):
    """``value`` with every array the pickle rebuilt checked for its state and made a plain
    ndarray (in dicts, lists and tuples); CorruptDataError for an array never filled."""
    if isinstance(value, _Unfilled):
        if not value.__dict__.get("ntkcore_filled"):
            raise CorruptDataError(f"{path}: an array in the pickle has no contents (no state "
                                   f"set after it was created)")
        return value.view(np.ndarray)
    if isinstance(value, dict):
        return {k: _filled(v, path) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_filled(v, path) for v in value)
    return value


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds builtins and NumPy arrays only (CIFAR batches need nothing else)."""

    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            if name == "_reconstruct":
                return _reconstruct
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _cifar_labels(value, path: Path) -> np.ndarray:
    """Validate a batch's ``b"labels"``: a 1-D list/tuple of ints or a 1-D integer array, each in
    0..9 (bool, float, NaN, nested or out-of-range entries are refused, never cast)."""
    expected = f"{path}: expected labels as a 1-D sequence of integers 0..9, got"
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise CorruptDataError(f"{expected} an array of shape {value.shape} {value.dtype}")
        if value.size and (value.min() < 0 or value.max() > 9):
            raise CorruptDataError(f"{expected} values {value.min()}..{value.max()}")
        return value.astype(np.int64)
    if not isinstance(value, (list, tuple)):
        raise CorruptDataError(f"{expected} {type(value).__name__}")
    for i, v in enumerate(value):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise CorruptDataError(f"{expected} {v!r} ({type(v).__name__}) at index {i}")
        if not 0 <= v <= 9:
            raise CorruptDataError(f"{expected} {int(v)} at index {i}")
    return np.array([int(v) for v in value], dtype=np.int64)


def read_cifar_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: data (N, 3072) uint8 channel-major, labels (N,) int64.

    Raises
    ------
    CorruptDataError
        Not a pickle, not the expected dict, wrong data shape/dtype, or labels that are not a
        1-D sequence of N integers in 0..9.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure means a corrupt file
        raise CorruptDataError(
            f"{path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise CorruptDataError(f"{path}: expected a dict with b'data' and b'labels'")
    batch = _filled(batch, path)
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CorruptDataError(
            f"{path}: expected data of shape (N, 3072) uint8, got {data.shape} {data.dtype}")
    labels = _cifar_labels(batch[b"labels"], path)
    if data.shape[0] != labels.shape[0]:
        raise CorruptDataError(
            f"{path}: inconsistent numbers of samples: [{data.shape[0]}, {labels.shape[0]}]")
    return data, labels


def read_cifar10(folder: Path) -> dict:
    """All of CIFAR-10 in ``folder``: train (50 000 x 3072 for the real set) and test arrays.

    Raises CorruptDataError (naming the files) when the training batches or the test batch
    hold no samples at all, as the IDX reader does for an empty split.
    """
    parts = [read_cifar_batch(folder / f) for f in CIFAR_TRAIN_FILES]
    x_test, y_test = read_cifar_batch(folder / "test_batch")
    x_train = np.concatenate([p[0] for p in parts])
    if x_train.shape[0] == 0:
        raise CorruptDataError(f"{folder}: data_batch_1..5 hold no samples; expected at least one")
    if x_test.shape[0] == 0:
        raise CorruptDataError(f"{folder / 'test_batch'}: holds no samples; expected at least one")
    return {"x_train": x_train, "y_train": np.concatenate([p[1] for p in parts]),
            "x_test": x_test, "y_test": y_test}


def read_idx_dataset(folder: Path) -> dict:
    """MNIST-style train/t10k IDX pairs in ``folder`` as flat uint8 arrays plus int64 labels."""
    x_train, y_train, _ = read_idx_split(folder, "train")
    x_test, y_test, _ = read_idx_split(folder, "t10k")
    if x_train.shape[1] != x_test.shape[1]:
        raise CorruptDataError(
            f"{folder}: train and t10k images differ in size: "
            f"[{x_train.shape[1]}, {x_test.shape[1]}]")
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


#: scikit-learn's embedded digits: 1797 rows of 64 pixels (0..16) and the label, as CSV.
DIGITS_CSV = ("datasets", "data", "digits.csv.gz")
DIGITS_SHAPE = (1797, 65)


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """(x (1797, 64) uint8 in 0..16, y (1797,) int64) of scikit-learn's embedded digits.

    Read from scikit-learn's own data file, found without importing scikit-learn: importing
    ``sklearn.datasets`` took 0.75-0.94 s of the quickstart, the read 0.02 s. Where that file
    is not where this scikit-learn keeps it, ``load_digits()`` reads it.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = (Path(spec.origin).parent.joinpath(*DIGITS_CSV)
            if spec is not None and spec.origin else None)
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        if table.shape == DIGITS_SHAPE:
            return table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.astype(np.uint8), bunch.target.astype(np.int64)
