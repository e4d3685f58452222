"""PyTorch modules → normgen layers: ``normgen.from_torch``.

Which normgen layer each ``torch.nn`` module is (README "From your framework"):

* ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` → batchnorm: weight → scale, bias → offset,
  running_mean → trained_mean, running_var → trained_variance, eps → epsilon, momentum →
  mean_decay = variance_decay (PyTorch weighs the new value), unbiased running variance;
* ``InstanceNorm1d/2d/3d`` → instancenorm; with ``track_running_stats`` in eval mode PyTorch
  normalizes with the running statistics, so it is a batchnorm over them (its predict);
* ``GroupNorm`` → groupnorm; ``LayerNorm`` → layernorm and ``RMSNorm`` → rmsnorm over the last
  ``len(normalized_shape)`` dimensions (one dimension: channel-only, per-channel affine; more:
  spatial-channel with ``affine = "element"``).

torch is imported only when a module is converted.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..description.layers import BatchNorm, GroupNorm, InstanceNorm, Layer, LayerNorm, RMSNorm
from ..errors import NormgenError
from .common import c_identifier, channels_first_format, check_channels_format, distinct, trailing_layout

#: torch dtype name → normgen dtype.
_DTYPES = {"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "bfloat16"}


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - the [torch] extra
        raise NormgenError("from_torch needs PyTorch: pip install 'normgen[torch]'") from None
    return torch


def _classes(torch) -> dict[type, str]:
    """Module class → what it is. Subclasses (a model's own BatchNorm2d) count as their base."""
    nn = torch.nn
    out = {
        nn.BatchNorm1d: "batchnorm1d", nn.BatchNorm2d: "batchnorm2d", nn.BatchNorm3d: "batchnorm3d",
        nn.SyncBatchNorm: "batchnorm",
        nn.InstanceNorm1d: "instancenorm1d", nn.InstanceNorm2d: "instancenorm2d", nn.InstanceNorm3d: "instancenorm3d",
        nn.GroupNorm: "groupnorm", nn.LayerNorm: "layernorm",
    }
    if hasattr(nn, "RMSNorm"):
        out[nn.RMSNorm] = "rmsnorm"
    return out


def _what(module, classes: dict[type, str]) -> str | None:
    for cls in type(module).__mro__:
        if cls in classes:
            return classes[cls]
    return None


def _array(tensor) -> np.ndarray:
    """A parameter or buffer as float64 NumPy (detached: nn.Parameters with grad are fine)."""
    return tensor.detach().to(device="cpu").double().numpy()


def _dtype(module) -> str:
    for t in (getattr(module, "weight", None), getattr(module, "running_mean", None)):
        if t is not None and t.is_floating_point():
            return _DTYPES.get(str(t.dtype).removeprefix("torch."), "float32")
    return "float32"


def _sizes(shape, where: str) -> list[int]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        try:
            shape = list(shape)
        except TypeError:
            raise NormgenError(f"{where}: shape must be a list of sizes, got {shape!r}") from None
    out = []
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise NormgenError(f"{where}: shape {list(shape)} has size {s!r}; sizes are positive integers")
        out.append(int(s))
    return out


def _channels_first_layout(what: str, channels: int, fmt: str | None, shape: list[int] | None,
                           input_shape: tuple[int, ...] | None, where: str) -> tuple[str, list[int]]:
    """(format, shape) of a batch, instance or group norm. PyTorch's tensors are (N, C, *rest);
    a given format lists the dimensions in the order they are stored (``"BSSC"`` for
    channels_last), and ``shape`` follows it."""
    spatial_rank = {"batchnorm2d": 2, "batchnorm3d": 3, "instancenorm1d": 1, "instancenorm2d": 2,
                    "instancenorm3d": 3}.get(what)
    if shape is None and input_shape is not None:
        logical = list(input_shape[1:])  # (C, *rest) as PyTorch sees it, whatever the memory order
        if fmt is None:
            shape = logical
        else:
            letters = fmt.replace("B", "")
            if len(letters) != len(logical):
                raise NormgenError(f"{where}: format {fmt!r} does not fit its input of shape {tuple(input_shape)}")
            rest = iter(logical[1:])
            shape = [logical[0] if ch == "C" else next(rest) for ch in letters]
    if shape is None:
        if spatial_rank is None:
            shape = [channels]  # (N, C): BatchNorm1d and GroupNorm on features
        else:
            need = {1: "C, L", 2: "C, H, W", 3: "C, D, H, W"}[spatial_rank]
            raise NormgenError(
                f"{where}: give shape=[{need}] (the input's sizes without the batch, in the format's order) or"
                " example_input=, normgen fixes every size at generation"
            )
    if fmt is None:
        if spatial_rank is not None and len(shape) != spatial_rank + 1:
            raise NormgenError(
                f"{where}: shape {shape} has {len(shape)} sizes; a {what} input has {spatial_rank + 1} besides the batch"
            )
        fmt = channels_first_format(len(shape) + 1, time=what.startswith(("batchnorm", "instancenorm")))
    else:
        check_channels_format(fmt, len(shape), where)
    got = shape[fmt.replace("B", "").index("C")]
    if got != channels:
        raise NormgenError(f"{where}: the C size of shape {shape} in format {fmt!r} is {got}, the module has {channels} channels")
    return fmt, shape


def _trailing_layout(normalized: tuple[int, ...], fmt: str | None, shape: list[int] | None,
                     input_shape: tuple[int, ...] | None, where: str) -> tuple[str, list[int], str]:
    """(format, shape, operation_dimension) of a LayerNorm or RMSNorm over the last
    ``len(normalized)`` dimensions. A format names the input's dimensions in order, B included."""
    k = len(normalized)
    if shape is None and input_shape is not None:
        if fmt is None:
            shape = list(input_shape[1:])
        else:
            if len(fmt) != len(input_shape):
                raise NormgenError(f"{where}: format {fmt!r} does not fit its input of shape {tuple(input_shape)}")
            shape = [d for ch, d in zip(fmt, input_shape, strict=True) if ch != "B"]
    if shape is None:
        shape = list(normalized)
    if len(shape) < k or tuple(shape[len(shape) - k:]) != tuple(normalized):
        raise NormgenError(
            f"{where}: shape {shape} does not end with the module's normalized_shape {list(normalized)}"
        )
    fmt, od = trailing_layout(shape, k, fmt, where)
    return fmt, shape, od


def _decay(module, where: str, *, needed: bool) -> float:
    m = module.momentum
    if m is None:
        if not needed:
            return 0.1
        tracked = getattr(module, "num_batches_tracked", None)
        n = int(tracked) if tracked is not None else 0
        raise NormgenError(
            f"{where}: momentum=None keeps a cumulative average (the next batch weighs 1/(num_batches_tracked + 1) ="
            f" 1/{n + 1}, a weight that changes with every batch), which a normgen layer's fixed mean_decay cannot"
            f" describe; predict does not depend on it: set module.momentum to a number (e.g. {1 / (n + 1):.6g})"
            " before from_torch"
        )
    return float(m)


def _layer(module, what: str, name: str, fmt: str | None, shape, input_shape, where: str) -> Layer:
    torch = _torch()
    dtype = _dtype(module)
    shape = None if shape is None else _sizes(shape, where)
    if what.startswith("batchnorm") or what.startswith("instancenorm"):
        channels = int(module.num_features)
        fmt, shape = _channels_first_layout(what, channels, fmt, shape, input_shape, where)
        affine = dict(scale=_array(module.weight), offset=_array(module.bias)) if module.affine else dict(affine="none")
        running = module.track_running_stats and module.running_mean is not None
        if what.startswith("batchnorm") and not running:
            raise NormgenError(
                f"{where}: track_running_stats=False: PyTorch normalizes with each batch's own statistics even in eval"
                " mode, which is normgen's batchnorm train_forward, not its predict; build the layer with"
                " normgen.BatchNorm and call train_forward, or train the module with track_running_stats=True"
            )
        if running and (what.startswith("batchnorm") or not module.training):
            # InstanceNorm with running statistics in eval mode: batch-norm predict on them
            decay = _decay(module, where, needed=what.startswith("batchnorm"))
            return BatchNorm(name=name, format=fmt, shape=shape, dtype=dtype, epsilon=float(module.eps),
                             trained_mean=_array(module.running_mean), trained_variance=_array(module.running_var),
                             mean_decay=decay, variance_decay=decay, running_variance="unbiased", **affine)
        return InstanceNorm(name=name, format=fmt, shape=shape, dtype=dtype, epsilon=float(module.eps), **affine)
    if what == "groupnorm":
        channels = int(module.num_channels)
        fmt, shape = _channels_first_layout(what, channels, fmt, shape, input_shape, where)
        affine = dict(scale=_array(module.weight), offset=_array(module.bias)) if module.affine else dict(affine="none")
        return GroupNorm(name=name, format=fmt, shape=shape, dtype=dtype, epsilon=float(module.eps),
                         num_groups=int(module.num_groups), **affine)
    # layernorm, rmsnorm: over the last len(normalized_shape) dimensions
    normalized = tuple(int(s) for s in module.normalized_shape)
    fmt, shape, od = _trailing_layout(normalized, fmt, shape, input_shape, where)
    k = len(normalized)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if weight is None:
        affine: dict[str, Any] = dict(affine="none")
    else:
        arrays = {"scale": _array(weight)} | ({"offset": _array(bias)} if bias is not None else {})
        if k == 1:
            arrays = {key: a.reshape(-1) for key, a in arrays.items()}
        affine = dict(affine="channel" if k == 1 else "element", bias=bias is not None, **arrays)
    if what == "layernorm":
        return LayerNorm(name=name, format=fmt, shape=shape, dtype=dtype, epsilon=float(module.eps),
                         operation_dimension=od, **affine)
    eps = module.eps
    if eps is None:  # PyTorch's default: the machine epsilon of the input's type
        eps = float(torch.finfo(getattr(torch, dtype)).eps)
    return RMSNorm(name=name, format=fmt, shape=shape, dtype=dtype, epsilon=float(eps), operation_dimension=od,
                   **affine)


def _input_shapes(torch, module, targets: dict[str, Any], example_input) -> dict[str, tuple[int, ...]]:
    """Run ``module`` once on ``example_input`` (in eval mode, without gradients, restoring every
    submodule's mode) and record each normalization module's input shape."""
    seen: dict[str, tuple[int, ...]] = {}
    hooks = []

    def hook_for(path):
        def hook(_mod, args, _out=None):
            if args and hasattr(args[0], "shape"):
                shape = tuple(int(s) for s in args[0].shape)
                if seen.setdefault(path, shape) != shape:
                    raise NormgenError(
                        f"module {path!r} ran on inputs of shapes {seen[path]} and {shape}; normgen fixes the sizes:"
                        " give shape= for it"
                    )
        return hook

    for path, mod in targets.items():
        hooks.append(mod.register_forward_pre_hook(hook_for(path)))
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        with torch.no_grad():
            module(*args)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return seen


def _pick(value, path: str):
    if isinstance(value, Mapping):
        return value.get(path)
    return value


def from_torch(module, *, format: str | Mapping[str, str] | None = None,
               shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
               name: str | None = None, example_input=None) -> Layer | list[Layer]:
    """A PyTorch normalization module → a normgen :class:`~normgen.Layer`; any other module (a
    container, a model) → the list of layers of the normalization modules inside it, in module
    order, named from their module paths (``layer1.0.bn1`` → ``layer1_0_bn1``, prefixed with
    ``name`` when given).

    ``format``: row-major letters of the input as it is stored (default: PyTorch's layout —
    ``"BCSS"`` for BatchNorm2d/InstanceNorm2d, ``"BC"``/``"BCT"`` for BatchNorm1d, GroupNorm
    ``"BC"`` and one S per further size, LayerNorm/RMSNorm the last k dimensions normalized;
    ``"BSSC"`` for channels_last). ``shape``: the input's sizes without the batch, in the
    format's order (default: the module's own sizes where they fix the input, e.g.
    LayerNorm(768) → [768]). For a model, ``format`` and ``shape`` may be dicts by module path,
    or ``example_input`` (a tensor or a tuple of them) is run once to find every input's shape.
    """
    torch = _torch()
    if not isinstance(module, torch.nn.Module):
        raise NormgenError(f"from_torch takes a torch.nn.Module, got {type(module).__name__}")
    classes = _classes(torch)
    what = _what(module, classes)
    if what is not None:
        targets = {"": module}
    else:
        targets = {}
        for path, mod in module.named_modules():
            kind = _what(mod, classes)
            if kind is not None:
                targets[path] = mod
            elif path and "norm" in type(mod).__name__.lower() and not any(True for _ in mod.children()):
                warnings.warn(
                    f"from_torch: module {path!r} ({type(mod).__name__}) is not a torch.nn normalization module;"
                    " skipped (build it with normgen's layer classes)", stacklevel=2)
        if not targets:
            raise NormgenError(f"{type(module).__name__} has no normalization module (BatchNorm, GroupNorm,"
                               " LayerNorm, InstanceNorm, RMSNorm) inside")
    if type(module).__name__.startswith("Lazy") or any(
            isinstance(getattr(m, "weight", None), torch.nn.parameter.UninitializedParameter) for m in targets.values()):
        raise NormgenError("a lazy module has no sizes yet: run it once on an input before from_torch")
    input_shapes = _input_shapes(torch, module, targets, example_input) if example_input is not None else {}
    if what is not None:
        default = c_identifier(type(module).__name__.lower(), "norm")
        layer_name = name if name is not None else default
        return _layer(module, what, layer_name, _pick(format, ""), _pick(shape, ""), input_shapes.get(""),
                      f"{type(module).__name__} {layer_name!r}")
    prefix = name or c_identifier(type(module).__name__.lower(), "model")
    names = []
    for path in targets:
        ident = c_identifier(path, prefix)
        names.append(f"{name}_{ident}" if name and not ident.startswith(f"{name}_") else ident)
    layers = []
    for (path, mod), layer_name in zip(targets.items(), distinct(names), strict=True):
        if path not in input_shapes and example_input is not None and _pick(shape, path) is None:
            raise NormgenError(f"module {path!r} did not run on example_input; give shape= for it")
        layers.append(_layer(mod, _what(mod, classes), layer_name, _pick(format, path), _pick(shape, path),
                             input_shapes.get(path), f"{type(mod).__name__} {path!r}"))
    return layers
