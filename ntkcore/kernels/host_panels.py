"""Assembly of a GPU kernel matrix into host memory by row panels (issue 3, memory planning).

An (n, n2) float64 output that does not fit on the device is computed in row panels of t rows,
t from free device memory (:func:`plan_rows`). Each panel is computed on the device by the same
tile loops as a device output (:mod:`ntkcore.kernels.assembly`), copied on a second stream into
a pinned (page-locked) staging buffer, and from there into ``out`` by a parallel host copy. Two
device panels and two pinned buffers alternate, so the three stages overlap:

    compute stream:  fill(k)   fill(k+1)   fill(k+2) ...    fill(k+2) waits for copy(k)
    copy stream:          copy(k)    copy(k+1) ...          copy(k) waits for fill(k)
    host:                       drain(k-1)  drain(k) ...    drain(k) waits for copy(k)

For a symmetric K a panel covers only the columns j >= i0 (its own diagonal block in full); once
every panel is in, the strict lower triangle is overwritten from the upper one on the host in
parallel 128 x 128 tile pairs (``numba_kernels.mirror_upper``), so K is exactly symmetric.

Device memory: the two panels, the inner tiles' scratch and the fixed arrays (packed patterns,
norms), all planned up front within OUTPUT_FRACTION of free memory: O(t n2), never O(n n2), and
a problem whose single-row panels do not fit is refused before any work. Host memory: ``out``
plus two pinned panels (at most 2 x PANEL_MAX_BYTES).
"""

from __future__ import annotations

import numpy as np

from .._validate import check_result_finite
from ..backend import Backend
from ..ntk.tiling import (DEFAULT_TEMP_FRACTION, OUTPUT_FRACTION, panel_rows, tiles)
from . import assembly
from .assembly import (_loop_gpu, choose_tile, pack_activations, relu_ntk_infinite_fused,
                       scratch_bytes, words_for)

# Host tile of the final mirror (numba_kernels.tile_pairs): a 128 x 128 float64 tile pair
# stays in L2 while one tile is read along rows and the other written along rows.
MIRROR_TILE = 128


def plan_rows(n: int, n2: int, *, free: int, temp_bytes: int, fixed_bytes: int,
              entry_bytes: int = 16, what: str) -> int:
    """Panel rows: what OUTPUT_FRACTION of ``free`` leaves after the tiles' scratch and the
    fixed arrays, at ``entry_bytes`` per panel entry (16: two float64 panels)."""
    budget = int(free * OUTPUT_FRACTION) - int(temp_bytes) - int(fixed_bytes) - 16 * (n + 1)
    return panel_rows(n, n2, budget=budget, entry_bytes=entry_bytes, what=what)


def assemble_into_host(fill, out, *, sym: bool, rows: int, backend: Backend, what: str):
    """Run the panel pipeline (module docstring) and return ``out``.

    ``fill(i0, i1, c0, panel)`` writes K[i0:i1, c0:] into the C-contiguous device array
    ``panel`` on the current stream (c0 = i0 for a symmetric K, else 0). Raises
    NonFiniteError (before mirroring) when a panel holds NaN or Inf.
    """
    from . import numba_kernels as nk
    xp = backend.xp
    n, n2 = out.shape
    spans = tiles(n, rows)
    compute = xp.cuda.get_current_stream()
    copy = xp.cuda.Stream(non_blocking=True)
    dev = [xp.empty(rows * n2, dtype=np.float64) for _ in spans[:2]]
    pinned = [backend.empty_pinned(rows * n2, np.float64) for _ in dev]
    extremes = xp.empty(2 * len(spans), dtype=np.float64)  # max, min of each panel
    copied = [None] * len(dev)  # event: the last copy out of dev[b] into pinned[b] is done
    pending = None
    try:
        for k, (i0, i1) in enumerate(spans):
            b = k % len(dev)
            c0 = i0 if sym else 0
            shape = (i1 - i0, n2 - c0)
            panel = dev[b][:shape[0] * shape[1]].reshape(shape)
            if copied[b] is not None:  # copy(k-2) has left dev[b] (drain(k-2) implies it;
                compute.wait_event(copied[b])  # kept so the order rests on no host loop)
            fill(i0, i1, c0, panel)
            extremes[2 * k] = panel.max()  # NaN propagates, Inf shows: no panel-sized temp
            extremes[2 * k + 1] = panel.min()
            copy.wait_event(compute.record())
            stage = pinned[b][:panel.size].reshape(shape)
            panel.get(stream=copy, out=stage, blocking=False)
            copied[b] = copy.record()
            if pending is not None:
                _drain(out, *pending, nk)
            pending = (copied[b], stage, i0, c0)
        if pending is not None:
            _drain(out, *pending, nk)
    finally:
        copy.synchronize()  # no copy may still write a staging buffer once it is released
    check_result_finite(extremes, what)
    if sym:
        nk.mirror_upper(out, nk.tile_pairs(n, n, MIRROR_TILE, True))
    return out


def _drain(out, event, stage, i0, c0, nk):
    """Wait for one panel's copy into pinned memory, then copy it into ``out`` in parallel."""
    event.synchronize()
    nk.copy_into(stage, out, i0, c0)


def relu_ntk_host(X, W, X2=None, *, train_a: bool, tile: int | None, out, backend: Backend):
    """Kernel 1 (fused eNTK, +-1 output weights) into the host array ``out`` (n, n2)."""
    xp = backend.xp
    sym = X2 is None
    Xs = X if sym else X2
    n, n2, m = X.shape[0], Xs.shape[0], W.shape[0]
    if n == 0 or n2 == 0:
        return out
    free = backend.free_memory_bytes()
    t = choose_tile(backend, max(n, n2), m, train_a=train_a, tile=tile,
                    budget=int(free * DEFAULT_TEMP_FRACTION))
    words = words_for(m, backend)
    rows = plan_rows(n, n2, free=free, temp_bytes=scratch_bytes(backend, t, m, train_a=train_a),
                     fixed_bytes=4 * words * (n + (0 if sym else n2)),
                     what="relu_ntk output (host assembly)")
    P = pack_activations(X, W, backend, tile=t)
    P2 = P if sym else pack_activations(Xs, W, backend, tile=t)
    inv_m = 1.0 / m

    def fill(i0, i1, c0, panel):  # the panel as a non-symmetric block: rows i0:i1, cols c0:
        _loop_gpu(X[i0:i1], Xs[c0:], W, P[i0:i1], P2[c0:], panel, inv_m, False, train_a, t,
                  xp)

    return assemble_into_host(fill, out, sym=sym, rows=rows, backend=backend,
                              what="relu_ntk")


def relu_ntk_infinite_host(X, X2=None, *, tile: int | None = None, out, backend: Backend):
    """Kernel 3 (infinite width) into the host array ``out`` (n, n2); near-parallel pairs are
    refined per panel, as relu_ntk_infinite_fused does for a whole device output."""
    sym = X2 is None
    Xs = X if sym else X2
    n, n2 = X.shape[0], Xs.shape[0]
    if n == 0 or n2 == 0:
        return out
    free = backend.free_memory_bytes()
    t = choose_tile(backend, max(n, n2), 0, train_a=False, tile=tile,
                    budget=int(free * DEFAULT_TEMP_FRACTION))
    # Fixed: the row norms; the scan and refinement temporaries (about six arrays of
    # SCAN_ENTRIES). Per panel entry, besides the two panels: in the worst case (every pair
    # near-parallel) two int64 indices, and their concatenation, 32 bytes.
    rows = plan_rows(n, n2, free=free, temp_bytes=scratch_bytes(backend, t, 0, train_a=False),
                     fixed_bytes=8 * (n + n2) + 6 * 8 * assembly.SCAN_ENTRIES, entry_bytes=16 + 32,
                     what="relu_ntk_infinite output (host assembly)")

    def fill(i0, i1, c0, panel):
        relu_ntk_infinite_fused(X[i0:i1], Xs[c0:], tile=t, out=panel, backend=backend)

    return assemble_into_host(fill, out, sym=sym, rows=rows, backend=backend,
                              what="relu_ntk_infinite")
