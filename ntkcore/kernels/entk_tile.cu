// ntkcore kernel 1: fused empirical-NTK tile of the two-layer ReLU network [Thm 4.2, B.5].
//
//   K[i, j] = (popcount(P_i & P2_j) / m) * G[i, j]   (+ E[i, j] / m when the output layer trains)
//
// G = X_i X2_j^T comes from cuBLAS (one GEMM per tile pair, into a contiguous scratch tile);
// P are activation patterns 1[X W^T > 0] bit-packed into uint32 words (bit b of word w is
// neuron 32 w + b; padding bits are zero so they never count). The kernel reads the G tile
// once, multiplies the pattern counts in, and writes the result into the output (and, for a
// symmetric K, its transpose through a shared-memory staging tile so both writes coalesce).
//
// Compiled by NVRTC through cupy.RawModule with -DNTK_REAL=double|float, after the prelude
// tile_common.cuh (real_t, NTK_TILE, NTK_TX, store_mirrored_tile), which cuda.source() puts
// in front. Integer parameters are 64-bit (the Python side passes numpy.int64).

#define NTK_KW 16     // pattern words staged in shared memory per step

// ---------------------------------------------------------------------------------------
// pack_signs: P[r, w] = bits of 1[Z[r, 32 w + b] > 0], one warp per (row, word) via ballot.
// Z: (rows, m) with row stride ldz; P: (rows, words) with row stride ldp.
extern "C" __global__ void pack_signs(const real_t* __restrict__ Z, long long rows,
                                      long long m, long long ldz,
                                      unsigned int* __restrict__ P, long long words,
                                      long long ldp)
{
    long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= rows * words) return;  // warp-uniform: all lanes share one warp index
    long long r = warp / words;
    long long w = warp - r * words;
    long long col = 32 * w + lane;
    bool on = (col < m) && (Z[r * ldz + col] > (real_t)0);
    unsigned int word = __ballot_sync(0xffffffffu, on);
    if (lane == 0) P[r * ldp + w] = word;
}

// ---------------------------------------------------------------------------------------
// entk_tile: one launch per tile pair. Grid (ceil(nj/64), ceil(ni/64)), block (16, 16).
//   G    (ni, nj) Gram tile, row stride ldg (scratch; never written)
//   E    (ni, nj) trained-a tile H_i H_j^T, row stride lde (read when has_e)
//   Pi   (ni, words) patterns of the tile's rows, Pj (nj, words) of its columns, stride ldp
//   out  destination of entry (i, j) at out[i * ldo + j]
//   outT destination of the mirrored entry (j, i) at outT[j * ldo + i] (when mirror)
//   diag the tile pair is on the diagonal (i0 == j0): only j >= i is computed, j > i mirrored
extern "C" __global__ void __launch_bounds__(256)
entk_tile(const real_t* __restrict__ G, long long ldg,
          const real_t* __restrict__ E, long long lde, int has_e,
          const unsigned int* __restrict__ Pi, const unsigned int* __restrict__ Pj,
          long long ldp, long long words,
          real_t* out, long long ldo, real_t* outT, int mirror,
          long long ni, long long nj, real_t inv_m, int diag)
{
    const int bx = blockIdx.x, by = blockIdx.y;
    if (diag && by > bx) return;  // strictly-lower blocks of a diagonal tile: mirrored
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * NTK_TX + tx;
    const long long r0 = (long long)by * NTK_TILE;
    const long long c0 = (long long)bx * NTK_TILE;

    __shared__ unsigned int si[NTK_KW][NTK_TILE + 1];
    __shared__ unsigned int sj[NTK_KW][NTK_TILE + 1];
    __shared__ real_t st[NTK_TILE][NTK_TILE + 1];

    unsigned int acc[4][4];
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
        for (int y = 0; y < 4; ++y) acc[x][y] = 0u;

    for (long long w0 = 0; w0 < words; w0 += NTK_KW) {
        for (int e = tid; e < NTK_KW * NTK_TILE; e += NTK_TX * NTK_TX) {
            int r = e / NTK_KW, k = e - r * NTK_KW;
            long long gi = r0 + r, gj = c0 + r, wk = w0 + k;
            si[k][r] = (gi < ni && wk < words) ? Pi[gi * ldp + wk] : 0u;
            sj[k][r] = (gj < nj && wk < words) ? Pj[gj * ldp + wk] : 0u;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < NTK_KW; ++k) {
            unsigned int a[4], b[4];
#pragma unroll
            for (int x = 0; x < 4; ++x) a[x] = si[k][ty + NTK_TX * x];
#pragma unroll
            for (int y = 0; y < 4; ++y) b[y] = sj[k][tx + NTK_TX * y];
#pragma unroll
            for (int x = 0; x < 4; ++x)
#pragma unroll
                for (int y = 0; y < 4; ++y) acc[x][y] += __popc(a[x] & b[y]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int x = 0; x < 4; ++x) {
        const int il = ty + NTK_TX * x;
        const long long i = r0 + il;
#pragma unroll
        for (int y = 0; y < 4; ++y) {
            const int jl = tx + NTK_TX * y;
            const long long j = c0 + jl;
            real_t v = (real_t)0;
            if (i < ni && j < nj && (!diag || j >= i)) {
                v = G[i * ldg + j] * ((real_t)acc[x][y] * inv_m);
                if (has_e) v += E[i * lde + j] * inv_m;
                out[i * ldo + j] = v;
            }
            if (mirror) st[jl][il] = v;
        }
    }
    if (mirror) store_mirrored_tile(st, outT, ldo, r0, c0, ni, nj, diag, tid);
}
