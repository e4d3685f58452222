"""The training half (issue 4) of the generated C, compiled with cffi and compared with
normgen.reference: backward, backward from saved statistics, frozen backward, the parameter
update and population statistics; error codes, aliasing, batch 1 and single-element groups;
the CUDA training kernels compiled by nvcc (and run where a GPU and pycuda are present)."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import random_formats
from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormgenError, build, emit, reference
from normgen.harness.check import TOLERANCES, random_input
from normgen.targets.c.build import compile_c
from normgen.targets.cuda.train import lower_train_cuda

# ---- the grid: every kind × layout family × dtype ------------------------------------------

FORMATS = {  # format → shape of the non-B dims; C = 6 everywhere
    "BC": [6],
    "BCSS": [6, 3, 5],
    "BSSC": [3, 5, 6],
    "TBC": [4, 6],
    "BTC": [4, 6],
    "BCSSS": [6, 2, 3, 2],
    "BCU": [6, 7],
    "CSS": [6, 3, 5],  # no B: batch 1
}
DTYPES = ("float32", "float64")


def _params(seed, c=6):
    rng = np.random.default_rng(seed)
    return {"scale": rng.normal(1.0, 0.5, c), "offset": rng.normal(0.0, 0.5, c)}


def _bn_stats(seed, c=6):
    rng = np.random.default_rng(seed + 100)
    return {"trained_mean": rng.normal(0.5, 1.0, c), "trained_variance": rng.uniform(0.5, 3.0, c)}


def grid_layers():
    layers = []
    for dtype in DTYPES:
        for i, (fmt, shape) in enumerate(FORMATS.items()):
            tag = f"{fmt}_{dtype[-2:]}"
            kw = dict(format=fmt, shape=shape, dtype=dtype, epsilon=1e-3, **_params(i))
            layers += [
                BatchNorm(name=f"tbn_{tag}", **kw, **_bn_stats(i), mean_decay=0.2, variance_decay=0.3),
                GroupNorm(name=f"tgn_{tag}", **kw, num_groups=3),
                InstanceNorm(name=f"tin_{tag}", **kw),
                LayerNorm(name=f"tln_{tag}", **kw),  # auto: spatial-channel for BCSS/BSSC/CSS
            ]
    # the other group/layer-norm variants and a MATLAB format, float64
    for fmt in ("BCSS", "BTC"):
        kw = dict(format=fmt, shape=FORMATS[fmt], dtype="float64", **_params(7))
        layers += [
            GroupNorm(name=f"tgna_{fmt}", **kw, num_groups="allchannels"),
            GroupNorm(name=f"tgnc_{fmt}", **kw, num_groups="channelwise"),
            LayerNorm(name=f"tlnc_{fmt}", **kw, operation_dimension="channel-only"),
            LayerNorm(name=f"tlnb_{fmt}", **kw, operation_dimension="batch-excluded"),
        ]
    layers.append(BatchNorm(name="tbn_mSSCB", matlab_format="SSCB", shape=[5, 3, 6], running_variance="biased",
                            **_params(9)))  # fmt: skip
    # float32 with statistics = "float": no double in the generated code
    layers += [la.replace(name=la.name.replace("_32", "_fs"), statistics="float")
               for la in layers if la.dtype == "float32"]
    return layers


GRID = grid_layers()


def _build_one(layer):
    compile_c(layer)
    return layer.name


@pytest.fixture(scope="module")
def warm_cache():
    """Compile the grid in parallel once (modules are cached by source hash), so the tests only load."""
    workers = min(len(GRID), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_build_one, GRID, chunksize=4))
    yield


def close(got, want, dtype, what, scale=1.0):
    rtol, atol = TOLERANCES[dtype]
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    err = np.abs(got - want)
    ok = err <= atol * scale + rtol * np.abs(want)
    assert ok.all() and np.isfinite(got).all(), (
        f"{what}: max abs err {err.max():.3e} (max |want| {np.abs(want).max():.3e})"
    )


def batches(layer):
    return (1, 3) if layer.fmt.has_batch else (1,)


@pytest.mark.usefixtures("warm_cache")
@pytest.mark.parametrize("layer", GRID, ids=lambda la: la.name)
def test_backward_matches_reference(layer):
    c = build(layer)
    rng = np.random.default_rng(11)
    for batch in batches(layer):
        x = random_input(layer, batch, rng).astype(c.dtype)
        dy = rng.standard_normal(x.shape).astype(c.dtype)
        want = reference.backward(layer, x, dy)
        got = c.backward(x, dy)
        for name, g, w in zip(("dx", "dscale", "doffset"), got, want, strict=True):
            close(g, w, layer.dtype, f"{layer.name} batch {batch} {name}")
        # the training forward that saves its statistics, and backward from them
        if layer.kind == "batchnorm":
            rm0, rv0 = c.running_mean.astype(np.float64), c.running_var.astype(np.float64)
        if layer.kind == "batchnorm" and layer.running_variance == "unbiased" and reference.count(layer, batch) < 2:
            with pytest.raises(NormgenError, match="returned 3"):
                c.train_forward_save(x)
            continue
        y, mean, invstd = c.train_forward_save(x)
        want_mean, want_inv = reference.saved_statistics(layer, x)
        saved = "float32" if layer.statistics == "float" else "float64"  # the accumulation type
        close(mean, want_mean, saved, f"{layer.name} saved mean", scale=1e2)
        close(invstd, want_inv, saved, f"{layer.name} saved invstd", scale=1e2)
        if layer.kind == "batchnorm":
            want_y, rm, rv = reference.train_forward(layer, x, rm0, rv0)
            close(c.running_mean, rm, layer.dtype, f"{layer.name} running mean")
            close(c.running_var, rv, layer.dtype, f"{layer.name} running var")
        else:
            want_y = reference.predict(layer, x)
        close(y, want_y, layer.dtype, f"{layer.name} train_forward_save y")
        got_saved = c.backward_saved(x, dy, mean, invstd)
        for name, g, w in zip(("dx", "dscale", "doffset"), got_saved, want, strict=True):
            close(g, w, layer.dtype, f"{layer.name} batch {batch} backward_saved {name}")
        if layer.kind == "batchnorm":
            for name, g, w in zip(("dx", "dscale", "doffset"), c.backward_frozen(x, dy),
                                  reference.backward_frozen(layer, x, dy), strict=True):  # fmt: skip
                close(g, w, layer.dtype, f"{layer.name} batch {batch} backward_frozen {name}")


def test_saved_statistics_count_and_layout():
    layer = next(la for la in GRID if la.name == "tgn_BSSC_64")
    c = build(layer)
    x = random_input(layer, 4, np.random.default_rng(0))
    _, mean, _ = c.train_forward_save(x)
    assert mean.shape == (4 * 3,)  # (batch, group), row-major
    np.testing.assert_allclose(mean[1 * 3 + 2], x[1, :, :, 4:6].mean(), rtol=1e-13)
    header = emit(layer)["tgn_BSSC_64.h"]
    assert "#define TGN_BSSC_64_SAVED_STATISTICS(batch) ((size_t)(batch) * 3)" in header


@pytest.mark.parametrize("kind", ["batchnorm", "groupnorm", "layernorm", "instancenorm"])
def test_backward_large_mean_float32(kind):
    """x = 1e4 + N(0, 1e-2) in float32: two-pass statistics keep x̂ (and so dx) accurate."""
    kw = dict(name=f"tbig_{kind}", format="BCSS", shape=[4, 8, 8], **_params(3, 4))
    layer = {
        "batchnorm": BatchNorm(**kw),
        "groupnorm": GroupNorm(**kw, num_groups=2),
        "layernorm": LayerNorm(**kw, operation_dimension="channel-only"),
        "instancenorm": InstanceNorm(**kw),
    }[kind]
    c = build(layer)
    rng = np.random.default_rng(5)
    x = (1e4 + rng.normal(0.0, 1e-2, (3, 4, 8, 8))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for name, g, w in zip(
        ("dx", "dscale", "doffset"), c.backward(x, dy), reference.backward(layer, x, dy), strict=True
    ):
        err = np.abs(g - w).max() / np.abs(w).max()
        assert err < 1e-5, (name, err)


@st.composite
def random_layers(draw):
    """A random valid format (one C, at most one B and T, some S/U), sizes, kind and dtype."""
    fmt, groups, channels, shape = draw(random_formats(groups=3, size=5))
    kw = dict(format=fmt, shape=shape, dtype=draw(st.sampled_from(DTYPES)), **_params(3, channels))
    kind = draw(st.sampled_from(["bn", "gn", "ln", "in"]))
    name = f"thyp_{kind}_{fmt}_{'_'.join(map(str, shape))}_{kw['dtype'][-2:]}"
    if kind == "bn":
        return BatchNorm(name=name, **kw, running_variance="biased")
    if kind == "gn":
        return GroupNorm(name=name, **kw, num_groups=groups)
    if kind == "ln":
        od = draw(st.sampled_from(["auto", "channel-only", "spatial-channel", "batch-excluded"]))
        return LayerNorm(name=f"{name}_{od[:2]}", **kw, operation_dimension=od)
    return InstanceNorm(name=name, **kw)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layer=random_layers(), batch=st.integers(1, 4))
def test_backward_random_shapes(layer, batch):
    """Drawn formats and sizes (derandomized: the same draws, so the compiled modules are cached)."""
    c = build(layer)
    batch = batch if layer.fmt.has_batch else 1
    rng = np.random.default_rng(batch)
    x = random_input(layer, batch, rng).astype(c.dtype)
    dy = rng.standard_normal(x.shape).astype(c.dtype)
    want = reference.backward(layer, x, dy)
    for name, g, w in zip(("dx", "dscale", "doffset"), c.backward(x, dy), want, strict=True):
        close(g, w, layer.dtype, f"{layer.name} {name}")
    _, mean, inv = c.train_forward_save(x)
    for name, g, w in zip(("dx", "dscale", "doffset"), c.backward_saved(x, dy, mean, inv), want, strict=True):
        close(g, w, layer.dtype, f"{layer.name} saved {name}")


# ---- long runs and several chunks: the blocked lanes, chunk merges and partial-sum flushes ----


def long_layers():
    """Layers whose sweeps the small grid does not reach (normgen/targets/c/sweep.py): runs of whole blocks
    of lanes with a short block at the end, several chunks per statistic, the per-channel partial
    sums of the rows strategy flushed more than once, and each of the four ways the channel runs."""
    return [
        # rows, one channel per run (runs of 4550: 142 blocks of 32 lanes and a short block), one channel
        # of the group per chunk
        GroupNorm(name="tlong_gn_nchw", format="BCSS", shape=[6, 70, 65], num_groups=3, **_params(21)),
        # rows, one channel per run, one batch per chunk (runs of 4095), float64
        BatchNorm(name="tlong_bn_nchw", format="BCSS", shape=[4, 63, 65], dtype="float64", running_variance="biased",
                  **_params(22, 4)),  # fmt: skip
        # rows, the channel along the run: 3 * 300 runs, the per-channel partial sums flushed every 16
        LayerNorm(name="tlong_ln_btc", format="BTC", shape=[300, 70], **_params(23, 70)),
        # rows, the channel along the run, two chunks per run
        LayerNorm(name="tlong_ln_wide", format="BTC", shape=[2, 9000], **_params(24, 9000)),
        # rows, the run is the 64 channels of a group: 20 runs a block, partial sums flushed within it
        GroupNorm(name="tlong_gn_rows", format="BSSC", shape=[4, 5, 128], num_groups=2, **_params(25, 128)),
        # columns, channel fixed per column, 600 rows: three chunks
        GroupNorm(name="tlong_gn_nhwc", format="BSSC", shape=[30, 20, 6], num_groups=3, **_params(26)),
        # columns, the channel varies with the chunk axis (one per row): 30 rows of 600, three chunks
        LayerNorm(name="tlong_ln_cf", format="BCSS", shape=[30, 20, 30], operation_dimension="channel-only",
                  dtype="float64", **_params(27, 30)),  # fmt: skip
    ]


LONG = long_layers()


@pytest.mark.parametrize("layer", LONG, ids=lambda la: la.name)
def test_backward_long_runs_and_chunks(layer):
    c = build(layer)
    rng = np.random.default_rng(12)
    for batch in (1, 3):
        x = random_input(layer, batch, rng).astype(c.dtype)
        dy = rng.standard_normal(x.shape).astype(c.dtype)
        want = reference.backward(layer, x, dy)
        got = c.backward(x, dy)
        for name, g, w in zip(("dx", "dscale", "doffset"), got, want, strict=True):
            close(g, w, layer.dtype, f"{layer.name} batch {batch} {name}")
        _, mean, inv = c.train_forward_save(x)
        want_mean, want_inv = reference.saved_statistics(layer, x)
        close(mean, want_mean, "float64", f"{layer.name} saved mean", scale=1e2)
        close(inv, want_inv, "float64", f"{layer.name} saved invstd", scale=1e2)
        for name, g, w in zip(("dx", "dscale", "doffset"), c.backward_saved(x, dy, mean, inv), want, strict=True):
            close(g, w, layer.dtype, f"{layer.name} batch {batch} backward_saved {name}")
        # in place: dx = x and dx = dy give the out-of-place result bit for bit
        for alias in ("x", "dy"):
            xx, dd = x.copy(), dy.copy()
            ds, do = np.empty(layer.channels, c.dtype), np.empty(layer.channels, c.dtype)
            out = xx if alias == "x" else dd
            p = c._ptr
            assert _raw(c, "backward")(p(xx), p(dd), p(out), p(ds), p(do), batch) == 0
            np.testing.assert_array_equal(out, got[0])
            np.testing.assert_array_equal(ds, got[1])
            np.testing.assert_array_equal(do, got[2])


@pytest.mark.parametrize("name", ["tlong_gn_nchw", "tlong_ln_btc", "tlong_ln_wide", "tlong_gn_nhwc"])
def test_backward_large_mean_long(name):
    """x = 1e4 + N(0, 1e-2) in float32 over long runs and several chunks."""
    layer = next(la for la in LONG if la.name == name)
    c = build(layer)
    rng = np.random.default_rng(7)
    x = (1e4 + rng.normal(0.0, 1e-2, reference.full_shape(layer, 2))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, inv = c.train_forward_save(x)
    want = reference.backward(layer, x, dy)
    for got in (c.backward(x, dy), c.backward_saved(x, dy, mean, inv)):
        for what, g, w in zip(("dx", "dscale", "doffset"), got, want, strict=True):
            err = np.abs(g - w).max() / np.abs(w).max()
            assert err < 1e-5, (name, what, err)


@pytest.mark.parametrize("name", ["tlong_gn_nchw", "tlong_ln_btc", "tlong_gn_rows", "tlong_gn_nhwc", "tlong_ln_cf"])
def test_backward_same_bits_at_every_optimization_level(name):
    """No reassociation: -O2 (SSE2) and -O3 -march=native (AVX2) give the same bits."""
    layer = next(la for la in LONG if la.name == name)
    rng = np.random.default_rng(3)
    x = random_input(layer, 3, rng)
    dy = rng.standard_normal(x.shape)
    results = []
    for flags in (["-O2"], ["-O3", "-march=native"]):
        c = build(layer, flags=flags)
        xx, dd = x.astype(c.dtype), dy.astype(c.dtype)
        y, mean, inv = c.train_forward_save(xx)
        results.append([*c.backward(xx, dd), *c.backward_saved(xx, dd, mean, inv), y, mean, inv])
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- batch 1, single-element statistics, errors, aliasing ----------------------------------


def test_single_value_per_channel():
    """Batch norm over one value per channel (format BC, batch 1): y = β, so dx = 0, dscale = 0
    and doffset = dy, as the derivative of the forward (PyTorch refuses this case). The
    unbiased running variance is undefined there: train_forward_save returns ERR_COUNT."""
    layer = BatchNorm(name="tbn_one", format="BC", shape=[4], dtype="float64", **_params(1, 4))
    c = build(layer)
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    dy = np.array([[0.5, -1.0, 2.0, 0.25]])
    dx, dscale, doffset = c.backward(x, dy)
    np.testing.assert_array_equal(dx, 0.0)
    np.testing.assert_array_equal(dscale, 0.0)
    np.testing.assert_array_equal(doffset, dy[0])
    with pytest.raises(NormgenError, match="returned 3"):
        c.train_forward_save(x)
    gn = GroupNorm(name="tgn_one", format="BC", shape=[4], num_groups="channelwise", dtype="float64")
    dx, dscale, doffset = build(gn).backward(x, dy)
    np.testing.assert_array_equal(dx, 0.0)
    np.testing.assert_array_equal(dscale, 0.0)


def _raw(c, role):
    return getattr(c._lib, f"{c.layer.name}_{role}")


@pytest.mark.parametrize("role", ["backward", "backward_frozen"])
def test_error_codes_leave_outputs_untouched(role):
    layer = next(la for la in GRID if la.name == "tbn_BCSS_64")
    c = build(layer)
    x = random_input(layer, 2, np.random.default_rng(0))
    dy = np.ones_like(x)
    dx, ds, do = np.full_like(x, 7.0), np.full(6, 7.0), np.full(6, 7.0)
    fn, p, null = _raw(c, role), c._ptr, c.ffi.NULL
    assert fn(p(x), p(dy), p(dx), p(ds), p(do), 0) == 2
    assert fn(p(x), p(dy), p(dx), p(ds), p(do), -3) == 2
    assert fn(null, p(dy), p(dx), p(ds), p(do), 2) == 1
    assert fn(p(x), p(dy), p(dx), null, p(do), 2) == 1
    assert (dx == 7.0).all() and (ds == 7.0).all() and (do == 7.0).all()
    acc = c.ffi.new("tbn_BCSS_64_stats *")
    assert _raw(c, "stats_reset")(null) == 1
    assert _raw(c, "accumulate")(acc, p(x), 0) == 2
    assert _raw(c, "finalize")(acc, p(ds), p(do)) == 3  # nothing accumulated
    assert (ds == 7.0).all()


@pytest.mark.parametrize("name", ["tgn_BSSC_32", "tbn_BCSS_64", "tln_TBC_64"])
@pytest.mark.parametrize("alias", ["dy", "x"])
def test_dx_may_alias_dy_or_x(name, alias):
    layer = next(la for la in GRID if la.name == name)
    c = build(layer)
    rng = np.random.default_rng(2)
    x = random_input(layer, 3, rng).astype(c.dtype)
    dy = rng.standard_normal(x.shape).astype(c.dtype)
    roles = ["backward"] + (["backward_frozen"] if layer.kind == "batchnorm" else [])
    for role in roles:
        want = getattr(c, role)(x, dy)
        xx, dd = x.copy(), dy.copy()
        ds, do = np.empty(6, c.dtype), np.empty(6, c.dtype)
        out = dd if alias == "dy" else xx
        p = c._ptr
        assert _raw(c, role)(p(xx), p(dd), p(out), p(ds), p(do), 3) == 0
        np.testing.assert_array_equal(out, want[0])
        np.testing.assert_array_equal(ds, want[1])
        np.testing.assert_array_equal(do, want[2])


def test_shape_errors_from_the_bench():
    c = build(next(la for la in GRID if la.name == "tin_BCSS_64"))
    x = np.zeros((2, 6, 3, 5))
    with pytest.raises(NormgenError, match="dy has shape"):
        c.backward(x, np.zeros((2, 6, 3, 4)))
    with pytest.raises(NormgenError, match="saved_mean needs 12 values"):
        c.backward_saved(x, x, np.zeros(3), np.zeros(12))
    with pytest.raises(NormgenError, match="is for batch norm"):
        c.backward_frozen(x, x)
    with pytest.raises(NormgenError, match="is for batch norm"):
        c.accumulate(x)


# ---- population statistics -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tbn_BCSS_32", "tbn_BSSC_64", "tbn_TBC_32", "tbn_BC_64", "tbn_mSSCB"])
def test_population_equals_concatenated_statistics(name):
    layer = next(la for la in GRID if la.name == name)
    c = build(layer)
    rng = np.random.default_rng(4)
    parts = [random_input(layer, b, rng).astype(c.dtype) for b in (1, 4, 2, 3)]
    c.reset_stats()
    for part in parts:
        c.accumulate(part)
    mean, var = c.finalize()
    whole = np.concatenate(parts, axis=layer.fmt.letters.index("B")).astype(np.float64)
    rows = np.moveaxis(whole, layer.fmt.letters.index("C"), 0).reshape(6, -1)
    assert c.stats_count == rows.shape[1]
    ddof = 1 if layer.running_variance == "unbiased" else 0
    close(mean, rows.mean(axis=1), layer.dtype, "population mean")
    close(var, rows.var(axis=1, ddof=ddof), layer.dtype, "population variance")
    state = reference.population_empty(layer)
    for part in parts:
        state = reference.population_accumulate(layer, state, part)
    ref_mean, ref_var = reference.population_finalize(layer, state)
    close(mean, ref_mean, layer.dtype, "population mean vs reference")
    close(var, ref_var, layer.dtype, "population variance vs reference")


def test_population_large_mean_and_runtime_params():
    """Float32 data 1e4 + N(0, 1e-2) over many batches: exact-looking variance (merged in double);
    with run-time parameters finalize writes the trained statistics that predict then uses."""
    layer = BatchNorm(name="tbn_pop_rt", format="BSSC", shape=[4, 4, 6], param_storage="runtime", **_params(2))
    c = build(layer)
    rng = np.random.default_rng(6)
    parts = [(1e4 + rng.normal(0.0, 1e-2, (b, 4, 4, 6))).astype(np.float32) for b in (3, 1, 5, 2, 7)]
    for part in parts:
        c.accumulate(part)
    mean, var = c.finalize()
    rows = np.concatenate(parts).astype(np.float64).reshape(-1, 6)
    np.testing.assert_allclose(mean, rows.mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(var, rows.var(axis=0, ddof=1), rtol=1e-5)
    np.testing.assert_array_equal(c.get_params()["trained_mean"], mean)
    c.reset_stats()
    assert c.stats_count == 0
    # (folded float32 predict cannot resolve 1e-2 around 1e4: check predict on ordinary data)
    parts = [random_input(layer, b, rng).astype(np.float32) for b in (2, 3)]
    for part in parts:
        c.accumulate(part)
    mean, var = c.finalize()
    trained = layer.replace(trained_mean=mean, trained_variance=var)
    close(c.predict(parts[0]), reference.predict(trained, parts[0]), "float32", "predict after finalize")


# ---- parameter update (run-time parameters) ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_follows_sgdm_with_factors(dtype):
    layer = GroupNorm(name=f"tgn_upd_{dtype[-2:]}", format="BCSS", shape=[6, 3, 5], num_groups=2, dtype=dtype,
                      param_storage="runtime", scale_learn_rate_factor=2.0, offset_learn_rate_factor=0.5,
                      scale_l2_factor=0.0, offset_l2_factor=3.0, **_params(5))  # fmt: skip
    c = build(layer)
    rng = np.random.default_rng(8)
    s, o = layer.scale_values.copy(), layer.offset_values.copy()
    vs, vo = np.zeros(6), np.zeros(6)
    current = layer
    for step in range(4):
        x = random_input(layer, 2, rng).astype(c.dtype)
        dy = rng.standard_normal(x.shape).astype(c.dtype)
        dx, ds, do = c.backward(x, dy)
        want = reference.backward(current, x, dy)  # the run-time scale is the updated one
        for name, g, w in zip(("dx", "dscale", "doffset"), (dx, ds, do), want, strict=True):
            close(g, w, dtype, f"step {step} {name}")
        c.update(ds, do, learn_rate=0.05, l2=0.01, momentum=0.9)
        s, o, vs, vo = reference.sgdm_update(layer, s, o, ds, do, vs, vo, learn_rate=0.05, l2=0.01, momentum=0.9)
        got = c.get_params()
        close(got["scale"], s, dtype, f"step {step} scale")
        close(got["offset"], o, dtype, f"step {step} offset")
        close(c.velocity_scale, vs, dtype, f"step {step} velocity_scale")
        close(c.velocity_offset, vo, dtype, f"step {step} velocity_offset")
        current = layer.replace(scale=got["scale"].astype(np.float64), offset=got["offset"].astype(np.float64))


def test_update_needs_runtime_params():
    c = build(next(la for la in GRID if la.name == "tbn_BC_64"))
    with pytest.raises(NormgenError, match="param_storage='runtime'"):
        c.update(np.zeros(6), np.zeros(6))
    header = emit(c.layer)["tbn_BC_64.h"]
    assert "tbn_BC_64_update" not in header


def test_runtime_backward_frozen_reads_params():
    layer = BatchNorm(name="tbn_frozen_rt", format="BCSS", shape=[6, 3, 5], dtype="float64", param_storage="runtime",
                      **_params(4), **_bn_stats(4))  # fmt: skip
    c = build(layer)
    new = {"scale": np.linspace(-1, 1, 6), "trained_mean": np.arange(6.0), "trained_variance": np.arange(1.0, 7.0)}
    c.set_params(**new)
    x = random_input(layer, 2, np.random.default_rng(0))
    dy = np.random.default_rng(1).standard_normal(x.shape)
    for g, w in zip(c.backward_frozen(x, dy), reference.backward_frozen(layer.replace(**new), x, dy), strict=True):
        close(g, w, "float64", "frozen backward with run-time params")


# ---- generated text ---------------------------------------------------------------------------


def test_training_functions_are_declared_and_deterministic():
    layer = next(la for la in GRID if la.name == "tbn_BCSS_32")
    files = emit(layer)
    assert files == emit(layer)
    h = files["tbn_BCSS_32.h"]
    for sig in (
        "int tbn_BCSS_32_backward(const float *x, const float *dy, float *dx, float *dscale, float *doffset, int32_t batch);",
        "int tbn_BCSS_32_backward_saved(const float *x, const float *dy, const double *saved_mean, "
        "const double *saved_invstd, float *dx, float *dscale, float *doffset, int32_t batch);",
        "int tbn_BCSS_32_backward_frozen(const float *x, const float *dy, float *dx, float *dscale, float *doffset, "
        "int32_t batch);",
        "int tbn_BCSS_32_accumulate(tbn_BCSS_32_stats *acc, const float *x, int32_t batch);",
        "int tbn_BCSS_32_finalize(const tbn_BCSS_32_stats *acc, float *trained_mean, float *trained_variance);",
    ):
        assert sig in h, sig
    rt = emit(layer.replace(param_storage="runtime"))["tbn_BCSS_32.h"]
    assert (
        "int tbn_BCSS_32_update(tbn_BCSS_32_params *params, const float *dscale, const float *doffset, "
        "float *velocity_scale, float *velocity_offset, float learn_rate, float l2, float momentum);"
    ) in rt
    assert "const tbn_BCSS_32_params *params, const float *x, const float *dy, float *dx" in rt


# ---- CUDA: nvcc compile checks, CPU emulation, GPU -----------------------------------------------

CUDA_INCLUDE = next((Path(c) / "include" for c in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda")
                     if c and (Path(c) / "include" / "cuda_fp16.h").is_file()), None)  # fmt: skip
EMU = Path(__file__).resolve().parent / "cuda_emu"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA toolkit missing)")
needs_emu = pytest.mark.skipif(GXX is None or CUDA_INCLUDE is None or not (EMU / "emu.h").is_file(),
                               reason="the CPU emulator needs g++, the CUDA headers and tests/cuda_emu")  # fmt: skip


def cuda_layers():
    """Every kind, the CUDA layout families and all four storage types."""
    p = _params(12)
    return [
        BatchNorm(name="cbn_nchw32", format="BCSS", shape=[6, 3, 5], **p, **_bn_stats(1), mean_decay=0.2),
        BatchNorm(name="cbn_nhwc16", format="BSSC", shape=[3, 5, 6], dtype="float16", **p, **_bn_stats(2)),
        BatchNorm(
            name="cbn_msscb_bf",
            matlab_format="SSCB",
            shape=[5, 3, 6],
            dtype="bfloat16",
            running_variance="biased",
            **p,
            **_bn_stats(3),
        ),
        BatchNorm(name="cbn_bc64", format="BC", shape=[6], dtype="float64", **p, **_bn_stats(4)),
        GroupNorm(name="cgn_nhwc32", format="BSSC", shape=[3, 5, 6], num_groups=3, **p),
        GroupNorm(name="cgn_sbsc64", format="SBSC", shape=[3, 4, 6], num_groups=2, dtype="float64", **p),  # generic
        LayerNorm(name="cln_tbc64", format="TBC", shape=[4, 6], dtype="float64", **p),
        LayerNorm(name="cln_css32", format="CSS", shape=[6, 3, 5], operation_dimension="batch-excluded", **p),
        InstanceNorm(name="cin_bcu16", format="BCU", shape=[6, 7], dtype="float16", **p),
        InstanceNorm(name="cin_bcsss32", format="BCSSS", shape=[6, 2, 3, 2], **p),
    ]


CUDA_GRID = cuda_layers()
CUDA_TOL = {"float64": 1e-9, "float32": 2e-4, "float16": 4e-3, "bfloat16": 3e-2}


def _nvcc_check(layer, workdir: Path) -> tuple[int, str, set]:
    """nvcc for sm_80 and sm_90, warnings as errors; cached by source, flags and nvcc version."""
    from normgen.targets.cache import cache_dir
    from normgen.targets.cache import key as _key
    from normgen.targets.cuda.module import nvcc_version

    files = emit(layer, "cuda")
    flags = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", "-std=c++17",
             "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]  # fmt: skip
    marker = cache_dir() / f"_train_nvcc_{layer.name}_{_key([*files.values(), *flags, nvcc_version(NVCC)])}.ok"
    if marker.is_file():
        return 0, "", set(marker.read_text().split())
    d = workdir / layer.name
    d.mkdir()
    for fname, text in files.items():
        (d / fname).write_text(text)
    proc = subprocess.run([NVCC, *flags, "-c", str(d / f"{layer.name}.cu"), "-o", str(d / "k.o")],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        return proc.returncode, proc.stderr, set()
    nm = subprocess.run(["nm", "-g", "--defined-only", str(d / "k.o")], capture_output=True, text=True).stdout
    syms = {line.split()[-1] for line in nm.splitlines() if " T " in line}
    marker.write_text("\n".join(sorted(syms)))
    return 0, "", syms


@needs_nvcc
def test_cuda_training_compiles_warning_free_sm80_sm90(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda la: _nvcc_check(la, tmp_path), CUDA_GRID))
    for layer, (rc, err, syms) in zip(CUDA_GRID, results, strict=True):
        assert rc == 0, f"{layer.name}:\n{err[:4000]}"
        tc = lower_train_cuda(lower_cuda(layer))
        want = {f.name for f in tc.launchers} | set(tc.kernels) | {f"{layer.name}_backward_workspace_size"}
        assert want <= syms, f"{layer.name}: missing {sorted(want - syms)}"


def lower_cuda(layer):
    from normgen.lowering import lower

    return lower(layer, "cuda")


class EmulatedLayer:
    """The generated CUDA launchers run on the CPU through tests/cuda_emu (device pointers are host
    pointers there), called with ctypes on NumPy arrays. With run-time parameters ``params`` is
    the NAME_params struct (the parameter arrays back to back, in the accumulation type), filled
    by NAME_params_init, and ``lead`` passes it first to the functions that take it."""

    def __init__(self, lib, layer):
        import ctypes

        self.ct = ctypes
        self.lib, self.layer = lib, layer
        self.tc = lower_train_cuda(lower_cuda(layer))
        self.storage = np.dtype({"float32": np.float32, "float64": np.float64, "float16": np.float16,
                                 "bfloat16": np.uint16}[layer.dtype])  # fmt: skip
        self.acc = np.dtype(np.float64 if self.tc.A == "double" else np.float32)
        getattr(lib, f"{layer.name}_backward_workspace_size").restype = ctypes.c_size_t
        self.params, self.lead = None, ()
        if self.tc.runtime_params:
            self.params = np.zeros((len(layer.parameter_arrays()), layer.channels), self.acc)
            assert self.fn("params_init")(self.p(self.params)) == 0
            self.lead = (self.p(self.params),)

    def fn(self, role):
        return getattr(self.lib, f"{self.layer.name}_{role}")

    def p(self, a):
        return None if a is None else self.ct.c_void_p(a.ctypes.data)

    def store(self, x):
        from normgen.targets.cuda.module import to_storage

        return np.array(to_storage(x, self.layer.dtype), copy=True)  # the kernels write in place

    def load(self, a):
        from normgen.targets.cuda.module import from_storage

        return from_storage(a, self.layer.dtype).astype(np.float64)

    def workspace(self, batch):
        n = getattr(self.lib, f"{self.layer.name}_backward_workspace_size")(batch)
        assert n == self.tc.workspace_size(batch)
        buf = np.zeros(n // 8 + 4, np.float64)  # 16-byte aligned by NumPy
        return buf, n

    def backward(self, x, dy, saved=None, out=None):
        xs, dys = self.store(x), self.store(dy)
        dx = np.empty_like(xs) if out is None else out
        ds, do = np.empty(self.layer.channels, self.acc), np.empty(self.layer.channels, self.acc)
        batch = reference.batch_of(self.layer, x)
        ws, n = self.workspace(batch)
        if saved is None:
            rc = self.fn("backward")(*self.lead, self.p(xs), self.p(dys), self.p(dx), self.p(ds), self.p(do), batch,
                                     self.p(ws), self.ct.c_size_t(n), None)  # fmt: skip
        else:
            sm, si = (np.ascontiguousarray(a, np.float64) for a in saved)
            rc = self.fn("backward_saved")(*self.lead, self.p(xs), self.p(dys), self.p(sm), self.p(si), self.p(dx),
                                           self.p(ds), self.p(do), batch, self.p(ws), self.ct.c_size_t(n),
                                           None)  # fmt: skip
        assert rc == 0, rc
        return self.load(dx), ds, do


def emulated_library(layers, tmp_path_factory, tag="train"):
    """One shared library: every layer's .cu (kernels and launchers) + the emulator, loaded with
    ctypes; cached like the compiled C modules (by the sources, the flags and g++'s version)."""
    if GXX is None or CUDA_INCLUDE is None or not (EMU / "emu.h").is_file():
        pytest.skip("the CPU emulator needs g++, the CUDA headers and tests/cuda_emu")
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    from normgen.targets.c.build import compiler_version
    from normgen.targets.cache import cache_dir
    from normgen.targets.cache import key as _key

    flags = ["-std=c++17", "-O1", "-w", "-fPIC"]
    sources = {fname: text for la in layers for fname, text in emit(la, "cuda").items()}
    emu_files = {name: (EMU / name).read_text() for name in ("emu.h", "emu.cpp", "cuda_runtime.h")}
    key = _key([*sources.values(), *emu_files.values(), *flags, str(CUDA_INCLUDE), compiler_version(GXX)])
    lib = cache_dir() / f"_{tag}_emu_{key}.so"
    if not lib.exists():
        root = tmp_path_factory.mktemp(f"{tag}_emu")
        for fname, text in {**sources, **emu_files}.items():
            (root / fname).write_text(text)
        inc = [f"-I{root}", f"-I{CUDA_INCLUDE}"]
        cmds = [[GXX, *flags, *inc, "-c", str(root / "emu.cpp"), "-o", str(root / "emu.o")]]
        for layer in layers:
            cmds.append([GXX, *flags, *inc, "-include", "emu.h", "-x", "c++", "-c", str(root / f"{layer.name}.cu"),
                         "-o", str(root / f"{layer.name}.o")])  # fmt: skip
        with ThreadPoolExecutor(max_workers=2) as pool:
            for proc in pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), cmds):
                assert proc.returncode == 0, proc.stderr[:4000]
        objs = [str(root / f"{la.name}.o") for la in layers] + [str(root / "emu.o")]
        subprocess.run([GXX, "-shared", *objs, "-o", str(root / "train.so"), "-ldl"], check=True)
        os.replace(root / "train.so", lib)
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The CUDA_GRID layers under the emulator (emulated_library)."""
    return emulated_library(CUDA_GRID, tmp_path_factory)


def _cuda_close(got, want, layer, what):
    tol = CUDA_TOL[layer.dtype]
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / (1.0 + np.abs(want).max())
    assert err <= tol, f"{layer.name} {what}: scaled error {err:.3e} > {tol}"


@needs_emu
@pytest.mark.parametrize("layer", CUDA_GRID, ids=lambda la: la.name)
def test_cuda_training_emulated_matches_reference(emulated, layer):
    from normgen.targets.cuda.module import round_to

    em = EmulatedLayer(emulated, layer)
    rng = np.random.default_rng(21)
    for batch in batches(layer):
        x = round_to(random_input(layer, batch, rng), layer.dtype)
        dy = round_to(rng.standard_normal(x.shape), layer.dtype)
        want = reference.backward(layer, x, dy)
        for name, g, w in zip(("dx", "dscale", "doffset"), em.backward(x, dy), want, strict=True):
            _cuda_close(g, w, layer, f"batch {batch} backward {name}")
        # train_forward_save, then backward from its saved statistics
        xs = em.store(x)
        y = np.empty_like(xs)
        n = em.tc.stats.value(batch)
        sm, si = np.empty(n), np.empty(n)
        args = [em.p(xs), em.p(y), batch]
        if layer.kind == "batchnorm":
            rm0 = round_to(layer.trained_mean_values, layer.dtype)
            rv0 = round_to(layer.trained_variance_values, layer.dtype)
            rm, rv = em.store(rm0), em.store(rv0)
            args += [em.p(rm), em.p(rv)]
        rc = em.fn("train_forward_save")(*args, em.p(sm), em.p(si), None)
        if layer.kind == "batchnorm" and layer.running_variance == "unbiased" and reference.count(layer, batch) < 2:
            assert rc == 3
            continue
        assert rc == 0
        wm, wi = reference.saved_statistics(layer, x)
        _cuda_close(sm, wm, layer, "saved mean")
        np.testing.assert_allclose(si, wi, rtol=CUDA_TOL[layer.dtype] * 10)
        if layer.kind == "batchnorm":
            wy, wrm, wrv = reference.train_forward(layer, x, rm0, rv0)
            _cuda_close(em.load(rm), wrm, layer, "running mean")
            _cuda_close(em.load(rv), wrv, layer, "running var")
        else:
            wy = reference.predict(layer, x)
        _cuda_close(em.load(y), wy, layer, "train_forward_save y")
        for name, g, w in zip(("dx", "dscale", "doffset"), em.backward(x, dy, saved=(sm, si)), want, strict=True):
            _cuda_close(g, w, layer, f"batch {batch} backward_saved {name}")
        if layer.kind == "batchnorm":
            dys = em.store(dy)
            dx = np.empty_like(dys)
            ds, do = np.empty(6, em.acc), np.empty(6, em.acc)
            assert em.fn("backward_frozen")(em.p(xs), em.p(dys), em.p(dx), em.p(ds), em.p(do), batch, None) == 0
            for name, g, w in zip(("dx", "dscale", "doffset"), (em.load(dx), ds, do),
                                  reference.backward_frozen(layer, x, dy), strict=True):  # fmt: skip
                _cuda_close(g, w, layer, f"backward_frozen {name}")


@needs_emu
@pytest.mark.parametrize("name", ["cbn_nchw32", "cbn_msscb_bf", "cbn_bc64"])
def test_cuda_population_emulated(emulated, name):
    from normgen.targets.cuda.module import round_to

    layer = next(la for la in CUDA_GRID if la.name == name)
    em = EmulatedLayer(emulated, layer)
    acc = np.zeros(1 + 2 * layer.channels)
    assert em.fn("stats_reset")(em.p(acc), None) == 0
    rng = np.random.default_rng(5)
    parts = [round_to(random_input(layer, b, rng), layer.dtype) for b in (2, 1, 4)]
    for part in parts:
        assert em.fn("accumulate")(em.p(acc), em.p(em.store(part)), reference.batch_of(layer, part), None) == 0
    mean, var = np.full(6, -7.0, em.acc), np.full(6, -7.0, em.acc)
    assert em.fn("finalize")(em.p(acc), em.p(mean), em.p(var), None) == 0
    state = reference.population_empty(layer)
    for part in parts:
        state = reference.population_accumulate(layer, state, part)
    want_mean, want_var = reference.population_finalize(layer, state)
    assert acc[0] == state[0]
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6 if em.acc == np.float32 else 1e-12, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-6 if em.acc == np.float32 else 1e-12)
    # an empty accumulator: the outputs are left untouched (CUDA does not synchronize to report it)
    assert em.fn("stats_reset")(em.p(acc), None) == 0
    untouched = np.full(6, -7.0, em.acc)
    assert em.fn("finalize")(em.p(acc), em.p(untouched), em.p(untouched), None) == 0
    assert (untouched == -7.0).all()


@needs_emu
def test_cuda_errors_and_aliasing_emulated(emulated):
    from normgen.targets.cuda.module import round_to

    layer = next(la for la in CUDA_GRID if la.name == "cgn_nhwc32")
    em = EmulatedLayer(emulated, layer)
    rng = np.random.default_rng(9)
    x = round_to(random_input(layer, 2, rng), "float32")
    dy = round_to(rng.standard_normal(x.shape), "float32")
    want = em.backward(x, dy)
    dys = em.store(dy)
    got = em.backward(x, dy, out=dys)  # dx written over dy
    np.testing.assert_array_equal(em.load(dys), want[0])
    np.testing.assert_array_equal(got[1], want[1])
    xs = em.store(x)
    out = np.empty_like(xs)
    ds = np.empty(6, np.float32)
    ws, n = em.workspace(2)
    fn, p, size = em.fn("backward"), em.p, em.ct.c_size_t
    assert fn(None, p(dys), p(out), p(ds), p(ds), 2, p(ws), size(n), None) == 1
    assert fn(p(xs), p(dys), p(out), p(ds), p(ds), 0, p(ws), size(n), None) == 2
    assert fn(p(xs), p(dys), p(out), p(ds), p(ds), 2, None, size(n), None) == 5
    assert fn(p(xs), p(dys), p(out), p(ds), p(ds), 2, p(ws), size(n - 1), None) == 5


@pytest.mark.gpu
@pytest.mark.parametrize("layer", CUDA_GRID, ids=lambda la: la.name)
def test_cuda_training_on_gpu(layer):
    """CudaLayer's training methods (pycuda, real GPU) against the reference; skips without one."""
    pytest.importorskip("pycuda")
    from normgen.targets.cuda.module import round_to

    try:
        c = build(layer, "cuda")
    except NormgenError as exc:
        pytest.skip(f"no CUDA device: {exc}")
    rng = np.random.default_rng(3)
    x = round_to(random_input(layer, 3 if layer.fmt.has_batch else 1, rng), layer.dtype)
    dy = round_to(rng.standard_normal(x.shape), layer.dtype)
    for name, g, w in zip(
        ("dx", "dscale", "doffset"), c.backward(x, dy), reference.backward(layer, x, dy), strict=True
    ):
        _cuda_close(g, w, layer, f"gpu backward {name}")
    y, sm, si = c.train_forward_save(x)
    for name, g, w in zip(
        ("dx", "dscale", "doffset"), c.backward_saved(x, dy, sm, si), reference.backward(layer, x, dy), strict=True
    ):
        _cuda_close(g, w, layer, f"gpu backward_saved {name}")
    if layer.kind == "batchnorm":
        for name, g, w in zip(("dx", "dscale", "doffset"), c.backward_frozen(x, dy),
                              reference.backward_frozen(layer, x, dy), strict=True):  # fmt: skip
            _cuda_close(g, w, layer, f"gpu backward_frozen {name}")
        c.reset_stats()
        c.accumulate(x)
        state = reference.population_accumulate(layer, reference.population_empty(layer), x)
        for g, w in zip(c.finalize(), reference.population_finalize(layer, state), strict=True):
            _cuda_close(g, w, layer, "gpu population")
    with pytest.raises(NormgenError, match="run-time parameters"):
        c.update(np.zeros(6), np.zeros(6))


# ---- examples/train -----------------------------------------------------------------------------


def test_train_example_runs_and_loss_decreases():
    """examples/train/train.py with a tiny budget: both networks train (loss goes down), and the
    batch-norm one is ahead after the same epochs (the full run is recorded in its README)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "train" / "train.py"
    spec = importlib.util.spec_from_file_location("normgen_train_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    lines = []
    plain = example.train(False, epochs=4, samples=1024, log=lines.append)
    normed = example.train(True, epochs=4, samples=1024, log=lines.append)
    assert len(plain) == len(normed) == 4 and np.isfinite(plain + normed).all()
    assert plain[-1] < plain[0] and normed[-1] < normed[0]
    assert normed[-1] < plain[-1]
    assert any("inference mode" in line for line in lines)
    assert example.main(["--epochs", "1", "--samples", "256"]) == 0


# ---- AddressSanitizer / UBSan ---------------------------------------------------------------------

SAN_LAYERS = [
    BatchNorm(name="tsan_bn", format="BSSC", shape=[5, 3, 8], **_params(1, 8), **_bn_stats(1, 8)),
    BatchNorm(
        name="tsan_bn_rt",
        format="BCSS",
        shape=[4, 10, 10],
        dtype="float64",
        param_storage="runtime",
        scale_learn_rate_factor=0.5,
        offset_l2_factor=2.0,
        **_params(2, 4),
    ),  # fmt: skip
    GroupNorm(name="tsan_gn", format="BCSS", shape=[12, 7, 9], num_groups=4, **_params(3, 12)),
    LayerNorm(name="tsan_ln", format="BTC", shape=[6, 301], operation_dimension="channel-only", **_params(4, 301)),
    InstanceNorm(name="tsan_in", format="TBC", shape=[11, 5], dtype="float64", **_params(5, 5)),
]

SAN_DRIVER = r"""
#include <stdio.h>
#include <string.h>
#include "{name}.h"
#define N ({batch} * {per})
#define NS ({name_upper}_SAVED_STATISTICS({batch}))
static {T} x[N], dy[N], dx[N], z[N], y[N], ds[{C}], dof[{C}], ds2[{C}], do2[{C}];
static double sm[NS], si[NS];
int main(void)
{{
    FILE *f = fopen("in.bin", "rb");
    if (!f || fread(x, sizeof x[0], N, f) != N || fread(dy, sizeof dy[0], N, f) != N) return 10;
    fclose(f);
    {params_decl}
    f = fopen("out.bin", "wb");
    if ({name}_backward({params_arg}x, dy, dx, ds, dof, {batch}) != 0) return 11;
    fwrite(dx, sizeof dx[0], N, f);
    fwrite(ds, sizeof ds[0], {C}, f);
    fwrite(dof, sizeof dof[0], {C}, f);
    memcpy(z, dy, sizeof z);
    if ({name}_backward({params_arg}x, z, z, ds2, do2, {batch}) != 0) return 12;  /* dx over dy */
    if (memcmp(z, dx, sizeof z) != 0 || memcmp(ds, ds2, sizeof ds) != 0) return 13;
    {train}
    if ({name}_train_forward_save({params_arg}x, y, {batch}, {running}sm, si) != 0) return 14;
    if ({name}_backward_saved({params_arg}x, dy, sm, si, z, ds2, do2, {batch}) != 0) return 15;
    fwrite(z, sizeof z[0], N, f);
    {extra}
    fclose(f);
    return 0;
}}
"""

SAN_BN = r"""
    {T} rm[{C}], rv[{C}];
    for (int c = 0; c < {C}; ++c) {{ rm[c] = 0; rv[c] = 1; }}
    {name}_stats acc;
    if ({name}_stats_reset(&acc) != 0 || {name}_accumulate(&acc, x, {batch}) != 0) return 20;
    if ({name}_accumulate(&acc, dy, {batch}) != 0 || {name}_finalize(&acc, rm, rv) != 0) return 21;
    if ({name}_backward_frozen({params_arg}x, dy, z, ds2, do2, {batch}) != 0) return 22;
"""

SAN_UPDATE = r"""
    {T} vs[{C}] = {{0}}, vo[{C}] = {{0}};
    if ({name}_update(&params, ds, dof, vs, vo, ({T})0.1, ({T})0.01, ({T})0.9) != 0) return 30;
    if ({name}_update(&params, ds, dof, vs, vo, ({T})0.1, ({T})0.01, ({T})0.9) != 0) return 31;
    fwrite(params.scale, sizeof params.scale[0], {C}, f);
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found")
@pytest.mark.parametrize("layer", SAN_LAYERS, ids=lambda la: la.name)
def test_training_functions_under_sanitizers(layer, tmp_path):
    batch = 3
    per = int(np.prod(layer.dims))
    T = "float" if layer.dtype == "float32" else "double"
    rt = layer.param_storage == "runtime"
    fmt = dict(name=layer.name, name_upper=layer.name.upper(), batch=batch, per=per, T=T, C=layer.channels,
               params_decl=f"{layer.name}_params params; {layer.name}_params_init(&params);" if rt else "",
               params_arg="&params, " if rt else "", running="rm, rv, " if layer.kind == "batchnorm" else "")  # fmt: skip
    fmt["train"] = SAN_BN.format(**fmt) if layer.kind == "batchnorm" else ""
    fmt["extra"] = SAN_UPDATE.format(**fmt) if rt else ""
    for fname, text in emit(layer).items():
        (tmp_path / fname).write_text(text)
    (tmp_path / "driver.c").write_text(SAN_DRIVER.format(**fmt))
    cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-g", "-O1",
           "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
           str(tmp_path / "driver.c"), str(tmp_path / f"{layer.name}.c"), "-o", str(tmp_path / "run"), "-lm"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[:4000]
    rng = np.random.default_rng(0)
    dt = np.float32 if T == "float" else np.float64
    x = random_input(layer, batch, rng).astype(dt)
    dy = rng.standard_normal(x.shape).astype(dt)
    (tmp_path / "in.bin").write_bytes(x.tobytes() + dy.tobytes())
    run = subprocess.run([str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})  # fmt: skip
    assert run.returncode == 0, f"rc {run.returncode}\n{run.stderr[:4000]}"
    out = np.fromfile(tmp_path / "out.bin", dtype=dt)
    n, c = x.size, layer.channels
    dx, ds, do, dx_saved = out[:n], out[n : n + c], out[n + c : n + 2 * c], out[n + 2 * c : 2 * n + 2 * c]
    want = reference.backward(layer, x, dy)
    close(dx.reshape(x.shape), want[0], layer.dtype, "sanitized dx")
    close(ds, want[1], layer.dtype, "sanitized dscale")
    close(do, want[2], layer.dtype, "sanitized doffset")
    close(dx_saved.reshape(x.shape), want[0], layer.dtype, "sanitized backward_saved dx")
    if rt:
        s, o, vs, vo = layer.scale_values, layer.offset_values, np.zeros(c), np.zeros(c)
        for _ in range(2):
            s, o, vs, vo = reference.sgdm_update(layer, s, o, ds, do, vs, vo, learn_rate=0.1, l2=0.01, momentum=0.9)
        close(out[2 * n + 2 * c :], s, layer.dtype, "sanitized update")
