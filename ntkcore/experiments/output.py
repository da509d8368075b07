"""Output folders and atomic writes: results appear whole or not at all (temp file + rename).

A command's output folder is a :class:`RunFolder`: a manifest ``run.json`` names the command,
its settings, the stages finished so far and every file written, and is rewritten atomically
after each stage. Rerunning the same command with the same settings on an unfinished folder
resumes it (finished stages are skipped, not redone); anything else that would mix two runs is
refused, or with ``overwrite`` the old run's files are deleted before any work starts.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import OutputExistsError, ParameterError

MANIFEST = "run.json"
#: Result files of folders written before the manifest existed (refused / deleted by name).
LEGACY_FILES = ("influence.npz", "summary.json", "results.json", "table.md", "model.pt",
                "partial_results.json", "scores.npz")


class RunFolder:
    """The output folder of one command run, with its manifest (see the module docstring).

    Parameters
    ----------
    path : folder to create or reuse.
    command : the command's name ("influence", "malleability", ...).
    config : JSON-able dict of the settings that determine the results; a folder resumes only
        a run whose stored settings are equal.
    overwrite : delete the previous run's files first instead of refusing.

    Attributes
    ----------
    path : Path; resumed : bool, an unfinished run of the same settings was found.
    """

    def __init__(self, path, command: str, config: dict, *, overwrite: bool = False):
        self.path = _make_dir(path)
        self.command = command
        self.config = _jsonable(config)
        old = self._read_manifest()
        self.resumed = False
        if old is not None and not overwrite:
            same = old.get("command") == command and old.get("config") == self.config
            if old.get("complete") or not same:
                raise OutputExistsError(self._refusal(old, same))
            self.manifest = old
            self.resumed = True
            return
        legacy = [f for f in LEGACY_FILES if (self.path / f).exists()]
        if old is None and legacy and not overwrite:
            raise OutputExistsError(f"{self.path} already holds results ({', '.join(legacy)}); "
                                    f"pass --overwrite to replace them or choose another --out")
        if overwrite:
            self._delete_previous(old, legacy)
        self.manifest = {"command": command, "config": self.config, "complete": False,
                         "stages": {}, "files": []}
        self._write()

    def file(self, name: str) -> Path:
        return self.path / name

    def done(self, stage: str) -> bool:
        return stage in self.manifest["stages"]

    def info(self, stage: str) -> dict:
        """What :meth:`record` stored for a finished ``stage`` (non-finite floats, which JSON
        holds as "nan" / "inf" strings, come back as floats)."""
        return _revive(self.manifest["stages"][stage])

    def record(self, stage: str, files=(), **info) -> None:
        """Mark ``stage`` finished, with the files it wrote and JSON-able ``info``."""
        self.manifest["stages"][stage] = _jsonable(info)
        self._add_files(files)
        self._write()

    def forget(self, files) -> None:
        """Delete files of a finished partial stage that the final results replace."""
        for name in files:
            (self.path / name).unlink(missing_ok=True)
        self.manifest["files"] = [f for f in self.manifest["files"] if f not in set(files)]
        self._write()

    def finish(self, files=()) -> None:
        """Mark the run complete: a later run into this folder needs ``overwrite``."""
        self._add_files(files)
        self.manifest["complete"] = True
        self._write()

    # -------------------------------------------------------------------------------------
    def _add_files(self, files):
        for name in files:
            if name not in self.manifest["files"]:
                self.manifest["files"].append(str(name))

    def _write(self):
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def _read_manifest(self):
        f = self.path / MANIFEST
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise OutputExistsError(f"{f}: unreadable run manifest ({exc}); pass --overwrite "
                                    f"or choose another --out") from None

    def _refusal(self, old, same):
        what = "finished results" if old.get("complete") else "an unfinished run"
        if not same and old.get("command") != self.command:
            diff = f"of `{old.get('command')}`"
        elif not same:
            keys = sorted(k for k in set(old.get("config", {})) | set(self.config)
                          if old.get("config", {}).get(k) != self.config.get(k))
            diff = f"with other settings ({', '.join(keys)})"
        else:
            diff = "of these settings"
        resume = ("; rerun with its settings to resume it" if not old.get("complete")
                  and not same else "")
        return (f"{self.path} already holds {what} {diff}{resume}; pass --overwrite to replace "
                f"it or choose another --out")

    def _delete_previous(self, old, legacy):
        names = set(legacy) | set((old or {}).get("files", []))
        for name in names:
            target = (self.path / name).resolve()
            if target.parent == self.path.resolve() and target.is_file():
                target.unlink()
        (self.path / MANIFEST).unlink(missing_ok=True)


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


def _make_dir(path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ParameterError(f"output: expected a folder, got an existing file {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParameterError(f"output: cannot create the folder {out}: "
                             f"{exc.strerror or exc}") from None
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place, with the
    permissions a plain ``open`` would give (mkstemp's are 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


def prepare_output_dir(path, *, overwrite: bool = False) -> Path:
    """Create ``path`` if needed; refuse (OutputExistsError) when it already holds results."""
    out = _make_dir(path)
    found = [f for f in LEGACY_FILES + (MANIFEST,) if (out / f).exists()]
    if found and not overwrite:
        raise OutputExistsError(f"{out} already holds results ({', '.join(found)}); "
                                f"pass --overwrite to replace them or choose another --out")
    return out
