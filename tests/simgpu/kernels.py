"""``RawModule`` for the CuPy stand-in: ntkcore's .cu sources compiled by g++ and run on the CPU.

The source is compiled unchanged except for two rewrites: ``extern __shared__ T name[];``, the
dynamic shared memory, becomes a pointer to a per-launch buffer, and every shared array is
registered where it is declared, so that each block starts with it poisoned (all bits set).
``cuda_sim.h`` is force-included for the CUDA built-ins. For every ``extern "C" __global__`` kernel a thunk
``ntk_sim_call_<name>(void** args)`` is generated from its parameter list, so a launch passes
the arguments exactly as typed in the source. Before the launch every argument is checked
against its parameter: a pointer needs a device array of the pointee's dtype, ``long long``
needs numpy.int64, ``int`` numpy.int32, a real the kernel's own dtype (the mistakes CuPy would
let through as silently misread bytes). After it, the guard bytes around every array argument
are checked for out-of-bounds writes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "cuda_sim.h")
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?'
                     r'(\w+)\s*\(([^)]*)\)', re.S)
_DYN_SHARED = re.compile(r"extern\s+__shared__\s+([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SHARED = re.compile(r"(__shared__\s+[\w ]+?\s+(\w+)\s*(?:\[[^\];]*\])+\s*;)")
_SCALARS = {"long long": np.int64, "int": np.int32, "unsigned int": np.uint32,
            "double": np.float64, "float": np.float32}
_CTYPES = {np.int64: ctypes.c_int64, np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32,
           np.float64: ctypes.c_double, np.float32: ctypes.c_float}


def compiler():
    """The C++ compiler the simulator uses, or None."""
    return shutil.which(os.environ.get("CXX", "g++"))


def _parse_params(text, real):
    """[(c_type, numpy_dtype, is_pointer)] of a kernel's parameter list."""
    params = []
    for raw in text.split(","):
        decl = re.sub(r"\b(__restrict__|const)\b", " ", raw)
        decl = " ".join(decl.replace("*", " * ").split())
        pointer = "*" in decl
        base = decl.replace("*", " ").split()[:-1]  # drop the parameter name
        base = " ".join(base)
        base = real if base == "real_t" else base
        if base not in _SCALARS:
            raise NotImplementedError(f"kernel parameter type {raw.strip()!r}")
        ctype = raw.rsplit(None, 1)[0].replace("__restrict__", "").strip()
        params.append((ctype, np.dtype(_SCALARS[base]), pointer))
    return params


@functools.lru_cache(maxsize=None)
def _accepts(flag: str) -> bool:
    """Whether the C++ compiler takes ``flag`` (GCC >= 12 for -ftrivial-auto-var-init)."""
    proc = subprocess.run([compiler(), flag, "-x", "c++", "-fsyntax-only", "-"],
                          input="int main() { return 0; }", capture_output=True, text=True)
    return proc.returncode == 0


@functools.lru_cache(maxsize=None)
def _build(code: str, options: tuple):
    defines = dict(o[2:].split("=", 1) for o in options if o.startswith("-D"))
    real = defines.get("NTK_REAL", "double")
    kernels = {name: _parse_params(params, real) for name, params in _KERNEL.findall(code)}
    body = _DYN_SHARED.sub(r"\1* \2 = (\1*)ntk_sim::dynamic_shared; "
                           r"ntk_sim_register_shared(\2, ntk_sim::dynamic_bytes);", code)
    body = _STATIC_SHARED.sub(r"\1 ntk_sim_register_shared(\2, sizeof(\2));", body)
    thunks = []
    for name, params in kernels.items():
        args = ", ".join(f"*({ctype}*)a[{k}]" for k, (ctype, _, _) in enumerate(params))
        thunks.append(f'extern "C" void ntk_sim_call_{name}(void** a) {{ {name}({args}); }}')
    src = body + "\n" + "\n".join(thunks) + "\n"
    # locals a kernel reads before writing hold a fixed non-zero pattern, not a lucky 0
    poison = (["-ftrivial-auto-var-init=pattern"]
              if _accepts("-ftrivial-auto-var-init=pattern") else [])
    flags = ["-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-w", *poison, "-include", HEADER,
             *(o for o in options if o.startswith("-D"))]
    with open(HEADER) as fh:
        header = fh.read()
    key = hashlib.sha256((src + repr(flags) + header).encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), f"ntkcore-cudasim-{os.getuid()}")
    os.makedirs(folder, exist_ok=True)
    lib = os.path.join(folder, f"{key}.so")
    if not os.path.exists(lib):
        cpp = os.path.join(folder, f"{key}.cpp")
        with open(cpp, "w") as fh:
            fh.write(src)
        cmd = [compiler(), *flags, cpp, "-o", lib + ".tmp"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"simulated NVRTC (g++) failed:\n{proc.stderr[-4000:]}")
        os.replace(lib + ".tmp", lib)
    return ctypes.CDLL(lib), kernels


class SimModule:
    """``cupy.RawModule(code=..., options=...)`` on the CPU execution model."""

    def __init__(self, code=None, options=(), **kwargs):
        self.code, self.options = code, tuple(options)

    def compile(self, log_stream=None):
        _build(self.code, self.options)

    def get_function(self, name):
        lib, kernels = _build(self.code, self.options)
        if name not in kernels:
            raise AttributeError(f"no kernel {name!r} in the module")
        return SimKernel(lib, name, kernels[name])


#: CUDA's launch limits (every GPU since compute capability 3.0): grid.x <= 2^31 - 1, grid.y
#: and grid.z <= 65535, <= 1024 threads per block (block.z <= 64), and 48 KiB of shared memory
#: per block without an opt-in (dynamic here; a kernel's static part comes on top)
GRID_MAX = (2**31 - 1, 65535, 65535)
THREADS_MAX, BLOCK_Z_MAX, SHARED_MAX = 1024, 64, 48 * 1024


def _check_launch(name, grid, block, shared_mem):
    """RuntimeError, as the CUDA driver's launch failure, for a launch a GPU refuses."""
    if any(not 1 <= g <= top for g, top in zip(grid, GRID_MAX)) or \
            block[0] * block[1] * block[2] > THREADS_MAX or block[2] > BLOCK_Z_MAX:
        raise RuntimeError(f"{name}: invalid configuration argument (grid {grid}, block "
                           f"{block})")
    if int(shared_mem) > SHARED_MAX:
        raise RuntimeError(f"{name}: too many resources requested for launch ({shared_mem} "
                           f"bytes of dynamic shared memory)")


class SimKernel:
    def __init__(self, lib, name, params):
        self.name, self.params = name, params
        self._lib = lib
        self._thunk = ctypes.cast(getattr(lib, f"ntk_sim_call_{name}"), ctypes.c_void_p)

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
        from .cupy_shim import check_guards, ndarray
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(self.params)} "
                            f"parameters")
        holders, arrays = [], []
        for k, (arg, (ctype, dtype, pointer)) in enumerate(zip(args, self.params)):
            where = f"{self.name} argument {k} ({ctype})"
            if pointer:
                if not isinstance(arg, ndarray):
                    raise TypeError(f"{where}: expected a device array, got {type(arg)}")
                if arg.dtype != dtype:
                    raise TypeError(f"{where}: array of {arg.dtype}, kernel reads {dtype}")
                arrays.append(arg._a)
                holders.append(ctypes.c_void_p(arg._a.ctypes.data))
            else:
                if type(arg) is not dtype.type:
                    raise TypeError(f"{where}: expected numpy.{dtype.name}, got "
                                    f"{type(arg).__name__} (its bytes would be misread)")
                holders.append(_CTYPES[dtype.type](arg))
        argv = (ctypes.c_void_p * len(holders))(*(ctypes.addressof(h) for h in holders))
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        _check_launch(self.name, g, b, shared_mem)
        dyn = np.full(max(int(shared_mem), 8), 0xFF, dtype=np.uint8)  # NaN if read unwritten
        launch = self._lib.ntk_sim_launch
        launch.restype = ctypes.c_int
        rc = launch(self._thunk, argv, *(ctypes.c_uint(int(v)) for v in g + b),
                    ctypes.c_void_p(dyn.ctypes.data), ctypes.c_size_t(int(shared_mem)))
        if rc != 0:
            self._lib.ntk_sim_message.restype = ctypes.c_char_p
            raise RuntimeError(f"{self.name}: {self._lib.ntk_sim_message().decode()}")
        check_guards(arrays, self.name)
