// Shared prelude of the Gram-tile kernels (entk_tile.cu, ntk_infinite.cu); cuda.source()
// puts it in front of each of them, so NVRTC needs no include path.
//
// Both kernels compute a 64 x 64 output tile per block of 16 x 16 threads (4 x 4 outputs a
// thread) and, for a symmetric K, write the tile's transpose through a shared staging tile
// so that both writes coalesce.

#ifndef NTK_REAL
#define NTK_REAL double
#endif
typedef NTK_REAL real_t;

#define NTK_TILE 64   // output tile edge
#define NTK_TX 16     // threads per block: NTK_TX x NTK_TX, each 4 x 4 outputs

// After every thread has stored its entries (i, j) as st[jl][il], write entry (j, i) of the
// mirrored tile to outT[j * ldo + i]; on a diagonal tile pair only j > i (the rest is the
// computed triangle). Contains the block-wide barrier: call it from every thread.
__device__ __forceinline__ void store_mirrored_tile(const real_t (*st)[NTK_TILE + 1],
                                                    real_t* outT, long long ldo,
                                                    long long r0, long long c0,
                                                    long long ni, long long nj,
                                                    int diag, int tid)
{
    __syncthreads();
    for (int e = tid; e < NTK_TILE * NTK_TILE; e += NTK_TX * NTK_TX) {
        const int jl = e / NTK_TILE, il = e - jl * NTK_TILE;
        const long long i = r0 + il, j = c0 + jl;
        if (i < ni && j < nj && (!diag || j > i)) outT[j * ldo + i] = st[jl][il];
    }
}
