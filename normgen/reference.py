"""The NumPy reference: the single definition of what every generated function computes.

Everything is computed in float64, whatever the layer's dtype. Arrays are shaped in the
layer's row-major ``format`` with the B dimension (when the format has one) of any size.
"""

from __future__ import annotations

import math

import numpy as np

from .description.dtypes import round_to
from .description.kinds import reduced_letters, semantics  # kind semantics: description/kinds.py
from .description.layers import QUANT_FIELDS, Layer
from .errors import NormgenError


def full_shape(layer: Layer, batch: int, sizes: dict[str, int] | None = None) -> tuple[int, ...]:
    """The shape of x (and y) for a batch size (and the run-time sizes), in ``format`` order."""
    dims = list(layer.at_sizes(sizes or {}).dims) if layer.sizes else list(layer.dims)
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
    sizes = layer.sizes_of(x.shape)
    if (len(sizes) != len(layer.sizes) or any(v < 1 for v in sizes.values())
            or x.shape != full_shape(layer, batch, sizes) or batch < 1):
        want = list(layer.dims)
        if layer.fmt.has_batch:
            want.insert(letters.index("B"), "batch")
        raise NormgenError(
            f"layer {layer.name!r}: input of shape {tuple(x.shape)} does not fit format {letters} "
            f"with shape {tuple(want)}"
        )
    return batch


def bind(layer: Layer, x: np.ndarray) -> Layer:
    """The layer with its run-time sizes taken from x's shape (checked as :func:`batch_of` does)."""
    batch_of(layer, x)
    return layer.at_sizes(layer.sizes_of(np.shape(x))) if layer.sizes else layer


def grouped_view(layer: Layer, x: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], int]:
    """x reshaped so that each statistic is a reduction over a set of axes.

    Returns (view, reduced axes, axis of C in the view). For group norm the C axis is split into
    (G, C/G) and the C/G axis is reduced; the returned channel axis is then the G axis.
    """
    letters = layer.fmt.letters
    reduce = reduced_letters(layer)
    axes = [i for i, ch in enumerate(letters) if ch in reduce]
    c = letters.index("C")
    if not semantics(layer).grouped:
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
    in the grouped view (so they broadcast against it). RMSNorm (statistic ``mean_square``):
    a mean of 0 and the mean of x², so that every kind normalizes as (x − mean)/√(var + ε).
    An int8 layer's are those of the dequantized x."""
    layer = bind(layer, x)
    if layer.dtype == "int8":
        return statistics(_real(layer), layer.dequantize(int8_input(layer, x)))
    x = np.asarray(x, dtype=np.float64)
    view, axes, _ = grouped_view(layer, x)
    if not semantics(layer).centered:
        square = (view * view).mean(axis=axes, keepdims=True)
        return np.zeros_like(square), square
    mean = view.mean(axis=axes, keepdims=True)
    var = ((view - mean) ** 2).mean(axis=axes, keepdims=True)
    return mean, var


def count(layer: Layer, batch: int, sizes: dict[str, int] | None = None) -> int:
    """How many elements each statistic is taken over, for a batch size (and run-time sizes)."""
    layer = layer.at_sizes(sizes or {}) if layer.sizes else layer
    x = np.empty(full_shape(layer, batch), dtype=np.uint8)
    view, axes, _ = grouped_view(layer, x)
    return int(np.prod([view.shape[a] for a in axes]))


def _affine_shape(layer: Layer, ndim: int) -> tuple[int, ...]:
    """The shape γ and β broadcast with against x: (…, C, …) per channel (and without affine,
    whose γ = 1, β = 0 are per channel); per element, the normalized dimensions in place."""
    if layer.affine != "element":
        return _channel_shape(layer, ndim)
    normalized = layer.normalized_letters()
    dims = iter(layer.dims)
    return tuple(1 if ch == "B" else (d if ch in normalized else 1)
                 for ch, d in ((ch, 1 if ch == "B" else next(dims)) for ch in layer.fmt.letters))


def _param_sum(layer: Layer, a: np.ndarray) -> np.ndarray:
    """Sum over everything a parameter is shared by: one value per channel, or per element of
    the normalized dimensions (element affine), flattened."""
    if layer.affine != "element":
        return _channel_sum(layer, a)
    shape = _affine_shape(layer, a.ndim)
    return a.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1)).reshape(-1)


def _normalize(layer: Layer, x: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    view, _, _ = grouped_view(layer, x)
    z = ((view - mean) / np.sqrt(var + layer.epsilon)).reshape(x.shape)
    ps = _affine_shape(layer, x.ndim)
    return z * layer.scale_values.reshape(ps) + layer.offset_values.reshape(ps)


def predict(layer: Layer, x: np.ndarray, *, residual: np.ndarray | None = None,
            mod_shift: np.ndarray | None = None, mod_scale: np.ndarray | None = None) -> np.ndarray:
    """Inference: batch norm with its trained statistics; the other kinds with each
    instance's own statistics. A fused layer (README "Fused forms") normalizes h = x + residual
    and applies its modulation and activation after the affine (:func:`fused_output`).

    An int8 layer (README "int8") takes and returns int8 arrays: x is dequantized in float64
    (input_scale * (q - input_zero_point)), normalized as above, and y quantized (y / output_scale
    rounded to nearest, ties to even, plus output_zero_point, saturated to [-128, 127])."""
    layer = bind(layer, x)
    if layer.dtype == "int8":
        return layer.quantize(predict(_real(layer), layer.dequantize(int8_input(layer, x))))
    x = fused_input(layer, x, residual)
    mod = modulation_inputs(layer, x, mod_shift, mod_scale)
    if semantics(layer).trained_statistics:
        cs = _channel_shape(layer, x.ndim)
        mean = layer.trained_mean_values.reshape(cs)
        var = layer.trained_variance_values.reshape(cs)
        return fused_output(layer, _normalize(layer, x, mean, var), *mod)
    mean, var = statistics(layer, x)
    return fused_output(layer, _normalize(layer, x, mean, var), *mod)


def int8_input(layer: Layer, q: np.ndarray) -> np.ndarray:
    """An int8 layer's x: int8 values (any integer type holding values in [-128, 127])."""
    q = np.asarray(q)
    if q.dtype.kind not in "iu" or (q.size and (int(q.min()) < -128 or int(q.max()) > 127)):
        what = f"{q.dtype} values" if q.dtype.kind not in "iu" else f"values from {int(q.min())} to {int(q.max())}"
        raise NormgenError(f"layer {layer.name!r} has dtype 'int8': x must hold int8 values, got {what}")
    return q


def _real(layer: Layer) -> Layer:
    """The float64 layer an int8 layer computes between its dequantized x and its quantized y."""
    return layer.replace(dtype="float64", **dict.fromkeys(QUANT_FIELDS))


def _float_only(layer: Layer, function: str) -> None:
    if layer.dtype == "int8":
        raise NormgenError(f"layer {layer.name!r} has dtype 'int8', an inference format: it has predict only, not {function}")


def train_forward(
    layer: Layer, x: np.ndarray, running_mean: np.ndarray | None = None, running_var: np.ndarray | None = None, *,
    residual: np.ndarray | None = None, mod_shift: np.ndarray | None = None, mod_scale: np.ndarray | None = None,
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
    _float_only(layer, "train_forward")
    batch = batch_of(layer, x)
    layer = bind(layer, x)
    x = fused_input(layer, x, residual)
    mod = modulation_inputs(layer, x, mod_shift, mod_scale)
    rm = layer.trained_mean_values if running_mean is None else np.asarray(running_mean, dtype=np.float64)
    rv = layer.trained_variance_values if running_var is None else np.asarray(running_var, dtype=np.float64)
    mean, var = statistics(layer, x)
    y = fused_output(layer, _normalize(layer, x, mean, var), *mod)
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


# ---- training: backward, parameter update, population statistics (docs/training.md) ---------


def _channel_sum(layer: Layer, a: np.ndarray) -> np.ndarray:
    """Sum over every axis but C: one value per channel."""
    c = layer.fmt.letters.index("C")
    return np.moveaxis(a, c, 0).reshape(layer.channels, -1).sum(axis=1)


def _pair(layer: Layer, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    batch_of(layer, x)  # callers bind the layer to x's run-time sizes first
    dy = np.asarray(dy)
    if dy.shape != np.shape(x):
        raise NormgenError(f"layer {layer.name!r}: dy has shape {tuple(dy.shape)}, x has {tuple(np.shape(x))}")
    return np.asarray(x, dtype=np.float64), np.asarray(dy, dtype=np.float64)


def saved_statistics(layer: Layer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The statistics a training forward saves for :func:`backward_saved`: (mean, 1/sqrt(var + ε)),
    one per statistic, flattened row-major over the kept dimensions in format order (group norm:
    its group index in place of C). Batch norm: one per channel."""
    mean, var = statistics(layer, x)
    return mean.reshape(-1), (1.0 / np.sqrt(var + layer.epsilon)).reshape(-1)


def backward_saved(
    layer: Layer, x: np.ndarray, dy: np.ndarray, saved_mean: np.ndarray, saved_invstd: np.ndarray, *,
    dh: np.ndarray | None = None, mod_shift: np.ndarray | None = None, mod_scale: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """:func:`backward` with the statistics given (as :func:`saved_statistics` lays them out)
    instead of recomputed from x.

    A fused layer (README "Fused forms"): x is h, what the forward normalized (x + residual);
    dx is the gradient of both x and residual, plus ``dh`` (the gradient reaching h from its
    other use) where the layer has residual_out; with an activation or a modulation, dy is the
    gradient of the activated output, and with a modulation the result also holds
    (dmod_shift, dmod_scale), the gradients of mod_shift and mod_scale ([batch, C])."""
    _float_only(layer, "a backward")
    layer = bind(layer, x)
    x, dy = _pair(layer, x, dy)
    mean0, _ = statistics(layer, x)  # only for its broadcast shape
    mean = np.asarray(saved_mean, dtype=np.float64).reshape(mean0.shape)
    inv = np.asarray(saved_invstd, dtype=np.float64).reshape(mean0.shape)
    view, axes, _ = grouped_view(layer, x)
    xhat_v = (view - mean) * inv
    xhat = xhat_v.reshape(x.shape)
    mod_grads: tuple[np.ndarray, ...] = ()
    if layer.activation != "none" or layer.modulation != "none":
        ps = _affine_shape(layer, x.ndim)
        z = xhat * layer.scale_values.reshape(ps) + layer.offset_values.reshape(ps)
        mod = modulation_inputs(layer, x, mod_shift, mod_scale)
        dy = dy * activation_grad(layer.activation, _modulate(z, *mod))  # the gradient of the modulated z
        if layer.modulation != "none":
            mod_grads = (_batch_channel_sum(layer, dy), _batch_channel_sum(layer, dy * z))
            dy = dy * (1 + mod[1])
    dz = dy * layer.scale_values.reshape(_affine_shape(layer, x.ndim))  # dL/dxhat
    dz_v, _, _ = grouped_view(layer, dz)
    inner = dz_v - xhat_v * (dz_v * xhat_v).mean(axis=axes, keepdims=True)
    if semantics(layer).centered:
        inner = inner - dz_v.mean(axis=axes, keepdims=True)
    dx = (inv * inner).reshape(x.shape)
    if layer.residual_out:
        if dh is None or np.shape(dh) != x.shape:
            raise NormgenError(f"layer {layer.name!r} has residual_out: dh must be shaped like x {tuple(x.shape)}"
                               f"{'' if dh is None else f', got {tuple(np.shape(dh))}'}")
        dx = dx + np.asarray(dh, dtype=np.float64)
    return (dx, _param_sum(layer, dy * xhat), _param_sum(layer, dy), *mod_grads)


def backward(layer: Layer, x: np.ndarray, dy: np.ndarray, **fused: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """The gradient of the training-mode forward (batch statistics for batch norm; each
    instance's own statistics for the other kinds): (dx, dscale, doffset).

    With x̂ = (x − μ)·r, r = 1/√(σ² + ε), y = γ_c·x̂ + β_c and g = γ_c·dy (dL/dx̂), over the n
    elements of each statistic::

        dx       = r · (g − mean(g) − x̂ · mean(g · x̂))
        dscale_c = Σ dy · x̂      (over every element of channel c)
        doffset_c = Σ dy

    RMSNorm (μ = 0, σ² = mean(x²)) drops the mean(g) term: dx = r · (g − x̂ · mean(g · x̂)).
    Element affine: γ, β, dscale and doffset per element of the normalized dimensions (summed
    over everything else). Layers without a scale or offset still get their gradients here.

    A statistic over a single element has x̂ = 0 and dx = 0 (y = β does not depend on x).
    A fused layer's x and ``fused`` (dh, mod_shift, mod_scale) are as :func:`backward_saved` takes them.
    """
    mean, inv = saved_statistics(layer, x)
    return backward_saved(layer, x, dy, mean, inv, **fused)


def backward_frozen(layer: Layer, x: np.ndarray, dy: np.ndarray, *,
                    dh: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch norm with its trained statistics held fixed (inference-mode forward):
    dx = dy·γ_c·r_c, dscale_c = Σ dy·(x − μ_c)·r_c, doffset_c = Σ dy, r_c = 1/√(σ²_c + ε).
    A residual layer: x is h, and ``dh`` adds to dx (residual_out), as :func:`backward_saved`."""
    if layer.kind != "batchnorm":
        raise NormgenError(f"backward_frozen is for batch norm; layer {layer.name!r} is {layer.kind}")
    _float_only(layer, "backward_frozen")
    layer = bind(layer, x)
    x, dy = _pair(layer, x, dy)
    cs = _channel_shape(layer, x.ndim)
    inv = (1.0 / np.sqrt(layer.trained_variance_values + layer.epsilon)).reshape(cs)
    xhat = (x - layer.trained_mean_values.reshape(cs)) * inv
    dx = dy * layer.scale_values.reshape(cs) * inv
    if layer.residual_out:
        dx = dx + np.asarray(dh, dtype=np.float64)
    return dx, _channel_sum(layer, dy * xhat), _channel_sum(layer, dy)


def sgdm_update(
    layer: Layer,
    scale: np.ndarray,
    offset: np.ndarray,
    dscale: np.ndarray,
    doffset: np.ndarray,
    velocity_scale: np.ndarray,
    velocity_offset: np.ndarray,
    *,
    learn_rate: float,
    l2: float,
    momentum: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One step of MATLAB's 'sgdm' on scale and offset, with the layer's learn-rate and L2 factors.

    For p in (scale, offset) with factors f_lr (ScaleLearnRateFactor / OffsetLearnRateFactor) and
    f_l2 (ScaleL2Factor / OffsetL2Factor)::

        v ← momentum · v − learn_rate · f_lr · (dp + l2 · f_l2 · p)
        p ← p + v

    Returns (scale, offset, velocity_scale, velocity_offset), the new values.
    """
    out = []
    for p, g, v, f_lr, f_l2 in (
        (scale, dscale, velocity_scale, layer.scale_learn_rate_factor, layer.scale_l2_factor),
        (offset, doffset, velocity_offset, layer.offset_learn_rate_factor, layer.offset_l2_factor),
    ):
        p, g, v = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (p, g, v))
        for name, a in (("parameter", p), ("gradient", g), ("velocity", v)):
            if a.size != layer.param_count:
                raise NormgenError(f"layer {layer.name!r}: {name} has {a.size} values; it needs {layer.param_count}")
        v = momentum * v - learn_rate * f_lr * (g + l2 * f_l2 * p)
        out.append((p + v, v))
    (new_scale, new_vs), (new_offset, new_vo) = out
    return new_scale, new_offset, new_vs, new_vo


def population_empty(layer: Layer) -> tuple[float, np.ndarray, np.ndarray]:
    """An empty population accumulator: (count, per-channel mean, per-channel M2)."""
    return 0.0, np.zeros(layer.channels), np.zeros(layer.channels)


def population_accumulate(
    layer: Layer, state: tuple[float, np.ndarray, np.ndarray], x: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Merge one batch into a population accumulator (batch norm: per channel over B, S, T, U).

    The batch's own mean m_b and M2_b (two-pass) merge by Chan et al.'s formula::

        δ = m_b − m,  N = n + n_b
        m  ← m + δ · n_b / N
        M2 ← M2 + M2_b + δ² · n · n_b / N
        n  ← N
    """
    if layer.kind != "batchnorm":
        raise NormgenError(f"population statistics are for batch norm; layer {layer.name!r} is {layer.kind}")
    batch = batch_of(layer, x)
    layer = bind(layer, x)
    n, mean, m2 = state
    bmean, bvar = statistics(layer, x)
    nb = float(count(layer, batch))
    bmean, bm2 = bmean.reshape(-1), bvar.reshape(-1) * nb
    total = n + nb
    delta = bmean - mean
    return total, mean + delta * (nb / total), m2 + bm2 + delta * delta * (n * nb / total)


def population_finalize(layer: Layer, state: tuple[float, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(trained mean, trained variance) from an accumulator: the mean of everything accumulated
    and its variance, M2/(n − 1) for ``running_variance="unbiased"`` or M2/n for "biased"."""
    n, mean, m2 = state
    unbiased = layer.running_variance == "unbiased"
    if n < (2 if unbiased else 1):
        raise NormgenError(
            f"layer {layer.name!r}: population statistics need at least {2 if unbiased else 1} values per channel,"
            f" {int(n)} accumulated"
        )
    return mean.copy(), m2 / (n - 1 if unbiased else n)


# ---- fused forms (README "Fused forms") -----------------------------------------------------

#: The activations: y = f(z), applied after the affine (and the modulation), and f'(z).
_SQRT_2_PI = math.sqrt(2.0 / math.pi)
_erf = np.vectorize(math.erf, otypes=[np.float64])


def activate(name: str, z: np.ndarray) -> np.ndarray:
    """relu, silu (z·σ(z)), gelu (z·Φ(z), erf form) or gelu_tanh (PyTorch's approximate='tanh')."""
    if name == "none":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * z * (1.0 + np.tanh(_SQRT_2_PI * (z + 0.044715 * z ** 3)))
    raise NormgenError(f"unknown activation {name!r}")


def activation_grad(name: str, z: np.ndarray) -> np.ndarray:
    """f'(z) of :func:`activate` (relu: 0 at z <= 0, as PyTorch)."""
    if name == "none":
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + _erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    if name == "gelu_tanh":
        t = np.tanh(_SQRT_2_PI * (z + 0.044715 * z ** 3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_PI * (1.0 + 3 * 0.044715 * z * z)
    raise NormgenError(f"unknown activation {name!r}")


def fused_input(layer: Layer, x: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
    """What a layer normalizes, in float64: x, or h = x + residual (``residual``), rounded to the
    layer's dtype as the tensor h it is (and as PyTorch's x + residual is)."""
    x = np.asarray(x, dtype=np.float64)
    if not layer.residual:
        if residual is not None:
            raise NormgenError(f"layer {layer.name!r} has no residual input (residual = false)")
        return x
    if residual is None or np.shape(residual) != x.shape:
        raise NormgenError(f"layer {layer.name!r} has residual = true: residual must be shaped like x {tuple(x.shape)}"
                           f"{'' if residual is None else f', got {tuple(np.shape(residual))}'}")
    return round_to(x + np.asarray(residual, dtype=np.float64), layer.dtype)


def _batch_channel_shape(layer: Layer, ndim: int) -> tuple[int, ...]:
    """How a [batch, C] array broadcasts against x: B and C in place, 1 elsewhere."""
    letters = layer.fmt.letters
    return tuple(-1 if ch == "B" else layer.channels if ch == "C" else 1 for ch in letters[:ndim])


def modulation_inputs(layer: Layer, x: np.ndarray, shift: np.ndarray | None,
                      scale: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | tuple[()]:
    """adaLN's (shift, scale), each [batch, C], shaped to broadcast against x; () without one."""
    if layer.modulation == "none":
        if shift is not None or scale is not None:
            raise NormgenError(f"layer {layer.name!r} has no modulation (modulation = 'none')")
        return ()
    batch = batch_of(layer, x)
    out = []
    for name, a in (("mod_shift", shift), ("mod_scale", scale)):
        if a is None or np.size(a) != batch * layer.channels:
            raise NormgenError(f"layer {layer.name!r} has modulation {layer.modulation!r}: {name} must hold"
                               f" [batch, C] = [{batch}, {layer.channels}] values"
                               f"{'' if a is None else f', got shape {tuple(np.shape(a))}'}")
        a = np.asarray(a, dtype=np.float64).reshape(batch, layer.channels)
        if _channel_first(layer):
            a = a.T
        out.append(a.reshape(_batch_channel_shape(layer, x.ndim)))
    return out[0], out[1]


def _modulate(z: np.ndarray, shift: np.ndarray | None = None, scale: np.ndarray | None = None) -> np.ndarray:
    return z if shift is None else z * (1.0 + scale) + shift


def fused_output(layer: Layer, z: np.ndarray, shift: np.ndarray | None = None,
                 scale: np.ndarray | None = None) -> np.ndarray:
    """The layer's output from its affine output z: act(z · (1 + scale) + shift)."""
    return activate(layer.activation, _modulate(z, shift, scale))


def _batch_channel_sum(layer: Layer, a: np.ndarray) -> np.ndarray:
    """Sum over everything but B and C: [batch, C], flattened."""
    letters = layer.fmt.letters
    keep = [i for i, ch in enumerate(letters) if ch in "BC"]
    out = a.sum(axis=tuple(i for i in range(a.ndim) if i not in keep))
    return (out.T if _channel_first(layer) else out).reshape(-1)


def _channel_first(layer: Layer) -> bool:
    """Whether C comes before B in the format (a [batch, C] array is then transposed to it)."""
    letters = layer.fmt.letters
    return layer.fmt.has_batch and letters.index("C") < letters.index("B")
