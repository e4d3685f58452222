"""Lowering of the fused forms (README "Fused forms"): residual add, activation and adaLN
modulation, as stages around the normalization core.

A fused layer's core functions (predict, the training forwards, the backwards) are the ones an
unfused layer has, made static and renamed ``NAME_<role>_core``; each public function is a
:class:`FusedFunction` that checks its arguments, runs its stages and calls its core:

* ``residual``: h = x + residual, written to h (``residual_out``) or into y, which the core then
  normalizes in place (predict and the training forwards take y == x already);
* ``activation``: inside the core's normalize step (``act_in_core``: one expression around each
  element's output, no extra pass) where there is no modulation; otherwise after it;
* ``modulation`` (adaLN): y = z * (1 + mod_scale[b, c]) + mod_shift[b, c] on the core's output,
  then the activation, one pass over y in memory order;
* the backward (``backward_saved``; ``backward`` and ``backward_frozen`` where there is no
  activation or modulation) takes h, what the forward normalized: a stage turns dy into the
  gradient of the affine output z (dy * act'(m) * (1 + mod_scale), m the modulated z, z from h
  and the saved statistics) in dx, summing mod_shift's and mod_scale's gradients per (b, c), and
  the core runs on (h, dx); dh, the gradient reaching h from its other use (residual_out), is
  added to dx last. dx is the gradient of x and of residual alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..description.kinds import semantics
from ..description.layers import Layer
from .plan import Extent, Function, Loop, as_core, extent_of, literal

#: The roles a fused layer wraps in stages (the others stay as they are: population statistics
#: take h for a residual layer, the update step takes gradients).
WRAPPED = ("predict", "train_forward", "train_forward_save", "backward", "backward_saved", "backward_frozen")
#: The backward roles, which need the forward's statistics to undo an activation or modulation:
#: only backward_saved has them at hand.
NEEDS_PLAIN_OUTPUT = ("backward", "backward_frozen")

#: Each activation as statements of a function of ``v``: (element type: float, double) for the
#: forward, and its derivative in the accumulation type (double: "grad"; float: "grad_float"). ``{exp}``: the float exponential
#: below (EXPF), which the compiler vectorizes where libm's expf is a call per element.
ACTIVATIONS = {
    "relu": {
        "float": ["return v < 0 ? 0.0f : v;"],
        "double": ["return v < 0 ? 0.0 : v;"],
        "grad": ["return v > 0 ? 1.0 : 0.0;"],
        "grad_float": ["return v > 0 ? 1.0f : 0.0f;"],
    },
    "silu": {
        "float": ["return v / (1.0f + {exp}(-v));"],
        "double": ["return v / (1.0 + exp(-v));"],
        "grad": ["const double s = 1.0 / (1.0 + exp(-v));", "return s * (1.0 + v * (1.0 - s));"],
        "grad_float": ["const float s = 1.0f / (1.0f + expf(-v));", "return s * (1.0f + v * (1.0f - s));"],
    },
    "gelu": {
        "float": [
            "/* erf(|v| / sqrt(2)) as Abramowitz and Stegun 7.1.26 (absolute error < 1.5e-7) */",
            "const float a = fabsf(v) * 0.707106781186547524f;",
            "const float t = 1.0f / (1.0f + 0.3275911f * a);",
            "const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));",
            "const float e = copysignf(1.0f - poly * {exp}(-a * a), v);",
            "return 0.5f * v * (1.0f + e);",
        ],
        "double": ["return 0.5 * v * (1.0 + erf(v * 0.707106781186547524));"],
        "grad": ["return 0.5 * (1.0 + erf(v * 0.707106781186547524)) + v * exp(-0.5 * v * v) * 0.398942280401432678;"],
        "grad_float": ["return 0.5f * (1.0f + erff(v * 0.707106781f)) + v * expf(-0.5f * v * v) * 0.398942281f;"],
    },
    "gelu_tanh": {
        "float": [
            "/* tanh(u) = 1 - 2 / (1 + e^(2u)) */",
            "const float u = 0.797884560802865356f * (v + 0.044715f * v * v * v);",
            "return 0.5f * v * (2.0f - 2.0f / (1.0f + {exp}(2.0f * u)));",
        ],
        "double": ["return 0.5 * v * (1.0 + tanh(0.797884560802865356 * (v + 0.044715 * v * v * v)));"],
        "grad": [
            "const double t = tanh(0.797884560802865356 * (v + 0.044715 * v * v * v));",
            "return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * 0.797884560802865356 * (1.0 + 3.0 * 0.044715 * v * v);",
        ],
        "grad_float": [
            "const float t = tanhf(0.797884561f * (v + 0.044715f * v * v * v));",
            "return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * 0.797884561f * (1.0f + 3.0f * 0.044715f * v * v);",
        ],
    },
}

#: e^v in float (relative error below 2.5e-7 where the result is a normal float): 2^n * e^r with
#: n = round(v * log2(e)) (by adding and subtracting 1.5 * 2^23), r = v - n * ln 2 in two parts (|r| <= ln 2 / 2), e^r by its Taylor
#: polynomial to degree 7, 2^n built in the exponent bits; v clamped to the normal range.
EXPF = [
    "v = v < -87.33654f ? -87.33654f : v;",
    "v = v > 88.3762589f ? 88.3762589f : v;",
    "const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* rounded: 1.5 * 2^23 */",
    "const float r = (v - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;",
    "const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666667e-1f + r * (4.16666667e-2f"
    " + r * (8.33333333e-3f + r * (1.38888889e-3f + r * 1.98412698e-4f))))));",
    "union {",
    "    int32_t i;",
    "    float f;",
    "} s;",
    "s.i = ((int32_t)n + 127) * 8388608;",
    "return p * s.f;",
]


@dataclass(frozen=True)
class FusedFunction(Function):
    """A public entry point of a fused layer: its stages around the call of ``core``."""

    core: str = ""  # the static core function it calls
    call: tuple[str, ...] = ()  # the core's arguments
    h_buffer: str = ""  # residual: where h = x + residual is written ("h" or "y"); "" none
    epilogue: bool = False  # the modulation (and activation) pass over y after the core
    dz: bool = False  # backward: dy turned into the affine output's gradient, in dx
    dh: bool = False  # backward: dx += dh after the core
    count_check: str = ""  # train_forward(_save): the unbiased-variance count, checked first
    source: str = "x"  # backward: what the forward normalized ("h" for a residual layer)

    @property
    def stages(self) -> bool:
        """Whether any stage runs around the core call (else it only checks and calls)."""
        return bool(self.h_buffer) or self.epilogue or self.dz or self.dh


@dataclass(frozen=True)
class Axis1:
    """One format letter as a loop of a stage: its loop variable, extent and row-major stride."""

    letter: str
    var: str
    extent: Extent
    stride: Extent


@dataclass(frozen=True)
class Fusion:
    residual: bool
    residual_out: bool
    activation: str
    modulation: str
    act_in_core: bool  # the activation is applied by the core's normalize step
    wrapped: tuple[str, ...]  # roles made static cores
    dropped: tuple[str, ...]  # roles a fused layer does not have
    functions: list[FusedFunction]
    act: list[str]  # NAME_act's body (element type)
    expf: list[str]  # NAME_expf's body, where the float activation uses it
    act_grad: list[str]  # NAME_act_grad's body (the accumulation type): act'(v)
    act_dz: list[str]  # NAME_act_dz's body (the C target): d * act'(v)
    total: str  # elements of x (C expression after the size locals)
    mod_loops: list[Loop]  # the epilogue: every element in memory order
    mod_offset: str
    mod_index: str  # index of (b, c) in mod_shift / mod_scale
    bc_head: list[Loop]  # the dz stage, with a modulation: b (where the format has B) and c, outermost
    bc_rest: list[Loop]  # ... then the other letters in memory order (without: every letter)
    bc_offset: str
    stat_index: str  # the dz stage: the saved statistic of the element
    param_index: str  # the dz stage: the element's scale/offset
    bc_count: str  # values of mod_shift/mod_scale: batch * C
    letters: tuple[Axis1, ...] = ()  # every format letter, memory order (the loops above are built on them)

    @property
    def modulated(self) -> bool:
        return self.modulation != "none"

    @property
    def has_dz(self) -> bool:
        return any(f.dz for f in self.functions)


def _letter_axes(layer: Layer) -> list[Axis1]:
    """One axis per format letter, memory order, with row-major strides."""
    dims = iter(layer.dims)
    raw = []
    for ch in layer.fmt.letters:
        if ch == "B":
            raw.append((ch, Extent(1, True)))
        else:
            raw.append((ch, extent_of(next(dims))))
    out: list[Axis1] = []
    stride = Extent(1)
    for k, (ch, ext) in reversed(list(enumerate(raw))):
        out.append(Axis1(ch, f"f{k}", ext, stride))
        stride = stride * ext
    return list(reversed(out))


def _offset(axes: list[Axis1]) -> str:
    terms = [a.var if a.stride == Extent(1) else f"{a.var} * {_paren(a.stride.expr())}" for a in axes]
    return " + ".join(terms) or "0"


def _paren(expr: str) -> str:
    return expr if expr.replace("_", "").isalnum() else f"({expr})"


def _row_major(items: list[tuple[str, Extent]]) -> str:
    """Σ index · (product of the later extents)."""
    terms = []
    mul = Extent(1)
    for index, ext in reversed(items):
        terms.append(index if mul == Extent(1) else f"{_paren(index)} * {_paren(mul.expr())}")
        mul = mul * ext
    return " + ".join(reversed(terms)) or "0"


def act_dz(act: str, acc: str) -> list[str]:
    """The statements of d * act'(v) in ``acc`` (the C dz stage): ReLU's as a select of d, so that
    its loop vectorizes (a multiply by a 0 or 1 chosen by a branch could trap: the compiler keeps
    the branch)."""
    if act == "none":
        return []
    if act == "relu":
        return [f"return v > 0 ? d : {literal(0.0, acc)};"]
    *head, last = ACTIVATIONS[act]["grad_float" if acc == "float" else "grad"]
    return [*head, f"return d * ({last.removeprefix('return ').removesuffix(';')});"]


def lower_fusion(layer: Layer, plan) -> Fusion | None:
    """The fused form of a layer's plan, or None for a plain layer."""
    if not layer.fused:
        return None
    t = plan.ctype
    act = layer.activation
    key = t if t in ("float", "double") else plan.acc_type  # CUDA's half types compute in float
    plain_out = act == "none" and layer.modulation == "none"
    dropped = () if plain_out else NEEDS_PLAIN_OUTPUT
    axes = _letter_axes(layer)
    by = {ax.letter: ax for ax in axes}
    b = by["B"].var if "B" in by else "0"
    c = by["C"].var
    mod_index = f"{b} * {layer.channels} + {c}" if "B" in by else c
    if layer.modulation != "none":
        # the dz stage sums the modulation's gradients per (b, c): b and c outermost
        rest = [ax for ax in axes if ax.letter not in "BC"]
        head = [ax for ax in axes if ax.letter == "B"] + [by["C"]]
    else:
        rest, head = list(axes), []  # no sums: every element in memory order
    bc_axes = head + rest
    sem = semantics(layer)
    kept = []
    for ax in axes:
        if ax.letter in sem.reduced and not (ax.letter == "C" and sem.grouped):
            continue
        if ax.letter == "C" and sem.grouped:
            per = layer.channels // layer.groups
            kept.append((f"{c} / {per}" if per > 1 else c, Extent(layer.groups)))
        else:
            kept.append((ax.var, ax.extent))
    if layer.affine == "element":
        param = _row_major([(ax.var, ax.extent) for ax in axes if ax.letter in layer.normalized_letters()])
    else:
        param = c
    fns = [fused_function(f, layer, plan, dropped) for f in [*plan.functions, *plan.train.functions]]
    return Fusion(
        residual=layer.residual, residual_out=layer.residual_out, activation=act, modulation=layer.modulation,
        act_in_core=act != "none" and layer.modulation == "none",
        wrapped=tuple(r for r in WRAPPED if r not in dropped), dropped=dropped,
        functions=[f for f in fns if f is not None],
        act=[line.format(exp=f"{plan.name}_expf") for line in ACTIVATIONS[act][key]] if act != "none" else [],
        expf=EXPF if act != "none" and any("{exp}" in line for line in ACTIVATIONS[act][key]) else [],
        act_grad=ACTIVATIONS[act]["grad_float" if plan.acc_type == "float" else "grad"] if act != "none" else [],
        act_dz=act_dz(act, plan.acc_type),
        total=plan.elements.expr(),
        mod_loops=[Loop(ax.var, "0", ax.extent.expr()) for ax in axes], mod_offset=_offset(axes),
        mod_index=mod_index,
        bc_head=[Loop(ax.var, "0", ax.extent.expr()) for ax in head],
        bc_rest=[Loop(ax.var, "0", ax.extent.expr()) for ax in rest], bc_offset=_offset(bc_axes),
        stat_index=_row_major(kept), param_index=param,
        bc_count=f"{'nb * ' if 'B' in by else ''}{layer.channels}", letters=tuple(axes),
    )


def fused_function(f: Function, layer: Layer, plan, dropped: tuple[str, ...]) -> FusedFunction | None:
    """The public function wrapping core function ``f`` (None: a role the layer does not have,
    or ``f`` itself where it is not wrapped)."""
    if f.role in dropped:
        return None
    if f.role not in WRAPPED:
        return None
    t = plan.ctype
    mod = ["mod_shift", "mod_scale"] if layer.modulation != "none" else []
    forward = f.role in ("predict", "train_forward", "train_forward_save")
    args: list[str] = []
    call: list[str] = []
    pointers = [p for p in f.pointers if p != "x"]
    epilogue = forward and (layer.modulation != "none")
    dz = not forward and (layer.activation != "none" or layer.modulation != "none")
    h_buffer = ("h" if layer.residual_out else "y") if forward and layer.residual else ""
    for arg in f.args:
        pname = arg.split("*")[-1].split()[-1]
        if forward and pname == "x":
            ins = ["x"] + (["residual"] if layer.residual else []) + mod
            args += [f"const {t} *{n}" for n in ins]
            pointers = ins + pointers
            call.append(h_buffer or "x")
        elif forward and pname == "y":
            args.append(arg)
            call.append("y")
            if layer.residual_out:
                args.append(f"{t} *h")
                pointers.append("h")
        elif not forward and pname == "x":
            xin = "h" if layer.residual else "x"
            args.append(f"const {t} *{xin}")
            call.append(xin)
            pointers = [xin] + pointers
        elif not forward and pname == "dy":
            ins = ["dy"] + (["dh"] if layer.residual_out else []) + mod
            args += [f"const {t} *{n}" for n in ins]
            pointers += [n for n in ins if n != "dy"]
            call.append("dx" if dz else "dy")
        elif not forward and pname == "batch" and layer.modulation != "none" and dz:
            args += [f"{t} *dmod_shift", f"{t} *dmod_scale", arg]
            pointers += ["dmod_shift", "dmod_scale"]
            call.append("batch")
        else:
            args.append(arg)
            call.append(pname)
    doc = f.doc + _fused_doc(f.role, layer)
    count_check = ""
    if f.role in ("train_forward", "train_forward_save") and plan.has_train_forward and plan.running_unbiased:
        count_check = plan.per_acc_total.arg_expr()
    uses = ["scale", "offset"] if dz else []
    return FusedFunction(
        f.role, f.name, args, pointers, doc, uses,
        core=f"{f.name}_core", call=tuple(call), h_buffer=h_buffer, epilogue=epilogue, dz=dz,
        dh=not forward and layer.residual_out, count_check=count_check,
        source="h" if layer.residual and not forward else "x",
    )


def _fused_doc(role: str, layer: Layer) -> str:
    parts = []
    forward = role in ("predict", "train_forward", "train_forward_save")
    if forward:
        if layer.residual:
            parts.append("normalizes h = x + residual" + (", written to h" if layer.residual_out else ""))
        if layer.modulation != "none":
            parts.append("then y = z * (1 + mod_scale[b, c]) + mod_shift[b, c] (mod_shift, mod_scale: [batch, C])")
        if layer.activation != "none":
            parts.append(f"then y = {layer.activation}(y)")
    else:
        if layer.residual:
            parts.append("h is what the forward normalized (x + residual); dx is the gradient of x and of residual"
                         + (", dh (the gradient reaching h) added" if layer.residual_out else ""))
        if layer.activation != "none" or layer.modulation != "none":
            src = "h" if layer.residual else "x"
            parts.append(f"dy is the gradient of the activated, modulated output; dx may be dy, not {src}"
                         f" (dx holds that gradient while {src} is still read)")
        if layer.modulation != "none":
            parts.append("dmod_shift, dmod_scale: the gradients of mod_shift, mod_scale ([batch, C])")
    return "\n * Fused: " + ";\n * ".join(parts) + "." if parts else ""


def core_function(f: Function, fusion: Fusion) -> Function:
    """A core function as a fused layer defines it: static, named NAME_<role>_core."""
    return as_core(f) if f.role in fusion.wrapped else f
