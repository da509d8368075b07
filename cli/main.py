"""The ``ntkcore`` command line (Click). Parses options, calls library functions, prints."""

from __future__ import annotations

import sys

import click

from ._common import (EXIT_USER, check_data_root_arg, check_out_dir, explicit, handle_errors,
                      timing_table, usage_error_line)


#: Click >= 8.2 raises it for a bare ``ntkcore``; it shows the help, not an error.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineErrors(click.Group):
    """The ``ntkcore`` group: every usage error (bad value, unknown option, missing
    argument) is one line ``error: <message> (see ntkcore <command> --help)``, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        args = sys.argv[1:] if args is None else list(args)
        if self._does_work(args):
            _check_environment()
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # bare ``ntkcore``: the help
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            click.echo(usage_error_line(exc, self._command_path(exc, args)), err=True)
            sys.exit(EXIT_USER)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)

    def _does_work(self, args) -> bool:
        """Whether ``args`` run a command that plans memory: not help, not --version, not
        ``info`` (which must work to diagnose a bad environment)."""
        if any(a in ("-h", "--help", "--version") for a in args):
            return False
        named = [a for a in args if a in self.commands]
        return bool(named) and named[0] != "info"

    def _command_path(self, exc, args) -> str:
        """``ntkcore <command>`` of the failing command (the group's name when none)."""
        ctx = exc.ctx
        names = []
        while ctx is not None and ctx.parent is not None:
            names.append(ctx.info_name)
            ctx = ctx.parent
        if not names and exc.ctx is None:  # raised inside a command without its context
            names = [a for a in args if a in self.commands][:1]
        return " ".join(["ntkcore"] + names[::-1])


@click.group(name="ntkcore", cls=OneLineErrors,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ntkcore")
def main():
    """ntkcore: exact NTK leave-one-out influence and influence malleability."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"warning: {' '.join(str(message).split())}", err=True)

    warnings.showwarning = show  # numerical rescue stays visible, as one line


@handle_errors
def _check_environment():
    """NTKCORE_MEMORY_LIMIT is read where memory is planned; a bad value fails here, before
    any work, rather than after training."""
    from ntkcore.backend import memory_limit_from_env
    memory_limit_from_env()


@main.command()
@click.option("--dataset", default="digits", show_default=True,
              help="digits (embedded), mnist, fashion-mnist, cifar10 or synthetic.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              callback=check_data_root_arg,
              help="Folder with the dataset files (flat or torchvision layout).")
@click.option("--download", is_flag=True, help="Fetch missing files with torchvision (needs a network).")
@click.option("--classes", default="10", show_default=True,
              help='"10" all, "5" the first five, or a list such as "3,8" (binary).')
@click.option("--n-train", type=int, default=None, help="Seeded training subset size (default all).")
@click.option("--n-test", type=int, default=None, help="Seeded test subset size (default all).")
@click.option("--dim", type=int, default=None, help="Input dimension of synthetic data (64).")
@click.option("--arch", default="relu", show_default=True, type=click.Choice(["relu", "attn"]),
              help="relu = 2L-ReLU, attn = MLP-Attn (linearized attention).")
@click.option("--width", type=int, default=1024, show_default=True, help="Hidden units m.")
@click.option("--epochs", type=int, default=None, help="Training epochs (default from --preset).")
@click.option("--preset", default="quick", show_default=True, type=click.Choice(["quick", "paper"]),
              help="quick: 30 epochs; paper: the paper's 500 epochs.")
@click.option("--lam", type=float, default=1e-3, show_default=True, help="Ridge lambda.")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--solver", default="auto", show_default=True,
              type=click.Choice(["auto", "exact", "nystrom", "cg"]))
@click.option("--rank", type=int, default=None, help="Nystrom rank / CG preconditioner rank.")
@click.option("--landmarks", default=None, type=click.Choice(["uniform", "rpcholesky"]),
              help="Nystrom landmark selection.")
@click.option("--tol", type=float, default=None, help="CG relative tolerance.")
@click.option("--precision", default=None, type=click.Choice(["float64", "float32"]),
              help="Exact solver in packed storage (CPU): float32 halves memory and about "
                   "halves the time; an approximation, float64 is the default.")
@click.option("--diag-probes", type=int, default=None,
              help="Exact solver in packed storage (CPU): estimate diag(A^-1) from this many "
                   "probes (relative error sqrt(2/probes)) instead of n^3/3 flops.")
@click.option("--show", type=int, default=5, show_default=True,
              help="Test points shown in summary.json (the figure: the first 20).")
@click.option("--model", "model_spec", default=None,
              help="Your own model: 'module:factory' or 'file.py:factory' (generic eNTK route).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="state_dict (.pt) for --model.")
@click.option("--model-input", default="rows", show_default=True,
              type=click.Choice(["rows", "images"]),
              help="What --model receives: preprocessed (n, d) rows or (n, C, H, W) images.")
@click.option("--out", "out_dir", default=None, callback=check_out_dir,
              help="Output folder (default runs/influence-<dataset>-<arch>).")
@click.option("--overwrite", is_flag=True, help="Replace results already in the output folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def influence(dataset, data_root, download, classes, n_train, n_test, dim, arch, width, epochs,
              preset, lam, device, seed, solver, rank, landmarks, tol, precision, diag_probes,
              show, model_spec, weights, model_input, out_dir, overwrite, quiet):
    """Train the network, build its empirical NTK, and score every training point's
    leave-one-out influence on every test prediction."""
    from ntkcore.experiments.influence_run import run_influence
    from ntkcore.experiments.pipeline import InfluenceConfig

    ctx = click.get_current_context()
    if model_spec is not None:
        ignored = explicit(ctx, "arch", "width", "epochs", "preset")
        if ignored:
            names = ", ".join(f"--{n}" for n in ignored)
            raise click.UsageError(f"{names}: options of the built-in networks; --model scores "
                                   f"your model as it is (drop {names})", ctx=ctx)
    elif weights is not None:
        raise click.UsageError("--weights needs --model", ctx=ctx)
    solver_options = {k: v for k, v in (("rank", rank), ("landmarks", landmarks), ("tol", tol),
                                        ("precision", precision),
                                        ("diag_probes", diag_probes)) if v is not None}
    cfg = InfluenceConfig(dataset=dataset.lower(), data_root=data_root, download=download,
                          classes=classes, n_train=n_train, n_test=n_test, dim=dim, arch=arch,
                          width=width, epochs=epochs, preset=preset, lam=lam, device=device,
                          seed=seed, solver=solver, solver_options=solver_options, show=show)
    out_dir = out_dir or f"runs/influence-{cfg.dataset}-{arch}"
    if model_spec is not None:
        from ntkcore.experiments.user_model import run_user_model_influence
        summary = run_user_model_influence(cfg, model_spec, weights, out_dir,
                                           overwrite=overwrite, progress=not quiet,
                                           log=click.echo, model_input=model_input)
    else:
        summary = run_influence(cfg, out_dir, overwrite=overwrite, progress=not quiet,
                                log=click.echo)
    _print_summary(summary, out_dir, solver_options)


def _print_summary(summary, out_dir, solver_options=()):
    import re

    from ntkcore.solvers.auto import SOLVER_OPTIONS
    acc = summary.get("accuracy", {})
    solver = str(summary.get("solver"))
    click.echo(f"solver: {solver} ({summary.get('solver_reason')})")
    chosen = re.match(r"[a-z]*", solver).group()
    unused = [k for k in solver_options if k not in SOLVER_OPTIONS.get(chosen, ())]
    if unused:  # only --solver auto gets here: an explicit solver refuses them up front
        click.echo(f"note: {', '.join('--' + k.replace('_', '-') for k in unused)} not used: "
                   f"auto chose the {chosen} solver")
    checks = summary.get("diagnostics", {}).get("checks", {})
    if checks:
        click.echo("A.8 checks: " + ", ".join(f"{k}={v}" for k, v in checks.items()))
        if "float32" in solver and checks.get("inverse_accurate") is False:
            click.echo("note: inverse_accurate=False is expected with --precision float32: "
                       "its inverse is accurate to float32 rounding, not to the float64 "
                       "tolerance of the check (see README, \"Scale past memory\")")
    if acc:
        click.echo("test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()
                                                  if v is not None))
    t = summary["timings"]
    rows = [(k, v) for k, v in t.items() if k != "influence_stages"]
    rows += [(f"  {k}", v) for k, v in t.get("influence_stages", {}).items()]
    click.echo(timing_table(rows))
    click.echo(f"wrote {', '.join(summary['files'])} to {out_dir}")


@main.command()
@click.option("--data-root", type=click.Path(file_okay=False), default=None)
@handle_errors
def info(data_root):
    """Versions, usable backends (CPU threads, Numba, CuPy/GPU) and where data sets are found."""
    from ntkcore.info import collect_info, format_info
    click.echo(format_info(collect_info(data_root=data_root)))


def _register_experiment_commands():
    """Experiment commands live in their own module (cli/experiments_cmds.py)."""
    from . import experiments_cmds
    for name in ("malleability", "distance", "spectrum"):
        main.add_command(getattr(experiments_cmds, name))


_register_experiment_commands()


if __name__ == "__main__":
    main()
