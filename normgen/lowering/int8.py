"""Lowering an int8 layer (README "int8"): the plan that templates/c/int8.h.j2 and
int8.c.j2 (float arithmetic) or int8_fixed.c.j2 (integer arithmetic) render.

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

``arithmetic = "integer"`` computes the same in fixed point, with no float at run time (cores
without an FPU). Both forms above are d / √M · g + h with an integer d and M: centered,
d = n·q − S and M = n·Q − S² + n²·ε'; RMSNorm, d = n·(q − zp_in) and M = n·P + n²·ε'. Per
statistic, M·2^16 (n²·ε'·2^16 from a fixed-point ε') is shifted left by 2s bits into
[2^60, 2^62), its integer square root taken (in [2^30, 2^31)) and inverted (inv = 2^62 / √);
per element x̂ = d·inv >> (32 − s) has XHAT_FRAC (22) fraction bits and v = (x̂·G >> shift) + H
has V_FRAC (24), with G (g, one exponent for all) and H (h) fixed-point constants. Batch norm folds into v = (q − zp_in)·A + B.
v is rounded to the nearest integer, ties to even, in integers. Every product fits int64_t for
statistics of at most 2^16 elements and |g|, |h|, |a|, |b| below 2^24, which lowering checks.
"""

from __future__ import annotations

import math
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
#: arithmetic = "integer": most elements of one statistic (d below 2^24, n·Q below 2^46) and the
#: bound on the folded constants' magnitudes (their fixed-point forms fit the products' int64_t).
MAX_COUNT_INTEGER = 1 << 16
MAX_CONSTANT = float(1 << 24)
#: Fraction bits of x̂ and of v (v: the centered and RMS kinds; batch norm's are FOLD_FRAC at most).
XHAT_FRAC = 22
V_FRAC = 24
FOLD_FRAC = 32
#: The largest n²·ε'·2^16 added to M·2^16 (both fit uint64_t together).
EPS_LIMIT = 1 << 62


@dataclass(frozen=True)
class Fixed:
    """The fixed-point constants of arithmetic = "integer" (module docstring)."""

    arrays: dict[str, tuple[str, list[str]]]  # name → (C type, integer literals)
    frac: int  # fraction bits of v
    shift: int  # centered and RMS: x̂·G >> shift has frac fraction bits
    eps_term: str  # C expression: n²·ε'·2^16 from n2 (uint64_t n·n), rounded
    lo: str  # v is clamped to [lo, hi] (one step past the int8 range, less the zero point, in v's units)
    hi: str
    bias: str  # 512 in v's units: v + bias >= 0 after the clamp, and even, so parity is kept
    half: str  # 2^(frac - 1)
    mask: str  # 2^frac - 1


def _int_literal(value: int, ctype: str) -> str:
    suffix = {"int32_t": "", "int64_t": "LL"}[ctype]
    if ctype == "int32_t":
        return str(value) if value != -(1 << 31) else "(-2147483647 - 1)"
    return f"{value}{suffix}" if value >= 0 else f"({value}{suffix})"


def _exponent(values: np.ndarray) -> int:
    """e with max |values| < 2^e (0 for none or all zero)."""
    top = float(np.max(np.abs(values))) if values.size else 0.0
    return math.frexp(top)[1] if top > 0 else 0


def _fixed(layer: Layer, arrays: dict[str, np.ndarray], folded: bool, zp_out: int) -> Fixed:
    where = f"layer {layer.name!r}: arithmetic 'integer'"
    for name, arr in arrays.items():
        big = np.flatnonzero(np.abs(arr) >= MAX_CONSTANT)
        if big.size:
            what = {"g": "scale / output_scale", "h": "offset / output_scale", "a": "the folded multiplier",
                    "b": "the folded offset"}[name]
            raise NormgenError(f"{where} takes constants below 2^24 in magnitude; {what} is {float(arr[big[0]])!r}"
                               f" at index {big[0]} (use arithmetic = 'float')")
    if folded:
        frac = min(FOLD_FRAC, 30 - _exponent(arrays["a"]))
        a = np.rint(arrays["a"] * 2.0**frac).astype(np.int64)
        b = np.rint(arrays["b"] * 2.0**frac).astype(np.int64)
        lits = {"a": ("int32_t", [_int_literal(int(v), "int32_t") for v in a]),
                "b": ("int64_t", [_int_literal(int(v), "int64_t") for v in b])}
        shift = 0
        eps_term = "0"
    else:
        frac = V_FRAC
        gfrac = min(60, 30 - _exponent(arrays["g"]))
        g = np.rint(arrays["g"] * 2.0**gfrac).astype(np.int64)
        h = np.rint(arrays["h"] * 2.0**frac).astype(np.int64)
        lits = {"g": ("int32_t", [_int_literal(int(v), "int32_t") for v in g]),
                "h": ("int64_t", [_int_literal(int(v), "int64_t") for v in h])}
        shift = XHAT_FRAC + gfrac - frac
        eps = layer.epsilon / (layer.input_scale * layer.input_scale) * 2.0**16
        mant, exp = math.frexp(eps)  # eps = mant * 2^exp, mant in [0.5, 1)
        em = int(round(mant * 2.0**31))
        ke = 31 - exp
        if em == 1 << 31:
            em, ke = em >> 1, ke - 1
        if ke >= 64:
            eps_term = "0"
        elif ke > 0:
            eps_term = f"((n2 * {em}u + ((uint64_t)1 << {ke - 1})) >> {ke})"
        elif ke == 0:
            eps_term = f"(n2 * {em}u)"
        else:
            cap = EPS_LIMIT >> -ke
            eps_term = f"(n2 * {em}u > {cap}u ? (uint64_t){EPS_LIMIT}u : (n2 * {em}u) << {-ke})"
    one = 1 << frac
    return Fixed(arrays=lits, frac=frac, shift=shift, eps_term=eps_term,
                 lo=_int_literal((-129 - zp_out) * one, "int64_t"), hi=_int_literal((128 - zp_out) * one, "int64_t"),
                 bias=_int_literal(512 * one, "int64_t"), half=f"{1 << (frac - 1)}u", mask=f"{one - 1}u")


def flt(value: float) -> str:
    """A C float literal that rounds to exactly float32(value)."""
    text = repr(float(np.float32(value)))
    if "e" not in text and "." not in text:
        text += ".0"
    return text + "f"


def minus(zero_point: int) -> str:
    """q less a zero point, as text: "q", "q - 4", "q + 7"."""
    return "q" if zero_point == 0 else f"q {'-' if zero_point > 0 else '+'} {abs(zero_point)}"


#: What an int8 plan reads from the float plan of the same layout: the names every C template
#: shares, the sizes, and the loops and offsets of the elementwise (batch-norm) pass.
SHARED = frozenset({
    "name", "upper", "guard", "channels", "sizes", "per_batch", "format", "has_batch", "elements", "size_locals",
    "size_guard", "offset_expr", "channel_expr", "apply_loops", "apply_offset_expr", "apply_channel_expr",
})


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
    count_guard: bool  # the count depends on run-time sizes: checked against max_count at run time
    lo: str  # v is clamped to [lo, hi] before rounding: one step past the int8 range, less the zero point
    hi: str
    #: arithmetic = "integer": the fixed-point constants; None: the normalize step in float
    fixed: Fixed | None = None

    max_count: int = MAX_COUNT  # most elements of one statistic (checked at run time where it is not fixed)
    version: str = __version__

    def __getattr__(self, name: str):
        """The names every C template shares (SHARED) are the float plan's."""
        if name in SHARED:
            return getattr(self.base, name)
        raise AttributeError(name)

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
    def template(self) -> str:
        """The C template that spells the function out: float or fixed-point normalize step."""
        return "c/int8.c.j2" if self.fixed is None else "c/int8_fixed.c.j2"

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
    def deviation_type(self) -> str:
        """The C type of n·q − S (at most 255·n in magnitude): int32_t where n is fixed and at most
        2^23 (the conversion to float then vectorizes), int64_t otherwise."""
        return "int32_t" if not self.count.dynamic and self.count.static <= 1 << 23 else "int64_t"

    @property
    def count_expr(self) -> str:
        return self.count.expr()

    @property
    def arithmetic(self) -> str:
        """What runs in integers and what in float, for ``normgen show``."""
        if self.fixed is not None:
            return ("integers only (arithmetic = 'integer'): " + ("a fixed-point multiply-add per element" if self.folded
                    else "exact integer statistics, an integer square root per statistic, fixed-point normalize")
                    + "; rounded (ties to even) and saturated")
        if self.folded:
            return "x - zero_point in integers; one float multiply-add per element, rounded and saturated"
        sums = "sum(q), sum(q^2)" if self.centered else "sum((q - zp)^2)"
        return (f"statistics exact in integers ({sums}); 1/sqrt per statistic and one float multiply-add"
                " per element, rounded (ties to even) and saturated")

    @property
    def normalize_comment(self) -> str:
        parts = "(g = scale / output_scale, h = offset / output_scale)"
        if self.fixed is not None:
            d = "n * q - S" if self.centered else f"n * ({minus(self.input_zero_point)})"
            return f"y = d / sqrt(M) * g + h, quantized, d = {d} {parts}"
        d = "(n * q - S)" if self.centered else f"({minus(self.input_zero_point)})"
        return f"y = {d} * t * g + h, quantized {parts}"

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
    integer = layer.arithmetic == "integer"
    most = MAX_COUNT_INTEGER if integer else MAX_COUNT
    if statistic != "folded" and not count.dynamic and count.static > most:
        why = ("2^16 with arithmetic = 'integer': its fixed-point products must fit int64_t" if integer else
               "2^24: their integer sums n*sum(q^2) - sum(q)^2 must fit int64_t")
        raise NormgenError(
            f"layer {layer.name!r}: dtype 'int8' takes statistics over at most {most} elements ({why}); each of"
            f" this layer's covers {count.static}"
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
        fixed=_fixed(layer, arrays, statistic == "folded", zp_out) if integer else None,
        max_count=most,
    )
