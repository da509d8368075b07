"""Console entry point of ``ntkcore``.

The command line lives in ``ntkcore.cli.main``; importing it loads NumPy and Click (about
0.2 s). A Ctrl-C in that window would end in a KeyboardInterrupt traceback, since no handler
of the command line exists yet. This module imports nothing of ntkcore at its top, so the
handler below is in place before that import starts.
"""

from __future__ import annotations

import signal
import sys

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # as cli._common: Ctrl-C, SIGTERM


def main():
    """Run ``ntkcore``; a Ctrl-C before a command has started prints one line, exit 130.
    Once a command has ended by an interrupt, further Ctrl-Cs and SIGTERMs are ignored: the
    process is exiting, and one landing in an exit handler would print a traceback."""
    try:
        from ntkcore.cli.main import main as command_line
        return command_line()
    except KeyboardInterrupt:  # commands report their own; this is the import or the parse
        _ignore_interrupts()
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as done:
        if done.code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
            _ignore_interrupts()
        raise


def _ignore_interrupts():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    main()
