"""relu_ntk assembled into host memory (issue 3, memory planning) vs the device-to-host floor.

    PYTHONPATH=. python bench/bench_host_assembly.py [--n 80000] [--d 3072] [--m 1024]
                                                      [--json out.json]

On one GPU it times, in this order:

1. the floors: one device array of --copy-mb MiB copied into pinned host memory (``get(out=)``,
   best of 3; the device-to-host link), and a parallel host copy of the same bytes from pinned
   into pageable memory (``numba_kernels.copy_into``, best of 3; the drain of each panel);
2. host assembly: ``relu_ntk(X, W, out=numpy.empty((n, n)))`` at --n (lowered to what half the
   available host memory holds), symmetric, twice: into a fresh ``out`` (page faults
   included, as a first call pays them) and again into the same one. Reported: seconds, the
   bytes the panels copy device-to-host (the upper panels only: about n (n + t) / 2 x 8) over
   the time in GB/s, and time / floor, floor = those bytes / the pinned copy bandwidth; and the
   host mirror alone (``mirror_upper`` on the result);
3. device assembly: ``relu_ntk(X, W)`` into device memory at --device-n (default: the largest
   n whose n x n float64 output fits the device's free memory with the tiles' room, capped at
   --n), median of 3 after a warm-up; reported as seconds and entries per second beside the
   host run's.

Under the CUDA simulator (tests/simgpu) it runs at toy sizes as a test of its code path; its
timings mean nothing and it says SIMULATED. No GPU number is claimed from a run that did not
happen: the numbers come only from running this script on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

import ntkcore as nc
from ntkcore.backend import Backend, gpu_available, host_available_bytes


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def floors(cp, be: Backend, nbytes: int) -> dict:
    """Pinned device-to-host and parallel host copy bandwidths (bytes/s) over ``nbytes``."""
    from ntkcore.kernels import numba_kernels as nk
    cols = 1 << 16
    rows = max(1, nbytes // (8 * cols))
    dev = cp.zeros((rows, cols))
    pinned = be.empty_pinned((rows, cols))
    pageable = np.empty((rows, cols))
    dev.get(out=pinned)  # warm: the pinned pool, the copy path
    nk.copy_into(pinned, pageable, 0, 0)  # compile or load the Numba cache
    d2h = best_of(lambda: dev.get(out=pinned))
    host = best_of(lambda: nk.copy_into(pinned, pageable, 0, 0))
    return {"bytes": dev.nbytes, "pinned_d2h_Bps": dev.nbytes / d2h,
            "host_copy_Bps": dev.nbytes / host}


def panel_bytes(n: int, rows: int) -> int:
    """Bytes the symmetric host assembly copies device-to-host: panel k covers columns >= i0."""
    return sum(8 * (min(n, i0 + rows) - i0) * (n - i0) for i0 in range(0, n, rows))


def host_assembly(cp, be: Backend, n: int, d: int, m: int, floor_Bps: float) -> dict:
    from ntkcore.kernels import host_panels
    from ntkcore.kernels import numba_kernels as nk
    rng = cp.random.default_rng(0)
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((m, d))
    seen = {}
    plan = host_panels.plan_rows

    def spy(*args, **kwargs):  # record the panel rows the planner chose
        seen["rows"] = plan(*args, **kwargs)
        return seen["rows"]
    host_panels.plan_rows = spy
    try:
        small = min(n, 512)
        nc.relu_ntk(X[:small], W, out=np.empty((small, small)))  # compile / warm, untimed
        out = np.empty((n, n))
        t0 = time.perf_counter()
        nc.relu_ntk(X, W, out=out)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        nc.relu_ntk(X, W, out=out)
        warm = time.perf_counter() - t0
    finally:
        host_panels.plan_rows = plan
    pairs = nk.tile_pairs(n, n, host_panels.MIRROR_TILE, True)
    mirror = best_of(lambda: nk.mirror_upper(out, pairs), 1)
    moved = panel_bytes(n, seen["rows"])
    floor = moved / floor_Bps
    return {"n": n, "d": d, "m": m, "panel_rows": seen["rows"], "d2h_bytes": moved,
            "time_cold": cold, "time_warm": warm, "time_mirror": mirror,
            "d2h_GBps_cold": moved / cold / 1e9, "d2h_GBps_warm": moved / warm / 1e9,
            "floor_s": floor, "ratio_cold": cold / floor, "ratio_warm": warm / floor,
            "entries_per_s_warm": n * n / warm}


def device_n_fit(be: Backend, d: int, cap: int) -> int:
    """Largest n whose n x n float64 output plus X (n x d) fits in 75 % of free memory (the
    output check allows 80 %; the rest is the tiles' room)."""
    free = 0.75 * be.free_memory_bytes()
    n = int((-8 * d + math.sqrt(64 * d * d + 32 * free)) / 16)
    return max(1, min(cap, n))


def device_assembly(cp, be: Backend, n: int, d: int, m: int) -> dict:
    rng = cp.random.default_rng(1)
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((m, d))
    nc.relu_ntk(X[:min(n, 512)], W)  # warm
    times = []
    for _ in range(3):
        be.synchronize()
        t0 = time.perf_counter()
        K = nc.relu_ntk(X, W)
        be.synchronize()
        times.append(time.perf_counter() - t0)
        del K
    t = float(np.median(times))
    return {"n": n, "time": t, "entries_per_s": n * n / t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=80_000, help="host assembly rows (n x n output)")
    p.add_argument("--d", type=int, default=3072)
    p.add_argument("--m", type=int, default=1024)
    p.add_argument("--device-n", type=int, default=None,
                   help="device assembly rows (default: the largest that fits, <= --n)")
    p.add_argument("--copy-mb", type=int, default=1024, help="bytes of the copy floors, MiB")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if not gpu_available():
        raise SystemExit("needs CuPy and a CUDA GPU (owed: not run on this machine)")
    be = Backend("cuda")
    cp = be.xp
    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    simulated = "simulated" in name
    host_n = int(min(args.n, math.sqrt(0.5 * host_available_bytes() / 8)))
    print(f"device: {name}{'  -- SIMULATED: timings mean nothing' if simulated else ''}")
    fl = floors(cp, be, args.copy_mb << 20)
    print(f"floors over {fl['bytes'] / 1e9:.2f} GB: pinned device->host "
          f"{fl['pinned_d2h_Bps'] / 1e9:.1f} GB/s, parallel host copy "
          f"{fl['host_copy_Bps'] / 1e9:.1f} GB/s", flush=True)
    host = host_assembly(cp, be, host_n, args.d, args.m, fl["pinned_d2h_Bps"])
    print(f"host assembly n={host_n} (requested {args.n}), panels of {host['panel_rows']} "
          f"rows: {host['time_cold']:.2f} s into a fresh out, {host['time_warm']:.2f} s again; "
          f"{host['d2h_bytes'] / 1e9:.1f} GB device->host at {host['d2h_GBps_cold']:.1f} / "
          f"{host['d2h_GBps_warm']:.1f} GB/s = {host['ratio_cold']:.2f}x / "
          f"{host['ratio_warm']:.2f}x the pinned-copy floor ({host['floor_s']:.2f} s); "
          f"host mirror alone {host['time_mirror']:.2f} s", flush=True)
    dn = args.device_n or device_n_fit(be, args.d, args.n)
    dev = device_assembly(cp, be, dn, args.d, args.m)
    print(f"device assembly n={dn}: {dev['time']:.3f} s, "
          f"{dev['entries_per_s'] / 1e9:.2f} G entries/s (host assembly: "
          f"{host['entries_per_s_warm'] / 1e9:.2f} G entries/s)", flush=True)
    result = {"device": name, "simulated": simulated, "cupy": cp.__version__, "floors": fl,
              "host": host, "device_assembly": dev}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
