"""int8 layers (TFLite's asymmetric scheme) on the C target: description, reference, generated C."""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normgen.reference as reference
from helpers import grid, random_formats
from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormgenError, RMSNorm, build, emit, load_spec
from normgen.cli import main
from normgen.harness.check import check_layer, int8_inputs
from normgen.importers.writer import spec_files
from normgen.lowering.int8 import MAX_COUNT, lower_int8

FORMATS = {"BCSS": [6, 5, 4], "BSSC": [5, 4, 6], "BTC": [9, 6]}
QUANT = [
    dict(input_scale=0.05, input_zero_point=3, output_scale=0.02, output_zero_point=-5),
    dict(input_scale=0.5, input_zero_point=-20, output_scale=0.04, output_zero_point=17),
    dict(input_scale=0.013, output_scale=0.011),
]


def make(kind: str, fmt: str, quant: dict, seed: int = 0, **extra):
    rng = np.random.default_rng(seed)
    c = 6
    kw = dict(name=f"{kind[:3]}_{fmt.lower()}", format=fmt, shape=FORMATS[fmt], dtype="int8", **quant,
              scale=rng.normal(1.0, 0.4, c), **extra)
    if kind != "rmsnorm":
        kw["offset"] = rng.normal(0.0, 0.6, c)
    if kind == "batchnorm":
        return BatchNorm(**kw, trained_mean=rng.normal(0.0, 1.0, c), trained_variance=rng.uniform(0.3, 3.0, c))
    if kind == "groupnorm":
        return GroupNorm(**kw, num_groups=3)
    return {"layernorm": LayerNorm, "instancenorm": InstanceNorm, "rmsnorm": RMSNorm}[kind](**kw)


KINDS = ["batchnorm", "groupnorm", "layernorm", "instancenorm", "rmsnorm"]
GRID = [make(k, f, QUANT[(i + j) % len(QUANT)], seed=i * 7 + j)
        for i, k in enumerate(KINDS) for j, f in enumerate(FORMATS)]
VARIANTS = [
    GroupNorm(name="gn_cw", format="BCSS", shape=[4, 3, 5], num_groups="channelwise", dtype="int8",
              input_scale=0.1, output_scale=0.03, output_zero_point=-1, offset=[0.1, -0.2, 0.3, 0.4]),
    LayerNorm(name="ln_sc", format="BCSS", shape=[4, 3, 5], operation_dimension="spatial-channel", dtype="int8",
              input_scale=0.2, input_zero_point=-9, output_scale=0.05, scale=np.linspace(0.5, 2, 4)),
    LayerNorm(name="ln_el", format="BTC", shape=[5, 8], affine="element", dtype="int8", input_scale=0.02,
              output_scale=0.03, output_zero_point=9, scale=np.linspace(-1, 2, 8), offset=np.linspace(-1, 1, 8)),
    RMSNorm(name="rms_b", format="TBC", shape=[4, 10], bias=True, dtype="int8", input_scale=0.07, input_zero_point=11,
            output_scale=0.02, offset=np.linspace(-0.5, 0.5, 10)),
    InstanceNorm(name="in_rt", format="BCT", shape=[3, "steps"], dtype="int8", input_scale=0.1, output_scale=0.05),
    BatchNorm(name="bn_css", format="CSS", shape=[3, 4, 4], dtype="int8", input_scale=0.1, input_zero_point=-3,
              output_scale=0.07, trained_mean=[0.5, -1.0, 2.0], trained_variance=[0.5, 2.0, 4.0]),
]


#: The same layers with arithmetic = "integer" (no float at run time).
INTEGER = [layer.replace(name=f"{layer.name}_i", arithmetic="integer") for layer in GRID + VARIANTS]


def _steps(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.abs(got.astype(np.int64) - want.astype(np.int64))


@pytest.mark.parametrize("layer", GRID + VARIANTS + INTEGER, ids=lambda layer: layer.name)
def test_matches_the_reference_within_one_step(layer):
    """Every kind and format, full-range, narrow and all-equal inputs: exact or one step off."""
    compiled = build(layer)
    sizes = [{"steps": 1}, {"steps": 33}] if layer.sizes else None
    results = check_layer(compiled, layer, batches=(1, 3), seed=3, sizes=sizes)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]
    total = sum(r.count for r in results)
    off = sum(r.one_step for r in results)
    assert total > 0 and off <= max(2, total // 500), f"{off} of {total} outputs one step off"


def test_the_c_output_is_not_trivially_the_reference():
    """The comparison can fail: a layer whose output scale differs is told apart."""
    layer = GRID[3]
    other = layer.replace(output_scale=layer.output_scale * 1.5)
    x = int8_inputs(layer, 2, np.random.default_rng(0))[""]
    assert _steps(build(other).predict(x), reference.predict(layer, x)).max() > 1


@pytest.mark.parametrize("arithmetic", ["float", "integer"])
@pytest.mark.parametrize("kind", KINDS)
def test_saturation(kind, arithmetic):
    """A huge scale drives outputs to both ends of the int8 range; they saturate as the reference does."""
    layer = make(kind, "BTC", QUANT[0], arithmetic=arithmetic)
    layer = layer.replace(scale=np.array([60.0, -60.0, 45.0, -30.0, 80.0, -90.0]))
    x = np.random.default_rng(1).integers(-128, 128, (4, 9, 6)).astype(np.int8)
    got, want = build(layer).predict(x), reference.predict(layer, x)
    assert (want == 127).sum() > 10 and (want == -128).sum() > 10
    assert _steps(got, want).max() <= 1
    assert np.array_equal(got == 127, want == 127) and np.array_equal(got == -128, want == -128)


@pytest.mark.parametrize("arithmetic", ["float", "integer"])
@pytest.mark.parametrize("kind", KINDS)
def test_ties_round_to_even_before_the_zero_point(kind, arithmetic):
    """scale 0: y = offset exactly. Offsets on half steps round to the even neighbour, and only
    then is the (odd) output zero point added (adding it first would round the other way)."""
    halves = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    layer = make(kind, "BSSC", dict(input_scale=0.1, output_scale=0.25, output_zero_point=7), arithmetic=arithmetic)
    layer = layer.replace(scale="zeros", offset=halves * 0.25, **({"bias": True} if kind == "rmsnorm" else {}))
    x = np.random.default_rng(2).integers(-128, 128, (2, 5, 4, 6)).astype(np.int8)
    lower = np.floor(halves)
    even = np.where(lower % 2 == 0, lower, lower + 1) + 7
    got = build(layer).predict(x)
    assert np.array_equal(got, np.broadcast_to(even, got.shape).astype(np.int8))
    assert np.array_equal(reference.predict(layer, x), got)


@pytest.mark.parametrize("arithmetic", ["float", "integer"])
@pytest.mark.parametrize("kind", ["groupnorm", "layernorm", "instancenorm"])
def test_equal_values_give_the_offset(kind, arithmetic):
    """Every value of a statistic equal: variance 0, y = quantize(offset) per channel."""
    layer = make(kind, "BCSS", QUANT[1], arithmetic=arithmetic)
    x = np.full((2, 6, 5, 4), -77, dtype=np.int8)
    want = layer.quantize(layer.offset_values).reshape(1, 6, 1, 1)
    assert np.array_equal(build(layer).predict(x), np.broadcast_to(want, x.shape))


def test_statistics_are_the_dequantized_values():
    layer = GRID[8]  # layernorm over C of BTC
    x = np.random.default_rng(6).integers(-128, 128, reference.full_shape(layer, 2)).astype(np.int8)
    real = layer.input_scale * (x.astype(np.float64) - layer.input_zero_point)
    mean, var = reference.statistics(layer, x)
    assert np.allclose(mean, real.mean(axis=-1, keepdims=True), rtol=1e-12, atol=1e-12)
    assert np.allclose(var, real.var(axis=-1, keepdims=True), rtol=1e-12, atol=1e-12)


def test_in_place():
    layer = GRID[4]
    x = np.random.default_rng(5).integers(-128, 128, reference.full_shape(layer, 3)).astype(np.int8)
    want = reference.predict(layer, x)
    compiled = build(layer)
    y = x.copy()
    compiled.predict(y, out=y)
    assert _steps(y, want).max() <= 1


def test_statistic_count_limit():
    """n·Σq² − (Σq)² must fit int64: a statistic over more than 2^24 elements is refused, when
    the code is generated for a fixed size and by the function for a run-time one."""
    with pytest.raises(NormgenError, match=r"at most 16777216 elements.*16777217"):
        emit(InstanceNorm(name="big", format="BCT", shape=[1, MAX_COUNT + 1], dtype="int8", input_scale=1.0,
                          output_scale=1.0))
    layer = VARIANTS[4]
    compiled = build(layer)
    with pytest.raises(NormgenError, match="returned 4"):
        compiled.predict(np.zeros((1, 3, MAX_COUNT + 1), dtype=np.int8))
    emit(BatchNorm(name="bigbn", format="BCT", shape=[1, MAX_COUNT + 1], dtype="int8", input_scale=1.0,
                   output_scale=1.0))  # batch norm's predict takes no statistics


def test_integer_statistic_count_and_constant_limits():
    """arithmetic = "integer": statistics of at most 2^16 elements (a fixed count when generated,
    a run-time one by the function), folded constants below 2^24."""
    q = dict(dtype="int8", input_scale=1.0, output_scale=1.0, arithmetic="integer")
    with pytest.raises(NormgenError, match=r"at most 65536 elements \(2\^16 with arithmetic = 'integer'.*65537"):
        emit(InstanceNorm(name="big", format="BCT", shape=[1, (1 << 16) + 1], **q))
    emit(InstanceNorm(name="big", format="BCT", shape=[1, 1 << 16], **q))
    compiled = build(VARIANTS[4].replace(arithmetic="integer"))
    with pytest.raises(NormgenError, match="returned 4"):
        compiled.predict(np.zeros((1, 3, (1 << 16) + 1), dtype=np.int8))
    with pytest.raises(NormgenError, match=r"below 2\^24.*scale / output_scale is 2e\+24 at index 1"):
        emit(LayerNorm(name="g", format="BTC", shape=[2, 3], scale=[1.0, 2e24, 1.0], **q))
    with pytest.raises(NormgenError, match=r"below 2\^24.*folded offset"):
        emit(BatchNorm(name="b", format="BTC", shape=[2, 3], trained_mean=[0.0, -1e30, 0.0], **q))


@pytest.mark.parametrize("layer", [INTEGER[0], INTEGER[4], INTEGER[14], INTEGER[-2]], ids=lambda layer: layer.name)
def test_integer_arithmetic_has_no_float(layer):
    """No float type, literal or libm call in the generated code (its comments aside)."""
    code = re.sub(r"/\*.*?\*/", "", emit(layer)[f"{layer.name}.c"], flags=re.S)  # the code, not its comments
    assert "int8_t" in code and "_rsqrt(" in code or "_a[c]" in code
    for pattern in (r"\bfloat\b", r"\bdouble\b", r"\bsqrtf?\(", "<math.h>", r"\d\.\d*f?\b", r"\d[eE][-+]?\d"):
        assert not re.search(pattern, code), pattern


def test_float_input_is_refused():
    layer = GRID[0]
    with pytest.raises(NormgenError, match="int8 values, got float64"):
        reference.predict(layer, np.zeros(reference.full_shape(layer, 1)))
    with pytest.raises(NormgenError, match="values from 300 to 300"):
        build(layer).predict(np.full(reference.full_shape(layer, 1), 300, dtype=np.int16))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_strict_warnings_and_byte_identical(tmp_path):
    """C99, no warning under -Wdouble-promotion -Wshadow -Wconversion as well; the same layer
    gives the same bytes."""
    for layer in (GRID[0], GRID[4], GRID[14], VARIANTS[4], INTEGER[0], INTEGER[4], INTEGER[14], INTEGER[-2]):
        files = emit(layer)
        assert files == emit(layer)
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-Wdouble-promotion", "-Wshadow",
               "-Wconversion", "-O2", "-c", str(tmp_path / f"{layer.name}.c"), "-o", str(tmp_path / "o.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "double" not in files[f"{layer.name}.c"].split("*/", 1)[1]


# ---- the description ---------------------------------------------------------------------------
BAD = {
    "scale_zero": (dict(input_scale=0.0, output_scale=1.0), ["input_scale", "> 0", "0.0"]),
    "scale_neg": (dict(input_scale=1.0, output_scale=-0.5), ["output_scale", "-0.5"]),
    "scale_inf": (dict(input_scale=float("inf"), output_scale=1.0), ["input_scale", "finite", "inf"]),
    "scale_nan": (dict(input_scale=1.0, output_scale=float("nan")), ["output_scale", "finite", "nan"]),
    "scale_text": (dict(input_scale="big", output_scale=1.0), ["input_scale", "'big'"]),
    "scale_missing": (dict(output_scale=1.0), ["needs input_scale"]),
    "zp_high": (dict(input_scale=1.0, output_scale=1.0, input_zero_point=128), ["input_zero_point", "[-128, 127]",
                                                                                 "128"]),
    "zp_low": (dict(input_scale=1.0, output_scale=1.0, output_zero_point=-129), ["output_zero_point", "-129"]),
    "zp_fraction": (dict(input_scale=1.0, output_scale=1.0, output_zero_point=1.5), ["output_zero_point", "1.5"]),
    "zp_bool": (dict(input_scale=1.0, output_scale=1.0, input_zero_point=True), ["input_zero_point", "True"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_quantization_is_one_clear_error(case):
    kw, needles = BAD[case]
    with pytest.raises(NormgenError) as err:
        LayerNorm(name="q", format="BTC", shape=[3, 4], dtype="int8", **kw)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_quantization_only_with_int8():
    with pytest.raises(NormgenError, match="input_scale = 0.5 is for dtype 'int8'.*'float32'"):
        LayerNorm(name="q", format="BTC", shape=[3, 4], input_scale=0.5)


@pytest.mark.parametrize("extra, needle", [
    (dict(functions=["predict", "train_forward"]), "no train_forward function (int8 is an inference format)"),
    (dict(param_storage="runtime"), "param_storage must be 'embedded'"),
    (dict(parallel="openmp"), "parallel must be 'none'"),
    (dict(activation="relu"), "no fused forms"),
    (dict(statistics="float"), "an int8 layer's statistics are exact integer sums"),
])
def test_what_int8_lacks(extra, needle):
    with pytest.raises(NormgenError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        make("batchnorm", "BTC", QUANT[0], **extra)


def test_int8_has_predict_only_and_c_only():
    layer = GRID[0]
    assert layer.roles == ("predict",)
    for target in ("cuda", "mex"):
        with pytest.raises(NormgenError, match=f"c target only, not {target}"):
            emit(layer, target)
    with pytest.raises(NormgenError, match="c target only, not cuda"):
        build(layer, "cuda")
    with pytest.raises(NormgenError, match="predict only, not train_forward"):
        reference.train_forward(layer, np.zeros(reference.full_shape(layer, 2), dtype=np.int8))


def test_spec_round_trip(tmp_path):
    """A spec and .npz files written for int8 layers read back as the same layers."""
    layers = [make(k, "BSSC", QUANT[i % 3], seed=i) for i, k in enumerate(KINDS)]
    layers[2] = layers[2].replace(operation_dimension="spatial-channel")  # the spec spells it out
    for name, data in spec_files(layers, "q", "test").items():
        (tmp_path / name).write_bytes(data)
    back = load_spec(tmp_path / "q.toml")
    for a, b in zip(layers, back, strict=True):
        assert b.dtype == "int8"
        assert (b.input_scale, b.input_zero_point, b.output_scale, b.output_zero_point) == \
            (a.input_scale, a.input_zero_point, a.output_scale, a.output_zero_point)
        assert dict(b.describe()) == dict(a.describe())
        assert emit(a) == emit(b)


CLI_GOOD = ('[[layer]]\nname = "q8"\nkind = "layernorm"\nformat = "BTC"\nshape = [5, 16]\ndtype = "int8"\n'
            'input_scale = 0.05\ninput_zero_point = -4\noutput_scale = 0.03\noutput_zero_point = 6\n')


@pytest.mark.parametrize("key, value, needle", [
    ("input_scale", "0.0", "input_scale must be > 0, got 0.0"),
    ("output_zero_point", "300", "output_zero_point must be an integer in [-128, 127] (an int8 value), got 300"),
    ("output_scale", '"x"', "output_scale must be a number, got 'x'"),
])
@pytest.mark.parametrize("command", ["emit", "show", "check"])
def test_cli_bad_quantization_exits_2(tmp_path, capsys, key, value, needle, command):
    text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} =") else line for line in CLI_GOOD.split("\n"))
    spec = tmp_path / "q.toml"
    spec.write_text(text)
    out = tmp_path / "out"
    rc = main([command, str(spec), "-o", str(out)] if command == "emit" else [command, str(spec)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.startswith("normgen: error: ") and err.count("\n") == 1 and needle in err, err


def test_cli_check_and_show(tmp_path, capsys):
    spec = tmp_path / "q.toml"
    spec.write_text(CLI_GOOD)
    assert main(["check", str(spec), "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "predict:equal" in out and "int8" in out and "one step off" in out and "0 failed" in out
    assert main(["show", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "x: real = 0.05 * (q + 4), y: real = 0.03 * (q - 6)" in out and "exact in integers" in out
    assert main(["emit", str(spec), "--target", "cuda", "-o", str(tmp_path / "o")]) == 2
    assert "c target only" in capsys.readouterr().err
    assert main(["emit", str(spec), "--functions", "predict,backward", "-o", str(tmp_path / "o")]) == 2
    assert "an int8 layer has no backward function" in capsys.readouterr().err
    assert main(["bench", str(spec), "--no-torch"]) == 2
    assert "not int8" in capsys.readouterr().err


# ---- outside oracles ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantization_matches_torch():
    """quantize and dequantize are torch's per-tensor affine qint8 ones (ties to even, saturation).
    Scales are powers of two, so that torch's float32 arithmetic is exact too. (torch adds the zero
    point before it rounds, ONNX and normgen after: the same for an even output zero point.)"""
    torch = pytest.importorskip("torch")
    layer = LayerNorm(name="q", format="BTC", shape=[3, 4], dtype="int8", input_scale=0.125, input_zero_point=-7,
                      output_scale=0.25, output_zero_point=6)
    rng = np.random.default_rng(0)
    q = np.arange(-128, 128).astype(np.int8)
    real = layer.dequantize(q)
    tq = torch.quantize_per_tensor(torch.from_numpy(real.astype(np.float32)), layer.input_scale,
                                   layer.input_zero_point, torch.qint8)
    assert np.array_equal(tq.int_repr().numpy(), q)
    assert np.array_equal(tq.dequantize().numpy().astype(np.float64), real)
    ties = (np.arange(-300, 300) + 0.5) * layer.output_scale  # every value a tie
    real = np.concatenate([rng.normal(0, 40, 4000), ties]).astype(np.float32)
    theirs = torch.quantize_per_tensor(torch.from_numpy(real), layer.output_scale, layer.output_zero_point,
                                       torch.qint8).int_repr().numpy()
    assert np.array_equal(layer.quantize(real), theirs)


@pytest.mark.parametrize("zero_point", [-7, 0, 6])
def test_quantization_matches_onnx_reference(zero_point):
    """quantize is ONNX QuantizeLinear (onnx's reference evaluator): round to nearest even, then
    the zero point, then saturation; dequantize is DequantizeLinear."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    layer = LayerNorm(name="q", format="BTC", shape=[3, 4], dtype="int8", input_scale=0.37, input_zero_point=zero_point,
                      output_scale=0.25, output_zero_point=zero_point)
    rng = np.random.default_rng(1)
    real = np.concatenate([rng.normal(0, 40, 4000), (np.arange(-300, 300) + 0.5) * 0.25]).astype(np.float32)
    q = np.arange(-128, 128).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["r", "so", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["x", "si", "z"], ["d"])]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("r", TensorProto.FLOAT, real.shape),
                                           helper.make_tensor_value_info("x", TensorProto.INT8, q.shape)],
                              [helper.make_tensor_value_info("q", TensorProto.INT8, real.shape),
                               helper.make_tensor_value_info("d", TensorProto.FLOAT, q.shape)],
                              [helper.make_tensor("so", TensorProto.FLOAT, [], [0.25]),
                               helper.make_tensor("si", TensorProto.FLOAT, [], [0.37]),
                               helper.make_tensor("z", TensorProto.INT8, [], [zero_point])])
    theirs_q, theirs_d = ReferenceEvaluator(helper.make_model(graph)).run(None, {"r": real, "x": q})
    assert np.array_equal(layer.quantize(real), theirs_q)
    assert np.allclose(layer.dequantize(q), theirs_d, rtol=1e-7, atol=0)


ORT_OPS = {
    "layernorm": "LayerNormalization",
    "instancenorm": "InstanceNormalization",
    "batchnorm": "BatchNormalization",
}


@pytest.mark.parametrize("kind", sorted(ORT_OPS))
def test_reference_matches_onnxruntime_qdq(kind):
    """DequantizeLinear → the normalization → QuantizeLinear in ONNX Runtime (float32) against the
    reference on the same int8 input: exact or one step off (float32 against float64)."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    layer = make(kind, "BCSS", QUANT[0]) if kind != "layernorm" else make(kind, "BTC", QUANT[0])
    x = np.random.default_rng(4).integers(-128, 128, reference.full_shape(layer, 3)).astype(np.int8)
    f32 = np.float32
    inits = [numpy_helper.from_array(np.array(layer.input_scale, f32), "si"),
             numpy_helper.from_array(np.array(layer.input_zero_point, np.int8), "zi"),
             numpy_helper.from_array(np.array(layer.output_scale, f32), "so"),
             numpy_helper.from_array(np.array(layer.output_zero_point, np.int8), "zo"),
             numpy_helper.from_array(layer.scale_values.astype(f32), "g"),
             numpy_helper.from_array(layer.offset_values.astype(f32), "b")]
    op = ORT_OPS[kind]
    inputs = ["xf", "g", "b"]
    attrs = {"epsilon": layer.epsilon}
    if kind == "batchnorm":
        inits += [numpy_helper.from_array(layer.trained_mean_values.astype(f32), "m"),
                  numpy_helper.from_array(layer.trained_variance_values.astype(f32), "v")]
        inputs += ["m", "v"]
    if kind == "layernorm":
        attrs["axis"] = -1
    nodes = [helper.make_node("DequantizeLinear", ["x", "si", "zi"], ["xf"]),
             helper.make_node(op, inputs, ["yf"], **attrs),
             helper.make_node("QuantizeLinear", ["yf", "so", "zo"], ["y"])]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.INT8, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, x.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {"x": x})[0]
    ours = reference.predict(layer, x)
    steps = _steps(ours, theirs)
    assert steps.max() <= 1 and (steps == 1).sum() <= max(2, steps.size // 100), (steps.max(), (steps == 1).sum())


@st.composite
def int8_layers(draw):
    """A random format, sizes, kind, quantization and arithmetic."""
    fmt, groups, channels, shape = draw(random_formats(groups=3, size=6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kw = dict(name="h8", format=fmt, shape=shape, dtype="int8", epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.5])),
              input_scale=draw(st.floats(1e-3, 2.0)), input_zero_point=draw(st.integers(-128, 127)),
              output_scale=draw(st.floats(1e-3, 2.0)), output_zero_point=draw(st.integers(-128, 127)),
              arithmetic=draw(st.sampled_from(["float", "integer"])),
              scale=rng.normal(0.0, 2.0, channels), offset=rng.normal(0.0, 2.0, channels))
    kind = draw(st.sampled_from(KINDS))
    if kind == "batchnorm":
        return BatchNorm(**kw, trained_mean=rng.normal(0, 2, channels), trained_variance=rng.uniform(0, 3, channels))
    if kind == "groupnorm":
        return GroupNorm(**kw, num_groups=groups)
    if kind == "layernorm":
        return LayerNorm(**kw, operation_dimension=draw(
            st.sampled_from(["auto", "channel-only", "spatial-channel", "batch-excluded"])))
    if kind == "rmsnorm":
        return RMSNorm(**kw, bias=True)
    return InstanceNorm(**kw)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=int8_layers(), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_hypothesis_shapes(layer, batch, seed):
    results = check_layer(build(layer), layer, batches=(batch,), seed=seed)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


SAN_DRIVER = r"""
#include <stdio.h>
#include <string.h>
#include "{name}.h"
#define N ((size_t){batch} * {per})
static int8_t x[N], y[N], z[N];
int main(void)
{{
    FILE *f = fopen("x.bin", "rb");
    if (!f || fread(x, 1, N, f) != N) return 10;
    fclose(f);
    if ({name}_predict(x, y, {batch}{sizes}) != 0) return 11;
    memcpy(z, x, sizeof x);
    if ({name}_predict(z, z, {batch}{sizes}) != 0) return 12;  /* in place */
    if (memcmp(y, z, sizeof y) != 0) return 13;
    f = fopen("y.bin", "wb");
    fwrite(y, 1, N, f);
    fclose(f);
    return 0;
}}
"""


def _extremes(layer, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs at the int8 range's ends: the largest deviations, variances and sums there are."""
    shape = reference.full_shape(layer, batch)
    alternating = np.where(np.arange(int(np.prod(shape))) % 2 == 0, -128, 127).reshape(shape)
    lone = np.full(shape, -128)
    lone.reshape(-1)[:: max(1, lone.size // 3)] = 127  # a few far from the rest: |x̂| near √n
    return {"alternating": alternating.astype(np.int8), "lone": lone.astype(np.int8),
            "low": np.full(shape, -128, dtype=np.int8), "high": np.full(shape, 127, dtype=np.int8),
            "random": rng.integers(-128, 128, shape).astype(np.int8)}


SAN_LAYERS = [
    # the largest statistic each arithmetic takes: every sum and product at its bound
    InstanceNorm(name="san_in_i", format="BCT", shape=[2, 1 << 16], dtype="int8", input_scale=0.01,
                 input_zero_point=-128, output_scale=0.002, output_zero_point=127, arithmetic="integer",
                 scale=[1.0, -3.0], offset=[0.5, -0.25]),
    RMSNorm(name="san_rms_i", format="BTC", shape=[2, 1 << 15], dtype="int8", input_scale=0.5, input_zero_point=127,
            output_scale=0.01, output_zero_point=-128, arithmetic="integer", scale="narrownormal"),
    LayerNorm(name="san_ln_f", format="BTC", shape=[2, 1 << 20], dtype="int8", input_scale=0.02, input_zero_point=-128,
              output_scale=0.01, output_zero_point=127),
    GroupNorm(name="san_gn_i", format="BSSC", shape=[7, 9, 12], num_groups=4, dtype="int8", input_scale=1e-3,
              output_scale=5e-4, output_zero_point=-11, arithmetic="integer", epsilon=1e-6),
    BatchNorm(name="san_bn_i", format="BCSS", shape=[4, 5, 5], dtype="int8", input_scale=0.3, input_zero_point=100,
              output_scale=0.01, arithmetic="integer", scale=[1e3, -1e3, 1e-3, 0.0], trained_variance=[1, 2, 3, 1e-9]),
]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("layer", SAN_LAYERS, ids=lambda layer: layer.name)
def test_under_address_and_undefined_behaviour_sanitizers(layer, tmp_path):
    """No overflow (UBSan: signed overflow, shifts), no stray access (ASan) at the bounds, and the
    outputs of both calls (out of place, in place) equal and within one step of the reference."""
    batch = 2
    for name, text in emit(layer).items():
        (tmp_path / name).write_text(text)
    per = reference.full_shape(layer, 1)
    (tmp_path / "main.c").write_text(SAN_DRIVER.format(name=layer.name, batch=batch, per=int(np.prod(per)), sizes=""))
    exe = tmp_path / "run"
    cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O1", "-g", "-fsanitize=address,undefined",
           "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", str(tmp_path / f"{layer.name}.c"),
           str(tmp_path / "main.c"), "-o", str(exe), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode and "sanitize" in proc.stderr:
        pytest.skip(f"gcc cannot build with the sanitizers here: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr
    for tag, x in _extremes(layer, batch, np.random.default_rng(8)).items():
        (tmp_path / "x.bin").write_bytes(x.tobytes())
        run = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, (tag, run.returncode, run.stderr[-3000:])
        got = np.frombuffer((tmp_path / "y.bin").read_bytes(), dtype=np.int8).reshape(x.shape)
        steps = _steps(got, reference.predict(layer, x))
        assert steps.max() <= 1 and (steps == 1).sum() <= max(2, steps.size // 1000), (tag, steps.max())


# ---- tier 1: the int8 plan's loops, walked without compiling ----------------------------------
def _int8_grid():
    for layer in grid(dtypes=("float32",)):
        try:
            yield layer.replace(dtype="int8", input_scale=0.1, output_scale=0.05)
        except NormgenError:  # what int8 lacks: run-time parameters, fused forms
            continue


def _value(expr: str, env: dict) -> int:
    return int(eval(expr.replace(" / ", " // "), {}, env))  # noqa: S307 - expressions come from the plan


@pytest.mark.parametrize("layer", list(_int8_grid()), ids=lambda layer: layer.name)
def test_int8_loops_partition_like_the_reference(layer):
    """Every element once; each statistic's loop visits exactly the elements the reference groups
    together; the channel of each element is its C index (or its normalized-element index)."""
    plan = lower_int8(layer)
    batch = 2 if layer.fmt.has_batch else 1
    shape = reference.full_shape(layer, batch)
    offsets = np.arange(int(np.prod(shape))).reshape(shape)
    view, axes, _ = reference.grouped_view(layer, offsets)
    kept = [a for a in range(view.ndim) if a not in axes]
    moved = np.moveaxis(view, kept, list(range(len(kept))))
    groups = {frozenset(moved[idx].reshape(-1).tolist()) for idx in np.ndindex(*moved.shape[:len(kept)])}
    channel = np.indices(shape)[layer.fmt.letters.index("C")].reshape(-1)
    env = {"nb": batch}
    seen = []
    walked = set()
    loops = plan.apply_loops if plan.folded else plan.stat_loops
    for idx in itertools.product(*[range(_value(lp.stop, env)) for lp in loops]):
        env.update({lp.var: i for lp, i in zip(loops, idx, strict=True)})
        if plan.folded:
            seen.append(_value(plan.apply_offset_expr, env))
            assert _value(plan.apply_channel_expr, env) == channel[seen[-1]]
            continue
        block = []
        for jdx in itertools.product(*[range(_value(lp.stop, env)) for lp in plan.reduced_loops]):
            env.update({lp.var: j for lp, j in zip(plan.reduced_loops, jdx, strict=True)})
            o = _value(plan.offset_expr, env)
            block.append(o)
            if layer.affine != "element":
                assert _value(plan.channel_expr, env) == channel[o]
        assert len(block) == _value(plan.count_expr, env)
        walked.add(frozenset(block))
        seen += block
    assert sorted(seen) == list(range(offsets.size))
    if not plan.folded:
        assert walked == groups
