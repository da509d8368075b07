"""``ntkcore malleability``, ``ntkcore distance``, ``ntkcore spectrum``: the paper's experiments.

Thin shells (STYLE rule 12): parse options, call ``run_malleability`` / ``run_distance`` /
``run_spectrum`` from ``ntkcore.experiments``, print the table. Register with
``main.add_command(malleability)`` etc.
"""

from __future__ import annotations

import re

import click

from ._common import check_data_root_arg, check_out_dir, handle_errors


def _split(value, name):
    items = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    if not items:
        raise click.BadParameter(f"expected a comma-separated list, got {value!r}",
                                 ctx=click.get_current_context(silent=True),
                                 param_hint=f"'{name}'")
    return items


def _data_options(fn, n_train_help="Seeded training subset size (default: from --preset, "
                                   "quick 500)."):
    for opt in reversed([
        click.option("--dataset", default="digits", show_default=True,
                     help="digits (embedded), mnist, fashion-mnist, cifar10 or synthetic."),
        click.option("--data-root", type=click.Path(file_okay=False), default=None,
                     callback=check_data_root_arg,
                     help="Folder with the dataset files (flat or torchvision layout)."),
        click.option("--download", is_flag=True,
                     help="Fetch missing files with torchvision (needs a network)."),
        click.option("--classes", default="10", show_default=True,
                     help='"10" all, "5" the first five, or a list such as "3,8" (a pair is binary).'),
        click.option("--n-train", type=int, default=None, help=n_train_help),
        click.option("--seed", type=int, default=42, show_default=True),
    ]):
        fn = opt(fn)
    return fn


def _out_options(fn):
    fn = click.option("--quiet", is_flag=True, help="No progress bars.")(fn)
    fn = click.option("--overwrite", is_flag=True,
                      help="Replace results already in the output folder.")(fn)
    fn = click.option("--out", "out_dir", default=None, callback=check_out_dir,
                      help="Output folder (default runs/<command>-<dataset>-<classes>).")(fn)
    return fn


def _default_out(command, dataset, classes):
    """runs/<command>-<dataset>-<classes>, the classes as one safe folder name (a class name
    such as "T-shirt/top" made a nested folder)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", classes.replace(" ", ""))
    return f"runs/{command}-{dataset.lower()}-{safe}"


@click.command()
@_data_options
@click.option("--n-test", type=int, default=None, help="Seeded test subset (default all).")
@click.option("--test-points", type=int, default=20, show_default=True,
              help="Test points the metrics are averaged over (95 % t-interval).")
@click.option("--archs", default="relu,attn", show_default=True,
              help="relu = 2L-ReLU, attn = MLP-Attn.")
@click.option("--attacks", default="fgsm,pgd,mim", show_default=True)
@click.option("--interventions", default="curated,transformed,adversarial", show_default=True)
@click.option("--eps", type=float, default=0.3, show_default=True, help="L_inf budget (pixels).")
@click.option("--step", type=float, default=0.01, show_default=True, help="PGD/MIM step.")
@click.option("--iters", type=int, default=40, show_default=True, help="PGD/MIM iterations.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="MIM decay.")
@click.option("--width", type=int, default=None, help="Hidden units (quick 256, paper 1024).")
@click.option("--epochs", type=int, default=None, help="Epochs (quick 30, paper 500).")
@click.option("--preset", default="quick", show_default=True,
              type=click.Choice(["quick", "paper"]),
              help="quick: minutes on 2 cores; paper: width 1024, 500 epochs, full set.")
@click.option("--lam", type=float, default=1e-3, show_default=True, help="Ridge lambda.")
@click.option("--tau", type=float, default=0.1, show_default=True, help="Top-tau share.")
@click.option("--topk", type=int, default=10, show_default=True, help="K of top-K stability.")
@click.option("--retrain", is_flag=True,
              help="Retrain (same seed) after each intervention instead of keeping weights.")
@click.option("--adv-train", is_flag=True,
              help="Also run PGD adversarially trained models (Table 4: standard vs AT).")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]), help="Where the kernel solves run.")
@_out_options
@handle_errors
def malleability(dataset, data_root, download, classes, n_train, seed, n_test, test_points,
                 archs, attacks, interventions, eps, step, iters, momentum, width, epochs,
                 preset, lam, tau, topk, retrain, adv_train, device, out_dir, overwrite, quiet):
    """Influence flip rate, Spearman rho, top-K stability and intrinsic sensitivity of 2L-ReLU
    vs MLP-Attn under FGSM/PGD/MIM (paper Tables 2-4, Figure 2, Figure 4)."""
    from ntkcore.experiments.malleability import MalleabilityConfig, run_malleability

    cfg = MalleabilityConfig(
        dataset=dataset.lower(), data_root=data_root, download=download, classes=classes,
        n_train=n_train, n_test=n_test, test_points=test_points,
        archs=_split(archs, "--archs"), attacks=_split(attacks, "--attacks"),
        interventions=_split(interventions, "--interventions"), eps=eps, step=step,
        iters=iters, momentum=momentum, width=width, epochs=epochs, preset=preset, lam=lam,
        tau=tau, topk=topk, retrain=retrain, adv_train=adv_train, seed=seed, device=device)
    cfg.resolved()  # validate before creating the output folder
    out_dir = out_dir or _default_out("malleability", dataset, classes)
    res = run_malleability(cfg, out_dir, overwrite=overwrite, progress=not quiet,
                           log=click.echo)
    click.echo(res["table"])
    click.echo(f"wrote {', '.join(res.get('files', []))} to {out_dir} "
               f"({res['seconds']:.1f} s)")


@click.command()
@_data_options
@click.option("--n-test", type=int, default=None, help="Seeded test subset (default all).")
@click.option("--archs", default="relu,attn", show_default=True,
              help="relu = 2L-ReLU, attn = MLP-Attn.")
@click.option("--min-width", type=int, default=4, show_default=True)
@click.option("--max-width", type=int, default=None,
              help="Largest width, a power of two (quick 256, paper 4096).")
@click.option("--epochs", type=int, default=None, help="Epochs (quick 30, paper 500).")
@click.option("--preset", default="quick", show_default=True,
              type=click.Choice(["quick", "paper"]))
@click.option("--lam", type=float, default=1e-3, show_default=True, help="Ridge lambda.")
@_out_options
@handle_errors
def distance(dataset, data_root, download, classes, n_train, seed, n_test, archs, min_width,
             max_width, epochs, preset, lam, out_dir, overwrite, quiet):
    """NTK distance ||f_m - f_NTK||_F on the test set across widths (paper Table 1, Figure 1)."""
    from ntkcore.experiments.distance import DistanceConfig, run_distance

    cfg = DistanceConfig(dataset=dataset.lower(), data_root=data_root, download=download,
                         classes=classes, n_train=n_train, n_test=n_test,
                         archs=_split(archs, "--archs"), min_width=min_width,
                         max_width=max_width, epochs=epochs, preset=preset, lam=lam, seed=seed)
    cfg.resolved()
    out_dir = out_dir or _default_out("distance", dataset, classes)
    res = run_distance(cfg, out_dir, overwrite=overwrite, progress=not quiet, log=click.echo)
    click.echo(res["table"])
    click.echo(f"wrote {', '.join(res.get('files', []))} to {out_dir} "
               f"({res['seconds']:.1f} s)")


def _spectrum_data_options(fn):
    return _data_options(fn, n_train_help="Seeded training subset size (default: all).")


@click.command()
@_spectrum_data_options
@_out_options
@handle_errors
def spectrum(dataset, data_root, download, classes, n_train, seed, out_dir, overwrite, quiet):
    """kappa(G), effective kappa, kappa(G^3) = kappa(G)^3 check and the width Theorem 4.7
    requires, for the chosen data; plots the spectrum."""
    from ntkcore.experiments.spectrum_exp import SpectrumConfig, run_spectrum

    cfg = SpectrumConfig(dataset=dataset.lower(), data_root=data_root, download=download,
                         classes=classes, n_train=n_train, seed=seed)
    out_dir = out_dir or _default_out("spectrum", dataset, classes)
    res = run_spectrum(cfg, out_dir, overwrite=overwrite, progress=not quiet, log=click.echo)
    click.echo(res["table"])
    click.echo(f"wrote {', '.join(res.get('files', []))} to {out_dir}")


COMMANDS = (malleability, distance, spectrum)
