"""The one-pass square-matrix check (ntkcore.kernels.square_matrix_stats) against the float64
reference in tests/reference.py, on the CPU (Numba) and on CUDA (a GPU, else the simulator),
and the boundary check of loo_influence built on it (ntkcore._validate.check_kernel_matrix).

Sizes straddle both kernels' tile edges (64 on the CPU, 32 on the GPU): n = 1, 63, 64, 65,
200 leave ragged last tiles or none.
"""

import numpy as np
import pytest
from conftest import BACKENDS, RTOL
from reference import square_matrix_stats_naive

import ntkcore as nc
from ntkcore import errors
from ntkcore._validate import check_kernel_matrix, check_square_symmetric
from ntkcore.backend import Backend
from ntkcore.kernels import square_matrix_stats
from ntkcore.kernels import validation as V

SIZES = [1, 2, 63, 64, 65, 200]


def _to(backend, K):
    return Backend(backend).xp.asarray(K)


def _matrix(rng, n, *, symmetric=False):
    K = rng.standard_normal((n, n))
    return K + K.T if symmetric else K


def _check_against_reference(stats, K):
    finite, fro2, asym2 = square_matrix_stats_naive(K)
    assert stats.finite == finite
    s2 = stats.scale ** 2
    # sums of n^2 non-negative terms in another order: a few hundred ulps (conftest.RTOL)
    assert abs(stats.fro2 - s2 * fro2) <= RTOL[np.float64] * s2 * fro2
    assert abs(stats.asym2 - s2 * asym2) <= RTOL[np.float64] * s2 * fro2


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n", SIZES)
def test_stats_match_the_reference(backend, rng, n):
    K = _matrix(rng, n)
    stats = square_matrix_stats(_to(backend, K))
    assert stats.scale == 1.0
    _check_against_reference(stats, K)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n", [65, 200])
def test_fortran_order_and_float32(backend, rng, n):
    K = _matrix(rng, n)
    F = np.asfortranarray(K)
    _check_against_reference(square_matrix_stats(_to(backend, F)), K)
    K32 = K.astype(np.float32)  # summed in float64: the reference of the float32 entries
    _check_against_reference(square_matrix_stats(_to(backend, K32)), K32.astype(np.float64))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n", [1, 65, 200])
def test_symmetric_matrix_has_exactly_zero_asymmetry(backend, rng, n):
    stats = square_matrix_stats(_to(backend, _matrix(rng, n, symmetric=True)))
    assert stats.finite and stats.fro2 > 0 and stats.asym2 == 0.0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n", [63, 65, 200])
def test_an_asymmetry_in_the_last_ragged_tile_is_measured(backend, rng, n):
    K = _matrix(rng, n, symmetric=True)
    K[n - 1, n - 3] += 1e-3  # the last row, in the last (ragged, for n = 65, 200) tile
    stats = square_matrix_stats(_to(backend, K))
    _check_against_reference(stats, K)
    assert stats.asym2 == pytest.approx(2e-6, rel=1e-9)  # (K_ij - K_ji)^2 counted twice


WHERE = {"corner": lambda n: (n - 1, 0), "middle": lambda n: (n // 2, n // 3),
         "diagonal": lambda n: (n // 2, n // 2), "last": lambda n: (n - 1, n - 1)}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n", [1, 65])
@pytest.mark.parametrize("where", sorted(WHERE))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_anywhere_is_not_finite(backend, rng, n, where, bad):
    K = _matrix(rng, n, symmetric=True)
    K[WHERE[where](n)] = bad
    assert square_matrix_stats(_to(backend, K)).finite is False
    assert square_matrix_stats(_to(backend, np.asfortranarray(K))).finite is False


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e-310])
def test_entries_whose_squares_leave_float64_are_rescaled(backend, rng, scale):
    """|K| ~ 1e200 squares to Inf and ~1e-200 to 0: the driver rescales by a power of two
    (exact), and the relative asymmetry is that of the unscaled matrix."""
    K = _matrix(rng, 65, symmetric=True)
    big = K * scale
    stats = square_matrix_stats(_to(backend, big))
    assert stats.finite and stats.scale != 1.0 and stats.rel_asymmetry == 0.0
    assert np.isfinite(stats.fro2) and stats.fro2 > 0
    K[64, 2] *= 1.001
    big = K * scale
    expected = square_matrix_stats(K).rel_asymmetry  # the same matrix at scale 1
    got = square_matrix_stats(_to(backend, big)).rel_asymmetry
    assert got == pytest.approx(expected, rel=1e-6 if scale < 1e-300 else 1e-12)  # subnormals
    big[3, 3] = np.nan
    assert square_matrix_stats(_to(backend, big)).finite is False


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_zero_and_empty_matrices(backend):
    assert square_matrix_stats(_to(backend, np.zeros((70, 70)))) == (True, 0.0, 0.0, 1.0)
    assert square_matrix_stats(_to(backend, np.zeros((0, 0)))) == (True, 0.0, 0.0, 1.0)


def test_layouts_it_does_not_read_are_refused(rng):
    K = _matrix(rng, 10)
    with pytest.raises(ValueError, match="contiguous"):
        square_matrix_stats(K[::2, ::2])
    with pytest.raises(ValueError, match="square"):
        square_matrix_stats(K[:, :4])
    with pytest.raises(ValueError, match="float64 or float32"):
        square_matrix_stats(K.astype(np.float16))


def test_cpu_sums_do_not_depend_on_the_thread_count(rng):
    import numba
    K = _matrix(rng, 300)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = square_matrix_stats(K)
        numba.set_num_threads(before)
        many = square_matrix_stats(K)
    finally:
        numba.set_num_threads(before)
    assert one == many


def test_gpu_path_reads_back_once(sim_cupy, rng):
    """The two sums come back in one 16-byte device-to-host copy, no scalar reads."""
    from simgpu.cupy_shim import TRAFFIC
    Kd = sim_cupy.asarray(_matrix(rng, 100))
    before = dict(TRAFFIC)
    square_matrix_stats(Kd)
    assert TRAFFIC["to_host"] - before["to_host"] == 16
    assert TRAFFIC["scalar_reads"] == before["scalar_reads"]


def test_gpu_grid_covers_more_pairs_than_blocks(sim_cupy, rng, monkeypatch):
    """Blocks loop over the tile pairs (q, q + blocks, ...): fewer blocks than pairs."""
    monkeypatch.setattr(V, "GPU_BLOCKS", 3)
    K = _matrix(rng, 150)  # 5 x 5 tiles of 32: 15 pairs
    _check_against_reference(square_matrix_stats(sim_cupy.asarray(K)), K)


# ----------------------------------------------------------------------------- the boundary
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_check_kernel_matrix_agrees_with_the_two_pass_check(backend, rng):
    K = _matrix(rng, 65, symmetric=True)
    K[64, 1] += 1e-15  # below rtol: accepted, and measured
    Kd = _to(backend, K)
    out, asym = check_kernel_matrix(Kd, "K")
    assert out is Kd
    assert asym == pytest.approx(check_square_symmetric(Kd, "K"), rel=1e-9)
    assert asym > 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_check_kernel_matrix_errors(backend, rng):
    K = _matrix(rng, 20, symmetric=True)
    bad = K.copy()
    bad[19, 0] = np.nan
    with pytest.raises(errors.NonFiniteError, match=r"^K: expected finite values, got NaN or "
                                                    r"Inf$"):
        check_kernel_matrix(_to(backend, bad), "K")
    asym = K.copy()
    asym[0, 1] += 1.0
    with pytest.raises(errors.NotSymmetricError, match=r"^K: expected a symmetric kernel "
                                                       r"matrix, got relative asymmetry"):
        check_kernel_matrix(_to(backend, asym), "K")
    both = asym.copy()
    both[5, 5] = np.inf  # NaN/Inf is reported before asymmetry
    with pytest.raises(errors.NonFiniteError):
        check_kernel_matrix(_to(backend, both), "K")
    with pytest.raises(errors.ShapeError, match="square"):
        check_kernel_matrix(_to(backend, K[:, :5]), "K")
    with pytest.raises(errors.NonFiniteError):  # before the shape, as as_float_matrix did
        check_kernel_matrix(_to(backend, bad[:, :5]), "K")


def test_check_kernel_matrix_messages_and_conversions_match_the_old_checks(rng):
    from ntkcore._validate import as_float_matrix
    K = _matrix(rng, 30, symmetric=True)
    asym = K.copy()
    asym[0, 1] += 1.0
    with pytest.raises(errors.NotSymmetricError) as old:
        check_square_symmetric(asym, "K")
    with pytest.raises(errors.NotSymmetricError) as new:
        check_kernel_matrix(asym, "K")
    assert str(new.value) == str(old.value)
    bad = K.copy()
    bad[3, 3] = np.inf
    with pytest.raises(errors.NonFiniteError) as old:
        as_float_matrix(bad, "K", dtype=np.float64)
    with pytest.raises(errors.NonFiniteError) as new:
        check_kernel_matrix(bad, "K", dtype=np.float64)
    assert str(new.value) == str(old.value)
    ints, _ = check_kernel_matrix(np.eye(3, dtype=int), "K")
    assert ints.dtype == np.float64
    f32, asym32 = check_kernel_matrix(K.astype(np.float32), "K")
    assert f32.dtype == np.float32 and asym32 == 0.0
    with pytest.raises(errors.ParameterError, match="real numbers"):
        check_kernel_matrix(K.astype(complex), "K")
    with pytest.raises(errors.ShapeError, match="2-D"):
        check_kernel_matrix(K[0], "K")


def test_strided_views_take_the_two_pass_path(rng):
    big = _matrix(rng, 40, symmetric=True)
    view = big[::2, ::2]  # symmetric, neither C- nor F-contiguous
    _, asym = check_kernel_matrix(view, "K")
    assert asym == 0.0
    bad = big.copy()
    bad[2, 2] = np.nan
    with pytest.raises(errors.NonFiniteError):
        check_kernel_matrix(bad[::2, ::2], "K")
    skew = big.copy()
    skew[0, 2] += 1.0
    with pytest.raises(errors.NotSymmetricError):
        check_kernel_matrix(skew[::2, ::2], "K")


def test_huge_entries_are_accepted_when_symmetric_and_refused_when_not(rng):
    """1e200-sized entries square to Inf: the check rescales instead of letting Inf / Inf
    (NaN, which compares False with rtol) through."""
    K = _matrix(rng, 30, symmetric=True) * 1e200
    _, asym = check_kernel_matrix(K, "K")
    assert asym == 0.0
    K[0, 1] *= 1.5
    with pytest.raises(errors.NotSymmetricError):
        check_kernel_matrix(K, "K")
    K[0, 1] = np.nan
    with pytest.raises(errors.NonFiniteError):
        check_kernel_matrix(K, "K")


# ----------------------------------------------------------------------------- loo_influence
def _problem(rng, n=40, T=3):
    X = rng.standard_normal((n + T, 5))
    G = X @ X.T
    return G[:n, :n].copy(), np.sign(rng.standard_normal((n, 1))), G[n:, :n].copy(), \
        np.sign(rng.standard_normal((T, 1)))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_loo_influence_keeps_its_errors_and_symmetry_diagnostic(backend, rng):
    K, Y, Kt, Yt = _problem(rng)
    xp = Backend(backend).xp
    dev = [xp.asarray(a) for a in (K, Y, Kt, Yt)]
    res = nc.loo_influence(*dev, solver="exact")
    assert res.diagnostics["symmetry_rel"] == 0.0
    assert res.diagnostics["checks"]["symmetric"] is True
    bad = K.copy()
    bad[39, 0] = np.nan
    with pytest.raises(errors.NonFiniteError, match=r"^K: expected finite values, got NaN or "
                                                    r"Inf$"):
        nc.loo_influence(xp.asarray(bad), *dev[1:])
    asym = K.copy()
    asym[0, 39] += 1.0
    with pytest.raises(errors.NotSymmetricError, match=r"^K: expected a symmetric kernel "
                                                       r"matrix, got relative asymmetry "
                                                       r"\|\|K - K\^T\|\|_F / \|\|K\|\|_F = "):
        nc.loo_influence(xp.asarray(asym), *dev[1:])
    with pytest.raises(errors.ShapeError, match="K: expected a square matrix"):
        nc.loo_influence(xp.asarray(K[:, :30]), *dev[1:])


def test_loo_influence_symmetry_diagnostic_is_the_measured_asymmetry(rng):
    K, Y, Kt, Yt = _problem(rng)
    K[0, 39] += 1e-14 * np.abs(K).max()  # below rtol: accepted and reported
    res = nc.loo_influence(K, Y, Kt, Yt, solver="exact")
    assert res.diagnostics["symmetry_rel"] == pytest.approx(check_square_symmetric(K, "K"),
                                                            rel=1e-9)
    assert res.diagnostics["symmetry_rel"] > 0


def test_strided_view_with_huge_entries_is_still_checked():
    """The two-pass fallback (strided views) once let a huge asymmetric K through: its
    squares overflowed and inf / inf = NaN compared False against rtol."""
    from ntkcore import _validate
    from ntkcore.errors import NotSymmetricError
    rng = np.random.default_rng(3)
    G = rng.standard_normal((6, 6))
    big = np.zeros((6, 9))
    big[:, :6] = 1e200 * (G + G.T)
    K = big[:, :6]  # neither C- nor F-contiguous
    assert _validate.check_kernel_matrix(K, "K")[1] < 1e-15
    big[0, 3] *= 2.0
    with pytest.raises(NotSymmetricError, match="asymmetry"):
        _validate.check_kernel_matrix(K, "K")


@pytest.mark.parametrize("size", [1e-170, 1e200])
def test_strided_view_with_tiny_or_huge_entries_agrees_with_the_fused_path(size):
    """A strided view takes the two-pass fallback; with |K| ~ 1e-170 its Frobenius norm
    underflowed to 0 and any asymmetry passed. Both paths must decide the same."""
    from ntkcore import _validate
    from ntkcore.errors import NotSymmetricError
    rng = np.random.default_rng(5)
    K = size * rng.standard_normal((50, 50))  # asymmetric
    big = np.zeros((50, 100))
    big[:, ::2] = K
    for k in (K, big[:, ::2]):
        with pytest.raises(NotSymmetricError, match="asymmetry"):
            _validate.check_kernel_matrix(k, "K")
    S = K + K.T
    big[:, ::2] = S
    assert _validate.check_kernel_matrix(big[:, ::2], "K")[1] < 1e-15
    assert _validate.check_kernel_matrix(np.zeros((3, 3))[:, :], "K")[1] == 0.0


def test_check_square_symmetric_refuses_nan():
    from ntkcore import _validate
    from ntkcore.errors import NonFiniteError
    K = np.eye(4)
    K[1, 2] = np.nan
    with pytest.raises(NonFiniteError):
        _validate.check_square_symmetric(K, "K")
