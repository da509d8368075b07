"""CPU benchmark for the foundation (issue 2): ratios measured in one run on the same data.

1. relu_ntk(X, W) at n, d, m against
   - the BLAS peer of issue 2/3: X @ X.T (NumPy calls syrk) + X @ W.T, timed on the same X, W;
   - the flop floor: n^2 d + 2 n d m flops at the float64 GEMM rate measured in this run.
2. exact LOO influence (loo_influence, solver="exact", T test rows, C classes), with the A.8
   checks (the default) and without, against
   - the SciPy peer of issue 2 on the same matrices: cho_factor + triangular inverse (dtrtri)
     + cho_solve with the T test columns (the LAPACK work the method needs, no bookkeeping);
   - the flop floor: n^3/3 (Cholesky) + n^3/3 (triangular inverse) + 2 T n^2 (K_test A^-1 by
     two triangular multiplies) + 2 n^2 C (alpha) at the measured GEMM rate.

Every candidate and its peer are timed in alternating rounds (``--repeat``), best of each, so
both see the same machine load; the GEMM rate is measured before and after (the higher one
gives the stricter floor).

Usage:  python bench/bench_cpu.py [--n 10000 --d 784 --m 1024 --T 1000 --C 10 --repeat 3]
Prints a markdown table (paste into bench/RESULTS.md with the machine and date).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime

import numpy as np
import scipy.linalg as sla
from scipy.linalg import lapack

import ntkcore as nc
from _floors import gemm_rate
from _problems import influence_problem


def interleaved(fns: dict, repeat: int) -> dict:
    """{name: best seconds}, each callable once per round, rounds alternating."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--d", type=int, default=784)
    ap.add_argument("--m", type=int, default=1024)
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--lam", type=float, default=1e-3)
    args = ap.parse_args()
    n, d, m, T, C = args.n, args.d, args.m, args.T, args.C
    print(f"machine: {platform.node()} {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}; load average {os.getloadavg()}")
    print(f"date: {datetime.now().isoformat(timespec='minutes')}  command: python "
          f"bench/bench_cpu.py --n {n} --d {d} --m {m} --T {T} --C {C} --repeat {args.repeat}")
    rate0 = gemm_rate(np.float64)
    X, Xt, W, Y, Yt = influence_problem(np, n, T, C, d, m, seed=0)
    nc.relu_ntk(X[:256], W)  # compile or load the Numba kernels outside the timings

    # 1. eNTK assembly
    t = interleaved({"peer": lambda: (X @ X.T, X @ W.T), "ours": lambda: nc.relu_ntk(X, W)},
                    args.repeat)
    ntk_flops = n * n * d + 2 * n * d * m

    # 2. exact influence on the same matrices
    K = nc.relu_ntk(X, W)
    Kt = nc.relu_ntk(Xt, W, X)

    def scipy_peer():
        A = K + args.lam * np.eye(n)
        c, low = sla.cho_factor(A, lower=True, overwrite_a=True, check_finite=False)
        Linv, _ = lapack.dtrtri(c, lower=1)
        sla.cho_solve((c, low), np.hstack([Y, Kt.T]), check_finite=False)
        return Linv

    fastest = {}  # check -> (seconds, result) of its fastest run
    small = slice(0, min(n, 256))  # compile or load loo_influence's kernels outside the timings
    nc.loo_influence(K[small, small], Y[small], Kt[:, small], Yt, lam=args.lam, solver="exact")

    def ours(check):
        def run():
            t0 = time.perf_counter()
            r = nc.loo_influence(K, Y, Kt, Yt, lam=args.lam, solver="exact", check=check)
            s = time.perf_counter() - t0
            if s < fastest.get(check, (float("inf"),))[0]:
                fastest[check] = (s, r)
        return run

    ti = interleaved({"peer": scipy_peer, "ours": ours(True), "ours_nocheck": ours(False)},
                     args.repeat)
    inf_flops = 2 * n ** 3 / 3 + 2 * T * n * n + 2 * n * n * C
    rate = max(rate0, gemm_rate(np.float64))
    print(f"float64 GEMM rate (4096^3): {rate0 / 1e9:.1f} GFLOP/s before, "
          f"{rate / 1e9:.1f} best; load average {os.getloadavg()}")
    print()
    print("| measurement | ours (s) | peer | peer (s) | ours / peer | flop floor (s) "
          "| ours / floor |")
    print("|---|---|---|---|---|---|---|")
    rows = [(f"relu_ntk n={n} d={d} m={m}", t["ours"], "X X^T (syrk) + X W^T", t["peer"],
             ntk_flops),
            (f"loo_influence exact n={n} T={T} C={C}, A.8 checks on", ti["ours"],
             "SciPy cho_factor + dtrtri + cho_solve", ti["peer"], inf_flops),
            ("  same, check=False", ti["ours_nocheck"], "same", ti["peer"], inf_flops)]
    for name, ours_t, peer, peer_t, flops in rows:
        floor = flops / rate
        print(f"| {name} | {ours_t:.2f} | {peer} | {peer_t:.2f} | {ours_t / peer_t:.2f}x "
              f"| {floor:.2f} ({flops:.3g} flop) | {ours_t / floor:.2f}x |")
    print()
    res = fastest[True][1]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items())
    print(f"influence stages (s, fastest run with checks): {stages}")
    print(f"A.8 checks: {res.diagnostics['checks']}")


if __name__ == "__main__":
    main()
