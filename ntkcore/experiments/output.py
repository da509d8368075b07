"""Output folders and atomic writes: results appear whole or not at all (temp file + rename).

A command's output folder is a :class:`RunFolder`: a manifest ``run.json`` names the command,
its settings (with what identifies its data and the ntkcore version), the stages finished so
far and every file the run writes, registered *before* it is written.

Resuming is decided by *identity*, the part of the settings that the recorded stages depend on
(``identity=``; by default all the settings). Rerunning the command on a folder whose stored
identity is equal reuses it: a finished stage whose files are all present is skipped, not
redone; a present file that is not as its stage wrote it (size, mtime and CRC-32 are recorded
with the stage) is refused, naming it. Settings outside the identity (for ``influence``: the solver and its options, the solve
device, ``show``, ``top_k``) may differ, on an unfinished or a finished run: ``run.json``
then takes the new settings, and the previous outputs that belong to no finished stage are
deleted before any work, to be computed again. A different identity, another command, or
finished results of the very same settings are refused; with ``overwrite`` the old run's files
are deleted before any work starts. One run at a time holds a folder (an advisory lock on
``.run.lock``), and a run that fails before finishing any stage leaves no manifest behind (so
the corrected command is not blocked by it).

The data's identity is its name and a hash of its contents, never where it was read from: the
same command run from another folder, or with the same files under another path, resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import CorruptDataError, OutputExistsError, ParameterError
from .atomic import (  # noqa: F401 - re-exported: the writers the commands import from here
    _jsonable, _revive, _signals_deferred, atomic_savefig, atomic_write_bytes, atomic_write_json,
    atomic_write_npz, atomic_write_text)

MANIFEST = "run.json"
LOCK = ".run.lock"
#: Marks a run.json as ntkcore's: a foreign file of that name is never read or deleted.
MARKER = "ntkcore_run"
#: Result names of folders written before the manifest existed: a folder holding one of them
#: and no manifest is refused, with or without --overwrite (nothing proves they are a run's:
#: a user's --weights model.pt was deleted by name once).
LEGACY_FILES = ("influence.npz", "summary.json", "results.json", "table.md", "model.pt",
                "partial_results.json", "scores.npz")


class RunFolder:
    """The output folder of one command run, with its manifest (see the module docstring).

    Use as a context manager: ``with RunFolder(...) as run: ...``.

    Parameters
    ----------
    path : folder to create or reuse.
    command : the command's name ("influence", "malleability", ...).
    config : JSON-able dict of the run's settings (with :func:`dataset_identity` of the
        data), recorded in ``run.json``. The ntkcore version is added.
    identity : JSON-able dict, optional, what the stages this run records depend on (default:
        all of ``config``); a folder is reused only by a run of equal identity. The ntkcore
        version is added.
    about : JSON-able dict, optional, recorded for information only (where the data was
        found, the device as typed): it decides nothing.
    overwrite : delete the previous run's files first instead of refusing.

    Attributes
    ----------
    path : Path
    resumed : bool, an earlier run of the same identity was found; its finished stages are
        reused (:meth:`done`).
    changed : list of str, the settings that differ from that run's (empty if none).
    """

    def __init__(self, path, command: str, config: dict, *, identity: dict | None = None,
                 about: dict | None = None, overwrite: bool = False):
        self.path, self._created = _make_dir(path)
        self._lock_created = not (self.path / LOCK).exists()
        self._lock = _acquire_lock(self.path)
        try:
            self._open(command, config, identity, overwrite)
            if about is not None:
                self.manifest["about"] = _jsonable(about)
                self._write()
        except BaseException:
            self.close(failed=True)
            raise

    def _open(self, command, config, identity, overwrite):
        from importlib.metadata import PackageNotFoundError, version
        try:
            ver = version("ntkcore")
        except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
            ver = "unknown"
        self.command = command
        self.config = _jsonable({**config, "ntkcore_version": ver})
        self.identity = (self.config if identity is None
                         else _jsonable({**identity, "ntkcore_version": ver}))
        old = self._read_manifest(overwrite)
        listed = old.get("files", []) if isinstance(old, dict) else \
            getattr(self, "_listed_before", [])
        self._remove_stale_temps([MANIFEST, *LEGACY_FILES,
                                  *(f for f in listed if isinstance(f, str) and "/" not in f)])
        self.resumed, self.changed = False, []
        if old is not None and not overwrite:
            old_config = old["config"]
            old_identity = old.get("identity")
            if old_identity is None:  # a manifest from before identity=
                old_config = _upgraded_legacy_config(old_config, self.config)
                old_identity = {k: old_config.get(k) for k in self.identity}
            same = old["command"] == command and old_identity == self.identity
            if same and old["complete"] and old_config == self.config and any(
                    not (self.path / f).is_file() for f in old["files"]) and any(
                    self._whole(st) for st in old["stages"].values()):
                # a result file was deleted, and a finished stage (training, say) is still
                # whole: resume, reusing it; the stages whose files are gone run again. With
                # no stage left to reuse (malleability drops its partial files at the end),
                # it is refused as before: rerunning all of it is --overwrite's to ask for
                old["complete"] = False
            if not same or (old["complete"] and old_config == self.config):
                raise OutputExistsError(self._refusal(old, old_identity, same))
            self.manifest, self.resumed = old, True
            self.changed = _differing(old_config, self.config)
            if self.changed or old["complete"]:
                # other settings of the same identity: keep the finished stages whose own
                # settings are unchanged, drop the outputs computed from the old settings
                old["stages"] = {name: st for name, st in old["stages"].items()
                                 if all(self.config.get(k) == v
                                        for k, v in st.get("depends_on", {}).items())}
                kept = [f for info in old["stages"].values() for f in info["files"]]
                self._delete([f for f in old["files"] if f not in kept])
                old.update(config=self.config, identity=self.identity, complete=False,
                           files=[f for f in old["files"] if f in kept])
                self._write()
            return
        legacy = [f for f in LEGACY_FILES if (self.path / f).exists()] if old is None else []
        if legacy and overwrite and self._damaged_ours:
            # our run, its manifest damaged: which of these it wrote is no longer known (a
            # model.pt may be the user's --weights), so none is deleted; the new run replaces
            # the ones it writes, atomically
            legacy = []
        if legacy:  # no manifest lists them: they may be the user's (say, --weights model.pt)
            raise OutputExistsError(
                f"{self.path} holds {', '.join(legacy)} but no ntkcore run manifest ({MANIFEST}) "
                f"lists them, so they may not be a run's results and --overwrite does not "
                f"delete them: choose another --out, or move them away yourself")
        if overwrite:
            self._delete(list((old or {}).get("files", [])))
        self.manifest = {MARKER: 1, "command": command, "config": self.config,
                         "identity": self.identity, "complete": False, "stages": {},
                         "files": []}
        self._write()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(failed=exc_type is not None)
        return False

    def close(self, *, failed: bool = False) -> None:
        """Release the folder. A failed run that finished no stage leaves nothing behind: not
        the files it had begun to write, not its manifest, and not the folder if it made it."""
        manifest = getattr(self, "manifest", None)
        if failed and manifest is not None and not manifest["stages"] \
                and not manifest["complete"]:
            self._delete(manifest["files"])
            (self.path / MANIFEST).unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
            # a refused or failed first run leaves no lock file in a folder it found without one
            if failed and (self._created or self._lock_created) \
                    and not (self.path / MANIFEST).exists():
                (self.path / LOCK).unlink(missing_ok=True)
                if self._created:
                    try:
                        self.path.rmdir()  # only if empty
                    except OSError:
                        pass

    def file(self, name: str) -> Path:
        return self.path / name

    def output(self, name: str) -> Path:
        """Register ``name`` in the manifest (before it is written) and return its path."""
        self._add_files([name])
        return self.path / name

    def done(self, stage: str) -> bool:
        """``stage`` was finished by this or an earlier run, and all its files are present.
        CorruptDataError naming a file that is present but not as the stage wrote it
        (:func:`_unchanged`: another run's result copied in, a damaged file)."""
        info = self.manifest["stages"].get(stage)
        return info is not None and self._whole(info)

    def _whole(self, info: dict) -> bool:
        """Every file of the stage entry ``info`` is present (and unchanged, else an error)."""
        prints = info.get("fingerprints")
        prints = prints if isinstance(prints, dict) else {}
        for f in info["files"]:
            path, recorded = self.path / f, prints.get(f, ...)
            if not path.is_file() or recorded is None:
                return False
            try:
                same = _unchanged(path, recorded)
            except OSError as exc:
                raise CorruptDataError(f"{path}: a finished stage's file cannot be read "
                                       f"({exc.strerror or exc}); make it readable, or pass "
                                       f"--overwrite to start the run afresh") from None
            if not same:
                raise CorruptDataError(
                    f"{path}: a finished stage's file was changed since this run wrote it "
                    f"(its size or checksum differs: another run's file copied in, or damaged); "
                    f"restore it, or pass --overwrite to start the run afresh")
        return True

    def info(self, stage: str, require=()) -> dict:
        """What :meth:`record` stored for a finished ``stage`` (non-finite floats, which JSON
        holds as "nan" / "inf" strings, come back as floats). CorruptDataError when it is
        not a dict holding the ``require`` keys (a hand-edited manifest)."""
        info = _revive(self.manifest["stages"][stage]["info"])
        missing = [k for k in require if k not in info] if isinstance(info, dict) else require
        if missing or not isinstance(info, dict):
            raise CorruptDataError(f"{self.path / MANIFEST}: the finished stage {stage!r} lacks "
                                   f"{', '.join(map(repr, missing))}; pass --overwrite to "
                                   f"start the run afresh")
        return info

    def load_npz(self, name: str, keys=()) -> dict:
        """The arrays of a finished stage's ``name`` (.npz) as a dict, every one read;
        CorruptDataError naming the file when it is damaged or lacks one of ``keys``."""
        path = self.path / name
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # noqa: BLE001 - truncated zip, bad header, EOF, ...
            raise CorruptDataError(f"{path}: a finished stage's file is damaged "
                                   f"({type(exc).__name__}: {exc}); pass --overwrite to start "
                                   f"the run afresh") from None
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise CorruptDataError(f"{path}: a finished stage's file lacks "
                                   f"{', '.join(missing)}; pass --overwrite to start the run "
                                   f"afresh")
        return arrays

    def record(self, stage: str, files=(), *, depends_on=(), **info) -> None:
        """Mark ``stage`` finished, with the files it wrote and JSON-able ``info``.

        depends_on : names of settings beyond the run's identity that the stage's results
            depend on (e.g. the solver): a later run whose settings differ in one of them
            computes the stage again; one that differs only elsewhere (display options) keeps
            it. A stage without them depends on the identity alone.
        """
        files = [str(f) for f in files]
        # the files as written; one missing now has None: the stage stays not done
        prints = {f: _fingerprint(self.path / f) if (self.path / f).is_file() else None
                  for f in files}
        before = (self.manifest["stages"].get(stage), list(self.manifest["files"]))
        self.manifest["stages"][stage] = {
            "files": files, "info": _jsonable(info),
            "depends_on": {k: self.config.get(k) for k in depends_on},
            "fingerprints": prints}
        self._add_files(files, write=False)
        try:
            self._write()
        except BaseException:
            if self._on_disk:  # written; a held-back Ctrl-C was raised after: keep the stage
                raise
            # not on disk: neither in memory (close() judges by it)
            if before[0] is None:
                self.manifest["stages"].pop(stage, None)
            else:
                self.manifest["stages"][stage] = before[0]
            self.manifest["files"] = before[1]
            raise

    def forget(self, stage: str) -> None:
        """Unrecord ``stage`` (its files stay listed and are written over when it runs again):
        for a stage whose inputs are being computed afresh, so that a run stopped before it
        finishes again cannot pair the new inputs with its old results."""
        if self.manifest["stages"].pop(stage, None) is not None:
            self._write()

    def finish(self, drop=()) -> None:
        """Mark the run complete (a later run into this folder needs ``overwrite``), then
        delete ``drop``: files of partial stages that the final results replace."""
        self.manifest["complete"] = True
        self._write()
        if drop:
            self._delete(drop)
            gone = set(drop)
            self.manifest["files"] = [f for f in self.manifest["files"] if f not in gone]
            self._write()

    # -------------------------------------------------------------------------------------
    def _add_files(self, files, *, write: bool = True):
        new = [str(f) for f in files if str(f) not in self.manifest["files"]]
        if new:
            self.manifest["files"].extend(new)
            if write:
                self._write()

    def _write(self):
        """The manifest, atomically, with Ctrl-C and SIGTERM held back until it is on disk:
        a stage recorded in memory is then recorded on disk too (an interrupt in between
        had close() keep a manifest that listed no stage)."""
        self._on_disk = False
        try:
            with _signals_deferred():
                atomic_write_json(self.path / MANIFEST, self.manifest)
                self._on_disk = True
        except OSError as exc:
            raise ParameterError(f"output: cannot write to {self.path}: "
                                 f"{exc.strerror or exc}") from None

    def _read_manifest(self, overwrite: bool):
        f = self.path / MANIFEST
        self._damaged_ours = False
        if not f.exists():
            return None
        parsed, text = True, ""
        try:
            text = f.read_text()
            old = json.loads(text)
        except (OSError, ValueError):
            old, parsed = None, False
        if parsed and not (isinstance(old, dict) and MARKER in old):  # JSON, but not ours
            raise OutputExistsError(f"{f} is not an ntkcore run manifest; choose another --out")
        if _valid_manifest(old):
            if not old["stages"] and not old["complete"]:
                # a run killed before finishing any stage (SIGKILL, power loss): nothing of it
                # can be resumed, so it blocks nothing; its partial files go
                self._listed_before = list(old["files"])  # and their temp files
                self._delete(old["files"])
                f.unlink(missing_ok=True)
                return None
            return old
        # damaged (truncated, a field of the wrong type): where its marker still shows it is
        # ours, --overwrite starts afresh over the result files it can no longer list
        self._damaged_ours = f'"{MARKER}"' in text
        results = [n for n in LEGACY_FILES if (self.path / n).exists()]
        if overwrite and (self._damaged_ours or not results):
            return None  # start afresh (_open then lets the new run replace those files)
        if self._damaged_ours or not results:
            raise OutputExistsError(f"{f}: damaged run manifest; pass --overwrite to replace "
                                    f"the run or choose another --out")
        raise OutputExistsError(
            f"{f}: damaged, and nothing in it shows it is an ntkcore run manifest, so "
            f"--overwrite does not delete {', '.join(results)}: choose another --out, or move "
            f"them away yourself")

    def _refusal(self, old, old_identity, same):
        what = "finished results" if old["complete"] else "an unfinished run"
        if not same and old["command"] != self.command:
            diff = f"of `{old['command']}`"
        elif not same:
            diff = f"with other settings ({', '.join(_differing(old_identity, self.identity))})"
        else:
            diff = "of these settings"
        resume = "; rerun with its settings to resume it" if not (old["complete"] or same) else ""
        return (f"{self.path} already holds {what} {diff}{resume}; pass --overwrite to replace "
                f"it or choose another --out")

    def _delete(self, names):
        """Delete the plain entries ``names`` of this folder (a link itself, never its target;
        names with a folder part are skipped)."""
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                continue
            target = self.path / name
            if target.is_symlink() or target.is_file():
                try:
                    target.unlink()
                except OSError as exc:
                    raise ParameterError(f"output: cannot delete {target}: "
                                         f"{exc.strerror or exc}") from None

    def _remove_stale_temps(self, names) -> None:
        """Delete the temp files an earlier run killed mid-write left (``.<name>.XXXXXXXX.tmp``
        of :func:`_atomic_write`, for result names only; this run holds the lock)."""
        import re
        for name in set(names):
            pattern = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")
            for f in self.path.glob(f".{name}.*.tmp"):
                if pattern.fullmatch(f.name) and f.is_file() and not f.is_symlink():
                    f.unlink(missing_ok=True)


def _upgraded_legacy_config(old: dict, new: dict) -> dict:
    """The settings of a manifest written before run identities (ntkcore up to 2026-11-27),
    in today's terms, on the keys today's settings ``new`` have: the data entry without the
    "source" path it then carried (where data came from is no longer compared), and the device
    torch trains on, which those runs recorded as "device_resolved" (influence) or only as the
    typed "device" (distance, spectrum: "auto" is taken to resolve as it does now)."""
    out = {k: old.get(k) for k in new}
    if isinstance(out.get("data"), dict):
        out["data"] = {k: v for k, v in out["data"].items() if k != "source"}
    if "training_device" in new and "training_device" not in old:
        out["training_device"] = old.get("device_resolved")
    if "device_resolved" in new and "device_resolved" not in old and "device" in old:
        out["device_resolved"] = (old["device"] if old["device"] in ("cpu", "cuda")
                                  else new["device_resolved"])
    return out


def _differing(a: dict, b: dict) -> list:
    """Sorted keys whose values differ between the settings ``a`` and ``b``."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _fingerprint(path: Path) -> list:
    """[size, mtime in ns, CRC-32 of the bytes] of a stage file, taken when it is recorded
    (one read of a file just written, from the page cache: 0.45 s a GiB on the 2-core VM)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, _crc32(path)]


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _unchanged(path: Path, recorded) -> bool:
    """The file ``path`` is as :func:`_fingerprint` recorded it: same size, and the same mtime
    or else (a folder copied without its times, ``cp -r``) the same CRC-32, which then takes
    the new mtime. ``recorded`` ``...``: a stage recorded before fingerprints existed, judged
    by presence alone."""
    if recorded is ...:
        return True
    if not (isinstance(recorded, list) and len(recorded) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in recorded)):
        return False  # a hand-edited fingerprint: the file cannot be vouched for
    size, mtime, crc = recorded
    st = path.stat()  # OSError: the caller names the file
    if st.st_size != size:
        return False
    if st.st_mtime_ns == mtime:
        return True
    same = _crc32(path) == crc
    if same:
        recorded[1] = st.st_mtime_ns  # the next manifest write keeps it: read once
    return same


def _valid_manifest(m) -> bool:
    return (isinstance(m, dict) and isinstance(m.get("command"), str)
            and isinstance(m.get("config"), dict) and isinstance(m.get("complete"), bool)
            and isinstance(m.get("identity", {}), dict)
            and isinstance(m.get("files"), list) and isinstance(m.get("stages"), dict)
            and all(isinstance(v, dict) and isinstance(v.get("files"), list) and "info" in v
                    and isinstance(v.get("depends_on", {}), dict)
                    for v in m["stages"].values()))


def _acquire_lock(path: Path):
    """An exclusive advisory lock on ``path/.run.lock`` for this process (None where the
    platform has no fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        fh = open(path / LOCK, "a")
    except OSError as exc:
        raise ParameterError(f"output: cannot write to {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise OutputExistsError(f"{path} is in use by another ntkcore run; wait for it or "
                                f"choose another --out") from None
    return fh


def dataset_identity(ds) -> dict:
    """What identifies a run's data beyond the options typed: its name and a hash of the
    preprocessed rows, labels and subset indices (so a resume with other files behind the same
    --data-root is refused). Where the data was read from is not part of it: the same files
    under another path, or a command run from another folder, are the same data (see
    :func:`dataset_source` for the path, recorded for information)."""
    h = hashlib.blake2b(digest_size=16)
    for a in (ds.X_train, ds.y_train, ds.X_test, ds.y_test, ds.train_indices, ds.test_indices):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.data)
    return {"name": ds.name, "content_hash": h.hexdigest()}


def dataset_source(ds) -> str | None:
    """Where the data came from, for information: the absolute path of a folder it was read
    from, else the loader's fixed label ("sklearn.datasets.load_digits (embedded)", ...)."""
    if not ds.source:
        return None
    return os.path.abspath(ds.source) if os.path.isdir(ds.source) else ds.source


def check_folder_name(path):
    """``path`` unless it is blank or not a path: ParameterError (a blank name, say an unset
    shell variable, would write the run into the current folder)."""
    if not isinstance(path, (str, bytes, os.PathLike)) or not os.fsdecode(path).strip():
        raise ParameterError(f"output: expected a folder name, got {path!r}")
    return path


def _make_dir(path):
    """(Path, created): the folder, made if needed."""
    out = Path(check_folder_name(path))
    if out.exists() and not out.is_dir():
        raise ParameterError(f"output: expected a folder, got an existing file {out}")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ParameterError(f"output: cannot create the folder {out}: "
                             f"{exc.strerror or exc}") from None
    return out, created
