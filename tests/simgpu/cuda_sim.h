// Test-only CUDA execution model on the CPU, so ntkcore's .cu sources run without a GPU.
//
// Each kernel source is compiled by g++ with this header force-included (tests/simgpu/
// kernels.py). A launch runs the grid's blocks one after another on one OS thread; the
// threads of a block are ucontext fibers that switch only at __syncthreads() and at the warp
// collectives (__ballot_sync, __shfl_xor_sync), so:
//   - __shared__ arrays become function-local statics: one copy, which is exactly one
//     block's shared memory because blocks never overlap;
//   - a barrier releases when every live thread of the block (warp) is waiting at it;
//     threads that returned no longer count, as on sm_70+;
//   - a warp collective with a full mask whose warp has an exited or missing lane, lanes of
//     one warp waiting at different collectives, or threads of a block split between
//     __syncthreads() and a warp collective that can never complete, stop the launch with an
//     error (on a GPU these are undefined behaviour or a hang).
// Timing means nothing here; only results are checked.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <cmath>
#include <vector>

#define __global__
#define __device__ static
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

struct ntk_sim_uint3 { unsigned int x, y, z; };
static ntk_sim_uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace ntk_sim {

enum State { RUNNING, AT_SYNCTHREADS, AT_WARP, DONE };
enum Op { OP_NONE, OP_BALLOT, OP_SHFL_XOR };

struct Fiber {
    ucontext_t ctx;
    State state;
    ntk_sim_uint3 tid;
    unsigned int lane, warp;
    Op op;
    unsigned int mask;
    int arg;             // xor offset of a shuffle
    uint64_t put, got;   // value offered to / received from a warp collective
};

struct SharedArray { void* p; size_t bytes; };
static std::vector<SharedArray> shared_arrays;  // __shared__ arrays seen in this launch

static std::vector<Fiber> fibers;
static std::vector<char> stacks;
static const size_t kStack = 256 * 1024;
static ucontext_t scheduler;
static size_t current;
static void (*entry_fn)(void**);
static void** entry_args;
static char message[512];
static unsigned char* dynamic_shared;
static size_t dynamic_bytes;

static void fiber_main() {
    entry_fn(entry_args);
    fibers[current].state = DONE;  // uc_link returns to the scheduler
}

static void wait_here(State s) {
    Fiber& f = fibers[current];
    f.state = s;
    swapcontext(&f.ctx, &scheduler);
    threadIdx = fibers[current].tid;
}

static uint64_t warp_collective(Op op, unsigned int mask, uint64_t value, int arg) {
    Fiber& f = fibers[current];
    f.op = op;
    f.mask = mask;
    f.put = value;
    f.arg = arg;
    wait_here(AT_WARP);
    return fibers[current].got;
}

// Release every warp whose live lanes all wait at one collective; 1 if any was released,
// -1 on an error (message set).
static int release_warps(size_t nthreads) {
    int released = 0;
    const size_t nwarps = (nthreads + 31) / 32;
    for (size_t w = 0; w < nwarps; ++w) {
        const size_t l0 = 32 * w, l1 = l0 + 32 < nthreads ? l0 + 32 : nthreads;
        size_t waiting = 0, live = 0;
        for (size_t k = l0; k < l1; ++k) {
            if (fibers[k].state != DONE) ++live;
            if (fibers[k].state == AT_WARP) ++waiting;
        }
        if (waiting == 0 || waiting != live) continue;
        size_t lead = l0;
        while (fibers[lead].state != AT_WARP) ++lead;
        for (size_t k = l0; k < l1; ++k) {
            const Fiber& f = fibers[k];
            if (f.state != AT_WARP) continue;
            if (f.op != fibers[lead].op || f.mask != fibers[lead].mask) {
                snprintf(message, sizeof message, "warp %zu: lanes wait at different warp "
                         "collectives or masks (block %u,%u,%u)", w, blockIdx.x, blockIdx.y,
                         blockIdx.z);
                return -1;
            }
        }
        const unsigned int mask = fibers[lead].mask;
        for (unsigned int b = 0; b < 32; ++b) {
            if (!(mask >> b & 1u)) continue;
            const size_t k = l0 + b;
            if (k >= l1 || fibers[k].state != AT_WARP) {
                snprintf(message, sizeof message, "warp %zu: collective with mask 0x%08x but "
                         "lane %u has exited or does not exist (block %u,%u,%u)", w, mask, b,
                         blockIdx.x, blockIdx.y, blockIdx.z);
                return -1;
            }
        }
        for (size_t k = l0; k < l1; ++k) {
            Fiber& f = fibers[k];
            if (f.state != AT_WARP) continue;
            if (f.op == OP_BALLOT) {
                uint64_t bits = 0;
                for (size_t q = l0; q < l1; ++q)
                    if (fibers[q].state == AT_WARP && fibers[q].put) bits |= 1ull << (q - l0);
                f.got = bits & mask;
            } else {
                const size_t src = l0 + ((k - l0) ^ (size_t)f.arg);
                if (src >= l1 || fibers[src].state != AT_WARP) {
                    snprintf(message, sizeof message, "warp %zu: lane %zu shuffles from "
                             "missing lane %zu", w, k - l0, src - l0);
                    return -1;
                }
                f.got = fibers[src].put;
            }
        }
        for (size_t k = l0; k < l1; ++k)
            if (fibers[k].state == AT_WARP) fibers[k].state = RUNNING;
        released = 1;
    }
    return released;
}

static int run_block(size_t nthreads) {
    // Shared memory starts every block as garbage (all bits set: NaN for reals), so a read
    // of an element this block never wrote gives a wrong result instead of the last block's.
    for (const SharedArray& a : shared_arrays) memset(a.p, 0xFF, a.bytes);
    for (size_t k = 0; k < nthreads; ++k) {
        Fiber& f = fibers[k];
        f.state = RUNNING;
        f.op = OP_NONE;
        const unsigned int t = (unsigned int)k;
        f.tid.x = t % blockDim.x;
        f.tid.y = (t / blockDim.x) % blockDim.y;
        f.tid.z = t / (blockDim.x * blockDim.y);
        f.lane = t & 31u;
        f.warp = t >> 5;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = &stacks[k * kStack];
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
        for (size_t k = 0; k < nthreads; ++k) {
            if (fibers[k].state != RUNNING) continue;
            current = k;
            threadIdx = fibers[k].tid;
            swapcontext(&scheduler, &fibers[k].ctx);
        }
        size_t live = 0, at_sync = 0;
        for (size_t k = 0; k < nthreads; ++k) {
            if (fibers[k].state != DONE) ++live;
            if (fibers[k].state == AT_SYNCTHREADS) ++at_sync;
        }
        if (live == 0) return 0;
        const int warps = release_warps(nthreads);
        if (warps < 0) return -1;
        if (warps > 0) continue;
        if (at_sync == live) {
            for (size_t k = 0; k < nthreads; ++k)
                if (fibers[k].state == AT_SYNCTHREADS) fibers[k].state = RUNNING;
            continue;
        }
        snprintf(message, sizeof message, "block %u,%u,%u: %zu live threads, %zu at "
                 "__syncthreads and the rest at warp collectives that cannot complete",
                 blockIdx.x, blockIdx.y, blockIdx.z, live, at_sync);
        return -1;
    }
}

}  // namespace ntk_sim

// Inserted after each __shared__ declaration by kernels.py: the first thread to reach it in
// a launch registers (and poisons) the array; later blocks are poisoned by run_block.
static inline void ntk_sim_register_shared(void* p, size_t bytes) {
    for (const ntk_sim::SharedArray& a : ntk_sim::shared_arrays)
        if (a.p == p) return;
    ntk_sim::shared_arrays.push_back({p, bytes});
    memset(p, 0xFF, bytes);
}

static inline void __syncthreads() { ntk_sim::wait_here(ntk_sim::AT_SYNCTHREADS); }

static inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    return (unsigned int)ntk_sim::warp_collective(ntk_sim::OP_BALLOT, mask,
                                                  predicate ? 1u : 0u, 0);
}

template <typename T>
static inline T __shfl_xor_sync(unsigned int mask, T value, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof(T));
    bits = ntk_sim::warp_collective(ntk_sim::OP_SHFL_XOR, mask, bits, lane_mask);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline double __longlong_as_double(long long x) {
    double d;
    memcpy(&d, &x, sizeof d);
    return d;
}
using std::acos;
using std::sqrt;
using std::fabs;
using std::fma;

// Run kernel thunk ``fn(args)`` over grid x block; 0 on success, else -1 with a message.
extern "C" int ntk_sim_launch(void (*fn)(void**), void** args, unsigned int gx,
                              unsigned int gy, unsigned int gz, unsigned int bx,
                              unsigned int by, unsigned int bz, unsigned char* dyn_shared,
                              size_t dyn_bytes) {
    using namespace ntk_sim;
    const size_t nthreads = (size_t)bx * by * bz;
    if (nthreads == 0 || nthreads > 1024) {
        snprintf(message, sizeof message, "block of %zu threads (1..1024 allowed)", nthreads);
        return -1;
    }
    if (gy > 65535 || gz > 65535) {
        snprintf(message, sizeof message, "grid.y/z of %u/%u exceeds 65535", gy, gz);
        return -1;
    }
    shared_arrays.clear();
    fibers.assign(nthreads, Fiber());
    if (stacks.size() < nthreads * kStack) stacks.resize(nthreads * kStack);  // kept: no re-zeroing
    entry_fn = fn;
    entry_args = args;
    dynamic_shared = dyn_shared;
    dynamic_bytes = dyn_bytes;
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    for (unsigned int z = 0; z < gz; ++z)
        for (unsigned int y = 0; y < gy; ++y)
            for (unsigned int x = 0; x < gx; ++x) {
                blockIdx = {x, y, z};
                if (run_block(nthreads) != 0) return -1;
            }
    return 0;
}

extern "C" const char* ntk_sim_message() { return ntk_sim::message; }
