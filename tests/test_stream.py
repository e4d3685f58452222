"""Streaming stores (NAME_STREAM_BYTES in the generated C): a call that streams y writes the
bits of one that does not, on every core, for any alignment of y, in place too."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, build, reference
from normgen.harness.check import random_input
from normgen.lowering import lower
from normgen.targets.c.build import opt_flags
from normgen.targets.c.sweep import sweep_of
from normgen.targets.render import render

LAYERS = [
    BatchNorm(name="st_bn_nchw", format="BCSS", shape=[5, 9, 13]),  # predict: runs of 117; train: pipelined rows
    BatchNorm(name="st_bn_nhwc", format="BSSC", shape=[6, 7, 21]),  # predict: runs of 21; train: columns
    GroupNorm(name="st_gn_nchw", format="BCSS", shape=[6, 40, 41], num_groups=3),  # pipelined rows, runs > a chunk
    GroupNorm(name="st_gn_nhwc", format="BSSC", shape=[9, 11, 40], num_groups=4),  # columns
    LayerNorm(name="st_ln", format="BTC", shape=[4, 2500]),  # rows longer than a streamed chunk
    InstanceNorm(name="st_in", format="BCSS", shape=[3, 17, 19]),
    LayerNorm(name="st_ln_css", format="CSS", shape=[4, 30, 50], operation_dimension="spatial-channel"),  # one block
    GroupNorm(name="st_gn_tbc", format="TBC", shape=[7, 12], num_groups=3),  # runs of 4 with a stride between
    # rows of whole 64-byte lines: streamed from y's first line on, the per-channel values rotated
    BatchNorm(name="st_bn_nhwc32", format="BSSC", shape=[5, 3, 32]),  # predict and train (columns)
    GroupNorm(name="st_gn_nhwc48", format="BSSC", shape=[7, 5, 48], num_groups=6),
    BatchNorm(name="st_bn_row", format="BSC", shape=[1, 16], running_variance="biased"),  # one row at batch 1
]
ROTATED = LAYERS[8:]
OPENMP = [layer.replace(name=layer.name + "_omp", parallel="openmp") for layer in LAYERS[:4] + LAYERS[6:7] + ROTATED[:2]]


def _flags(layer, threshold: str) -> list[str]:
    return [*opt_flags(), f"-D{layer.name.upper()}_STREAM_BYTES={threshold}"]


def _outputs(compiled, layer, x, out):
    if layer.kind == "batchnorm":
        compiled.running_mean[:] = layer.trained_mean_values
        compiled.running_var[:] = layer.trained_variance_values
        return [compiled.predict(x, out=out).copy(), compiled.train_forward(x, out=out).copy(),
                compiled.running_mean.copy(), compiled.running_var.copy()]
    return [compiled.predict(x, out=out).copy()]


def _aligned_view(n: int, dtype, offset: int) -> np.ndarray:
    """n elements starting `offset` elements past a 64-byte boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.empty(n + offset + 64 // itemsize, dtype)
    skip = (-raw.ctypes.data // itemsize) % (64 // itemsize)
    return raw[skip + offset: skip + offset + n]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layer", LAYERS + OPENMP, ids=lambda l: l.name)
def test_streamed_y_is_the_cached_one(layer, dtype):
    layer = layer.replace(name=f"{layer.name}_{dtype[-2:]}", dtype=dtype)
    always, never = build(layer, flags=_flags(layer, "0")), build(layer, flags=_flags(layer, "SIZE_MAX"))
    batch = 1 if not layer.fmt.has_batch else 3
    x = random_input(layer, batch, np.random.default_rng(3)).astype(dtype)
    want = _outputs(never, layer, x, None)
    ref = reference.predict(layer, x)
    tol = 2e-5 if dtype == "float32" else 1e-12
    assert (np.abs(want[0] - ref) / (1 + np.abs(ref))).max() <= tol
    for offset in (0, 1, 3, 64 // np.dtype(dtype).itemsize - 1):
        out = _aligned_view(x.size, dtype, offset).reshape(x.shape)
        got = _outputs(always, layer, x, out)
        for g, w in zip(got, want, strict=True):
            assert np.array_equal(g, w), offset
    inplace = x.copy()
    assert np.array_equal(always.predict(inplace, out=inplace), want[0])
    if layer.kind == "batchnorm":
        always.running_mean[:] = layer.trained_mean_values
        always.running_var[:] = layer.trained_variance_values
        inplace = x.copy()
        assert np.array_equal(always.train_forward(inplace, out=inplace), want[1])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_block_of_one_row(dtype):
    """Batch 1 of a layer with rows of 16 channels: y is only the part before its first line and
    the rest of the row (no row starts on a line unless y does)."""
    layer = ROTATED[2].replace(name=f"st_bn_row1_{dtype[-2:]}", dtype=dtype)
    always, never = build(layer, flags=_flags(layer, "0")), build(layer, flags=_flags(layer, "SIZE_MAX"))
    x = random_input(layer, 1, np.random.default_rng(5)).astype(dtype)
    want = _outputs(never, layer, x, None)
    for offset in range(64 // np.dtype(dtype).itemsize):
        out = _aligned_view(x.size, dtype, offset).reshape(x.shape)
        for g, w in zip(_outputs(always, layer, x, out), want, strict=True):
            assert np.array_equal(g, w), offset


@pytest.mark.parametrize("layer", LAYERS[:2] + LAYERS[4:5], ids=lambda l: l.name)
def test_without_sse2_y_is_stored_as_usual(layer):
    """NAME_STREAMS=0 (what a compiler without SSE2 gets): the portable stores, the same bits."""
    plain = build(layer, flags=[*opt_flags(), f"-D{layer.name.upper()}_STREAMS=0", f"-D{layer.name.upper()}_STREAM_BYTES=0"])
    never = build(layer, flags=_flags(layer, "SIZE_MAX"))
    x = random_input(layer, 2, np.random.default_rng(4)).astype(np.float32)
    for g, w in zip(_outputs(plain, layer, x, None), _outputs(never, layer, x, None), strict=True):
        assert np.array_equal(g, w)


@pytest.mark.parametrize(("layer", "dtype", "rotate"), [
    (LAYERS[3], "float32", False),  # rows of 40 floats: 160 bytes
    (LAYERS[3], "float64", True),  # 320 bytes
    (ROTATED[1], "float32", True),
    (LAYERS[1], "float64", False),  # 21 channels
    (ROTATED[0], "float32", True),
    (ROTATED[2], "float64", True),
    (LAYERS[2], "float32", False),  # rows strategy: one statistic per run
], ids=lambda v: getattr(v, "name", str(v)))
def test_rows_of_whole_lines_are_rotated(layer, dtype, rotate):
    """Streamed rows are taken from y's first 64-byte line on (per-channel values rotated) exactly
    where every row of a block is whole lines."""
    plan = lower(layer.replace(dtype=dtype))
    text = render(plan, "c")[f"{layer.name}.c"]
    assert ("_r[j] = " in text) == rotate
    if layer.kind == "batchnorm":
        assert plan.apply_rotate == rotate
    else:
        assert sweep_of(plan).rotate == rotate


def test_a_call_streams_from_the_threshold_on(tmp_path):
    """NAME_STREAMED(nb, k): whether the k tensors of a call on nb samples hold at least
    NAME_STREAM_BYTES bytes (k = 2 for x and y, 3 for the backward's x, dy and dx)."""
    layer = LAYERS[0]
    plan = lower(layer)
    for name, text in render(plan, "c").items():
        (tmp_path / name).write_text(text)
    per_sample = plan.elements.static * plan.itemsize
    upper = layer.name.upper()
    (tmp_path / "probe.c").write_text(
        f'#include <stdio.h>\n#include "{layer.name}.c"\n'
        f'int main(void) {{ for (size_t k = 2; k <= 3; ++k) {{ for (size_t nb = 1; nb <= 4; ++nb) '
        f'printf("%d", {upper}_STREAMED(nb, k) ? 1 : 0); printf(" "); }} return 0; }}\n')
    seen = {}
    for threshold in (0, 2 * per_sample, 2 * per_sample + 1, 6 * per_sample, 9 * per_sample + 1, "SIZE_MAX"):
        exe = tmp_path / "probe"
        subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", f"-D{upper}_STREAM_BYTES={threshold}",
                        f"-I{tmp_path}", str(tmp_path / "probe.c"), "-o", str(exe), "-lm"], check=True)
        seen[threshold] = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    assert seen == {0: "1111 1111 ", 2 * per_sample: "1111 1111 ", 2 * per_sample + 1: "0111 1111 ",
                    6 * per_sample: "0011 0111 ", 9 * per_sample + 1: "0000 0001 ", "SIZE_MAX": "0000 0000 "}
    text = render(plan, "c")[f"{layer.name}.c"]
    assert f"#define {upper}_STREAM_BYTES {plan.stream_bytes}u" in text
    for k in (plan.stream_tensors(1), plan.stream_tensors(2)):
        assert f"{upper}_STREAMED(nb, {k})" in text


@pytest.mark.parametrize(("layer", "forward", "backward"), [
    (LAYERS[3], "2", "3"),  # a channels-last group norm block of 16 KB
    (GroupNorm(name="gn_big", format="BSSC", shape=[64, 64, 320], num_groups=32), "3", "5"),  # 5.2 MB
    (GroupNorm(name="gn_l2", format="BCSS", shape=[320, 64, 64], num_groups=32), "2", "3"),  # 160 KB
    (BatchNorm(name="bn_c", format="BCSS", shape=[64, 56, 56]), "2 + (nb * 12544 > 1048576u)",
     "3 + 2 * (nb * 12544 > 1048576u)"),  # a channel's block grows with the batch
])
def test_a_block_larger_than_l2_counts_twice(layer, forward, backward):
    """NAME_STREAM_BYTES counts an input twice where its statistic blocks exceed a core's L2."""
    plan = lower(layer)
    assert (plan.stream_tensors(1), plan.stream_tensors(2)) == (forward, backward)


def _cpu_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has("avx"), reason="the CPU has no AVX")
@pytest.mark.parametrize("layer", [LAYERS[1], LAYERS[3], LAYERS[4], ROTATED[1]], ids=lambda l: l.name)
def test_avx_streams_the_same_bits(layer):
    """With AVX (-mavx) the lines are streamed as two 32-byte stores instead of four SSE2 ones."""
    layer = layer.replace(name=layer.name + "_avx")
    upper = layer.name.upper()
    always = build(layer, flags=["-O2", "-mavx", f"-D{upper}_STREAM_BYTES=0"])
    never = build(layer, flags=["-O2", "-mavx", f"-D{upper}_STREAM_BYTES=SIZE_MAX"])
    x = random_input(layer, 3, np.random.default_rng(6)).astype(np.float32)
    for offset in (0, 5):
        out = _aligned_view(x.size, np.float32, offset).reshape(x.shape)
        for g, w in zip(_outputs(always, layer, x, out), _outputs(never, layer, x, None), strict=True):
            assert np.array_equal(g, w), offset


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: l.name)
def test_streamed_dx_is_the_cached_one(layer):
    """The training backward streams dx the same way (from statistics recomputed or saved)."""
    layer = layer.replace(name=layer.name + "_bw")
    always, never = build(layer, flags=_flags(layer, "0")), build(layer, flags=_flags(layer, "SIZE_MAX"))
    batch = 1 if not layer.fmt.has_batch else 3
    rng = np.random.default_rng(8)
    x = random_input(layer, batch, rng).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for g, w in zip(always.backward(x, dy), never.backward(x, dy), strict=True):
        assert np.array_equal(g, w)
    _, mean, inv = never.train_forward_save(x)
    for g, w in zip(always.backward_saved(x, dy, mean, inv), never.backward_saved(x, dy, mean, inv), strict=True):
        assert np.array_equal(g, w)
