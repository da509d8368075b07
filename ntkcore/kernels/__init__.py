"""Custom kernels: CUDA sources (through ``cupy.RawModule``) and their Numba CPU twins.

Dispatch is by the inputs' device: NumPy arrays run the Numba kernels, CuPy arrays the CUDA
kernels; nothing is copied between host and device. Four kernels, each with a driver that
owns the tiling (the kernels see one tile):

* :func:`relu_ntk_fused` (kernel 1) — closed-form eNTK of the two-layer ReLU net with
  bit-packed activation patterns; popcount(P_i & P_j) / m multiplied into the Gram tile.
* :func:`influence_scores_fused`, :func:`influence_topk_fused` (kernel 2) — fused LOO
  influence scoring, one pass over B = K_test A^-1, optional per-row top-k without a (T, n)
  buffer.
* :func:`relu_ntk_infinite_fused` (kernel 3) — infinite-width NTK (arc-cosine) on Gram tiles.
* :func:`square_matrix_stats` — finiteness, ||K||_F and ||K - K^T||_F of a kernel matrix in
  one read (the boundary check of :func:`ntkcore.loo_influence`).

These are the fast paths behind :func:`ntkcore.relu_ntk` and :func:`ntkcore.loo_influence`;
they validate nothing beyond what the public functions already checked (inputs are float
arrays of consistent shapes on one device). Importing this package imports neither Numba
nor CuPy; each loads on first use.
"""

from __future__ import annotations

from .assembly import (CPU_TILE_MAX, GPU_TILE_MAX, choose_tile, pack_activations,
                       relu_ntk_fused, relu_ntk_infinite_fused)
from .scoring import TopK, influence_scores_fused, influence_topk_fused
from .validation import MatrixStats, square_matrix_stats

__all__ = [
    "relu_ntk_fused", "relu_ntk_infinite_fused", "influence_scores_fused",
    "influence_topk_fused", "TopK", "pack_activations", "choose_tile", "CPU_TILE_MAX",
    "GPU_TILE_MAX", "square_matrix_stats", "MatrixStats",
]
