"""Public-API edge cases from the session-12 review; each test failed before its fix."""

import importlib

import numpy as np
import pytest
import torch

import ntkcore as nc
from ntkcore.errors import MemoryBudgetError, NonFiniteError, ParameterError

from conftest import krr_problem
from reference import loo_influence_bruteforce

gram_module = importlib.import_module("ntkcore.gram")  # ``ntkcore.gram`` is the function
HUGE = 10**400  # an int past float64's range: math.isfinite(HUGE) raised OverflowError


# ------------------------------------------------------------ integers past float64's range
@pytest.mark.parametrize("call", [
    lambda K, Y, Kt, Yt: nc.loo_influence(K, Y, Kt, Yt, lam=HUGE),
    lambda K, Y, Kt, Yt: nc.loo_influence(K, Y, Kt, Yt, lam=1.0, top_k=HUGE),
    lambda K, Y, Kt, Yt: nc.loo_influence(K, Y, Kt, Yt, lam=1.0, top_k=2**63),
    lambda K, Y, Kt, Yt: nc.gram_power(Kt, HUGE),
    lambda K, Y, Kt, Yt: nc.flip_rate(Kt, Kt, tau=HUGE),
    lambda K, Y, Kt, Yt: nc.spectrum(Kt, rank_rtol=HUGE),
    lambda K, Y, Kt, Yt: nc.empirical_ntk(torch.nn.Linear(6, 2).double(), torch.zeros(3, 6),
                                          memory_budget=HUGE),
], ids=["lam", "top_k", "top_k_2^63", "p", "tau", "rank_rtol", "memory_budget"])
def test_an_integer_past_float64_is_a_parameter_error(rng, call):
    with pytest.raises(ParameterError):
        call(*krr_problem(rng, n=8, T=3, C=2))


def test_a_huge_integer_is_shown_short(rng):
    with pytest.raises(ParameterError, match=r"digits\)") as err:
        nc.loo_influence(*krr_problem(rng, n=8, T=3, C=2), lam=1.0, top_k=HUGE)
    assert len(str(err.value)) < 120


# ------------------------------------------------------------------- gram: memory planning
@pytest.mark.parametrize("call", [lambda X: nc.gram(X), lambda X: nc.gram(X, X + 1),
                                  lambda X: nc.gram_power(X, 3)],
                         ids=["gram", "gram_X_X2", "gram_power"])
def test_gram_refuses_a_result_that_does_not_fit_before_any_work(monkeypatch, call):
    """gram on 10^6 points raised NumPy's MemoryError (7.28 TiB) after nothing was checked;
    relu_ntk on the same X gave MemoryBudgetError with the n that fits."""
    monkeypatch.setenv("NTKCORE_MEMORY_LIMIT", str(8 * 1000 * 1000))  # 8 MB: 1000^2 doubles
    X = np.ones((1200, 1300))
    with pytest.raises(MemoryBudgetError, match="gram") as err:
        call(X)
    assert "nystrom" not in str(err.value)  # the solvers' way out is not gram's
    monkeypatch.setenv("NTKCORE_MEMORY_LIMIT", str(10**9))
    call(X[:50])  # fits


def test_gram_power_counts_its_three_arrays(monkeypatch):
    """n <= d squares on the n x n side: result, base and a new product at once."""
    n = 300
    monkeypatch.setenv("NTKCORE_MEMORY_LIMIT", str(int(2 * 8 * n * n / 0.8)))  # 2 arrays
    X = np.ones((n, n + 1))
    nc.gram(X)
    nc.gram_power(np.ones((n, 3)), 3)  # n > d: one n x n array
    with pytest.raises(MemoryBudgetError, match="3 arrays"):
        nc.gram_power(X, 3)


@pytest.mark.parametrize("n", [1, 7, 64, 65, 130])
def test_gram_symmetrized_in_blocks_equals_the_whole_average(rng, monkeypatch, n):
    """(G + G^T) / 2 is now formed one pair of blocks at a time (no n x n temporaries):
    bit for bit the whole-matrix average, across ragged block edges."""
    monkeypatch.setattr(gram_module, "_SYMMETRIZE_BLOCK", 32)
    X = rng.standard_normal((n, 9))
    G = X @ X.T
    assert np.array_equal(nc.gram(X), (G + G.T) * 0.5)
    P = (X @ X.T) @ (X @ X.T)
    P2 = nc.gram_power(X, 2)
    np.testing.assert_allclose(P2, P, rtol=1e-12, atol=1e-12 * np.abs(P).max())
    assert np.array_equal(P2, P2.T)


# ------------------------------------------------------------------ Dataset.preprocess
def test_preprocess_of_an_integer_tensor_matches_the_numpy_path():
    """An uint8 tensor gave NaN and Inf (the mean and std were cast to uint8: 0 and 0)."""
    ds = nc.load_dataset("digits", n_train=40, n_test=10)
    px = np.round(ds.pixels_train[:3] * 255)
    want = ds.preprocess(px.astype(np.uint8))
    for tensor in (torch.tensor(px, dtype=torch.uint8), torch.tensor(px, dtype=torch.int64)):
        np.testing.assert_allclose(ds.preprocess(tensor).numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(ds.preprocess(torch.tensor(px) > 0).numpy(),
                               ds.preprocess(px > 0), rtol=1e-12)
    np.testing.assert_array_equal(ds.preprocess(px.tolist()), ds.preprocess(px))


@pytest.mark.parametrize("pixels", [np.ones((2, 64), complex), torch.ones(2, 64,
                                                                          dtype=torch.complex64)])
def test_preprocess_refuses_complex_pixels(pixels):
    with pytest.raises(ParameterError, match="real"):
        nc.load_dataset("digits", n_train=40, n_test=10).preprocess(pixels)


def test_targets_of_no_labels_is_an_empty_matrix():
    assert nc.load_dataset("digits", n_train=40, n_test=10).targets([]).shape == (0, 10)


# ------------------------------------------------------------ a caller's kernel operator
class _DiagColumnsOnly:
    """What Nystrom needs of a caller's operator, and no more."""

    def __init__(self, K):
        self.K, self.shape = K, K.shape

    def diag(self):
        return np.diag(self.K).copy()

    def columns(self, idx):
        return self.K[:, idx]


class _Operator(_DiagColumnsOnly):
    """Every member of the documented protocol except ``xp`` (optional since this fix)."""

    def block(self, i0, i1, j0, j1):
        return self.K[i0:i1, j0:j1]

    def matmat(self, V):
        return self.K @ V

    def dense(self):
        return self.K


@pytest.mark.parametrize("solver,options", [("auto", {}), ("exact", {}), ("cg", {"tol": 1e-12}),
                                            ("nystrom", {"rank": 20}),
                                            ("exact", {"storage": "packed"})])
def test_a_callers_operator_without_xp_runs_every_solver(rng, solver, options):
    """CG read ``op.xp``, which the protocol never listed: AttributeError."""
    K, Y, Kt, Yt = krr_problem(rng, n=20, T=4, C=2)
    ref = loo_influence_bruteforce(K, Y, Kt, Yt, 0.5)
    got = nc.loo_influence(_Operator(K), Y, Kt, Yt, lam=0.5, solver=solver, **options).scores
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-10 * np.abs(ref).max())


@pytest.mark.parametrize("solver,missing", [("auto", "dense"), ("exact", "dense"),
                                            ("cg", "matmat")])
def test_a_missing_operator_member_is_named(rng, solver, missing):
    K, Y, Kt, Yt = krr_problem(rng, n=20, T=4, C=2)
    with pytest.raises(ParameterError, match=rf"no {missing}\(\) method.*nystrom"):
        nc.loo_influence(_DiagColumnsOnly(K), Y, Kt, Yt, lam=0.5, solver=solver)


def test_a_nan_operator_diagonal_is_a_non_finite_error(rng):
    """Nystrom's pivot sampling raised NumPy's "Probabilities contain NaN"."""
    K, Y, Kt, Yt = krr_problem(rng, n=20, T=4, C=2)
    op = _DiagColumnsOnly(K)
    op.diag = lambda: np.where(np.arange(20) == 3, np.nan, np.diag(K))
    with pytest.raises(NonFiniteError, match="diag"):
        nc.loo_influence(op, Y, Kt, Yt, lam=0.5, solver="nystrom", rank=10)


# ------------------------------------------------------------------ smaller API edges
def test_widths_between_refuses_a_start_that_cannot_double():
    """widths_between(0, 8) looped forever (0 * 2 = 0)."""
    from ntkcore.experiments.distance import widths_between
    assert widths_between(2, 33) == [2, 4, 8, 16, 32] and widths_between(64, 8) == []
    for lo in (0, -1, 1.5):
        with pytest.raises(ParameterError, match="lo"):
            widths_between(lo, 8)


@pytest.mark.parametrize("out_dir", ["", "   ", None])
def test_run_influence_refuses_a_blank_folder_before_the_data(tmp_path, monkeypatch, out_dir):
    """run_influence(cfg, "") wrote model.pt, run.json, ... into the current folder."""
    from ntkcore.experiments.influence_run import InfluenceConfig, run_influence
    monkeypatch.chdir(tmp_path)
    log = []
    with pytest.raises(ParameterError, match="folder name"):
        run_influence(InfluenceConfig(), out_dir, progress=False, log=log.append)
    assert log == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options,error", [
    ({"maxiter": "a"}, ParameterError), ({"maxiter": float("nan")}, ParameterError),
    ({"atol": "x"}, ParameterError), ({"atol": None}, ParameterError),
    ({"rtol": "x"}, ParameterError), ({"x0": "complex"}, ParameterError),
    ({"x0": "nan"}, NonFiniteError), ({"A": "nan"}, NonFiniteError),
    ({"M": "3x3"}, nc.errors.ShapeError),
])
def test_cg_checks_every_argument(rng, options, error):
    """Untyped ValueError/TypeError, a complex x0 cast silently, and a NaN in A or x0 ran all
    maxiter iterations to an all-NaN X with info = maxiter."""
    from ntkcore.solvers.cg import cg
    X = rng.standard_normal((12, 4))
    A, b = X @ X.T + np.eye(12), rng.standard_normal(12)
    kw = dict(options)
    if kw.get("x0") == "complex":
        kw["x0"] = b.astype(complex)
    elif kw.get("x0") == "nan":
        kw["x0"] = np.full(12, np.nan)
    if kw.pop("A", None) == "nan":
        A[0, 0] = np.nan
    if kw.get("M") == "3x3":
        kw["M"] = np.eye(3)
    with pytest.raises(error):
        cg(A, b, **kw)


@pytest.mark.parametrize("options", [{"check_every": 0}, {"stall_window": 0},
                                     {"max_restarts": -1}])
def test_block_cg_refuses_zero_windows(rng, options):
    """check_every=0 raised ZeroDivisionError, stall_window=0 a bare ValueError."""
    from ntkcore.solvers.cg import block_cg
    with pytest.raises(ParameterError):
        block_cg(np.eye(3) * 2, np.ones((3, 1)), **options)


@pytest.mark.parametrize("lam", [0, float("nan"), -1, "x"])
def test_nystrom_inverse_refuses_a_bad_ridge(lam):
    """lam = 0, nan or -1 gave an all-NaN diag()."""
    from ntkcore.solvers.nystrom import nystrom_inverse
    with pytest.raises(ParameterError, match="lam"):
        nystrom_inverse(np.eye(5), lam)


@pytest.mark.parametrize("values,error", [("abc", ParameterError), ({"a": 1}, ParameterError),
                                          ([1 + 1j, 2], ParameterError),
                                          ([1.0, np.inf], NonFiniteError)])
def test_mean_ci95_refuses_what_it_cannot_average(values, error):
    """Untyped errors; complex input lost its imaginary part; inf gave mean=inf, NaN bounds."""
    from ntkcore.malleability import mean_ci95
    with pytest.raises(error):
        mean_ci95(values)


def test_mean_ci95_of_a_grad_tensor():
    from ntkcore.malleability import mean_ci95
    assert mean_ci95(torch.ones(3, requires_grad=True))["mean"] == 1.0


@pytest.mark.parametrize("options,error", [
    ({"n_random": "a"}, ParameterError), ({"n_random": float("nan")}, ParameterError),
    ({"seed": -1}, ParameterError), ({"seed": "x"}, ParameterError),
    ({"jacobian": lambda x: np.full((2, 3), np.nan)}, NonFiniteError),
    ({"rows": "nan"}, NonFiniteError),
])
def test_kernel_lipschitz_checks_its_inputs_and_callbacks(options, error):
    """Untyped errors, LinAlgError from a NaN Jacobian, and NaN kernel rows gave value=nan."""
    from ntkcore.malleability import kernel_lipschitz
    P = np.random.default_rng(0).standard_normal((2, 3))
    nan_rows = options.pop("rows", None) == "nan"
    rows = (lambda Q: Q @ P.T * np.nan) if nan_rows else (lambda Q: Q @ P.T)
    with pytest.raises(error):
        kernel_lipschitz(rows, P, **options)


def test_labels_from_outputs_needs_one_column_per_class():
    """(n, 0) outputs raised a bare ValueError; 4 columns for 10 classes were accepted."""
    ds = nc.load_dataset("digits", n_train=40, n_test=10)
    assert list(ds.labels_from_outputs(np.eye(10)[:3])) == [0, 1, 2]
    for width in (0, 1, 4):
        with pytest.raises(nc.errors.ShapeError, match="10"):
            ds.labels_from_outputs(np.zeros((3, width)))


@pytest.mark.parametrize("call", ["find_dataset", "dataset_status", "collect_info"])
def test_a_root_that_is_not_a_path_is_refused_everywhere(call):
    """load_dataset refused root=3; these raised TypeError from os.path."""
    from ntkcore import data, info
    fn = {"find_dataset": lambda: data.find_dataset("mnist", 3),
          "dataset_status": lambda: data.dataset_status(3),
          "collect_info": lambda: info.collect_info(3)}[call]
    with pytest.raises(ParameterError, match="root"):
        fn()


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 2)).double()


@pytest.mark.parametrize("case,names", [("X_test", "X and X_test"), ("Y", "X and Y"),
                                        ("Y_test", "X_test and Y_test")])
def test_influence_for_model_names_the_callers_arguments(rng, case, names):
    """A bad X_test was reported as "X and X2", a bad Y as "K and Y"."""
    from ntkcore.ntk.empirical import influence_for_model
    args = {"X": rng.standard_normal((10, 4)), "Y": np.eye(2)[np.arange(10) % 2],
            "X_test": rng.standard_normal((3, 4)), "Y_test": np.eye(2)[[0, 1, 0]]}
    args[case] = {"X_test": rng.standard_normal((3, 5)), "Y": args["Y"][:9],
                  "Y_test": args["Y_test"][:2]}[case]
    with pytest.raises(nc.errors.ShapeError, match=names):
        influence_for_model(_net(), args["X"], args["Y"], args["X_test"], args["Y_test"])


def test_a_float64_overflow_does_not_suggest_float64():
    """The message ended "(or compute in float64)" for a float64 computation."""
    X = np.full((3, 4), 1e200)
    with pytest.raises(NonFiniteError) as err:
        nc.empirical_ntk(torch.nn.Linear(4, 2).double(), X, dtype="float64")
    assert "compute in float64" not in str(err.value)
    with pytest.raises(NonFiniteError, match=r"or compute in float64"):
        nc.empirical_ntk(torch.nn.Linear(4, 2), np.full((3, 4), 1e30), dtype="float32")


@pytest.mark.parametrize("n_test", [-1, 2.5, "x"])
def test_choose_solver_checks_the_test_count(n_test):
    """n_test = -1 or 2.5 lowered the memory plan; 'x' raised a bare ValueError."""
    from ntkcore.solvers.auto import choose_solver
    with pytest.raises(ParameterError, match="n_test"):
        choose_solver(np.eye(4), 1.0, n_test=n_test)


@pytest.mark.parametrize("key", ["retrain", "adv_train"])
def test_malleability_flags_are_booleans(key):
    """retrain='x' was accepted (and read as True)."""
    from ntkcore.experiments.malleability import MalleabilityConfig
    with pytest.raises(ParameterError, match=key):
        MalleabilityConfig(**{key: "x"}).resolved()


def test_influence_config_solver_options_must_be_a_dict():
    from ntkcore.experiments.influence_run import InfluenceConfig
    with pytest.raises(ParameterError, match="solver_options"):
        InfluenceConfig(solver_options=None).validate()


def test_ntk_predictor_checks_lam_and_targets():
    """lam = 0 was accepted; a Y of the wrong length or with NaN raised SciPy's ValueError."""
    from ntkcore.experiments.distance import ntk_predictor
    rng = np.random.default_rng(0)
    F, Y, Ft = rng.standard_normal((6, 3)), rng.standard_normal((6, 2)), rng.standard_normal((2, 3))
    assert ntk_predictor(F, Y[:, 0], Ft, 0.1).shape == (2,)
    np.testing.assert_allclose(ntk_predictor(F, Y[:, 0], Ft, 0.1), ntk_predictor(F, Y, Ft, 0.1)[:, 0])
    with pytest.raises(ParameterError):
        ntk_predictor(F, Y, Ft, 0)
    with pytest.raises(nc.errors.ShapeError):
        ntk_predictor(F, Y[:5], Ft, 0.1)
    with pytest.raises(NonFiniteError):
        ntk_predictor(F, Y * np.nan, Ft, 0.1)


def test_fit_function_of_an_unknown_solver_is_a_parameter_error():
    from ntkcore.solvers import fit_function
    with pytest.raises(ParameterError, match="solver"):
        fit_function("x")


@pytest.mark.parametrize("bounds", [(0, 5, 0, 1), (-1, 2, 0, 1), (3, 2, 0, 1), (0, 1, 0, 1.5)])
def test_operator_blocks_out_of_range_are_refused(rng, bounds):
    """K[i0:i1, j0:j1] clipped an out-of-range block silently."""
    X, W = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    for op in (nc.DenseKernel(np.eye(4)), nc.ReluNTKOperator(X, W)):
        assert op.block(0, 2, 1, 4).shape == (2, 3)
        with pytest.raises(ParameterError, match="block"):
            op.block(*bounds)


# -------------------------------------- regressions of the fixes above (second review)
def test_cg_still_takes_sparse_matrices_and_linear_operators(rng):
    """The finite check ran on anything with ``ndim``: a SciPy sparse matrix or
    LinearOperator (as A or M) raised a bare TypeError; maxiter=0 ran (info > 0) before."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import aslinearoperator

    from ntkcore.solvers.cg import cg
    X = rng.standard_normal((15, 4))
    A, b = X @ X.T + np.eye(15), rng.standard_normal(15)
    want = np.linalg.solve(A, b)
    for A_, M in ((sp.csr_matrix(A), None), (aslinearoperator(A), None),
                  (A, aslinearoperator(np.eye(15)))):
        x, info = cg(A_, b, rtol=1e-12, M=M)
        assert info == 0
        np.testing.assert_allclose(x, want, rtol=1e-8, atol=1e-10)
    assert cg(A, b, maxiter=0)[1] > 0


def test_caller_operator_adapter_copies():
    import copy
    from ntkcore.solvers.operator import checked_operator
    op = checked_operator(_DiagColumnsOnly(np.eye(3)))
    assert copy.copy(op).n == 3 and copy.deepcopy(op).n == 3


def test_validators_keep_what_worked(rng):
    """seed=None (fresh entropy) in kernel_lipschitz, Adam's betas as an array, None among
    mean_ci95's values (undefined, as NaN), (n, 2) logits of binary data, lists into
    ntk_predictor: all worked before the validation of this review and work again."""
    from ntkcore.experiments.distance import ntk_predictor
    from ntkcore.malleability import kernel_lipschitz, mean_ci95
    from ntkcore.nn.adam import Adam
    P = rng.standard_normal((2, 3))
    assert kernel_lipschitz(lambda Q: Q @ P.T, P, seed=None).value > 0
    Adam([torch.nn.Parameter(torch.zeros(2))], betas=np.array([0.9, 0.999]))
    assert mean_ci95([1.0, None, 3.0])["n_nan"] == 1
    ds = nc.load_dataset("digits", classes="0,1", n_train=20, n_test=5)
    assert list(ds.labels_from_outputs(np.array([[1.0, 2.0], [3.0, 0.0]]))) == [1, 0]
    assert ntk_predictor([[1.0, 0.0], [0.0, 1.0]], [1.0, 2.0], [[1.0, 0.0]], 0.1).shape == (1,)


# ------------------------------------------------------------ data files (third review)
class _EmptyArray:
    """Pickles as numpy's ``_reconstruct(ndarray, shape, 'B')`` with no state after it."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct
        return _reconstruct, (np.ndarray, (4, 3072), b"B")


def test_a_cifar_pickle_cannot_hand_back_uninitialised_memory(tmp_path):
    """The restricted unpickler allowed _reconstruct, whose array is filled only by the
    pickle's BUILD step: a 100-byte pickle without it gave (4, 3072) "pixels" of heap."""
    import pickle

    from ntkcore._formats import read_cifar_batch
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _EmptyArray(), b"labels": [1, 1, 1, 1]}, protocol=2))
    with pytest.raises(nc.errors.CorruptDataError, match="no contents"):
        read_cifar_batch(path)
    data = np.arange(4 * 3072, dtype=np.uint8).reshape(4, 3072)
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [1, 2, 3, 4]}, protocol=2))
    got, labels = read_cifar_batch(path)
    assert type(got) is np.ndarray and np.array_equal(got, data) and list(labels) == [1, 2, 3, 4]


def test_a_folder_named_for_the_dataset_wins_over_a_flat_root(tmp_path):
    """Fashion-MNIST files flat in the root and MNIST in root/MNIST/raw: mnist loaded the
    flat Fashion-MNIST files, silently (the flat root was tried first)."""
    from data_fixtures import write_mnist
    write_mnist(tmp_path, n_train=20, dataset="fashion-mnist", layout="flat")
    write_mnist(tmp_path, n_train=40, dataset="mnist", layout="torchvision")
    ds = nc.load_dataset("mnist", root=tmp_path)
    assert ds.n_train + ds.n_test == 40 + 10 and "MNIST" in ds.source


def test_an_unreadable_data_folder_is_a_data_not_found_error(tmp_path, monkeypatch):
    """A folder without read permission raised pathlib's PermissionError (in the CLI,
    "internal error"); as root chmod cannot show it, so is_dir raises here as it would."""
    from pathlib import Path

    from data_fixtures import write_mnist
    write_mnist(tmp_path, layout="torchvision")
    locked = tmp_path / "MNIST" / "raw"
    real = Path.is_dir

    def is_dir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    with pytest.raises(nc.errors.DataNotFoundError, match="permissions"):
        nc.load_dataset("mnist", root=tmp_path)
