"""The NumPy reference: the single definition of what every generated function computes.

Everything is computed in float64, whatever the layer's dtype. Arrays are shaped in the
layer's row-major ``format`` with the B dimension (when the format has one) of any size.
"""

from __future__ import annotations

import numpy as np

from .errors import NormgenError
from .layers import Layer

#: Letters reduced by each kind (DESIGN.md §3). Group norm also reduces the C/G channels of
#: each group; that split is applied in :func:`grouped_view`.
REDUCED_LETTERS = {
    "batchnorm": "BSTU",
    "groupnorm": "STU",
    "instancenorm": "STU",
    ("layernorm", "channel-only"): "C",
    ("layernorm", "spatial-channel"): "SUC",
    ("layernorm", "batch-excluded"): "SCTU",
}


def reduced_letters(layer: Layer) -> str:
    """The dimension letters whose positions share one statistic."""
    if layer.kind == "layernorm":
        return REDUCED_LETTERS[("layernorm", layer.resolved_dimension)]
    return REDUCED_LETTERS[layer.kind]


def full_shape(layer: Layer, batch: int) -> tuple[int, ...]:
    """The shape of x (and y) for a batch size, in ``format`` order."""
    dims = list(layer.dims)
    if layer.fmt.has_batch:
        dims.insert(layer.fmt.letters.index("B"), batch)
    elif batch != 1:
        raise NormgenError(f"layer {layer.name!r} has no B dimension in format {layer.fmt}; batch must be 1, got {batch}")
    return tuple(dims)


def batch_of(layer: Layer, x: np.ndarray) -> int:
    """The batch size of an array shaped for ``layer``; an error naming both shapes otherwise."""
    x = np.asarray(x)
    letters = layer.fmt.letters
    batch = x.shape[letters.index("B")] if layer.fmt.has_batch and x.ndim == len(letters) else 1
    if x.shape != full_shape(layer, batch) or batch < 1:
        want = list(layer.dims)
        if layer.fmt.has_batch:
            want.insert(letters.index("B"), "batch")
        raise NormgenError(
            f"layer {layer.name!r}: input of shape {tuple(x.shape)} does not fit format {letters} "
            f"with shape {tuple(want)}"
        )
    return batch


def grouped_view(layer: Layer, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], int]:
    """x reshaped so that each statistic is a reduction over a set of axes.

    Returns (view, reduced axes, axis of C in the view). For group norm the C axis is split into
    (G, C/G) and the C/G axis is reduced; the returned channel axis is then the G axis.
    """
    letters = layer.fmt.letters
    reduce = reduced_letters(layer)
    axes = [i for i, ch in enumerate(letters) if ch in reduce]
    c = letters.index("C")
    if layer.kind != "groupnorm":
        return x, tuple(axes), c
    g = layer.groups
    shape = x.shape[:c] + (g, layer.channels // g) + x.shape[c + 1:]
    view = x.reshape(shape)
    axes = [a if a < c else a + 1 for a in axes] + [c + 1]
    return view, tuple(sorted(axes)), c


def _channel_shape(layer: Layer, ndim: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[layer.fmt.letters.index("C")] = layer.channels
    return tuple(shape)


def statistics(layer: Layer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased (1/n) variance of each statistic, with the reduced axes kept as size 1
    in the grouped view (so they broadcast against it)."""
    batch_of(layer, x)
    x = np.asarray(x, dtype=np.float64)
    view, axes, _ = grouped_view(layer, x)
    mean = view.mean(axis=axes, keepdims=True)
    var = ((view - mean) ** 2).mean(axis=axes, keepdims=True)
    return mean, var


def count(layer: Layer, batch: int) -> int:
    """How many elements each statistic is taken over, for a batch size."""
    x = np.empty(full_shape(layer, batch), dtype=np.uint8)
    view, axes, _ = grouped_view(layer, x)
    return int(np.prod([view.shape[a] for a in axes]))


def _normalize(layer: Layer, x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    view, _, _ = grouped_view(layer, x)
    z = ((view - mean) / np.sqrt(var + layer.epsilon)).reshape(x.shape)
    cs = _channel_shape(layer, x.ndim)
    return z * layer.scale_values.reshape(cs) + layer.offset_values.reshape(cs)


def predict(layer: Layer, x: np.ndarray) -> np.ndarray:
    """Inference: batch norm with its trained statistics; the other kinds with each
    instance's own statistics."""
    batch_of(layer, x)
    x = np.asarray(x, dtype=np.float64)
    if layer.kind == "batchnorm":
        cs = _channel_shape(layer, x.ndim)
        mean = layer.trained_mean_values.reshape(cs)
        var = layer.trained_variance_values.reshape(cs)
        return _normalize(layer, x, mean, var)
    mean, var = statistics(layer, x)
    return _normalize(layer, x, mean, var)


def train_forward(
    layer: Layer, x: np.ndarray, running_mean: np.ndarray | None = None, running_var: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch norm's training forward: normalize with the batch's own mean and biased variance;
    return (y, updated running mean, updated running variance).

    The update weights the new batch value by the decay (MATLAB MeanDecay/VarianceDecay,
    PyTorch momentum); the variance folded in is unbiased (n/(n-1)) or biased by the layer's
    ``running_variance``. With batch statistics over a single element the unbiased variance
    is undefined; like PyTorch, that raises.
    """
    if layer.kind != "batchnorm":
        raise NormgenError(f"train_forward is for batch norm; layer {layer.name!r} is {layer.kind}")
    batch = batch_of(layer, x)
    x = np.asarray(x, dtype=np.float64)
    rm = layer.trained_mean_values if running_mean is None else np.asarray(running_mean, dtype=np.float64)
    rv = layer.trained_variance_values if running_var is None else np.asarray(running_var, dtype=np.float64)
    mean, var = statistics(layer, x)
    y = _normalize(layer, x, mean, var)
    n = count(layer, batch)
    bm, bv = mean.reshape(-1), var.reshape(-1)
    if layer.running_variance == "unbiased":
        if n < 2:
            raise NormgenError(
                f"layer {layer.name!r}: the unbiased running variance needs more than 1 value per channel, got {n}"
            )
        bv = bv * (n / (n - 1))
    new_rm = layer.mean_decay * bm + (1.0 - layer.mean_decay) * rm
    new_rv = layer.variance_decay * bv + (1.0 - layer.variance_decay) * rv
    return y, new_rm, new_rv
