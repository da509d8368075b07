"""Torch front end: models, training objective and loop, L_inf attacks (ntkcore.nn)."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import assert_close
from reference import rownorm

import ntkcore as nc
from ntkcore.errors import NonFiniteError, ParameterError, ShapeError
from ntkcore.nn import (MLPAttn, TwoLayerNet, accuracy, fgsm, make_model, mim, model_loss_fn,
                        objective, pgd, predict, train)

MEAN, STD = 0.3, 0.4  # a dataset normalization (Table 5 style) applied before unit rows


def preprocess(pixels):
    """Pixels (n, 8, 8) in [0, 1] -> unit rows (n, 64): normalize, flatten, rownorm [A.1]."""
    z = ((pixels - MEAN) / STD).reshape(pixels.shape[0], -1)
    return z / torch.linalg.vector_norm(z, dim=1, keepdim=True)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    P = torch.tensor(d.images[:160] / 16.0, dtype=torch.float32)  # pixels (n, 8, 8) in [0, 1]
    return P, torch.tensor(d.target[:160])


@pytest.fixture(scope="module", params=["relu", "attn"])
def trained(request, digits):
    P, y = digits
    model = make_model(request.param, preprocess(P), 64, 10, seed=1)
    train(model, P, y, epochs=15, lr=1e-2, preprocess=preprocess, progress=False)
    return model, P, y


# --- models ---------------------------------------------------------------------------------

def test_two_layer_forward_matches_eq2(rng):
    X = rng.standard_normal((7, 5))
    model = TwoLayerNet(5, 16, 3, dtype=torch.float64, seed=5)
    W, a = model.W_numpy(), model.a_numpy()
    expected = np.maximum(X @ W.T, 0) @ a / np.sqrt(16)
    assert_close(model(torch.from_numpy(X)).detach().numpy(), expected, what="forward")
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert W.shape == (16, 5) and a.shape == (16, 3)
    # kappa sets the init scale: sample std of 16*5 N(0, kappa^2) draws within 40%
    assert 0.006 < TwoLayerNet(5, 16, 3, kappa=0.01).W_numpy().std() < 0.014


def test_init_is_seeded_and_shared_across_archs_and_dtypes(rng):
    X = rng.standard_normal((20, 6))
    r = make_model("relu", X, 32, 2, seed=9)
    at = make_model("attn", X, 32, 2, seed=9, dtype=torch.float64)
    np.testing.assert_array_equal(r.W_numpy(), at.W_numpy().astype(np.float32))
    np.testing.assert_array_equal(r.a_numpy(), at.a_numpy())
    assert not np.array_equal(r.W_numpy(), make_model("relu", X, 32, 2, seed=10).W_numpy())


def test_attention_features_train_and_query_rows(rng):
    X = rng.standard_normal((30, 6))
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    Q = rng.standard_normal((4, 6))
    model = MLPAttn(X, 8, 2, dtype=torch.float64)
    naive_train = rownorm(X @ X.T @ X)  # Def 3.1 with the n x n Gram, then unit rows [A.1]
    naive_query = rownorm(Q @ (X.T @ X))
    assert_close(model.features(torch.from_numpy(X)).numpy(), naive_train, what="train rows")
    assert_close(model.features(torch.from_numpy(Q)).numpy(), naive_query, what="query rows")
    assert_close(model.features_numpy(X), naive_train, what="numpy train rows")
    assert_close(model.features_numpy(Q), naive_query, what="numpy query rows")
    # the lead's NumPy version: identical math, identical numbers up to rounding
    assert_close(model.features_numpy(Q), nc.attention_features(X, Q), what="attention_features")
    assert_close(model.features_numpy(X), nc.attention_features(X), what="attention_features X")
    # float32 model: the same features to float32 rounding (kappa(M) is small here)
    m32 = MLPAttn(X, 8, 2)
    assert_close(m32.features(torch.tensor(X, dtype=torch.float32)).numpy(), naive_train,
                 rtol=1e-5, what="float32 features")


def test_set_attention_and_dtype_round_trip(rng):
    X = rng.standard_normal((25, 5))
    model = MLPAttn(X, 8, 2)
    X2 = X + 0.5 * rng.standard_normal(X.shape)
    model.set_attention(X2)
    assert_close(model.features_numpy(X2), rownorm(X2 @ X2.T @ X2), what="after set_attention")
    assert_close(model.M.numpy(), X2.T @ X2, rtol=1e-6, dtype=np.float32, what="buffer M")
    # float32 -> float64 recasts M from the exact float64 copy (not the rounded float32 buffer)
    m64 = copy.deepcopy(model).double()
    assert m64.M.dtype == torch.float64
    np.testing.assert_array_equal(m64.M.numpy(), X2.T @ X2)
    np.testing.assert_array_equal(m64.float().double().M.numpy(), X2.T @ X2)
    # loading a state dict brings M (and its float64 copy) along
    fresh = MLPAttn(X, 8, 2)
    fresh.load_state_dict(model.state_dict())
    assert_close(fresh.features_numpy(X), model.features_numpy(X), rtol=1e-6, what="loaded")
    with pytest.raises(ShapeError):
        model.set_attention(X[:, :3])


def test_bad_arch_width_and_inputs(rng):
    X = rng.standard_normal((10, 4))
    with pytest.raises(ParameterError, match="arch"):
        make_model("cnn", X, 16, 2)
    for width in (0, -3, 2.5):
        with pytest.raises(ParameterError, match="width"):
            make_model("relu", X, width, 2)
        with pytest.raises(ParameterError, match="width"):
            make_model("attn", X, width, 2)
    with pytest.raises(ParameterError, match="n_outputs"):
        TwoLayerNet(4, 8, 0)
    with pytest.raises(ParameterError, match="kappa"):
        TwoLayerNet(4, 8, 1, kappa=0.0)
    with pytest.raises(ShapeError):
        make_model("attn", X[0], 16, 2)
    with pytest.raises(NonFiniteError):
        MLPAttn(np.full((3, 4), np.nan), 8, 2)


# --- objective and training -----------------------------------------------------------------

def _obj(*args, **kwargs):
    return objective(*args, **kwargs).item()


def _hand_model(n_outputs, a):
    model = TwoLayerNet(2, 2, n_outputs, dtype=torch.float64)
    with torch.no_grad():
        model.W.copy_(torch.eye(2, dtype=torch.float64))
        model.a.copy_(torch.tensor(a, dtype=torch.float64))
    return model


def test_objective_hand_checked_mse():
    # W = I, a = (1, -1): f(e1) = 1/sqrt2, f(e2) = -1/sqrt2; labels 1 -> targets +1
    model = _hand_model(1, [[1.0], [-1.0]])
    X = np.eye(2)
    s = 1 / math.sqrt(2)
    data = ((s - 1) ** 2 + (-s - 1) ** 2) / (2 * 2)  # (1/2n) sum (f - y)^2 = 3/4
    assert data == pytest.approx(0.75)
    assert _obj(model, X, np.array([1, 1]), lam=0.1) == pytest.approx(data, rel=1e-14)
    # + (lam/2)||theta - theta0||^2 with theta0 = 0: ||I||_F^2 = 2
    theta0 = [torch.zeros(2, 2, dtype=torch.float64)]
    got = _obj(model, X, np.array([1, 1]), lam=0.1, theta0=theta0)
    assert got == pytest.approx(data + 0.05 * 2, rel=1e-14)
    # float +-1 targets give the same; labels 0 mean -1
    assert _obj(model, X, np.array([1.0, 1.0])) == pytest.approx(data, rel=1e-14)
    flipped = ((s + 1) ** 2 + (-s + 1) ** 2) / 4
    assert _obj(model, X, np.array([0, 0])) == pytest.approx(flipped, rel=1e-14)


def test_objective_hand_checked_cross_entropy():
    # outputs (s, -s) on e1 and (-s, s) on e2; both labelled class 0
    model = _hand_model(2, [[1.0, -1.0], [-1.0, 1.0]])
    s = 1 / math.sqrt(2)
    l1 = math.log(1 + math.exp(-2 * s))  # -log softmax(s, -s)_0
    l2 = math.log(1 + math.exp(2 * s))   # -log softmax(-s, s)_0
    got = _obj(model, np.eye(2), np.array([0, 0]))
    assert got == pytest.approx((l1 + l2) / 4, rel=1e-14)


def test_training_is_deterministic_and_lowers_the_loss(digits):
    P, y = digits
    Z = preprocess(P)
    runs = []
    for seed in (7, 7, 8):
        model = make_model("relu", Z, 32, 10, seed=0)
        before = _obj(model, Z, y)
        res = train(model, Z, y, epochs=4, lr=1e-2, batch_size=32, seed=seed, progress=False)
        runs.append(model.W_numpy())
        theta0 = [torch.from_numpy(make_model("relu", Z, 32, 10, seed=0).W_numpy()).float()]
        after = _obj(model, Z, y, theta0=theta0)
        assert after < 0.9 * before, (before, after)
        assert res.history[-1] < res.history[0]
        assert len(res.history) == res.epochs == 4 and res.seconds > 0
        assert res.train_accuracy == accuracy(model, Z, y)
    np.testing.assert_array_equal(runs[0], runs[1])  # same seed: identical bits
    assert not np.array_equal(runs[0], runs[2])      # other shuffling: other weights
    assert not torch.are_deterministic_algorithms_enabled()  # global flag restored


def test_binary_training_and_predict_accuracy(digits):
    P, y = digits
    Z = preprocess(P)
    yb = (y % 2).numpy()
    model = make_model("attn", Z, 32, 1, dtype=torch.float64)
    res = train(model, Z, yb, epochs=30, lr=1e-2, progress=False)  # auto -> mse on +-1
    out = predict(model, Z)
    assert out.shape == (160, 1) and out.dtype == np.float64
    assert res.train_accuracy == pytest.approx(np.mean((out[:, 0] > 0) == (yb == 1)))
    assert res.train_accuracy > 0.6  # better than the 50% of chance on balanced parity


def test_callback_stops_training(digits):
    P, y = digits
    model = make_model("relu", preprocess(P), 16, 10)
    seen = []
    res = train(model, preprocess(P), y, epochs=10, progress=False,
                callback=lambda epoch, loss, m: seen.append(loss) or epoch == 1)
    assert res.epochs == 2 and seen == res.history


def test_train_rejects_bad_input(digits):
    P, y = digits
    Z = preprocess(P)
    model = make_model("relu", Z, 16, 10)
    bad = [
        (dict(y=y[:10]), ShapeError), (dict(y=y.float()), ShapeError),
        (dict(y=y + 10), ParameterError), (dict(loss="hinge"), ParameterError),
        (dict(epochs=-1), ParameterError), (dict(lr=0.0), ParameterError),
        (dict(lam=-1.0), ParameterError), (dict(batch_size=0), ParameterError),
    ]
    for kw, err in bad:
        args = dict(y=y, epochs=1, progress=False) | kw
        with pytest.raises(err):
            train(model, Z, args.pop("y"), **args)
    binary = make_model("relu", Z, 16, 1)
    with pytest.raises(ParameterError, match="binary"):
        train(binary, Z, y, epochs=1, progress=False)  # labels 0..9 for one output
    with pytest.raises(ParameterError, match="ce"):
        train(binary, Z, y % 2, epochs=1, loss="ce", progress=False)
    with pytest.raises(NonFiniteError):
        train(model, torch.full_like(Z, float("nan")), y, epochs=1, progress=False)


def test_adversarial_training_runs_deterministically(digits):
    P, y = digits
    P, y = P[:64], y[:64]
    weights = []
    for adv_eps in (0.3, 0.3, None):
        model = make_model("relu", preprocess(P), 16, 10)
        train(model, P, y, epochs=2, lr=1e-2, preprocess=preprocess, adv_eps=adv_eps,
              adv_iters=3, progress=False)
        weights.append(model.W_numpy())
    np.testing.assert_array_equal(weights[0], weights[1])
    assert not np.allclose(weights[0], weights[2])  # PGD batches changed the training


# --- attacks --------------------------------------------------------------------------------

def _in_bounds(x_adv, x, eps):
    # float32 arithmetic in x +- eps: one rounding of size <= 2^-24 * (1 + eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= eps + 1e-7
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_attacks_stay_in_the_ball_and_box(trained):
    model, P, y = trained
    fn = model_loss_fn(model, preprocess, y)
    for eps in (0.05, 0.3):
        _in_bounds(fgsm(fn, P, eps), P, eps)
        _in_bounds(pgd(fn, P, eps, 0.02, 10), P, eps)
        _in_bounds(pgd(fn, P, eps, 0.02, 5, random_start=True,
                       generator=torch.Generator().manual_seed(0)), P, eps)
        _in_bounds(mim(fn, P, eps, 0.02, 10), P, eps)
    assert torch.equal(pgd(fn, P, 0.0, 0.01, 3), P)
    # the pixel box binds: saturated pixels (0 and 1 occur in digits) never leave [0, 1]
    assert float(P.min()) == 0.0 and float(P.max()) == 1.0


def test_pgd_beats_clean_and_fgsm_mim_beats_clean(trained):
    model, P, y = trained
    attack_fn = model_loss_fn(model, preprocess, y)

    def fn(x):
        with torch.no_grad():
            return attack_fn(x).sum().item()

    clean = fn(P)
    l_fgsm = fn(fgsm(attack_fn, P, 0.3))
    l_pgd = fn(pgd(attack_fn, P, 0.3, 0.01, 40))
    l_mim = fn(mim(attack_fn, P, 0.3, 0.01, 40, momentum=0.9))
    assert l_fgsm > clean and l_mim > clean
    assert l_pgd > clean and l_pgd >= l_fgsm, (clean, l_fgsm, l_pgd)


def test_attacks_keep_attention_fixed_and_params_untouched(digits):
    P, y = digits
    model = make_model("attn", preprocess(P), 16, 10)
    M0 = model.M.clone()
    fn = model_loss_fn(model, preprocess, y)
    pgd(fn, P, 0.3, 0.01, 3)
    mim(fn, P, 0.3, 0.01, 3)
    assert torch.equal(model.M, M0)
    assert all(p.grad is None for p in model.parameters())


def test_attacks_reject_bad_input(trained):
    model, P, y = trained
    fn = model_loss_fn(model, preprocess, y)
    with pytest.raises(ParameterError, match="pixels"):
        pgd(fn, P * 2, 0.3)
    with pytest.raises(ParameterError, match="eps"):
        fgsm(fn, P, -0.1)
    with pytest.raises(ParameterError, match="iters"):
        pgd(fn, P, 0.3, 0.01, 0)
    with pytest.raises(ParameterError, match="step"):
        mim(fn, P, 0.3, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_our_adam_is_torch_adam_bit_for_bit(dtype):
    """ntkcore.nn.adam.Adam replaces torch.optim.Adam (whose construction imports
    torch._dynamo, 1.3 s); on the CPU both give the same weights bit for bit, a parameter
    without a gradient (skipped) included."""
    from ntkcore.nn.adam import Adam

    def run(make):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(),
                                  torch.nn.Linear(7, 3)).to(dtype)
        unused = torch.nn.Parameter(torch.ones(2, dtype=dtype))
        opt = make(list(net.parameters()) + [unused])
        X = torch.randn(20, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
        for _ in range(40):
            loss = (net(X) ** 2).mean() + 0.1 * sum((q ** 2).sum() for q in net.parameters())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [q.detach().clone() for q in list(net.parameters()) + [unused]]
    ours = run(lambda ps: Adam(ps, lr=1e-2))
    theirs = run(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not torch.equal(ours[0], run(lambda ps: Adam(ps, lr=2e-2))[0])


def test_our_adam_counts_steps_per_parameter_like_torch():
    """A parameter without a gradient on the first steps: torch counts its steps from its
    first gradient (bias correction 1 - b^t per parameter); one shared count differed by 0.09."""
    from ntkcore.nn.adam import Adam

    def run(make):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
        b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
        opt = make([a, b])
        for step in range(8):
            loss = (a ** 2).sum() + ((b ** 3).sum() if step >= 3 else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return a.detach().clone(), b.detach().clone()
    ours, theirs = run(lambda ps: Adam(ps, lr=0.1)), run(lambda ps: torch.optim.Adam(ps, lr=0.1))
    assert all(torch.equal(x, y) for x, y in zip(ours, theirs))


def test_training_out_of_memory_is_a_memory_budget_error():
    """The decorator that maps an allocation failure to MemoryBudgetError slid off train()
    when a helper was inserted above it; a raw RuntimeError escaped."""
    from ntkcore.errors import MemoryBudgetError
    X = np.random.default_rng(0).random((30, 6))
    model = make_model("relu", X, 8, 3)

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 4840000000 bytes")
    model.head = no_memory
    with pytest.raises(MemoryBudgetError, match="train"):
        train(model, X, np.arange(30) % 3, epochs=1, progress=False)


def test_training_does_not_import_torch_dynamo():
    """torch.optim's optimizers import torch._dynamo when constructed: 1.3 s of a 13 s
    quickstart, more than the training itself."""
    import subprocess
    import sys
    code = ("import sys, numpy as np\n"
            "from ntkcore.nn import make_model, train\n"
            "X = np.random.default_rng(0).random((30, 6))\n"
            "model = make_model('relu', X, 8, 3)\n"
            "train(model, X, np.arange(30) % 3, epochs=2, progress=False)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
