"""The CLI's influence job on the GPU: time in the kernel stage against time in training.

Issue 3's target: ``ntkcore influence --dataset cifar10 --width 1024`` spends less time in
kernels than in training. CIFAR-10 cannot be downloaded on the GPU machine, so by default this
runs the same job (the library call behind the CLI) on CIFAR-10-shaped synthetic data: 50 000
training rows of dimension 3072, 10 000 test rows, 10 classes, width 1024, exact solver.
With ``--dataset cifar10 --data-root DIR`` it runs on the real files.

    PYTHONPATH=. python3 bench/bench_cli_gpu.py [--n-train 50000] [--json out.json]

Prints the stage clocks (data, training, influence and its parts) and influence / training.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--data-root", default=None)
    p.add_argument("--dim", type=int, default=3072, help="synthetic rows' dimension")
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--solver", default="exact")
    p.add_argument("--device", default="cuda")
    p.add_argument("--epochs", type=int, default=None, help="default: the quick preset's")
    p.add_argument("--json", default=None, help="write the summary's timings here")
    args = p.parse_args(argv)

    from ntkcore.experiments.influence_run import run_influence
    from ntkcore.experiments.pipeline import InfluenceConfig
    synthetic = args.dataset == "synthetic"
    cfg = InfluenceConfig(dataset=args.dataset, data_root=args.data_root,
                          dim=args.dim if synthetic else None, n_train=args.n_train,
                          n_test=args.n_test, width=args.width, epochs=args.epochs,
                          device=args.device, solver=args.solver)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        summary = run_influence(cfg, out, progress=False, log=lambda *a: None)
    wall = time.perf_counter() - t0
    t = summary["timings"]
    ratio = t["influence"] / t["training"] if t.get("training") else float("nan")
    print(f"{args.dataset} n={args.n_train} T={args.n_test} d={summary['data']['dim']} "
          f"width={args.width} device={summary['device']} "
          f"training_device={summary['training_device']} solver={summary['solver']}")
    for k, v in t.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                print(f"    {kk:<22} {vv:9.2f} s")
        else:
            print(f"  {k:<24} {v:9.2f} s")
    print(f"influence / training = {ratio:.2f} (target < 1); wall {wall:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"argv": sys.argv[1:], "summary_timings": t, "ratio": ratio,
                       "device": summary["device"], "training_device": summary["training_device"],
                       "solver": summary["solver"], "wall_s": wall}, fh, indent=1, default=str)
    return summary


if __name__ == "__main__":
    main()
