"""GPU-path findings of the session-12 review, on the CUDA simulator (tests/simgpu); each
fix's test failed before it (the simulator's launch limits and the gpu_factor run are new
coverage). Skipped where a real GPU exists (see test_gpu_paths.py)."""

import json
import os
import sys

import numpy as np
import pytest

import ntkcore as nc
from ntkcore.kernels import influence_scores_fused, influence_topk_fused

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))


def _scoring_problem(rng, T=5, n=37, C=3):
    return (rng.standard_normal((T, n)), rng.random(n) + 0.5, rng.standard_normal((n, C)),
            rng.standard_normal((T, C)))


def _layouts(cp, T, n):
    """Outputs the kernels cannot address as out[t * ld + i]: Fortran order, every other
    column, and float32 for float64 scores."""
    return {"fortran": cp.asfortranarray(cp.zeros((T, n))),
            "strided": cp.zeros((T, 2 * n))[:, ::2],
            "float32": cp.zeros((T, n), dtype=np.float32)}


@pytest.mark.parametrize("layout", ["fortran", "strided", "float32"])
def test_device_scores_fill_any_out_layout(sim_cupy, rng, layout):
    """The CUDA kernels wrote out as if it had B's layout and dtype: an F-ordered out got 24
    of 35 entries unwritten, a float32 out 8-byte writes past its end."""
    cp = sim_cupy
    B, dinv, alpha, R = _scoring_problem(rng)
    want = influence_scores_fused(B, dinv, alpha, R)
    out = _layouts(cp, *B.shape)[layout]
    got = influence_scores_fused(cp.asarray(B), cp.asarray(dinv), cp.asarray(alpha),
                                 cp.asarray(R), out=out)
    assert got is out
    rtol = 1e-6 if layout == "float32" else 1e-13
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=rtol, atol=rtol * abs(want).max())


@pytest.mark.parametrize("layout", ["fortran", "strided", "float32"])
def test_device_topk_keeps_scores_in_any_out_layout(sim_cupy, rng, layout):
    cp = sim_cupy
    B, dinv, alpha, R = _scoring_problem(rng)
    want = influence_topk_fused(B, dinv, alpha, R, 4, keep_scores=True)
    out = _layouts(cp, *B.shape)[layout]
    got = influence_topk_fused(cp.asarray(B), cp.asarray(dinv), cp.asarray(alpha),
                               cp.asarray(R), 4, keep_scores=True, out=out)
    assert got.scores is out
    rtol = 1e-6 if layout == "float32" else 1e-13
    np.testing.assert_allclose(cp.asnumpy(out), want.scores, rtol=rtol,
                               atol=rtol * abs(want.scores).max())
    np.testing.assert_array_equal(cp.asnumpy(got.helpful), want.helpful)


def test_device_topk_with_thousands_of_classes_takes_the_chunked_path(sim_cupy, rng):
    """C = 6200 float64 residuals need 49.6 KB of dynamic shared memory in influence_topk,
    over the 48 KiB a launch gets without an opt-in: the launch failed on a GPU."""
    cp = sim_cupy
    B, dinv, alpha, R = _scoring_problem(rng, T=3, n=20, C=6200)
    want = influence_topk_fused(B, dinv, alpha, R, 3)
    got = influence_topk_fused(cp.asarray(B), cp.asarray(dinv), cp.asarray(alpha),
                               cp.asarray(R), 3)
    np.testing.assert_array_equal(cp.asnumpy(got.helpful), want.helpful)
    np.testing.assert_array_equal(cp.asnumpy(got.harmful), want.harmful)


def test_the_simulator_refuses_launches_a_gpu_refuses(sim_cupy):
    from simgpu.kernels import _check_launch
    _check_launch("k", (2**31 - 1, 65535, 1), (1024, 1, 1), 48 * 1024)
    for grid, block, shared in (((1, 65536, 1), (1, 1, 1), 0), ((1, 1, 1), (1025, 1, 1), 0),
                                ((1, 1, 1), (1, 1, 65), 0), ((1, 1, 1), (1, 1, 1), 49153)):
        with pytest.raises(RuntimeError):
            _check_launch("k", grid, block, shared)


def test_a_users_gpu_tile_stays_within_one_launchs_grid():
    """tile = n = 4.3e6 rows gave grid.y = 67188 > 65535 ("invalid configuration")."""
    from types import SimpleNamespace

    from ntkcore.backend import Backend
    from ntkcore.kernels.assembly import choose_tile
    from ntkcore.kernels.cuda import TILE_ROWS_MAX
    n = 4_300_000
    cuda = SimpleNamespace(name="cuda")  # a given tile needs nothing else of the backend
    assert choose_tile(cuda, n, 8, train_a=False, tile=n) == TILE_ROWS_MAX == 65535 * 64
    assert choose_tile(Backend("cpu"), n, 8, train_a=False, tile=n) == n


def test_device_infinite_ntk_of_float32_rows_into_float64(sim_cupy, rng):
    """arccos_tile read X's float32 norms as doubles when out was float64."""
    from ntkcore.kernels.assembly import relu_ntk_infinite_fused
    cp = sim_cupy
    X = rng.standard_normal((70, 9)).astype(np.float32)
    want = relu_ntk_infinite_fused(X.astype(np.float64))
    out = cp.empty((70, 70))
    relu_ntk_infinite_fused(cp.asarray(X), out=out)
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", [False, True])
def test_top_k_of_a_tiny_scale_problem(sim_cupy, device):
    """K, K_test and lam scaled by 1e-160 (scores scale-free): top_k without kept scores
    raised "scores can overflow" because the bound squared alpha ~ 1e160 before dividing by
    diag(A^-1) ~ 1e160; with keep_scores it ranked correctly."""
    s = 1e-160
    K = np.array([[2.0, 1.0], [1.0, 2.0]])
    Kt, Y, Yt = np.array([[1.0, 0.5]]), np.array([1.0, -1.0]), np.array([1.0])
    want = nc.loo_influence(K, Y, Kt, Yt, lam=1.0).scores
    args = [K * s, Y, Kt * s, Yt]
    if device:
        args = [sim_cupy.asarray(a) for a in args]
    res = nc.loo_influence(*args, lam=s, top_k=1, keep_scores=False)
    helpful, harmful = (sim_cupy.asnumpy(a) if device else a
                        for a in (res.top_helpful, res.top_harmful))
    assert (helpful[0, 0], harmful[0, 0]) == (np.argmax(want[0]), np.argmin(want[0]))


def test_gpu_factor_runs_on_the_simulator(sim_cupy, monkeypatch, tmp_path):
    """bench/gpu_factor.py, the first step of the GPU run, at toy size: every row, no ERROR,
    and a JSON that gpu_check.py --tuned reads."""
    import gpu_factor
    from ntkcore.solvers import chol_blocked, exact, tri_inverse
    for module, name in ((exact, "GPU_CHOLESKY"), (chol_blocked, "GPU_CHOL_BLOCK"),
                         (chol_blocked, "DIAG_UPDATE"), (tri_inverse, "GPU_INV_METHOD"),
                         (tri_inverse, "GPU_INV_BLOCK")):
        monkeypatch.setattr(module, name, getattr(module, name))
    monkeypatch.setattr(gpu_factor, "ROWS", [])
    out, tuned = tmp_path / "f.md", tmp_path / "f.json"
    rc = gpu_factor.main(["--n", "301", "--chol-blocks", "64,128", "--inv-blocks", "64,128",
                          "--gemm", "128", "--d", "16", "--m", "32", "--reps", "1",
                          "--out", str(out), "--json", str(tuned)])
    assert rc == 0, out.read_text()
    settings = json.loads(tuned.read_text())
    assert {"GPU_CHOLESKY", "GPU_INV_METHOD"} <= set(settings)  # what gpu_check --tuned reads


def test_gpu_owed_refuses_an_unknown_step_before_any_work(tmp_path):
    """A typo in STEPS ran nothing and exited 0: a GPU lease spent on nothing."""
    import subprocess
    root = os.path.join(os.path.dirname(__file__), "..")
    env = {**os.environ, "STEPS": "gpu_chek", "PYTHON": "true", "OUT": str(tmp_path)}
    done = subprocess.run(["sh", "bench/gpu_owed.sh"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "unknown step 'gpu_chek'" in done.stderr
    env["STEPS"] = "gpu_check cli_shape"  # known names: each step runs (here: `true`)
    done = subprocess.run(["sh", "bench/gpu_owed.sh"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "== gpu_check: exit 0" in done.stdout
    assert "== cli_shape: exit 0" in done.stdout and "gpu_factor" not in done.stdout
