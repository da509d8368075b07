"""The closed-form eNTK (ntkcore.relu_ntk on the trained weights) against torch autograd.

For both architectures, after training, K = relu_ntk(phi(X), W) must equal the eNTK of the same
trained network computed by autograd (tests/reference.py::autograd_entk, a double loop over
examples) in float64.

Tolerance 1e-10 (max abs error / max |K|): both sides are float64 and differ only in the
order of summation (~d * eps = 1e-14 relative); 1e-10 leaves room for the row normalization of
the attention features while still catching any float32 rounding (>= 1e-8) or a wrong term.
"""

import copy

import numpy as np
import pytest
import torch
from conftest import assert_close
from reference import autograd_entk

import ntkcore as nc
from ntkcore.nn import closed_form_entk, make_model, train

RTOL = 1e-10


def _data(n=48, n_test=12):
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = digits.data[: n + n_test] / 16.0 - 0.3  # centred so the Gram matrix is not rank-1-ish
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    y = digits.target[: n + n_test]
    return X[:n], y[:n], X[n:]


def _trained(arch, n_outputs, *, train_a=False, dtype=torch.float32, width=64):
    X, y, Xq = _data()
    if n_outputs == 1:
        y = (y % 2).astype(np.int64)  # binary labels -> +-1 targets
    else:
        y = (y % n_outputs).astype(np.int64)
    model = make_model(arch, X, width, n_outputs, train_a=train_a, dtype=dtype, seed=3)
    W0 = model.W_numpy()
    train(model, X, y, epochs=8, lr=1e-2, batch_size=16, progress=False)
    # a trained network: W has moved away from its initialization
    assert np.abs(model.W_numpy() - W0).max() > 1e-3 * np.abs(W0).max()
    return model, X, Xq


@pytest.mark.parametrize("arch", ["relu", "attn"])
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_closed_form_entk_equals_autograd(arch, n_outputs):
    model, X, Xq = _trained(arch, n_outputs)
    model64 = copy.deepcopy(model).double()
    F, Fq = model.features_numpy(X), model.features_numpy(Xq)
    K = nc.relu_ntk(F, model.W_numpy())
    K_cross = nc.relu_ntk(Fq, model.W_numpy(), F)
    assert np.min(np.diag(K)) > 0  # some neurons are active on every row: not a vacuous check
    for c in range(n_outputs):  # one scalar kernel serves every output [Thm B.12]
        assert_close(K, autograd_entk(model64, X, output=c), rtol=RTOL, what=f"{arch} K c={c}")
    assert_close(K_cross, autograd_entk(model64, Xq, X, output=n_outputs - 1), rtol=RTOL,
                 what=f"{arch} K(test, train)")
    assert_close(closed_form_entk(model, Xq, X), K_cross, rtol=RTOL, what="closed_form_entk")


@pytest.mark.parametrize("arch", ["relu", "attn"])
def test_closed_form_entk_float64_training(arch):
    model, X, _ = _trained(arch, 3, dtype=torch.float64)
    K = nc.relu_ntk(model.features_numpy(X), model.W_numpy())
    assert_close(K, autograd_entk(model, X, output=1), rtol=RTOL, what=f"{arch} float64")


def _entk_float64_formula(F, W, F2, a):
    """(1/m) sum_r a_r^2 1[w_r.x>0] 1[w_r.x'>0] <x,x'> + (1/m) relu relu^T, all float64."""
    m = W.shape[0]
    S, S2 = (F @ W.T > 0).astype(float), (F2 @ W.T > 0).astype(float)
    H, H2 = np.maximum(F @ W.T, 0), np.maximum(F2 @ W.T, 0)
    return (((S * a ** 2) @ S2.T) * (F @ F2.T) + H @ H2.T) / m


@pytest.mark.parametrize("arch", ["relu", "attn"])
def test_trained_output_layer_entk_formula(arch):
    """train_a: the autograd eNTK has the a_r^2-weighted W-part plus the output-layer term."""
    model, X, Xq = _trained(arch, 1, train_a=True)
    a = model.a_numpy()[:, 0]
    assert np.abs(np.abs(a) - 1).max() > 1e-4  # a really trained: no longer +-1
    model64 = copy.deepcopy(model).double()
    F, Fq, W = model.features_numpy(X), model.features_numpy(Xq), model.W_numpy()
    assert_close(_entk_float64_formula(F, W, F, a), autograd_entk(model64, X), rtol=RTOL,
                 what=f"{arch} train_a formula")
    assert_close(_entk_float64_formula(Fq, W, F, a), autograd_entk(model64, Xq, X), rtol=RTOL,
                 what=f"{arch} train_a formula cross")


@pytest.mark.parametrize("arch", ["relu", "attn"])
def test_relu_ntk_with_trained_output_layer(arch):
    model, X, Xq = _trained(arch, 1, train_a=True)
    model64 = copy.deepcopy(model).double()
    K = nc.relu_ntk(model.features_numpy(X), model.W_numpy(), a=model.a_numpy(), train_a=True)
    assert_close(K, autograd_entk(model64, X), rtol=RTOL, what=f"{arch} train_a")
    assert_close(closed_form_entk(model, Xq, X), autograd_entk(model64, Xq, X), rtol=RTOL,
                 what=f"{arch} train_a cross")
