/* The emulator's scheduler: see emu.h. */
#include "emu.h"

#include <dlfcn.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }

namespace emu {

std::vector<LaunchRecord> launches;
bool fail_launches = false;
bool dry_run = false;

namespace {

enum State { RUN, BARRIER, WARP, DONE };
constexpr size_t STACK = 256 * 1024;

/* A fiber starts with swapcontext (its own stack) and then switches with _setjmp/_longjmp,
 * which, unlike swapcontext, makes no system call. */
struct Fiber {
    ucontext_t ctx;
    jmp_buf jb;
    State state;
    bool started;
};

ucontext_t scheduler;
jmp_buf scheduler_jb;
std::vector<Fiber> fibers;
std::vector<char> stacks;
unsigned current = 0;
unsigned nthreads = 0;
void (*body_fn)(void *) = nullptr;
void *body_ctx = nullptr;
unsigned char slots[32][32][8];

[[noreturn]] void die(const char *what)
{
    std::fprintf(stderr, "emulator: %s (block %u,%u,%u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z);
    std::exit(70);
}

void trampoline()
{
    body_fn(body_ctx);
    fibers[current].state = DONE;
    _longjmp(scheduler_jb, 1);
}

void yield()
{
    if (!_setjmp(fibers[current].jb)) {
        _longjmp(scheduler_jb, 1);
    }
}

void resume(unsigned t)
{
    if (!_setjmp(scheduler_jb)) {
        if (!fibers[t].started) {
            fibers[t].started = true;
            swapcontext(&scheduler, &fibers[t].ctx);
        } else {
            _longjmp(fibers[t].jb, 1);
        }
    }
}

void set_thread(unsigned t)
{
    current = t;
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

void run_block()
{
    fibers.assign(nthreads, Fiber{});
    if (stacks.size() < nthreads * STACK) {
        stacks.resize(nthreads * STACK);
    }
    for (unsigned t = 0; t < nthreads; ++t) {
        getcontext(&fibers[t].ctx);
        fibers[t].ctx.uc_stack.ss_sp = stacks.data() + t * STACK;
        fibers[t].ctx.uc_stack.ss_size = STACK;
        fibers[t].ctx.uc_link = &scheduler;
        fibers[t].state = RUN;
        fibers[t].started = false;
        makecontext(&fibers[t].ctx, trampoline, 0);
    }
    /* Sweeps alternate direction, so that a missing barrier between a write by one thread and a
     * read by another shows up as a wrong result whichever of the two runs first. */
    for (unsigned sweep = 0;; ++sweep) {
        for (unsigned i = 0; i < nthreads; ++i) {
            const unsigned t = (sweep & 1) ? nthreads - 1 - i : i;
            if (fibers[t].state == RUN) {
                set_thread(t);
                resume(t);
            }
        }
        unsigned done = 0, barrier = 0, running = 0;
        for (unsigned t = 0; t < nthreads; ++t) {
            done += fibers[t].state == DONE;
            barrier += fibers[t].state == BARRIER;
        }
        if (done == nthreads) {
            return;
        }
        /* warps whose threads all wait at a shuffle go on */
        for (unsigned w = 0; w * 32 < nthreads; ++w) {
            const unsigned end = (w + 1) * 32 < nthreads ? (w + 1) * 32 : nthreads;
            unsigned waiting = 0, exited = 0;
            for (unsigned t = w * 32; t < end; ++t) {
                waiting += fibers[t].state == WARP;
                exited += fibers[t].state == DONE;
            }
            if (waiting && waiting + exited == end - w * 32) {
                if (exited) {
                    die("shuffle in a warp with exited threads");
                }
                for (unsigned t = w * 32; t < end; ++t) {
                    fibers[t].state = RUN;
                }
                running += waiting;
            }
        }
        if (barrier && barrier + done == nthreads) {
            if (done) {
                die("__syncthreads() after some threads of the block exited");
            }
            for (unsigned t = 0; t < nthreads; ++t) {
                fibers[t].state = RUN;
            }
            running += barrier;
        }
        if (!running) {
            die("deadlock: threads wait at different barriers");
        }
    }
}

}  // namespace

unsigned current_thread() { return current; }
unsigned block_threads() { return nthreads; }
unsigned char *warp_slot(unsigned warp, unsigned lane) { return slots[warp][lane]; }

void syncthreads()
{
    fibers[current].state = BARRIER;
    yield();
}

void warp_barrier()
{
    fibers[current].state = WARP;
    yield();
}

void record(const void *fn, dim3 grid, dim3 block)
{
    Dl_info info;
    std::string name = "?";
    if (dladdr(fn, &info) && info.dli_sname) {
        name = info.dli_sname;
    }
    launches.push_back(LaunchRecord{name, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}});
}

void run_grid(dim3 grid, dim3 block, void (*body)(void *), void *ctx)
{
    gridDim = grid;
    blockDim = block;
    nthreads = block.x * block.y * block.z;
    body_fn = body;
    body_ctx = ctx;
    for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx.x = x;
                blockIdx.y = y;
                blockIdx.z = z;
                run_block();
            }
        }
    }
}

}  // namespace emu

/* C accessors, for tests that load generated layers and the emulator as one shared library with
 * ctypes: the recorded launches, and the dry-run and failing-launch switches. */
extern "C" size_t emu_launch_count(void) { return emu::launches.size(); }

extern "C" const char *emu_launch_kernel(size_t i) { return emu::launches[i].kernel.c_str(); }

/* which: 0..2 the grid's x, y, z; 3..5 the block's. */
extern "C" unsigned emu_launch_dim(size_t i, int which)
{
    const emu::LaunchRecord &l = emu::launches[i];
    return which < 3 ? l.grid[which] : l.block[which - 3];
}

extern "C" void emu_clear_launches(void) { emu::launches.clear(); }

extern "C" void emu_set_dry_run(int on) { emu::dry_run = on != 0; }

extern "C" void emu_set_fail_launches(int on) { emu::fail_launches = on != 0; }
