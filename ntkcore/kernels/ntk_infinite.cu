// ntkcore kernel 3: infinite-width ReLU NTK on a Gram tile (arc-cosine form) [Thm 4.2].
//
//   K[i, j] = g (pi - acos(clip(g / (|x_i| |x2_j|), -1, 1))) / (2 pi),   g = G[i, j]
//
// zero where a norm is zero; on the diagonal of a symmetric K exactly g / 2. Same tiling and mirroring as entk_tile.cu: G is a contiguous
// scratch tile from cuBLAS, out/outT are the destination and (symmetric K) its transpose.
// Compiled by NVRTC through cupy.RawModule with -DNTK_REAL=double|float, after the prelude
// tile_common.cuh (real_t, NTK_TILE, NTK_TX, store_mirrored_tile) that cuda.source() adds.

extern "C" __global__ void __launch_bounds__(256)
arccos_tile(const real_t* __restrict__ G, long long ldg,
            const real_t* __restrict__ norm_i, const real_t* __restrict__ norm_j,
            real_t* out, long long ldo, real_t* outT, int mirror,
            long long ni, long long nj, int diag)
{
    const int bx = blockIdx.x, by = blockIdx.y;
    if (diag && by > bx) return;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * NTK_TX + tx;
    const long long r0 = (long long)by * NTK_TILE, c0 = (long long)bx * NTK_TILE;
    const real_t pi = (real_t)3.141592653589793238462643383279502884;
    const real_t inv_2pi = (real_t)0.159154943091895335768883763372514362;
    __shared__ real_t st[NTK_TILE][NTK_TILE + 1];

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
                const real_t g = G[i * ldg + j];
                const real_t den = norm_i[i] * norm_j[j];
                if (diag && i == j) {  // local indices: equal only on a diagonal tile
                    v = (real_t)0.5 * g;  // theta(x, x) = 0 exactly (acos(1 - ulp) ~ 1e-8)
                } else if (den > (real_t)0) {
                    real_t c = g / den;
                    c = c > (real_t)1 ? (real_t)1 : (c < (real_t)-1 ? (real_t)-1 : c);
                    v = g * (pi - acos(c)) * inv_2pi;
                }
                out[i * ldo + j] = v;
            }
            if (mirror) st[jl][il] = v;
        }
    }
    if (mirror) store_mirrored_tile(st, outT, ldo, r0, c0, ni, nj, diag, tid);
}
