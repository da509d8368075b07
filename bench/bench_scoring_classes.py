"""CPU scoring per class count C: the tile kernel against one pass over B and its flop floor.

    PYTHONPATH=. python3 bench/bench_scoring_classes.py [--C 1 2 10 16 24 32 64] [--repeat 8]

For each class count C, on T = 1000 test rows and n = 10 000 columns, times (interleaved, min
of ``--repeat`` rounds) :func:`ntkcore.kernels.numba_tile.score_rows` and one parallel
streaming pass over B (bench/_floors.py). It prints the kernel as a ratio to the pass and to
its flop floor: (C + 2) multiply-adds per score at the float64 GEMM rate measured in this run.
Whichever floor is larger bounds the kernel. The pass bounds it at small C; the arithmetic
does from about C = 10 on this 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import os

import numpy as np
from _floors import gemm_rate, stream_pass
from bench_kernels_cpu import interleaved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--C", type=int, nargs="+", default=[1, 2, 10, 16, 24, 32, 64])
    ap.add_argument("--repeat", type=int, default=8)
    args = ap.parse_args(argv)

    from ntkcore.kernels.numba_tile import pack_operands, score_rows
    from ntkcore.kernels.scoring import _prepare

    print(f"# bench_scoring_classes — {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"load average at start: {os.getloadavg()}")
    rate = gemm_rate(np.float64)
    print(f"float64 GEMM rate (4096^3, best of 3): {rate / 1e9:.1f} GFLOP/s")
    print("\n| C | pass ms | kernel ms | kernel / pass | flop floor ms | kernel / flop floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    T, n = args.T, args.n
    B = rng.standard_normal((T, n))
    S = np.empty_like(B)
    dinv = rng.random(n) + 0.5
    for C in args.C:
        alpha = rng.standard_normal((n, C))
        R = rng.standard_normal((T, C))
        Bp, dp, ap, Rp = _prepare(B, dinv, alpha, R, np)
        g, blocks = pack_operands(dp, ap)
        score_rows(Bp[:8], g, blocks, Rp[:8], S[:8])  # compile or load outside the timings
        r = interleaved({"pass": stream_pass(B, S),
                         "kernel": lambda Bp=Bp, g=g, blocks=blocks, Rp=Rp: score_rows(
                             Bp, g, blocks, Rp, S)}, args.repeat)
        base, kernel = r["pass"][0], r["kernel"][0]
        flops = 2.0 * T * n * (C + 2) / rate
        print(f"| {C} | {base * 1e3:.2f} | {kernel * 1e3:.2f} | {kernel / base:.2f} | "
              f"{flops * 1e3:.2f} | {kernel / flops:.2f} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
