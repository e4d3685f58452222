"""What each argument of a generated C function is to MATLAB: the table the MEX gateway is built from.

A C argument is named by its role: ``const T *x`` is the layer's input, ``T *running_mean`` one
value per channel updated in place, ``int32_t batch`` comes from x's dimensions. The gateway reads
each function's argument list (``plan.functions``, ``plan.train.functions``) and looks every name
up in :data:`ROLES`; an argument whose name is not there is an error when the gateway is generated,
never a guess. A new argument is one line here.

Direction follows the C declaration: a ``const`` pointer is an input; a pointer the function
writes is an output, or an input *and* an output where its role says ``inout`` (MATLAB's value is
copied and the copy updated: MATLAB arrays are never modified in place). ``OVERRIDES`` names the
few functions where an ``inout`` role only writes (``stats_reset``'s accumulator).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import NormgenError

#: Shapes a role can have in MATLAB:
#:   x         the layer's input in ``matlab_format`` (B and the run-time sizes from its dimensions)
#:   rows      [batch, C] row-major: C-by-batch in MATLAB (adaLN's shift and scale)
#:   param     the shape of scale and offset (C, or the normalized dimensions of affine = "element")
#:   channel   one value per channel (running and trained statistics)
#:   stats     one value per statistic, NAME_SAVED_STATISTICS(batch, sizes) of them (accumulator type)
#:   acc       the population accumulator NAME_stats, as opaque uint8 bytes
#:   params    NAME_params (param_storage = "runtime"), as a struct with one field per array
#:   scalar    one number (learn_rate, l2, momentum)
#:   batch     int32_t batch: x's B dimension
#:   size      a run-time size (``int32_t tokens``): x's dimension of that name
SHAPES = ("x", "rows", "param", "channel", "stats", "acc", "params", "scalar", "batch", "size")


@dataclass(frozen=True)
class Role:
    shape: str
    #: A pointer the function writes is also read (an input and an output of the MEX call).
    inout: bool = False


#: Argument name → role. One line per argument the generated C functions take.
ROLES: dict[str, Role] = {
    "x": Role("x"),
    "dy": Role("x"),
    "residual": Role("x"),
    "y": Role("x"),
    "dx": Role("x"),
    "h": Role("x"),
    "dh": Role("x"),
    "mod_shift": Role("rows"),
    "mod_scale": Role("rows"),
    "dmod_shift": Role("rows"),
    "dmod_scale": Role("rows"),
    "running_mean": Role("channel", inout=True),
    "running_var": Role("channel", inout=True),
    "trained_mean": Role("channel"),
    "trained_variance": Role("channel"),
    "saved_mean": Role("stats"),
    "saved_invstd": Role("stats"),
    "dscale": Role("param"),
    "doffset": Role("param"),
    "velocity_scale": Role("param", inout=True),
    "velocity_offset": Role("param", inout=True),
    "acc": Role("acc", inout=True),
    "params": Role("params", inout=True),
    "learn_rate": Role("scalar"),
    "l2": Role("scalar"),
    "momentum": Role("scalar"),
    "batch": Role("batch"),
}

#: (function role, argument) → direction, where the role's own is not what the function does.
OVERRIDES: dict[tuple[str, str], str] = {
    ("stats_reset", "acc"): "out",
    ("params_init", "params"): "out",
}

_DECL = re.compile(r"^(const\s+)?([A-Za-z_]\w*)\s*(\*?)\s*([A-Za-z_]\w*)$")


@dataclass(frozen=True)
class Declared:
    """One C argument as declared: ``const float *x`` → (True, "float", True, "x")."""

    const: bool
    ctype: str
    pointer: bool
    name: str


def parse(arg: str, function: str) -> Declared:
    m = _DECL.match(arg.strip())
    if not m:
        raise NormgenError(f"the mex target cannot read argument {arg!r} of {function}")
    return Declared(bool(m.group(1)), m.group(2), bool(m.group(3)), m.group(4))


def direction(fn_role: str, decl: Declared, role: Role) -> str:
    """"in", "out" or "inout"."""
    if (fn_role, decl.name) in OVERRIDES:
        return OVERRIDES[(fn_role, decl.name)]
    if not decl.pointer or decl.const:
        return "in"
    return "inout" if role.inout else "out"


def role_of(decl: Declared, function: str, sizes: tuple[str, ...]) -> Role:
    """The role of one argument; a run-time size (``int32_t tokens``) is its own role."""
    if decl.name in sizes and decl.ctype == "int32_t" and not decl.pointer:
        return Role("size")
    role = ROLES.get(decl.name)
    if role is None:
        raise NormgenError(
            f"the mex target does not know argument {decl.name!r} of {function}: add its role (its shape in MATLAB,"
            " and whether it is read and written) to ROLES in normgen/targets/mex/roles.py"
        )
    return role
