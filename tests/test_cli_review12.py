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


# ------------------------------------------------------------ run folders (session-12 review)
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import pytest  # noqa: E402

from test_cli import invoke, one_line_error  # noqa: E402

SMALL = ("--n-train", 40, "--n-test", 6, "--width", 8, "--epochs", 1, "--quiet")


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "o"
    assert invoke("influence", *SMALL, "--out", out).exit_code == 0
    return out


@pytest.mark.parametrize("damage", ["truncate", "empty", "no_alpha"])
def test_a_damaged_stage_file_is_one_line_naming_it(finished, damage):
    """A truncated influence.npz gave "internal error: BadZipFile" (exit 1) on the rerun that
    reuses it; an empty one EOFError, one without alpha KeyError."""
    npz = finished / "influence.npz"
    if damage == "truncate":
        npz.write_bytes(npz.read_bytes()[:1000])
    elif damage == "empty":
        npz.write_bytes(b"")
    else:
        with np.load(npz) as z:
            kept = {k: z[k] for k in z.files if k != "alpha"}
        np.savez(npz, **kept)
    r = invoke("influence", *SMALL, "--show", 2, "--out", finished)
    assert r.exit_code == 2
    one_line_error(r, "influence.npz", "--overwrite")
    assert invoke("influence", *SMALL, "--show", 2, "--out", finished,
                  "--overwrite").exit_code == 0


def test_a_hand_edited_stage_record_is_one_line(finished):
    """stages.training.info = {} gave "internal error: KeyError: 'training_device'"."""
    manifest = json.loads((finished / "run.json").read_text())
    manifest["stages"]["training"]["info"] = {}
    (finished / "run.json").write_text(json.dumps(manifest))
    (finished / "influence.npz").unlink()
    r = invoke("influence", *SMALL, "--out", finished)
    assert r.exit_code == 2
    one_line_error(r, "training", "training_device", "--overwrite")


def test_a_file_that_cannot_be_deleted_is_one_line(finished, monkeypatch):
    """--overwrite of a folder whose files cannot be deleted (read-only, immutable) gave
    "internal error: PermissionError"."""
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == "model.pt":
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    r = invoke("influence", *SMALL, "--out", finished, "--overwrite")
    assert r.exit_code == 2
    one_line_error(r, "cannot delete", "model.pt", "Operation not permitted")


def test_temp_files_of_a_killed_write_are_removed_by_the_next_run(finished):
    """A SIGKILL inside an atomic write left .influence.npz.XXXXXXXX.tmp for good."""
    stale = [finished / ".influence.npz.g_e8ucv6.tmp", finished / ".run.json.abcd1234.tmp"]
    mine = [finished / ".notes.txt.abcd1234.tmp", finished / ".influence.npz.tmp"]
    for f in stale + mine:
        f.write_bytes(b"x" * 100)
    (finished / "influence.npz").unlink()
    assert invoke("influence", *SMALL, "--out", finished).exit_code == 0
    assert not any(f.exists() for f in stale)
    assert all(f.exists() for f in mine)  # not a name of ours, or not mkstemp's pattern


def test_an_interrupted_manifest_write_keeps_memory_and_disk_in_step(tmp_path, monkeypatch):
    """Ctrl-C while record() wrote run.json: the stage was in memory, not on disk, so the
    failed run kept model.pt and a manifest that listed no stage. Now the manifest write
    defers the signal (the stage is recorded), and a write that fails is undone in memory."""
    from ntkcore.experiments import output
    run = output.RunFolder(tmp_path / "o", "influence", {"a": 1})
    (run.path / "model.pt").write_bytes(b"m")
    real = output.atomic_write_json

    def failing(path, obj):
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "atomic_write_json", failing)
    with pytest.raises(KeyboardInterrupt):
        run.record("training", ["model.pt"], epochs=1)
    assert run.manifest["stages"] == {} and "model.pt" not in run.manifest["files"]
    monkeypatch.setattr(output, "atomic_write_json", real)
    run.close(failed=True)
    assert not (run.path / "run.json").exists()


@pytest.mark.parametrize("from_thread", [False, True])
def test_the_manifest_write_defers_ctrl_c_until_it_is_on_disk(from_thread):
    """Blocking SIGINT in the main thread's mask did not defer it once BLAS or torch threads
    existed (the OS delivered it to one of them); the handlers are swapped now."""
    import threading
    import time

    from ntkcore.experiments.output import _signals_deferred
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_deferred():
            if from_thread:
                worker = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
                worker.start()
                worker.join()
            else:
                os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes: it has had its chance
            reached.append("after the signal, inside")
    assert reached == ["after the signal, inside"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_record_whose_write_landed_keeps_its_stage_when_ctrl_c_follows(tmp_path):
    """The held-back Ctrl-C is raised after run.json is on disk: the stage stays recorded in
    memory too, so close() keeps it (and the rerun resumes from it)."""
    from ntkcore.experiments import output
    run = output.RunFolder(tmp_path / "o", "influence", {"a": 1})
    (run.path / "model.pt").write_bytes(b"m")
    real = output.atomic_write_json

    def write_then_interrupt(path, obj):
        real(path, obj)
        os.kill(os.getpid(), signal.SIGINT)

    output.atomic_write_json = write_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            run.record("training", ["model.pt"], epochs=1)
    finally:
        output.atomic_write_json = real
    run.close(failed=True)
    on_disk = json.loads((run.path / "run.json").read_text())
    assert "training" in on_disk["stages"] and (run.path / "model.pt").exists()


_AFTER_INTERRUPT = """
import signal, sys
import ntkcore.cli.main as cli_main
cli_main.main = lambda: sys.exit({code})
import ntkcore_launch
try:
    ntkcore_launch.main()
except SystemExit as done:
    print(done.code, signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
          signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)
"""


@pytest.mark.parametrize("code,ignored", [(130, True), (143, True), (0, False), (2, False)])
def test_after_an_interrupt_the_exiting_process_ignores_another(code, ignored):
    """A second Ctrl-C while Python shut down printed an exit-handler traceback. The
    launcher (the process's own entry) now ignores further interrupts after one ended the
    command; in-process callers (CliRunner, notebooks) keep their handlers."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", _AFTER_INTERRUPT.format(code=code)],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == [str(code), str(ignored), str(ignored)], done.stderr


def test_an_interrupted_command_in_process_leaves_the_handlers_alone(tmp_path):
    """handle_errors itself set SIG_IGN, which then stayed for the rest of the process."""
    from cli._common import handle_errors

    @handle_errors
    def interrupted():
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as done:
        interrupted()
    assert done.value.code == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


_MODEL = ("import torch\n{imports}\n\ndef make():\n    torch.manual_seed(0)\n"
          "    return torch.nn.Sequential(torch.nn.Linear(64, 8), {act}, "
          "torch.nn.Linear(8, 10)).double()\n")
USER = ("--n-train", 40, "--n-test", 6, "--quiet")


def test_a_model_file_without_the_py_suffix_loads(tmp_path):
    """spec_from_file_location found no loader: "internal error: AttributeError"."""
    path = tmp_path / "netmodel"
    path.write_text(_MODEL.format(imports="", act="torch.nn.ReLU()"))
    assert invoke("influence", "--model", f"{path}:make", *USER,
                  "--out", tmp_path / "o").exit_code == 0
    (tmp_path / "bad.pt").write_bytes(b"\x00\x01binary")
    r = invoke("influence", "--model", f"{tmp_path / 'bad.pt'}:make", *USER,
               "--out", tmp_path / "o2")
    one_line_error(r, "spec", "bad.pt")


_NET = ("import torch\nfrom {helper} import act\n\n\nclass Net(torch.nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.a, self.b = torch.nn.Linear(64, 8), torch.nn.Linear(8, 10)\n\n"
        "    def forward(self, x):\n        return self.b(act(self.a(x)))\n\n\n"
        "def make():\n    torch.manual_seed(0)\n    return Net().double()\n")


def test_an_edited_helper_module_of_the_model_is_not_resumed(tmp_path, monkeypatch):
    """The fingerprint hashed only the named file (and the module tree torch prints, which a
    function called in forward does not change): tanh -> 3 relu in a module it imports
    reused the old scores ("show changed; same model and data")."""
    pkg = tmp_path / "um"
    pkg.mkdir()
    helper = f"helper_{os.getpid()}_{tmp_path.name}"  # a fresh module name per test run
    (pkg / f"{helper}.py").write_text("import torch\n\ndef act(x):\n    return torch.tanh(x)\n")
    (pkg / "model.py").write_text(_NET.format(helper=helper))
    monkeypatch.syspath_prepend(str(pkg))
    out = tmp_path / "o"
    assert invoke("influence", "--model", f"{pkg / 'model.py'}:make", *USER,
                  "--out", out).exit_code == 0
    (pkg / f"{helper}.py").write_text("import torch\n\ndef act(x):\n    return 3 * torch.relu(x)\n")
    import sys
    sys.modules.pop(helper, None)  # a new process would import the edited file
    r = invoke("influence", "--model", f"{pkg / 'model.py'}:make", *USER, "--show", 2,
               "--out", out)
    one_line_error(r, "other settings", "model_content")


def _fingerprint(path):
    from ntkcore.experiments.user_model import model_fingerprint
    from ntkcore.ntk.empirical import load_user_model
    spec = f"{path}:make"
    return model_fingerprint(spec, load_user_model(spec))


def test_the_fingerprint_ignores_the_script_and_other_models_beside_it(tmp_path, monkeypatch):
    """local_imports counted __main__ (a driver script next to the model: editing it made
    the run unresumable) and other user models this process had loaded from the folder."""
    import sys
    import types
    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text(_MODEL.format(imports="", act="torch.nn.ReLU()"))
    alone = _fingerprint(tmp_path / "b.py")
    assert "local_imports" not in alone
    _fingerprint(tmp_path / "a.py")  # another model from the same folder, loaded first
    driver = types.ModuleType("__main__")
    driver.__file__ = str(tmp_path / "run.py")
    (tmp_path / "run.py").write_text("# the user's driver script\n")
    monkeypatch.setitem(sys.modules, "__main__", driver)
    assert _fingerprint(tmp_path / "b.py") == alone


def test_a_compiled_model_file_loads(tmp_path):
    """Forcing a source loader for every path broke --model file.pyc:make."""
    import py_compile
    src = tmp_path / "m.py"
    src.write_text(_MODEL.format(imports="", act="torch.nn.ReLU()"))
    pyc = py_compile.compile(str(src), cfile=str(tmp_path / "m.pyc"))
    from ntkcore.ntk.empirical import load_user_model
    assert isinstance(load_user_model(f"{pyc}:make"), torch.nn.Module)
