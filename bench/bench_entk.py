"""empirical_ntk against the plain torch.func route (jacrev + vmap, then contraction).

The plain route is the PyTorch NTK tutorial's: per-example Jacobians of every parameter,
``vmap(jacrev(f))``, then sum over parameters of einsum('naf,maf->nm') (trace over outputs,
the kernel ridge regression uses). It holds an n x C x P Jacobian.

Models (float32 unless --dtype float64; C = 10 outputs):
  mlp        784-256-256-256-10 MLP with biases (ReLU)
  cnn        conv(1->16,3) pool conv(16->32,3) pool fc(1568->128) fc(128->10), 28x28 inputs
  two-layer  ntkcore.nn.models.TwoLayerNet(d=784, width=512): f = relu(x W^T) a / sqrt(m)

Every measurement runs in a fresh process (``--worker``) that warms up on a few rows, resets
the peak-RSS mark (/proc/self/clear_refs) and reports wall time and peak RSS growth (with
``--device cuda``: torch's peak device allocation instead). Ratios
(plain / ours) come from the same invocation on the same inputs. The answer difference is
max |K_ours - K_plain| / max |K_plain|. There is no flop floor here: a generic model's eNTK
flops depend on its layers and on the strategy chosen per parameter group (each run's
EntkReport estimates them), so the comparison is with the obvious alternative only; the
GEMM rate in the header is printed for scale.

Usage:
  python bench/bench_entk.py                                  # equal-n table (n=256)
  python bench/bench_entk.py --n 512 --repeat 3
  python bench/bench_entk.py --models cnn --n 512
  python bench/bench_entk.py --nmax --budget-gb 2             # largest n within 2 GiB
  python bench/bench_entk.py --models cnn --ours-only --n 10000 --budget-gb 24
  python bench/bench_entk.py --device cuda --n 1024 --repeat 3        # GPU
Prints markdown (paste into bench/RESULTS.md with machine and date).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date

import numpy as np

MODELS = ("mlp", "cnn", "two-layer")


def build(name, n, seed=0):
    """(model in eval mode, inputs X (n, ...)) for a benchmark model."""
    import torch
    from torch import nn
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        X = torch.randn(n, 784, generator=g)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(1568, 128), nn.ReLU(), nn.Linear(128, 10))
        X = torch.randn(n, 1, 28, 28, generator=g)
    elif name == "two-layer":
        from ntkcore.nn.models import TwoLayerNet
        model = TwoLayerNet(784, 512, 10, kappa=1.0)
        X = torch.randn(n, 784, generator=g)
        X /= X.norm(dim=1, keepdim=True)
    else:
        raise SystemExit(f"unknown model {name!r}; expected one of {MODELS}")
    return model.eval(), X


def plain_entk(model, X):
    """The tutorial route: per-example Jacobians of all parameters, then contraction."""
    import torch
    from torch.func import functional_call, jacrev, vmap
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def f(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    with torch.no_grad():
        J = vmap(jacrev(f), (None, 0))(params, X)
        return sum(torch.einsum("naf,maf->nm", j.flatten(2), j.flatten(2))
                   for j in J.values())


def _rss(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def worker(spec):
    """Run one measurement in this (fresh) process; print a JSON line."""
    import torch
    from ntkcore.ntk.empirical import empirical_ntk
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    model, X = build(spec["model"], spec["n"])
    dt = torch.float64 if spec["dtype"] == "float64" else torch.float32
    dev = torch.device(spec.get("device") or "cpu")
    model, X = model.to(device=dev, dtype=dt), X.to(device=dev, dtype=dt)
    budget = spec.get("budget")
    cuda = dev.type == "cuda"

    def run(rows):
        if spec["method"] == "plain":
            out = plain_entk(model, rows), None
        else:
            out = empirical_ntk(model, rows, memory_budget=budget, return_report=True)
        if cuda:
            torch.cuda.synchronize()
        return out

    run(X[:8])  # warm-up: imports, thread pools, first-call allocations
    if cuda:  # peak = torch's allocations on the device
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # peak = process RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _rss("VmRSS:")
    t0 = time.perf_counter()
    K, rep = run(X)
    sec = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM:")) - base
    out = dict(seconds=sec, peak_growth=peak, n=spec["n"],
               params=sum(p.numel() for p in model.parameters()))
    if rep is not None:
        out["groups"] = [f"{g['name']}:{g['strategy']}/{g['method']}" for g in rep.groups]
        out["blocks"] = {k: rep.blocks[k] for k in ("panel", "stream")}
    if spec.get("save"):
        np.save(spec["save"], K.detach().cpu().numpy())
    print(json.dumps(out))


def measure(model, method, n, args, save=None, budget=None, repeat=1):
    """Best time of ``repeat`` fresh processes (the machine may be shared); largest peak."""
    best = None
    for _ in range(repeat):
        spec = dict(model=model, method=method, n=n, dtype=args.dtype, save=save,
                    budget=budget, threads=args.threads, device=args.device)
        res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            tail = (res.stderr.strip().splitlines() or ["killed"])[-1]
            return dict(failed=f"exit {res.returncode}: {tail[:120]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        if best is not None:
            r["peak_growth"] = max(r["peak_growth"], best["peak_growth"])
            r["seconds"] = min(r["seconds"], best["seconds"])
        best = r
    return best


def gemm_rate(dtype, device="cpu"):
    import torch
    dt = torch.float64 if dtype == "float64" else torch.float32
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, dtype=dt, device=device)
    a @ a
    if device != "cpu":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    if device != "cpu":
        torch.cuda.synchronize()
    return 3 * 2 * n ** 3 / (time.perf_counter() - t0)


def _peak_name(args):
    """What ``peak_growth`` measures on this device (see ``measure``)."""
    return "peak device allocation" if args.device != "cpu" else "peak RSS"


def equal_n(args):
    peak = _peak_name(args)
    print(f"\n### Equal n ({args.dtype}; best of {args.repeat} fresh processes each; "
          f"{peak} growth)\n")
    print(f"| model | P | n | plain jacrev+vmap | ours | plain / ours | {peak} plain | "
          f"{peak} ours | max rel. diff | ours: groups |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models:
            n = args.n
            ours = measure(m, "ours", n, args, save=os.path.join(tmp, "o.npy"),
                           repeat=args.repeat)
            plain = measure(m, "plain", n, args, save=os.path.join(tmp, "p.npy"),
                            repeat=args.repeat)
            if "failed" in plain or "failed" in ours:
                print(f"| {m} | | {n} | {plain.get('failed', '')} | {ours.get('failed', '')} "
                      "| | | | | |")
                continue
            Ko, Kp = np.load(os.path.join(tmp, "o.npy")), np.load(os.path.join(tmp, "p.npy"))
            diff = float(np.abs(Ko - Kp).max() / np.abs(Kp).max())
            print(f"| {m} | {ours['params']} | {n} | {plain['seconds']:.2f} s | "
                  f"{ours['seconds']:.2f} s | **{plain['seconds'] / ours['seconds']:.1f}x** | "
                  f"{plain['peak_growth'] / 2**20:.0f} MiB | {ours['peak_growth'] / 2**20:.0f} MiB"
                  f" | {diff:.1e} | {', '.join(ours['groups'])} |")


def largest_n(args):
    budget = int(args.budget_gb * 2**30)
    peak = _peak_name(args)
    print(f"\n### Largest n within {args.budget_gb:g} GiB of {peak} growth ({args.dtype}); "
          f"n doubled from {args.n0} until the peak passes the budget or n reaches {args.nmax_cap}"
          f"\n")
    print(f"| model | method | largest n measured within budget | its time | its {peak} | "
          "next n: peak / outcome |")
    print("|---|---|---|---|---|---|")
    for m in args.models:
        for method in ("plain", "ours"):
            n, best, nxt = args.n0, None, "not reached (cap)"
            while n <= args.nmax_cap:
                r = measure(m, method, n, args,
                            budget=int(budget * 0.5) if method == "ours" else None)
                if "failed" in r:
                    nxt = f"n={n}: {r['failed']}"
                    break
                if r["peak_growth"] > budget:
                    nxt = f"n={n}: {r['peak_growth'] / 2**30:.2f} GiB"
                    break
                best = r
                n *= 2
            if best is None:
                print(f"| {m} | {method} | < {args.n0} | | | {nxt} |")
            else:
                print(f"| {m} | {method} | {best['n']} | {best['seconds']:.1f} s | "
                      f"{best['peak_growth'] / 2**20:.0f} MiB | {nxt} |")


def ours_only(args):
    budget = int(args.budget_gb * 2**30 * 0.5)
    print(f"\n### Ours alone ({args.dtype}, memory_budget={budget / 2**30:.1f} GiB)\n")
    print(f"| model | P | n | time | {_peak_name(args)} growth | groups | blocks | plain route "
          f"would hold |")
    print("|---|---|---|---|---|---|---|---|")
    for m in args.models:
        r = measure(m, "ours", args.n, args, budget=budget)
        if "failed" in r:
            print(f"| {m} | | {args.n} | {r['failed']} | | | | |")
            continue
        s = 8 if args.dtype == "float64" else 4
        jac = args.n * 10 * r["params"] * s
        print(f"| {m} | {r['params']} | {args.n} | {r['seconds']:.1f} s | "
              f"{r['peak_growth'] / 2**30:.2f} GiB | {', '.join(r['groups'])} | {r['blocks']} |"
              f" n x C x P Jacobian = {jac / 2**30:.1f} GiB |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per timing")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (peak = torch allocations)")
    ap.add_argument("--nmax", action="store_true", help="largest-n search instead")
    ap.add_argument("--ours-only", action="store_true")
    ap.add_argument("--budget-gb", type=float, default=2.0)
    ap.add_argument("--n0", type=int, default=128)
    ap.add_argument("--nmax-cap", type=int, default=4096)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{platform.node()} | {platform.processor() or platform.machine()} | "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads | torch "
          f"{torch.__version__} | {date.today()} | device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''} | "
          f"GEMM {gemm_rate(args.dtype, args.device) / 1e9:.0f} GFLOP/s ({args.dtype})")
    print("command: python " + " ".join(sys.argv))
    if args.ours_only:
        ours_only(args)
    elif args.nmax:
        largest_n(args)
    else:
        equal_n(args)


if __name__ == "__main__":
    main()
