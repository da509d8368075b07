// ntkcore kernel 2: fused LOO influence scoring [Def 3.3 via the Sherman-Morrison form, Thm B.9].
//
//   S[t, i] = U (U * h_i - r_t . alpha_i),   U = B[t, i] / dinv_i,   h_i = ||alpha_i||^2 / 2
//
// B = K_test A^-1 (T, n) is read once. alphaT = alpha^T (C, n) contiguous, R = residuals (T, C)
// contiguous. S may alias B (in-place scoring). influence_topk also keeps, per test row, the
// TOPK largest and smallest scores in registers and merges them across the block, so top-k
// needs no (T, n) buffer. Ties go to the smaller index (the order of a stable argsort).
// Compiled by NVRTC through cupy.RawModule with -DNTK_REAL=double|float and -DTOPK=k (a power
// of two <= 16: the lists live in registers, indexed only by unrolled constants).

#ifndef NTK_REAL
#define NTK_REAL double
#endif
typedef NTK_REAL real_t;

#ifndef TOPK
#define TOPK 16
#endif

#define SC_ROWS 8          // test rows per thread in influence_scores
#define TK_THREADS 256     // threads per block (one test row) in influence_topk
#define TK_WARPS (TK_THREADS / 32)
#define NTK_BIG_INDEX 0x7fffffff
#define NTK_INF ((real_t)__longlong_as_double(0x7ff0000000000000LL))

// ---------------------------------------------------------------------------------------
// influence_scores: grid (ceil(n / blockDim.x), ceil(T / SC_ROWS)); thread = one column i,
// SC_ROWS consecutive test rows (alpha_i is read once for all of them).
extern "C" __global__ void influence_scores(const real_t* B, long long ldb,
                                            const real_t* __restrict__ dinv,
                                            const real_t* __restrict__ half_sq,
                                            const real_t* __restrict__ alphaT,
                                            const real_t* __restrict__ R, long long C,
                                            long long T, long long n, real_t* S, long long lds)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long t0 = (long long)blockIdx.y * SC_ROWS;
    if (i >= n) return;
    real_t acc[SC_ROWS];
#pragma unroll
    for (int r = 0; r < SC_ROWS; ++r) acc[r] = (real_t)0;
    for (long long c = 0; c < C; ++c) {
        const real_t a = alphaT[c * n + i];
#pragma unroll
        for (int r = 0; r < SC_ROWS; ++r)
            if (t0 + r < T) acc[r] += R[(t0 + r) * C + c] * a;
    }
    const real_t di = dinv[i], h = half_sq[i];
#pragma unroll
    for (int r = 0; r < SC_ROWS; ++r) {
        const long long t = t0 + r;
        if (t < T) {
            const real_t u = B[t * ldb + i] / di;
            real_t s = u * h;
            s -= acc[r];
            S[t * lds + i] = s * u;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Top-k lists: "better" orders by value (descending for hi, ascending for lo), then index.
__device__ __forceinline__ bool better_hi(real_t v1, int i1, real_t v2, int i2)
{
    return v1 > v2 || (v1 == v2 && i1 < i2);
}
__device__ __forceinline__ bool better_lo(real_t v1, int i1, real_t v2, int i2)
{
    return v1 < v2 || (v1 == v2 && i1 < i2);
}

#define NTK_INSERT(BETTER, vals, idx, s, i)                                         \
    if (BETTER(s, i, vals[TOPK - 1], idx[TOPK - 1])) {                              \
        vals[TOPK - 1] = s;                                                         \
        idx[TOPK - 1] = i;                                                          \
        _Pragma("unroll") for (int q = TOPK - 1; q > 0; --q) {                      \
            if (BETTER(vals[q], idx[q], vals[q - 1], idx[q - 1])) {                 \
                real_t tv = vals[q]; vals[q] = vals[q - 1]; vals[q - 1] = tv;       \
                int ti = idx[q]; idx[q] = idx[q - 1]; idx[q - 1] = ti;              \
            }                                                                       \
        }                                                                           \
    }

// Merge the 32 sorted per-lane lists of a warp into its first TOPK entries (lane 0 writes
// them to wv/wi). A lane whose head wins pops it; every lane agrees on the winner after the
// butterfly reduction because "better" is a strict total order on distinct (value, index).
#define NTK_WARP_MERGE(BETTER, vals, idx, sentinel, wv, wi)                          \
    for (int rr = 0; rr < TOPK; ++rr) {                                             \
        real_t bv = vals[0];                                                        \
        int bi = idx[0];                                                            \
        _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) {                  \
            real_t ov = __shfl_xor_sync(0xffffffffu, bv, off);                      \
            int oi = __shfl_xor_sync(0xffffffffu, bi, off);                         \
            if (BETTER(ov, oi, bv, bi)) { bv = ov; bi = oi; }                       \
        }                                                                           \
        if (idx[0] == bi && vals[0] == bv) {                                        \
            _Pragma("unroll") for (int q = 0; q < TOPK - 1; ++q) {                  \
                vals[q] = vals[q + 1]; idx[q] = idx[q + 1];                         \
            }                                                                       \
            vals[TOPK - 1] = sentinel; idx[TOPK - 1] = NTK_BIG_INDEX;               \
        }                                                                           \
        if (lane == 0) { wv[warp][rr] = bv; wi[warp][rr] = bi; }                    \
    }

// Warp 0 merges the TK_WARPS sorted lists in shared memory; writes the first k to the output.
#define NTK_BLOCK_MERGE(BETTER, sentinel, wv, wi, out_idx, out_val)                  \
    if (warp == 0) {                                                                \
        int p = 0;                                                                  \
        for (int rr = 0; rr < k; ++rr) {                                            \
            real_t bv = (lane < TK_WARPS && p < TOPK) ? wv[lane][p] : sentinel;     \
            int bi = (lane < TK_WARPS && p < TOPK) ? wi[lane][p] : NTK_BIG_INDEX;   \
            const real_t mv = bv;                                                   \
            const int mi = bi;                                                      \
            _Pragma("unroll") for (int off = 16; off > 0; off >>= 1) {              \
                real_t ov = __shfl_xor_sync(0xffffffffu, bv, off);                  \
                int oi = __shfl_xor_sync(0xffffffffu, bi, off);                     \
                if (BETTER(ov, oi, bv, bi)) { bv = ov; bi = oi; }                   \
            }                                                                       \
            if (lane < TK_WARPS && mi == bi && mv == bv) ++p;                       \
            if (lane == 0) { out_idx[t * k + rr] = bi; out_val[t * k + rr] = bv; }  \
        }                                                                           \
    }

// influence_topk: grid (T), block (TK_THREADS), dynamic shared memory C * sizeof(real_t).
// k <= TOPK <= 16, k <= n. Writes hi_idx/hi_val (k largest, best first) and lo_idx/lo_val
// (k smallest), each (T, k) row-major; also the full row into S when keep.
extern "C" __global__ void __launch_bounds__(TK_THREADS)
influence_topk(const real_t* B, long long ldb, const real_t* __restrict__ dinv,
               const real_t* __restrict__ half_sq, const real_t* __restrict__ alphaT,
               const real_t* __restrict__ R, long long C, long long n, long long k,
               long long* __restrict__ hi_idx, real_t* __restrict__ hi_val,
               long long* __restrict__ lo_idx, real_t* __restrict__ lo_val,
               real_t* S, long long lds, int keep)
{
    extern __shared__ unsigned char ntk_dyn[];
    real_t* rt = reinterpret_cast<real_t*>(ntk_dyn);
    __shared__ real_t whv[TK_WARPS][TOPK];
    __shared__ int whi[TK_WARPS][TOPK];
    __shared__ real_t wlv[TK_WARPS][TOPK];
    __shared__ int wli[TK_WARPS][TOPK];

    const long long t = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (long long c = threadIdx.x; c < C; c += TK_THREADS) rt[c] = R[t * C + c];
    __syncthreads();

    real_t hv[TOPK], lv[TOPK];
    int hx[TOPK], lx[TOPK];
#pragma unroll
    for (int q = 0; q < TOPK; ++q) {
        hv[q] = -NTK_INF; lv[q] = NTK_INF; hx[q] = NTK_BIG_INDEX; lx[q] = NTK_BIG_INDEX;
    }
    for (long long i = threadIdx.x; i < n; i += TK_THREADS) {
        real_t cross = (real_t)0;
        for (long long c = 0; c < C; ++c) cross += rt[c] * alphaT[c * n + i];
        const real_t u = B[t * ldb + i] / dinv[i];
        real_t s = u * half_sq[i];
        s -= cross;
        s *= u;
        if (keep) S[t * lds + i] = s;
        const int ii = (int)i;
        NTK_INSERT(better_hi, hv, hx, s, ii)
        NTK_INSERT(better_lo, lv, lx, s, ii)
    }
    NTK_WARP_MERGE(better_hi, hv, hx, -NTK_INF, whv, whi)
    NTK_WARP_MERGE(better_lo, lv, lx, NTK_INF, wlv, wli)
    __syncthreads();
    NTK_BLOCK_MERGE(better_hi, -NTK_INF, whv, whi, hi_idx, hi_val)
    NTK_BLOCK_MERGE(better_lo, NTK_INF, wlv, wli, lo_idx, lo_val)
}
