"""What ``ntkcore info`` reports: versions, working backends, and where the data sets are."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform

from ._units import format_bytes


def _version(pkg):
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _numba_status():
    try:
        import numba
        from numba import njit

        @njit(cache=False)
        def _probe(x):
            return x + 1

        _probe(1)
        return {"ok": True, "version": numba.__version__, "threads": numba.config.NUMBA_NUM_THREADS}
    except Exception as exc:  # noqa: BLE001 - report, don't fail
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _cupy_status():
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "error": f"CuPy not importable ({type(exc).__name__}); install "
                                      f"ntkcore[cuda12] or ntkcore[cuda13] on a GPU machine"}
    try:
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return {"ok": False, "version": cupy.__version__, "error": "no CUDA device"}
        props = cupy.cuda.runtime.getDeviceProperties(0)
        free, total = cupy.cuda.runtime.memGetInfo()
        return {"ok": True, "version": cupy.__version__, "devices": n,
                "name": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                "free_gib": free / 2**30, "total_gib": total / 2**30}
    except Exception as exc:  # noqa: BLE001
        return {"ok": False, "version": cupy.__version__, "error": f"{type(exc).__name__}: {exc}"}


def _blas_status():
    try:
        from threadpoolctl import threadpool_info
        return [{"api": p.get("internal_api"), "threads": p.get("num_threads"),
                 "arch": p.get("architecture")} for p in threadpool_info()]
    except Exception:  # noqa: BLE001
        return []


def _memory_limit_status() -> dict | None:
    """NTKCORE_MEMORY_LIMIT as the planners read it, or the error a bad value gives (None
    when unset): ``info`` is where a user looks when every command refuses the value."""
    from .backend import memory_limit_from_env
    from .errors import NtkcoreError
    try:
        limit = memory_limit_from_env()
    except NtkcoreError as exc:
        return {"ok": False, "error": str(exc)}
    return None if limit is None else {"ok": True, "bytes": limit}


def collect_info(data_root=None) -> dict:
    from .backend import host_available_bytes
    from .data import check_root_type, dataset_status
    check_root_type(data_root)
    return {
        "versions": {"python": platform.python_version(),
                     **{p: _version(p) for p in ("ntkcore", "numpy", "scipy", "numba", "torch",
                                                 "torchvision", "cupy-cuda12x", "cupy-cuda13x")}},
        "cpu": {"cores": os.cpu_count(), "available_memory_gib": host_available_bytes() / 2**30,
                "blas": _blas_status()},
        "memory_limit": _memory_limit_status(),
        "numba": _numba_status(),
        "cuda": _cupy_status(),
        "datasets": [{"name": name, "found": path} for name, path in dataset_status(data_root)],
        "data_root": None if data_root is None else {
            "path": str(data_root), "is_dir": os.path.isdir(os.path.expanduser(data_root)),
            "exists": os.path.exists(os.path.expanduser(data_root))},
    }


def format_info(info: dict) -> str:
    lines = ["versions:"]
    lines += [f"  {k}: {v}" for k, v in info["versions"].items() if v]
    cpu = info["cpu"]
    lines.append(f"cpu: {cpu['cores']} cores, "
                 f"{format_bytes(cpu['available_memory_gib'] * 2**30)} available")
    for b in cpu["blas"]:
        lines.append(f"  blas: {b['api']} ({b['arch']}), {b['threads']} threads")
    limit = info.get("memory_limit")
    if limit is not None:
        lines.append(f"memory limit: {format_bytes(limit['bytes'])} (NTKCORE_MEMORY_LIMIT)"
                     if limit["ok"] else f"memory limit: NOT usable: {limit['error']}")
    nb = info["numba"]
    lines.append(f"numba: {'ok ' + nb['version'] + ', ' + str(nb['threads']) + ' threads' if nb['ok'] else 'NOT usable: ' + nb['error']}")
    cu = info["cuda"]
    if cu["ok"]:
        lines.append(f"cuda: {cu['name']} x{cu['devices']}, {format_bytes(cu['free_gib'] * 2**30)}"
                     f" of {format_bytes(cu['total_gib'] * 2**30)} free (CuPy {cu['version']})")
    else:
        lines.append(f"cuda: not available — {cu['error']}")
    lines.append("datasets:")
    root = info.get("data_root")
    if root is not None and not root["is_dir"]:
        what = "is not a folder" if root["exists"] else "does not exist"
        lines.append(f"  data root {root['path']}: {what}; only the default folders were "
                     f"searched")
    for d in info["datasets"]:
        lines.append(f"  {d['name']}: {d['found'] or 'not found (see --data-root / --download)'}")
    return "\n".join(lines)
