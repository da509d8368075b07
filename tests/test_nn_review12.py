"""ntkcore.nn edge cases found in the session-12 review; each test failed before its fix."""

import numpy as np
import pytest
import torch

import ntkcore.nn as N
from ntkcore.errors import BackendError, NonFiniteError, ParameterError, ShapeError
from ntkcore.nn.adam import Adam

X = np.random.default_rng(0).random((20, 8))
Y = np.arange(20) % 3


def _net(**kw):
    return N.make_model("relu", X, 16, 3, **kw)


# ---------------------------------------------------------------- 1. devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("arch", ["relu", "attn"])
def test_cuda_without_a_gpu_is_a_backend_error(arch):
    """make_model(device='cuda') raised torch's RuntimeError (no NVIDIA driver)."""
    with pytest.raises(BackendError, match="device"):
        N.make_model(arch, X, 16, 3, device="cuda")
    with pytest.raises(BackendError, match="device"):
        N.TwoLayerNet(8, 16, 3, device="cuda")


def test_a_cuda_index_beyond_the_gpus_is_a_backend_error():
    with pytest.raises(BackendError, match="cuda:99"):
        _net(device="cuda:99")


@pytest.mark.parametrize("device", ["tpu", "mps", 3.5])
def test_an_unknown_device_is_a_parameter_error(device):
    """device='tpu' raised torch's RuntimeError; the rule is empirical_ntk's."""
    with pytest.raises(ParameterError, match="device"):
        _net(device=device)


# ---------------------------------------------------------------- 2. predict's batch_size
@pytest.mark.parametrize("bs", [-1, 0, 2.5, "a", None, float("nan"), True])
def test_predict_refuses_a_bad_batch_size(bs):
    """batch_size=-1 returned an empty (0, C) array; 0, 2.5, 'a' raised untyped errors."""
    with pytest.raises(ParameterError, match="batch_size"):
        N.predict(_net(), X, batch_size=bs)


def test_predict_takes_an_integral_float_batch_size():
    net = _net()
    np.testing.assert_array_equal(N.predict(net, X, batch_size=7.0), N.predict(net, X))


# ---------------------------------------------------------------- 3. train's options
@pytest.mark.parametrize("name,value", [
    ("lr", float("inf")), ("lr", "x"), ("lr", None),
    ("lam", float("inf")), ("lam", 10 ** 400), ("lam", "x"), ("lam", None),
    ("adv_eps", "x"), ("adv_eps", float("inf")),
    ("batch_size", float("nan")), ("batch_size", float("inf")), ("batch_size", "a"),
    ("batch_size", None),
    ("seed", 1.5), ("seed", "x"), ("seed", None), ("seed", -1), ("seed", 2 ** 64)])
def test_train_refuses_bad_options(name, value):
    """lr=inf trained to NaN weights and reported success; 'x', None, nan or inf raised
    TypeError/ValueError/OverflowError; seed=1.5 was truncated."""
    with pytest.raises(ParameterError, match=name):
        N.train(_net(), X, Y, epochs=1, progress=False, **{name: value})


@pytest.mark.parametrize("name,value", [("adv_step", 0), ("adv_step", "x"), ("adv_iters", 0.5)])
def test_train_names_the_adversarial_options(name, value):
    """These reached pgd as 'step'/'iters', or (adv_iters=0.5) failed inside range()."""
    P = torch.rand(6, 8)
    with pytest.raises(ParameterError, match=name):
        N.train(_net(), P, Y[:6], epochs=1, progress=False, adv_eps=0.1, **{name: value})


def test_an_lr_that_overflows_the_step_is_non_finite():
    """lr=1e300 on a float32 model raised torch's RuntimeError from Adam's addcdiv_."""
    with pytest.raises(NonFiniteError, match="lr"):
        N.train(_net(), X, Y, epochs=1, lr=1e300, progress=False)


def test_non_finite_weights_after_the_last_step_are_not_success(monkeypatch):
    """A last step that leaves NaN weights (what lr=inf did: the objective is computed before
    the step, so it was finite) returned success; the weights are now checked each epoch."""
    import importlib
    T = importlib.import_module("ntkcore.nn.train")  # the module, not N.train

    class NanAdam(Adam):
        def step(self):
            super().step()
            with torch.no_grad():
                self.params[0].fill_(float("nan"))

    monkeypatch.setattr(T, "Adam", NanAdam)
    with pytest.raises(NonFiniteError, match="weights"):
        N.train(_net(), X, Y, epochs=1, progress=False)


# ---------------------------------------------------------------- 4. models, Adam, metrics
@pytest.mark.parametrize("name,value", [
    ("kappa", "x"), ("kappa", None), ("kappa", float("inf")), ("kappa", float("nan")),
    ("seed", "x"), ("seed", None), ("seed", 1.5), ("seed", -1)])
def test_model_options_are_checked(name, value):
    """kappa 'x'/None raised TypeError and inf was accepted; seed 'x'/None raised untyped
    errors and 1.5 was truncated to 1."""
    with pytest.raises(ParameterError, match=name):
        _net(**{name: value})
    with pytest.raises(ParameterError, match=name):
        N.init_weights(8, 16, 3, **{name: value})


def test_make_model_takes_a_nested_list():
    """A list X_train raised AttributeError ('list' has no attribute 'shape')."""
    for arch in ("relu", "attn"):
        a, b = N.make_model(arch, X.tolist(), 16, 3), N.make_model(arch, X, 16, 3)
        np.testing.assert_array_equal(N.predict(a, X), N.predict(b, X))
    with pytest.raises(ShapeError, match="X_train"):
        N.make_model("relu", [[1.0, 2.0], [3.0]], 16, 3)


@pytest.mark.parametrize("output", [1.5, "a", None, True])
def test_closed_form_entk_checks_output(output):
    """1.5 failed in indexing, 'a' and None in a comparison; True read as output 1."""
    with pytest.raises(ParameterError, match="output"):
        N.closed_form_entk(_net(), X[:4], output=output)


@pytest.mark.parametrize("kw,name", [
    ({"lr": -1}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": "x"}, "lr"),
    ({"betas": (1.5, 0.9)}, "betas"), ({"betas": (0.9, -0.1)}, "betas"),
    ({"betas": (0.9,)}, "betas"), ({"betas": 0.9}, "betas"),
    ({"eps": -1}, "eps"), ({"eps": float("inf")}, "eps")])
def test_adam_checks_its_options(kw, name):
    """Adam took lr=-1, betas=(1.5, .9) and eps=-1 silently (torch.optim.Adam refuses them)."""
    with pytest.raises(ParameterError, match=name):
        Adam(_net().parameters(), **kw)


def test_accuracy_refuses_labels_of_another_length():
    """accuracy(net, X20, [1]) broadcast the one label and returned 0.15."""
    net = _net()
    with pytest.raises(ShapeError, match="y"):
        N.accuracy(net, X, [1])
    with pytest.raises(ShapeError, match="y"):
        N.accuracy(net, X, Y[:19])
    one = N.make_model("relu", X, 16, 1)
    with pytest.raises(ShapeError, match="y"):  # (n, 2) targets for one output
        N.accuracy(one, X, np.ones((20, 2)))


def test_objective_refuses_a_negative_lam():
    """objective(lam=-1) returned a negative objective."""
    net = _net()
    theta0 = [p.detach().clone() + 1 for p in net.parameters()]
    with pytest.raises(ParameterError, match="lam"):
        N.objective(net, X, Y, lam=-1, theta0=theta0)
