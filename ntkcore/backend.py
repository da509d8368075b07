"""The single place that decides CPU (NumPy/SciPy + Numba) versus GPU (CuPy).

Everything else asks this module for the array module ``xp`` and the few dense linear-algebra
calls it needs, so no other file imports CuPy or SciPy's LAPACK wrappers directly.

Dispatch rule: NumPy arrays run on the CPU, CuPy arrays run on the GPU; a function that
allocates takes ``device="auto" | "cpu" | "cuda"`` and "auto" means the GPU when CuPy imports
*and* a device is present. Nothing is copied between host and device silently.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BackendError, ParameterError

DEVICES = ("auto", "cpu", "cuda")


@functools.lru_cache(maxsize=1)
def _cupy():
    """CuPy if it imports and sees at least one GPU, else None (cached per process)."""
    if os.environ.get("NTKCORE_DISABLE_CUDA") or not _driver_present():
        return None
    try:
        import cupy  # noqa: PLC0415 - optional, heavy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # ImportError, CUDARuntimeError without a driver, ...
        return None


def _driver_present() -> bool:
    """False where no GPU can be: Linux without the CUDA driver library (0.2 ms), so a CPU
    machine does not import CuPy (0.2 s and ~170 MB) only to learn that. True elsewhere
    (CuPy's own device count decides)."""
    if "cupy" in sys.modules or not sys.platform.startswith("linux"):
        return True
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def gpu_available() -> bool:
    """True when CuPy imports and a CUDA device is visible."""
    return _cupy() is not None


def is_gpu_array(x: Any) -> bool:
    """``x`` is a CuPy array. Without CuPy imported it cannot be one: nothing is imported."""
    if "cupy" not in sys.modules:
        return False
    cp = _cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def resolve_device(device: str = "auto") -> str:
    """Map "auto" | "cpu" | "cuda" to the device that will actually run ("cpu" or "cuda")."""
    if device not in DEVICES:
        raise ParameterError(f"device: expected one of {DEVICES}, got {device!r}")
    if device == "cuda" and not gpu_available():
        raise BackendError("device='cuda' requested but no CUDA GPU is usable here "
                           "(install ntkcore[cuda12] or [cuda13] and check `ntkcore info`)")
    if device == "auto":
        return "cuda" if gpu_available() else "cpu"
    return device


#: Entries per row block of Backend.sum_of_squares on the GPU (1 << 24: 128 MB of float64).
SUM_SQ_BLOCK_ENTRIES = 1 << 24


@dataclass(frozen=True)
class Backend:
    """Array module plus the dense linear algebra the solvers use, for one device."""

    name: str  # "cpu" or "cuda"

    @property
    def xp(self):
        return _cupy() if self.name == "cuda" else np

    def asarray(self, x, dtype=None):
        """Move ``x`` onto this backend's device (explicit, never implicit)."""
        if self.name == "cuda":
            return _cupy().asarray(x, dtype=dtype)
        if is_gpu_array(x):
            x = x.get()
        return np.asarray(x, dtype=dtype)

    def cholesky(self, A, *, overwrite: bool = False):
        """Lower Cholesky factor L of SPD ``A`` (L L^T = A). Raises LinAlgError when not SPD.

        ``overwrite``: A may be destroyed; on the CPU L is then A's memory (a C-order A is
        factored through its transpose, from the triangle above its diagonal)."""
        if self.name == "cuda":
            # CuPy's default (linalg="ignore") returns cuSOLVER's partial factor, finite and
            # wrong, when A is not positive definite: ask for potrf's devInfo to be checked.
            import cupyx  # noqa: PLC0415 - optional, heavy; beside cupy
            with cupyx.errstate(linalg="raise"):
                return _cupy().linalg.cholesky(A)
        import scipy.linalg as sla
        overwrite = overwrite and A.flags.writeable  # f2py would write a read-only array
        if overwrite and A.flags.c_contiguous and not A.flags.f_contiguous:
            # LAPACK works in Fortran order and SciPy copies a C-order A into it: one more
            # n x n array, and time. A is symmetric, so A.T is the same matrix as a free
            # Fortran-order view, factored in place (potrf reads A's upper triangle then).
            A = A.T
        return sla.cholesky(A, lower=True, overwrite_a=overwrite, check_finite=False)

    def solve_triangular(self, L, B, *, lower: bool = True, trans: int = 0,
                         overwrite_b: bool = False):
        """Solve op(L) X = B with op = identity (trans=0) or transpose (trans=1)."""
        if self.name == "cuda":
            from cupyx.scipy.linalg import solve_triangular
            if L.flags.c_contiguous and not L.flags.f_contiguous:
                # cuBLAS trsm reads Fortran order, and CuPy copies a C-order L to get it (one
                # more n x n array); L^T is a free F-order view of the opposite triangle.
                L, lower, trans = L.T, not lower, 1 - trans
            return solve_triangular(L, B, lower=lower, trans=trans, overwrite_b=overwrite_b)
        import scipy.linalg as sla
        return sla.solve_triangular(L, B, lower=lower, trans=trans, overwrite_b=overwrite_b,
                                    check_finite=False)

    def eigvalsh(self, A):
        return self.xp.linalg.eigvalsh(A)

    def sum_of_squares(self, M, axis: int):
        """(M * M).sum(axis) of a 2-D M, without an M-sized temporary.

        CPU: NumPy's einsum (no copy). GPU: row blocks of at most SUM_SQ_BLOCK_ENTRIES entries
        (128 MB): CuPy's einsum hands a reduction over rows to a batched GEMM that copies both
        operands into C order (two extra n x n arrays for diag(A^-1) = column norms of L^-1),
        and M * M is a full temporary.
        """
        if self.name == "cpu":
            return np.einsum("ij,ij->j" if axis == 0 else "ij,ij->i", M, M)
        xp = self.xp
        rows = max(1, SUM_SQ_BLOCK_ENTRIES // max(1, M.shape[1]))
        out = xp.zeros(M.shape[1 - axis], dtype=M.dtype)
        for r0 in range(0, M.shape[0], rows):
            blk = M[r0:r0 + rows]
            if axis == 0:
                out += (blk * blk).sum(axis=0)
            else:
                out[r0:r0 + rows] = (blk * blk).sum(axis=1)
        return out

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU): host clocks around GPU work
        read nothing without it."""
        if self.name == "cuda":
            _cupy().cuda.Stream.null.synchronize()

    def empty_pinned(self, shape, dtype=np.float64):
        """Uninitialised host array; page-locked on CUDA (``cupyx.empty_pinned``), the target
        an asynchronous device-to-host copy needs to run at the link's full speed."""
        if self.name == "cuda":
            import cupyx  # noqa: PLC0415 - optional, heavy; beside cupy
            return cupyx.empty_pinned(shape, dtype=dtype)
        return np.empty(shape, dtype=dtype)

    def to_host(self, x):
        return x.get() if is_gpu_array(x) else np.asarray(x)

    def free_memory_bytes(self) -> int:
        """Bytes a new allocation can use on this device (host: available RAM).

        Capped by the environment variable NTKCORE_MEMORY_LIMIT (bytes) when set, so users on
        shared machines (and tests) can impose a budget below what the device reports.
        """
        if self.name == "cuda":
            free, _total = _cupy().cuda.runtime.memGetInfo()
            free = int(free + _cupy().get_default_memory_pool().free_bytes())
        else:
            free = host_available_bytes()
        limit = memory_limit_from_env()
        return free if limit is None else min(free, limit)


def memory_limit_from_env() -> int | None:
    """NTKCORE_MEMORY_LIMIT as bytes (None when unset or blank), or ParameterError unless it
    is a finite number >= 1 (such as 8e9)."""
    import math
    text = os.environ.get("NTKCORE_MEMORY_LIMIT", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 1):
        raise ParameterError(f"NTKCORE_MEMORY_LIMIT: expected a number of bytes >= 1 (such as "
                             f"8e9), got {text!r}")
    return int(value)


def host_available_bytes() -> int:
    """Available host memory (MemAvailable from /proc/meminfo; sysconf fallback)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def backend_for(*arrays, device: str = "auto") -> Backend:
    """The backend for these inputs: CUDA when any is a CuPy array, else by ``device``.

    Mixing CuPy and NumPy inputs is an error rather than a silent copy.
    """
    on_gpu = [is_gpu_array(a) for a in arrays if a is not None]
    if any(on_gpu):
        if not all(on_gpu):
            raise BackendError("inputs mix CuPy (GPU) and NumPy (host) arrays; move them to one "
                               "device explicitly")
        return Backend("cuda")
    if device == "auto":
        # Host inputs stay on the host unless the caller asks for the GPU explicitly.
        return Backend("cpu")
    return Backend(resolve_device(device))


def get_backend(device: str = "auto") -> Backend:
    """Backend for a function that allocates from scratch (no array inputs)."""
    return Backend(resolve_device(device))
