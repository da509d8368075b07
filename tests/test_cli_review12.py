"""CLI edge cases found in the session-12 review; each test failed before its fix."""

import subprocess
import sys
from importlib.metadata import entry_points

# Ctrl-C while the command line's modules still import: a meta-path finder raises
# KeyboardInterrupt at the import of click, as the signal would.
_INTERRUPT_AT_IMPORT = """
import sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "click":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["ntkcore", "info"]
from {module} import main
sys.exit(main())
"""


def _interrupted_during_import(module):
    return subprocess.run([sys.executable, "-c", _INTERRUPT_AT_IMPORT.format(module=module)],
                          capture_output=True, text=True, timeout=120)


def test_ctrl_c_while_the_command_line_imports_is_one_line():
    """The console script imported ntkcore.cli.main before any handler existed, so a Ctrl-C
    in its first ~0.2 s printed a KeyboardInterrupt traceback."""
    done = _interrupted_during_import("ntkcore_launch")
    assert done.returncode == 130
    assert done.stderr == "interrupted\n"
    assert done.stdout == ""


def test_the_installed_command_starts_at_the_launcher():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "ntkcore"]
    assert script.value == "ntkcore_launch:main"


def test_the_launcher_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "ntkcore_launch", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "version 0.1.0" in done.stdout
