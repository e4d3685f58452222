"""ONNX Runtime as the oracle: ``normgen check MODEL.onnx``.

Every imported layer's generated code runs on that layer's own input — the intermediate tensor
ONNX Runtime computes for the node, exposed as an extra graph output — and its output is
compared with ONNX Runtime's output of the same node (the end of the pattern for torch's group
norm), with ``check``'s tolerances.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import NormgenError
from ..harness.check import Comparison, compare
from .onnx_model import ELEM_DTYPES, read_onnx


def _ort():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - the [onnx] extra
        raise NormgenError("normgen check MODEL.onnx runs ONNX Runtime: pip install 'normgen[onnx]'") from None
    return onnxruntime


def _with_outputs(onnx, model, names: Sequence[str]):
    """A copy of the model whose graph also outputs the tensors ``names``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    known = {vi.name: vi for vi in model.graph.value_info}
    for name in names:
        if name in have:
            continue
        have.add(name)
        if name in known:
            model.graph.output.append(known[name])
        else:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model


def _inputs(onnx, model, batch: int, rng: np.random.Generator, where: str) -> dict[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type not in ELEM_DTYPES:
            raise NormgenError(f"{where}: graph input {vi.name!r} has element type {tt.elem_type}; check feeds random"
                               " floating-point inputs")
        shape = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif axis == 0:
                shape.append(batch)
            else:
                raise NormgenError(f"{where}: dimension {axis} of graph input {vi.name!r} is symbolic"
                                   f" ({d.dim_param or 'unnamed'}): pin it with --sizes NAME=N")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = (2.0 * rng.standard_normal(shape) + 0.5).astype(dtype)
    return feeds


def _batches(onnx, model, batches: Sequence[int]) -> tuple[int, ...]:
    """The batch sizes the model can run: ``batches`` where every input's first dimension is
    symbolic, else the fixed one."""
    inits = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            return (dims[0].dim_value,)
    return tuple(batches)


def check_onnx(path, *, target: str = "c", batches: Sequence[int] = (1, 2, 5), seed: int = 0,
               sizes: dict[str, int] | None = None) -> tuple[list[Comparison], list[str]]:
    """(comparisons, notes): each imported layer's generated code against ONNX Runtime's output
    of its node, on the node's own input, for each batch size the model takes."""
    from ..targets.load import build

    ort = _ort()
    found = read_onnx(path, sizes=sizes)
    if not found.layers:
        raise NormgenError(" ".join(found.warnings) or f"{path}: no normalization node to check")
    dynamic = sorted({n for f in found.layers for n in f.layer.sizes})
    if dynamic:
        raise NormgenError(f"{path}: the symbolic size {dynamic[0]!r} needs a value to run the model on: pin it with"
                           f" --sizes {dynamic[0]}=N")
    import onnx

    where = str(path)
    names = [t for f in found.layers for t in (f.input, f.output)]
    model = _with_outputs(onnx, found.model, names)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise NormgenError(f"{where}: ONNX Runtime cannot load the model: {exc}") from None
    out_names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(seed)
    compiled = {}
    rows: list[Comparison] = []
    for batch in _batches(onnx, found.model, batches):
        feeds = _inputs(onnx, found.model, batch, rng, where)
        values = feeds | dict(zip(out_names, session.run(out_names, feeds), strict=True))
        for f in found.layers:
            layer = f.layer
            x = values[f.input]
            if f.layer.name not in compiled:
                compiled[layer.name] = build(layer, target)
            bench = compiled[layer.name]
            if f.function == "train_forward":
                bench.running_mean = np.array(layer.trained_mean_values, dtype=bench.running_mean.dtype)
                bench.running_var = np.array(layer.trained_variance_values, dtype=bench.running_var.dtype)
                got = bench.train_forward(x)
            else:
                got = bench.predict(x)
            n = x.shape[layer.fmt.letters.index("B")] if layer.fmt.has_batch else 1
            rows.append(compare(layer.name, f.function, layer.dtype, n, got, values[f.output]))
    notes = [f"{f.layer.name}: {f.op} {f.node!r}, {f.input!r} → {f.output!r}" for f in found.layers]
    return rows, notes + found.notes
