"""Console entry point of ``ntkcore``.

The command line lives in ``ntkcore.cli.main``; importing it loads NumPy and Click (about
0.2 s). A Ctrl-C in that window would end in a KeyboardInterrupt traceback, since no handler
of the command line exists yet. This module imports nothing of ntkcore at its top, so the
handler below is in place before that import starts.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130  # as cli._common: Ctrl-C


def main():
    """Run ``ntkcore``; a Ctrl-C before a command has started prints one line, exit 130."""
    try:
        from ntkcore.cli.main import main as command_line
        return command_line()
    except KeyboardInterrupt:  # commands report their own; this is the import or the parse
        import signal
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: no exit traceback
        sys.stderr.write("interrupted\n")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
