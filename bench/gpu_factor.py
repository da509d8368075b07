"""GPU: the exact solver's n^3 stages, one by one, against the DGEMM rate of the same run.

gpu_check (b) found exact influence at 1.51x its flop floor on the H200 (bench/RESULTS.md):
cuSOLVER's potrf ran at 0.68 of the DGEMM rate, the block-row L^-1 at 0.73, and about 0.6 s
of the 4.45 s was outside the stage clocks. This script times each candidate for those stages
on one SPD matrix (the eNTK of gpu_check (b) plus lam I), so the defaults can be chosen from
measurements:

* Cholesky: CuPy's ``cholesky`` (copy + cuSOLVER potrf + tril), cuSOLVER potrf alone in place,
  and ``solvers.chol_blocked`` (left-looking, in place, GEMM updates) at several block sizes.
  Each factor is checked on sampled rows: ||(L L^T - A)[rows]|| / ||A[rows]||.
* L^-1: ``solvers.tri_inverse`` by block rows (zero-copy GEMMs) and by block columns (one
  trsm each) at several block sizes, and the obvious alternative, a trsm against the identity
  (n^3 flops).
* Input validation of loo_influence on the n x n K (finite, symmetric), which gpu_check's stage
  clocks do not cover.

    PYTHONPATH=. python3 bench/gpu_factor.py [--n 50000] [--out gpu_factor.md]

Times are CUDA-event medians of ``--reps`` runs (default 2) after a warm-up at n = 2048. Every
timed factorisation starts from a fresh copy of A in one preallocated buffer (the copy is not
timed). Peak device memory: three n x n float64 arrays (60 GB at n = 50 000), so it fits an
80 GB H100.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _problems import influence_problem  # noqa: E402
from gpu_check import gemm_rate, gpu_time  # noqa: E402

ROWS: list[tuple] = []
T0 = time.perf_counter()
#: the fastest measured choice for each setting the exact solver reads (``--json``; gpu_check
#: ``--tuned`` applies it): exact.GPU_CHOLESKY, chol_blocked.GPU_CHOL_BLOCK / DIAG_UPDATE,
#: tri_inverse.GPU_INV_METHOD / GPU_INV_BLOCK
TUNED: dict = {}


#: where main() writes the table and the settings; rewritten after every row, so a run killed
#: by its time limit still leaves what it measured (and gpu_check --tuned its settings so far)
OUTPUTS: dict = {}


def add(stage, what, ms="", tflops="", of_gemm="", note=""):
    ROWS.append((stage, what, ms, tflops, of_gemm, note))
    _write_outputs()
    print(f"[{time.perf_counter() - T0:6.1f}s] {stage} | {what} | {ms} | {tflops} | {of_gemm} "
          f"| {note}", flush=True)


def event_ms(cp, fn, prepare=None, reps=2):
    """Median CUDA-event milliseconds of fn() (no warm-up call: the warm-up ran at small n),
    prepare() (untimed) before each run."""
    return gpu_time(fn, warmup=0, reps=reps, prepare=prepare)


def factor_residual(cp, A, L, rows=16):
    """||(L L^T - A)[idx]||_F / ||A[idx]||_F on sampled rows (A's lower triangle mirrored)."""
    n = A.shape[0]
    idx = np.sort(np.random.default_rng(3).choice(n, min(rows, n), replace=False))
    got = L[cp.asarray(idx)] @ L.T
    want = cp.empty((len(idx), n))
    for r, i in enumerate(int(i) for i in idx):  # row i of symmetric A from its lower triangle
        want[r, :i + 1] = A[i, :i + 1]
        want[r, i + 1:] = A[i + 1:, i]
    return float(cp.linalg.norm(got - want) / cp.linalg.norm(want))


def steps_of_the_blocked_factorisation(cp, A, work, blocks, reps, rate):
    """Each kind of call chol_blocked makes, timed alone at one block size and the middle
    column (j0 = n/2): potrf of a b x b block, syrk b x b x n/2, the panel gemm
    (n/2 - b) x b x n/2, trsm (n/2 - b) x b. Per call, and scaled to the n/b calls (potrf)."""
    from ntkcore.kernels.strided_blas import gemm, potrf_lower, syrk_lower, trsm_lower
    n = A.shape[0]
    h = n // 2
    info = cp.zeros(1, dtype=np.int32)
    for b in blocks:
        if h + 2 * b > n:
            continue
        blk = A[:b, :b]
        ms = event_ms(cp, lambda: potrf_lower(work[:b, :b], info, 0),
                      prepare=lambda: work[:b, :b].__setitem__(Ellipsis, blk), reps=reps + 1)
        add("cholesky step", f"potrf b={b} (one diagonal block)", f"{ms:.2f}",
            f"{b ** 3 / 3 / (ms / 1e3) / 1e12:.1f}", "",
            f"x n/b = {ms * n / b:.0f} ms over the factorisation")
        work[...] = A  # any finite values: these steps are timed, not checked
        ms = event_ms(cp, lambda: syrk_lower(work[h:h + b, h:h + b], work[h:h + b, :h],
                                             alpha=-1.0, beta=1.0), reps=reps + 1)
        add("cholesky step", f"syrk b={b}, inner {h}", *_fmt(ms, float(b) * b * h, rate))
        ms = event_ms(cp, lambda: gemm(work[h + b:, h:h + b], work[h + b:, :h], work[h:h + b, :h],
                                       trans_b=True, alpha=-1.0, beta=1.0), reps=reps + 1)
        add("cholesky step", f"gemm ({n - h - b} x {b}, inner {h})",
            *_fmt(ms, 2.0 * (n - h - b) * b * h, rate))
        work[...] = A
        potrf_lower(work[h:h + b, h:h + b], info, 0)
        ms = event_ms(cp, lambda: trsm_lower(work[h + b:, h:h + b], work[h:h + b, h:h + b],
                                             side="right", trans=True), reps=reps + 1)
        add("cholesky step", f"trsm ({n - h - b} x {b})", *_fmt(ms, float(b) * b * (n - h - b), rate))


def _fmt(ms, flops, rate):
    return f"{ms:.0f}", f"{flops / (ms / 1e3) / 1e12:.1f}", f"{flops / (ms / 1e3) / rate:.2f}"


def run(cp, n, reps, chol_blocks, inv_blocks, gemm_size, d=3072, m=1024):
    import ntkcore as nc
    from ntkcore.backend import Backend
    from ntkcore.kernels.strided_blas import potrf_lower
    from ntkcore.solvers import chol_blocked
    from ntkcore.solvers.chol_blocked import cholesky_blocked, cholesky_blocked_flops
    from ntkcore.solvers.tri_inverse import (tri_inv_blocked, tri_inv_columns,
                                             tri_inv_columns_flops, tri_inv_flops)
    be = Backend("cuda")
    lam = 1e-3
    rate = gemm_rate(cp, gemm_size)
    add("rate", f"DGEMM {gemm_size}^3", "", f"{rate / 1e12:.1f}", "1.00", "the floor's rate")

    # warm-up at a small size: handles, CuPy kernels, our kernels compiled
    small = min(n, 2048)
    Xs, _, Ws, _, _ = influence_problem(cp, small, 8, 10, 64, 256, seed=1)
    As = nc.relu_ntk(Xs, Ws)
    As[cp.arange(small), cp.arange(small)] += lam
    for b in chol_blocks:
        cholesky_blocked(be, As.copy(), block=b)
    Ls = cp.linalg.cholesky(As)
    for b in inv_blocks:
        tri_inv_blocked(be, Ls, block=b)
        tri_inv_columns(be, Ls, block=b)
    del Xs, Ws, As, Ls
    cp.get_default_memory_pool().free_all_blocks()

    X, _, W, _, _ = influence_problem(cp, n, 8, 10, d, m, seed=4)
    A = nc.relu_ntk(X, W)
    del X, W
    # validation as loo_influence does it, on K (before lam is added)
    from ntkcore import _validate
    ms = event_ms(cp, lambda: _validate.as_float_matrix(A, "K", dtype=np.float64), reps=reps)
    add("validation", "as_float_matrix(K) (finite check)", f"{ms:.0f}", "", "",
        f"{8 * n * n / (ms / 1e3) / 1e9:.0f} GB/s of K read")
    ms = event_ms(cp, lambda: _validate.check_square_symmetric(A, "K"), reps=reps)
    add("validation", "check_square_symmetric(K)", f"{ms:.0f}", "", "", "")
    if hasattr(_validate, "check_kernel_matrix"):
        ms = event_ms(cp, lambda: _validate.check_kernel_matrix(A, "K"), reps=reps)
        add("validation", "check_kernel_matrix(K) (one fused pass)", f"{ms:.0f}", "", "",
            f"{8 * n * n / (ms / 1e3) / 1e9:.0f} GB/s")
    A[cp.arange(n), cp.arange(n)] += lam
    chol_flops = n ** 3 / 3

    # --- Cholesky
    L = cp.linalg.cholesky(A)  # untimed first call at full size (workspace, pool)
    del L
    cp.get_default_memory_pool().free_all_blocks()
    ms_cusolver = ms = event_ms(cp, lambda: cp.linalg.cholesky(A), reps=reps)
    add("cholesky", "cupy.linalg.cholesky (copy + cuSOLVER potrf + tril)", *_fmt(ms, chol_flops, rate))
    work = cp.empty_like(A)
    refill = lambda: work.__setitem__(Ellipsis, A)  # noqa: E731
    info = cp.zeros(1, dtype=np.int32)
    ms = event_ms(cp, lambda: potrf_lower(work, info, 0), prepare=refill, reps=reps)
    add("cholesky", "cuSOLVER potrf alone, in place", *_fmt(ms, chol_flops, rate),
        f"devInfo {int(info[0])}, residual {factor_residual(cp, A, cp.tril(work)):.1e}")
    steps_of_the_blocked_factorisation(cp, A, work, chol_blocks, reps, rate)
    best = None  # the last factorisation below leaves its factor in work, for L^-1
    for b, mode in ((b, mode) for b in chol_blocks for mode in ("syrk", "gemm")):
        chol_blocked.DIAG_UPDATE = mode
        ms = event_ms(cp, lambda: cholesky_blocked(be, work, block=b), prepare=refill, reps=reps)
        res = factor_residual(cp, A, work)
        flops = cholesky_blocked_flops(n, b, mode)
        add("cholesky", f"chol_blocked b={b} diag={mode}", *_fmt(ms, flops, rate),
            f"residual {res:.1e}; counted flops {flops:.2e}")
        if res < 1e-12:
            best = min(best or (ms, b, mode), (ms, b, mode))
    chol_blocked.DIAG_UPDATE = "syrk"
    if best is None:
        add("cholesky", "no chol_blocked factor passed its residual check")
        return
    faster = best[0] < ms_cusolver
    TUNED.update(GPU_CHOLESKY="blocked" if faster else "cusolver", GPU_CHOL_BLOCK=best[1],
                 DIAG_UPDATE=best[2], cholesky_ms={"cusolver": ms_cusolver, "blocked": best[0]})
    add("cholesky", f"fastest chol_blocked: b={best[1]} diag={best[2]}", f"{best[0]:.0f}", "", "",
        "n^3/3 at the DGEMM rate: " + f"{chol_flops / rate * 1e3:.0f} ms")

    # --- L^-1 (work holds the last factor)
    del A
    cp.get_default_memory_pool().free_all_blocks()
    out = cp.empty_like(work)
    for b, method in ((b, m) for b in inv_blocks for m in ("rows", "columns")):
        fn, count = ((tri_inv_blocked, tri_inv_flops) if method == "rows" else
                     (tri_inv_columns, tri_inv_columns_flops))
        ms = event_ms(cp, lambda: fn(be, work, out=out, block=b), reps=reps)
        idx = np.sort(np.random.default_rng(5).choice(n, min(16, n), replace=False))
        eye_rows = cp.zeros((len(idx), n))
        eye_rows[cp.arange(len(idx)), cp.asarray(idx)] = 1.0
        err = float(cp.linalg.norm(out[cp.asarray(idx)] @ work - eye_rows) / len(idx) ** 0.5)
        add("L^-1", f"{fn.__name__} b={b}", *_fmt(ms, count(n, b), rate),
            f"norm((X L - I)[16 rows]) / 4 = {err:.1e}")
        if err < 1e-10 and ms < TUNED.get("inverse_ms", float("inf")):
            TUNED.update(GPU_INV_METHOD=method, GPU_INV_BLOCK=b, inverse_ms=ms)
    from cupyx.scipy.linalg import solve_triangular

    def trsm_identity():
        eye = cp.eye(n, order="F")
        solve_triangular(work.T, eye, lower=False, trans=1, overwrite_b=True)

    del out
    cp.get_default_memory_pool().free_all_blocks()
    w = min(n, 256)  # load the trsm and identity kernels outside the timing
    solve_triangular(work[:w, :w].T, cp.eye(w, order="F"), lower=False, trans=1)
    ms = event_ms(cp, trsm_identity, reps=1)
    add("L^-1", "peer: trsm against I (n^3 flops)", *_fmt(ms, float(n) ** 3, rate),
        f"ms is {ms / 1e3:.2f} s; at the n^3/3 it replaces: "
        f"{n ** 3 / 3 / (ms / 1e3) / 1e12:.1f} TFLOP/s")


def _write_outputs():
    if OUTPUTS.get("md"):
        lines = OUTPUTS["header"] + ["| " + " | ".join(str(c) for c in row) + " |"
                                     for row in ROWS]
        with open(OUTPUTS["md"], "w") as fh:
            fh.write("\n".join(lines) + "\n")
    if OUTPUTS.get("json"):
        import json
        with open(OUTPUTS["json"], "w") as fh:
            json.dump(dict(TUNED, **OUTPUTS["meta"]), fh, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--chol-blocks", default="512,1024,2048,4096")
    p.add_argument("--inv-blocks", default="1024,2048,4096")
    p.add_argument("--gemm", type=int, default=8192, help="DGEMM size for the rate")
    p.add_argument("--d", type=int, default=3072, help="input dimension of the eNTK problem")
    p.add_argument("--m", type=int, default=1024, help="width of the eNTK problem")
    p.add_argument("--out", default=None, help="write the table (Markdown) here")
    p.add_argument("--json", default=None,
                   help="write the fastest settings here (for gpu_check.py --tuned)")
    args = p.parse_args(argv)
    import cupy as cp
    try:
        name = cp.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001
        name = "unknown"
    command = " ".join(argv if argv is not None else sys.argv[1:])
    OUTPUTS.update(md=args.out, json=args.json, meta={"n": args.n, "gpu": name}, header=[
        f"# gpu_factor, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"GPU: {name}; n = {args.n}; reps = {args.reps}; command: "
        f"`python3 bench/gpu_factor.py {command}`",
        "", "| stage | what | ms | TFLOP/s | of DGEMM rate | note |",
        "| --- | --- | --- | --- | --- | --- |"])
    blocks = [int(b) for b in args.chol_blocks.split(",")]
    inv_blocks = [int(b) for b in args.inv_blocks.split(",")]
    try:
        run(cp, args.n, args.reps, blocks, inv_blocks, args.gemm, args.d, args.m)
    except Exception as exc:  # noqa: BLE001 - keep the rows measured so far
        import traceback
        traceback.print_exc()
        add("ERROR", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    _write_outputs()
    print("\n".join(OUTPUTS["header"] + ["| " + " | ".join(str(c) for c in row) + " |"
                                         for row in ROWS]))
    return 1 if any(r[0] == "ERROR" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
