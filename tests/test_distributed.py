"""Data-parallel batch norm (issue 20): the generated synchronized functions split over shards in
one process, and normgen.distributed over torch.distributed (gloo, 3 processes on this machine),
against normgen.reference and PyTorch's batch_norm and autograd on the concatenated batch."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

import normgen
from helpers import bn_stats, params
from normgen import BatchNorm, NormgenError, distributed, reference

#: (layer keywords, shard sizes): uneven shards, a shard of one sample and an empty one.
CASES = {
    "nchw64": (dict(format="BCSS", shape=[4, 5, 3], dtype="float64"), [1, 0, 5]),
    "nhwc32": (dict(format="BSSC", shape=[3, 4, 6], dtype="float32"), [3, 1, 4]),
    "feat64": (dict(format="BC", shape=[6], dtype="float64", running_variance="biased", mean_decay=0.3,
                    variance_decay=0.2, bias=False), [2, 2, 3]),
    "tokens32": (dict(format="BCT", shape=[5, "t"], dtype="float32", param_storage="runtime"), [2, 3, 1]),
    "tbc64": (dict(format="TBC", shape=[3, 4], dtype="float64", affine="none"), [1, 4, 2]),
}
WORLD = 3
#: (rtol, atol) against the float64 oracles on the float32-rounded input.
TOL = {"float64": (0.0, 1e-9), "float32": (2e-5, 2e-5)}


def _layer(key: str) -> BatchNorm:
    kw, _ = CASES[key]
    channels = kw["shape"][kw["format"].replace("B", "").index("C")]
    extra = {} if kw.get("affine") == "none" else params(channels, 7)
    if kw.get("bias") is False:
        extra.pop("offset", None)
    return BatchNorm(name=f"dp_{key}", **kw, **extra, **bn_stats(channels, 7))


def _data(layer: BatchNorm, shards: list[int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (mean far from 0), a second training batch x2 and dy, in the layer's format and dtype."""
    rng = np.random.default_rng(seed)
    shape = reference.full_shape(layer, sum(shards), {n: 7 for n in layer.sizes})
    dt = layer.dtype if layer.dtype in ("float32", "float64") else "float64"  # CUDA's 16-bit: rounded by the caller
    x = (rng.standard_normal(shape) * 1.5 + 4.0).astype(dt)
    x2 = (rng.standard_normal(shape) * 0.5 - 1.0).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    return x, x2, dy


def _split(layer: BatchNorm, a: np.ndarray, shards: list[int]) -> list[np.ndarray]:
    axis = layer.fmt.letters.index("B")
    return np.split(a, np.cumsum(shards)[:-1], axis=axis)


def _expected(layer: BatchNorm, x, x2, dy):
    """What one process with the whole batch computes (normgen.reference): y of two training
    steps, the running statistics after them, and the backward of the second."""
    y1, rm, rv = reference.train_forward(layer, x, layer.trained_mean_values, layer.trained_variance_values)
    y2, rm, rv = reference.train_forward(layer, x2, rm, rv)
    dx, ds, do = reference.backward(layer, x2, dy)
    has = layer.parameter_arrays()
    return {"y1": y1, "y2": y2, "rm": rm, "rv": rv, "dx": dx, "dscale": ds if "scale" in has else None,
            "doffset": do if "offset" in has else None}


def _close(name, got, want, dtype):
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("key", sorted(CASES))
def test_split_in_one_process_matches_reference(key):
    """The generated functions on shards, merged here without a collective, give the whole batch's
    y, running statistics and gradients; the merge is Chan's and order-independent up to rounding."""
    layer = _layer(key)
    shards = CASES[key][1]
    m = normgen.build(layer)
    x, x2, dy = _data(layer, shards, 1)
    want = _expected(layer, x, x2, dy)
    axis = layer.fmt.letters.index("B")
    ys = {}
    for step, xs in (("y1", x), ("y2", x2)):
        parts = _split(layer, xs, shards)
        stats = m.stats_merge(np.stack([m.sync_stats(p) for p in parts]))
        assert stats[0] == reference.count(layer, sum(shards), {n: 7 for n in layer.sizes})
        mean, inv = m.sync_finish(stats)
        ys[step] = np.concatenate([m.sync_normalize(p, mean, inv) for p in parts], axis=axis)
        _close(step, ys[step], want[step], layer.dtype)
    _close("running_mean", m.running_mean, want["rm"], layer.dtype)
    _close("running_var", m.running_var, want["rv"], layer.dtype)
    parts, dys = _split(layer, x2, shards), _split(layer, dy, shards)
    sums = sum(m.sync_backward_sums(p, d, mean) for p, d in zip(parts, dys, strict=True))
    outs = [m.sync_backward(p, d, mean, inv, sums, stats[0]) for p, d in zip(parts, dys, strict=True)]
    _close("dx", np.concatenate([o[0] for o in outs], axis=axis), want["dx"], layer.dtype)
    for i, g in ((1, "dscale"), (2, "doffset")):
        if want[g] is None:
            assert all(o[i] is None for o in outs)
        else:
            _close(g, outs[0][i], want[g], layer.dtype)


def test_merge_is_chan_and_handles_empty_parts():
    layer = _layer("nchw64")
    m = normgen.build(layer)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 4, 5, 3)) + 1e6, rng.standard_normal((5, 4, 5, 3)) + 1e6
    sa, sb = m.sync_stats(a), m.sync_stats(b)
    empty = m.sync_stats(np.zeros((0, 4, 5, 3)))
    np.testing.assert_array_equal(empty, np.zeros_like(empty))
    merged = m.stats_merge(np.stack([empty, sa, empty, sb]))
    whole = np.concatenate([a, b]).transpose(1, 0, 2, 3).reshape(4, -1)
    assert merged[0] == whole.shape[1]
    np.testing.assert_allclose(merged[1:5], whole.mean(axis=1), rtol=1e-15)
    np.testing.assert_allclose(merged[5:], ((whole - whole.mean(axis=1, keepdims=True)) ** 2).sum(axis=1), rtol=1e-9)
    # by hand, Chan's formula
    n, nb_ = sa[0], sb[0]
    delta = sb[1:5] - sa[1:5]
    np.testing.assert_allclose(merged[1:5], sa[1:5] + delta * nb_ / (n + nb_), rtol=1e-15)
    # an all-empty batch has no statistics: finish refuses and writes nothing
    before = m.running_mean.copy()
    with pytest.raises(NormgenError, match="returned 3"):
        m.sync_finish(m.stats_merge(np.stack([empty, empty])))
    np.testing.assert_array_equal(m.running_mean, before)


@pytest.mark.parametrize("fmt,shape", [("BCSS", [3, 16, 16]), ("BSSC", [16, 16, 3])])
def test_large_mean_float32_over_shards(fmt, shape):
    """x = 1e4 + N(0, 1e-2) in float32 over shards of 2, 1 and 3 samples: the merged statistics and
    x - mean (hi + lo) stay accurate, as in the fused train_forward (tests/test_c_numeric.py)."""
    layer = BatchNorm(name=f"dp_big_{fmt.lower()}", format=fmt, shape=shape)
    m = normgen.build(layer)
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(0, 1e-2, reference.full_shape(layer, 6))).astype(np.float32)
    parts = _split(layer, x, [2, 1, 3])
    mean, inv = m.sync_finish(m.stats_merge(np.stack([m.sync_stats(p) for p in parts])))
    got = np.concatenate([m.sync_normalize(p, mean, inv) for p in parts], axis=layer.fmt.letters.index("B"))
    want, rm, rv = reference.train_forward(layer, x)
    assert np.abs(want).max() > 0.5
    assert np.abs(got - want).max() < 1e-4
    np.testing.assert_allclose(m.running_mean, rm, rtol=1e-6)
    np.testing.assert_allclose(m.running_var, rv, rtol=1e-3, atol=1e-7)


def test_errors_without_process_group_or_for_other_kinds():
    pytest.importorskip("torch")
    m = normgen.build(_layer("feat64"))
    with pytest.raises(NormgenError, match="init_process_group"):
        distributed.train_forward(m, np.ones((2, 6)))
    ln = normgen.build(normgen.LayerNorm(name="dp_ln", format="BC", shape=[6]))
    with pytest.raises(NormgenError, match="is for batch norm"):
        distributed.backward(ln, np.ones((2, 6)), np.ones((2, 6)))


# ---- several processes: torch.distributed (gloo over 127.0.0.1) --------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, backend: str, shards_of: dict[str, list[int]]) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for key, shards in shards_of.items():
            layer = _layer(key)
            m = normgen.build(layer, target="cuda" if backend == "nccl" else "c")
            x, x2, dy = (_split(layer, a, shards)[rank] for a in _data(layer, shards, 1))
            results[f"{key}/y1"] = distributed.train_forward(m, x)
            results[f"{key}/y2"] = distributed.train_forward(m, x2)
            results[f"{key}/rm"], results[f"{key}/rv"] = m.running_mean, m.running_var
            dx, ds, do = distributed.backward(m, x2, dy)
            results[f"{key}/dx"] = dx
            for g, v in (("dscale", ds), ("doffset", do)):
                if v is not None:
                    results[f"{key}/{g}"] = v
        np.savez(f"{out}/rank{rank}.npz", **results)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, backend: str, shards_of: dict[str, list[int]]) -> list[dict]:
    mp = pytest.importorskip("torch.multiprocessing")
    for key in shards_of:  # compiled once here, loaded from the cache by every process
        normgen.build(_layer(key), target="cuda" if backend == "nccl" else "c")
    world = len(next(iter(shards_of.values())))
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), backend, shards_of), nprocs=world, join=True)
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(world)]


def _to_torch_layout(layer: BatchNorm, a: np.ndarray) -> np.ndarray:
    """(B, C, rest...) as torch's batch_norm takes it."""
    letters = layer.fmt.letters
    order = [letters.index("B"), letters.index("C")] + [i for i, ch in enumerate(letters) if ch not in "BC"]
    return np.ascontiguousarray(a.transpose(order))


def _torch_expected(layer: BatchNorm, x, x2, dy):
    """PyTorch on the concatenated batch, float64: F.batch_norm (training) twice, autograd of the second."""
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.tensor(_to_torch_layout(layer, a), dtype=torch.float64)  # noqa: E731
    p = layer.parameter_arrays()
    rm = torch.tensor(layer.trained_mean_values, dtype=torch.float64)
    rv = torch.tensor(layer.trained_variance_values, dtype=torch.float64)
    w = torch.tensor(p["scale"], dtype=torch.float64, requires_grad=True) if "scale" in p else None
    b = torch.tensor(p["offset"], dtype=torch.float64, requires_grad=True) if "offset" in p else None
    out = {}
    if layer.mean_decay != layer.variance_decay or layer.running_variance != "unbiased":
        return None  # PyTorch has one momentum and an unbiased running variance only
    out["y1"] = F.batch_norm(t(x), rm, rv, w, b, training=True, momentum=layer.mean_decay, eps=layer.epsilon)
    xt = t(x2).requires_grad_(True)
    y2 = F.batch_norm(xt, rm, rv, w, b, training=True, momentum=layer.mean_decay, eps=layer.epsilon)
    y2.backward(t(dy))
    out.update(y2=y2, rm=rm, rv=rv, dx=xt.grad, dscale=None if w is None else w.grad,
               doffset=None if b is None else b.grad)
    return {k: None if v is None else v.detach().numpy() for k, v in out.items()}


def test_gloo_processes_match_one_process_and_pytorch(tmp_path):
    """3 processes, shards of uneven size (one of 1 sample, one empty): y, running statistics,
    dx, dscale, doffset against normgen.reference and PyTorch on the whole batch; running
    statistics and gradients bit-identical on every process."""
    pytest.importorskip("torch.distributed")
    keys = sorted(CASES)
    ranks = _run(tmp_path, "gloo", {k: CASES[k][1] for k in keys})
    for key in keys:
        layer = _layer(key)
        shards = CASES[key][1]
        x, x2, dy = _data(layer, shards, 1)
        axis = layer.fmt.letters.index("B")
        got = {k: np.concatenate([r[f"{key}/{k}"] for r in ranks], axis=axis) for k in ("y1", "y2", "dx")}
        for k in ("rm", "rv", "dscale", "doffset"):
            if f"{key}/{k}" in ranks[0]:
                for r in ranks[1:]:
                    np.testing.assert_array_equal(r[f"{key}/{k}"], ranks[0][f"{key}/{k}"], err_msg=f"{key} {k}")
                got[k] = ranks[0][f"{key}/{k}"]
        want = _expected(layer, x, x2, dy)
        for k, v in want.items():
            if v is None:
                assert k not in got, (key, k)
            else:
                _close(f"{key} {k} vs reference", got[k], v, layer.dtype)
        oracle = _torch_expected(layer, x, x2, dy)
        if oracle is not None:
            for k, v in oracle.items():
                if v is not None:
                    g = _to_torch_layout(layer, got[k]) if k in ("y1", "y2", "dx") else got[k]
                    _close(f"{key} {k} vs PyTorch", g, v, layer.dtype)


@pytest.mark.gpu
def test_nccl_processes_on_gpus(tmp_path):
    """The same over NCCL with the CUDA target (pycuda), one process per GPU (up to 3; the shards
    regrouped to the processes there are)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("NCCL needs CUDA GPUs and a PyTorch built with NCCL")
    pytest.importorskip("pycuda")
    world = min(WORLD, torch.cuda.device_count())
    keys = ["nchw64", "nhwc32", "tokens32"]
    shards_of = {k: CASES[k][1][: world - 1] + [sum(CASES[k][1][world - 1 :])] for k in keys}
    ranks = _run(tmp_path, "nccl", shards_of)
    for key in keys:
        layer = _layer(key)
        x, x2, dy = _data(layer, shards_of[key], 1)
        axis = layer.fmt.letters.index("B")
        want = _expected(layer, x, x2, dy)
        for k in ("y1", "y2", "dx"):
            _cuda_tol_close(f"{key} {k}", np.concatenate([r[f"{key}/{k}"] for r in ranks], axis=axis), want[k], layer)
        for k in ("rm", "rv", "dscale", "doffset"):
            if want[k] is not None:
                for r in ranks:
                    np.testing.assert_array_equal(r[f"{key}/{k}"], ranks[0][f"{key}/{k}"])
                _cuda_tol_close(f"{key} {k}", ranks[0][f"{key}/{k}"], want[k], layer)


def _cuda_tol_close(name, got, want, layer):
    """The CUDA training tolerance (tests/test_training.py): float64 1e-9, float32 2e-4, scaled."""
    tol = {"float64": 1e-9, "float32": 2e-4}[layer.dtype]
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.abs(got - want).max() / (1.0 + np.abs(want).max()) <= tol, name


# ---- CUDA: nvcc, and the launchers under the CPU emulator (tests/cuda_emu) ----------------------

CUDA_LAYERS = {
    "cu_nchw32": (dict(format="BCSS", shape=[4, 5, 3]), [2, 0, 1, 3]),
    "cu_nhwc16": (dict(format="BSSC", shape=[3, 5, 4], dtype="float16", param_storage="runtime"), [1, 3, 0, 2]),
    "cu_bct64": (dict(format="BCT", shape=[4, "t"], dtype="float64", bias=False, running_variance="biased"),
                 [3, 1, 2, 1]),
    "cu_tbc_bf": (dict(format="TBC", shape=[3, 4], dtype="bfloat16", affine="none"), [0, 2, 2, 1]),
}


def _cuda_layer(key: str) -> BatchNorm:
    kw, _ = CUDA_LAYERS[key]
    channels = kw["shape"][kw["format"].replace("B", "").index("C")]
    extra = {} if kw.get("affine") == "none" else params(channels, 11)
    if kw.get("bias") is False:
        extra.pop("offset", None)
    return BatchNorm(name=key, **kw, **extra, **bn_stats(channels, 11))


def test_cuda_sync_compiles_warning_free(tmp_path):
    from test_training import NVCC, _nvcc_check

    if NVCC is None:
        pytest.skip("nvcc is not on the PATH")
    for key in ("cu_nhwc16", "cu_bct64"):
        layer = _cuda_layer(key)
        rc, err, syms = _nvcc_check(layer, tmp_path)
        assert rc == 0, err[:4000]
        assert {f"{key}_{r}" for r in ("sync_stats", "stats_merge", "sync_finish", "sync_normalize",
                                       "sync_backward_sums", "sync_backward")} <= syms


def test_cuda_sync_under_emulator(tmp_path_factory):
    """Each shard's launchers on the CPU emulator, merged and summed as the collectives would,
    against the whole batch's reference (float16/bfloat16 storage included, an empty shard)."""
    import ctypes

    from test_training import EmulatedLayer, _cuda_close, emulated_library

    layers = [_cuda_layer(k) for k in CUDA_LAYERS]
    lib = emulated_library(layers, tmp_path_factory, tag="sync")
    for layer in layers:
        emu = EmulatedLayer(lib, layer)
        shards = CUDA_LAYERS[layer.name][1]
        x, x2, dy = _data(layer, shards, 5)
        x = emu.load(emu.store(x))  # the values the kernels see
        dy = emu.load(emu.store(dy))
        sizes = [7] * len(layer.sizes)
        axis = layer.fmt.letters.index("B")
        parts, dys = _split(layer, x, shards), _split(layer, dy, shards)
        c = layer.channels
        acc = np.zeros(1 + 2 * c)
        for p in parts:
            st = np.full(1 + 2 * c, np.nan)
            assert emu.fn("sync_stats")(emu.p(emu.store(p)), emu.p(st), p.shape[axis], *sizes, None) == 0
            assert emu.fn("stats_merge")(emu.p(acc), emu.p(st), None) == 0
        rm, rv = emu.store(layer.trained_mean_values), emu.store(layer.trained_variance_values)
        mean, inv = np.empty(c), np.empty(c)
        assert emu.fn("sync_finish")(emu.p(acc), emu.p(rm), emu.p(rv), emu.p(mean), emu.p(inv), None) == 0
        y = []
        for p in parts:
            out = emu.store(p)
            assert emu.fn("sync_normalize")(*emu.lead, emu.p(emu.store(p)), emu.p(mean), emu.p(inv), emu.p(out),
                                            p.shape[axis], *sizes, None) == 0
            y.append(emu.load(out))
        y_ref, rm_ref, rv_ref = reference.train_forward(layer, x, layer.trained_mean_values,
                                                        layer.trained_variance_values)
        _cuda_close(np.concatenate(y, axis=axis), y_ref, layer, "y")
        _cuda_close(emu.load(rm), rm_ref, layer, "running_mean")
        _cuda_close(emu.load(rv), rv_ref, layer, "running_var")
        sums = np.zeros(2 * c)
        for p, d in zip(parts, dys, strict=True):
            s = np.full(2 * c, np.nan)
            assert emu.fn("sync_backward_sums")(emu.p(emu.store(p)), emu.p(emu.store(d)), emu.p(mean), emu.p(s),
                                                p.shape[axis], *sizes, None) == 0
            sums += s
        dx = []
        grads = [g for g, _ in lower_plan(layer).gradients]
        for p, d in zip(parts, dys, strict=True):
            out = emu.store(p)
            gs = [np.full(c, np.nan, emu.acc) for _ in grads]
            assert emu.fn("sync_backward")(*emu.lead, emu.p(emu.store(p)), emu.p(emu.store(d)), emu.p(mean),
                                           emu.p(inv), emu.p(sums), ctypes.c_double(acc[0]), emu.p(out),
                                           *[emu.p(g) for g in gs], p.shape[axis], *sizes, None) == 0
            dx.append(emu.load(out))
        want = _expected_one_step(layer, x, dy)
        _cuda_close(np.concatenate(dx, axis=axis), want["dx"], layer, "dx")
        for g, got in zip(grads, gs, strict=True):
            _cuda_close(got, want[g], layer, g)


def lower_plan(layer):
    from normgen.lowering import lower

    return lower(layer, "cuda")


def _expected_one_step(layer, x, dy):
    dx, ds, do = reference.backward(layer, x, dy)
    return {"dx": dx, "dscale": ds, "doffset": do}


# ---- the MPI example (examples/mpi_bn) -----------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_mpi_example_three_processes(tmp_path):
    """examples/mpi_bn built with mpicc against generated/c/cnn_block and run on 3 processes
    (shards of 1, 0 and 3 samples): each matches one process with the whole batch, and the
    running statistics and gradients are the same bits on every process."""
    mpicc, mpirun = shutil.which("mpicc"), shutil.which("mpirun")
    if mpicc is None or mpirun is None:
        pytest.skip("mpicc/mpirun not on the PATH (apt-get install openmpi-bin libopenmpi-dev)")
    gen = ROOT / "generated" / "c" / "cnn_block"
    exe = tmp_path / "mpi_bn"
    build = subprocess.run([mpicc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2", f"-I{gen}", "-o",
                            str(exe), str(ROOT / "examples" / "mpi_bn" / "main.c"), str(gen / "stem_bn.c"), "-lm"],
                           capture_output=True, text=True)  # fmt: skip
    if build.returncode and "mpi.h" in build.stderr:
        pytest.skip("mpicc has no MPI headers (apt-get install libopenmpi-dev)")
    assert build.returncode == 0, build.stderr
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    extra = ["--oversubscribe"] if "Open MPI" in version else []
    if "Open MPI" in version and os.geteuid() == 0:
        extra.append("--allow-run-as-root")
    run = subprocess.run([mpirun, *extra, "-np", "3", str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = re.findall(r"^rank (\d) batch (\d+) rc=(\d+) identical=(\d) (.*)$", run.stdout, re.M)
    assert sorted((int(r), int(b)) for r, b, *_ in rows) == [(0, 1), (1, 0), (2, 3)]
    for _, _, rc, same, errs in rows:
        assert rc == "0" and same == "1"
        for what, value in re.findall(r"(\w+)=(\S+)", errs):
            assert float(value) <= 2e-6, (what, value)
    assert re.search(r"^OK: 3 processes, global batch 4", run.stdout, re.M)


# ---- AddressSanitizer and UBSan: every synchronized function on exact-size heap buffers ----------

ASAN_DRIVER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "{name}.h"
#define C {C}
#define PER {per}
static const int shards[3] = {{2, 0, 1}};

static {T} *copy_of(const {T} *src, size_t n)
{{
    {T} *p = malloc(n ? n * sizeof *p : 1);  /* exact size: ASan catches any access past it */
    if (n) memcpy(p, src, n * sizeof *p);
    return p;
}}

int main(void)
{{
    const int total = 3;
    static {T} x[3 * PER], dy[3 * PER], y[3 * PER], dx[3 * PER];
    FILE *f = fopen("in.bin", "rb");
    if (!f || fread(x, sizeof x[0], 3 * PER, f) != 3 * PER || fread(dy, sizeof dy[0], 3 * PER, f) != 3 * PER) return 10;
    fclose(f);
    {name}_stats *acc = calloc(1, sizeof *acc), *part = malloc(sizeof *part);
    double *mean = malloc(C * sizeof *mean), *inv = malloc(C * sizeof *inv), *sums = malloc(2 * C * sizeof *sums);
    double *total_sums = calloc(2 * C, sizeof *total_sums);
    {T} *rm = malloc(C * sizeof *rm), *rv = malloc(C * sizeof *rv), *ds = malloc(C * sizeof *ds), *dof = malloc(C * sizeof *dof);
    for (int c = 0; c < C; ++c) {{ rm[c] = 0; rv[c] = 1; }}
    int first = 0;
    for (int s = 0; s < 3; ++s) {{
        {T} *xs = copy_of(x + (size_t)first * PER, (size_t)shards[s] * PER);
        if ({name}_sync_stats(xs, part, shards[s]) != 0) return 20;
        if ({name}_stats_merge(acc, part) != 0) return 21;
        free(xs);
        first += shards[s];
    }}
    if ({name}_sync_finish(acc, rm, rv, mean, inv) != 0) return 22;
    first = 0;
    for (int s = 0; s < 3; ++s) {{
        const size_t n = (size_t)shards[s] * PER;
        {T} *xs = copy_of(x + (size_t)first * PER, n), *ys = copy_of(x + (size_t)first * PER, n);
        {T} *dys = copy_of(dy + (size_t)first * PER, n);
        if ({name}_sync_normalize(xs, mean, inv, ys, shards[s]) != 0) return 23;
        if ({name}_sync_normalize(xs, mean, inv, xs, shards[s]) != 0) return 24;  /* in place */
        if (n && memcmp(xs, ys, n * sizeof *xs)) return 25;
        if (n) memcpy(y + (size_t)first * PER, ys, n * sizeof *ys);
        memcpy(xs, x + (size_t)first * PER, n * sizeof *xs);
        if ({name}_sync_backward_sums(xs, dys, mean, sums, shards[s]) != 0) return 26;
        for (int i = 0; i < 2 * C; ++i) total_sums[i] += sums[i];
        free(xs); free(ys); free(dys);
        first += shards[s];
    }}
    first = 0;
    for (int s = 0; s < 3; ++s) {{
        const size_t n = (size_t)shards[s] * PER;
        {T} *xs = copy_of(x + (size_t)first * PER, n), *dys = copy_of(dy + (size_t)first * PER, n);
        if ({name}_sync_backward(xs, dys, mean, inv, total_sums, acc->count, dys, ds, dof, shards[s]) != 0) return 27;
        if (n) memcpy(dx + (size_t)first * PER, dys, n * sizeof *dys);
        free(xs); free(dys);
        first += shards[s];
    }}
    if ({name}_sync_stats(NULL, part, 1) != 1 || {name}_sync_normalize(x, mean, inv, y, -1) != 2) return 30;
    f = fopen("out.bin", "wb");
    fwrite(y, sizeof y[0], (size_t)total * PER, f);
    fwrite(dx, sizeof dx[0], (size_t)total * PER, f);
    fwrite(rm, sizeof rm[0], C, f);
    fwrite(rv, sizeof rv[0], C, f);
    fwrite(ds, sizeof ds[0], C, f);
    fwrite(dof, sizeof dof[0], C, f);
    fclose(f);
    free(acc); free(part); free(mean); free(inv); free(sums); free(total_sums); free(rm); free(rv); free(ds); free(dof);
    return 0;
}}
"""


@pytest.mark.parametrize("fmt,shape,dtype", [("BCSS", [3, 5, 7], "float32"), ("BSSC", [5, 7, 3], "float64")])
def test_sync_functions_under_asan_ubsan(fmt, shape, dtype, tmp_path):
    """Shards of 2, 0 and 1 samples on heap buffers of their exact size (an empty shard's of none),
    normalize in place, dx in place of dy, two error codes; the results against the reference."""
    layer = BatchNorm(name="dp_asan", format=fmt, shape=shape, dtype=dtype, **params(3, 4), **bn_stats(3, 4))
    for fname, text in normgen.emit(layer, "c").items():
        (tmp_path / fname).write_text(text)
    T = "float" if dtype == "float32" else "double"
    per = int(np.prod(shape))
    (tmp_path / "driver.c").write_text(ASAN_DRIVER.format(name=layer.name, C=3, per=per, T=T))
    flags = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O1", "-g", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    subprocess.run(["gcc", *flags, "-o", "driver", "driver.c", f"{layer.name}.c", "-lm"], cwd=tmp_path, check=True,
                   capture_output=True, text=True)
    rng = np.random.default_rng(6)
    x = rng.normal(2.0, 1.5, reference.full_shape(layer, 3)).astype(dtype)
    dy = rng.normal(0.0, 1.0, x.shape).astype(dtype)
    np.concatenate([x.reshape(-1), dy.reshape(-1)]).tofile(tmp_path / "in.bin")
    proc = subprocess.run(["./driver"], cwd=tmp_path, capture_output=True, text=True,
                          env={"ASAN_OPTIONS": "detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"})
    assert proc.returncode == 0, proc.stderr
    out = np.fromfile(tmp_path / "out.bin", dtype=dtype)
    n = x.size
    y, rm, rv = reference.train_forward(layer, x, np.zeros(3), np.ones(3))
    dx, ds, do = reference.backward(layer, x, dy)
    got = {"y": out[:n], "dx": out[n:2 * n], "rm": out[2 * n:2 * n + 3], "rv": out[2 * n + 3:2 * n + 6],
           "dscale": out[2 * n + 6:2 * n + 9], "doffset": out[2 * n + 9:]}
    for k, want in (("y", y), ("dx", dx), ("rm", rm), ("rv", rv), ("dscale", ds), ("doffset", do)):
        _close(k, got[k], np.asarray(want).reshape(-1), dtype)
