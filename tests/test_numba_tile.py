"""The CPU scoring micro-kernel (ntkcore.kernels.numba_tile) against the term-by-term formula.

Shapes cover every leftover path: T % 4 rows (the one-row tile), n % 16 columns (the scalar
loop), n < 16 (no full tile), more than one parallel job per row quad (n > 2048) with a ragged
last job, C = 1 up to C = 40 (the class count is the trip count of the tile's c loop), float32
and float64. Scores are poisoned before each call, so an entry left unwritten fails.
"""

import numpy as np
import pytest

import ntkcore as nc
from ntkcore.kernels import numba_tile
from ntkcore.kernels.numba_tile import pack_operands, score_rows

from conftest import assert_close


def _problem(rng, T, n, C, dtype=np.float64):
    B = rng.standard_normal((T, n))
    dinv = rng.random(n) + 0.5
    alpha = rng.standard_normal((n, C))
    R = rng.standard_normal((T, C))
    return [a.astype(dtype) for a in (B, dinv, alpha, R)]


def _reference(B, dinv, alpha, R):
    """I = U (U/2 ||alpha_i||^2 - r_t . alpha_i), U = B / diag(A^-1), in float64."""
    B, dinv, alpha, R = (np.asarray(a, dtype=np.float64) for a in (B, dinv, alpha, R))
    U = B / dinv[None, :]
    return U * (U / 2 * np.sum(alpha ** 2, axis=1)[None, :] - R @ alpha.T)


def _score(B, dinv, alpha, R, out):
    g, blocks = pack_operands(dinv, alpha)
    score_rows(B, g, blocks, R, out)
    return out


SHAPES = [(1, 1, 1), (4, 16, 10), (5, 17, 2), (6, 15, 3), (7, 31, 10), (3, 48, 1),
          (8, 2 * 2048 + 3 * 16 + 5, 10), (1, 2048 + 16, 4), (9, 100, 25), (4, 64, 40)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("T,n,C", SHAPES)
def test_tile_kernel_matches_the_formula(rng, T, n, C, dtype):
    B, dinv, alpha, R = _problem(rng, T, n, C, dtype)
    got = _score(B, dinv, alpha, R, np.full_like(B, np.nan))
    assert_close(got, _reference(B, dinv, alpha, R), dtype=dtype, what="tile scores")


@pytest.mark.parametrize("T,n", [(7, 37), (8, 4200)])
def test_tile_kernel_in_place_and_on_strided_rows(rng, T, n):
    """out = B (each tile reads its entries of B before it writes them); B and out as row
    views of wider arrays (row stride > n) and with the rows reversed (negative stride)."""
    B, dinv, alpha, R = _problem(rng, T, n, 6)
    ref = _reference(B, dinv, alpha, R)
    inplace = B.copy()
    assert_close(_score(inplace, dinv, alpha, R, inplace), ref, what="in place")
    wide = np.full((T, n + 9), np.nan)
    wide[:, 3:n + 3] = B
    out_wide = np.full((T, n + 5), np.nan)
    _score(wide[:, 3:n + 3], dinv, alpha, R, out_wide[:, 2:n + 2])
    assert_close(out_wide[:, 2:n + 2], ref, what="row views")
    assert np.isnan(out_wide[:, :2]).all() and np.isnan(out_wide[:, n + 2:]).all(), \
        "wrote outside the view"
    flipped = np.full_like(B, np.nan)
    _score(B[::-1], dinv, alpha, R[::-1], flipped[::-1])
    assert_close(flipped, ref, what="reversed rows")


def test_tile_kernel_refuses_mixed_dtypes(rng):
    """The tile writes whole vectors of B's dtype: an out of another dtype must not compile
    (it would be written with the wrong element size)."""
    from numba.core.errors import TypingError
    B, dinv, alpha, R = _problem(rng, 4, 32, 2)
    g, blocks = pack_operands(dinv, alpha)
    with pytest.raises(TypingError):
        score_rows(B, g, blocks, R, np.empty(B.shape, dtype=np.float32))


@pytest.mark.parametrize("out_kind", ["float32", "strided columns"])
def test_public_scores_into_an_out_the_tile_cannot_write(rng, out_kind):
    """influence_scores(out=...) with an out whose dtype differs from B's, or whose columns
    are not contiguous, still gets every score right (through a buffer of B's layout)."""
    B, dinv, alpha, R = _problem(rng, 6, 70, 3)
    if out_kind == "float32":
        out = np.full(B.shape, np.nan, dtype=np.float32)
        view = out
    else:
        out = np.full((6, 140), np.nan)
        view = out[:, ::2]
    from ntkcore.kernels import influence_scores_fused
    influence_scores_fused(B, dinv, alpha, R, out=view)
    assert_close(view, _reference(B, dinv, alpha, R), dtype=view.dtype.type, what=out_kind)
    if out_kind != "float32":
        assert np.isnan(out[:, 1::2]).all(), "wrote between the strided columns"


def _field_rows(values):
    """``values`` (T, n) as the field of a structured array: rows 8 n + 1 bytes apart, which is
    not a whole number of float64 entries."""
    rec = np.zeros(values.shape[0], dtype=[("B", "f8", (values.shape[1],)), ("flag", "i1")])
    rec["B"] = values
    return rec["B"]


def test_rows_apart_by_a_fraction_of_an_entry(rng):
    """A B (or out) whose rows start 8 n + 1 bytes apart: the strips stepped rows by
    strides[0] // 8 entries, so rows 1.. were read from (and written to) the wrong places
    (inf and -0.0 scores, a false NonFiniteError from nc.influence_scores). Such arrays are
    copied or scored through a buffer; the kernel itself refuses them."""
    B, dinv, alpha, R = _problem(rng, 6, 40, 3)
    ref = _reference(B, dinv, alpha, R)
    assert B.strides == (320, 8) and _field_rows(B).strides == (321, 8)
    assert_close(nc.influence_scores(_field_rows(B), dinv, alpha, R), ref, what="B field")
    from ntkcore.kernels import influence_scores_fused, influence_topk_fused
    out = _field_rows(np.full_like(B, np.nan))
    influence_scores_fused(B, dinv, alpha, R, out=out)
    assert_close(out, ref, what="out field")
    top = influence_topk_fused(_field_rows(B), dinv, alpha, R, 3)
    assert np.array_equal(top.helpful, np.argsort(-ref, axis=1, kind="stable")[:, :3])
    g, blocks = pack_operands(dinv, alpha)
    with pytest.raises(ValueError, match="whole number of entries"):
        score_rows(_field_rows(B), g, blocks, R, np.empty_like(B))


@pytest.mark.parametrize("bad", ["out columns", "R classes", "g length", "blocks"])
def test_tile_kernel_refuses_operands_that_do_not_fit(rng, bad):
    """The strips read by pointer with no bounds checks: a short g or alpha_blocks, or an out
    or R of another shape, would read or write past an array. score_rows refuses them."""
    B, dinv, alpha, R = _problem(rng, 6, 40, 3)
    g, blocks = pack_operands(dinv, alpha)
    out = np.empty_like(B)
    if bad == "out columns":
        out = np.empty((6, 39))
    elif bad == "R classes":
        R = R[:, :2].copy()
    elif bad == "g length":
        g = g[:32]
    else:
        blocks = blocks[:2]
    with pytest.raises(ValueError, match="do not fit together"):
        score_rows(B, g, blocks, R, out)


def test_public_api_uses_the_tile_kernel_for_any_class_count(rng, monkeypatch):
    """nc.influence_scores on the CPU goes through score_rows for C = 1 and C = 40 (there is
    no class-count cut-off any more)."""
    calls = []
    real = numba_tile.score_rows

    def spy(*args):
        calls.append(args[3].shape[1])
        return real(*args)

    monkeypatch.setattr(numba_tile, "score_rows", spy)
    for C in (1, 40):
        B, dinv, alpha, R = _problem(rng, 5, 50, C)
        assert_close(nc.influence_scores(B, dinv, alpha, R), _reference(B, dinv, alpha, R),
                     what=f"C = {C}")
    assert calls == [1, 40]
