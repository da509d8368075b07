"""Custom kernels (ntkcore.kernels) against the float64 references in tests/reference.py.

The same test bodies run on the CPU (Numba twins) and, where a GPU exists, on CUDA (CuPy);
the CUDA sources are compile-checked with NVRTC whenever NVRTC can run (no GPU needed).
"""

import numpy as np
import pytest

from ntkcore import errors
from ntkcore import kernels as K
from ntkcore.backend import Backend
from ntkcore.kernels import assembly, cuda

from conftest import BACKENDS, assert_close
from reference import loo_influence_bruteforce, relu_ntk_infinite_naive, relu_ntk_naive

def _to(backend, *arrays):
    xp = Backend(backend).xp
    return [None if a is None else xp.asarray(a) for a in arrays]


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


# ----------------------------------------------------------------------------- kernel 1
# (n, n2, d, m, tile, train_a): m = 37 and 130 are not multiples of 32 or 64 (padding bits);
# n = 150 makes ragged CPU pass tiles (128 + 22) and, with tile=64, ragged GEMM tiles on the
# GPU (64 + 64 + 22); n = 1 is the degenerate single row.
ENTK_CASES = [
    (23, None, 9, 37, None, False),
    (23, 5, 9, 37, 7, True),
    (1, None, 5, 10, None, False),
    (1, 3, 5, 70, None, True),
    (150, None, 12, 130, 64, False),
    (150, None, 12, 64, 64, True),
    (150, 41, 12, 130, 64, False),
]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n,n2,d,m,tile,train_a", ENTK_CASES)
def test_relu_ntk_fused_matches_naive(backend, n, n2, d, m, tile, train_a):
    rng = np.random.default_rng(n * 1000 + m)
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((m, d))
    X2 = None if n2 is None else rng.standard_normal((n2, d))
    Xd, Wd, X2d = _to(backend, X, W, X2)
    out = _host(K.relu_ntk_fused(Xd, Wd, X2d, train_a=train_a, tile=tile))
    assert_close(out, relu_ntk_naive(X, W, X2, train_a=train_a), what="fused eNTK")
    if n2 is None:
        assert np.array_equal(out, out.T), "symmetric K must be exactly symmetric"


@pytest.mark.parametrize("train_a", [False, True])
def test_large_n_gram_path_uses_row_block_gemms(monkeypatch, train_a):
    """Above SYRK_MAX_N the symmetric Gram matrix (and the output-layer term) come from
    row-block GEMMs instead of SYRK (OpenBLAS's threaded SYRK segfaulted at large n here);
    same kernel."""
    monkeypatch.setattr(assembly, "SYRK_MAX_N", 10)
    monkeypatch.setattr(assembly, "GRAM_ROWS", 7)
    rng = np.random.default_rng(4)
    X = rng.standard_normal((40, 6))
    W = rng.standard_normal((33, 6))
    assert_close(K.relu_ntk_fused(X, W, train_a=train_a, tile=16),
                 relu_ntk_naive(X, W, train_a=train_a), what="row-block Gram")
    import ntkcore as nc
    assert_close(nc.gram(X), X @ X.T, what="gram by row blocks")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_relu_ntk_fused_writes_every_entry_of_out(backend):
    """A NaN-poisoned ``out`` must come back fully written (no tile left out)."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((131, 6))
    W = rng.standard_normal((33, 6))
    Xd, Wd = _to(backend, X, W)
    xp = Backend(backend).xp
    out = xp.full((131, 131), np.nan)
    K.relu_ntk_fused(Xd, Wd, out=out, tile=50)
    out = _host(out)
    assert np.isfinite(out).all()
    assert_close(out, relu_ntk_naive(X, W), what="poisoned out")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_packed_patterns_are_the_signs_with_zero_padding(backend):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((9, 4))
    W = rng.standard_normal((70, 4))  # 70 bits: 2 x 64 (CPU) or 3 x 32 (GPU) words, padded
    be = Backend(backend)
    Xd, Wd = _to(backend, X, W)
    P = _host(assembly.pack_activations(Xd, Wd, be, tile=4))
    rows = np.ascontiguousarray(P if backend == "cuda" else P.T)  # (n, words) either way
    bits = np.unpackbits(rows.view(np.uint8), axis=1, bitorder="little")
    assert np.array_equal(bits[:, :70].astype(bool), X @ W.T > 0)
    assert not bits[:, 70:].any(), "padding bits must be zero"


# ----------------------------------------------------------------------------- kernel 3
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n,n2,tile", [(13, None, None), (150, None, 64), (13, 4, 5), (1, None, None)])
def test_relu_ntk_infinite_fused_matches_naive(backend, n, n2, tile):
    rng = np.random.default_rng(n)
    X = rng.standard_normal((n, 6))
    X[0] = 0.0  # a zero row gives a zero row
    X2 = None if n2 is None else rng.standard_normal((n2, 6))
    Xd, X2d = _to(backend, X, X2)
    out = _host(K.relu_ntk_infinite_fused(Xd, X2d, tile=tile))
    with np.errstate(invalid="ignore"):
        ref = relu_ntk_infinite_naive(X, X2)
    ref[0] = 0.0  # the naive loop divides 0 by 0 there
    if n2 is None:
        ref[:, 0] = 0.0
    # acos is ill-conditioned at +-1: an ulp of difference in cos(theta) between a BLAS dot
    # and the naive one moves acos by up to sqrt(2 ulp) ~ 2e-8, hence 1e-7 (not 500 eps).
    assert_close(out, ref, rtol=1e-7, what="K_inf")
    if n2 is None:
        assert np.array_equal(out, out.T)
        d = np.einsum("ij,ij->i", X, X)
        assert_close(np.diag(out), d / 2, what="diagonal |x|^2 / 2 (theta = 0)")


# ----------------------------------------------------------------------------- kernel 2
def _scoring_problem(rng, T, n, C):
    B = rng.standard_normal((T, n))
    dinv = rng.random(n) + 0.5
    alpha = rng.standard_normal((n, C))
    R = rng.standard_normal((T, C))
    return B, dinv, alpha, R


def _scores_reference(B, dinv, alpha, R):
    """I = U (U/2 ||alpha_i||^2 - r_t . alpha_i), U = B / diag(A^-1), term by term."""
    U = B / dinv[None, :]
    return U * (U / 2 * np.sum(alpha ** 2, axis=1)[None, :] - R @ alpha.T)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("T,n,C", [(7, 1000, 3), (1, 1, 1), (20, 513, 10), (9, 2000, 1),
                                   (6, 4100, 4), (5, 300, 33), (11, 37, 24), (6, 17, 25),
                                   (4, 16, 5), (3, 15, 2), (8, 48, 7)])
def test_influence_scores_fused_matches_formula(backend, T, n, C):
    rng = np.random.default_rng(T + n + C)
    B, dinv, alpha, R = _scoring_problem(rng, T, n, C)
    ref = _scores_reference(B, dinv, alpha, R)
    Bd, dd, ad, Rd = _to(backend, B, dinv, alpha, R)
    assert_close(_host(K.influence_scores_fused(Bd, dd, ad, Rd)), ref, what="scores")
    K.influence_scores_fused(Bd, dd, ad, Rd, out=Bd)  # in place over B
    assert_close(_host(Bd), ref, what="scores written over B")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_float32_kernels_match_the_float64_references(backend):
    """The float32 builds (NTK_REAL=float on the GPU): eNTK, arc-cosine NTK and scores, in
    float32 in and out, within float32 rounding of the float64 references."""
    rng = np.random.default_rng(11)
    X = rng.standard_normal((130, 9))
    W = rng.standard_normal((70, 9))
    X2 = rng.standard_normal((21, 9))
    f32 = [a.astype(np.float32) for a in (X, W, X2)]
    Xd, Wd, X2d = _to(backend, *f32)
    for out, ref, what in (
            (K.relu_ntk_fused(Xd, Wd, tile=64), relu_ntk_naive(*f32[:2]), "eNTK"),
            (K.relu_ntk_fused(Xd, Wd, X2d, train_a=True, tile=64),
             relu_ntk_naive(*f32, train_a=True), "eNTK cross, train_a")):
        assert out.dtype == np.float32, what
        assert_close(_host(out), ref, dtype=np.float32, what=f"float32 {what}")
    out = K.relu_ntk_infinite_fused(Xd, None, tile=64)
    assert out.dtype == np.float32
    # acos near +-1 turns float32 rounding of cos into ~sqrt(eps32) ~ 3e-4 of angle
    assert_close(_host(out), relu_ntk_infinite_naive(f32[0]), rtol=1e-3,
                 dtype=np.float32, what="float32 arc-cosine NTK")
    B, dinv, alpha, R = (a.astype(np.float32) for a in _scoring_problem(rng, 5, 700, 3))
    ref = _scores_reference(*(a.astype(np.float64) for a in (B, dinv, alpha, R)))
    Bd, dd, ad, Rd = _to(backend, B, dinv, alpha, R)
    got = K.influence_scores_fused(Bd, dd, ad, Rd)
    assert got.dtype == np.float32
    assert_close(_host(got), ref, dtype=np.float32, what="float32 scores")
    top = K.influence_topk_fused(Bd, dd, ad, Rd, 4)
    assert_close(_host(top.helpful_scores), np.sort(ref, axis=1)[:, ::-1][:, :4],
                 dtype=np.float32, what="float32 top-4 values")


def test_fused_scores_equal_loo_by_refitting(rng):
    """End to end: scores from (B, diag(A^-1), alpha, residuals) vs refitting without each
    point [Def 3.3]; 1e-8 because the refits solve systems of condition ~1e3."""
    n, T, C, lam = 60, 5, 3, 1e-1
    X = rng.standard_normal((n, 4))
    Xt = rng.standard_normal((T, 4))
    Kx = np.exp(-0.5 * ((X[:, None] - X[None]) ** 2).sum(-1))
    Kt = np.exp(-0.5 * ((Xt[:, None] - X[None]) ** 2).sum(-1))
    Y = np.eye(C)[rng.integers(0, C, n)]
    Yt = np.eye(C)[rng.integers(0, C, T)]
    Ainv = np.linalg.inv(Kx + lam * np.eye(n))
    alpha = Ainv @ Y
    scores = K.influence_scores_fused(Kt @ Ainv, np.diag(Ainv).copy(), alpha, Kt @ alpha - Yt)
    assert_close(scores, loo_influence_bruteforce(Kx, Y, Kt, Yt, lam), rtol=1e-8,
                 what="fused vs refitting")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("T,n,C,k", [(6, 1000, 3, 5), (3, 700, 2, 16), (4, 300, 1, 1),
                                     (2, 40, 3, 100), (3, 600, 4, 17),
                                     (6, 300_000, 2, 3), (5, 500, 33, 5)])
@pytest.mark.parametrize("keep", [False, True])
def test_topk_matches_stable_argsort(backend, T, n, C, k, keep):
    rng = np.random.default_rng(k + n)
    B, dinv, alpha, R = _scoring_problem(rng, T, n, C)
    B[:, 7] = B[:, 3]  # exact ties: equal columns and equal alpha rows give equal scores
    dinv[7], alpha[7] = dinv[3], alpha[3]
    ref = _scores_reference(B, dinv, alpha, R)
    kk = min(k, n)
    hi = np.argsort(-ref, axis=1, kind="stable")[:, :kk]
    lo = np.argsort(ref, axis=1, kind="stable")[:, :kk]
    Bd, dd, ad, Rd = _to(backend, B, dinv, alpha, R)
    res = K.influence_topk_fused(Bd, dd, ad, Rd, k, keep_scores=keep)
    assert np.array_equal(_host(res.helpful), hi)
    assert np.array_equal(_host(res.harmful), lo)
    assert_close(_host(res.helpful_scores), np.take_along_axis(ref, hi, 1), what="top values")
    assert_close(_host(res.harmful_scores), np.take_along_axis(ref, lo, 1), what="low values")
    if keep:
        assert_close(_host(res.scores), ref, what="kept scores")
    else:
        assert res.scores is None


def test_generated_kernel_source_is_written_once_and_reused(tmp_path, monkeypatch):
    """The generated triangular-product source goes to $NTKCORE_CACHE/kernels, is named by a
    hash of its text, is not rewritten by a second process-level load, and computes the
    product it renders."""
    from ntkcore.kernels import _generated, numba_tri
    from ntkcore.kernels.triangular import lower_gram_apply
    monkeypatch.setenv("NTKCORE_CACHE", str(tmp_path))
    numba_tri.tri_kernels.cache_clear()
    try:
        numba_tri.tri_kernels()
        files = list((tmp_path / "kernels").glob("tri_cols8_*.py"))
        assert len(files) == 1 and "def lower_gram_apply" in files[0].read_text()
        stamp = files[0].stat().st_mtime_ns
        numba_tri.tri_kernels.cache_clear()
        assert _generated.write_source(files[0].name, numba_tri._render()) == files[0]
        assert files[0].stat().st_mtime_ns == stamp  # same text: left alone
        rng = np.random.default_rng(5)
        Lt = np.tril(rng.standard_normal((13, 13)))
        V = rng.standard_normal((13, 9))
        assert_close(lower_gram_apply(Lt, V), Lt.T @ (Lt @ V), what="generated kernel")
    finally:
        numba_tri.tri_kernels.cache_clear()


def test_generated_source_falls_back_when_the_cache_is_unwritable(tmp_path,
                                                                           monkeypatch):
    from ntkcore.kernels import _generated
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("NTKCORE_CACHE", str(blocker))
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(_generated.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    path = _generated.write_source("score_test.py", "x = 1\n")
    assert path.parent.parent == tmp_path / "tmp" and path.read_text() == "x = 1\n"


# ----------------------------------------------------------------------------- memory
def test_output_that_cannot_fit_is_refused_up_front():
    X = np.zeros((3_000_000, 2))  # K would need 72 TB
    W = np.ones((4, 2))
    with pytest.raises(errors.MemoryBudgetError, match="nystrom"):
        K.relu_ntk_fused(X, W)
    with pytest.raises(errors.MemoryBudgetError):
        K.relu_ntk_infinite_fused(X)


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
@pytest.mark.parametrize("train_a", [False, True])
def test_tile_size_respects_budget(backend, train_a):
    be = Backend(backend)
    m = 1024
    for budget in (10**6, 10**8, 10**10):
        t = K.choose_tile(be, 50_000, m, train_a=train_a, budget=budget)
        pair = (8 if backend == "cuda" else 0) + (8 if train_a else 0)
        row = 8 * m * (1 + (2 if train_a else 0))
        assert t == 64 or t * t * pair + t * row <= budget, (budget, t)
        assert 1 <= t <= (K.GPU_TILE_MAX if backend == "cuda" else K.CPU_TILE_MAX)


def test_fused_entk_temporaries_follow_the_tile():
    """Peak traced NumPy memory besides ``out``: packed bits + one (tile, m) block of X W^T."""
    import tracemalloc
    rng = np.random.default_rng(3)
    n, d, m, tile = 3000, 20, 512, 200
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((m, d))
    out = np.empty((n, n))
    K.relu_ntk_fused(X[:300], W, tile=tile)  # warm-up: Numba compile/cache load is not array memory
    tracemalloc.start()
    K.relu_ntk_fused(X, W, out=out, tile=tile)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    bits = 8 * n * ((m + 63) // 64)
    block = 8 * tile * m
    assert peak < bits + 2 * block + 2**18, f"peak {peak / 2**20:.2f} MiB vs out {out.nbytes / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- CUDA sources
def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except Exception:  # noqa: BLE001 - any import problem means "cannot compile here"
        return None
    try:
        err, _major, _minor = nvrtc.nvrtcVersion()
        return nvrtc if err == nvrtc.nvrtcResult.NVRTC_SUCCESS else None
    except Exception:  # noqa: BLE001
        return None


_NVRTC = _nvrtc()
_CU_BUILDS = [(name, dt, defs) for name in cuda.SOURCES for dt in (np.float64, np.float32)
              for defs in ((("TOPK", w),) for w in (1, 2, 4, 8, 16))
              if name == "influence" or defs == (("TOPK", 1),)]


@pytest.mark.skipif(_NVRTC is None, reason="NVRTC (cuda-bindings / nvidia-cuda-nvrtc) not "
                                           "importable here")
@pytest.mark.parametrize("name,dtype,defines", _CU_BUILDS)
def test_cuda_sources_compile_with_nvrtc(name, dtype, defines):
    """Compile each .cu with the options cuda.py passes to cupy.RawModule, for sm_90."""
    nvrtc = _NVRTC
    src = cuda.source(name).encode()
    err, prog = nvrtc.nvrtcCreateProgram(src, f"{name}.cu".encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    opts = [o.encode() for o in cuda.compile_options(dtype, defines)] + [b"-arch=sm_90"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    # A mutable buffer: NVRTC writes into it. (b" " * size for an empty log, size 1, is
    # CPython's shared one-byte object; writing into it corrupted every later b" " in the
    # process, which broke torch.load in the CLI tests that ran afterwards.)
    buf = bytearray(size)
    nvrtc.nvrtcGetProgramLog(prog, buf)
    nvrtc.nvrtcDestroyProgram(prog)
    log = bytes(buf).rstrip(b"\0")
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
    assert b"warning" not in log.lower(), log.decode(errors="replace")


# ----------------------------------------------------------------------------- A.8 products
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 67])
@pytest.mark.parametrize("k", [1, 4, 8, 9, 17])
def test_lower_gram_apply_reads_only_the_triangle(n, k):
    """Linv^T (Linv V) from the Numba kernel equals the float64 product of the lower triangle,
    with NaN poisoning the strict upper part (never read) and ragged row/column counts (rows
    not a multiple of 4, columns not a multiple of 8, more parts than rows)."""
    from ntkcore.kernels.triangular import lower_gram_apply
    rng = np.random.default_rng(n * 31 + k)
    Lt = np.tril(rng.standard_normal((n, n)))
    poisoned = Lt.copy()
    poisoned[np.triu_indices(n, 1)] = np.nan
    V = rng.standard_normal((n, k))
    assert_close(lower_gram_apply(poisoned, V), Lt.T @ (Lt @ V), what="L^-T L^-1 V")


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (7, 5), (13, 13), (66, 40)])
@pytest.mark.parametrize("k", [1, 8, 11])
def test_abs_row_sums_and_product_in_one_pass(shape, k):
    from ntkcore.kernels.triangular import abs_row_sums_and_product
    rng = np.random.default_rng(shape[0] + k)
    M = rng.standard_normal(shape)
    V = rng.standard_normal((shape[1], k))
    rows, MV = abs_row_sums_and_product(M, V)
    assert_close(rows, np.abs(M).sum(axis=1), what="row sums of |M|")
    assert_close(MV, M @ V, what="M V")
    # the row-block fallback (strided, not what the kernel streams) gives the same numbers
    rows2, MV2 = abs_row_sums_and_product(np.asfortranarray(M), V)
    assert_close(rows2, np.abs(M).sum(axis=1), what="fallback row sums")
    assert_close(MV2, M @ V, what="fallback M V")


@pytest.mark.parametrize("n", [1, 4, 5, 13, 67])
def test_lower_gram_apply_on_lapacks_fortran_order(n):
    """LAPACK's trtri leaves L^-1 in Fortran order: the kernel then streams the C-ordered
    transpose (upper triangle, poisoned below) and must give the same product."""
    from ntkcore.kernels.triangular import lower_gram_apply
    rng = np.random.default_rng(n)
    Lt = np.tril(rng.standard_normal((n, n)))
    poisoned = Lt.copy()
    poisoned[np.triu_indices(n, 1)] = np.nan
    V = rng.standard_normal((n, 11))
    assert_close(lower_gram_apply(np.asfortranarray(poisoned), V), Lt.T @ (Lt @ V),
                 what="F-ordered L^-1")
