"""Atomic file writes (temp file, fsync, rename), JSON with non-finite floats, and the
deferral of Ctrl-C / SIGTERM while a run's manifest is written: the file layer under
:mod:`.output`'s run folders."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM held back for the duration, then handled as they would have been.

    Python runs signal handlers in the main thread whichever thread the OS delivered the
    signal to (BLAS, torch and Numba threads included), so swapping the handlers for one
    that only notes the signal defers it; blocking it in this thread's mask would not. A
    no-op outside the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if noted:  # the first one, as its handler would have taken it
            handler = previous[noted[0]]
            if callable(handler):
                handler(noted[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(noted[0])


_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _revive(obj):
    """Inverse of _jsonable's non-finite floats: "nan", "inf", "-inf" -> float."""
    if isinstance(obj, dict):
        return {k: _revive(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_revive(v) for v in obj]
    if isinstance(obj, str) and obj in _NON_FINITE:
        return _NON_FINITE[obj]
    return obj


def _umask() -> int:
    """The process umask, read from /proc where it can be (os.umask would set it for a moment,
    racing with other threads creating files)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place, with the
    permissions a plain ``open`` would give (mkstemp's are 0600)."""
    return _atomic_write(path, lambda fh: fh.write(data))


def _atomic_write(path, write) -> Path:
    """``write(fh)`` into a temp file beside ``path``, synced, then renamed into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        obj = float(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)  # JSON has no inf/nan: keep them readable as "inf"/"nan"
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


#: .npz files holding more than this are written uncompressed: influence scores are float
#: noise that zlib shrinks by ~5 % at ~30 MB/s, which was 90 s of a 99 s influence stage at
#: n = 50 000, T = 10 000 (2 GB of float32 scores) on an H200 machine, and 0.18 s of the
#: digits quickstart (4.3 MiB -> 4.1 MiB) on the 2-core VM.
COMPRESS_NPZ_BYTES = 1 << 20


def atomic_write_npz(path, **arrays) -> Path:
    """``arrays`` as one .npz at ``path`` (written beside it, then renamed: never half a
    file); compressed when they hold at most COMPRESS_NPZ_BYTES, else stored plain. Either
    way ``np.load`` reads it the same."""
    total = sum(np.asarray(a).nbytes for a in arrays.values())
    save = np.savez_compressed if total <= COMPRESS_NPZ_BYTES else np.savez
    return _atomic_write(path, lambda fh: save(fh, **arrays))


def atomic_savefig(fig, path, **kwargs) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    return atomic_write_bytes(path, buf.getvalue())

