"""Exact LOO influence in packed storage against its flop floor and the dense exact path.

Fashion-MNIST (Debian files), 10 classes, n training x T test images, inputs preprocessed as
the models see them, kernel = closed-form eNTK of the width-m two-layer ReLU net with W at
initialisation (the setting of bench_approx.py), lam = 1e-3, check=True (A.8 checks on).

Measured in one run:

- packed: ``loo_influence(op, ..., solver="exact", storage="packed")`` wall time, stage times
  and peak RSS growth;
- floor: the float64 flops it cannot avoid, at the DGEMM rate measured here: the lower
  triangle of X X^T (n^2 / 2 dot products of 2 d flops: n^2 d), Cholesky n^3 / 3, solves 2 n^2 (T + C), the columns of
  L^-1 for diag(A^-1) n^3 / 3. The pattern counts (popcount, integer work) are not counted,
  so the floor is a little low;
- ``--dense``: the dense exact path on the same data (needs 16 n^2 bytes), and the largest
  difference of the scores;
- ``--nystrom-ranks``: Nystrom influence at those ranks scored against the packed exact
  result with bench_approx's metrics (Spearman, top-10 % overlap, flip rate).
- ``--fast PRECISION:PROBES,...``: the packed solver's opt-in approximations (``float32``
  panels and/or diag(A^-1) from PROBES Gaussian probes; empty PROBES = exact diagonal), run
  *before* the exact one (a fresh process, nothing else resident) and scored against it with
  the same metrics; floor = (n^2 d + n^3 / 3 + 2 n^2 (T + C) + PROBES n^2, or n^3 / 3 for
  the exact diagonal) flops at the GEMM rate of their precision measured here.

    python bench/bench_packed.py --n 10000 --dense
    python bench/bench_packed.py --n 60000 --nystrom-ranks 4000   # all of Fashion-MNIST
    python bench/bench_packed.py --n 60000 --fast float32:1024     # the 10-minute setting
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _floors import gemm_rate  # noqa: E402
from bench_approx import add_problem_args, init_w, load, metrics, run  # noqa: E402

from ntkcore.solvers.operator import ReluNTKOperator  # noqa: E402


def _fast_configs(text):
    """"float32:1024,float64:" -> [("float32", 1024), ("float64", None)]."""
    out = []
    for item in filter(None, text.split(",")):
        precision, _, probes = item.partition(":")
        out.append((precision, int(probes) if probes else None))
    return out


def rss_gib(field="VmHWM:"):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_problem_args(p)
    p.add_argument("--dense", action="store_true", help="also run the dense exact path")
    p.add_argument("--nystrom-ranks", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[])
    p.add_argument("--fast", type=_fast_configs, default=[],
                   help="comma-separated PRECISION:PROBES, e.g. float32:1024,float64:1024")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = {"machine": f"{platform.node()} {os.cpu_count()} CPUs", "argv": sys.argv[1:],
           "date": time.strftime("%Y-%m-%d %H:%M")}
    r64 = gemm_rate(np.float64)
    print(f"DGEMM rate: {r64 / 1e9:.1f} GFLOP/s (4096^3, best of 3)")
    r32 = gemm_rate(np.float32) if args.fast else None
    if r32:
        print(f"SGEMM rate: {r32 / 1e9:.1f} GFLOP/s (4096^3, best of 3)")
    X, Xt, Y, Yt = load(args.n, args.n_test)
    n, d = X.shape
    T, C, m = Xt.shape[0], Y.shape[1], args.width
    W = init_w(d, m)
    op = ReluNTKOperator(X, W)
    t0 = time.perf_counter()
    Kt = op.cross(Xt)
    t_kt = time.perf_counter() - t0
    fast = []
    for precision, probes in args.fast:
        rss0 = rss_gib("VmRSS:")
        approx, t_fast = run(f"{precision}:{probes}", op, Y, Kt, Yt, args.lam, solver="exact",
                             precision=precision, diag_probes=probes)
        flops = n * n * d + n ** 3 / 3 + 2 * n * n * (T + C) + (
            n ** 3 / 3 if probes is None else probes * n * n)
        rate = r32 if precision == "float32" else r64
        fast.append((approx, {"config": approx.solver, "time": t_fast,
                              "floor_s": flops / rate, "ratio_floor": t_fast * rate / flops,
                              "rss_growth_gib": rss_gib() - rss0, "stages": approx.timings,
                              "checks": approx.diagnostics.get("checks"),
                              "diag_stderr": approx.diagnostics.get(
                                  "diag_inv_rel_stderr_median")}))
        print(f"{approx.solver}: {t_fast:.1f} s, floor {flops / rate:.1f} s -> "
              f"{t_fast * rate / flops:.2f}x; stages "
              + ", ".join(f"{k} {v:.1f}" for k, v in approx.timings.items()), flush=True)
    rss0 = rss_gib("VmRSS:")
    res, t_packed = run("packed", op, Y, Kt, Yt, args.lam, solver="exact", storage="packed")
    growth = rss_gib() - rss0
    f64 = n * n * d + n ** 3 / 3 + 2 * n * n * (T + C) + n ** 3 / 3
    floor = f64 / r64
    out.update({"n": n, "T": T, "C": C, "d": d, "m": m, "gflops64": r64 / 1e9,
                "time_K_test": t_kt, "time_packed": t_packed,
                "floor_s": floor, "ratio_floor": t_packed / floor, "rss_growth_gib": growth,
                "stages": res.timings, "checks": res.diagnostics.get("checks"),
                "solver_reason": res.diagnostics.get("solver_reason")})
    print(f"packed exact n={n} T={T}: {t_packed:.1f} s (K_test {t_kt:.1f} s apart), floor "
          f"{floor:.1f} s ({f64:.2e} flop) -> {t_packed / floor:.2f}x; "
          f"peak RSS growth {growth:.2f} GiB; stages "
          + ", ".join(f"{k} {v:.1f}" for k, v in res.timings.items())
          + f"; A.8 {res.diagnostics.get('checks')}", flush=True)
    if args.dense:
        dense, t_dense = run("dense", op, Y, Kt, Yt, args.lam, solver="exact", storage="dense")
        diff = float(np.abs(dense.scores - res.scores).max() / np.abs(dense.scores).max())
        out.update({"time_dense": t_dense, "packed_over_dense": t_packed / t_dense,
                    "max_rel_diff": diff})
        print(f"dense exact: {t_dense:.1f} s; packed / dense {t_packed / t_dense:.2f}; "
              f"max |scores diff| / max |score| {diff:.1e}", flush=True)
        del dense
    for approx, row in fast:
        row.update(metrics(approx, res), time_over_exact=row["time"] / t_packed)
        print(f"{row['config']} against exact: " + ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    out["fast"] = [row for _, row in fast]
    del fast
    rows = []
    for r in args.nystrom_ranks:
        approx, t_ny = run(f"nystrom {r}", op, Y, Kt, Yt, args.lam, solver="nystrom", rank=r,
                           landmarks="rpcholesky")
        row = {"rank": r, "time": t_ny, **metrics(approx, res)}
        rows.append(row)
        print(f"nystrom r={r}: {t_ny:.1f} s; " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                         row.items()), flush=True)
    out["nystrom"] = rows
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
