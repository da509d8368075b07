"""relu_ntk / relu_ntk_infinite from device inputs into a host ``out`` (issue 3, memory planning):
K assembled on the (simulated) GPU in row panels sized from free device memory and streamed
into host memory; for an n whose n x n matrix does not fit on the device.

Run on the CUDA simulator (tests/simgpu): its device-to-host copies with blocking=False land
only when waited for, so a missing stream/event wait reads stale or NaN staging memory here;
its MEMORY counters give the device peak. Results against tests/reference.py.
"""

import gc
import json
import os
import sys

import numpy as np
import pytest

import ntkcore as nc
from ntkcore import errors
from ntkcore.kernels import assembly, host_panels
from ntkcore.ntk import tiling

from conftest import assert_close
from reference import relu_ntk_infinite_naive, relu_ntk_naive

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))


def _data(n, n2, d=7, m=37, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    X2 = None if n2 is None else rng.standard_normal((n2, d))
    return X, X2, rng.standard_normal((m, d)), rng.standard_normal(m)


class Panels(list):
    """The panel rows each host assembly planned; ``force`` (set by a test) overrides the
    plan's height (only ever lowering it) to make several, ragged panels at small n."""
    force = None


@pytest.fixture
def panels(monkeypatch):
    seen = Panels()
    real = host_panels.panel_rows

    def spy(n, *args, **kwargs):
        rows = real(n, *args, **kwargs)
        seen.append(rows if seen.force is None else min(rows, seen.force, n))
        return seen[-1]
    monkeypatch.setattr(host_panels, "panel_rows", spy)
    return seen


# (n, n2, rows wanted, train_a, general a): ragged last panels (150 = 6 x 23 + 12;
# 97 = 3 x 30 + 7), a single row, a cross block taller than wide, and one panel holding all
CASES = [
    (150, None, 23, False, False),
    (150, None, 23, True, False),
    (97, 41, 30, False, False),
    (97, 41, 30, True, False),
    (150, None, 23, False, True),
    (97, 41, 30, True, True),
    (1, None, 1, False, False),
    (1, 5, 1, True, True),
    (60, None, 1000, True, False),
]


@pytest.mark.parametrize("n,n2,rows,train_a,general_a", CASES)
def test_host_out_matches_naive(sim_cupy, panels, n, n2, rows, train_a, general_a):
    cp = sim_cupy
    X, X2, W, a = _data(n, n2, seed=n + (n2 or 0))
    width = n if n2 is None else n2
    panels.force = rows
    out = np.full((n, width), np.nan)
    got = nc.relu_ntk(cp.asarray(X), cp.asarray(W), None if X2 is None else cp.asarray(X2),
                      a=cp.asarray(a) if general_a else None, train_a=train_a, out=out,
                      tile=16)
    assert got is out
    expected = relu_ntk_naive(X, W, X2, a=a if general_a else None, train_a=train_a)
    assert_close(out, expected, what="host-assembled eNTK")
    assert panels == [min(n, rows)], panels
    if n2 is None:
        assert np.array_equal(out, out.T), "symmetric K must be exactly symmetric"


def test_host_out_default_tile_and_one_panel(sim_cupy):
    """Default tile and the simulator's ample free memory: one panel, the same K."""
    cp = sim_cupy
    X, X2, W, _ = _data(70, 33)
    out = np.empty((70, 33))
    nc.relu_ntk(cp.asarray(X), cp.asarray(W), cp.asarray(X2), out=out)
    assert_close(out, relu_ntk_naive(X, W, X2), what="one panel")


@pytest.mark.parametrize("n2", [None, 20])
def test_infinite_host_out_matches_naive(sim_cupy, panels, n2):
    cp = sim_cupy
    X, X2, _, _ = _data(90, n2, seed=3)
    X[5] = X[2]  # a duplicate row: near-parallel pairs, refined per panel
    width = 90 if n2 is None else n2
    panels.force = 16  # 5 x 16 + 10
    out = np.empty((90, width))
    got = nc.relu_ntk_infinite(cp.asarray(X), None if X2 is None else cp.asarray(X2), out=out)
    assert got is out and panels == [16], panels
    assert_close(out, relu_ntk_infinite_naive(X, X2), what="host-assembled K_inf")
    if n2 is None:
        assert np.array_equal(out, out.T)


def test_symmetric_host_assembly_copies_only_the_upper_panels(sim_cupy, panels):
    """Device-to-host traffic: each panel's columns j >= i0, not the full rows."""
    cp = sim_cupy
    n, rows = 200, 40
    X, _, W, _ = _data(n, None)
    Xd, Wd = cp.asarray(X), cp.asarray(W)
    panels.force = rows
    before = cp.traffic
    nc.relu_ntk(Xd, Wd, out=np.empty((n, n)), tile=16)
    t = panels[-1]
    upper = sum(8 * (min(n, i0 + t) - i0) * (n - i0) for i0 in range(0, n, t))
    moved = cp.traffic["to_host"] - before["to_host"]
    assert upper <= moved <= upper + 64 * n, (moved, upper)  # + the panels' max/min checks
    assert moved < 0.65 * 8 * n * n


@pytest.mark.parametrize("kind", ["fused", "fused train_a", "general a", "infinite"])
def test_device_memory_stays_o_panel_when_k_does_not_fit(sim_cupy, monkeypatch, panels,
                                                        kind):
    """Free memory set below K's size: out=None is refused up front with the host option in
    the message; a host out succeeds with a device peak (beyond the inputs) of two t-row
    panels (16 t n2 bytes), plus at most the tiles' scratch (DEFAULT_TEMP_FRACTION of free
    memory), the fixed arrays (packed patterns; general a: (n, m) bool patterns; infinite:
    norms and the near-parallel scan's temporaries) and the per-panel max/min: O(t n2), and
    well under K's own 8 n n2 bytes."""
    from simgpu import cupy_shim
    monkeypatch.setattr(assembly, "SCAN_ENTRIES", 1 << 10)
    cp = sim_cupy
    n, d, m = 600, 8, 40
    X, _, W, a = _data(n, None, d=d, m=m)
    Xd, Wd, ad = cp.asarray(X), cp.asarray(W), cp.asarray(a)
    sim_cupy.free_bytes = 8 * n * n // 2  # K needs twice the free memory
    train_a = kind == "fused train_a"

    def call(out):
        if kind == "infinite":
            return nc.relu_ntk_infinite(Xd, out=out)
        return nc.relu_ntk(Xd, Wd, a=ad if kind == "general a" else None, train_a=train_a,
                           out=out)

    with pytest.raises(errors.MemoryBudgetError) as info:
        call(None)
    msg = str(info.value)
    assert "out=numpy.empty((600, 600))" in msg and "host memory" in msg, msg
    assert "nystrom" in msg, msg
    gc.collect()
    base = cupy_shim.MEMORY["live"]
    cupy_shim.reset_peak()
    out = np.empty((n, n))
    call(out)
    peak = cupy_shim.MEMORY["peak"] - base
    expected = relu_ntk_infinite_naive(X) if kind == "infinite" else relu_ntk_naive(
        X, W, a=a if kind == "general a" else None, train_a=train_a)
    assert_close(out, expected, what=kind)
    t = panels[-1]
    fixed = {"fused": 4 * 2 * n, "fused train_a": 4 * 2 * n, "general a": n * m + 8 * m,
             "infinite": 8 * 2 * n + 6 * 8 * assembly.SCAN_ENTRIES}[kind]
    temps = tiling.DEFAULT_TEMP_FRACTION * sim_cupy.free_bytes
    assert 1 < t < n // 4, t
    assert 16 * t * n <= peak <= 16 * t * n + temps + fixed + 16 * (n + 1), (peak, t)
    assert peak <= tiling.OUTPUT_FRACTION * sim_cupy.free_bytes, peak
    assert peak < 0.5 * 8 * n * n, peak


def test_one_row_panel_too_large_is_refused_up_front(sim_cupy):
    cp = sim_cupy
    X, _, W, _ = _data(300, None)
    sim_cupy.free_bytes = 8 * 300  # not even two one-row panels
    out = np.full((300, 300), 7.0)
    with pytest.raises(errors.MemoryBudgetError, match="panels of one 300-entry row"):
        nc.relu_ntk(cp.asarray(X), cp.asarray(W), out=out)
    assert (out == 7.0).all(), "refused before any work"


def test_host_out_argument_errors(sim_cupy):
    cp = sim_cupy
    X, X2, W, _ = _data(12, 5)
    Xd, Wd, X2d = cp.asarray(X), cp.asarray(W), cp.asarray(X2)
    with pytest.raises(errors.ShapeError, match=r"out: expected shape \(12, 5\), got \(5, 12\)"):
        nc.relu_ntk(Xd, Wd, X2d, out=np.empty((5, 12)))
    with pytest.raises(errors.ParameterError, match="out: expected dtype float64, got float32"):
        nc.relu_ntk(Xd, Wd, X2d, out=np.empty((12, 5), dtype=np.float32))
    with pytest.raises(errors.ParameterError, match="C-contiguous host array"):
        nc.relu_ntk(Xd, Wd, X2d, out=np.empty((5, 12)).T)
    with pytest.raises(errors.ParameterError, match="C-contiguous host array"):
        nc.relu_ntk(Xd, Wd, X2d, out=np.empty((12, 10))[:, ::2])
    ro = np.empty((12, 5))
    ro.flags.writeable = False
    with pytest.raises(errors.ParameterError, match="writeable"):
        nc.relu_ntk(Xd, Wd, X2d, out=ro)
    with pytest.raises(errors.ParameterError, match="out: expected a float64 array"):
        nc.relu_ntk(Xd, Wd, X2d, out=[[0.0] * 5] * 12)
    # inputs on two devices, whatever out is
    with pytest.raises(errors.BackendError, match="mix"):
        nc.relu_ntk(X, Wd, out=np.empty((12, 12)))
    with pytest.raises(errors.BackendError, match="mix"):
        nc.relu_ntk(Xd, Wd, X2, out=np.empty((12, 5)))
    # a device out for host inputs
    with pytest.raises(errors.BackendError, match="out: expected an array on the inputs'"):
        nc.relu_ntk(X, W, X2, out=cp.empty((12, 5)))
    # relu_ntk_infinite: the same checks
    with pytest.raises(errors.ShapeError, match="out: expected shape"):
        nc.relu_ntk_infinite(Xd, out=np.empty((12, 11)))
    with pytest.raises(errors.ParameterError, match="C-contiguous host array"):
        nc.relu_ntk_infinite(Xd, X2d, out=np.empty((5, 12)).T)
    with pytest.raises(errors.BackendError, match="out: expected an array on the inputs'"):
        nc.relu_ntk_infinite(X, out=cp.empty((12, 12)))
    square = np.random.default_rng(0).random((4, 4))
    with pytest.raises(errors.ParameterError, match="shares memory with X"):
        nc.relu_ntk_infinite(square, out=square)


def test_infinite_out_on_the_inputs_device(sim_cupy):
    """relu_ntk_infinite's new ``out`` also takes an array on the inputs' device."""
    cp = sim_cupy
    X, X2, _, _ = _data(20, 6)
    out = cp.empty((20, 6))
    got = nc.relu_ntk_infinite(cp.asarray(X), cp.asarray(X2), out=out)
    assert got is out
    assert_close(out.get(), relu_ntk_infinite_naive(X, X2), what="device out")
    host = np.empty((20, 6))
    assert nc.relu_ntk_infinite(X, X2, out=host) is host
    assert_close(host, relu_ntk_infinite_naive(X, X2), what="cpu out")


def test_overflow_in_a_panel_is_nonfinite_error(sim_cupy):
    cp = sim_cupy
    X, _, W, _ = _data(30, None)
    with pytest.raises(errors.NonFiniteError, match="relu_ntk: the result overflowed"):
        nc.relu_ntk(cp.asarray(X * 1e160), cp.asarray(W), out=np.empty((30, 30)))


def test_simulator_copies_land_only_when_waited_for(sim_cupy):
    """The stand-in's streams: a copy queued with blocking=False has not happened until its
    event is waited for (so the pipeline's waits are what makes test results right)."""
    from ntkcore.backend import Backend
    cp = sim_cupy
    be = Backend("cuda")
    dev = cp.arange(6.0)
    stage = be.empty_pinned(6)
    s = cp.cuda.Stream(non_blocking=True)
    dev.get(stream=s, out=stage, blocking=False)
    done = s.record()
    assert np.isnan(stage).all()
    dev += 1.0  # overwriting the source before the wait: the copy sees it
    done.synchronize()
    assert (stage == np.arange(6.0) + 1).all()
    with pytest.raises(ValueError, match="Shape mismatch"):
        dev.get(out=np.empty(5))


def test_bench_host_assembly_runs_at_toy_size(sim_cupy, tmp_path):
    """bench/bench_host_assembly.py's code path on the simulator (numbers meaningless)."""
    import bench_host_assembly
    out = tmp_path / "host.json"
    assert bench_host_assembly.main(["--n", "300", "--d", "16", "--m", "40", "--device-n",
                                     "200", "--copy-mb", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["simulated"] and res["host"]["n"] == 300 and res["device_assembly"]["n"] == 200
    assert res["host"]["d2h_bytes"] >= 8 * 300 * 301 // 2
