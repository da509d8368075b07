"""Where the per-C CPU scoring kernel stops paying: specialised vs generic kernel per class count.

    PYTHONPATH=. python3 bench/bench_scoring_classes.py [--C 2 10 16 24 26 32] [--repeat 8]

For each class count C, on T = 1000 test rows and n = 10 000 columns, times (interleaved, min
of ``--repeat`` rounds) the generated kernel of :mod:`ntkcore.kernels.numba_scoring`, the
generic :func:`ntkcore.kernels.numba_kernels.influence_rows`, and one parallel streaming pass
over B (bench/_floors.py), and prints both kernels as ratios to the pass.
``numba_scoring.MAX_SPECIALISED_C`` is the largest C where the specialised kernel wins.
"""

from __future__ import annotations

import argparse
import datetime
import os

import numpy as np
from _floors import stream_pass
from bench_kernels_cpu import interleaved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--C", type=int, nargs="+", default=[2, 10, 16, 20, 24, 26, 32])
    ap.add_argument("--repeat", type=int, default=8)
    args = ap.parse_args(argv)

    from ntkcore.kernels import numba_kernels as nk
    from ntkcore.kernels.numba_scoring import MAX_SPECIALISED_C, pack_operands, scoring_kernel
    from ntkcore.kernels.scoring import _prepare, _transposed_operands

    print(f"# bench_scoring_classes — {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"load average at start: {os.getloadavg()}; MAX_SPECIALISED_C = {MAX_SPECIALISED_C}")
    print("\n| C | pass ms | specialised / pass | generic / pass | faster |")
    print("| --- | --- | --- | --- | --- |")
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
        half_sq, alphaT = _transposed_operands(ap, np)
        kern = scoring_kernel(C)
        kern(Bp[:8], g, blocks, Rp[:8], S[:8])  # compile or load outside the timings
        nk.influence_rows(Bp[:8], dp, half_sq, alphaT, Rp[:8], S[:8])
        r = interleaved({"pass": stream_pass(B, S),
                         "specialised": lambda: kern(Bp, g, blocks, Rp, S),
                         "generic": lambda: nk.influence_rows(Bp, dp, half_sq, alphaT, Rp, S)},
                        args.repeat)
        base = r["pass"][0]
        spec, gen = r["specialised"][0] / base, r["generic"][0] / base
        print(f"| {C} | {base * 1e3:.2f} | {spec:.2f} | {gen:.2f} | "
              f"{'specialised' if spec < gen else 'generic'} |", flush=True)
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
