"""CPU benchmark for the foundation (issue 2): ratios measured in one run on the same data.

1. relu_ntk(X, W) at n, d, m  vs  its BLAS floor: X @ X.T + X @ W.T (the two products it
   cannot avoid), timed on the same X, W.
2. exact LOO influence (loo_influence, solver="exact", T test rows, C classes)  vs  the SciPy
   floor on the same matrices: cho_factor + triangular inverse (dtrtri) + cho_solve with the
   T test columns — the LAPACK work the exact method needs, without our bookkeeping.

Usage:  python bench/bench_cpu.py [--n 10000 --d 784 --m 1024 --T 1000 --C 10 --repeat 3]
Prints a markdown table (paste into bench/RESULTS.md with the machine and date).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date

import numpy as np
import scipy.linalg as sla
from scipy.linalg import lapack

import ntkcore as nc
from _problems import influence_problem


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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
    X, Xt, W, Y, Yt = influence_problem(np, n, T, C, d, m, seed=0)

    rows = []
    # 1. eNTK assembly vs BLAS floor
    t_floor = best_of(lambda: (X @ X.T, X @ W.T), args.repeat)
    t_ntk = best_of(lambda: nc.relu_ntk(X, W), args.repeat)
    rows.append((f"relu_ntk n={n} d={d} m={m}", t_ntk, "X X^T + X W^T (BLAS)", t_floor))

    # 2. exact influence vs SciPy floor on the same matrices
    K = nc.relu_ntk(X, W)
    Kt = nc.relu_ntk(Xt, W, X)

    def scipy_floor():
        A = K + args.lam * np.eye(n)
        c, low = sla.cho_factor(A, lower=True, overwrite_a=True, check_finite=False)
        Linv, _ = lapack.dtrtri(c, lower=1)
        sla.cho_solve((c, low), np.hstack([Y, Kt.T]), check_finite=False)
        return Linv

    t_scipy = best_of(scipy_floor, args.repeat)
    runs = []

    def ours():
        t0 = time.perf_counter()
        r = nc.loo_influence(K, Y, Kt, Yt, lam=args.lam, solver="exact")
        runs.append((time.perf_counter() - t0, r))

    t_ours = best_of(ours, args.repeat)
    res = min(runs, key=lambda tr: tr[0])[1]  # stage timings of the fastest run
    rows.append((f"loo_influence exact n={n} T={T} C={C}", t_ours,
                 "SciPy cho_factor + dtrtri + cho_solve", t_scipy))

    print(f"machine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"date: {date.today().isoformat()}  command: python bench/bench_cpu.py "
          f"--n {n} --d {d} --m {m} --T {T} --C {C} --repeat {args.repeat}")
    print()
    print("| measurement | ours (s) | floor / peer | floor (s) | ours / floor |")
    print("|---|---|---|---|---|")
    for name, ours_t, peer, peer_t in rows:
        print(f"| {name} | {ours_t:.2f} | {peer} | {peer_t:.2f} | {ours_t / peer_t:.2f}x |")
    print()
    stages = ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items())
    print(f"influence stages (s, fastest run): {stages}")
    print(f"A.8 checks: {res.diagnostics['checks']}")


if __name__ == "__main__":
    main()
