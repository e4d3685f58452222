"""Tier 3: generated C compiled with cffi, run, and compared with normgen.reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import grid, params, random_formats
from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormgenError, build, reference
from normgen.harness.check import check_layer, compare
from normgen.lowering import lower
from normgen.targets.c.sweep import sweep_of

GRID = list(grid())


@pytest.mark.parametrize("layer", GRID, ids=lambda l: l.name)
def test_grid_matches_reference(layer):
    compiled = build(layer)
    results = check_layer(compiled, layer, batches=(1, 2, 3), seed=7)
    bad = [r for r in results if not r.ok]
    assert results and not bad, bad


@st.composite
def layers(draw):
    """A random valid format (one C, at most one B and T, some S/U), sizes, kind and dtype."""
    fmt, groups, channels, shape = draw(random_formats(groups=4, size=6))
    kw = dict(name="h", format=fmt, shape=shape, dtype=draw(st.sampled_from(["float32", "float64"])),
              epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.5])), **params(channels, 3))
    kind = draw(st.sampled_from(["bn", "gn", "ln", "in"]))
    if kind == "bn":
        return BatchNorm(**kw, running_variance=draw(st.sampled_from(["biased", "unbiased"])))
    if kind == "gn":
        return GroupNorm(**kw, num_groups=groups)
    if kind == "ln":
        return LayerNorm(**kw, operation_dimension=draw(
            st.sampled_from(["auto", "channel-only", "spatial-channel", "batch-excluded"])))
    return InstanceNorm(**kw)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=layers(), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(layer, batch, seed):
    compiled = build(layer)
    results = check_layer(compiled, layer, batches=(batch,), seed=seed)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


@pytest.mark.parametrize("layer", [
    LayerNorm(name="ln_big", format="BTC", shape=[8, 3000]),
    GroupNorm(name="gn_big", format="BCSS", shape=[8, 40, 40], num_groups=2),
    GroupNorm(name="gn_big_nhwc", format="BSSC", shape=[20, 20, 8], num_groups=4),
    InstanceNorm(name="in_big", format="BCSS", shape=[4, 64, 64]),
    BatchNorm(name="bn_big", format="BSSC", shape=[16, 16, 8]),
], ids=lambda l: l.name)
@pytest.mark.parametrize("statistics", ["double", "float"])
def test_large_mean_float32(layer, statistics):
    """x = 1e4 + N(0, 1e-2) in float32: the statistics (shifted sums or a corrected two-pass per chunk, Chan's
    merge of the means relative to the block's first shift) and x - mean (kept as hi + lo) stay accurate
    (about 3e-7 here), in double and in float (statistics = "float"); E[x²] - E[x]² would lose every digit."""
    layer = layer.replace(statistics=statistics)
    rng = np.random.default_rng(1)
    x = (1e4 + rng.normal(0, 1e-2, reference.full_shape(layer, 3))).astype(np.float32)
    compiled = build(layer)
    if layer.kind == "batchnorm":
        got, (want, rm, rv) = compiled.train_forward(x), reference.train_forward(layer, x)
        np.testing.assert_allclose(compiled.running_mean, rm, rtol=1e-6)
        np.testing.assert_allclose(compiled.running_var, rv, rtol=1e-3, atol=1e-7)
    else:
        got, want = compiled.predict(x), reference.predict(layer, x)
    assert np.abs(want).max() > 0.5  # normalized data, unit scale
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("layer", [
    BatchNorm(name="bn_inplace", format="BSSC", shape=[3, 4, 6], **params(6, 1)),
    GroupNorm(name="gn_inplace", format="BCSS", shape=[6, 4, 3], num_groups=2, **params(6, 1)),
    LayerNorm(name="ln_inplace", format="TBC", shape=[5, 6], **params(6, 1)),
], ids=lambda l: l.name)
def test_in_place(layer):
    compiled = build(layer)
    x = np.random.default_rng(2).normal(size=reference.full_shape(layer, 4)).astype(np.float32)
    want = compiled.predict(x)
    buf = x.copy()
    compiled.predict(buf, out=buf)
    np.testing.assert_array_equal(buf, want)


@pytest.mark.parametrize("fn", ["predict", "train_forward"])
def test_error_codes_leave_outputs_untouched(fn):
    layer = BatchNorm(name="bn_err", format="BCSS", shape=[3, 2, 2])
    compiled = build(layer)
    ffi, lib = compiled.ffi, compiled._lib
    f = getattr(lib, f"bn_err_{fn}")
    x = np.ones(3 * 4 * 2, dtype=np.float32)
    y = np.full_like(x, 7.0)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    extra = [compiled._ptr(rm), compiled._ptr(rv)] if fn == "train_forward" else []
    px, py = compiled._ptr(x), compiled._ptr(y)
    assert f(ffi.NULL, py, 2, *extra) == 1
    assert f(px, ffi.NULL, 2, *extra) == 1
    assert f(px, py, 0, *extra) == 2
    assert f(px, py, -3, *extra) == 2
    if fn == "train_forward":
        assert f(px, py, 2, ffi.NULL, extra[1]) == 1
        assert f(px, py, 2, extra[0], ffi.NULL) == 1
        np.testing.assert_array_equal(rm, 0)
    assert (y == 7.0).all()
    assert f(px, py, 2, *extra) == 0 and not (y == 7.0).all()


def test_unbiased_running_variance_needs_two_values():
    layer = BatchNorm(name="bn_one", format="BC", shape=[4])
    compiled = build(layer)
    x = np.ones((1, 4), np.float32)
    with pytest.raises(NormgenError, match="returned 3"):
        compiled.train_forward(x)
    with pytest.raises(NormgenError, match="more than 1 value"):
        reference.train_forward(layer, x)
    # the biased convention is defined for one value, as ONNX/Keras do
    biased = BatchNorm(name="bn_one_b", format="BC", shape=[4], running_variance="biased")
    y = build(biased).train_forward(x)
    assert compare("b", "t", "float32", 1, y, reference.train_forward(biased, x)[0]).ok


def test_runtime_params_round_trip():
    layer = GroupNorm(name="gn_rt", format="BSSC", shape=[3, 3, 8], num_groups=4, param_storage="runtime",
                      **params(8, 5))
    compiled = build(layer)
    np.testing.assert_allclose(compiled.get_params()["scale"], layer.scale_values.astype(np.float32))
    new = params(8, 9)
    compiled.set_params(**new)
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 8)).astype(np.float32)
    want = reference.predict(layer.replace(param_storage="embedded", **new), x)
    assert compare("g", "predict", "float32", 2, compiled.predict(x), want).ok
    with pytest.raises(NormgenError, match="needs 8 values"):
        compiled.set_params(scale=np.ones(3))


def test_mismatched_input_shape_is_an_error():
    compiled = build(InstanceNorm(name="in_shape", format="BCSS", shape=[3, 4, 4]))
    with pytest.raises(NormgenError, match=r"input of shape \(2, 4, 4, 4\)"):
        compiled.predict(np.zeros((2, 4, 4, 4), np.float32))


#: Rows layouts (the pipelined core, normgen/targets/c/sweep.py), each with where a statistic block's
#: first elements are: the first chunk's shift K is their mean.
ONE_SWEEP = [
    (GroupNorm(name="os_gn", format="BCSS", shape=[8, 64, 64], num_groups=2),  # two chunks a block
     lambda x: x[:, ::4, 0, :8]),
    (LayerNorm(name="os_ln", format="BTC", shape=[5, 2041]), lambda x: x[:, :, :8]),
    (LayerNorm(name="os_ln_long", format="BTC", shape=[2, 20000]), lambda x: x[:, :, :8]),  # chunks along the run
    (InstanceNorm(name="os_in", format="BCSS", shape=[3, 100, 100]), lambda x: x[:, :, 0, :8]),
    (BatchNorm(name="os_bn", format="BCSS", shape=[4, 30, 30]), lambda x: x[0, :, 0, :8]),  # train_forward
]


def _one_sweep_cases(layer, first, batch, dtype):
    """Inputs for the one-sweep statistics: plain data, a large mean, and a large mean whose
    blocks start with eight outliers (K lands 1e4 from the chunk's mean: the sums of (x - K)^2
    in float would lose the variance, so the chunk must be redone as a two-pass)."""
    rng = np.random.default_rng(11)
    shape = reference.full_shape(layer, batch)
    plain = rng.normal(0.5, 2.0, shape)
    large = 1e4 + rng.normal(0, 1e-2, shape)
    outliers = large.copy()
    first(outliers)[...] = 0.0
    return {"plain": plain.astype(dtype), "large_mean": large.astype(dtype), "outliers": outliers.astype(dtype)}


def _run(compiled, layer, x):
    if layer.kind == "batchnorm":
        return compiled.train_forward(x), compiled.running_mean.copy(), compiled.running_var.copy()
    return (compiled.predict(x),)


def _assert_matches_reference(compiled, layer, case, x):
    """predict (train_forward and the running statistics for batch norm) against the reference.
    float32 keeps the mean as hi + lo, so x - mean is exact; in float64 each rounding of the mean
    (half an ulp of |mean|, a few of them with the chunks' Chan merges) shows in (x - mean) / std
    as eps * |mean| / std, here and in the reference."""
    eps = np.finfo(np.float64).eps
    tol = 2e-5 if x.dtype == np.float32 else 1e-12 + 16 * eps * np.abs(x).max() / x.std()
    if layer.kind == "batchnorm":
        compiled.running_mean[:] = layer.trained_mean_values
        compiled.running_var[:] = layer.trained_variance_values
        want = reference.train_forward(layer, x)
    else:
        want = (reference.predict(layer, x),)
    for g, w in zip(_run(compiled, layer, x), want, strict=True):
        err = np.abs(g - w) / (1 + np.abs(w))
        assert err.max() <= tol, (case, float(err.max()))


#: The element types and statistics types of the numerics cases (float32 with float statistics too).
PRECISIONS = {"float32": ("float32", "double"), "float64": ("float64", "double"), "float32_fs": ("float32", "float")}


@pytest.mark.parametrize("layer,first", ONE_SWEEP, ids=lambda v: getattr(v, "name", ""))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_sweep_statistics_and_their_fallback(layer, first, precision):
    """The rows core's statistics (one sweep about a shift K, redone as a corrected two-pass
    from cache where K is more than a standard deviation off) match the reference on data
    that takes either path."""
    dtype, statistics = PRECISIONS[precision]
    layer = layer.replace(dtype=dtype, statistics=statistics)
    assert sweep_of(lower(layer)).pipelined
    compiled = build(layer)
    for case, x in _one_sweep_cases(layer, first, 2, np.dtype(dtype)).items():
        _assert_matches_reference(compiled, layer, case, x)


@pytest.mark.parametrize("layer,first", ONE_SWEEP, ids=lambda v: getattr(v, "name", ""))
def test_pipelined_core_gives_the_bits_of_the_plain_one(layer, first):
    """Fusing block sb + 1's statistics into block sb's normalize pass changes no bit: the
    pipelined core (parallel = "none") and the block-at-a-time core (parallel = "openmp", here
    on whatever threads OpenMP takes) agree exactly, in place too."""
    piped, plain = build(layer), build(layer.replace(parallel="openmp"))
    assert sweep_of(lower(layer)).pipelined and not sweep_of(lower(layer.replace(parallel="openmp"))).pipelined
    for case, x in _one_sweep_cases(layer, first, 3, np.dtype(np.float32)).items():
        for c in (piped, plain):
            if layer.kind == "batchnorm":
                c.running_mean[:] = layer.trained_mean_values
                c.running_var[:] = layer.trained_variance_values
        a, b = _run(piped, layer, x), _run(plain, layer, x)
        for u, v in zip(a, b, strict=True):
            assert np.array_equal(u, v), case
        if layer.kind != "batchnorm":
            inplace = x.copy()
            piped.predict(inplace, out=inplace)
            assert np.array_equal(inplace, a[0]), case


@pytest.mark.parametrize("layer", [
    GroupNorm(name="cs_gn", format="BSSC", shape=[20, 20, 40], num_groups=4),  # a tile of 32 columns and one of 8
    BatchNorm(name="cs_bn", format="BSSC", shape=[10, 30, 24]),  # train_forward, rows across the batch
    LayerNorm(name="cs_ln", format="BCSS", shape=[600, 3, 5], operation_dimension="channel-only"),  # columns over C
], ids=lambda l: l.name)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_columns_one_sweep_statistics(layer, precision):
    """Channels-last statistics: the first chunk a two-pass, later chunks one sweep about each
    column's mean so far in register tiles (redone as a two-pass where that mean is more than a
    standard deviation off: the step case), against the reference."""
    dtype, statistics = PRECISIONS[precision]
    layer = layer.replace(dtype=dtype, statistics=statistics)
    plan = lower(layer)
    rows = plan.chunk_axis.extent.value(3)  # rows of a block; a row is sweep_of(plan).lanes contiguous columns
    assert plan.strategy == "columns" and rows > plan.chunk_iters  # several chunks
    compiled = build(layer)
    rng = np.random.default_rng(5)
    shape = reference.full_shape(layer, 3)
    row = np.arange(np.prod(shape)) // sweep_of(plan).lanes % rows
    step = np.where(row < plan.chunk_iters, 0.0, 50.0).reshape(shape)  # the second chunk on: K is 50 off
    cases = {"plain": rng.normal(0.5, 2.0, shape), "large_mean": 1e4 + rng.normal(0, 1e-2, shape),
             "step": step + rng.normal(0, 1.0, shape)}
    for case, x in cases.items():
        x = x.astype(dtype)
        _assert_matches_reference(compiled, layer, case, x)
