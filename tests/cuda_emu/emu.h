/*
 * A small CPU emulator for normgen's generated CUDA, so kernels are run (not only compiled) on
 * machines without a GPU. It is test support, not part of the generated product.
 *
 * Generated .cu files are compiled as ordinary C++ (g++) with this directory first on the include
 * path: <cuda_runtime.h> resolves to the stub here, the real <cuda_fp16.h>/<cuda_bf16.h> supply the
 * host conversions, and:
 *   - every thread of a block is a fiber (ucontext) on one OS thread, run round-robin (alternately
 *     forwards and backwards) until it reaches a barrier; blocks run one after another;
 *   - __syncthreads() waits until every thread of the block reaches it; a thread that has exited
 *     while others wait is reported as a divergent barrier;
 *   - __shfl_down_sync() exchanges through a per-warp slot with two warp barriers;
 *   - __shared__ is `static` (one instance, shared by the block's fibers; blocks run in turn);
 *   - cudaLaunchKernel() runs the grid at once and records the launch (kernel name, grid, block)
 *     for the test to compare with normgen.targets.cuda.plan's launches.
 */
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#undef __shared__
#define __shared__ static
#ifndef __noinline__
#define __noinline__ __attribute__((noinline))
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float __fdividef(float a, float b) { return a / b; }

namespace emu {

struct LaunchRecord {
    std::string kernel;
    unsigned grid[3];
    unsigned block[3];
};

extern std::vector<LaunchRecord> launches;
extern bool fail_launches; /* make every launch fail (tests the launchers' error path) */
extern bool dry_run;       /* record launches without running them */

/* Run fn(thread) for every thread of every block of the grid. */
void run_grid(dim3 grid, dim3 block, void (*body)(void *), void *ctx);
void record(const void *fn, dim3 grid, dim3 block);
void syncthreads();
void warp_barrier();
unsigned current_thread();
unsigned block_threads();
unsigned char *warp_slot(unsigned warp, unsigned lane);

template <class... P, std::size_t... I>
void call_kernel(void (*k)(P...), void **args, std::index_sequence<I...>)
{
    k(*static_cast<P *>(args[I])...);
}

template <class... P>
struct KernelCall {
    void (*k)(P...);
    void **args;
    static void run(void *self)
    {
        auto *c = static_cast<KernelCall *>(self);
        call_kernel(c->k, c->args, std::index_sequence_for<P...>{});
    }
};

}  // namespace emu

inline void __syncthreads() { emu::syncthreads(); }

template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    (void)mask;
    (void)width;
    const unsigned t = emu::current_thread();
    const unsigned lane = t & 31u, warp = t >> 5;
    std::memcpy(emu::warp_slot(warp, lane), &v, sizeof(T));
    emu::warp_barrier();
    T r = v;
    const unsigned src = lane + delta;
    if (src < 32 && warp * 32 + src < emu::block_threads()) {
        std::memcpy(&r, emu::warp_slot(warp, src), sizeof(T));
    }
    emu::warp_barrier();
    return r;
}

template <class... P>
cudaError_t cudaLaunchKernel(void (*k)(P...), dim3 grid, dim3 block, void **args, size_t shared = 0,
                             cudaStream_t stream = 0)
{
    (void)shared;
    (void)stream;
    emu::record(reinterpret_cast<const void *>(k), grid, block);
    if (emu::fail_launches) {
        return cudaErrorLaunchFailure;
    }
    if (emu::dry_run) {
        return cudaSuccess;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0 ||
        block.x * block.y * block.z > 1024) {
        return cudaErrorInvalidConfiguration;
    }
    emu::KernelCall<P...> call{k, args};
    emu::run_grid(grid, block, &emu::KernelCall<P...>::run, &call);
    return cudaSuccess;
}
