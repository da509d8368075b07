"""Kernel 2 on the CPU: fused scoring through a register-blocked micro-kernel written in LLVM IR.

I(t, i) = b (b g_i - r_t . alpha'_i),  b = B[t, i],  g_i = ||alpha_i||^2 / (2 diag_i^2),
alpha'_i = alpha_i / diag_i  [Def 3.3 via Thm B.9; operands from :func:`pack_operands`].

The cross term r_t . alpha'_i is C multiply-adds per score, about as much time at the FMA
peak as streaming B takes on two cores, so the kernel must run near that peak while it
streams. Loop-vectorised Numba source could not (sessions 5-9): with the residuals of four
rows as named scalars, LLVM hoisted 4C broadcasts out of the loop and spilled them, and each
64-score iteration issued more loads (114) than multiply-adds (96). Here the work is written
as explicit vector IR, the way a GEMM micro-kernel is. One call scores a strip of 4 rows x
(16 tiles) columns; per 4 x 16 tile it:

1. loads the tile's entries of B first (and prefetches those PREFETCH_AHEAD = 32 entries,
   two tiles, further along each row), so their memory latency overlaps the arithmetic below;
2. for c = 0 .. C-1 (a real loop, not unrolled per C) loads the 16 values alpha'[:, c] of the
   block (two zmm of doubles), broadcasts R[t, c] of each row from memory, and does 8 vector
   multiply-adds into 8 accumulators that never leave the registers;
3. finishes each score as b (b g - acc) and stores it.

Per 64 float64 scores that is 2C + 10 vector loads for 10C + 16 vector operations. In L1, one
core ran the tile at about one vector multiply-add per cycle, the FMA peak. The strip function
is ``noinline``: inside it the loads of R stay in the c loop, whereas inlined into the caller's
column loop LLVM hoisted and spilled them. A one-row strip scores the T % 4 rows, and a scalar
loop scores the n % 16 columns left.

Both float64 (two <8 x double> per row) and float32 (one <16 x float>) are built. Any C >= 0
runs the same code, because the class count is the trip count of the c loop. This replaced
both the per-C generated kernels (C <= 24) and the generic one. Measurements are in
bench/RESULTS.md, session 10.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

#: columns per tile; also the width of ``pack_operands``' alpha blocks (a tile is one block)
TILE_COLS = 16
#: test rows per tile (the row-quad of the main loop)
TILE_ROWS = 4
#: full tiles per parallel job: 2048 columns, so T = 4 rows still spreads over the threads
_JOB_BLOCKS = 128
#: how far ahead (in entries) each row of B is prefetched, 0 for not at all. A source
#: constant: Numba's on-disk cache keeps the value the strips were compiled with.
PREFETCH_AHEAD = 32

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


def _const(value: int):
    return ir.Constant(_I64, value)


def _define_strip(module: ir.Module, rows: int, scalar: ir.Type, lanes: int) -> ir.Function:
    """``void strip(B, ldb, O, ldo, g, a, ablk, C, R, ldr, tiles)`` in ``module`` (defined once
    per module): scores ``rows`` x (16 ``tiles``) entries, one 16-column tile after another.

    B, O : first entry of the strip in B and in the scores (row strides ldb, ldo entries);
    g : g[col]; a : the strip's first alpha block, ``a[j * ablk + c * 16 + w]`` for tile j;
    R : R[t0, 0] (row stride ldr); C : the class count.
    """
    name = f"ntkcore_score_strip_{rows}x{TILE_COLS}_{scalar}_pf{PREFETCH_AHEAD}"
    if name in module.globals:
        return module.globals[name]
    vec = ir.VectorType(scalar, lanes)
    size = 64 // lanes  # bytes per entry: the alignment the loads and stores may assume
    nvec = TILE_COLS // lanes
    ptr = scalar.as_pointer()
    fn = ir.Function(module, ir.FunctionType(
        ir.VoidType(), [ptr, _I64, ptr, _I64, ptr, ptr, _I64, _I64, ptr, _I64, _I64]),
        name=name)
    fn.attributes.add("noinline")
    fn.attributes.add("nounwind")
    fn.linkage = "internal"
    B, ldb, O, ldo, g, a, ablk, C, R, ldr, tiles = fn.args
    fma = _intrinsic(module, f"llvm.fma.v{lanes}{'f64' if lanes == 8 else 'f32'}",
                     ir.FunctionType(vec, [vec, vec, vec]))
    entry, head, cloop, tail, done = (fn.append_basic_block(s) for s in (
        "entry", "tile", "classes", "finish", "done"))
    bld = ir.IRBuilder(entry)
    bld.cbranch(bld.icmp_signed(">", tiles, _const(0)), head, done)

    def vptr(base, offset):
        return bld.bitcast(bld.gep(base, [offset]), vec.as_pointer())

    # tile j: its first column is 16 j
    bld.position_at_end(head)
    j = bld.phi(_I64, "j")
    j.add_incoming(_const(0), entry)
    col = bld.mul(j, _const(TILE_COLS))
    aj = bld.gep(a, [bld.mul(j, ablk)])

    def entry_of(ld, r, v):
        return bld.add(bld.add(bld.mul(_const(r), ld), col), _const(v * lanes))

    # 1. the tile's entries of B first: their latency overlaps the c loop
    x = [[bld.load(vptr(B, entry_of(ldb, r, v)), align=size) for v in range(nvec)]
         for r in range(rows)]
    if PREFETCH_AHEAD:
        prefetch = _intrinsic(module, "llvm.prefetch.p0", ir.FunctionType(
            ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]))
        for r in range(rows):
            for line in range(0, TILE_COLS * size, 64):  # every cache line of the row
                target = bld.gep(B, [bld.add(entry_of(ldb, r, 0),
                                             _const(PREFETCH_AHEAD + line // size))])
                bld.call(prefetch, [bld.bitcast(target, ir.IntType(8).as_pointer()),
                                    ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                    ir.Constant(_I32, 1)])
    zero = ir.Constant(vec, [0.0] * lanes)
    bld.cbranch(bld.icmp_signed(">", C, _const(0)), cloop, tail)

    # 2. acc[r][v] += R[t0 + r, c] * alpha'[block j, c, v-th vector], c = 0 .. C-1
    bld.position_at_end(cloop)
    c = bld.phi(_I64, "c")
    c.add_incoming(_const(0), head)
    acc = [[bld.phi(vec) for _ in range(nvec)] for _ in range(rows)]
    for row in acc:
        for p in row:
            p.add_incoming(zero, head)
    column = [bld.load(vptr(aj, bld.add(bld.mul(c, _const(TILE_COLS)), _const(v * lanes))),
                       align=size) for v in range(nvec)]
    splat_mask = ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes)
    updated = []
    for r in range(rows):
        residual = bld.load(bld.gep(R, [bld.add(bld.mul(_const(r), ldr), c)]))
        lane0 = bld.insert_element(ir.Constant(vec, ir.Undefined), residual, ir.Constant(_I32, 0))
        splat = bld.shuffle_vector(lane0, ir.Constant(vec, ir.Undefined), splat_mask)
        updated.append([bld.call(fma, [splat, column[v], acc[r][v]]) for v in range(nvec)])
    c_next = bld.add(c, _const(1))
    c.add_incoming(c_next, cloop)
    for r in range(rows):
        for v in range(nvec):
            acc[r][v].add_incoming(updated[r][v], cloop)
    bld.cbranch(bld.icmp_signed("<", c_next, C), cloop, tail)

    # 3. score = b (b g - acc), then the next tile
    bld.position_at_end(tail)
    total = [[bld.phi(vec) for _ in range(nvec)] for _ in range(rows)]
    for r in range(rows):
        for v in range(nvec):
            total[r][v].add_incoming(zero, head)
            total[r][v].add_incoming(updated[r][v], cloop)
    for v in range(nvec):
        gv = bld.load(vptr(g, bld.add(col, _const(v * lanes))), align=size)
        for r in range(rows):
            inner = bld.call(fma, [x[r][v], gv, bld.fneg(total[r][v])])
            bld.store(bld.fmul(x[r][v], inner), vptr(O, entry_of(ldo, r, v)), align=size)
    j_next = bld.add(j, _const(1))
    j.add_incoming(j_next, tail)
    bld.cbranch(bld.icmp_signed("<", j_next, tiles), head, done)

    bld.position_at_end(done)
    bld.ret_void()
    return fn


def _intrinsic(module: ir.Module, name: str, fnty: ir.FunctionType) -> ir.Function:
    return module.globals.get(name) or ir.Function(module, fnty, name=name)


def _strip_intrinsic(rows: int):
    """``strip(B, out, g, alpha_blocks, R, t0, kb, tiles)``: scores rows t0 .. t0 + rows - 1
    of B, columns 16 kb .. 16 (kb + tiles) - 1."""

    @intrinsic
    def strip(typingctx, B, out, g, alpha_blocks, R, t0, kb, tiles):
        arrays = (B, out, g, alpha_blocks, R)
        if not all(isinstance(a, types.Array) for a in arrays):
            return None
        if B.dtype not in (types.float64, types.float32) or any(
                a.dtype != B.dtype for a in arrays):
            return None  # the strip writes whole vectors of B's dtype
        sig = types.void(B, out, g, alpha_blocks, R, t0, kb, tiles)

        def codegen(context, builder, signature, args):
            Ba, Oa, ga, aa, Ra = (context.make_array(ty)(context, builder, val)
                                  for ty, val in zip(signature.args[:5], args[:5]))
            t0v, kbv, count = args[5:]
            dtype = signature.args[0].dtype
            item = _const(8 if dtype == types.float64 else 4)

            def lead(arr):
                return builder.sdiv(cgutils.unpack_tuple(builder, arr.strides)[0], item)

            ldb, ldo, ldr, block = lead(Ba), lead(Oa), lead(Ra), lead(aa)
            col = builder.mul(kbv, _const(TILE_COLS))
            scalar = ir.DoubleType() if dtype == types.float64 else ir.FloatType()
            fn = _define_strip(builder.module, rows, scalar, 8 if dtype == types.float64 else 16)
            builder.call(fn, [
                builder.gep(Ba.data, [builder.add(builder.mul(t0v, ldb), col)]), ldb,
                builder.gep(Oa.data, [builder.add(builder.mul(t0v, ldo), col)]), ldo,
                builder.gep(ga.data, [col]),
                builder.gep(aa.data, [builder.mul(kbv, block)]), block,
                cgutils.unpack_tuple(builder, aa.shape)[1],
                builder.gep(Ra.data, [builder.mul(t0v, ldr)]), ldr, count])
            return context.get_dummy_value()

        return sig, codegen

    return strip


_strip_quad = _strip_intrinsic(TILE_ROWS)
_strip_row = _strip_intrinsic(1)


@njit(cache=True)
def _whole_steps(a):
    """Rows of the 2-D array ``a`` start a whole number of entries apart and the entries of a
    row are adjacent: the strips step through ``a`` by entries."""
    return a.strides[0] % a.itemsize == 0 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize)


@njit(parallel=True, cache=True, fastmath={"contract"})
def score_rows(B, g, alpha_blocks, R, out):
    """out[t, i] = b (b g[i] - R[t] . alpha'_i), b = B[t, i] (``out`` may be ``B``).

    B, out : (T, n), contiguous rows; g : (n,); alpha_blocks : (ceil(n / 16), C, 16) from
    :func:`pack_operands`; R : (T, C) contiguous. float64 or float32, all one
    dtype. Shapes or steps the strips cannot address raise ValueError (they read memory by
    pointer, with no bounds checks). ``fastmath={"contract"}`` only lets the scalar tail
    (the n % 16 columns) fuse its multiply-adds, as the strips' explicit ``llvm.fma`` does.
    """
    T, n = B.shape
    C = alpha_blocks.shape[1]
    if (out.shape != B.shape or R.shape[0] != T or R.shape[1] != C or g.shape[0] != n
            or alpha_blocks.shape[0] != -(-n // TILE_COLS)
            or alpha_blocks.shape[2] != TILE_COLS):
        raise ValueError("score_rows: B, out, g, alpha_blocks and R do not fit together")
    if not (_whole_steps(B) and _whole_steps(out) and _whole_steps(R)):
        raise ValueError("score_rows: B, out and R need adjacent entries in a row and rows "
                         "a whole number of entries apart")
    quads = T // TILE_ROWS
    full = n // TILE_COLS
    chunks = max(1, -(-full // _JOB_BLOCKS))
    for job in prange(quads * chunks):
        q = job // chunks
        first = (job - q * chunks) * _JOB_BLOCKS
        _strip_quad(B, out, g, alpha_blocks, R, q * TILE_ROWS, first,
                    min(full, first + _JOB_BLOCKS) - first)
    left = T - quads * TILE_ROWS
    for job in prange(left * chunks):
        r = job // chunks
        first = (job - r * chunks) * _JOB_BLOCKS
        _strip_row(B, out, g, alpha_blocks, R, quads * TILE_ROWS + r, first,
                   min(full, first + _JOB_BLOCKS) - first)
    if full * TILE_COLS < n:
        for t in prange(T):
            for k in range(full * TILE_COLS, n):
                w = k - full * TILE_COLS
                acc = 0.0
                for c in range(C):
                    acc += R[t, c] * alpha_blocks[full, c, w]
                b = B[t, k]
                out[t, k] = b * (b * g[k] - acc)


def pack_operands(diag_inv, alpha):
    """The per-column operands of :func:`score_rows`, in one parallel pass.

    diag_inv : (n,) diag(A^-1); alpha : (n, C), any strides; both of the scores' dtype.

    Returns
    -------
    g : (n,) ||alpha_i||^2 / (2 diag_inv_i^2).
    alpha_blocks : (ceil(n / 16), C, 16): ``alpha_blocks[b, c, w]`` = alpha[16 b + w, c]
        / diag_inv[16 b + w], zero past row n. What a tile needs for class c is one contiguous
        run of 16 values, and the tiles of a row strip read the blocks as one forward stream.
    """
    n, C = alpha.shape
    alpha_blocks = np.empty((-(-n // TILE_COLS), C, TILE_COLS), dtype=alpha.dtype)
    g = np.empty(n, dtype=alpha.dtype)
    _pack(alpha, diag_inv, g, alpha_blocks)
    return g, alpha_blocks


@njit(parallel=True, cache=True)
def _pack(alpha, diag_inv, g, alpha_blocks):
    """The packing of :func:`pack_operands`: one pass over alpha rows, blocks in parallel
    (a NumPy transpose copy took longer than the scoring itself at T = 4, n = 2e6)."""
    n, C = alpha.shape
    W = alpha_blocks.shape[2]
    for b in prange(alpha_blocks.shape[0]):
        for w in range(W):
            k = b * W + w
            if k < n:
                inv_d = 1.0 / diag_inv[k]
                sq = 0.0
                for c in range(C):
                    a = alpha[k, c] * inv_d  # scaled first: alpha and diag_inv may be tiny
                    sq += a * a  # together (K and lam scaled up), their squares not
                    alpha_blocks[b, c, w] = a
                g[k] = 0.5 * sq
            else:
                for c in range(C):
                    alpha_blocks[b, c, w] = 0.0
