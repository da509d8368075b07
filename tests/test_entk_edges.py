"""Edge cases of the eNTK layer: trained output weights in the matrix-free operator and the
influence pipeline, the infinite-width kernel at (nearly) equal rows, and bad input that must
raise a typed error rather than return a wrong number or a bare Python error."""

import json

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close
from reference import (
    autograd_entk,
    autograd_entk_generic,
    krr_fit_predict,
    relu_ntk_infinite_naive,
)

import ntkcore as nc
from ntkcore import errors
from ntkcore import malleability as ml
from ntkcore.backend import Backend, gpu_available
from ntkcore.kernels import relu_ntk_infinite_fused
from ntkcore.nn.models import TwoLayerNet
from ntkcore.solvers.landmarks import CachedReluNTK, as_operator
from ntkcore.solvers.operator import ReluNTKOperator


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _trained_net(d=6, m=40, C=1, seed=0):
    """A TwoLayerNet whose output weights trained away from +-1 (train_a=True)."""
    torch.manual_seed(seed)
    net = TwoLayerNet(d, m, C, train_a=True, dtype=torch.float64, kappa=1.0, seed=seed)
    with torch.no_grad():
        net.a.mul_(torch.rand_like(net.a) * 2)
    return net


def _rows(rng, n, d):
    X = rng.standard_normal((n, d))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


# ------------------------------------------------------------------ 1: trained output weights
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("cached", [False, True])
def test_operator_with_trained_output_weights_matches_autograd(backend, cached, rng):
    net = _trained_net()
    X, Xq = _rows(rng, 13, 6), _rows(rng, 4, 6)
    R = autograd_entk(net, X, output=0)
    Rq = autograd_entk(net, Xq, X, output=0)
    xp = Backend(backend).xp
    op = ReluNTKOperator(xp.asarray(X), xp.asarray(net.W_numpy()), a=xp.asarray(net.a_numpy()),
                         train_a=True, tile=5)
    if cached:
        op = as_operator(op)
        assert isinstance(op, CachedReluNTK)
    V = rng.standard_normal((13, 3))
    idx = np.array([3, 0, 7])
    for what, got, want in [
            ("dense", op.dense(), R), ("diag", op.diag(), np.diag(R)),
            ("columns", op.columns(xp.asarray(idx)), R[:, idx]), ("rows", op.rows(2, 9), R[2:9]),
            ("block", op.block(1, 8, 4, 12), R[1:8, 4:12]),
            ("matmat", op.matmat(xp.asarray(V)), R @ V), ("cross", op.cross(xp.asarray(Xq)), Rq)]:
        assert_close(_host(got), want, what=what)


@pytest.mark.parametrize("C", [1, 3])
def test_kernel_influence_uses_the_trained_output_weights(C, rng):
    """kernel_influence's K and K_test are the eNTK of the trained net (for C outputs the
    output average trace / C): its predictions equal KRR on the autograd kernels."""
    from ntkcore.experiments.pipeline import kernel_influence
    net = _trained_net(C=C, seed=1)
    X, Xt = _rows(rng, 20, 6), _rows(rng, 5, 6)
    Y = np.eye(max(C, 2))[rng.integers(0, C, 20)][:, :C] if C > 1 else np.sign(X[:, :1])
    Yt = np.zeros((5, C))
    res, _ = kernel_influence(net, None, lam=0.1, solver="exact", device="cpu", X_train=X,
                              X_test=Xt, Y_train=Y, Y_test=Yt)
    K = autograd_entk_generic(net, X, outputs="trace") / C
    K_test = autograd_entk_generic(net, Xt, X, outputs="trace") / C
    assert_close(res.predictions, krr_fit_predict(K, Y, K_test, 0.1), rtol=1e-12,
                 what="predictions")


def test_unit_output_weights_keep_the_fused_path():
    op = ReluNTKOperator(np.eye(3), np.ones((4, 3)), a=np.array([1.0, -1, 1, -1]))
    assert op.weights is None and op.a is None


# ------------------------------------------------------------------ 2: out dtype
@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.float32])
@pytest.mark.parametrize("general_a", [False, True])
def test_relu_ntk_refuses_an_out_array_of_another_dtype(dtype, general_a, rng):
    X, W = rng.standard_normal((5, 3)), rng.standard_normal((4, 3))
    a = np.full(4, 2.0) if general_a else None
    with pytest.raises(errors.ParameterError, match="out: expected dtype float64"):
        nc.relu_ntk(X, W, a=a, out=np.zeros((5, 5), dtype=dtype))
    with pytest.raises(errors.ParameterError, match="out"):
        nc.relu_ntk(X, W, out=[[0.0] * 5] * 5)


# ------------------------------------------------------------------ 3: K_inf at equal rows
def _inf_cases(rng):
    X = _rows(rng, 40, 20)
    dup = np.vstack([X, X[:8], -X[8:12], X[12:16] + 1e-9, 3 * X[16:20]])
    return [("X2 = copy of X", X, X.copy()), ("near duplicates", X, X + 1e-9 * rng.random(X.shape)),
            ("opposite rows", X, -X[:10]), ("duplicates in X", dup[rng.permutation(len(dup))], None)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("tile", [None, 7])
def test_relu_ntk_infinite_is_accurate_at_equal_and_opposite_rows(backend, tile, rng):
    xp = Backend(backend).xp
    for what, X, X2 in _inf_cases(rng):
        ref = relu_ntk_infinite_naive(X, X2)
        X2d = None if X2 is None else xp.asarray(X2)
        got = _host(relu_ntk_infinite_fused(xp.asarray(X), X2d, tile=tile))
        assert_close(got, ref, what=what)  # 500 eps (acos alone: ~1e-8)
        if X2 is None:
            assert np.array_equal(got, got.T)
        if tile is None:
            assert_close(_host(nc.relu_ntk_infinite(xp.asarray(X), X2d)), ref, what=what)


# ------------------------------------------------------------------ 4: typed errors
def test_relu_ntk_bad_arguments_are_typed(rng):
    X, W = rng.standard_normal((5, 3)), rng.standard_normal((4, 3))
    with pytest.raises(errors.ShapeError, match="hidden unit"):
        nc.relu_ntk(X, np.zeros((0, 3)))
    with pytest.raises(errors.ShapeError, match="hidden unit"):
        ReluNTKOperator(X, np.zeros((0, 3)))
    with pytest.raises(errors.ParameterError, match="scalar"):
        nc.relu_ntk(X, W, a=2.0)
    for bad in (np.ones((4, 2, 2)), np.ones(3), [[1, 2], [3]], np.ones((4, 0))):
        with pytest.raises(errors.ShapeError, match="a: expected"):
            nc.relu_ntk(X, W, a=bad)
    with pytest.raises(errors.ParameterError, match="real"):
        nc.relu_ntk(X, W, a=np.ones(4) * 1j)
    with pytest.raises(errors.NonFiniteError):
        nc.relu_ntk(X, W, a=np.array([1, np.nan, 1, 1]))
    for tile in (0, -3, 2.5):
        for a in (None, np.full(4, 2.0)):  # the fused +-1 path and the general-a path
            with pytest.raises(errors.ParameterError, match="tile"):
                nc.relu_ntk(X, W, a=a, tile=tile)
        with pytest.raises(errors.ParameterError, match="tile"):
            ReluNTKOperator(X, W, tile=tile)
    with pytest.raises(errors.ParameterError, match="train_a"):
        nc.relu_ntk(X, W, train_a="no")


def test_spectrum_of_no_rows_is_a_shape_error():
    with pytest.raises(errors.ShapeError, match="at least one row"):
        nc.spectrum(np.zeros((0, 2)))


def test_complexity_by_decile_bad_shapes_are_typed():
    with pytest.raises(errors.ShapeError, match="Y and alpha"):
        ml.complexity_by_decile(None, np.ones((4, 2)), np.ones((3, 4)), Y=np.ones(3), lam=1e-3,
                                n_groups=2)
    with pytest.raises(errors.ShapeError, match="alpha"):
        ml.complexity_by_decile(np.eye(4), np.ones((4, 1, 1)), np.arange(4.0), n_groups=2)
    with pytest.raises(errors.ParameterError, match="n_groups"):
        ml.complexity_by_decile(np.eye(4), np.ones(4), np.arange(4.0), n_groups=2.5)


MODELS = '''
import torch.nn as nn
def noparams():
    return nn.Sequential(nn.Flatten(), nn.Identity())
def linear():
    return nn.Linear(64, 10)
'''


def _user_cfg(**kw):
    from ntkcore.experiments.pipeline import InfluenceConfig
    return InfluenceConfig(dataset="digits", n_train=30, n_test=4, show=2, **kw)


def test_user_model_without_parameters_is_typed(tmp_path):
    from click.testing import CliRunner
    from ntkcore.cli.main import main

    from ntkcore.experiments.user_model import run_user_model_influence
    (tmp_path / "models.py").write_text(MODELS)
    with pytest.raises(errors.ParameterError, match="parameters"):
        run_user_model_influence(_user_cfg(), f"{tmp_path / 'models.py'}:noparams", None,
                                 tmp_path / "o", progress=False, log=lambda *a: None)
    r = CliRunner().invoke(main, ["influence", "--model", f"{tmp_path / 'models.py'}:noparams",
                                  "--n-train", "30", "--n-test", "4", "--out",
                                  str(tmp_path / "o2"), "--quiet"])
    assert r.exit_code == 2, r.output
    assert "internal error" not in r.output and "parameters" in r.output


class _LSTMNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.r = torch.nn.LSTM(4, 3, batch_first=True)
        self.o = torch.nn.Linear(3, 2)

    def forward(self, x):
        y, _ = self.r(x.reshape(x.shape[0], 3, 4))
        return self.o(y[:, -1])


class _Untransformable(torch.nn.Module):
    """A forward no strategy can differentiate (it leaves torch through .numpy())."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x):
        y = self.lin(x)
        return y * torch.from_numpy(y.numpy())


@pytest.mark.parametrize("strategy", ["auto", "jacobian", "ntvp"])
def test_empirical_ntk_of_an_lstm_matches_autograd(strategy):
    torch.manual_seed(0)
    model = _LSTMNet().double()
    X = torch.randn(5, 12, dtype=torch.float64)
    K, rep = nc.empirical_ntk(model, X, strategy=strategy, return_report=True)
    assert_close(K.numpy(), autograd_entk_generic(model, X), what="LSTM eNTK")
    assert "vmap failed" in rep.blocks["unbatched"]


def test_empirical_ntk_of_an_untransformable_model_is_typed():
    model = _Untransformable().double()
    with pytest.raises(errors.ParameterError, match="not supported by the available eNTK"):
        nc.empirical_ntk(model, torch.randn(3, 4, dtype=torch.float64), strategy="jacobian")


# ------------------------------------------------------------------ 5: silent bad values
def test_metrics_refuse_non_finite_and_complex_input():
    with pytest.raises(errors.NonFiniteError, match="K"):
        ml.complexity_by_decile(np.full((4, 4), np.nan), np.ones(4), np.arange(4.0), n_groups=2)
    with pytest.raises(errors.NonFiniteError, match="scores"):
        ml.complexity_by_decile(np.eye(4), np.ones(4), np.array([1, np.nan, 2, 3]), n_groups=2)
    with pytest.raises(errors.NonFiniteError, match="points"):
        ml.kernel_lipschitz(lambda q: q, np.full((1, 3), np.nan))
    with pytest.raises(errors.ParameterError, match="lam"):
        ml.intrinsic_sensitivity(1.0, [1.0], float("inf"))
    with pytest.raises(errors.ParameterError, match="real"):
        nc.spearman(np.array([1j, 2]), np.array([1.0, 2]))
    with pytest.raises(errors.ParameterError, match="tau"):
        nc.flip_rate([1.0, 2, 3, -1], [2.0, 1, -1, 1], None)


# ------------------------------------------------------------------ 6: --model and --device
@pytest.mark.skipif(gpu_available(), reason="needs a machine without a usable GPU")
def test_user_model_refuses_cuda_without_a_gpu(tmp_path):
    from ntkcore.experiments.user_model import run_user_model_influence
    (tmp_path / "models.py").write_text(MODELS)
    with pytest.raises(errors.BackendError):
        run_user_model_influence(_user_cfg(device="cuda"), f"{tmp_path / 'models.py'}:linear",
                                 None, tmp_path / "o", progress=False, log=lambda *a: None)


def test_user_model_runs_on_the_requested_device(sim_cupy, tmp_path):
    from ntkcore.experiments.user_model import run_user_model_influence
    (tmp_path / "models.py").write_text(MODELS)
    spec = f"{tmp_path / 'models.py'}:linear"
    quiet = {"progress": False, "log": lambda *a: None}
    gpu = run_user_model_influence(_user_cfg(device="cuda"), spec, None, tmp_path / "g", **quiet)
    cpu = run_user_model_influence(_user_cfg(device="cpu"), spec, None, tmp_path / "c", **quiet)
    assert gpu["device"] == "cuda" and cpu["device"] == "cpu"
    saved = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert saved["device"] == "cuda" and saved["config"]["device"] == "cuda"
    assert not {"arch", "width", "epochs", "preset"} & set(saved["config"])
    assert_close(np.load(tmp_path / "g" / "influence.npz")["scores"],
                 np.load(tmp_path / "c" / "influence.npz")["scores"], rtol=1e-10, what="scores")
