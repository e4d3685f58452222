"""Lowering an int8 layer (README "int8"): the plan templates/c/int8.c.j2 renders.

x and y are int8 with real = scale * (q - zero_point) (TFLite's asymmetric scheme, per tensor).
The statistics are exact integer sums of the quantized values: S = Σq and Q = Σq² (RMSNorm:
P = Σ(q - zp_in)²), so n·Q - S² is n² times the variance of q, exactly. The dequantized
variance is input_scale² times it; input_scale cancels between x - mean and the standard
deviation but for ε, which is divided by input_scale² at generation time. Each element is then

    centered:  v = (n·q - S) · t · g[c] + h[c],  t = 1 / (n · √((n·Q - S²) / n² + ε'))
    RMSNorm:   v = (q - zp_in) · t · g[c] + h[c],  t = 1 / √(P / n + ε')
    batchnorm: v = (q - zp_in) · a[c] + b[c]       (everything folded at generation time)

with ε' = ε / input_scale², g = γ / output_scale, h = β / output_scale, and
y = saturate(round_half_even(v) + output_zero_point). The statistics and the deviations are
integers; t and the multiply-add are float (single precision: an FPU's float, no double).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..description.layers import QUANT_FIELDS, Layer
from ..errors import NormgenError
from .plan import ONE, Extent, Function, Loop, Plan, lower_forward

#: Most elements one statistic may cover: n·Q and S² (at most 2^14·n² each) must fit int64_t, and
#: S (at most 2^7·n in magnitude) int32_t.
MAX_COUNT = 1 << 24
#: The smallest and largest ε' (ε / input_scale²) the float arithmetic takes: a positive normal
#: float, so that 1/√(var + ε') stays finite where the variance is 0 (ε' is clamped to them).
FLT_MIN = float(np.finfo(np.float32).tiny)
FLT_MAX = float(np.finfo(np.float32).max)


def flt(value: float) -> str:
    """A C float literal that rounds to exactly float32(value)."""
    text = repr(float(np.float32(value)))
    if "e" not in text and "." not in text:
        text += ".0"
    return text + "f"


def minus(zero_point: int) -> str:
    """q less a zero point, as text: "q", "q - 4", "q + 7"."""
    return "q" if zero_point == 0 else f"q {'-' if zero_point > 0 else '+'} {abs(zero_point)}"


@dataclass(frozen=True)
class Int8Plan:
    """Everything templates/c/int8.{h,c}.j2 need to spell out an int8 layer's predict."""

    base: Plan  # the float plan of the same layout: axes, offsets, channels, run-time sizes
    description: list[tuple[str, str]]
    input_scale: float
    input_zero_point: int
    output_scale: float
    output_zero_point: int
    #: batchnorm: "folded" (per-channel a, b); the others "centered" (mean and variance) or
    #: "mean_square" (RMSNorm)
    statistic: str
    arrays: dict[str, list[str]]  # name → float literals, plan.channels of them
    epsilon_literal: str  # ε' = ε / input_scale², clamped to [FLT_MIN, FLT_MAX], as a float
    count: Extent  # elements of one statistic
    count_guard: bool  # the count depends on run-time sizes: checked against MAX_COUNT at run time
    lo: str  # v is clamped to [lo, hi] before rounding: one step past the int8 range, less the zero point
    hi: str

    version: str = __version__
    max_count: int = MAX_COUNT

    # ---- names every C template shares -------------------------------------------------------
    @property
    def name(self) -> str:
        return self.base.name

    @property
    def upper(self) -> str:
        return self.base.upper

    @property
    def guard(self) -> str:
        return self.base.guard

    @property
    def channels(self) -> int:
        return self.base.channels

    @property
    def sizes(self) -> tuple[str, ...]:
        return self.base.sizes

    @property
    def per_batch(self) -> tuple[str, str]:
        return self.base.per_batch

    @property
    def format(self) -> str:
        return self.base.format

    @property
    def has_batch(self) -> bool:
        return self.base.has_batch

    @property
    def elements(self) -> Extent:
        return self.base.elements

    @property
    def size_locals(self) -> list[str]:
        return self.base.size_locals

    @property
    def size_guard(self) -> list[str]:
        return self.base.size_guard

    @property
    def quant_defines(self) -> list[tuple[str, str]]:
        """The header's NAME_INPUT_SCALE, ... macros: (suffix, value)."""
        return [("INPUT_SCALE", repr(self.input_scale)),
                ("INPUT_ZERO_POINT", f"({self.input_zero_point})"),
                ("OUTPUT_SCALE", repr(self.output_scale)),
                ("OUTPUT_ZERO_POINT", f"({self.output_zero_point})")]

    @property
    def functions(self) -> list[Function]:
        per = Extent(self.elements.static, False, self.elements.sizes).expr("batch", str)
        return [Function(
            "predict", f"{self.name}_predict", ["const int8_t *x", "int8_t *y", "int32_t batch", *self.base.size_args],
            ["x", "y"],
            f"Inference on int8 tensors: y = quantize(normalize(dequantize(x))). x and y hold batch * {per}"
            f" elements in format {self.format}; y may be x.\n"
            f" * x: real = {self.input_scale!r} * ({minus(self.input_zero_point)});"
            f" y: real = {self.output_scale!r} * ({minus(self.output_zero_point)}).",
            list(self.arrays))]

    @property
    def public_functions(self) -> list[Function]:
        return self.functions

    #: How the C functions take x and y, and what they pass the parameters as (none at run time).
    ctype = "int8_t"
    runtime_params = False
    parallel = "none"

    # ---- the loops ---------------------------------------------------------------------------
    @property
    def folded(self) -> bool:
        return self.statistic == "folded"

    @property
    def centered(self) -> bool:
        return self.statistic == "centered"

    @property
    def stat_loops(self) -> list[Loop]:
        """One iteration per statistic: the kept axes, in memory order."""
        return self.base.loops([a for a in self.base.axes if a.keep])

    @property
    def reduced_loops(self) -> list[Loop]:
        """The elements of one statistic: the reduced axes, in memory order."""
        return self.base.loops([a for a in self.base.axes if not a.keep])

    @property
    def offset_expr(self) -> str:
        return self.base.offset_expr

    @property
    def channel_expr(self) -> str:
        return self.base.channel_expr

    @property
    def apply_loops(self) -> list[Loop]:
        return self.base.apply_loops

    @property
    def apply_offset_expr(self) -> str:
        return self.base.apply_offset_expr

    @property
    def apply_channel_expr(self) -> str:
        return self.base.apply_channel_expr

    @property
    def count_expr(self) -> str:
        return self.count.expr()

    @property
    def arithmetic(self) -> str:
        """What runs in integers and what in float, for ``normgen show``."""
        if self.folded:
            return "x - zero_point in integers; one float multiply-add per element, rounded and saturated"
        sums = "sum(q), sum(q^2)" if self.centered else "sum((q - zp)^2)"
        return (f"statistics exact in integers ({sums}); 1/sqrt per statistic and one float multiply-add"
                " per element, rounded (ties to even) and saturated")

    @property
    def normalize_comment(self) -> str:
        d = "(n * q - S)" if self.centered else f"({minus(self.input_zero_point)})"
        return f"y = {d} * t * g + h, quantized (g = scale / output_scale, h = offset / output_scale)"

    @property
    def stat_comment(self) -> str:
        what = "S = sum(q), Q = sum(q^2)" if self.centered else f"P = sum(({minus(self.input_zero_point)})^2)"
        return f"{what} of each statistic {self.base.statistic_per} over {self.base.statistic_over}, in integers"


def lower_int8(layer: Layer) -> Int8Plan:
    """An int8 layer → its plan (C target only)."""
    if layer.dtype != "int8":
        raise NormgenError(f"layer {layer.name!r}: lower_int8 is for dtype 'int8', not {layer.dtype!r}")
    base = lower_forward(layer.replace(dtype="float32", **dict.fromkeys(QUANT_FIELDS)), "c")
    s_in, s_out = layer.input_scale, layer.output_scale
    zp_out = layer.output_zero_point
    gamma, beta = layer.scale_values, layer.offset_values
    if layer.kind == "batchnorm":
        inv = 1.0 / np.sqrt(layer.trained_variance_values + layer.epsilon)
        arrays = {"a": gamma * inv * (s_in / s_out), "b": (beta - gamma * layer.trained_mean_values * inv) / s_out}
        statistic = "folded"
    else:
        arrays = {"g": gamma / s_out, "h": beta / s_out}
        statistic = "centered" if base.centered else "mean_square"
    count = ONE
    for a in base.axes:
        if not a.keep:
            count = count * a.extent
    if statistic != "folded" and not count.dynamic and count.static > MAX_COUNT:
        raise NormgenError(
            f"layer {layer.name!r}: dtype 'int8' takes statistics over at most {MAX_COUNT} elements (2^24: their"
            f" integer sums n*sum(q^2) - sum(q)^2 must fit int64_t); each of this layer's covers {count.static}"
        )
    eps = min(max(layer.epsilon / (s_in * s_in), FLT_MIN), FLT_MAX)
    return Int8Plan(
        base=base,
        description=layer.describe(),
        input_scale=s_in,
        input_zero_point=layer.input_zero_point,
        output_scale=s_out,
        output_zero_point=zp_out,
        statistic=statistic,
        arrays={k: [flt(v) for v in arr] for k, arr in arrays.items()},
        epsilon_literal=flt(eps),
        count=count,
        count_guard=statistic != "folded" and count.dynamic,
        lo=flt(-129 - zp_out),
        hi=flt(128 - zp_out),
    )
