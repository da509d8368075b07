"""Memory of the paper's networks: checked before torch allocates, and torch's own
out-of-memory errors turned into :class:`MemoryBudgetError` (one line, never the allocator's
C++ frames)."""

from __future__ import annotations

import contextlib
import re

from .._units import format_bytes
from ..errors import MemoryBudgetError
from ._checks import check_device

#: Rows of one forward batch (``predict``'s batch): the activation estimate's rows.
ACTIVATION_ROWS = 8192
_LABEL = {"relu": "2L-ReLU", "attn": "MLP-Attn"}


def model_bytes(arch: str, d: int, width: int, n_outputs: int, itemsize: int = 4) -> int:
    """Peak bytes of building and training one network of ``width`` hidden units on ``d``
    inputs: the float64 initial draw of W (m, d) and a (m, C); W in the training dtype with
    its gradient, Adam's two moments and the theta_0 copy (5 copies); a; the activations of
    one forward batch (ACTIVATION_ROWS x m, pre- and post-ReLU); MLP-Attn's d x d M (float64
    and the training dtype). An estimate of the first layer, not of every temporary."""
    per_unit = 8 * (d + n_outputs) + itemsize * (5 * d + n_outputs + 2 * ACTIVATION_ROWS)
    attn = (8 + itemsize) * d * d if arch == "attn" else 0
    return int(width) * per_unit + attn


def available_bytes(device=None) -> int:
    """Free memory of the torch device ``device`` (None or a CPU device: available RAM);
    BackendError for a CUDA device torch cannot use here."""
    import torch
    dev = check_device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    from ..backend import host_available_bytes
    return int(host_available_bytes())


def check_model_fits(arch: str, d: int, width: int, n_outputs: int, *, itemsize: int = 4,
                     device=None, power_of_two: bool = False) -> int:
    """Bytes :func:`model_bytes` estimates, or MemoryBudgetError (with the estimate and the
    largest width that fits; with ``power_of_two``, the largest power of two, for options
    that take only those) when they exceed the device's free memory."""
    need = model_bytes(arch, d, width, n_outputs, itemsize)
    free = available_bytes(device)
    if need > free:
        fixed = model_bytes(arch, d, 0, n_outputs, itemsize)
        per_unit = model_bytes(arch, d, 1, n_outputs, itemsize) - fixed
        fit = max(0, (free - fixed) // per_unit)
        if power_of_two and fit >= 1:
            fit = 1 << (int(fit).bit_length() - 1)
        where = "cuda" if "cuda" in str(device) else "cpu"
        raise MemoryBudgetError(
            f"width: a {_LABEL.get(arch, arch)} network of width {width} on d={d} inputs "
            f"needs about {format_bytes(need)} (weights, training state, activations), over "
            f"the {format_bytes(free)} of available {where} memory; "
            + (f"width <= {fit} would fit" if fit >= 1 else "no width fits"),
            needed_bytes=need, budget_bytes=free)
    return need


_OOM = re.compile(r"out of memory|can't allocate memory|cannot allocate memory", re.IGNORECASE)
_TRIED_BYTES = re.compile(r"allocate (\d+) bytes", re.IGNORECASE)
_TRIED_TEXT = re.compile(r"tried to allocate ([\d.]+ ?[KMGTP]i?B)", re.IGNORECASE)


def oom_message(exc: BaseException) -> str | None:
    """``" (tried to allocate 46.6 TiB)"``-like detail of an allocator error, "" when it
    names no size, None when ``exc`` is not an out-of-memory error."""
    text = str(exc)
    if not (isinstance(exc, MemoryError) or _OOM.search(text)):
        return None
    m = _TRIED_BYTES.search(text)
    if m:
        return f" (tried to allocate {format_bytes(int(m.group(1)))})"
    m = _TRIED_TEXT.search(text)
    return f" (tried to allocate {m.group(1)})" if m else ""


@contextlib.contextmanager
def torch_memory_errors(what: str):
    """Turn torch's out-of-memory RuntimeError (CPU allocator or CUDA) and MemoryError raised
    inside into MemoryBudgetError naming ``what``. Also a decorator."""
    try:
        yield
    except MemoryBudgetError:
        raise
    except (RuntimeError, MemoryError) as exc:
        detail = oom_message(exc)
        if detail is None:
            raise
        raise MemoryBudgetError(f"{what}: out of memory{detail}; use a smaller width or fewer "
                                f"training points") from None
