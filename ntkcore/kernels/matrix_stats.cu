// ntkcore: the square-matrix check in one read of K (the A.8 symmetry check, and finiteness).
//
//   fro2  = sum_ij (s K_ij)^2,   asym2 = sum_{i != j} (s K_ij - s K_ji)^2
//
// K (n, n) row-major with leading dimension ld is cut into MS_TILE x MS_TILE tiles; each tile
// pair (I, J) with I <= J is read once: the lower tile K[J, I] is read along its rows
// (coalesced) into shared memory, then the upper tile K[I, J] along its rows, each entry
// meeting its mirror in the shared tile (a column read of the padded tile: no bank
// conflicts). Entries outside K read as 0 in both tiles, so ragged edges add nothing.
// matrix_stats runs a fixed grid over the pairs (pair q, q + gridDim.x, ...); each block
// reduces its threads' sums in shared memory and writes one row of ``partial`` (blocks, 2).
// matrix_stats_sum then adds the rows in a fixed order into out[0..1]: no atomics, so the
// result is the same bits on every run. A NaN or Inf entry makes fro2 NaN or Inf (squares are
// >= 0: Inf never meets -Inf), which is how the driver learns of it. Sums are in double for
// NTK_REAL = double or float. Compiled by NVRTC through cupy.RawModule with -DNTK_REAL.

#ifndef NTK_REAL
#define NTK_REAL double
#endif
typedef NTK_REAL real_t;

#define MS_TILE 32      // tile edge
#define MS_ROWS 8       // blockDim.y: each thread covers MS_TILE / MS_ROWS rows of a tile
#define MS_THREADS (MS_TILE * MS_ROWS)

// Row sums[0..1] of a (MS_THREADS, 2) shared array: a tree over the block; thread 0 holds
// the totals in red[0][0], red[1][0] after the last barrier.
__device__ __forceinline__ void ms_block_reduce(double (*red)[MS_THREADS], int t)
{
    for (int s = MS_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) {
            red[0][t] += red[0][t + s];
            red[1][t] += red[1][t + s];
        }
        __syncthreads();
    }
}

// First tile row bi of the q-th pair (pairs numbered by rows of the upper triangle of nt x nt
// tiles; row bi starts at bi * nt - bi (bi - 1) / 2): a square root, then exact integer fixes.
__device__ __forceinline__ long long ms_row_of(long long q, long long nt)
{
    const double b = 2.0 * (double)nt + 1.0;
    long long bi = (long long)((b - sqrt(b * b - 8.0 * (double)q)) / 2.0);
    if (bi < 0) bi = 0;
    if (bi > nt - 1) bi = nt - 1;
    while (bi > 0 && bi * nt - bi * (bi - 1) / 2 > q) --bi;
    while (bi + 1 < nt && (bi + 1) * nt - (bi + 1) * bi / 2 <= q) ++bi;
    return bi;
}

// grid (blocks), block (MS_TILE, MS_ROWS); partial (gridDim.x, 2) double.
extern "C" __global__ void __launch_bounds__(MS_THREADS)
matrix_stats(const real_t* __restrict__ K, long long n, long long ld, double scale,
             double* partial)
{
    __shared__ double tileB[MS_TILE][MS_TILE + 1];
    __shared__ double red[2][MS_THREADS];
    const int tx = threadIdx.x, ty = threadIdx.y, t = ty * MS_TILE + tx;
    const long long nt = (n + MS_TILE - 1) / MS_TILE;
    const long long pairs = nt * (nt + 1) / 2;
    double fro = 0.0, upper = 0.0, diag = 0.0;
    for (long long q = blockIdx.x; q < pairs; q += gridDim.x) {
        const long long bi = ms_row_of(q, nt);
        const long long bj = bi + (q - (bi * nt - bi * (bi - 1) / 2));
        const long long i0 = bi * MS_TILE, j0 = bj * MS_TILE;
        // lower tile K[J, I]: row j0 + r, column i0 + tx, into tileB[r][tx]
#pragma unroll
        for (int k = 0; k < MS_TILE / MS_ROWS; ++k) {
            const int r = ty + k * MS_ROWS;
            const long long j = j0 + r, i = i0 + tx;
            const double v = (j < n && i < n) ? scale * (double)K[j * ld + i] : 0.0;
            fro += v * v;
            tileB[r][tx] = v;
        }
        __syncthreads();
        // upper tile K[I, J]: row i0 + r, column j0 + tx; its mirror K[j0 + tx, i0 + r]
#pragma unroll
        for (int k = 0; k < MS_TILE / MS_ROWS; ++k) {
            const int r = ty + k * MS_ROWS;
            const long long i = i0 + r, j = j0 + tx;
            const double v = (i < n && j < n) ? scale * (double)K[i * ld + j] : 0.0;
            const double d = v - tileB[tx][r];
            if (bi == bj) {
                diag += d * d;  // its squares are counted above; each {i, j} twice
            } else {
                fro += v * v;
                upper += d * d;
            }
        }
        __syncthreads();  // tileB is rewritten by the next pair
    }
    red[0][t] = fro;
    red[1][t] = 2.0 * upper + diag;
    __syncthreads();
    ms_block_reduce(red, t);
    if (t == 0) {
        partial[2 * (long long)blockIdx.x] = red[0][0];
        partial[2 * (long long)blockIdx.x + 1] = red[1][0];
    }
}

// one block (MS_TILE, MS_ROWS): out[k] <- sum over rows b of partial[b, k], k = 0, 1.
extern "C" __global__ void __launch_bounds__(MS_THREADS)
matrix_stats_sum(const double* __restrict__ partial, long long blocks, double* out)
{
    __shared__ double red[2][MS_THREADS];
    const int t = threadIdx.y * MS_TILE + threadIdx.x;
    double a = 0.0, b = 0.0;
    for (long long k = t; k < blocks; k += MS_THREADS) {
        a += partial[2 * k];
        b += partial[2 * k + 1];
    }
    red[0][t] = a;
    red[1][t] = b;
    __syncthreads();
    ms_block_reduce(red, t);
    if (t == 0) {
        out[0] = red[0][0];
        out[1] = red[1][0];
    }
}
