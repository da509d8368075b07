"""Shared CLI plumbing: one-line errors with non-zero exit, timing tables. Parses and prints only."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading

import click

# Exit codes: 2 bad input / impossible request (NtkcoreError), 1 unexpected failure,
# 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
EXIT_USER = 2
EXIT_INTERNAL = 1
EXIT_TERMINATED = 143


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``kill``, a job scheduler), unwound as Ctrl-C is: finished files
    stay, and a run that finished no stage leaves nothing behind."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM raises :class:`_Terminated` for the duration (main thread only; the previous
    handler is restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handle_errors(fn):
    """Turn ntkcore errors into ``error: <one line>`` on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ntkcore.errors import NtkcoreError
        try:
            with _sigterm_unwinds():
                return fn(*args, **kwargs)
        except _Terminated:
            _fail("terminated: finished files in the output folder are complete; rerun the same "
                  "command to resume", EXIT_TERMINATED)
        except NtkcoreError as exc:
            _fail(f"error: {_one_line(exc)}", EXIT_USER)
        except MemoryError as exc:
            _fail(f"error: out of memory ({_one_line(exc) or 'allocation failed'}); use smaller "
                  f"sizes (--n-train, --n-test, --width, or --dim for synthetic data) or "
                  f"--solver nystrom/cg", EXIT_USER)
        except KeyboardInterrupt:
            _fail("interrupted: finished files in the output folder are complete; rerun the same "
                  "command to resume", 130)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - last line of defence: no traceback
            if os.environ.get("NTKCORE_DEBUG"):
                raise
            from ntkcore.nn._memory import oom_message
            detail = oom_message(exc)  # torch's allocator outside training: no C++ frames
            if detail is not None:
                _fail(f"error: out of memory{detail}; use smaller sizes (--n-train, --n-test, "
                      f"--width) or --solver nystrom/cg", EXIT_USER)
            _fail(f"internal error: {type(exc).__name__}: {_first_line(exc)} "
                  f"(set NTKCORE_DEBUG=1 for the traceback)", EXIT_INTERNAL)

    return wrapper


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def _first_line(exc, limit: int = 300) -> str:
    """The first line of an unexpected error, at most ``limit`` characters (C++ errors from
    torch carry kilobytes of stack frames after it)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def usage_error_line(exc, command: str) -> str:
    """``error: <message> (see ntkcore <command> --help)`` for a Click usage error, its lines
    joined into one (spaces inside a line, say in a quoted '   ' value, are kept)."""
    lines = (part.strip() for part in exc.format_message().splitlines())
    return f"error: {' '.join(part for part in lines if part)} (see {command} --help)"


def check_out_dir(ctx, param, value):
    """Click callback of --out: a folder name, not blank (None: the command's default)."""
    if value is not None and not value.strip():
        raise click.BadParameter(f"expected a folder name, got {value!r}", ctx=ctx,
                                 param=param)
    return value


def check_data_root_arg(ctx, param, value):
    """Click callback of --data-root: not blank (an empty shell variable read the current
    folder); None: the default folders."""
    if value is not None and not value.strip():
        raise click.BadParameter(f"expected a folder, got {value!r} (leave --data-root out "
                                 f"for the default folders)", ctx=ctx, param=param)
    return value


def explicit(ctx, *names) -> list:
    """The options among ``names`` (parameter names) given on the command line or through
    the environment, not left at their defaults."""
    from click.core import ParameterSource
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return [n for n in names if ctx.get_parameter_source(n) in given]


def _fail(message: str, code: int):
    click.echo(message, err=True)
    sys.exit(code)


def timing_table(rows) -> str:
    """Rows of (stage, seconds) as an aligned text table with a total; indented rows are
    parts of the row above them and are not added again."""
    rows = [(k, float(v)) for k, v in rows]
    width = max([len(k) for k, _ in rows] + [5])
    lines = [f"{'stage'.ljust(width)}  seconds", f"{'-' * width}  -------"]
    lines += [f"{k.ljust(width)}  {v:7.2f}" for k, v in rows]
    total = sum(v for k, v in rows if not k.startswith(" "))
    lines += [f"{'-' * width}  -------", f"{'total'.ljust(width)}  {total:7.2f}"]
    return "\n".join(lines)


def parse_int_or_none(value):
    return None if value in (None, "", "all") else int(value)
