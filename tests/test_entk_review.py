"""Regressions from the eNTK review: nn.LSTM in CPU float32 (oneDNN's fused RNN has no
backward under torch.func), a ntvp plan that refused budgets larger than one that worked,
allocation failures reported as unsupported ops (or hidden by the per-example fallback), CLI
models with (b, 2, 5) outputs silently flattened into C = 10, sys.exit() in a model file, and
half-precision models returning a half-precision kernel."""

import numpy as np
import pytest
import torch
from conftest import RTOL, assert_close
from reference import autograd_entk_generic
from test_cli import invoke, one_line_error
from torch import nn

from ntkcore import errors
from ntkcore.ntk import _entk_cost as cost
from ntkcore.ntk import _entk_jac
from ntkcore.ntk.empirical import empirical_ntk, load_user_model

# float32 kernels against the float64 reference: the LSTM's sums over 3 time steps and the
# blocked contraction reorder float32 rounding; 1e-5 is ~80 ulps of the kernel's scale
RTOL32 = 1e-5


class _LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.r = nn.LSTM(5, 4, batch_first=True)
        self.h = nn.Linear(4, 2)

    def forward(self, x):
        return self.h(self.r(x)[0][:, -1])


@pytest.mark.parametrize("strategy", ["auto", "jacobian", "ntvp"])
def test_lstm_float32_on_cpu_falls_back_and_is_right(strategy):
    torch.manual_seed(0)
    m, X = _LSTMHead(), torch.randn(4, 3, 5)
    K, rep = empirical_ntk(m, X, strategy=strategy, return_report=True)
    assert K.dtype == torch.float32 and "one example at a time" in rep.blocks["unbatched"]
    assert_close(K.numpy(), autograd_entk_generic(m, X), rtol=RTOL32, what=strategy)
    assert torch.backends.mkldnn.enabled and torch.backends.cudnn.enabled  # restored


def _conv_head():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(48, 3)).double()


def test_ntvp_budget_sweep_is_monotone():
    """Every budget from the first that fits up succeeds (45-100 kB used to raise although
    30 kB and 200 kB worked) and gives the reference kernel within its estimated peak."""
    m = _conv_head()
    X = torch.randn(11, 2, 4, 4, dtype=torch.float64)
    R = autograd_entk_generic(m, X)
    ok = []
    for b in np.geomspace(8_000, 400_000, 18).astype(int).tolist() + [45_000, 60_000, 100_000]:
        try:
            K, rep = empirical_ntk(m, X, strategy={"0": "ntvp"}, memory_budget=b,
                                   return_report=True)
        except errors.MemoryBudgetError as e:
            ok.append((b, False, e.needed_bytes))
            continue
        ok.append((b, True, None))
        assert rep.est_peak_bytes <= b
        assert_close(K.numpy(), R, rtol=RTOL[np.float64], what=f"budget {b}")
    ok.sort()
    first = next(i for i, (_, good, _) in enumerate(ok) if good)
    assert all(good for _, good, _ in ok[first:]), ok
    assert all(need is not None and need > b for b, good, need in ok if not good), ok


def test_plan_ntvp_fits_every_budget_above_one_product():
    s, C, P, act = 8, 3, 60, 150
    one = 2 * s * C * P + 3 * s * C * act
    with pytest.raises(errors.MemoryBudgetError):
        cost.plan_ntvp(n=11, n2=11, C=C, s=s, p_ntvp=P, act_row=act, budget=one - 1)
    for budget in np.geomspace(one, 200 * one, 60).astype(int):
        rows, chunk, peak = cost.plan_ntvp(n=11, n2=11, C=C, s=s, p_ntvp=P, act_row=act,
                                           budget=int(budget))
        assert rows >= 1 and chunk >= 1 and peak <= budget


OOM_CPU = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
           "memory: you tried to allocate 4840000000 bytes. Error code 12")


@pytest.mark.parametrize("exc", [RuntimeError(OOM_CPU),
                                 torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")])
def test_allocation_failure_is_a_memory_budget_error(monkeypatch, exc):
    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(_entk_jac, "run_blocked", fail)
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(errors.MemoryBudgetError, match="allocation failure") as info:
        empirical_ntk(m, torch.randn(6, 5), memory_budget=10**7)
    assert str(exc).splitlines()[0][:40] in str(info.value)
    assert info.value.__cause__ is exc


def test_allocation_failure_under_vmap_is_not_hidden_by_the_loop(monkeypatch):
    """A CPU OOM in the batched transform must not switch to the per-example loop."""
    def vmap(*a, **k):
        def run(*a, **k):
            raise RuntimeError(OOM_CPU)
        return run
    monkeypatch.setattr(_entk_jac, "vmap", vmap)
    m = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(errors.MemoryBudgetError, match="can't allocate memory"):
        empirical_ntk(m, torch.randn(6, 5), strategy="jacobian")


def test_unsupported_op_still_a_parameter_error(monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("vmap: no batching rule for aten::frobnicate")
    monkeypatch.setattr(_entk_jac, "run_blocked", fail)
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(errors.ParameterError, match="not supported"):
        empirical_ntk(m, torch.randn(6, 5))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_model_gives_a_float32_kernel(half):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).to(half)
    X = torch.randn(6, 5)
    K = empirical_ntk(m, X)
    assert K.dtype == torch.float32 and next(m.parameters()).dtype == half  # on a copy
    assert_close(K.numpy(), autograd_entk_generic(m, X), rtol=RTOL32, what=str(half))
    assert empirical_ntk(m, X, dtype="float64").dtype == torch.float64


MODELS = '''
import torch
from torch import nn


class Out3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(64, 10)

    def forward(self, x):
        return self.l(x).view(-1, 2, 5)


def mlp3d():
    return Out3d()
'''


def test_cli_refuses_model_outputs_beyond_b_by_c(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    r = invoke("influence", "--model", f"{path}:mlp3d", "--classes", 5, "--n-train", 30,
               "--n-test", 4, "--out", tmp_path / "o", "--quiet")
    one_line_error(r, "(1, 2, 5)", "(b, C)")


def test_sys_exit_in_a_model_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "exit_import.py"
    path.write_text("import sys\nsys.exit(3)\n")
    r = invoke("influence", "--model", f"{path}:mlp", "--out", tmp_path / "o", "--quiet")
    one_line_error(r, "SystemExit", "exit_import.py")
    with pytest.raises(errors.ParameterError, match="SystemExit"):
        load_user_model(f"{path}:mlp")
    factory = tmp_path / "exit_factory.py"
    factory.write_text("import sys\ndef make():\n    sys.exit(4)\n")
    with pytest.raises(errors.ParameterError, match="SystemExit"):
        load_user_model(f"{factory}:make")
    interrupt = tmp_path / "interrupt.py"
    interrupt.write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C is the user's, not a model error
        load_user_model(f"{interrupt}:make")


# ------------------------------------------------------------------ weights shared by modules
def _tied_model():
    torch.manual_seed(3)
    shared = nn.Linear(5, 5)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(5, 2)).double()


@pytest.mark.parametrize("strategy", ["auto", "jacobian"])
def test_tied_weights_survive_and_every_call_is_right(strategy):
    """A weight used by two modules: torch.func.functional_call left a plain, grad-less tensor
    in its place, so the model could no longer train, and every later call left the shared
    layer out of the kernel (51 % error; influence_for_model's second, K_test call too)."""
    m = _tied_model()
    X = torch.randn(6, 5, dtype=torch.float64)
    ref = autograd_entk_generic(m, X)
    for call in range(2):
        K = empirical_ntk(m, X, strategy=strategy)
        assert_close(K.numpy(), ref, what=f"call {call}")
    assert isinstance(m[0].weight, nn.Parameter) and m[0].weight.requires_grad
    assert m[0].weight is m[2].weight, "the two modules must still share one weight"
    assert [n for n, _ in m.named_parameters()] == ["0.weight", "0.bias", "4.weight", "4.bias"]


def test_block_may_be_a_numpy_integer():
    """block=np.int64(2) was refused ('expected an integer >= 1') while top_k took one."""
    m = _tied_model()
    X = torch.randn(5, 5, dtype=torch.float64)
    assert_close(empirical_ntk(m, X, block=np.int64(2)).numpy(), autograd_entk_generic(m, X),
                 what="block=np.int64(2)")
    with pytest.raises(errors.ParameterError, match="block"):
        empirical_ntk(m, X, block=np.int64(0))
