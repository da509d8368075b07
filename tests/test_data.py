"""Tests of ntkcore.data: loaders on real-format files, class selection, preprocessing, errors.

Files are written in the real on-disk formats by tests/data_fixtures.py (nothing is mocked except
torchvision's downloader, since there is no network). Tolerances: preprocessing is a handful of
float64 operations per entry, so results agree to 1e-12 (a few hundred ulps of margin).
"""

from __future__ import annotations

import gzip
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from ntkcore import _formats
from ntkcore.data import (DATASET_INFO, DATASETS, DIGITS_MEAN, DIGITS_N_TRAIN, DIGITS_STD,
                          Dataset, canonical_name, dataset_status, find_dataset, load_dataset,
                          parse_classes)
from ntkcore.errors import (CorruptDataError, DataNotFoundError, EmptySelectionError,
                            NonFiniteError, ParameterError, ShapeError, UnknownDatasetError)

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import (fake_torchvision, fixture_arrays, write_cifar10,  # noqa: E402
                           write_idx, write_mnist)

TOL = 1e-12


@pytest.fixture(autouse=True)
def isolated_search(tmp_path, monkeypatch):
    """No dataset outside the test's own folders: empty NTKCORE_DATA and HOME, no Debian dir."""
    monkeypatch.setenv("NTKCORE_DATA", str(tmp_path / "env-data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(_formats, "DEBIAN_FASHION_DIR", str(tmp_path / "no-debian"))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def reference_preprocess(pixels, mean, std):
    """Obvious float64 reference: per-channel (x - mean) / std, then unit rows."""
    pixels = np.asarray(pixels, dtype=np.float64)
    d = pixels.shape[1]
    c = len(mean)
    out = np.empty_like(pixels)
    for ch in range(c):
        sl = slice(ch * d // c, (ch + 1) * d // c)
        out[:, sl] = (pixels[:, sl] - mean[ch]) / std[ch]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


# --------------------------------------------------------------------------- digits / preprocess

def test_digits_default_loads(digits):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert digits.name == "digits" and digits.classes == tuple(range(10))
    assert digits.pixels_train.shape == (DIGITS_N_TRAIN, 64)
    assert digits.pixels_test.shape == (1797 - DIGITS_N_TRAIN, 64)
    assert digits.pixels_train.dtype == np.float64 and digits.y_train.dtype == np.int64
    assert 0.0 <= digits.pixels_train.min() and digits.pixels_train.max() <= 1.0
    np.testing.assert_array_equal(digits.pixels_train, bunch.data[digits.train_indices] / 16)
    np.testing.assert_array_equal(digits.y_train, bunch.target[digits.train_indices])
    assert digits.test_indices.min() >= DIGITS_N_TRAIN  # fixed split: test never leaks in
    assert not digits.binary and digits.image_shape == (8, 8)


def test_digits_normalization_is_training_pixel_stats():
    from sklearn.datasets import load_digits

    train = load_digits().data[:DIGITS_N_TRAIN] / 16.0
    assert abs(train.mean() - DIGITS_MEAN) < TOL and abs(train.std() - DIGITS_STD) < TOL


def test_rows_unit_norm_and_match_reference(digits):
    X = digits.X_train
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=0, atol=TOL)
    ref = reference_preprocess(digits.pixels_train, digits.mean, digits.std)
    np.testing.assert_allclose(X, ref, rtol=0, atol=TOL)
    np.testing.assert_allclose(digits.X_test, reference_preprocess(
        digits.pixels_test, digits.mean, digits.std), rtol=0, atol=TOL)
    assert digits.X_train is X  # cached


def test_preprocess_per_channel_channel_major():
    mean, std = (0.1, 0.2, 0.3), (1.0, 2.0, 4.0)
    px = np.random.default_rng(0).random((4, 12))
    ds = Dataset("t", (0, 1), ("a", "b"), (3, 2, 2), mean, std, px, np.array([0, 1, 0, 1]),
                 px[:1], np.array([0]), np.arange(4), np.arange(1))
    z = (px - np.repeat(mean, 4)) / np.repeat(std, 4)
    np.testing.assert_allclose(ds.preprocess(px), z / np.linalg.norm(z, axis=1, keepdims=True),
                               rtol=0, atol=TOL)
    # one row (d,) in, one row out
    np.testing.assert_allclose(ds.preprocess(px[2]), ds.preprocess(px)[2], rtol=0, atol=TOL)


def test_preprocess_torch_matches_numpy_and_is_differentiable(digits):
    torch = pytest.importorskip("torch")
    px = digits.pixels_train[:6]
    t = torch.tensor(px, dtype=torch.float64, requires_grad=True)
    out = digits.preprocess(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.detach().numpy(), digits.preprocess(px), rtol=0, atol=TOL)
    assert torch.autograd.gradcheck(digits.preprocess, (t,), eps=1e-6, atol=1e-7)
    out.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    f32 = digits.preprocess(torch.tensor(px, dtype=torch.float32))
    assert f32.dtype == torch.float32
    # float32 rounding: ~1e-7 relative per entry of a unit vector
    np.testing.assert_allclose(f32.numpy(), digits.preprocess(px), rtol=0, atol=1e-6)


def test_preprocess_rejects_bad_input(digits):
    with pytest.raises(ShapeError, match=r"pixels: expected shape \(n, 64\)"):
        digits.preprocess(np.zeros((3, 63)))
    bad = digits.pixels_train[:2].copy()
    bad[1, 5] = np.nan
    with pytest.raises(NonFiniteError):
        digits.preprocess(bad)


def test_preprocess_zero_row_stays_finite(digits):
    row = np.full((1, 64), DIGITS_MEAN)  # every pixel at the mean: z == 0
    out = digits.preprocess(row)
    assert np.all(out == 0.0)


# --------------------------------------------------------------------------- classes / targets

@pytest.mark.parametrize("spec, expected", [
    ("10", tuple(range(10))), ("5", (0, 1, 2, 3, 4)), (5, (0, 1, 2, 3, 4)),
    ("3,8", (3, 8)), ("3, 8", (3, 8)), ("8 3", (8, 3)), ((3, 8), (3, 8)), ([1, 2, 7], (1, 2, 7)),
])
def test_parse_classes(spec, expected):
    assert parse_classes(spec) == expected


def test_parse_classes_by_name():
    names = DATASET_INFO["cifar10"].class_names
    assert parse_classes("automobile,airplane", class_names=names) == (1, 0)


@pytest.mark.parametrize("spec, err, msg", [
    ("0", EmptySelectionError, "at least 2"), ("", EmptySelectionError, "at least 2"),
    ((), EmptySelectionError, "at least 2"), ("1", ParameterError, "2..10"),
    ("11", ParameterError, "2..10"), ("3,3", ParameterError, "distinct"),
    ("3,12", ParameterError, "0..9"), ("3,x", ParameterError, "'x'"),
    ("3,", ParameterError, "at least 2"), (True, ParameterError, "count"),
])
def test_parse_classes_errors(spec, err, msg):
    with pytest.raises(err, match=msg):
        parse_classes(spec)


def test_parse_classes_respects_n_classes():
    with pytest.raises(ParameterError, match="0..3"):
        parse_classes("2,5", n_classes=4)


def test_five_classes_one_hot():
    ds = load_dataset("digits", classes="5")
    assert ds.classes == (0, 1, 2, 3, 4) and not ds.binary
    assert set(np.unique(ds.y_train)) == set(range(5))
    Y = ds.Y_train
    assert Y.shape == (ds.n_train, 5) and Y.dtype == np.float64
    np.testing.assert_array_equal(Y.sum(axis=1), 1.0)
    np.testing.assert_array_equal(Y.argmax(axis=1), ds.y_train)
    np.testing.assert_array_equal(ds.labels_from_outputs(Y), ds.y_train)


def test_binary_pair_targets_pm1():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", classes="3,8")
    assert ds.binary and ds.classes == (3, 8) and ds.class_names == ("3", "8")
    original = load_digits().target[ds.train_indices]
    np.testing.assert_array_equal(np.array(ds.classes)[ds.y_train], original)
    Y = ds.Y_train
    assert Y.shape == (ds.n_train, 1)
    np.testing.assert_array_equal(Y[:, 0], np.where(original == 3, -1.0, 1.0))
    np.testing.assert_array_equal(ds.labels_from_outputs(Y), ds.y_train)
    assert ds.Y_test.shape == (ds.n_test, 1)


def test_targets_reject_bad_labels(digits):
    with pytest.raises(ParameterError, match="0..9"):
        digits.targets(np.array([0, 10]))
    with pytest.raises(ShapeError):
        digits.targets(np.zeros((2, 2), dtype=int))


# --------------------------------------------------------------------------- subsets

def test_seeded_subsets_reproducible_and_seed_dependent():
    a = load_dataset("digits", n_train=100, n_test=40, seed=1)
    b = load_dataset("digits", n_train=100, n_test=40, seed=1)
    c = load_dataset("digits", n_train=100, n_test=40, seed=2)
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    np.testing.assert_array_equal(a.pixels_train, b.pixels_train)
    np.testing.assert_array_equal(a.test_indices, b.test_indices)
    assert not np.array_equal(a.train_indices, c.train_indices)
    assert not np.array_equal(a.test_indices, c.test_indices)
    assert a.n_train == 100 and a.n_test == 40 and len(np.unique(a.train_indices)) == 100
    small = load_dataset("digits", n_train=50, seed=1)  # same seed, smaller n: a subset
    assert set(small.train_indices) <= set(a.train_indices)
    np.testing.assert_array_equal(small.test_indices, load_dataset("digits", seed=1).test_indices)


def test_n_train_too_large_names_available_count():
    with pytest.raises(ParameterError, match=r"at most 1437 .* got 5000"):
        load_dataset("digits", n_train=5000)
    with pytest.raises(ParameterError, match="n_train"):
        load_dataset("digits", n_train=0)
    with pytest.raises(ParameterError, match="seed"):
        load_dataset("digits", seed=-1)


def test_unknown_dataset_lists_known():
    with pytest.raises(UnknownDatasetError, match="digits, mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")
    assert canonical_name(" Fashion_MNIST ") == "fashion-mnist"
    assert canonical_name("CIFAR-10") == "cifar10"


# --------------------------------------------------------------------------- MNIST IDX files

@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_idx_fixture_loads(tmp_path, gz, layout):
    root = write_mnist(tmp_path / "data", 30, 10, gz=gz, layout=layout, seed=3)
    ds = load_dataset("mnist", root=root)
    arrays = fixture_arrays(30, 10, 3)
    assert ds.n_train == 30 and ds.n_test == 10 and ds.image_shape == (28, 28)
    np.testing.assert_array_equal(ds.train_indices, np.arange(30))
    np.testing.assert_array_equal(ds.pixels_train * 255, arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.pixels_test * 255, arrays["x_test"])
    # one pixel by hand: row 7, image position (row 5, column 11)
    assert ds.pixels_train[7, 5 * 28 + 11] == arrays["x_train"][7, 5 * 28 + 11] / 255.0
    expected_dir = root / "MNIST" / "raw" if layout == "torchvision" else root
    assert find_dataset("mnist", root) == str(expected_dir) == ds.source
    np.testing.assert_allclose(ds.X_train, reference_preprocess(ds.pixels_train, (0.13,), (0.31,)),
                               rtol=0, atol=TOL)


def test_mnist_class_pair_and_subset(tmp_path):
    root = write_mnist(tmp_path, 60, 20, seed=5)
    arrays = fixture_arrays(60, 20, 5)
    ds = load_dataset("mnist", root=root, classes="3,8", n_train=8, seed=0)
    assert ds.n_train == 8 and ds.binary
    orig = arrays["y_train"][ds.train_indices]
    assert set(orig) <= {3, 8}
    np.testing.assert_array_equal(np.array([3, 8])[ds.y_train], orig)
    np.testing.assert_array_equal(ds.pixels_train * 255, arrays["x_train"][ds.train_indices])
    assert set(arrays["y_test"][ds.test_indices]) <= {3, 8} and ds.n_test == 4


def test_fashion_from_env_var_torchvision_layout(tmp_path, monkeypatch):
    base = write_mnist(tmp_path / "env", 20, 10, layout="torchvision", dataset="fashion-mnist")
    monkeypatch.setenv("NTKCORE_DATA", str(base))
    ds = load_dataset("fashion-mnist", classes="0,9")
    assert ds.source == str(base / "FashionMNIST" / "raw")
    assert ds.class_names == ("T-shirt/top", "Ankle boot") and ds.mean == (0.29,)


def test_explicit_root_wins_over_env(tmp_path, monkeypatch):
    env = write_mnist(tmp_path / "env", 20, 10, layout="torchvision", seed=1)
    monkeypatch.setenv("NTKCORE_DATA", str(env))
    root = write_mnist(tmp_path / "root", 30, 10, seed=2)
    assert load_dataset("mnist", root=root).source == str(root)
    assert load_dataset("mnist").source == str(env / "MNIST" / "raw")


def test_idx_bad_magic(tmp_path):
    root = write_mnist(tmp_path, 30, 10, gz=False)
    arr = fixture_arrays(30, 10)["x_train"].reshape(30, 28, 28)
    write_idx(root / "train-images-idx3-ubyte", arr, magic=2049)
    with pytest.raises(CorruptDataError,
                       match=r"train-images-idx3-ubyte: bad IDX magic .*2051.*2049"):
        load_dataset("mnist", root=root)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    root = write_mnist(tmp_path, 30, 10, gz=gz)
    name = "t10k-labels-idx1-ubyte" + (".gz" if gz else "")
    path = root / name
    raw = (gzip.decompress if gz else bytes)(path.read_bytes())
    write = (lambda b: gzip.compress(b)) if gz else bytes
    path.write_bytes(write(raw[:-3]))
    with pytest.raises(CorruptDataError, match=f"{name}: truncated IDX data"):
        load_dataset("mnist", root=root)
    path.write_bytes(write(raw[:6]))
    with pytest.raises(CorruptDataError, match="truncated IDX header"):
        load_dataset("mnist", root=root)


def test_gzip_cut_short_is_corrupt(tmp_path):
    root = write_mnist(tmp_path, 30, 10, gz=True)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptDataError, match="train-images-idx3-ubyte.gz: cannot read"):
        load_dataset("mnist", root=root)


def test_idx_label_image_count_mismatch(tmp_path):
    root = write_mnist(tmp_path, 30, 10, gz=False)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(29, dtype=np.uint8))
    with pytest.raises(CorruptDataError, match=r"inconsistent numbers of samples: \[30, 29\]"):
        load_dataset("mnist", root=root)


def test_missing_data_message(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as info:
        load_dataset("mnist", root=root)
    msg = str(info.value)
    assert str(root) in msg and str(root / "MNIST" / "raw") in msg
    assert "train-images-idx3-ubyte[.gz]" in msg and "--data-root" in msg and "--download" in msg
    assert "\n" not in msg
    assert find_dataset("mnist", root) is None


def test_missing_names_partial_folder_and_fashion_fix(tmp_path):
    root = write_mnist(tmp_path, 30, 10, gz=True)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[.gz\]"):
        load_dataset("mnist", root=root)
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path / "empty")


def test_download_failure_is_data_not_found(tmp_path, monkeypatch):
    class Failing:
        def __init__(self, root, train, download):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    fake_torchvision(monkeypatch, Failing)
    with pytest.raises(DataNotFoundError, match=r"Download into .* failed: RuntimeError"):
        load_dataset("mnist", root=tmp_path, download=True)


def test_empty_selection(tmp_path):
    root = write_mnist(tmp_path, 5, 5)  # labels 0..4 only
    with pytest.raises(EmptySelectionError, match=r"classes \[7, 8\] have no train samples"):
        load_dataset("mnist", root=root, classes="7,8")
    with pytest.raises(ParameterError, match=r"at most 2 .* got 3"):
        load_dataset("mnist", root=root, classes="0,1", n_train=3)


# --------------------------------------------------------------------------- CIFAR-10 pickles

def test_cifar10_fixture_loads(tmp_path):
    root = write_cifar10(tmp_path, 30, 10, seed=4)
    arrays = fixture_arrays(30, 10, 4, dim=3072)
    ds = load_dataset("cifar10", root=root)
    assert ds.n_train == 30 and ds.n_test == 10 and ds.image_shape == (3, 32, 32)
    assert ds.class_names[:2] == ("airplane", "automobile") and ds.mean == (0.5, 0.5, 0.5)
    np.testing.assert_array_equal(ds.pixels_train * 255, arrays["x_train"])
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    # green channel, image row 2, column 30 of training image 17 (channel-major rows)
    assert ds.pixels_train[17, 1024 + 2 * 32 + 30] == arrays["x_train"][17, 1024 + 94] / 255.0
    imgs = ds.as_images(ds.pixels_train)
    assert imgs.shape == (30, 32, 32, 3) and imgs[17, 2, 30, 1] == ds.pixels_train[17, 1024 + 94]
    np.testing.assert_allclose(ds.X_train, reference_preprocess(ds.pixels_train, ds.mean, ds.std),
                               rtol=0, atol=TOL)
    assert find_dataset("cifar10", root) == str(root / "cifar-10-batches-py")


def test_cifar10_corrupt_pickle(tmp_path):
    root = write_cifar10(tmp_path, 30, 10)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(CorruptDataError, match="data_batch_3: not a readable CIFAR-10 batch"):
        load_dataset("cifar10", root=root)


def test_cifar10_wrong_shape_and_hostile_pickle(tmp_path):
    root = write_cifar10(tmp_path, 30, 10)
    folder = root / "cifar-10-batches-py"
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((10, 100), np.uint8), b"labels": [0] * 10}, fh)
    with pytest.raises(CorruptDataError, match=r"test_batch: expected data of shape \(N, 3072\)"):
        load_dataset("cifar10", root=root)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(CorruptDataError, match="refusing to load global"):
        load_dataset("cifar10", root=root)
    assert not marker.exists()


# --------------------------------------------------------------------------- synthetic / status

def test_synthetic_any_n_and_d():
    ds = load_dataset("synthetic", n_train=123, n_test=7, dim=50, seed=9, classes="2,5,7")
    assert ds.pixels_train.shape == (123, 50) and ds.pixels_test.shape == (7, 50)
    assert ds.image_shape == (50,) and ds.classes == (2, 5, 7)
    assert 0 < ds.pixels_train.min() and ds.pixels_train.max() < 1
    assert set(np.unique(ds.y_train)) == {0, 1, 2}
    again = load_dataset("synthetic", n_train=123, n_test=7, dim=50, seed=9, classes="2,5,7")
    np.testing.assert_array_equal(ds.pixels_train, again.pixels_train)
    other = load_dataset("synthetic", n_train=123, n_test=7, dim=50, seed=10, classes="2,5,7")
    assert not np.array_equal(ds.pixels_train, other.pixels_train)
    default = load_dataset("synthetic")
    assert default.pixels_train.shape == (1000, 64) and default.image_shape == (8, 8)
    # classes are separable enough to learn: class means differ by far more than noise/sqrt(n)
    m0 = ds.pixels_train[ds.y_train == 0].mean(0)
    m1 = ds.pixels_train[ds.y_train == 1].mean(0)
    assert np.linalg.norm(m0 - m1) > 1.0
    with pytest.raises(ParameterError, match="only synthetic"):
        load_dataset("digits", dim=10)


def test_dataset_status_and_find(tmp_path):
    write_mnist(tmp_path, 20, 10)
    status = dict(dataset_status(tmp_path))
    assert tuple(status) == DATASETS
    assert status["mnist"] == str(tmp_path) and status["cifar10"] is None
    assert status["digits"] and status["synthetic"]
    with pytest.raises(UnknownDatasetError):
        find_dataset("svhn")


# --------------------------------------------------------------------------- the real Fashion-MNIST

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(_formats, "DEBIAN_FASHION_DIR", str(DEBIAN))
    ds = load_dataset("fashion-mnist", n_train=200, n_test=50, seed=0)
    assert ds.source == str(DEBIAN)
    assert ds.pixels_train.shape == (200, 784) and ds.n_test == 50
    assert ds.train_indices.max() < 60000 and ds.test_indices.max() < 10000
    assert 0.0 <= ds.pixels_train.min() and ds.pixels_train.max() <= 1.0
    assert len(np.unique(ds.y_train)) == 10
    # Table 5's constants describe this data: mean pixel ~0.29, std ~0.35
    assert abs(ds.pixels_train.mean() - 0.29) < 0.03 and abs(ds.pixels_train.std() - 0.35) < 0.03
    np.testing.assert_allclose(np.linalg.norm(ds.X_train, axis=1), 1.0, rtol=0, atol=TOL)
