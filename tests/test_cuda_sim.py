"""The CUDA simulator that stands in for a GPU in CI (tests/simgpu) catches what it must.

Kernel tests on the "cuda-sim" backend are only worth something if the simulator fails on the
bugs a GPU would show: a missing barrier, a warp collective with exited lanes, a write out of
bounds, an argument of the wrong width, an implicit host copy. Each is checked here on a tiny
kernel written for the purpose.
"""

import numpy as np
import pytest

SOURCE = r"""
#ifndef NTK_REAL
#define NTK_REAL double
#endif
typedef NTK_REAL real_t;

// out[b] = sum of x over block b (256 threads): shared-memory tree, then a warp butterfly.
extern "C" __global__ void block_sum(const real_t* __restrict__ x, long long n,
                                     real_t* out, int use_barrier)
{
    __shared__ real_t part[256];
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    part[threadIdx.x] = i < n ? x[i] : (real_t)0;
    if (use_barrier) __syncthreads();
    for (int s = 128; s >= 32; s >>= 1) {
        if ((int)threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        if (use_barrier) __syncthreads();
    }
    if (threadIdx.x < 32) {
        real_t v = part[threadIdx.x];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (threadIdx.x == 0) out[blockIdx.x] = v;
    }
}

// lanes >= active return before a full-mask ballot: undefined behaviour on a GPU
extern "C" __global__ void early_exit_ballot(unsigned int* out, int active)
{
    if ((int)threadIdx.x >= active) return;
    unsigned int b = __ballot_sync(0xffffffffu, 1);
    if (threadIdx.x == 0) out[0] = b;
}

// block 0 writes its shared array, later blocks only read theirs: garbage on a GPU
extern "C" __global__ void stale_shared(real_t* out)
{
    __shared__ real_t s[32];
    if (blockIdx.x == 0) s[threadIdx.x] = (real_t)1;
    __syncthreads();
    out[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}

extern "C" __global__ void write_at(real_t* out, long long where)
{
    if (threadIdx.x == 0) out[where] = (real_t)1;
}
"""


@pytest.fixture
def module(sim_cupy):
    return sim_cupy.RawModule(code=SOURCE, options=("-DNTK_REAL=double",))


def test_barriers_and_warp_shuffles_give_the_block_sums(sim_cupy, module):
    x = np.random.default_rng(0).standard_normal(1000)
    out = sim_cupy.full(4, np.nan)
    module.get_function("block_sum")((4,), (256,), (sim_cupy.asarray(x), np.int64(1000), out,
                                                    np.int32(1)))
    ref = [x[k * 256:(k + 1) * 256].sum() for k in range(4)]
    np.testing.assert_allclose(out.get(), ref, rtol=1e-13)


def test_a_missing_barrier_gives_wrong_sums(sim_cupy, module):
    x = np.ones(256)
    out = sim_cupy.full(1, np.nan)
    module.get_function("block_sum")((1,), (256,), (sim_cupy.asarray(x), np.int64(256), out,
                                                    np.int32(0)))
    assert out.get()[0] != 256.0  # threads ran ahead of the shared-memory writes


def test_a_warp_collective_with_exited_lanes_is_an_error(sim_cupy, module):
    out = sim_cupy.zeros(1, dtype=np.uint32)
    k = module.get_function("early_exit_ballot")
    k((1,), (32,), (out, np.int32(32)))
    assert int(out[0]) == 0xFFFFFFFF
    with pytest.raises(RuntimeError, match="lane 20 has exited"):
        k((1,), (32,), (out, np.int32(20)))


def test_shared_memory_a_block_did_not_write_reads_as_garbage(sim_cupy, module):
    """Every block starts with its shared arrays poisoned (all bits set: NaN), not with what
    the previous block left there."""
    out = sim_cupy.zeros(64)
    module.get_function("stale_shared")((2,), (32,), (out,))
    got = out.get()
    assert (got[:32] == 1).all() and np.isnan(got[32:]).all()


def test_an_out_of_bounds_write_is_caught(sim_cupy, module):
    out = sim_cupy.zeros(10)
    k = module.get_function("write_at")
    k((1,), (32,), (out, np.int64(9)))
    with pytest.raises(AssertionError, match="outside an allocation"):
        k((1,), (32,), (out, np.int64(10)))


def test_argument_types_are_checked_against_the_parameters(sim_cupy, module):
    out = sim_cupy.zeros(10)
    k = module.get_function("write_at")
    with pytest.raises(TypeError, match="expected numpy.int64, got int"):
        k((1,), (32,), (out, 3))
    with pytest.raises(TypeError, match="array of float32, kernel reads float64"):
        k((1,), (32,), (sim_cupy.zeros(10, dtype=np.float32), np.int64(3)))
    with pytest.raises(TypeError, match="expected a device array"):
        k((1,), (32,), (np.zeros(10), np.int64(3)))
    with pytest.raises(TypeError, match="3 arguments for 2"):
        k((1,), (32,), (out, np.int64(3), np.int64(0)))


def test_device_arrays_refuse_implicit_host_copies_and_mixing(sim_cupy):
    a = sim_cupy.arange(5.0)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError, match="host array mixed"):
        a + np.ones(5)
    assert isinstance(a + 1.0, sim_cupy.ndarray)
    assert isinstance(a.sum(), sim_cupy.ndarray) and a.sum().ndim == 0  # like CuPy
    np.testing.assert_array_equal(sim_cupy.asnumpy(a * 2), np.arange(5.0) * 2)


def test_names_cupy_lacks_are_errors(sim_cupy):
    from simgpu import cupy_shim
    if cupy_shim.REAL is None:
        pytest.skip("the real CuPy package is not installed: names cannot be checked")
    with pytest.raises(AttributeError, match="does not exist in CuPy"):
        sim_cupy.linalg.cho_solve  # noqa: B018 - scipy has it, cupy.linalg does not


def test_cholesky_of_an_indefinite_matrix_is_silent_unless_asked(sim_cupy):
    """CuPy's default (linalg='ignore') returns a finite partial factor: a caller must ask
    for errors (cupyx.errstate(linalg='raise')) or check the factor itself."""
    import cupyx
    A = sim_cupy.asarray(np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    L = sim_cupy.linalg.cholesky(A)
    assert np.isfinite(L.get()).all()
    with cupyx.errstate(linalg="raise"), pytest.raises(np.linalg.LinAlgError):
        sim_cupy.linalg.cholesky(A)
