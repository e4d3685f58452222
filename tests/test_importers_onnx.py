"""The ONNX importer on graphs written with onnx.helper (no PyTorch needed): every node type and
opset the importer reads, checked against ONNX Runtime; parameters from Constant nodes; the
errors and notes; the spec files ``normgen import`` writes."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import numpy as np
import pytest

import normgen
from normgen import NormgenError
from normgen.cli import main

onnx = pytest.importorskip("onnx", reason="the ONNX importer tests need onnx (pip install 'normgen[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the ONNX importer tests need onnxruntime (pip install 'normgen[onnx]')")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from normgen.importers.onnx_check import check_onnx  # noqa: E402
from normgen.importers.onnx_model import read_onnx  # noqa: E402
from normgen.importers.writer import spec_files  # noqa: E402

RNG = np.random.default_rng(0)


def init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def model(nodes, inits, x_shape, y_shape=None, opset: int = 21, elem=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", elem, x_shape)],
        [helper.make_tensor_value_info("y", elem, y_shape or x_shape)], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def checked(m, tmp_path, batches=(1, 3)) -> list:
    """check_onnx (the compiled C against ONNX Runtime) on the model saved to a file: every row
    passes; returns the rows."""
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    rows, _ = check_onnx(path, batches=batches)
    assert rows and all(r.ok for r in rows), rows
    return rows


def matches_ort(m, batch: int = 2) -> float:
    """The imported layers through normgen.reference against ONNX Runtime on each node's own input
    (what check_onnx does, without compiling: the C equals the reference, test_c_numeric.py)."""
    from normgen.harness.check import compare
    from normgen.importers.onnx_check import _inputs, _with_outputs

    found = read_onnx(m)
    names = [t for f in found.layers for t in (f.input, f.output)]
    sess = ort.InferenceSession(_with_outputs(onnx, found.model, names).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    feeds = _inputs(onnx, found.model, batch, np.random.default_rng(1), "test")
    outs = [o.name for o in sess.get_outputs()]
    values = feeds | dict(zip(outs, sess.run(outs, feeds), strict=True))
    worst = 0.0
    for f in found.layers:
        x = values[f.input].astype(np.float64)
        r = compare(f.layer.name, "predict", f.layer.dtype, batch, normgen.reference.predict(f.layer, x), values[f.output])
        assert r.ok, r
        worst = max(worst, r.max_abs)
    return worst


def scale_bias(n: int):
    return RNG.normal(1.0, 0.3, n), RNG.normal(0.0, 0.5, n)


def test_batch_normalization(tmp_path):
    s, b = scale_bias(5)
    m = model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3, momentum=0.8,
                                name="bn")],
              [init("s", s), init("b", b), init("m", RNG.normal(0, 1, 5)), init("v", RNG.uniform(0.3, 2, 5))],
              ["N", 5, 3, 4], opset=15)
    (layer,) = normgen.from_onnx(m)
    assert (layer.kind, layer.fmt.letters, layer.dims) == ("batchnorm", "BCSS", (5, 3, 4))
    assert layer.epsilon == 1e-3 and layer.mean_decay == layer.variance_decay == 0.2  # 1 − momentum
    assert layer.running_variance == "biased"
    checked(m, tmp_path)


@pytest.mark.parametrize("opset", [9, 14])
def test_batch_normalization_older_opsets_and_rank3(opset, tmp_path):
    s, b = scale_bias(4)
    m = model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
              [init("s", s), init("b", b), init("m", RNG.normal(0, 1, 4)), init("v", RNG.uniform(0.3, 2, 4))],
              ["N", 4, 6], opset=opset)
    assert normgen.from_onnx(m)[0].fmt.letters == "BCT"
    matches_ort(m)


def test_batch_normalization_training_mode_is_train_forward(tmp_path):
    s, b = scale_bias(3)
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1,
                            momentum=0.7)
    m = model([node], [init("s", s), init("b", b), init("m", RNG.normal(0, 1, 3)), init("v", RNG.uniform(0.3, 2, 3))],
              ["N", 3, 4, 4], opset=15)
    found = read_onnx(m)
    assert found.layers[0].function == "train_forward"
    assert any("training_mode = 1" in n for n in found.notes)
    rows = checked(m, tmp_path, batches=(2,))
    assert rows[0].function == "train_forward"


def test_instance_normalization(tmp_path):
    s, b = scale_bias(6)
    m = model([helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-4)],
              [init("s", s), init("b", b)], ["N", 6, 5, 3])
    (layer,) = normgen.from_onnx(m)
    assert (layer.kind, layer.epsilon) == ("instancenorm", 1e-4)
    matches_ort(m)


@pytest.mark.parametrize("opset", [18, 21])
def test_group_normalization_per_group_and_per_channel_scale(opset, tmp_path):
    groups, channels = 3, 6
    n = groups if opset == 18 else channels
    s, b = scale_bias(n)
    m = model([helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=1e-5)],
              [init("s", s), init("b", b)], ["N", channels, 4, 5], opset=opset)
    (layer,) = normgen.from_onnx(m)
    assert (layer.kind, layer.groups) == ("groupnorm", groups)
    want = np.repeat(s, channels // groups) if opset == 18 else s
    np.testing.assert_allclose(layer.scale_values, want.astype(np.float32))
    matches_ort(m)


@pytest.mark.parametrize("axis, shape, fmt, od", [
    (-1, ["N", 7, 12], "BTC", "channel-only"),
    (1, ["N", 4, 3, 5], "BCSS", "spatial-channel"),
    (2, ["N", 4, 3, 5], "BTCS", "spatial-channel"),
    (-1, ["N", 3, 4, 6], "BSSC", "channel-only"),
    (0, [3, 4, 5], "CSS", "spatial-channel"),
])
def test_layer_normalization_any_axis(axis, shape, fmt, od, tmp_path):
    normalized = shape[axis:] if axis >= 0 else shape[axis:]
    s, b = scale_bias(int(np.prod(normalized)))
    s, b = s.reshape(normalized), b.reshape(normalized)
    m = model([helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis, epsilon=1e-5)],
              [init("s", s), init("b", b)], shape, opset=17)
    (layer,) = normgen.from_onnx(m)
    assert (layer.kind, layer.fmt.letters, layer.resolved_dimension) == ("layernorm", fmt, od)
    matches_ort(m)


def test_layer_normalization_without_bias_and_a_broadcast_scale(tmp_path):
    m = model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-2)],
              [init("s", RNG.normal(1, 0.3, (1, 6)))], ["N", 5, 4, 6], opset=17)
    (layer,) = normgen.from_onnx(m)
    assert layer.bias is False and layer.affine == "element" and layer.param_shape == (4, 6)
    matches_ort(m)


def test_rms_normalization_23(tmp_path):
    s, _ = scale_bias(16)
    m = model([helper.make_node("RMSNormalization", ["x", "s"], ["y"], axis=-1, epsilon=1e-6)],
              [init("s", s)], ["N", 5, 16], opset=23)
    (layer,) = normgen.from_onnx(m)
    assert (layer.kind, layer.fmt.letters, layer.bias, layer.epsilon) == ("rmsnorm", "BTC", False, 1e-6)
    try:
        checked(m, tmp_path)
    except NormgenError as exc:
        if "ONNX Runtime cannot load" in str(exc):
            pytest.skip(f"this ONNX Runtime has no RMSNormalization-23: {exc}")
        raise


def test_group_norm_pattern_with_constant_nodes(tmp_path):
    """torch's exporters' GroupNorm, its parameters in Constant nodes and Unsqueezed."""
    groups, channels = 2, 6
    w, b = scale_bias(channels)
    nodes = [
        helper.make_node("Constant", [], ["shape3"], value=numpy_helper.from_array(np.array([0, groups, -1], np.int64))),
        helper.make_node("Reshape", ["x", "shape3"], ["r"]),
        helper.make_node("Constant", [], ["ones"], value_floats=[1.0] * groups),
        helper.make_node("Constant", [], ["zeros"], value_floats=[0.0] * groups),
        helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["in"], epsilon=1e-5, name="/gn/InstanceNormalization"),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Reshape", ["in", "xs"], ["back"]),
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w.astype(np.float32))),
        helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1, 2], np.int64))),
        helper.make_node("Unsqueeze", ["w", "axes"], ["w3"]),
        helper.make_node("Mul", ["back", "w3"], ["mul"]),
        helper.make_node("Add", ["mul", "b3"], ["y"]),
    ]
    m = model(nodes, [init("b3", b.reshape(channels, 1, 1))], ["N", channels, 3, 4], opset=17)
    found = read_onnx(m)
    (f,) = found.layers
    assert f.layer.kind == "groupnorm" and f.layer.groups == groups and f.layer.name == "gn"
    assert f.op.startswith("GroupNorm pattern") and (f.input, f.output) == ("x", "y")
    np.testing.assert_allclose(f.layer.scale_values, w.astype(np.float32))
    assert not any("skipped" in n for n in found.notes)
    checked(m, tmp_path)


def test_other_nodes_are_skipped_with_a_note(tmp_path):
    s, b = scale_bias(4)
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("InstanceNormalization", ["r", "s", "b"], ["i"]),
             helper.make_node("Sigmoid", ["i"], ["y"])]
    m = model(nodes, [init("s", s), init("b", b)], ["N", 4, 5])
    found = read_onnx(m)
    assert found.notes == ["skipped (not normalization): Relu ×1, Sigmoid ×1"]
    matches_ort(m)


def test_folded_model_warns(tmp_path):
    w = init("w", RNG.normal(0, 1, (4, 3, 1, 1)))
    m = model([helper.make_node("Conv", ["x", "w"], ["y"])], [w], ["N", 3, 5, 5], ["N", 4, 5, 5])
    with pytest.warns(UserWarning, match="do_constant_folding=False"):
        assert normgen.from_onnx(m) == []


@pytest.mark.parametrize("node, inits, shape, words", [
    (helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], spatial=0, name="bn0"),
     {"s": 1, "b": 0, "m": 0, "v": 1}, ["N", 1, 3], ["'bn0'", "spatial = 0"]),
    (helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], name="in0", flavor=1),
     {"s": 1, "b": 0}, ["N", 1, 3], ["'in0'", "attribute 'flavor'"]),
    (helper.make_node("InstanceNormalization", ["x", "x2", "b"], ["y"], name="in1"),
     {"b": 0}, ["N", 1, 3], ["'in1'", "not a constant"]),
    (helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=-1, name="ln"),
     {"s": 1}, ["N", 3, "hidden"], ["'ln'", "'hidden'", "--sizes hidden=N"]),
    (helper.make_node("LayerNormalization", ["x", "s"], ["y"], axis=3, name="ln2"),
     {"s": 1}, ["N", 2, 3, 4, 1], ["'ln2'", "merge them into the batch"]),
])
def test_unsupported_nodes_are_errors_naming_the_node(node, inits, shape, words, tmp_path, capsys):
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)]
    if "x2" in node.input:
        graph_inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1]))
    arrays = [init(k, np.full(1, v)) for k, v in inits.items()]
    graph = helper.make_graph([node], "g", graph_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              initializer=arrays)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(NormgenError) as info:
        normgen.from_onnx(m)
    for w in words:
        assert w in str(info.value)
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    with redirect_stdout(io.StringIO()):
        assert main(["import", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normgen: error:") and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_spec_files_are_byte_identical_and_round_trip(tmp_path):
    s, b = scale_bias(12)
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["l"], axis=1, name="/a/LayerNormalization"),
             helper.make_node("GroupNormalization", ["l", "gs", "gb"], ["y"], num_groups=4, name="/b/GroupNormalization")]
    m = model(nodes, [init("s", s.reshape(12, 1, 1) * np.ones((12, 2, 3))), init("b", np.zeros((12, 2, 3))),
                      init("gs", s), init("gb", b)], ["N", 12, 2, 3])
    layers = normgen.from_onnx(m)
    assert [layer.name for layer in layers] == ["a", "b"]
    first = spec_files(layers, "net", "net.onnx")
    assert first == spec_files(normgen.from_onnx(m), "net", "net.onnx")
    for fname, data in first.items():
        (tmp_path / fname).write_bytes(data)
    loaded = normgen.load_spec(tmp_path / "net.toml")
    for got, want in zip(loaded, layers, strict=True):
        assert got.describe() == [(k, v.replace("array", "array")) for k, v in want.describe()]
    onnx.save(m, str(tmp_path / "net.onnx"))
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["import", str(tmp_path / "net.onnx"), "-o", str(tmp_path / "o")]) == 0
        assert main(["import", str(tmp_path / "net.onnx"), "-o", str(tmp_path / "o")]) == 0
    assert out.getvalue().count("unchanged") == 3  # second run: nothing rewritten
