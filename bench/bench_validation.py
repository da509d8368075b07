"""CPU benchmark of the boundary check of a kernel matrix K (finite, square, symmetric).

    PYTHONPATH=. python3 bench/bench_validation.py [--n 4000 10000] [--repeat 3]

For a symmetric float64 (n, n) K, timed in alternating rounds (the table gives min and median):

- old: the two-step check loo_influence ran before: ``as_float_matrix`` (a blocked
  ``isfinite`` pass) then ``check_square_symmetric`` (||K||_F, then ||K - K^T||_F over upper
  tiles with temporaries);
- new: ``check_kernel_matrix`` (one ``square_matrix_stats`` pass, Numba, all threads);
- kernel: ``square_matrix_stats`` alone;
- floors: one streaming read of K by NumPy's ``K.sum()`` (one thread), and by a parallel
  Numba sum of squares on the same threads as the kernel (the fair floor for it).

The load average is printed: on a shared machine, ratios of minima are the meaningful numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np


def interleaved(fns: dict, repeat: int, pause: float = 0.25):
    """{name: (min_s, median_s)} timing each callable once per round, rounds alternating.

    ``pause`` seconds of sleep before each timing: OpenBLAS threads left spinning by the old
    check's ``np.linalg.norm`` slowed the Numba kernel timed right after it by ~1.5x."""
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            time.sleep(pause)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (min(v), float(np.median(v))) for k, v in times.items()}


def _parallel_read():
    """A parallel streaming read of K (sum of squares by rows, all threads): the floor."""
    import numba

    @numba.njit(parallel=True, fastmath={"reassoc"})  # a floor, not library code
    def sum_squares(K):
        total = 0.0
        for i in numba.prange(K.shape[0]):
            s = 0.0
            for j in range(K.shape[1]):
                s += K[i, j] * K[i, j]
            total += s
        return total
    return sum_squares


def run(n: int, repeat: int) -> dict:
    from ntkcore._validate import (
        as_float_matrix,
        check_kernel_matrix,
        check_square_symmetric,
    )
    from ntkcore.kernels import square_matrix_stats

    rng = np.random.default_rng(0)
    K = rng.standard_normal((n, n))
    K += K.T
    read = _parallel_read()

    def old():
        A = as_float_matrix(K, "K", dtype=np.float64)
        return check_square_symmetric(A, "K")

    def new():
        return check_kernel_matrix(K, "K", dtype=np.float64)[1]

    fns = {"old two-step": old,
           "old: as_float_matrix (finite)": lambda: as_float_matrix(K, "K", dtype=np.float64),
           "old: check_square_symmetric": lambda: check_square_symmetric(K, "K"),
           "new one pass": new,
           "square_matrix_stats": lambda: square_matrix_stats(K),
           "K.sum() (1 thread)": K.sum, "parallel read (Numba)": lambda: read(K)}
    for fn in fns.values():  # compile / load the kernels outside the timings
        fn()
    assert old() == new() == 0.0
    return interleaved(fns, repeat)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4000, 10000])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import numba
    now = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"{now}  {platform.processor() or platform.machine()}  cores {os.cpu_count()}"
          f"  numba threads {numba.get_num_threads()}  "
          f"NumPy {np.__version__}  Numba {numba.__version__}")
    for n in args.n:
        load0 = os.getloadavg()[0]
        res = run(n, args.repeat)
        load1 = os.getloadavg()[0]
        ref = res["K.sum() (1 thread)"][0]
        par = res["parallel read (Numba)"][0]
        print(f"\nn = {n} ({n * n * 8 / 1e6:.0f} MB), load average {load0:.2f} -> {load1:.2f}")
        print("| measurement | min (s) | median (s) | / K.sum() | / parallel read |")
        print("| --- | --- | --- | --- | --- |")
        for k, (lo, med) in res.items():
            print(f"| {k} | {lo:.4f} | {med:.4f} | {lo / ref:.2f} | {lo / par:.2f} |")
        print(f"old / new: {res['old two-step'][0] / res['new one pass'][0]:.1f}x")


if __name__ == "__main__":
    main()
