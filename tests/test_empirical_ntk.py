"""empirical_ntk against the plain autograd double loop, across strategies, blocks and outputs.

Reference: tests/reference.py::autograd_entk_generic (one backward per example and output,
float64, dot products in a loop). Tolerance RTOL_64 = 1e-10 (max abs error / max |K|): both
sides are float64 and differ only in summation order (a few hundred ulps at these sizes,
~1e-14); 1e-10 still catches any float32 rounding (>= 1e-8) or a missing or doubled term.
"""

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import assert_close
from reference import autograd_entk_generic
from torch import nn

import ntkcore
from ntkcore.errors import (CorruptDataError, DataNotFoundError, MemoryBudgetError,
                            NonFiniteError, ParameterError, ShapeError)
from ntkcore.ntk.empirical import empirical_ntk, influence_for_model, load_user_model

RTOL_64 = 1e-10
STRATEGIES = ["auto", "jacobian", "ntvp", "structured", "structured-gram", "structured-outer"]


class SmallCNN(nn.Module):
    """Two convolutions (biases), LayerNorm, two Linear layers."""

    def __init__(self, C=3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2)
        self.ln = nn.LayerNorm(36)
        self.fc = nn.Linear(36, 8)
        self.out = nn.Linear(8, C)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h)).flatten(1)
        return self.out(torch.tanh(self.fc(self.ln(h))))


def mlp3(d=5, C=3):
    return nn.Sequential(nn.Linear(d, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, C))


class TwoLayer(nn.Module):
    """f(x) = relu(x W^T) a / sqrt(m): W (m, d) trained, a (m, C) fixed +-1 [eq. 2]."""

    def __init__(self, d, m, C, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(m, d, generator=g, dtype=torch.float64))
        self.register_buffer("a", torch.randint(0, 2, (m, C), generator=g).double() * 2 - 1)
        self.m = m

    def forward(self, x):  # reads W.shape: a non-tensor use must not block the structure
        return torch.relu(x @ self.W.T) @ self.a / math.sqrt(self.W.shape[0])


@pytest.fixture(scope="module")
def cnn_case():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return SmallCNN().double(), rng.standard_normal((5, 2, 7, 7)), rng.standard_normal((3, 2, 7, 7))


@pytest.fixture(scope="module")
def mlp_case():
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    return mlp3().double(), rng.standard_normal((6, 5)), rng.standard_normal((4, 5))


@pytest.mark.parametrize("case", ["cnn_case", "mlp_case"])
@pytest.mark.parametrize("outputs", ["trace", "full", 1])
@pytest.mark.parametrize("cross", [False, True])
def test_matches_autograd_double_loop(request, case, outputs, cross):
    model, X, X2 = request.getfixturevalue(case)
    X2 = X2 if cross else None
    K = empirical_ntk(model, X, X2, outputs=outputs)
    assert_close(K, autograd_entk_generic(model, X, X2, outputs), rtol=RTOL_64,
                 what=f"{case} {outputs}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("block", [None, 2])
def test_every_strategy_same_answer(cnn_case, strategy, block):
    model, X, X2 = cnn_case
    for x2, outputs in ((None, "trace"), (X2, "full")):
        ref = autograd_entk_generic(model, X, x2, outputs)
        K = empirical_ntk(model, X, x2, outputs=outputs, strategy=strategy, block=block)
        assert_close(K, ref, rtol=RTOL_64, what=f"{strategy} block={block} {outputs}")


def test_full_diagonal_blocks_sum_to_trace(cnn_case):
    model, X, X2 = cnn_case
    full = empirical_ntk(model, X, X2, outputs="full")
    assert full.shape == (5, 3, 3, 3)
    trace = empirical_ntk(model, X, X2, outputs="trace")
    assert_close(np.einsum("ijcc->ij", full), trace, rtol=RTOL_64)
    for c in range(3):
        assert_close(full[:, :, c, c], empirical_ntk(model, X, X2, outputs=c), rtol=RTOL_64)


def _unit_rows(n, d, seed):
    X = np.random.default_rng(seed).standard_normal((n, d))
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.mark.parametrize("strategy", ["auto", "jacobian", "ntvp"])
def test_two_layer_equals_relu_ntk(strategy):
    X, X2 = _unit_rows(9, 6, 2), _unit_rows(4, 6, 3)
    model = TwoLayer(6, 32, 3)
    W = model.W.detach().numpy()
    for c in range(3):  # each output's kernel is relu_ntk [Thm B.12]
        K = empirical_ntk(model, X, X2, outputs=c, strategy=strategy)
        assert_close(K, ntkcore.relu_ntk(X, W, X2), rtol=RTOL_64, what=f"output {c}")
    K, rep = empirical_ntk(model, X, strategy=strategy, return_report=True)
    assert_close(K, 3 * ntkcore.relu_ntk(X, W), rtol=RTOL_64, what="trace = C relu_ntk")
    if strategy == "auto":
        assert [(g["name"], g["method"]) for g in rep.groups] == [("W", "gram")]


@pytest.mark.parametrize("arch", ["relu", "attn"])
def test_nn_models_equal_relu_ntk(arch):
    models = pytest.importorskip("ntkcore.nn.models")
    X, X2 = _unit_rows(10, 8, 4), _unit_rows(5, 8, 5)
    model = models.make_model(arch, X, 24, 3, dtype=torch.float64)
    K, report = empirical_ntk(model, X, X2, outputs=0, return_report=True)
    ref = ntkcore.relu_ntk(model.features_numpy(X), model.W_numpy(), model.features_numpy(X2))
    assert_close(K, ref, rtol=RTOL_64, what=arch)
    assert [(g["name"], g["method"]) for g in report.groups] == [("W", "gram")]


def test_report_and_per_layer_override(cnn_case):
    model, X, _ = cnn_case
    K, rep = empirical_ntk(model, X, return_report=True)
    by_name = {g["name"]: g for g in rep.groups}
    assert set(by_name) == {"c1", "c2", "ln", "fc", "out"}
    assert by_name["ln"]["strategy"] == "jacobian"  # no factorisation for LayerNorm affine
    assert by_name["fc"]["strategy"] == "structured"
    assert all(g["est_flops"] > 0 and g["est_bytes_per_row"] > 0 for g in rep.groups)
    assert rep.est_peak_bytes <= rep.memory_budget
    K2, rep2 = empirical_ntk(model, X, strategy={"fc": "jacobian", "c2.weight": "ntvp"},
                             return_report=True)
    by_name = {g["name"]: g for g in rep2.groups}
    assert (by_name["fc"]["strategy"], by_name["c2"]["strategy"]) == ("jacobian", "ntvp")
    assert_close(K2, K, rtol=RTOL_64)
    assert "c1" in str(rep2)


def test_params_by_name_and_predicate(mlp_case):
    model, X, X2 = mlp_case
    sub = [nn_ for nn_, _ in model.named_parameters() if nn_.startswith("2.")]
    restricted = __import__("copy").deepcopy(model)
    for name, p in restricted.named_parameters():
        p.requires_grad_(name in sub)
    ref = autograd_entk_generic(restricted, X, X2)
    assert_close(empirical_ntk(model, X, X2, params=sub), ref, rtol=RTOL_64)
    assert_close(empirical_ntk(model, X, X2, params=lambda n: n.startswith("2.")), ref,
                 rtol=RTOL_64)


def test_batchnorm_eval_mode_and_flags_restored():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2.0)
    model.train()
    X = np.random.default_rng(6).standard_normal((5, 4))
    K = empirical_ntk(model, X)
    assert model.training and model[1].training  # restored
    assert_close(K, autograd_entk_generic(model, X), rtol=RTOL_64)  # reference runs eval()


def test_tied_repeated_and_other_uses_fall_back_correctly():
    """A weight used twice (recurrence), a tied weight with two biases, a weight also used
    elementwise, a raw (k, o) parameter used as x @ P, integer inputs through an Embedding,
    a Linear on a constant whose row count equals the probe batch (caught by the per-row
    verification, not by shapes)."""

    class Misc(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(10, 3)
            self.rec = nn.Linear(6, 6)
            self.h1, self.h2 = nn.Linear(6, 6), nn.Linear(6, 6)
            self.h2.weight = self.h1.weight
            self.P = nn.Parameter(torch.randn(6, 2))
            self.s = nn.Linear(6, 6)
            self.pos = nn.Linear(4, 6)  # applied to a constant with as many rows as the probe
            self.register_buffer("c", torch.randn(3, 4))

        def forward(self, x):
            h = self.e(x).flatten(1) + torch.tanh(self.pos(self.c)).sum(0)
            for _ in range(2):
                h = torch.tanh(self.rec(h))
            h = self.h2(torch.tanh(self.h1(h)))
            h = torch.tanh(self.s(h)) * self.s.weight[0]
            return h @ self.P

    torch.manual_seed(4)
    model = Misc().double()
    X = np.random.default_rng(7).integers(0, 10, (5, 2))
    K, rep = empirical_ntk(model, X, outputs="full", return_report=True)
    assert_close(K, autograd_entk_generic(model, X, None, "full"), rtol=RTOL_64)
    strat = {g["name"]: g["strategy"] for g in rep.groups}
    assert strat["rec"] == "structured" and strat["P"] == "structured"
    assert strat["e"] == strat["s"] == strat["pos"] == "jacobian"


def test_float32_close_and_array_types(mlp_case):
    model, X, X2 = mlp_case
    ref = autograd_entk_generic(model, X, X2)
    K32 = empirical_ntk(model.float(), X.astype(np.float32), X2.astype(np.float32))
    model.double()
    assert isinstance(K32, np.ndarray) and K32.dtype == np.float32
    # float32 forward/backward through three layers: ~1e-6 relative; 1e-4 leaves margin
    assert_close(K32, ref, rtol=1e-4)
    Kt = empirical_ntk(model, torch.from_numpy(X), dtype="float64")
    assert isinstance(Kt, torch.Tensor) and Kt.dtype == torch.float64
    K64 = empirical_ntk(model.float(), X, dtype=torch.float64)  # float64 copy of the model
    model.double()
    assert K64.dtype == np.float64
    assert_close(K64, autograd_entk_generic(model, X), rtol=1e-6)  # weights were rounded


def test_typed_errors(mlp_case):
    model, X, X2 = mlp_case
    with pytest.raises(ParameterError, match="X: expected a torch.Tensor"):
        empirical_ntk(model, X.tolist())
    with pytest.raises(ParameterError, match="model"):
        empirical_ntk(lambda x: x, X)
    with pytest.raises(ShapeError, match="inconsistent feature shapes"):
        empirical_ntk(model, X, X2[:, :4])
    with pytest.raises(ShapeError):
        empirical_ntk(model, X[0])
    with pytest.raises(ParameterError, match="unknown parameter names"):
        empirical_ntk(model, X, params=["0.weight", "nope"])
    for bad in ("diag", 3, True, -4, 1.5):
        with pytest.raises(ParameterError, match="outputs"):
            empirical_ntk(model, X, outputs=bad)
    Xn = X.copy()
    Xn[0, 0] = np.nan
    with pytest.raises(NonFiniteError):
        empirical_ntk(model, Xn)
    with pytest.raises(ParameterError, match="strategy"):
        empirical_ntk(model, X, strategy="fast")
    with pytest.raises(ParameterError, match="unknown layer"):
        empirical_ntk(model, X, strategy={"fc9": "jacobian"})
    with pytest.raises(ParameterError, match="memory_budget"):
        empirical_ntk(model, X, memory_budget=-1)
    with pytest.raises(MemoryBudgetError):
        empirical_ntk(model, X, memory_budget=100)
    with pytest.raises(ParameterError, match="block"):
        empirical_ntk(model, X, block=0)
    with pytest.raises(ParameterError, match="dtype"):
        empirical_ntk(model, X, dtype=torch.int32)
    with pytest.raises(ParameterError, match="F.linear"):
        empirical_ntk(SmallCNN().double(), np.zeros((2, 2, 7, 7)),
                      strategy={"ln": "structured"})


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from ntkcore.ntk.empirical import empirical_ntk
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small GEMMs stall for ms when a 2nd thread shares a busy core

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    dims, n, budget = json.loads(sys.argv[1])
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1])
    X = torch.randn(n, dims[0])
    empirical_ntk(model, X[:n // 8], memory_budget=budget)  # warm up every code path
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = rss("VmRSS:")
    K, rep = empirical_ntk(model, X, memory_budget=budget, return_report=True)
    P = sum(p.numel() for p in model.parameters())
    one_panel = n * sum(g["est_bytes_per_row"] for g in rep.groups)
    print(json.dumps(dict(growth=rss("VmHWM:") - base, naive=n * dims[-1] * P * 4,
                          kernel=K.numel() * 4, one_panel=one_panel,
                          panels=-(-n // rep.blocks["panel"]))))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc peak RSS")
def test_memory_budget_holds_where_the_plain_route_would_not():
    """Peak RSS growth of a fresh process (VmHWM after resetting it) stays within the budget
    + the returned kernel + 48 MiB (allocator arenas and BLAS buffers: a 4-row call grows
    RSS by ~30 MiB whatever the budget). The case is one the plain jacrev+vmap route cannot
    do (its n x C x P float32 Jacobian is 13 GB, 270x the budget) and one that fails the
    limit if the rows are not blocked (all features in one panel: ~135 MiB)."""
    import json
    budget = 48 * 2**20
    case = ([100, 4000, 10], 768, budget)
    res = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, json.dumps(case)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    limit = budget + r["kernel"] + 48 * 2**20
    assert r["naive"] >= 100 * budget and r["one_panel"] > limit and r["panels"] >= 2, r
    assert r["growth"] <= limit, r


def test_jacobian_blocks_stay_in_budget(monkeypatch):
    """Jacobian strategy: the panel store and each block's features (the tensors the
    blocking allocates, seen through a hook on Feats.put / Engine.features) fit the budget
    while the whole n x C x P Jacobian would be 6x it."""
    from ntkcore.ntk import _entk_jac

    seen = {"panel": 0, "block": 0}
    put, features = _entk_jac.Feats.put, _entk_jac.Engine.features

    def spy_put(self, a, f):
        put(self, a, f)
        seen["panel"] = max(seen["panel"], self.J.numel() * self.J.element_size())

    def spy_features(self, xb):
        f = features(self, xb)
        seen["block"] = max(seen["block"], f.J.numel() * f.J.element_size())
        return f

    monkeypatch.setattr(_entk_jac.Feats, "put", spy_put)
    monkeypatch.setattr(_entk_jac.Engine, "features", spy_features)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(100, 400), nn.Tanh(), nn.Linear(400, 200), nn.Tanh(),
                          nn.Linear(200, 10))
    X = torch.randn(24, 100)
    budget = 20 * 2**20
    K, rep = empirical_ntk(model, X, strategy="jacobian", memory_budget=budget,
                           return_report=True)
    naive = 24 * 10 * sum(p.numel() for p in model.parameters()) * 4
    assert naive >= 5 * budget and rep.blocks["panel"] < 24
    assert seen["panel"] + seen["block"] <= budget, seen
    ref = empirical_ntk(model.double(), X.double(), strategy="jacobian")
    assert_close(K.double(), ref, rtol=1e-4)  # float32 vs float64 through 3 layers


def test_influence_for_model_matches_closed_form_pipeline():
    X, Xt = _unit_rows(12, 5, 8), _unit_rows(4, 5, 9)
    Y = np.eye(3)[np.arange(12) % 3]
    Yt = np.eye(3)[np.arange(4) % 3]
    model = TwoLayer(5, 16, 3)
    res = influence_for_model(model, X, Y, Xt, Yt, lam=1e-2)
    W = model.W.detach().numpy()
    ref = ntkcore.loo_influence(ntkcore.relu_ntk(X, W), Y, ntkcore.relu_ntk(Xt, W, X), Yt,
                                lam=1e-2)
    assert res.scores.shape == (4, 12)
    assert_close(res.scores, ref.scores, rtol=1e-8)  # through two solves of kappa ~ 1e3
    assert res.diagnostics["entk"]["train"]["n"] == 12
    with pytest.raises(ParameterError, match="outputs"):
        influence_for_model(model, X, Y, Xt, Yt, outputs="full")


_MODEL_FILE = textwrap.dedent("""
    import torch

    def build(width=4):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Tanh(),
                                   torch.nn.Linear(width, 2))

    not_callable = 3
""")


def test_load_user_model(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(_MODEL_FILE)
    trained = load_user_model(f"{path}:build")
    with torch.no_grad():
        trained[0].weight.add_(1.0)
    weights = tmp_path / "w.pt"
    torch.save(trained.state_dict(), weights)
    loaded = load_user_model(f"{path}:build", weights)
    assert not loaded.training
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), trained(x))
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "ckpt.pt")
    assert torch.equal(load_user_model(f"{path}:build", tmp_path / "ckpt.pt")(x), trained(x))
    assert isinstance(load_user_model("torch.nn:Identity"), torch.nn.Identity)
    with pytest.raises(ParameterError, match="spec"):
        load_user_model("no_colon_here")
    with pytest.raises(ParameterError, match="cannot import"):
        load_user_model("surely_not_a_module_xyz:f")
    with pytest.raises(ParameterError, match="no attribute"):
        load_user_model(f"{path}:missing")
    with pytest.raises(ParameterError, match="callable"):
        load_user_model(f"{path}:not_callable")
    with pytest.raises(DataNotFoundError):
        load_user_model(f"{tmp_path / 'absent.py'}:build")
    with pytest.raises(DataNotFoundError):
        load_user_model(f"{path}:build", tmp_path / "absent.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptDataError):
        load_user_model(f"{path}:build", tmp_path / "bad.pt")
    torch.save(load_user_model(f"{path}:build", factory_kwargs={"width": 5}).state_dict(),
               tmp_path / "wide.pt")
    with pytest.raises(ParameterError, match="does not fit"):
        load_user_model(f"{path}:build", tmp_path / "wide.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch)")
def test_cuda_matches_cpu(cnn_case):
    model, X, X2 = cnn_case
    ref = empirical_ntk(model, X, X2, outputs="full")
    K = empirical_ntk(model, torch.from_numpy(X), torch.from_numpy(X2), outputs="full",
                      device="cuda")
    assert K.is_cuda
    assert_close(K.cpu().numpy(), ref, rtol=RTOL_64)


def test_auto_takes_ntvp_when_jacobian_rows_do_not_fit():
    """An embedding whose Jacobian row (C x 200k numbers) exceeds an eighth of the budget
    goes through NTK-vector products under "auto", with the same kernel."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(5000, 40), nn.Flatten(), nn.Linear(80, 3)).double()
    X = np.random.default_rng(8).integers(0, 5000, (6, 2))
    K, rep = empirical_ntk(model, X, memory_budget=24 * 2**20, return_report=True)
    assert {g["name"]: g["strategy"] for g in rep.groups} == {"0": "ntvp", "2": "structured"}
    assert_close(K, autograd_entk_generic(model, X), rtol=RTOL_64)
