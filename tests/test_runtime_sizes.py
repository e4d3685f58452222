"""Run-time sizes: a size in ``shape`` given as a name is an ``int32_t`` argument of every
generated function, right after ``batch``. The same compiled code is called with many sizes
(hypothesis draws them per call) and compared with the reference; the guards return
NAME_ERR_SIZE and write nothing; bad names are one clear error."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormgenError, RMSNorm, build, emit, reference
from normgen.harness.check import TOLERANCES, check_layer

#: One layer per kind and layout family, with run-time sizes where statistics reduce over them
#: (batch norm, group and instance norm over h, w or t), where they are kept (layer norm over
#: tokens) and both (layer norm over (H, W, C)).
LAYERS = {
    "ln_tokens": lambda d: LayerNorm(name=f"ln_tokens_{d}", format="BTC", shape=["tokens", 24], dtype=d),
    "rms_tokens": lambda d: RMSNorm(name=f"rms_tokens_{d}", format="BTC", shape=["tokens", 24], dtype=d),
    "bn_nchw": lambda d: BatchNorm(name=f"bn_nchw_{d}", format="BCSS", shape=[6, "h", "w"], dtype=d,
                                   trained_mean=np.linspace(-1, 1, 6), trained_variance=np.linspace(0.5, 2, 6)),
    "bn_nhwc": lambda d: BatchNorm(name=f"bn_nhwc_{d}", format="BSSC", shape=["h", "w", 6], dtype=d),
    "gn_nchw": lambda d: GroupNorm(name=f"gn_nchw_{d}", format="BCSS", shape=[6, "h", "w"], num_groups=3, dtype=d),
    "gn_nhwc": lambda d: GroupNorm(name=f"gn_nhwc_{d}", format="BSSC", shape=["h", "w", 6], num_groups=2, dtype=d),
    "in_nct": lambda d: InstanceNorm(name=f"in_nct_{d}", format="BCT", shape=[6, "t"], dtype=d),
    "ln_hwc": lambda d: LayerNorm(name=f"ln_hwc_{d}", format="BSSC", shape=["h", "w", 6], dtype=d,
                                  operation_dimension="spatial-channel"),
    "ln_time_major": lambda d: LayerNorm(name=f"ln_tbc_{d}", format="TBC", shape=["t", 6], dtype=d,
                                         operation_dimension="batch-excluded"),
}


@functools.cache
def compiled(key: str, dtype: str):
    layer = LAYERS[key](dtype)
    return layer, build(layer)


def _close(got, want, dtype):
    rtol, atol = TOLERANCES[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("key", sorted(LAYERS))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_same_code_at_random_sizes(key, dtype, data):
    layer, m = compiled(key, dtype)
    sizes = {n: data.draw(st.integers(1, 37), label=n) for n in layer.sizes}
    batch = data.draw(st.integers(1, 3), label="batch")
    rng = np.random.default_rng(sum(sizes.values()) * 7 + batch)
    x = (rng.standard_normal(reference.full_shape(layer, batch, sizes)) * 2 + 0.5).astype(dtype)
    _close(m.predict(x), reference.predict(layer, x), dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    if reference.count(layer, batch, sizes) > 1:
        for got, want in zip(m.backward(x, dy), reference.backward(layer, x, dy), strict=True):
            if got is not None:  # RMSNorm has no offset, so no doffset
                _close(got, want, dtype)
        y, mean, inv = m.train_forward_save(x)
        want_mean, want_inv = reference.saved_statistics(layer, x)
        _close(inv, want_inv, "float64" if dtype == "float64" else "float32")
        _close(m.backward_saved(x, dy, mean, inv)[0], reference.backward(layer, x, dy)[0], dtype)
    if layer.kind == "batchnorm" and reference.count(layer, batch, sizes) > 1:
        rm, rv = m.running_mean.astype(np.float64), m.running_var.astype(np.float64)
        y = m.train_forward(x)
        ry, rm, rv = reference.train_forward(layer, x, rm, rv)
        _close(y, ry, dtype)
        _close(m.running_mean, rm, dtype)
        _close(m.running_var, rv, dtype)


def test_check_runs_every_size(capsys):
    layer, m = compiled("ln_tokens", "float32")
    rows = check_layer(m, layer, batches=(1, 2), training=True, sizes=[{"tokens": 1}, {"tokens": 50}])
    assert rows and all(r.ok for r in rows)
    assert {r.function.split("[")[1] for r in rows} == {"tokens=1]", "tokens=50]"}


@pytest.mark.parametrize("bad", [0, -3])
def test_a_size_below_one_is_refused_and_nothing_written(bad):
    layer, m = compiled("bn_nchw", "float32")
    x = np.ones((2, 6, 3, 4), np.float32)
    y = np.full_like(x, 7.0)
    fn = m._lib.bn_nchw_float32_predict
    rc = fn(m._ptr(x), m._ptr(y), 2, bad, 4)
    assert rc == 4  # NAME_ERR_SIZE
    assert (y == 7.0).all()
    assert fn(m._ptr(x), m._ptr(y), 2, 3, 4) == 0 and not (y == 7.0).all()


def test_sizes_whose_product_overflows_are_refused():
    layer, m = compiled("gn_nchw", "float64")
    x = np.ones(6, np.float64)
    y = np.full_like(x, 7.0)
    big = 2**31 - 1
    rc = m._lib.gn_nchw_float64_predict(m._ptr(x), m._ptr(y), big, big, big)
    assert rc == 4 and (y == 7.0).all()


def test_signature_and_macros_name_the_sizes():
    layer = LAYERS["gn_nchw"]("float32")
    h = emit(layer)[f"{layer.name}.h"]
    assert f"int {layer.name}_predict(const float *x, float *y, int32_t batch, int32_t h, int32_t w);" in h
    assert "#define GN_NCHW_FLOAT32_ERR_SIZE 4" in h
    assert "#define GN_NCHW_FLOAT32_ELEMENTS_PER_BATCH(h, w) ((size_t)(h) * (size_t)(w) * 6)" in h
    assert "#define GN_NCHW_FLOAT32_SAVED_STATISTICS(batch, h, w) ((size_t)(batch) * 3)" in h


BAD = {
    "dynamic C": (dict(format="BTC", shape=["t", "c"]), ["channel dimension C", "'c'"]),
    "keyword": (dict(format="BTC", shape=["int", 8]), ["'int'", "keyword"]),
    "argument": (dict(format="BTC", shape=["batch", 8]), ["'batch'", "clashes"]),
    "local": (dict(format="BTC", shape=["n_tokens", 8]), ["'n_tokens'", "'n_'"]),
    "twice": (dict(format="BSSC", shape=["s", "s", 8]), ["'s'", "names two dimensions"]),
    "not identifier": (dict(format="BTC", shape=["2t", 8]), ["'2t'", "C identifier"]),
    "element": (dict(format="BCSS", shape=[8, "h", "w"], operation_dimension="spatial-channel", affine="element"),
                ["'element'", "'h'", "run-time size"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_size_names_are_one_clear_error(case):
    kw, needles = BAD[case]
    with pytest.raises(NormgenError) as err:
        LayerNorm(name="l", **kw)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_the_cuda_launchers_take_the_sizes_after_batch():
    layer = LAYERS["bn_nchw"]("float32")
    files = emit(layer, "cuda")
    header = files[f"{layer.name}.cuh"]
    assert f"int {layer.name}_predict(const float *x, float *y, int32_t batch, int32_t h, int32_t w, cudaStream_t stream);" in header
    assert "#define BN_NCHW_FLOAT32_ERR_SIZE 6" in header


def test_an_input_that_fits_no_size_names_both_shapes():
    layer, m = compiled("ln_tokens", "float32")
    with pytest.raises(NormgenError, match=r"\(2, 5, 23\).*'tokens', 24"):
        m.predict(np.zeros((2, 5, 23), np.float32))
