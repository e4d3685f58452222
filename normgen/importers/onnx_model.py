"""ONNX models → normgen layers: ``normgen.from_onnx`` and ``normgen import MODEL.onnx``.

The model is read with the ``onnx`` package (no protobuf is parsed here), its shapes come from
the graph's inputs and ``onnx.shape_inference``, and its parameters from initializers,
``Constant`` nodes and whatever constant arithmetic the exporters put between them and the
normalization node (``Unsqueeze``, ``Reshape``, ``Expand``, ``CastLike``, …: evaluated with
``onnx.reference``). The nodes read (README "From your framework"):

* ``BatchNormalization`` (opsets 9–15): batchnorm; momentum m weighs the *old* value, so
  mean_decay = variance_decay = 1 − m, biased running variance; ``training_mode = 1`` means the
  node normalizes with the batch's statistics: normgen's train_forward;
* ``InstanceNormalization``: instancenorm — or, between ``Reshape (N, G, -1)`` and ``Reshape``
  back to the input's shape and followed by a per-channel ``Mul`` and ``Add``, the groupnorm
  PyTorch's exporters write;
* ``GroupNormalization`` (18: one scale per group; 21: per channel): groupnorm;
* ``LayerNormalization`` (any axis) and ``RMSNormalization`` (23): layernorm and rmsnorm over
  the dimensions from ``axis`` on.

Other nodes are skipped with a note. A dimension other than the batch must have a size: a
symbolic one (``dim_param``) becomes a run-time size of the generated C (an ``int32_t seq``
argument after ``batch``), or is pinned with ``sizes={"seq": 128}`` (``--sizes seq=128``).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from ..description.layers import BatchNorm, GroupNorm, InstanceNorm, Layer, LayerNorm, RMSNorm
from ..errors import NormgenError
from .common import c_identifier, channels_first_format, check_channels_format, distinct, trailing_layout

#: ONNX TensorProto element types → normgen dtypes.
ELEM_DTYPES = {1: "float32", 11: "float64", 10: "float16", 16: "bfloat16"}
NORM_OPS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
            "RMSNormalization")
#: Attributes each normalization node may have (others are an error naming the node).
ATTRIBUTES = {
    "BatchNormalization": {"epsilon", "momentum", "training_mode", "spatial", "is_test", "consumed_inputs"},
    "InstanceNormalization": {"epsilon"},
    "LayerNormalization": {"axis", "epsilon", "stash_type"},
    "GroupNormalization": {"epsilon", "num_groups", "stash_type"},
    "RMSNormalization": {"axis", "epsilon", "stash_type"},
}
FOLDED_WARNING = (
    "{model}: no normalization node, but {convs}: torch.onnx.export folds BatchNorm into the preceding Conv unless"
    " told not to; export with do_constant_folding=False and training=torch.onnx.TrainingMode.PRESERVE"
    " (dynamo=True: optimize=False) to keep the BatchNormalization nodes"
)


def _onnx():
    try:
        import onnx
    except ImportError:  # pragma: no cover - the [onnx] extra
        raise NormgenError("reading ONNX models needs the onnx package: pip install 'normgen[onnx]'") from None
    return onnx


@dataclass
class ImportedLayer:
    """One normalization layer found in a graph, and where it sits."""

    layer: Layer
    node: str  # the ONNX node (the normalization node of a pattern)
    op: str  # what was read: an op type or a pattern
    input: str  # the tensor the layer reads
    output: str  # the tensor it writes (the end of the pattern)
    function: str = "predict"  # what the node computes: predict, or train_forward (training_mode = 1)


@dataclass
class OnnxImport:
    """What :func:`read_onnx` found."""

    name: str  # the model's name: its file name without .onnx, or the graph's name
    model: Any  # the ModelProto read (sizes pinned, shapes inferred)
    layers: list[ImportedLayer]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Graph:
    """The facts of one ONNX graph the importer asks for: producers, consumers, shapes, constants."""

    def __init__(self, onnx, model, where: str):
        self.onnx = onnx
        self.where = where
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {out: n for n in self.nodes for out in n.output if out}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.outputs = {o.name for o in g.output}
        self.types: dict[str, tuple[int, list | None]] = {}
        for vi in [*g.input, *g.value_info, *g.output]:
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                continue
            dims = None
            if tt.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
            self.types[vi.name] = (tt.elem_type, dims)
        for name, t in self.inits.items():
            self.types.setdefault(name, (t.data_type, list(t.dims)))
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self._const: dict[str, np.ndarray | None] = {}
        # Tensors that depend on no graph input (found in graph order, so that evaluating one
        # never recurses down a long data path): initializers, Constant nodes, the shape of a
        # tensor whose shape is known, and nodes all of whose inputs are such tensors.
        self.constant = set(self.inits)
        for n in self.nodes:
            if n.op_type == "Shape":
                dims = self.shape(n.input[0])
                ok = dims is not None and all(isinstance(d, int) and d > 0 for d in dims)
            elif n.op_type == "CastLike":
                ok = n.input[0] in self.constant
            else:
                ok = all(i in self.constant for i in n.input if i)
            if ok and n.domain in ("", "ai.onnx"):
                self.constant.update(o for o in n.output if o)

    def label(self, node) -> str:
        return f"node {node.name or node.output[0]!r} ({node.op_type})"

    def attrs(self, node) -> dict[str, Any]:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    def const(self, name: str) -> np.ndarray | None:
        """The value of a tensor computed from constants only, else None."""
        if not name or name not in self.constant:
            return None
        if name in self._const:
            return self._const[name]
        self._const[name] = None  # until evaluated
        value = None
        if name in self.inits:
            value = self.onnx.numpy_helper.to_array(self.inits[name])
        elif name in self.producer:
            value = self._evaluate(self.producer[name], name)
        self._const[name] = value
        return value

    def _evaluate(self, node, name: str) -> np.ndarray | None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return None
        if op == "Constant":
            attr = node.attribute[0]
            if attr.name == "value":
                return self.onnx.numpy_helper.to_array(attr.t)
            value = self.onnx.helper.get_attribute_value(attr)
            if attr.name in ("value_float", "value_floats"):
                return np.array(value, dtype=np.float32)
            if attr.name in ("value_int", "value_ints"):
                return np.array(value, dtype=np.int64)
            return None
        if op == "CastLike":  # the second input only gives the type
            value = self.const(node.input[0])
            elem = self.types.get(node.input[1], (None,))[0]
            if value is None or elem is None:
                return None
            return value.astype(self.onnx.helper.tensor_dtype_to_np_dtype(elem))
        if op == "Shape":
            dims = self.shape(node.input[0])
            if dims is None or not all(isinstance(d, int) and d > 0 for d in dims):
                return None
            a = self.attrs(node)
            return np.array(dims, dtype=np.int64)[a.get("start", 0):a.get("end", len(dims))]
        inputs = [self.const(i) if i else None for i in node.input]
        if any(v is None for i, v in zip(node.input, inputs, strict=True) if i):
            return None
        from onnx.reference import ReferenceEvaluator

        feeds = {i: v for i, v in zip(node.input, inputs, strict=True) if i}
        try:
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception:  # an op the reference cannot run: not a constant we can read
            return None
        for out, value in zip(node.output, results, strict=False):
            if out != name:
                self._const[out] = np.asarray(value)
        return np.asarray(results[list(node.output).index(name)])

    def shape(self, name: str) -> list | None:
        t = self.types.get(name)
        return None if t is None else t[1]

    def dtype(self, name: str, node) -> str:
        elem = self.types.get(name, (0, None))[0]
        if elem not in ELEM_DTYPES:
            raise NormgenError(f"{self.where}: {self.label(node)}: its input {name!r} has ONNX element type {elem}; normgen"
                               " takes float, double, float16 and bfloat16")
        return ELEM_DTYPES[elem]

    def param(self, node, index: int, what: str, *, optional: bool = False) -> np.ndarray | None:
        name = node.input[index] if index < len(node.input) else ""
        if not name:
            if optional:
                return None
            raise NormgenError(f"{self.where}: {self.label(node)} has no {what} input")
        value = self.const(name)
        if value is None:
            raise NormgenError(
                f"{self.where}: {self.label(node)}: its {what} {name!r} is not a constant (an initializer, a Constant"
                " node or computed from them); normgen embeds the parameters at generation"
            )
        return np.asarray(value, dtype=np.float64)

    def sizes(self, node, name: str, *, batch: bool = True) -> list[int]:
        """The sizes of tensor ``name`` after the batch (all of them with ``batch=False``)."""
        dims = self.shape(name)
        if dims is None:
            raise NormgenError(
                f"{self.where}: {self.label(node)}: the shape of its input {name!r} is unknown (shape inference could"
                " not find it); give the model's inputs fixed shapes"
            )
        start = 1 if batch else 0
        if batch and not dims:
            raise NormgenError(f"{self.where}: {self.label(node)}: its input {name!r} is a scalar")
        out: list[int | str] = []
        for axis, d in enumerate(dims[start:], start):
            if isinstance(d, str):
                # a symbolic size: a run-time size of the generated functions (a C identifier made
                # of its name), unless pinned with sizes={name: N}
                out.append(size_name(d))
                continue
            if not d:
                raise NormgenError(
                    f"{self.where}: {self.label(node)}: dimension {axis} of its input {name!r} has no known size;"
                    " give the model's inputs fixed shapes, or pin their symbolic sizes with --sizes NAME=N"
                )
            out.append(int(d))
        return out

    def sole_consumer(self, name: str, op: str):
        """The one node that reads tensor ``name`` when it is an ``op`` (a CastLike that takes only
        its type does not count), else None."""
        users = [n for n in self.consumers.get(name, [])
                 if not (n.op_type == "CastLike" and list(n.input).index(name) == 1)]
        if len(users) == 1 and users[0].op_type == op and name not in self.outputs:
            return users[0]
        return None


def size_name(dim_param: str) -> str:
    """The run-time size a symbolic dimension becomes: its name as a C identifier."""
    text = re.sub(r"[^A-Za-z0-9_]", "_", dim_param)
    return text if re.match(r"[A-Za-z_]", text) else f"d_{text}"


def _pin_sizes(onnx, model, sizes: dict[str, int], where: str):
    """Give the graph inputs' symbolic dimensions named in ``sizes`` their values."""
    if not sizes:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    found = set()
    for vi in model.graph.input:
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in sizes:
                value = sizes[d.dim_param]
                found.add(d.dim_param)
                d.Clear()
                d.dim_value = int(value)
    unknown = sorted(set(sizes) - found)
    if unknown:
        names = sorted({d.dim_param for vi in model.graph.input for d in vi.type.tensor_type.shape.dim
                        if d.HasField("dim_param")})
        raise NormgenError(f"{where}: no graph input has a symbolic dimension {unknown[0]!r}; its symbolic dimensions"
                           f" are {', '.join(map(repr, names)) or 'none'}")
    return model


def _load(onnx, path_or_model, sizes, where: str):
    if isinstance(path_or_model, onnx.ModelProto):
        model, name = path_or_model, path_or_model.graph.name or "model"
    else:
        path = Path(path_or_model)
        if not path.is_file():
            raise NormgenError(f"ONNX model {str(path)!r} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and friends
            raise NormgenError(f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
        name = path.stem
    model = _pin_sizes(onnx, model, {k: int(v) for k, v in (sizes or {}).items()}, where)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise NormgenError(f"{where}: onnx.shape_inference failed: {exc}") from None
    return model, name


def _float(value) -> float:
    """An ONNX float attribute (a float32) as the shortest decimal that rounds to it: 1e-05, not
    9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _per_channel(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """A Mul/Add operand that broadcasts to one value per channel of an (N, C, ...) tensor → (C,)."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(s != 1 for i, s in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


class _Reader:
    def __init__(self, graph: _Graph, formats: dict[str, str] | str | None):
        self.g = graph
        self.formats = formats
        self.absorbed: set[int] = set()  # ids of nodes read as part of a pattern
        self.notes: list[str] = []

    def user_format(self, node, name_guess: str) -> str | None:
        f = self.formats
        if isinstance(f, str) or f is None:
            return f
        return f.get(name_guess, f.get(node.name))

    def check_attributes(self, node) -> dict[str, Any]:
        attrs = self.g.attrs(node)
        extra = sorted(set(attrs) - ATTRIBUTES[node.op_type])
        if extra:
            raise NormgenError(f"{self.g.where}: {self.g.label(node)} has attribute {extra[0]!r}, which normgen does not"
                               " support")
        return attrs

    # ---- one handler per node ----------------------------------------------------------------------
    def read(self, node, name: str) -> ImportedLayer:
        attrs = self.check_attributes(node)
        return getattr(self, node.op_type)(node, attrs, name)

    def _channels_first(self, node, name: str, x: str, *, time: bool) -> tuple[str, list[int], str]:
        sizes = self.g.sizes(node, x)
        where = f"{self.g.where}: {self.g.label(node)}"
        fmt = self.user_format(node, name)
        if fmt is None:
            fmt = channels_first_format(len(sizes) + 1, time=time)
        else:
            check_channels_format(fmt, len(sizes), where)
            if fmt[:2] != "BC":
                raise NormgenError(f"{where}: format {fmt!r}: the node's input is (N, C, ...), its format starts with BC")
        return fmt, sizes, self.g.dtype(x, node)

    def BatchNormalization(self, node, attrs, name) -> ImportedLayer:
        g = self.g
        if attrs.get("spatial", 1) != 1:
            raise NormgenError(f"{g.where}: {g.label(node)} has spatial = 0 (one statistic per element), which normgen"
                               " does not support")
        x = node.input[0]
        fmt, sizes, dtype = self._channels_first(node, name, x, time=True)
        decay = float(Decimal(1) - Decimal(str(np.float32(attrs.get("momentum", 0.9)))))
        layer = BatchNorm(
            name=name, format=fmt, shape=sizes, dtype=dtype, epsilon=_float(attrs.get("epsilon", 1e-5)),
            scale=g.param(node, 1, "scale"), offset=g.param(node, 2, "bias"),
            trained_mean=g.param(node, 3, "mean"), trained_variance=g.param(node, 4, "var"),
            mean_decay=decay, variance_decay=decay, running_variance="biased",
        )
        function = "predict"
        if attrs.get("training_mode", 0):
            function = "train_forward"
            self.notes.append(
                f"{g.label(node)}: training_mode = 1: it normalizes with the batch's statistics, normgen's"
                f" {name}_train_forward (running statistics: mean_decay = 1 - momentum = {decay:g}, biased variance)"
            )
        return ImportedLayer(layer, node.name, node.op_type, x, node.output[0], function)

    def InstanceNormalization(self, node, attrs, name) -> ImportedLayer:
        found = self._group_norm_pattern(node, attrs, name)
        if found is not None:
            return found
        g = self.g
        x = node.input[0]
        fmt, sizes, dtype = self._channels_first(node, name, x, time=True)
        layer = InstanceNorm(name=name, format=fmt, shape=sizes, dtype=dtype, epsilon=_float(attrs.get("epsilon", 1e-5)),
                             scale=g.param(node, 1, "scale"), offset=g.param(node, 2, "B"))
        return ImportedLayer(layer, node.name, node.op_type, x, node.output[0])

    def _group_norm_pattern(self, node, attrs, name) -> ImportedLayer | None:
        """Reshape(X, (N, G, -1)) → InstanceNormalization → Reshape(·, shape(X)) [→ Mul γ → Add β]:
        torch.onnx's GroupNorm. None when the nodes around do not match."""
        g = self.g
        r1 = g.producer.get(node.input[0])
        if r1 is None or r1.op_type != "Reshape" or len(g.consumers[node.input[0]]) != 1:
            return None
        x = r1.input[0]
        xdims, rdims = g.shape(x), g.shape(r1.output[0])
        scale_g, bias_g = g.const(node.input[1]), g.const(node.input[2])
        if xdims is None or len(xdims) < 2 or scale_g is None or bias_g is None:
            return None
        groups = int(np.asarray(scale_g).size)
        channels = xdims[1]
        if not isinstance(channels, int) or not channels or channels % groups:
            return None
        rest = xdims[2:]
        if not all(isinstance(d, int) and d > 0 for d in rest):
            return None
        per_group = channels // groups * int(np.prod(rest, dtype=np.int64))
        target = g.const(r1.input[1])
        if rdims is not None and len(rdims) == 3 and rdims[1] == groups and rdims[2] == per_group:
            pass
        elif target is None or len(target) != 3 or int(target[1]) != groups or int(target[2]) not in (-1, per_group):
            return None
        r2 = g.sole_consumer(node.output[0], "Reshape")
        if r2 is None:
            return None
        shape_src = g.producer.get(r2.input[1])
        back = g.const(r2.input[1])
        same = (shape_src is not None and shape_src.op_type == "Shape" and shape_src.input[0] == x
                and g.attrs(shape_src).get("start", 0) == 0 and "end" not in g.attrs(shape_src))
        if not same and not (back is not None and list(back[1:]) == list(xdims[1:]) and int(back[0]) in (0, -1)):
            if g.shape(r2.output[0]) != xdims:
                return None
        absorbed = [r1, node, r2]
        if same and len(g.consumers[r2.input[1]]) == 1:
            self.absorbed.add(id(shape_src))  # Shape(X), read by the second Reshape only
        gamma = np.repeat(np.asarray(scale_g, dtype=np.float64).reshape(-1), channels // groups)
        beta = np.repeat(np.asarray(bias_g, dtype=np.float64).reshape(-1), channels // groups)
        has_scale, has_offset = bool(np.any(gamma != 1)), bool(np.any(beta != 0))
        out = r2.output[0]
        mul = g.sole_consumer(out, "Mul")
        if mul is not None:
            other = mul.input[1] if mul.input[0] == out else mul.input[0]
            w = g.const(other)
            w = None if w is None else _per_channel(np.asarray(w), len(xdims), channels)
            if w is not None:
                gamma, beta, has_scale = gamma * w, beta * w, True
                absorbed.append(mul)
                out = mul.output[0]
                add = g.sole_consumer(out, "Add")
                if add is not None:
                    other = add.input[1] if add.input[0] == out else add.input[0]
                    b = g.const(other)
                    b = None if b is None else _per_channel(np.asarray(b), len(xdims), channels)
                    if b is not None:
                        beta, has_offset = beta + b, True
                        absorbed.append(add)
                        out = add.output[0]
        fmt, sizes, dtype = self._channels_first(node, name, x, time=False)
        affine: dict[str, Any]
        if not has_scale and not has_offset:
            affine = dict(affine="none")
        else:
            affine = dict(scale=gamma) | (dict(offset=beta) if has_offset else dict(bias=False))
        layer = GroupNorm(name=name, format=fmt, shape=sizes, dtype=dtype, epsilon=_float(attrs.get("epsilon", 1e-5)),
                          num_groups=groups, **affine)
        self.absorbed.update(id(n) for n in absorbed)
        op = " → ".join(n.op_type for n in absorbed)
        return ImportedLayer(layer, node.name, f"GroupNorm pattern ({op})", x, out)

    def GroupNormalization(self, node, attrs, name) -> ImportedLayer:
        g = self.g
        x = node.input[0]
        fmt, sizes, dtype = self._channels_first(node, name, x, time=False)
        if "num_groups" not in attrs:
            raise NormgenError(f"{g.where}: {g.label(node)} has no num_groups attribute")
        groups, channels = int(attrs["num_groups"]), sizes[0]
        if groups < 1 or channels % groups:
            raise NormgenError(f"{g.where}: {g.label(node)}: num_groups {groups} does not divide the {channels} channels")
        arrays = {}
        for index, key, what in ((1, "scale", "scale"), (2, "offset", "bias")):
            value = g.param(node, index, what).reshape(-1)
            if value.size == channels and (g.opset >= 21 or groups == channels):
                arrays[key] = value
            elif value.size == groups:  # GroupNormalization-18: one value per group
                arrays[key] = np.repeat(value, channels // groups)
            else:
                raise NormgenError(f"{g.where}: {g.label(node)}: its {what} has {value.size} values; opset {g.opset}"
                                   f" takes {channels if g.opset >= 21 else groups}")
        layer = GroupNorm(name=name, format=fmt, shape=sizes, dtype=dtype, epsilon=_float(attrs.get("epsilon", 1e-5)),
                          num_groups=groups, **arrays)
        return ImportedLayer(layer, node.name, node.op_type, x, node.output[0])

    def _trailing(self, node, attrs, name, cls, has_bias: bool) -> ImportedLayer:
        g = self.g
        x = node.input[0]
        dims = g.shape(x)
        if dims is None:
            g.sizes(node, x)  # the error for an unknown shape
        rank = len(dims)
        axis = int(attrs.get("axis", -1))
        if not -rank <= axis < rank:
            raise NormgenError(f"{g.where}: {g.label(node)}: axis {axis} is outside its input's {rank} dimensions")
        axis %= rank
        batch = axis > 0
        sizes = g.sizes(node, x, batch=batch)
        k = rank - axis
        where = f"{g.where}: {g.label(node)}"
        fmt, od = trailing_layout(sizes, k, self.user_format(node, name), where, batch=batch)
        normalized = tuple(sizes[len(sizes) - k:])
        symbolic = [d for d in normalized if isinstance(d, str)]
        if symbolic:
            raise NormgenError(
                f"{where}: it normalizes over the symbolic size {symbolic[0]!r}; its scale and bias have the"
                f" normalized dimensions' sizes, fixed when the code is generated: pin it with --sizes {symbolic[0]}=N"
            )
        stash = attrs.get("stash_type", 1)
        if stash != 1:
            self.notes.append(f"{g.label(node)}: stash_type = {stash}; normgen computes the statistics in the element"
                              " type with double merges, as for stash_type = 1 (float)")
        arrays: dict[str, Any] = {}
        for index, key, what in ((1, "scale", "scale"), (2, "offset", "B")):
            if key == "offset" and not has_bias:
                continue
            value = g.param(node, index, what, optional=key == "offset")
            if value is None:
                continue
            try:
                value = np.broadcast_to(value, normalized)
            except ValueError:
                raise NormgenError(f"{where}: its {what} of shape {value.shape} does not broadcast to the normalized"
                                   f" shape {normalized}") from None
            arrays[key] = value.reshape(-1) if k == 1 else np.array(value)
        affine = "channel" if k == 1 else "element"
        for extra in node.output[1:]:
            if extra and (g.consumers.get(extra) or extra in g.outputs):
                self.notes.append(f"{g.label(node)}: its output {extra!r} (a saved statistic) is used; normgen's"
                                  f" {name}_train_forward_save computes the statistics, predict does not write them")
        layer = cls(name=name, format=fmt, shape=sizes, dtype=g.dtype(x, node), epsilon=_float(attrs.get("epsilon", 1e-5)),
                    operation_dimension=od, affine=affine, bias="offset" in arrays, **arrays)
        return ImportedLayer(layer, node.name, node.op_type, x, node.output[0])

    def LayerNormalization(self, node, attrs, name) -> ImportedLayer:
        return self._trailing(node, attrs, name, LayerNorm, True)

    def RMSNormalization(self, node, attrs, name) -> ImportedLayer:
        return self._trailing(node, attrs, name, RMSNorm, False)


def _base_name(node, index: int) -> str:
    """A readable name for a node: its path without the op type (TorchScript's
    ``/layer1/bn1/BatchNormalization`` → ``layer1_bn1``), or its name."""
    text = node.name or (node.output[0] if node.output else "")
    text = text.removeprefix("node_")  # the dynamo exporter's node names, after aten's ops
    text = re.sub(r"_*native_|_legit(_no_training|_functional)?", "", text)  # _native_batch_norm_legit_no_training
    parts = [p for p in text.split("/") if p]
    if len(parts) > 1 and parts[-1].split("_")[0] == node.op_type:
        parts = parts[:-1]
    return "_".join(parts) if parts else f"{node.op_type}_{index}"


KIND_PREFIX = {"BatchNormalization": "bn", "InstanceNormalization": "in", "LayerNormalization": "ln",
               "GroupNormalization": "gn", "RMSNormalization": "rms"}


def _prefix(graph: _Graph, node) -> str:
    """What goes before a name that starts with a digit (TorchScript's ``/0/...``)."""
    source = graph.producer.get(node.input[0]) if node.input else None
    if node.op_type == "InstanceNormalization" and source is not None and source.op_type == "Reshape":
        return "gn"  # most likely torch's group norm
    return KIND_PREFIX[node.op_type]


def _layer_name(graph: _Graph, node, index: int) -> str:
    prefix = _prefix(graph, node)
    base = _base_name(node, index)
    if base.startswith(node.op_type):  # a generic name ("InstanceNormalization_12"): say what it is
        base = prefix + base[len(node.op_type):]
    return c_identifier(base, prefix)


def read_onnx(path_or_model, *, format: str | dict[str, str] | None = None,
              sizes: dict[str, int] | None = None) -> OnnxImport:
    """Every normalization layer of an ONNX model, with the tensors it reads and writes."""
    onnx = _onnx()
    where = "ONNX model" if isinstance(path_or_model, onnx.ModelProto) else Path(path_or_model).name
    model, model_name = _load(onnx, path_or_model, sizes, where)
    graph = _Graph(onnx, model, where)
    reader = _Reader(graph, format)
    norm_nodes = [n for n in graph.nodes if n.op_type in NORM_OPS and n.domain in ("", "ai.onnx")]
    names = distinct(_layer_name(graph, n, i) for i, n in enumerate(norm_nodes))
    layers = [reader.read(n, name) for n, name in zip(norm_nodes, names, strict=True)]
    if isinstance(format, dict):
        known = {n.name for n in norm_nodes} | {f.layer.name for f in layers}
        unknown = sorted(set(format) - known)
        if unknown:
            raise NormgenError(f"{where}: --format {unknown[0]!r}=...: no normalization layer or node has that name;"
                               f" the layers are {', '.join(f.layer.name for f in layers) or 'none'}")
    absorbed = reader.absorbed | {id(n) for n in norm_nodes}
    skipped = Counter(n.op_type for n in graph.nodes if id(n) not in absorbed and n.op_type != "Constant"
                      and not all(graph.const(o) is not None for o in n.output if o))
    result = OnnxImport(model_name, model, layers, reader.notes)
    if skipped:
        result.notes.append("skipped (not normalization): " + ", ".join(f"{op} ×{c}" for op, c in sorted(skipped.items())))
    convs = Counter(n.op_type for n in graph.nodes if n.op_type in ("Conv", "ConvTranspose", "Gemm"))
    if not layers and convs:
        result.warnings.append(FOLDED_WARNING.format(
            model=where, convs=", ".join(f"{c} {op} node{'s' * (c > 1)}" for op, c in sorted(convs.items()))))
    return result


def from_onnx(path_or_model, *, format: str | dict[str, str] | None = None,
              sizes: dict[str, int] | None = None) -> list[Layer]:
    """The normalization layers of an ONNX model (a path or an ``onnx.ModelProto``), in graph order.

    ``format``: row-major letters for every layer's input (or a dict by layer or node name), as
    the tensor is laid out: ONNX's batch, instance and group norms read (N, C, ...) (default
    ``"BC"`` and S per further dimension, ``"BCT"`` for rank 3), layer and RMS norms normalize
    the dimensions from ``axis`` on. ``sizes`` pins symbolic dimensions (``{"seq": 128}``).
    A model with no normalization node but Conv nodes (BatchNorm folded by the exporter) gives a
    warning and an empty list.
    """
    found = read_onnx(path_or_model, format=format, sizes=sizes)
    for text in found.warnings:
        warnings.warn(text, stacklevel=2)
    return [f.layer for f in found.layers]
