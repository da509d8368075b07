"""Numba kernels whose source is written out per shape parameter, compiled once per machine.

LLVM vectorises some loops only when a count (class count C, column block width) is a
compile-time constant and the per-lane accumulators are named scalars; such kernels are
rendered from a template per parameter. Each generated module is a plain ``.py`` file under the
user cache folder (``$NTKCORE_CACHE``, else ``$XDG_CACHE_HOME/ntkcore``, else
``~/.cache/ntkcore``; the system temp folder when those cannot be written), named by the
caller and a hash of the text, so Numba's ``cache=True`` applies to it (rule 9): compiled once
per machine, not once per process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

_LOAD_LOCK = threading.Lock()


def _cache_dirs():
    """Candidate folders for generated sources, most preferred first."""
    if os.environ.get("NTKCORE_CACHE"):
        yield Path(os.environ["NTKCORE_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    yield Path(base) / "ntkcore" / "kernels"
    yield Path(tempfile.gettempdir()) / f"ntkcore-{os.getuid() if hasattr(os, 'getuid') else 0}"


def _read_or_none(path: Path):
    """The text of ``path``, or None when it is not valid UTF-8 (a damaged file: rewritten)."""
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return None


def write_source(name: str, source: str) -> Path:
    """The path of ``name`` holding ``source``, written atomically into the first usable folder
    (left alone when it already holds that text)."""
    for folder in _cache_dirs():
        path = folder / name
        try:
            if path.is_file() and _read_or_none(path) == source:
                return path
            folder.mkdir(parents=True, exist_ok=True)
            # unique per process and thread: writers never share a temp file
            tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
            tmp.write_text(source)
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    raise OSError("no writable cache folder for the generated kernels")


def load_generated(stem: str, source: str, function: str):
    """Function ``function`` of the module with text ``source``, saved as
    ``<stem>_<hash>.py`` and imported under a stable name (Numba's on-disk cache looks the
    module up by name)."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    name = f"{stem}_{digest}.py"
    with _LOAD_LOCK:  # threads of one process write and import one at a time
        path = write_source(name, source)
        spec = importlib.util.spec_from_file_location(f"ntkcore_generated_{name[:-3]}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return getattr(module, function)
