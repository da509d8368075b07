"""Edge cases of the data loaders found in review: empty IDX splits, IDX header overflow, seeded
subsets that lose a class, CIFAR-10 labels that were cast instead of checked, a partial explicit
data root that fell back to another copy, non-ASCII digits in --classes, and a failed download
that suggested --download.

Files are written in the real on-disk formats by tests/data_fixtures.py; CLI checks use the
helpers of tests/test_cli.py (one line on stderr, exit 2, no traceback).
"""

from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from ntkcore import _formats
from ntkcore.data import dataset_status, find_dataset, load_dataset, parse_classes
from ntkcore.errors import (CorruptDataError, DataNotFoundError, EmptySelectionError,
                            ParameterError)

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import fake_torchvision, write_cifar10, write_idx, write_mnist  # noqa: E402
from test_cli import TINY, invoke, one_line_error  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_search(tmp_path, monkeypatch):
    """No dataset outside the test's own folders: empty NTKCORE_DATA and HOME, no Debian dir."""
    monkeypatch.setenv("NTKCORE_DATA", str(tmp_path / "env-data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(_formats, "DEBIAN_FASHION_DIR", str(tmp_path / "no-debian"))


def user_error(result, *needles):
    """One clear line and exit 2 (a user error, not 'internal error' with exit 1)."""
    err = one_line_error(result, *needles)
    assert result.exit_code == 2 and "internal error" not in err, err
    return err


# --------------------------------------------------------------------------- 1. IDX sizes

@pytest.mark.parametrize("split", ["train", "t10k"])
@pytest.mark.parametrize("gz", [False, True])
def test_empty_idx_split_is_corrupt(tmp_path, split, gz):
    root = write_mnist(tmp_path / "data", 20, 10, gz=gz)
    ext = ".gz" if gz else ""
    write_idx(root / f"{split}-images-idx3-ubyte{ext}", np.zeros((0, 28, 28)), gz=gz)
    write_idx(root / f"{split}-labels-idx1-ubyte{ext}", np.zeros(0), gz=gz)
    with pytest.raises(CorruptDataError,
                       match=rf"{split}-images-idx3-ubyte{ext}: empty IDX data.*\(0, 28, 28\)"):
        load_dataset("mnist", root=root)
    r = invoke("influence", "--dataset", "mnist", "--data-root", root, "--out", tmp_path / "o",
               *TINY)
    user_error(r, f"{split}-images-idx3-ubyte", "empty IDX data")


def test_idx_header_size_overflow_is_truncated(tmp_path):
    # 2**31 * 2**31 * 4 = 2**64 wraps to 0 in int64: the old check then passed a payload of 0.
    root = write_mnist(tmp_path, 20, 10, gz=False)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(b"".join(int(v).to_bytes(4, "big") for v in (0x803, 2**31, 2**31, 4)))
    with pytest.raises(CorruptDataError, match=rf"truncated IDX data.*{2**64} bytes"):
        _formats.read_idx(path, magic=_formats.IDX_IMAGES_MAGIC)
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte: truncated IDX data"):
        load_dataset("mnist", root=root)


# --------------------------------------------------------------------------- 2. subsets

def test_subset_missing_a_class_is_refused():
    # seed 1 draws 3 training samples of classes {3, 8} that are all 3s
    with pytest.raises(EmptySelectionError, match=r"no samples of class 8;.*n_train"):
        load_dataset("digits", classes="3,8", n_train=3, seed=1)
    with pytest.raises(EmptySelectionError, match=r"classes 0, 1, 3, .*10 selected classes"):
        load_dataset("digits", n_train=1)
    with pytest.raises(EmptySelectionError, match="synthetic: .*no samples of class"):
        load_dataset("synthetic", n_train=1, n_test=1)


def test_subset_stays_uniformly_random(tmp_path):
    """The check refuses bad draws but never changes a good one (documented formula)."""
    ds = load_dataset("digits", classes="3,8", n_train=2, seed=2)
    assert set(ds.y_train) == {0, 1}
    from sklearn.datasets import load_digits
    y = load_digits().target[:1437]
    idx = np.flatnonzero(np.isin(y, (3, 8)))
    rng = np.random.default_rng(np.random.SeedSequence(2).spawn(2)[0])
    np.testing.assert_array_equal(ds.train_indices, np.sort(rng.permutation(idx)[:2]))
    # a test subset may miss classes (few test points are a normal request)
    assert load_dataset("digits", n_train=200, n_test=3, seed=0).n_test == 3


def test_subset_missing_a_class_cli(tmp_path):
    r = invoke("influence", "--classes", "3,8", "--n-train", 3, "--seed", 1,
               "--out", tmp_path / "o", *TINY)
    user_error(r, "class 8", "--n-train")
    assert not (tmp_path / "o" / "model.pt").exists()


# --------------------------------------------------------------------------- 3. CIFAR-10 labels

N = 6  # samples per training batch of write_cifar10(..., 30, 10)


@pytest.mark.parametrize("labels", [
    pytest.param([0.7] * N, id="float"),
    pytest.param(np.arange(N) % 10 / 1.0, id="float-array-of-integers"),
    pytest.param(np.full(N, np.nan), id="nan"),
    pytest.param(np.zeros((N // 2, 2), np.int64), id="2-d"),
    pytest.param([[0, 1]] * (N // 2), id="nested-list"),
    pytest.param([True] * N, id="bool"),
    pytest.param(np.ones(N, bool), id="bool-array"),
    pytest.param([2**70] * N, id="huge-int"),
    pytest.param(np.full(N, 2**63, np.uint64), id="huge-uint64"),
    pytest.param([10] * N, id="ten"),
    pytest.param([-1] * N, id="negative"),
    pytest.param(["a"] * N, id="str"),
    pytest.param(7, id="scalar"),
])
def test_cifar10_labels_validated_not_cast(tmp_path, labels):
    root = write_cifar10(tmp_path, 30, 10)
    with open(root / "cifar-10-batches-py" / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": np.zeros((N, 3072), np.uint8), b"labels": labels}, fh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value encountered in cast"
        with pytest.raises(CorruptDataError,
                           match="data_batch_2: expected labels as a 1-D sequence of integers"):
            load_dataset("cifar10", root=root)


@pytest.mark.parametrize("labels", [
    pytest.param(lambda y: [np.int64(v) for v in y], id="list-of-numpy-ints"),
    pytest.param(lambda y: np.asarray(y, np.uint8), id="uint8-array"),
    pytest.param(lambda y: tuple(int(v) for v in y), id="tuple"),
])
def test_cifar10_integer_labels_accepted(tmp_path, labels):
    root = write_cifar10(tmp_path, 30, 10)
    y = [3, 1, 4, 1, 5, 9]
    with open(root / "cifar-10-batches-py" / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": np.zeros((N, 3072), np.uint8), b"labels": labels(y)}, fh)
    ds = load_dataset("cifar10", root=root)
    np.testing.assert_array_equal(ds.y_train[N:2 * N], y)


def test_cifar10_bad_labels_cli_and_empty_split(tmp_path):
    root = write_cifar10(tmp_path / "data", 30, 10)
    folder = root / "cifar-10-batches-py"
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": np.zeros((N, 3072), np.uint8), b"labels": [0.7] * N}, fh)
    r = invoke("influence", "--dataset", "cifar10", "--data-root", root, "--out",
               tmp_path / "o", *TINY)
    user_error(r, "data_batch_2", "integers")
    root = write_cifar10(tmp_path / "data2", 30, 10)
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, fh)
    with pytest.raises(CorruptDataError, match="test_batch: holds no samples"):
        load_dataset("cifar10", root=root)


# --------------------------------------------------------------------------- 4. partial root

def test_partial_explicit_root_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    debian = write_mnist(tmp_path / "debian", 20, 10, dataset="fashion-mnist")
    monkeypatch.setattr(_formats, "DEBIAN_FASHION_DIR", str(debian))
    fb = write_mnist(tmp_path / "fb", 20, 10, layout="torchvision", dataset="fashion-mnist")
    (fb / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError,
                       match=r"FashionMNIST/raw \(missing t10k-labels-idx1-ubyte\[.gz\]\)"):
        load_dataset("fashion-mnist", root=fb)
    assert find_dataset("fashion-mnist", fb) is None
    assert dict(dataset_status(fb))["fashion-mnist"] is None
    r = invoke("influence", "--dataset", "fashion-mnist", "--data-root", fb,
               "--out", tmp_path / "o", *TINY)
    user_error(r, "t10k-labels-idx1-ubyte", "--download")
    # no files of the dataset at all under the root: the documented fallback still applies
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_dataset("fashion-mnist", root=empty).source == str(debian)
    assert load_dataset("fashion-mnist").source == str(debian)


def test_partial_root_does_not_fall_back_to_env_but_complete_layout_wins(tmp_path, monkeypatch):
    env = write_mnist(tmp_path / "env", 20, 10, layout="torchvision")
    monkeypatch.setenv("NTKCORE_DATA", str(env))
    root = write_mnist(tmp_path / "root", 20, 10, gz=False)
    (root / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match="missing train-labels-idx1-ubyte"):
        load_dataset("mnist", root=root)
    # a complete copy in another layout of the same root is used
    write_mnist(root, 20, 10, layout="torchvision")
    assert load_dataset("mnist", root=root).source == str(root / "MNIST" / "raw")


# --------------------------------------------------------------------------- 5. --classes

@pytest.mark.parametrize("spec", ["²,8", "²", "3,８", "٣,8", ["²", "8"]])
def test_classes_non_ascii_digits_are_parameter_errors(spec):
    with pytest.raises(ParameterError, match="classes: expected class ids"):
        parse_classes(spec)


def test_classes_non_ascii_digits_cli(tmp_path):
    user_error(invoke("influence", "--classes", "²,8", "--out", tmp_path / "o", *TINY),
               "classes", "'²'")


# --------------------------------------------------------------------------- 6. --download

class _Failing:
    def __init__(self, root, train, download):
        raise RuntimeError("no network")


class _NoOp:
    def __init__(self, root, train, download):
        pass


@pytest.mark.parametrize("downloader,needle", [(_Failing, "failed: RuntimeError: no network"),
                                               (_NoOp, "left no readable files")])
@pytest.mark.parametrize("partial", [False, True])
def test_failed_download_does_not_suggest_download(tmp_path, monkeypatch, downloader, needle,
                                                   partial):
    fake_torchvision(monkeypatch, downloader)
    root = tmp_path / "dl"
    if partial:
        write_mnist(root, 20, 10)
        (root / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", root=root, download=True)
    msg = str(info.value)
    assert needle in msg and "--data-root" in msg, msg
    assert "--download" not in msg and "download=True" not in msg, msg
    r = invoke("influence", "--dataset", "mnist", "--data-root", root, "--download",
               "--out", tmp_path / "o", *TINY)
    err = user_error(r, needle)
    assert "--download" not in err, err


# --------------------------------------------------------------------------- session 7 review

def test_damaged_deflate_stream_is_corrupt_data(tmp_path):
    """A bit flip inside a .gz's compressed data raised zlib.error (an internal error in the
    CLI) instead of CorruptDataError naming the file."""
    root = write_mnist(tmp_path / "d", 200, 20, gz=True)
    path = root / "train-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    import zlib
    hits = 0
    for pos in range(12, min(len(raw) - 8, 200)):
        trial = bytearray(raw)
        trial[pos] ^= 0x40
        path.write_bytes(bytes(trial))
        try:
            load_dataset("mnist", root=root, n_train=50, n_test=10)
        except CorruptDataError as exc:
            assert "train-labels-idx1-ubyte.gz" in str(exc)
            hits += "zlib" in str(exc) or "error" in str(exc)
        except zlib.error as exc:  # the bug
            raise AssertionError(f"untyped zlib.error at byte {pos}: {exc}") from exc
        except (ParameterError, EmptySelectionError):
            pass  # a flip that still decodes may change labels; that is not this test
    assert hits, "no flip reached the deflate decoder"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("shape", [(30, 14, 56), (30, 784, 1)])
def test_idx_images_must_be_28_by_28(tmp_path, shape):
    """Headers (N, 14, 56) or (N, 784, 1) loaded silently as 28 x 28 images."""
    root = write_mnist(tmp_path / "d", 30, 10, gz=False)
    pixels = np.arange(30 * 784, dtype=np.uint8).reshape(shape)
    write_idx(root / "train-images-idx3-ubyte", pixels)
    with pytest.raises(CorruptDataError, match=r"expected 28 x 28 images"):
        load_dataset("mnist", root=root)


def test_not_found_message_says_where_ntkcore_data_is_read(tmp_path, monkeypatch):
    """The fix advised files 'flat' in NTKCORE_DATA, which is never read flat."""
    flat = write_mnist(tmp_path / "flat", 20, 10)
    monkeypatch.setenv("NTKCORE_DATA", str(flat))
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist")
    msg = str(info.value)
    assert "DIR/MNIST/raw/ or DIR/mnist/" in msg and "flat NTKCORE_DATA folder is not read" in msg
    monkeypatch.setenv("NTKCORE_DATA", str(tmp_path / "env"))
    (tmp_path / "env").mkdir()
    (flat).rename(tmp_path / "env" / "mnist")
    assert load_dataset("mnist").n_train == 20  # found in DIR/mnist/


def test_class_names_with_spaces_split_on_commas():
    from ntkcore.data import DATASET_INFO
    names = DATASET_INFO["fashion-mnist"].class_names
    assert parse_classes("Ankle boot,Bag", class_names=names) == (9, 8)
    assert parse_classes(" Ankle boot , T-shirt/top", class_names=names) == (9, 0)
    assert parse_classes("3, 8") == (3, 8)
    assert parse_classes("3 8") == (3, 8)


def test_as_images_one_row_and_bad_shapes():
    from ntkcore.errors import ShapeError
    d = load_dataset("digits", n_train=40, n_test=10)
    assert d.as_images(d.pixels_train[0]).shape == (8, 8)
    assert d.as_images(d.pixels_train[:3]).shape == (3, 8, 8)
    with pytest.raises(ShapeError):
        d.as_images(d.pixels_train[:3, :10])
