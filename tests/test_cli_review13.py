"""CLI edge cases found in session 13; each test failed before its fix."""

import os
import subprocess
import sys

from test_cli import invoke


def test_a_failing_run_without_quiet_writes_one_stderr_line(tmp_path):
    """Without --quiet, the stage bar's text (with carriage returns) went to stderr before the
    error line, also when stderr was a file or a pipe."""
    r = invoke("influence", "--dataset", "mnist", "--data-root", tmp_path,
               "--out", tmp_path / "o")
    assert r.exit_code == 2
    assert "\r" not in r.stderr
    assert r.stderr.startswith("error: mnist: dataset files not found"), repr(r.stderr[:300])
    assert len(r.stderr.splitlines()) == 1


def test_on_a_terminal_the_error_line_starts_clean(tmp_path):
    """On a terminal the bar is drawn, and cleared before the error line: the error used to
    follow "stage: data: 0%|...|" on the same line."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()  # a new pty is 0 x 0: tqdm would draw an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ntkcore_launch", "influence", "--dataset", "mnist",
             "--data-root", str(tmp_path), "--out", str(tmp_path / "o")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, timeout=120)
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO once the writer is gone and the buffer is read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
    assert done.returncode == 2
    text = seen.decode(errors="replace")
    assert "stage: data" in text  # the bar is shown on a terminal
    last = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()][-1]
    shown = last.split("\r")[-1]  # what the terminal shows once the carriage returns act
    assert shown.startswith("error: mnist: dataset files not found"), repr(text[-400:])
