"""Output folders and atomic writes: results appear whole or not at all (temp file + rename)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import OutputExistsError, ParameterError

RESULT_FILES = ("influence.npz", "summary.json", "results.json", "table.md")


def prepare_output_dir(path, *, overwrite: bool = False, result_files=RESULT_FILES) -> Path:
    """Create ``path`` if needed; refuse (OutputExistsError) when it already holds results."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"output: expected a folder, got an existing file {out}")
    found = [f for f in result_files if (out / f).exists()]
    if found and not overwrite:
        raise OutputExistsError(f"{out} already holds results ({', '.join(found)}); "
                                f"pass --overwrite to replace them or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def atomic_write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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


def atomic_write_npz(path, **arrays) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_savefig(fig, path, **kwargs) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    return atomic_write_bytes(path, buf.getvalue())
