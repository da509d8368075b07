"""CPU benchmark of the Numba kernels against their floors, measured in the same run (issue 3).

    PYTHONPATH=. python3 bench/bench_kernels_cpu.py [--n 10000] [--repeat 3]

1. relu_ntk (closed-form eNTK, fused bit-packed kernel) at n = 10 000, d = 784, m = 1024 vs
   - the BLAS peer of issue 3: the time of X X^T (NumPy, which calls syrk) plus X W^T
     (target <= 1.3x), and
   - the flop floor: (n^2 d + 2 n d m) flops (the syrk triangle and X W^T) at the float64 GEMM
     rate measured in this run (bench/_floors.py).
   Also vs the previous path (a float32 pattern GEMM, kept here only as a comparison; the
   library's route for general output weights is the same GEMM in float64).
2. influence scoring (fused, one pass over B) at T = 1000, n = 10 000, C = 10 vs one streaming
   pass over B at the memory bandwidth measured here: read B, write the scores, by a parallel
   Numba pass on the same threads as the kernel (bench/_floors.py; a one-thread NumPy pass is
   also shown, it is no floor on a multi-core machine). Target <= 1.2x. Also vs the NumPy
   formula and with top-k, the kernel's arithmetic alone (rows that stay in cache), and
   in place (out = B, as loo_influence scores) against an in-place pass over B.

Floor and candidate are timed alternately, so both see the same machine load: relu_ntk in
``--repeat`` rounds (the previous path in ``--repeat`` - 1), scoring in 5 x ``--repeat``
(the NumPy formula in rounds of its own, see below). The table gives the minimum (and the
median) of each. The load average is printed: on a
shared machine, ratios of minima are the meaningful numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np
from _floors import _scale_kernel, gemm_rate, stream_pass


def interleaved(fns: dict, repeat: int, raw: dict | None = None):
    """{name: (min_s, median_s)} timing each callable once per round, rounds alternating.
    A value may be a pair (setup, fn): setup runs untimed before each timing of fn.
    ``raw``, when given, receives every round's time per name (for per-round ratios)."""
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            if isinstance(fn, tuple):
                setup, fn = fn
                setup()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    if raw is not None:
        raw.update(times)
    return {k: (min(v), float(np.median(v))) for k, v in times.items()}


def old_pattern_gemm_path(X, W, out):
    """The pre-kernel relu_ntk: bit-packed rows unpacked per tile, float32 pattern GEMM."""
    from ntkcore.ntk.relu import _relu_ntk_tile, _symmetrize_diagonal_tiles, _unpack
    from ntkcore.ntk.tiling import tiles
    m = W.shape[0]
    bits = np.packbits(X @ W.T > 0, axis=1)
    t = 4096
    for i0, i1 in tiles(X.shape[0], t):
        Si = _unpack(bits[i0:i1], m, np, np.float32)
        for j0, j1 in tiles(X.shape[0], t):
            if j1 <= i0:
                continue
            block = out[i0:i1, j0:j1]
            _relu_ntk_tile(block, X[i0:i1], X[j0:j1], Si, bits[j0:j1], m, np)
            if j0 > i0:
                out[j0:j1, i0:i1] = block.T
    _symmetrize_diagonal_tiles(out, t)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-old", action="store_true", help="skip the slow previous path")
    args = ap.parse_args(argv)

    import numba

    from ntkcore.kernels import influence_scores_fused, influence_topk_fused, relu_ntk_fused

    print(f"# bench_kernels_cpu — {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"host {platform.node()}, {os.cpu_count()} CPUs, numba {numba.__version__} "
          f"({numba.get_num_threads()} threads, layer on first use), numpy {np.__version__}")
    print(f"load average at start: {os.getloadavg()}")
    rng = np.random.default_rng(0)
    n, d, m = args.n, args.d, args.m
    X = rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    W = 0.01 * rng.standard_normal((m, d))
    out = np.empty((n, n))
    relu_ntk_fused(X[:256], W)  # compile or load the Numba cache outside the timings
    rate = gemm_rate(np.float64)
    print(f"float64 GEMM rate (4096^3, best of 3): {rate / 1e9:.1f} GFLOP/s")
    rows = []

    r = interleaved({
        "gram": lambda: np.matmul(X, X.T, out=out),
        "xw": lambda: X @ W.T,
        "fused": lambda: relu_ntk_fused(X, W, out=out),
    }, args.repeat)
    floor = r["gram"][0] + r["xw"][0]
    flop_floor = (n * n * d + 2 * n * d * m) / rate
    rows.append(("relu_ntk fused (ours) / BLAS peer", r["fused"], f"X X^T {r['gram'][0]:.3f} + "
                 f"X W^T {r['xw'][0]:.3f} = {floor:.3f} s", r["fused"][0] / floor, "<= 1.3"))
    rows.append(("relu_ntk fused (ours) / flop floor", r["fused"], f"{n * n * d + 2 * n * d * m:.3g}"
                 f" flop at the GEMM rate = {flop_floor:.3f} s", r["fused"][0] / flop_floor, ""))
    if not args.skip_old:
        r2 = interleaved({"old": lambda: old_pattern_gemm_path(X, W, out),
                          "fused": lambda: relu_ntk_fused(X, W, out=out)}, max(1, args.repeat - 1))
        rows.append(("previous path (float32 pattern GEMM)", r2["old"], "", r2["old"][0] / floor,
                     ""))
        rows.append(("  fused / previous", r2["fused"], f"{r2['old'][0]:.3f} s",
                     r2["fused"][0] / r2["old"][0], "< 1"))

    T, C = args.T, args.C
    B = rng.standard_normal((T, n))
    dinv = rng.random(n) + 0.5
    alpha = rng.standard_normal((n, C))
    R = rng.standard_normal((T, C))
    S = np.ones_like(B)
    influence_scores_fused(B[:2], dinv, alpha, R[:2])
    influence_topk_fused(B[:2], dinv, alpha, R[:2], 10)

    def numpy_scores():
        U = B / dinv[None, :]
        return U * (U * (0.5 * (alpha * alpha).sum(1))[None, :] - R @ alpha.T)

    # The NumPy formula runs in its own rounds: its BLAS GEMM leaves OpenBLAS's threads
    # spinning for a while, which steals the cores from whichever Numba kernel runs next.
    rounds = {}
    r = interleaved({
        "pass": stream_pass(B, S),
        "pass1": lambda: np.multiply(B, 1.0001, out=S),
        "fused": lambda: influence_scores_fused(B, dinv, alpha, R, out=S),
        "topk": lambda: influence_topk_fused(B, dinv, alpha, R, 10),
    }, 5 * args.repeat, raw=rounds)
    r.update(interleaved({"numpy": numpy_scores}, 5 * args.repeat))
    # In place, as loo_influence scores (B is the solve's temporary): against a pass that
    # also writes B over itself. Before each timing B's copy is refilled and then evicted
    # from the caches by a pass over S, so both start from memory.
    Bc = B.copy()
    refill = lambda: (np.copyto(Bc, B), np.multiply(S, 1.0, out=S))  # noqa: E731
    pass_kernel = _scale_kernel()
    inplace_rounds = {}
    r.update(interleaved({
        "pass_inplace": (refill, lambda: pass_kernel(Bc, 1.0001, Bc)),
        "fused_inplace": (refill, lambda: influence_scores_fused(Bc, dinv, alpha, R, out=Bc)),
        "fused_S": (refill, lambda: influence_scores_fused(Bc, dinv, alpha, R, out=S)),
    }, 5 * args.repeat, raw=inplace_rounds))
    inplace_vs_S = np.array(inplace_rounds["fused_inplace"]) / np.array(inplace_rounds["fused_S"])
    # The kernel's arithmetic alone: 64 rows (10 MB with their scores) stay in L2/L3 and are
    # scored again and again by the compiled kernel itself (operands prepared once, as the
    # driver does per call), so memory is out of the picture; scaled to T rows. If this alone
    # is near the pass, the 1.2x target needs compute and streaming to overlap almost fully.
    from ntkcore.kernels.scoring import _cpu_scorer, _prepare
    hot_rows, calls = min(64, T), 100
    Bh, dh, ah, Rh = _prepare(B[:hot_rows].copy(), dinv, alpha, R[:hot_rows], np)
    Sh, score = S[:hot_rows].copy(), _cpu_scorer(dh, ah)
    hot = interleaved({"hot": lambda: [score(Bh, Rh, Sh)
                                       for _ in range(calls)]}, args.repeat)["hot"]
    scale = T / (hot_rows * calls)
    r["hot"] = (hot[0] * scale, hot[1] * scale)
    gbs = 2 * B.nbytes / r["pass"][0] / 1e9
    base = r["pass"][0]
    rows.append((f"influence scores fused T={T} n={n} C={C}", r["fused"],
                 f"one parallel pass over B {base * 1e3:.1f} ms ({gbs:.1f} GB/s)",
                 r["fused"][0] / base, "<= 1.2"))
    # The VM's memory switches between a slow (34-38 GB/s) and a fast (52-67 GB/s) mode from
    # one moment to the next, so a min / min ratio can pair a fast-mode pass with a slow-mode
    # kernel round. The ratio within each round (the pass, then the kernel soon after) does not.
    per_round = np.array(rounds["fused"]) / np.array(rounds["pass"])
    fast = 2 * B.nbytes / np.array(rounds["pass"]) > 45e9  # the pass ran above 45 GB/s
    rows.append((f"  fused / pass, median of the {per_round.size} per-round ratios", r["fused"],
                 "", float(np.median(per_round)), "<= 1.2"))
    rows.append((f"  the same over the {fast.sum()} rounds with fast memory (pass > 45 GB/s)",
                 r["fused"], "", float(np.median(per_round[fast])) if fast.any()
                 else float("nan"), "<= 1.2"))
    rows.append(("  its arithmetic alone (cache-resident rows, scaled to T rows)", r["hot"], "",
                 r["hot"][0] / base, ""))
    # Its flops: the residual dot r_t . alpha_i alone is 2 C per score, the GEMM R alpha^T
    # (T x C by C x n), so at the float64 GEMM rate measured above it takes dot_s however the
    # scores are streamed. Where dot_s passes the memory pass, the kernel is compute-bound and
    # the larger of the two is its floor.
    dot_s = 2.0 * T * n * C / rate
    floor_s = max(base, dot_s)
    rows.append((f"  flop floor: the dots r_t . alpha_i ({2.0 * T * n * C:.3g} flop at the "
                 f"GEMM rate)", (dot_s, dot_s), "", dot_s / base, ""))
    rows.append(("  fused / max(pass over B, flop floor)", r["fused"], f"{floor_s * 1e3:.1f} ms",
                 r["fused"][0] / floor_s, ""))
    rows.append(("  one-thread NumPy pass (np.multiply), not a floor", r["pass1"], "",
                 r["pass1"][0] / base, ""))
    rows.append(("  in place (out = B, as loo_influence scores) / an in-place pass",
                 r["fused_inplace"], f"in-place pass {r['pass_inplace'][0] * 1e3:.1f} ms",
                 r["fused_inplace"][0] / r["pass_inplace"][0], ""))
    rows.append(("  in place / the kernel into a separate S, same rounds (min / min)",
                 r["fused_inplace"], f"into S {r['fused_S'][0] * 1e3:.1f} ms",
                 r["fused_inplace"][0] / r["fused_S"][0], ""))
    rows.append((f"  the same, median of the {inplace_vs_S.size} per-round ratios",
                 r["fused_inplace"], "", float(np.median(inplace_vs_S)), ""))
    rows.append(("  + top-10 helpful/harmful, no T x n buffer", r["topk"], "", r["topk"][0] / base,
                 ""))
    rows.append(("  NumPy formula (3 temporaries + GEMM)", r["numpy"], "", r["numpy"][0] / base, ""))
    print(f"load average at end: {os.getloadavg()}")
    print()
    print("| measurement | min s | median s | floor / peer | ratio (min/min) | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (tmin, tmed), ref, ratio, target in rows:
        print(f"| {name} | {tmin:.4f} | {tmed:.4f} | {ref} | {ratio:.2f} | {target} |")


if __name__ == "__main__":
    main()
