/* Runs one generated layer's launchers under the CPU emulator (emu.h).
 * Build (one translation unit with the layer): -DLAYER=name -DLAYER_SOURCE='"name.cu"' [-DHAS_TRAIN]
 * Usage: driver MODE BATCH OFFSET INPLACE DIR
 *   MODE: predict | predict_ws | train_forward | train_forward_ws | errors | shapes
 *   (shapes: BATCH is the largest batch; prints "batch B workspace N" and the launches of every
 *   function for each batch 1..BATCH without running them)
 *   reads DIR/x.bin (and DIR/rm.bin, DIR/rv.bin), writes DIR/y.bin (DIR/rm_out.bin, DIR/rv_out.bin);
 *   prints "rc N", "workspace N", then one "launch KERNEL GX BX BY" line per kernel launch. */
#include LAYER_SOURCE

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "emu.h"

#define CAT2(a, b) a##b
#define CAT(a, b) CAT2(a, b)
#define FN(suffix) CAT(LAYER, suffix)

template <class F>
struct Elem;
#ifdef RUNTIME_PARAMS
/* Run-time parameters: every launcher takes the params struct first. */
static CAT(LAYER, _params) params_struct;
#define PARAMS &params_struct,
template <class P, class E, class... R>
struct Elem<int (*)(const P *, const E *, R...)> {
    using type = E;
};
#else
#define PARAMS
template <class E, class... R>
struct Elem<int (*)(const E *, R...)> {
    using type = E;
};
#endif
using elem = typename Elem<decltype(&FN(_predict))>::type;

static std::vector<char> slurp(const std::string &path)
{
    std::vector<char> out;
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f) {
        std::perror(path.c_str());
        std::exit(2);
    }
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) {
        out.insert(out.end(), buf, buf + n);
    }
    std::fclose(f);
    return out;
}

static void spit(const std::string &path, const void *p, size_t bytes)
{
    FILE *f = std::fopen(path.c_str(), "wb");
    std::fwrite(p, 1, bytes, f);
    std::fclose(f);
}

/* 16-byte aligned storage of n elements starting `offset` elements in. */
struct Buffer {
    std::vector<char> raw;
    elem *p;
    Buffer(size_t n, size_t offset) : raw((n + offset) * sizeof(elem) + 64)
    {
        uintptr_t a = (reinterpret_cast<uintptr_t>(raw.data()) + 15) & ~uintptr_t(15);
        p = reinterpret_cast<elem *>(a) + offset;
    }
};

int main(int argc, char **argv)
{
    if (argc != 6) {
        std::fprintf(stderr, "usage: driver MODE BATCH OFFSET INPLACE DIR\n");
        return 2;
    }
    const std::string mode = argv[1];
    const int batch = std::atoi(argv[2]);
    const size_t offset = std::strtoul(argv[3], nullptr, 10);
    const bool inplace = std::atoi(argv[4]) != 0;
    const std::string dir = argv[5];
#ifdef RUNTIME_PARAMS
    if (FN(_params_init)(&params_struct) != 0) {
        return 3;
    }
#endif
    if (mode == "shapes") {
        emu::dry_run = true;
        elem *fake = reinterpret_cast<elem *>(uintptr_t(4096));
        void *fws = reinterpret_cast<void *>(uintptr_t(8192));
        for (int b = 1; b <= batch; ++b) {
            std::printf("batch %d workspace %zu\n", b, FN(_workspace_size)(b));
            int rcs[4] = {FN(_predict)(PARAMS fake, fake, b, 0), 0, 0, 0};
#ifdef HAS_TRAIN
            rcs[1] = FN(_train_forward)(PARAMS fake, fake, b, fake, fake, 0);
            rcs[2] = FN(_train_forward_ws)(PARAMS fake, fake, b, fake, fake, fws, SIZE_MAX, 0);
#else
            rcs[2] = FN(_predict_ws)(PARAMS fake, fake, b, fws, SIZE_MAX, 0);
#endif
            std::printf("rcs %d %d %d\n", rcs[0], rcs[1], rcs[2]);
            for (const auto &l : emu::launches) {
                std::printf("launch %s %u %u %u\n", l.kernel.c_str(), l.grid[0], l.block[0], l.block[1]);
            }
            emu::launches.clear();
        }
        return 0;
    }
    if (mode == "errors") {
        elem one[1] = {};
        std::printf("null %d\n", FN(_predict)(PARAMS nullptr, one, 1, 0));
        std::printf("batch %d\n", FN(_predict)(PARAMS one, one, 0, 0));
        emu::fail_launches = true;
        std::vector<char> big(1 << 20);
        std::printf("launch_error %d\n", FN(_predict)(PARAMS reinterpret_cast<elem *>(big.data()), reinterpret_cast<elem *>(big.data()), 1, 0));
        emu::fail_launches = false;
        std::printf("workspace_size0 %zu\n", FN(_workspace_size)(0));
        return 0;
    }
    const std::vector<char> xin = slurp(dir + "/x.bin");
    const size_t n = xin.size() / sizeof(elem);
    Buffer xb(n, offset), yb(n, offset);
    std::memcpy(xb.p, xin.data(), xin.size());
    elem *x = xb.p;
    elem *y = inplace ? xb.p : yb.p;
    const size_t wsize = FN(_workspace_size)(batch);
    std::vector<char> wraw(wsize + 16);
    void *ws = wsize ? reinterpret_cast<void *>((reinterpret_cast<uintptr_t>(wraw.data()) + 15) & ~uintptr_t(15)) : nullptr;
    int rc = -1;
#ifdef HAS_TRAIN
    std::vector<char> rm, rv;
    if (mode.rfind("train_forward", 0) == 0) {
        rm = slurp(dir + "/rm.bin");
        rv = slurp(dir + "/rv.bin");
    }
    elem *prm = reinterpret_cast<elem *>(rm.data());
    elem *prv = reinterpret_cast<elem *>(rv.data());
    if (mode == "train_forward") {
        rc = FN(_train_forward)(PARAMS x, y, batch, prm, prv, 0);
    } else if (mode == "train_forward_ws") {
        if (wsize) {
            std::printf("small_workspace %d\n", FN(_train_forward_ws)(PARAMS x, y, batch, prm, prv, ws, wsize - 1, 0));
        }
        rc = FN(_train_forward_ws)(PARAMS x, y, batch, prm, prv, ws, wsize, 0);
    } else
#endif
    if (mode == "predict") {
        rc = FN(_predict)(PARAMS x, y, batch, 0);
#ifndef HAS_TRAIN
    } else if (mode == "predict_ws") {
        if (wsize) {
            std::printf("small_workspace %d\n", FN(_predict_ws)(PARAMS x, y, batch, ws, wsize - 1, 0));
        }
        rc = FN(_predict_ws)(PARAMS x, y, batch, ws, wsize, 0);
#endif
    } else {
        std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
        return 2;
    }
    std::printf("rc %d\nworkspace %zu\n", rc, wsize);
    for (const auto &l : emu::launches) {
        if (l.kernel == "?") {
            continue;
        }
        std::printf("launch %s %u %u %u\n", l.kernel.c_str(), l.grid[0], l.block[0], l.block[1]);
    }
    spit(dir + "/y.bin", y, n * sizeof(elem));
#ifdef HAS_TRAIN
    if (!rm.empty()) {
        spit(dir + "/rm_out.bin", rm.data(), rm.size());
        spit(dir + "/rv_out.bin", rv.data(), rv.size());
    }
#endif
    return 0;
}
