"""ntkcore's GPU code paths, run on the CUDA simulator (tests/simgpu) where there is no GPU.

The stand-in refuses implicit host copies and host/device mixing as CuPy does, so these runs
check that the public API keeps device arrays on the device and returns them; results are
compared with the CPU path (itself tested against tests/reference.py). bench/gpu_check.py's
correctness section runs here too, so the script the GPU run depends on is exercised in CI.
Skipped where a real GPU exists: there the 'cuda' params of test_kernels.py run instead.
"""

import json
import os
import sys
import warnings

import numpy as np
import pytest

import ntkcore as nc
from ntkcore import errors

from conftest import assert_close

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))


def _problem(n=120, T=9, C=3, d=7, m=50, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    Xt = rng.standard_normal((T, d))
    W = rng.standard_normal((m, d))
    Y = np.eye(C)[rng.integers(0, C, n)]
    Yt = np.eye(C)[rng.integers(0, C, T)]
    return X, Xt, W, Y, Yt


@pytest.mark.parametrize("solver,options,rtol,cholesky", [
    ("exact", {}, 1e-10, "blocked"),
    ("exact", {}, 1e-10, "cusolver"),
    ("nystrom", {"rank": 120, "landmarks": "uniform"}, 1e-6, "blocked"),  # full rank: exact up to K_rr
    ("cg", {"tol": 1e-10, "probes": 4096}, None, "blocked"),
])
def test_loo_influence_on_device_arrays_matches_the_cpu(sim_cupy, monkeypatch, solver,
                                                        options, rtol, cholesky):
    from ntkcore.solvers import chol_blocked, exact, tri_inverse
    monkeypatch.setattr(tri_inverse, "GPU_INV_BLOCK", 48)  # several block rows, ragged last
    monkeypatch.setattr(tri_inverse, "RIGHT_APPLY_BLOCK", 40)  # several block columns
    monkeypatch.setattr(chol_blocked, "GPU_CHOL_BLOCK", 56)
    monkeypatch.setattr(exact, "GPU_CHOLESKY", cholesky)
    cp = sim_cupy
    X, Xt, W, Y, Yt = _problem()
    lam = 1e-1
    cpu = nc.loo_influence(nc.relu_ntk(X, W), Y, nc.relu_ntk(Xt, W, X), Yt, lam=lam,
                           solver=solver, top_k=5, **options)
    Xd, Wd = cp.asarray(X), cp.asarray(W)
    gpu = nc.loo_influence(nc.relu_ntk(Xd, Wd), cp.asarray(Y), nc.relu_ntk(cp.asarray(Xt), Wd, Xd),
                           cp.asarray(Yt), lam=lam, solver=solver, top_k=5, **options)
    for name in ("scores", "alpha", "predictions", "loo_residuals", "diag_inv", "top_helpful"):
        assert isinstance(getattr(gpu, name), cp.ndarray), f"{name} left the device"
    assert gpu.solver == cpu.solver
    assert_close(gpu.predictions.get(), cpu.predictions, rtol=1e-10, what="predictions")
    if rtol is None:  # CG's diagonal is a stochastic estimate: the same seed, the same probes
        rtol = 1e-6
    assert_close(gpu.scores.get(), cpu.scores, rtol=rtol, what=f"{solver} scores")


@pytest.mark.parametrize("layout", ["F", "reversed rows", "broadcast row", "every other column",
                                    "float32"])
def test_exact_device_right_solve_takes_any_k_test_layout(sim_cupy, monkeypatch, layout):
    """K_test A^-1 by GEMMs over L^-1 hands K_test to cuBLAS as pointer + leading dimension: a
    view it cannot take as it is (reversed, broadcast, no unit stride; or float32) is copied,
    and an F-ordered one goes as it is. Each gives the float64 K_test A^-1 of a dense solve."""
    from ntkcore.solvers import tri_inverse
    from ntkcore.solvers.exact import exact_fit
    monkeypatch.setattr(tri_inverse, "RIGHT_APPLY_BLOCK", 16)
    cp = sim_cupy
    X, Xt, W, Y, Yt = _problem(n=60, T=9, seed=3)
    K = nc.relu_ntk(X, W)
    Kt = nc.relu_ntk(Xt, W, X)
    if layout == "broadcast row":
        Kt = np.broadcast_to(Kt[:1], Kt.shape)
    Kd = cp.asarray(Kt[::-1] if layout == "reversed rows" else Kt)
    Ktd = {"F": lambda: cp.asfortranarray(Kd), "reversed rows": lambda: Kd[::-1],
           "broadcast row": lambda: cp.broadcast_to(Kd[:1], Kd.shape),
           "every other column": lambda: cp.repeat(Kd, 2, axis=1)[:, ::2],
           "float32": lambda: Kd.astype(np.float32)}[layout]()
    want = np.linalg.solve(K + 0.1 * np.eye(60), (Ktd.astype(np.float64).get()).T).T
    fit = exact_fit(cp.asarray(K), cp.asarray(Y), 0.1)
    got = fit.right_solve(Ktd)
    assert got.dtype == np.float64
    assert_close(got.get(), want, rtol=1e-10, what=f"K_test A^-1, K_test {layout}")


@pytest.mark.parametrize("solver", ["nystrom", "cg"])
def test_matrix_free_operator_on_the_device(sim_cupy, solver):
    """The solvers' eNTK operator assembles tiles on the device and never forms n x n."""
    from ntkcore.solvers.operator import ReluNTKOperator
    cp = sim_cupy
    X, Xt, W, Y, Yt = _problem(n=150, seed=1)
    opts = {"rank": 40, "tol": 1e-8} if solver == "cg" else {"rank": 40}
    cpu = nc.loo_influence(ReluNTKOperator(X, W, tile=64), Y, nc.relu_ntk(Xt, W, X), Yt,
                           lam=1e-1, solver=solver, **opts)
    Xd, Wd = cp.asarray(X), cp.asarray(W)
    gpu = nc.loo_influence(ReluNTKOperator(Xd, Wd, tile=64), cp.asarray(Y),
                           nc.relu_ntk(cp.asarray(Xt), Wd, Xd), cp.asarray(Yt), lam=1e-1,
                           solver=solver, **opts)
    assert isinstance(gpu.scores, cp.ndarray)
    assert_close(gpu.predictions.get(), cpu.predictions, rtol=1e-8, what="predictions")
    assert_close(gpu.scores.get(), cpu.scores, rtol=1e-6, what=f"{solver} scores")


def test_device_a8_checks_agree_with_the_exact_spectrum(sim_cupy):
    """The GPU's conditioning check (block power iterations by GEMMs with L and L^-1) against
    the exact spectrum the CPU path computes at this n."""
    cp = sim_cupy
    X, Xt, W, Y, Yt = _problem(n=500, seed=2)
    cpu = nc.loo_influence(nc.relu_ntk(X, W), Y, nc.relu_ntk(Xt, W, X), Yt, lam=1e-3)
    Xd, Wd = cp.asarray(X), cp.asarray(W)
    gpu = nc.loo_influence(nc.relu_ntk(Xd, Wd), cp.asarray(Y), nc.relu_ntk(cp.asarray(Xt), Wd, Xd),
                           cp.asarray(Yt), lam=1e-3)
    assert gpu.diagnostics["cond_A_estimate"] == pytest.approx(cpu.diagnostics["cond_A"],
                                                               rel=1e-3)
    assert gpu.diagnostics["inverse_residual_probe"] < 1e-10


@pytest.mark.parametrize("cholesky", ["blocked", "cusolver"])
def test_an_indefinite_kernel_on_the_device_is_not_psd_error(sim_cupy, monkeypatch, cholesky):
    """CuPy's cholesky returns a finite partial factor by default; ntkcore must not score it
    (nor the blocked factorisation's, whose pivots are checked once at the end)."""
    from ntkcore.solvers import chol_blocked, exact
    monkeypatch.setattr(exact, "GPU_CHOLESKY", cholesky)
    monkeypatch.setattr(chol_blocked, "GPU_CHOL_BLOCK", 16)
    cp = sim_cupy
    rng = np.random.default_rng(2)
    G = rng.standard_normal((40, 40))
    K = G + G.T  # eigenvalues of both signs
    with pytest.raises(errors.NotPSDError, match="not positive definite"):
        nc.loo_influence(cp.asarray(K), cp.asarray(rng.standard_normal((40, 2))),
                         cp.asarray(rng.standard_normal((3, 40))),
                         cp.asarray(rng.standard_normal((3, 2))), lam=1e-3, solver="exact")


def test_device_memory_planning_refuses_up_front_and_auto_falls_back(sim_cupy):
    cp = sim_cupy
    X, Xt, W, Y, Yt = _problem(n=2000, seed=3)
    Xd, Wd = cp.asarray(X), cp.asarray(W)
    cp.free_bytes = 2000 * 2000 * 8 // 2  # the 2000 x 2000 eNTK does not fit; rank 200 does
    with pytest.raises(errors.MemoryBudgetError, match="2000x2000.*nystrom"):
        nc.relu_ntk(Xd, Wd)
    from ntkcore.solvers.operator import ReluNTKOperator
    name, _, reason = nc.solvers.auto.choose_solver(ReluNTKOperator(Xd, Wd), 1e-3)
    assert name == "nystrom" and "free cuda memory" in reason


def test_cli_influence_on_the_simulated_gpu_matches_the_cpu_run(sim_cupy, tmp_path):
    """The quickstart job with --device cuda: same training, same scores as --device cpu."""
    from click.testing import CliRunner

    from ntkcore.cli.main import main
    args = ["influence", "--dataset", "digits", "--n-train", "300", "--n-test", "40",
            "--epochs", "5"]
    outs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        res = CliRunner().invoke(main, args + ["--device", device, "--out", str(out)])
        assert res.exit_code == 0, res.output[-2000:]
        outs[device] = out
    summary = json.loads((outs["cuda"] / "summary.json").read_text())
    assert summary["device"] == "cuda"
    # the kernel stage ran on the (simulated) GPU; torch here has no CUDA, so training ran on
    # the CPU, as it does wherever CuPy sits beside a CPU-only torch
    assert summary["training_device"] == "cpu"
    a, b = (np.load(outs[d] / "influence.npz") for d in ("cpu", "cuda"))
    assert_close(b["scores"], a["scores"], rtol=1e-8, what="CLI scores, cuda vs cpu")
    np.testing.assert_array_equal(b["top_helpful"], a["top_helpful"])


def test_gpu_check_correctness_section_passes_on_the_simulator(sim_cupy, monkeypatch):
    """bench/gpu_check.py's section 1 (what the GPU run reports first), at smaller T."""
    import gpu_check
    monkeypatch.setattr(gpu_check, "ROWS", [])
    monkeypatch.setattr(gpu_check, "SCORING_CASES", ((1, 1, 1), (20, 700, 10), (9, 2049, 3)))
    monkeypatch.setattr(gpu_check, "TRI_INV_CASES", ((700, 256), (300, 64)))
    monkeypatch.setattr(gpu_check, "CHOL_CASES", ((300, 64), (100, 33), (64, 64)))
    monkeypatch.setattr(gpu_check, "RIGHT_APPLY_CASES", ((120, 7, 32), (50, 3, None)))
    rng = np.random.default_rng(4)
    for fn in (gpu_check.check_pack, gpu_check.check_entk, gpu_check.check_infinite,
               gpu_check.check_scoring, gpu_check.check_tri_inverse,
               gpu_check.check_chol_blocked, gpu_check.check_right_apply,
               gpu_check.check_pipeline):
        gpu_check.run_section("correct", fn, sim_cupy, rng)
    verdicts = [row[-1] for row in gpu_check.ROWS]
    assert len(verdicts) >= 30 and set(verdicts) == {"PASS"}, gpu_check.ROWS


def test_gpu_check_poisons_every_allocation_during_the_checks_on_a_real_gpu():
    """The wiring of gpu_check.poisoned_allocations, on a stand-in for cupy.cuda (the
    simulator has no allocator hooks, and its empty() is poisoned already): installed for the
    checks, each block filled with 0xFF bytes, the previous allocator restored afterwards,
    and its pool's cached blocks given back by _free."""
    import types

    import gpu_check
    calls = []

    class Pool:
        def malloc(self, nbytes):
            return types.SimpleNamespace(ptr=1000 + nbytes)

        def free_all_blocks(self):
            calls.append("free")
    state = {"allocator": "default"}
    cuda = types.SimpleNamespace(
        MemoryPool=Pool, get_allocator=lambda: state["allocator"],
        set_allocator=lambda a: state.update(allocator=a),
        runtime=types.SimpleNamespace(memset=lambda ptr, v, n: calls.append((ptr, v, n))))
    fake = types.SimpleNamespace(cuda=cuda)
    with gpu_check.poisoned_allocations(fake) as on:
        assert on and callable(state["allocator"])
        assert state["allocator"](64).ptr == 1064 and state["allocator"](0).ptr == 1000
    assert state["allocator"] == "default" and calls == [(1064, 0xFF, 64)]
    with gpu_check.poisoned_allocations(types.SimpleNamespace(cuda=types.SimpleNamespace())) \
            as on:
        assert not on  # the simulator: nothing to hook
    gpu_check._POISON_POOL.clear()


@pytest.mark.parametrize("free_bytes,cholesky", [(8 << 30, "cusolver"), (2_000_000, "cusolver"),
                                                (8 << 30, "blocked")])
def test_gpu_check_runs_end_to_end_at_toy_sizes(sim_cupy, monkeypatch, tmp_path, free_bytes,
                                                cholesky):
    """Every section of the script runs (timings under the simulator mean nothing); with
    little free memory, (b) compares with the plain chain at the n where that chain fits;
    --cholesky blocked times (b) with the blocked factorisation."""
    import gpu_check
    from ntkcore.solvers import chol_blocked, exact, tri_inverse
    for module, name in ((exact, "GPU_CHOLESKY"), (chol_blocked, "GPU_CHOL_BLOCK"),
                         (chol_blocked, "DIAG_UPDATE"), (tri_inverse, "GPU_INV_METHOD"),
                         (tri_inverse, "GPU_INV_BLOCK")):  # main() sets them
        monkeypatch.setattr(module, name, getattr(module, name))
    sim_cupy.free_bytes = free_bytes
    monkeypatch.setattr(gpu_check, "ROWS", [])
    monkeypatch.setattr(gpu_check, "NOTES", [])
    monkeypatch.setattr(gpu_check, "QUICK", dict(n=300, d=32, m=64, T=40, C=3, cpu_n=200,
                                                 cpu_d=16, cpu_T=20, cpu_nn=500, gemm=128))
    for name in ("check_pack", "check_entk", "check_infinite", "check_scoring",
                 "check_tri_inverse", "check_chol_blocked", "check_right_apply", "check_pipeline"):
        monkeypatch.setattr(gpu_check, name, lambda cp, rng: None)  # covered above
    from simgpu import blas
    del blas.CALLS[:]
    out = tmp_path / "gpu_check.md"
    tuned = tmp_path / "tuned.json"  # as bench/gpu_factor.py --json writes it
    tuned.write_text(json.dumps({"GPU_CHOLESKY": cholesky, "GPU_CHOL_BLOCK": 64,
                                 "DIAG_UPDATE": "gemm", "GPU_INV_METHOD": "columns",
                                 "GPU_INV_BLOCK": 100}))
    rc = gpu_check.main(["--quick", "--out", str(out), "--budget-s", "600", "--tuned", str(tuned)])
    assert any(c[0] == "dpotrf" for c in blas.CALLS) == (cholesky == "blocked")
    text = out.read_text()
    assert "SIMULATED GPU" in text
    assert f"GPU Cholesky: {cholesky}" in text and "L^-1 by columns (block 100)" in text
    errors_ = [r for r in gpu_check.ROWS if r[1] == "ERROR"]
    assert not errors_, errors_
    assert rc == 0, text
    for what in ("fused eNTK (ours)", "ours: relu_ntk x2 + loo_influence(exact, check=False)",
                 "plain CuPy chain", "ours / plain chain", "relu_ntk n=200"):
        assert what in text, f"{what!r} missing from the table"
    assert ("ours at n=" in text) == (free_bytes < 8 << 30)


def test_gpu_check_with_no_time_left_says_skipped(sim_cupy, monkeypatch, tmp_path):
    """A budget too small for (b) and (c) gives 'skipped' rows, not a crash (the H200 run of
    2026-11-28 with --budget-s 40 died in add() here and wrote no table)."""
    import gpu_check
    monkeypatch.setattr(gpu_check, "ROWS", [])
    monkeypatch.setattr(gpu_check, "NOTES", [])
    out = tmp_path / "gpu_check.md"
    rc = gpu_check.main(["--quick", "--out", str(out), "--budget-s", "1",
                         "--skip", "correct,entk"])
    assert rc == 0
    text = out.read_text()
    assert "| (b) influence | exact influence at full size | skipped (time budget) |" in text
    assert "| (c) Numba | Numba kernels | skipped (time budget) |" in text


def test_bench_approx_gpu_scale_runs_at_toy_size(sim_cupy, tmp_path):
    """The 1 000 000-point GPU benchmark's code path (issue 4), at n = 3000 on the simulator."""
    import bench_approx
    out = tmp_path / "scale.json"
    bench_approx.main(["--gpu-scale", "--scale-n", "3000", "--scale-test", "20",
                       "--full-rank", "100", "--width", "64", "--json", str(out)])
    res = json.loads(out.read_text())["gpu_scale"]
    assert res["n"] == 3000 and res["rank"] == 100 and res["time_total"] > 0


@pytest.mark.parametrize("solver,options", [("exact", {}), ("nystrom", {"rank": 50}),
                                            ("cg", {"rank": 50, "tol": 1e-6})])
def test_solvers_on_the_device_move_o_n_bytes_not_o_n_squared(sim_cupy, solver, options):
    """Host <-> device traffic inside loo_influence: vectors and probe blocks, never a
    kernel-sized (n x n or T x n) array; measured, at n = 400, in the stand-in's counters."""
    from ntkcore.solvers.operator import ReluNTKOperator
    cp = sim_cupy
    n, T = 400, 30
    X, Xt, W, Y, Yt = _problem(n=n, T=T, seed=1)
    Xd, Wd, Yd, Ytd, Xtd = (cp.asarray(a) for a in (X, W, Y, Yt, Xt))
    K = nc.relu_ntk(Xd, Wd) if solver == "exact" else ReluNTKOperator(Xd, Wd)
    Kt = nc.relu_ntk(Xtd, Wd, Xd)
    before = cp.traffic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the low-rank approximations warn of their error
        nc.loo_influence(K, Yd, Kt, Ytd, lam=1e-1, solver=solver, top_k=5, **options)
    moved = {k: cp.traffic[k] - before[k] for k in before}
    probes = 64 * n * 8  # cg's Rademacher probes are drawn on the host (one upload)
    assert moved["to_host"] < 16 * n * 8, moved
    assert moved["to_device"] < (probes if solver == "cg" else 0) + 8 * n * 8, moved


@pytest.mark.parametrize("cholesky", ["blocked", "cusolver"])
@pytest.mark.parametrize("overwrite_k,extra", [(False, 2), (True, 1)])
def test_exact_solver_device_memory_peak(sim_cupy, monkeypatch, overwrite_k, extra, cholesky):
    """Device memory the exact solver holds beyond K, in n x n arrays: the copy the blocked
    Cholesky factors in place, and L^-1 (every block GEMM gets strided views, so no n x n
    operand is copied). With overwrite_k, K is factored in place and L^-1 is the one extra
    array; the right solve holds L^-1 and frees L. auto's GPU memory model
    (EXACT_COPIES_GPU x 8 n^2) must cover K plus these arrays."""
    import gc

    from ntkcore.solvers.auto import EXACT_COPIES_GPU
    from ntkcore.solvers.exact import exact_fit
    from simgpu import cupy_shim
    from ntkcore.solvers import tri_inverse
    from ntkcore import backend
    from ntkcore.solvers import chol_blocked, exact
    monkeypatch.setattr(exact, "GPU_CHOLESKY", cholesky)
    monkeypatch.setattr(chol_blocked, "GPU_CHOL_BLOCK", 128)
    monkeypatch.setattr(tri_inverse, "GPU_INV_BLOCK", 100)  # 10 block rows
    monkeypatch.setattr(tri_inverse, "RIGHT_APPLY_BLOCK", 100)
    monkeypatch.setattr(backend, "SUM_SQ_BLOCK_ENTRIES", 100 * 1000)  # row blocks, as at large n
    cp = sim_cupy
    n, T = 1000, 100
    X, Xt, W, Y, Yt = _problem(n=n, T=T, seed=1)
    Xd, Wd = cp.asarray(X), cp.asarray(W)
    Kt = nc.relu_ntk(cp.asarray(Xt), Wd, Xd)
    K = nc.relu_ntk(Xd, Wd)
    gc.collect()
    base = cupy_shim.MEMORY["live"]
    cupy_shim.reset_peak()
    fit = exact_fit(K, cp.asarray(Y), 1e-1, overwrite_k=overwrite_k)
    fit.right_solve(Kt)
    peak = (cupy_shim.MEMORY["peak"] - base) / (8 * n * n)
    # + the inverse's block-row temporaries (P, CuPy's F copy of it, the solved block row:
    # 3 b n) and O(n T), O(n C) arrays
    assert extra <= peak <= extra + 3 * 100 / n + 0.05, peak
    assert 1 + extra <= EXACT_COPIES_GPU  # its n x n arrays; O(n T) is budgeted apart


def test_every_public_array_function_takes_device_arrays(sim_cupy):
    """'Every public function accepts CuPy arrays and returns CuPy arrays' (issue 3): each
    array function of ntkcore's API on device arrays against the same call on host arrays."""
    cp = sim_cupy
    rng = np.random.default_rng(6)
    X = rng.standard_normal((40, 6))
    X2 = rng.standard_normal((9, 6))
    W = rng.standard_normal((30, 6))
    a = rng.integers(0, 6, (5, 40)) + 0.1 * rng.standard_normal((5, 40)).round(1)  # ties
    b = rng.integers(0, 6, (5, 40)) - 2.0
    B, dinv = rng.standard_normal((5, 40)), rng.random(40) + 0.5
    alpha, R = rng.standard_normal((40, 3)), rng.standard_normal((5, 3))
    calls = {
        "gram": lambda m, A, A2: nc.gram(A, A2),
        "gram_power": lambda m, A, A2: nc.gram_power(A, 3),
        "relu_ntk": lambda m, A, A2: nc.relu_ntk(A, m.asarray(W), A2),
        "relu_ntk_infinite": lambda m, A, A2: nc.relu_ntk_infinite(A, A2),
        "attention_features": lambda m, A, A2: nc.attention_features(A),
        "influence_scores": lambda m, A, A2: nc.influence_scores(
            *(m.asarray(v) for v in (B, dinv, alpha, R))),
    }
    for name, call in calls.items():
        host = call(np, X, X2)
        dev = call(cp, cp.asarray(X), cp.asarray(X2))
        assert isinstance(dev, cp.ndarray), f"{name} returned {type(dev)}"
        assert_close(dev.get(), host, rtol=1e-12, what=name)
    metrics = {"spearman": lambda m, x, y: nc.spearman(m.asarray(x), m.asarray(y)),
               "flip_rate": lambda m, x, y: nc.flip_rate(m.asarray(x), m.asarray(y)),
               "topk_stability": lambda m, x, y: nc.topk_stability(m.asarray(x),
                                                                   m.asarray(y), 4)}
    for name, call in metrics.items():
        host, dev = call(np, a, b), call(cp, a, b)  # (T, n): a (T,) array on the device
        assert isinstance(dev, cp.ndarray), f"{name} returned {type(dev)}"
        np.testing.assert_allclose(dev.get(), host, rtol=1e-12, err_msg=name)
        host, dev = call(np, a[0], b[0]), call(cp, a[0], b[0])  # (n,): a float
        assert isinstance(dev, float) and dev == pytest.approx(host, rel=1e-12), name
    H = nc.malleability.high_influence_set(cp.asarray(a[1]), 0.2)
    assert isinstance(H, cp.ndarray)
    np.testing.assert_array_equal(H.get(), nc.malleability.high_influence_set(a[1], 0.2))
    host, dev = nc.spectrum(X), nc.spectrum(cp.asarray(X))
    assert isinstance(dev.eigenvalues, cp.ndarray), "spectrum.eigenvalues left the device"
    assert_close(dev.eigenvalues.get(), host.eigenvalues, rtol=1e-10, what="spectrum.eigenvalues")
    for field in ("kappa", "kappa_effective", "kappa_cubed", "kappa_cubed_effective"):
        assert isinstance(getattr(dev, field), float), field
        assert getattr(dev, field) == pytest.approx(getattr(host, field), rel=1e-10), field


def test_training_device_follows_the_run(sim_cupy):
    """--device cuda trains on the GPU only where torch has CUDA; here (CPU torch) the CPU."""
    import torch

    from ntkcore.experiments.pipeline import torch_device
    assert torch_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert torch_device("cuda") == torch.device(want)
    assert torch_device("auto") == torch.device(want)  # the simulator counts as a GPU


def test_auto_counts_one_array_less_for_an_operator_on_the_device(sim_cupy):
    """A kernel operator is materialised by the solver and factored in place: on the GPU the
    exact solver then needs 2 n x n arrays, not 3, and auto plans with that."""
    from ntkcore.solvers.auto import choose_solver
    from ntkcore.solvers.operator import ReluNTKOperator
    cp = sim_cupy
    n = 1000
    X, _, W, _, _ = _problem(n=n, seed=8)
    op = ReluNTKOperator(cp.asarray(X), cp.asarray(W))
    budget = int(2.5 * 8 * n * n / 0.7)  # 2 arrays fit within 70 %, 3 do not
    assert choose_solver(op, 1e-3, memory_budget=budget)[0] == "exact"
    assert choose_solver(cp.asarray(np.eye(n)), 1e-3, memory_budget=budget)[0] == "nystrom"


def test_bench_cli_gpu_runs_at_toy_size(sim_cupy, tmp_path):
    """The script behind issue 3's CLI target (kernel stage vs training) runs end to end."""
    import bench_cli_gpu
    out = tmp_path / "cli.json"
    summary = bench_cli_gpu.main(["--n-train", "200", "--n-test", "20", "--dim", "32",
                                  "--width", "64", "--epochs", "2", "--json", str(out)])
    assert summary["device"] == "cuda" and summary["solver"] == "exact"
    res = json.loads(out.read_text())
    assert res["ratio"] > 0 and res["summary_timings"]["training"] > 0
