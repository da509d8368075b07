"""A stand-in ``cupy`` module on NumPy, so ntkcore's GPU code paths run in CI without a GPU.

It imitates the parts of CuPy that ntkcore touches, and is deliberately strict where CuPy is:

- device arrays are a wrapper type (``ndarray``), not NumPy arrays. ``numpy.asarray`` on one
  raises TypeError as in CuPy, so a silent host copy fails; ``.get()`` / ``asnumpy`` copy.
- ufuncs and functions reject host arrays mixed with device arrays, as CuPy does.
- a name CuPy does not have (module function, ``linalg`` / ``random`` function or array
  method) raises AttributeError, and keyword arguments are bound against the real CuPy
  signature, when the real CuPy package is importable (it imports without a GPU).
- ``empty`` / ``empty_like`` fill with NaN (integers with 0xA5 bytes) like uninitialised
  device memory, and allocations carry guard bytes that every kernel launch checks.
- ``linalg.cholesky`` does not raise on a matrix that is not positive definite (CuPy's
  default ``linalg='ignore'``): it returns the partial factor, as cuSOLVER's potrf does;
  only under ``cupyx.errstate(linalg='raise')`` does it raise LinAlgError.
- copies to the host with ``get(out=..., blocking=False)`` are queued on their stream and
  land only when waited for (``_Stream``), so a missing wait reads stale or NaN host memory;
  ``cupyx.empty_pinned`` gives a NaN-filled NumPy array.
- ``RawModule`` compiles the ``.cu`` source with g++ and runs it through the CPU execution
  model in ``cuda_sim.h`` (see ``kernels.py``).

Timings under the stand-in mean nothing and are never reported.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import types
import weakref

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

GUARD = 64           # guard bytes before and after each allocation
# host <-> device traffic since the shim was made: bytes each way and scalar reads (syncs)
TRAFFIC = {"to_device": 0, "to_host": 0, "scalar_reads": 0}
# device memory held by live arrays (each underlying buffer counted once) and its peak
MEMORY = {"live": 0, "peak": 0}
_held = {}  # id(buffer) -> weakref.finalize releasing its bytes


def _track(a):
    """Count the buffer under ``a`` as device memory until it is freed."""
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    if id(base) in _held or base.nbytes == 0:
        return
    nbytes = base.nbytes
    MEMORY["live"] += nbytes
    MEMORY["peak"] = max(MEMORY["peak"], MEMORY["live"])
    key = id(base)
    _held[key] = weakref.finalize(base, _release, key, nbytes)


def _release(key, nbytes):
    MEMORY["live"] -= nbytes
    _held.pop(key, None)


def _live_buffers():
    """(buffer, first usable byte, end) of every live device buffer; an allocation made by
    ``_alloc`` excludes its guard bytes."""
    for key, fin in list(_held.items()):
        found = fin.peek()
        if found is None:
            continue
        buf = found[0]
        guarded = _guarded.get(key) is buf
        yield buf, (GUARD if guarded else 0), buf.nbytes - (GUARD if guarded else 0)


def reset_peak():
    MEMORY["peak"] = MEMORY["live"]
GUARD_BYTE = 0x5A
_guarded = weakref.WeakValueDictionary()  # id(buffer) -> buffer with guard bytes


def _real_cupy():
    try:
        import cupy  # noqa: PLC0415 - the real package, for its names and signatures
        return cupy if not isinstance(cupy, Shim) else None
    except Exception:  # noqa: BLE001
        return None


REAL = None  # set by make_shim(): the real CuPy module, or None


# ----------------------------------------------------------------------------- arrays
def _alloc(shape, dtype, fill=None, order="C"):
    if order == "F":
        shape = tuple(int(s) for s in np.atleast_1d(shape))
        return _alloc(shape[::-1], dtype, fill).T
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in np.atleast_1d(shape)) if np.ndim(shape) else (
        (int(shape),) if not isinstance(shape, tuple) else shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.full(nbytes + 2 * GUARD, GUARD_BYTE, dtype=np.uint8)
    _guarded[id(buf)] = buf
    _track(buf)
    a = buf[GUARD:GUARD + nbytes].view(dtype).reshape(shape)
    if fill is None:
        if dtype.kind in "fc":
            a.fill(np.nan)
        else:
            a.view(np.uint8).fill(0xA5)
    else:
        a[...] = fill
    return a


def check_guards(arrays, what):
    """Raise if a kernel wrote outside the allocation of any of ``arrays``."""
    for a in arrays:
        base = a
        while base.base is not None:
            base = base.base
        if id(base) in _guarded and _guarded[id(base)] is base:
            if (base[:GUARD] != GUARD_BYTE).any() or (base[-GUARD:] != GUARD_BYTE).any():
                raise AssertionError(f"{what}: wrote outside an allocation (guard bytes "
                                     f"changed) of an array of shape {a.shape}")


def _upload(x):
    host = np.asarray(x)
    TRAFFIC["to_device"] += host.nbytes
    return host


def _is_host_array(x):
    return isinstance(x, np.ndarray) and x.ndim > 0


def _unwrap(x, where):
    if isinstance(x, ndarray):
        return x._a
    if _is_host_array(x):
        raise TypeError(f"{where}: unsupported type numpy.ndarray (a host array mixed with "
                        f"device arrays; CuPy raises here)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where) for v in x)
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):
        return ndarray(np.asarray(x))  # CuPy reductions and scalar indexing give 0-d arrays
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _check_name(namespace, name):
    if REAL is None:
        return
    real = REAL
    for part in namespace:
        real = getattr(real, part)
    if not hasattr(real, name):
        where = ".".join(("cupy",) + namespace + (name,))
        raise AttributeError(f"{where} does not exist in CuPy {REAL.__version__}")


def _check_call(namespace, name, args, kwargs):
    if REAL is None:
        return
    real = REAL
    for part in namespace + (name,):
        real = getattr(real, part)
    try:
        sig = inspect.signature(real)
    except (TypeError, ValueError):
        return  # a Cython function without a signature: names were checked already
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        where = ".".join(("cupy",) + namespace + (name,))
        raise TypeError(f"{where}{sig}: {exc}") from None


def _device_fn(fn, namespace, name):
    def call(*args, **kwargs):
        _check_call(namespace, name, args, kwargs)
        a = _unwrap(list(args), name)
        kw = {k: _unwrap(v, name) for k, v in kwargs.items()}
        return _wrap(fn(*a, **kw))
    call.__name__ = name
    return call


def _matmul(a, b, out=None, **kwargs):
    """CuPy 14's 2-D matmul: an operand that is neither C- nor F-contiguous is copied, and an
    ``out`` that is not C-contiguous gets a temporary result copied into it (the copies are
    device allocations and count in MEMORY)."""
    A, B = (_unwrap(x, "matmul") for x in (a, b))
    if kwargs:
        raise TypeError(f"matmul: unsupported arguments {sorted(kwargs)}")
    ops = [x if x.ndim != 2 or x.flags.c_contiguous or x.flags.f_contiguous
           else _device_copy(x, "C") for x in (A, B)]
    if out is None:
        return _wrap(np.matmul(*ops))
    target = out[0] if isinstance(out, tuple) else out
    if target._a.flags.c_contiguous:
        np.matmul(*ops, out=target._a)
    else:
        tmp = _alloc(target.shape, target.dtype)
        np.matmul(*ops, out=tmp)
        target._a[...] = tmp
    return target


def _stable_kind(kind):
    """CuPy sorts are always stable and accept no other kind."""
    if kind not in (None, "stable"):
        raise ValueError(f"kind={kind!r}: CuPy sorts accept only None or 'stable'")
    return "stable"


class _Pointer:
    def __init__(self, a):
        self.ptr = a.ctypes.data


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """Device array: a NumPy array that refuses implicit conversion to the host."""

    __array_priority__ = 100

    def __init__(self, a):
        self._a = a
        _track(a)

    # attributes CuPy arrays have
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: ndarray(self._a.T))
    data = property(lambda self: _Pointer(self._a))

    def get(self, stream=None, order="C", out=None, blocking=True):
        """Copy to the host; into ``out`` (checked as CuPy 14 checks it) on ``stream`` (default
        the current one), queued there when ``blocking=False`` (see _Stream)."""
        if out is None:
            TRAFFIC["to_host"] += self._a.nbytes
            return np.array(self._a, order=order)
        if not isinstance(out, np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        if self.dtype != out.dtype:
            raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
        if self.shape != out.shape:
            raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, "
                             f"actual shape: {out.shape}")
        src = self._a
        if not (out.flags.c_contiguous and src.flags.c_contiguous
                or out.flags.f_contiguous and src.flags.f_contiguous):
            if not (out.flags.c_contiguous or out.flags.f_contiguous):
                raise RuntimeError("`out` cannot be specified when copying to non-contiguous "
                                   "ndarray")
            src = _device_copy(src, "C" if out.flags.c_contiguous else "F")

        def copy():
            TRAFFIC["to_host"] += src.nbytes
            np.copyto(out, src)
        stream = stream if stream is not None else _current_stream()
        if blocking:
            stream.synchronize()
            copy()
        else:
            stream._enqueue(copy)
        return out

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out")
        if ufunc is np.matmul and method == "__call__":
            return _matmul(*inputs, **kwargs)
        a = _unwrap(list(inputs), ufunc.__name__)
        kw = {k: _unwrap(v, ufunc.__name__) for k, v in kwargs.items()}
        result = getattr(ufunc, method)(*a, **kw)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        mod = func.__module__ or "numpy"
        namespace = tuple(p for p in mod.split(".")[1:] if not p.startswith("_"))
        _check_name(namespace, func.__name__)
        out = kwargs.get("out")
        a = _unwrap(list(args), func.__name__)
        kw = {k: _unwrap(v, func.__name__) for k, v in kwargs.items()}
        result = func(*a, **kw)
        return out if out is not None else _wrap(result)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, "indexing")])

    def __setitem__(self, key, value):
        v = value._a if isinstance(value, ndarray) else value
        self._a[_unwrap(key, "indexing")] = v

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def _scalar(self, kind):
        TRAFFIC["scalar_reads"] += 1
        TRAFFIC["to_host"] += self._a.itemsize
        return kind(self._a)

    def __float__(self):
        return self._scalar(float)

    def __int__(self):
        return self._scalar(int)

    def __bool__(self):
        return self._scalar(bool)

    def __complex__(self):
        return self._scalar(complex)

    def __repr__(self):
        return f"sim_cupy.{self._a!r}"

    def argsort(self, axis=-1, kind=None):
        return ndarray(self._a.argsort(axis=axis, kind=_stable_kind(kind)))

    def sort(self, axis=-1, kind=None):
        self._a.sort(axis=axis, kind=_stable_kind(kind))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if REAL is not None and not hasattr(REAL.ndarray, name):
            raise AttributeError(f"cupy.ndarray has no attribute {name!r}")
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            a = _unwrap(list(args), name)
            kw = {k: _unwrap(v, name) for k, v in kwargs.items()}
            result = attr(*a, **kw)
            return None if result is None else _wrap(result)
        return method


# ----------------------------------------------------------------------------- namespaces
class _Namespace(types.ModuleType):
    """Module-like namespace: explicit entries first, else the NumPy function of that name."""

    def __init__(self, name, numpy_ns, path, **entries):
        super().__init__(name)
        self._np = numpy_ns
        self._path = path
        self.__dict__.update(entries)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        _check_name(self._path, name)
        obj = getattr(self._np, name)
        if isinstance(obj, type) or not callable(obj):
            return obj  # dtypes, constants
        return _device_fn(obj, self._path, name)


_LINALG_MODE = {"linalg": "ignore"}


@contextlib.contextmanager
def errstate(*, linalg=None, **others):
    if others:
        raise NotImplementedError(f"cupyx.errstate{tuple(others)}")
    old = dict(_LINALG_MODE)
    if linalg is not None:
        _LINALG_MODE["linalg"] = linalg
    try:
        yield
    finally:
        _LINALG_MODE.update(old)


def _device_copy(a, order):
    out = _alloc(a.shape, a.dtype, fill=0, order=order)
    out[...] = a
    return out


def _cholesky(a):
    """cuSOLVER potrf as CuPy 14 calls it: on a new C-order copy of ``a`` (the input is never
    overwritten), the partial factor on failure unless linalg='raise'."""
    x = _device_copy(a._a, "C")
    potrf = (scipy.linalg.lapack.dpotrf if x.dtype == np.float64 else
             scipy.linalg.lapack.spotrf)
    c, info = potrf(x, lower=True, clean=True)
    if info != 0 and _LINALG_MODE["linalg"] == "raise":
        raise np.linalg.LinAlgError(f"Error reported by potrf in cuSOLVER. devInfo = {info}.")
    x[...] = np.tril(c)
    return ndarray(x)


def _solve_triangular(a, b, trans=0, lower=False, unit_diagonal=False, overwrite_b=False,
                      check_finite=False):
    """cupyx.scipy.linalg.solve_triangular as in CuPy 14: ``a`` is copied to Fortran order
    unless it is already F-contiguous; ``b`` is copied to Fortran order unless overwrite_b and
    F-contiguous; the solution is returned in (that) ``b``, F-ordered."""
    A = a._a if a._a.flags.f_contiguous else _device_copy(a._a, "F")
    B = b._a if overwrite_b and b._a.flags.f_contiguous else _device_copy(b._a, "F")
    trans = {"N": 0, "T": 1, "C": 2}.get(trans, trans)
    B[...] = scipy.linalg.solve_triangular(A, B, trans=trans, lower=lower,
                                           unit_diagonal=unit_diagonal, check_finite=False)
    return ndarray(B)


class _Generator:
    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        fn = getattr(self._g, name)

        def call(*args, **kwargs):
            return _wrap(fn(*_unwrap(list(args), name),
                            **{k: _unwrap(v, name) for k, v in kwargs.items()}))
        return call


class _Device:
    def __init__(self, device=0):
        self.id = int(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass


class _Stream:
    """``cupy.cuda.Stream``. Kernels and CuPy calls run at once, whatever the stream; a copy
    to the host issued with ``blocking=False`` is queued on its stream and runs only when that
    stream is synchronized or an event recorded on it after the copy is waited for
    (``Event.synchronize``, ``Stream.wait_event``). That is the slowest copy engine CUDA
    allows, so code missing a wait reads stale (or NaN, unwritten) host memory, or has its
    device source overwritten before the copy, instead of passing by luck."""

    null = None  # set below: the legacy default stream

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self._queue = []   # (sequence number, copy) not yet run
        self._issued = 0   # sequence number of the last queued copy

    def _enqueue(self, fn):
        self._issued += 1
        self._queue.append((self._issued, fn))

    def _run_until(self, seq):
        while self._queue and self._queue[0][0] <= seq:
            self._queue.pop(0)[1]()

    def synchronize(self):
        self._run_until(self._issued)

    def record(self, event=None):
        event = _Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        event._complete()

    def use(self):
        _CURRENT[-1] = self
        return self

    def __enter__(self):
        _CURRENT.append(self)
        return self

    def __exit__(self, *exc):
        _CURRENT.pop()
        return False


_Stream.null = _Stream(null=True)
_CURRENT = [_Stream.null]  # the current stream is the last entry (``with stream:`` pushes)


def _current_stream(device_id=-1):
    return _CURRENT[-1]


class _Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.t = None
        self._stream, self._seq = None, 0

    def record(self, stream=None):
        self.t = time.perf_counter()
        self._stream = _current_stream() if stream is None else stream
        self._seq = self._stream._issued

    def _complete(self):
        if self._stream is not None:
            self._stream._run_until(self._seq)

    def synchronize(self):
        self._complete()


def empty_pinned(shape, dtype=float, order="C"):
    """``cupyx.empty_pinned``: a host (NumPy) array, NaN-filled like ``empty``."""
    a = np.empty(shape, dtype=dtype, order=order)
    if a.dtype.kind in "fc":
        a.fill(np.nan)
    return a


class _Pool:
    def free_all_blocks(self):
        pass

    def free_bytes(self):
        return 0

    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0


class Shim(types.ModuleType):
    """The stand-in ``cupy`` module (see the module docstring)."""

    ndarray = ndarray

    def __init__(self, free_bytes=8 << 30, total_bytes=16 << 30):
        super().__init__("cupy")
        from . import kernels
        self.__version__ = "sim-" + (REAL.__version__ if REAL is not None else "none")
        self.free_bytes, self.total_bytes = free_bytes, total_bytes
        runtime = types.SimpleNamespace(
            getDeviceCount=lambda: 1,
            memGetInfo=lambda: (self.free_bytes, self.total_bytes),
            getDeviceProperties=lambda i: {"name": b"simulated (CPU)", "multiProcessorCount": 1,
                                           "totalGlobalMem": self.total_bytes},
            runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0)
        memory = types.SimpleNamespace(OutOfMemoryError=MemoryError)
        _Stream.null.__init__()
        _CURRENT[:] = [_Stream.null]
        from .blas import make_libs
        self.cublas_lib, self.cusolver_lib, device = make_libs(_live_buffers)
        self.cuda = types.SimpleNamespace(
            runtime=runtime, memory=memory, Device=_Device, Event=_Event, Stream=_Stream,
            device=device, get_current_stream=_current_stream,
            get_elapsed_time=lambda a, b: 1e3 * (b.t - a.t))
        self.linalg = _Namespace("cupy.linalg", np.linalg, ("linalg",), cholesky=_cholesky)
        self.random = _Namespace("cupy.random", np.random, ("random",),
                                 default_rng=_Generator)
        self.RawModule = kernels.SimModule
        self._pool = _Pool()

    def get_default_memory_pool(self):
        return self._pool

    def asarray(self, a, dtype=None, order=None):
        if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        host = a._a if isinstance(a, ndarray) else _upload(a)
        out = _alloc(host.shape, dtype or host.dtype, fill=0)
        out[...] = host
        return ndarray(out)

    def array(self, obj, dtype=None, copy=True, order="K", subok=False, ndmin=0):
        if not copy:
            return self.asarray(obj, dtype=dtype)
        host = obj._a if isinstance(obj, ndarray) else _upload(obj)
        out = _alloc(host.shape, dtype or host.dtype, fill=0)
        out[...] = host
        return ndarray(out)

    def asnumpy(self, a, stream=None, order="C", out=None):
        return a.get() if isinstance(a, ndarray) else np.asarray(a)

    @property
    def traffic(self):
        """Host <-> device traffic so far: {"to_device", "to_host": bytes, "scalar_reads"}."""
        return dict(TRAFFIC)

    def empty(self, shape, dtype=float, order="C"):
        return ndarray(_alloc(shape, dtype, order=order))

    def zeros(self, shape, dtype=float, order="C"):
        return ndarray(_alloc(shape, dtype, fill=0, order=order))

    def ones(self, shape, dtype=float, order="C"):
        return ndarray(_alloc(shape, dtype, fill=1, order=order))

    def full(self, shape, fill_value, dtype=None, order="C"):
        dtype = np.result_type(fill_value) if dtype is None else dtype
        return ndarray(_alloc(shape, dtype, fill=fill_value, order=order))

    def empty_like(self, a, dtype=None, order="K", subok=None, shape=None):
        return self.empty(a.shape if shape is None else shape, dtype or a.dtype)

    def zeros_like(self, a, dtype=None, order="K", subok=None, shape=None):
        return self.zeros(a.shape if shape is None else shape, dtype or a.dtype)

    def full_like(self, a, fill_value, dtype=None, order="K", subok=None, shape=None):
        return self.full(a.shape if shape is None else shape, fill_value, dtype or a.dtype)

    def matmul(self, a, b, out=None, **kwargs):
        return _matmul(a, b, out=out, **kwargs)

    def einsum(self, subscripts, *operands, **kwargs):
        """CuPy 14's two-operand einsum reduces through a batched GEMM whose stride helper
        needs C-contiguous operands with the kept (output) indices first: an operand not
        already so is copied (a device allocation, counted in MEMORY, freed after)."""
        _check_call((), "einsum", (subscripts,) + operands, kwargs)
        arrays = [_unwrap(x, "einsum") for x in operands]
        ins, _, out = subscripts.replace(" ", "").partition("->")
        specs = ins.split(",")
        copies = []  # alive together until the product is done, as in CuPy
        if len(arrays) == 2:
            for spec, a in zip(specs, arrays):
                order = [spec.index(c) for c in out if c in spec] + \
                        [i for i, c in enumerate(spec) if c not in out]
                if a.ndim >= 2 and not np.transpose(a, order).flags.c_contiguous:
                    copies.append(_device_copy(np.transpose(a, order), "C"))
        result = _wrap(np.einsum(subscripts, *arrays, **kwargs))
        del copies
        return result

    def argsort(self, a, axis=-1, kind=None):
        return a.argsort(axis=axis, kind=kind)

    def sort(self, a, axis=-1, kind=None):
        out = ndarray(a._a.copy())
        out.sort(axis=axis, kind=kind)
        return out

    def ascontiguousarray(self, a, dtype=None):
        a = self.asarray(a)
        if a._a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        out = _alloc(a.shape, dtype or a.dtype, fill=0)
        out[...] = a._a
        return ndarray(out)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        _check_name((), name)
        obj = getattr(np, name)
        if isinstance(obj, type) or not callable(obj):
            return obj
        return _device_fn(obj, (), name)


def make_shim(**kwargs):
    """The stand-in ``cupy`` and ``cupyx`` modules (call before patching sys.modules)."""
    global REAL
    REAL = _real_cupy()
    cp = Shim(**kwargs)
    cupyx = types.ModuleType("cupyx")
    cupyx.errstate = errstate
    cupyx.empty_pinned = empty_pinned
    cupyx.scipy = types.ModuleType("cupyx.scipy")
    cupyx.scipy.linalg = types.ModuleType("cupyx.scipy.linalg")
    cupyx.scipy.linalg.solve_triangular = _solve_triangular
    return cp, cupyx


def install(monkeypatch, **kwargs):
    """Make ntkcore (and ``import cupy`` in this process) see the stand-in; returns it."""
    import ntkcore.backend as backend
    cp, cupyx = make_shim(**kwargs)
    monkeypatch.setattr(backend, "_cupy", lambda: cp)
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas, libs.cusolver = cp.cublas_lib, cp.cusolver_lib
    cuda = types.ModuleType("cupy_backends.cuda")
    cuda.libs = libs
    backends = types.ModuleType("cupy_backends")
    backends.cuda = cuda
    for name, mod in (("cupy", cp), ("cupyx", cupyx), ("cupyx.scipy", cupyx.scipy),
                      ("cupyx.scipy.linalg", cupyx.scipy.linalg), ("cupy_backends", backends),
                      ("cupy_backends.cuda", cuda), ("cupy_backends.cuda.libs", libs),
                      ("cupy_backends.cuda.libs.cublas", cp.cublas_lib),
                      ("cupy_backends.cuda.libs.cusolver", cp.cusolver_lib)):
        monkeypatch.setitem(sys.modules, name, mod)
    return cp
