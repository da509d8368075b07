"""Agreement of two `ntkcore influence` runs' scores (e.g. an approximation against exact).

    python bench/compare_runs.py RUN_A/influence.npz RUN_B/influence.npz [--tau 0.1]

Both runs must score the same test points against the same training points (equal
train_indices and test_indices). Prints, for A against B as the reference: Spearman's rho per
test point (mean) and over all pairs, overlap of the top-tau sets, the flip rate of B's top-tau
set in A, and the relative difference of the kernel predictions (bench_approx's metrics).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_approx import score_agreement  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b", help="the reference run")
    ap.add_argument("--tau", type=float, default=0.1)
    args = ap.parse_args(argv)
    A, B = np.load(args.a), np.load(args.b)
    for key in ("train_indices", "test_indices"):
        if not np.array_equal(A[key], B[key]):
            raise SystemExit(f"error: the runs differ in {key}; they score different points")
    out = score_agreement(A["scores"].astype(np.float64), B["scores"].astype(np.float64),
                          tau=args.tau)
    pa, pb = A["kernel_predictions"], B["kernel_predictions"]
    out["pred_err"] = float(np.linalg.norm(pa - pb) / np.linalg.norm(pb))
    print(f"{args.a} vs {args.b}: T={B['scores'].shape[0]} n={B['scores'].shape[1]}")
    for k, v in out.items():
        print(f"  {k}: {v:.4g}")
    return out


if __name__ == "__main__":
    main()
