"""The MEX gateway's plan: the C target's functions as MATLAB calls.

``y = NAME_mex('predict', x)``: each generated C function becomes one call whose inputs are the
arguments the function reads and whose outputs are those it writes, in the C argument order; the
batch and the run-time sizes are taken from x's dimensions. What each argument is comes from the
role table (:mod:`.roles`); the templates (``templates/mex/``) spell out one macro per role shape
and direction and never decide anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import NormgenError
from ...lowering.plan import Function, Plan
from .roles import Declared, direction, parse, role_of

#: MATLAB's class of each C element type: (mxClassID, class name).
MX_CLASSES = {"float": ("mxSINGLE_CLASS", "single"), "double": ("mxDOUBLE_CLASS", "double")}
#: Roles read by helpers after the C call (the structs copied out of, or freed).
FINISHED = {"acc", "params"}
#: The helper functions (templates/mex/helpers.j2) each role shape needs, in the order they are defined.
HELPERS = {"rows": ("input",), "param": ("input",), "channel": ("input",), "stats": ("input",),
           "scalar": ("scalar",), "acc": ("input", "stats"), "params": ("input", "params")}
HELPER_ORDER = ("input", "scalar", "stats", "params")


@dataclass(frozen=True)
class MexArg:
    """One argument of a C function as the gateway handles it."""

    name: str
    shape: str  # roles.SHAPES
    direction: str  # "in" | "out" | "inout"
    var: str  # the C local passed to the function
    ctype: str
    mx_class: str  # mxClassID of an array argument
    class_name: str  # its MATLAB class name
    index: int = 0  # prhs[index] of an input
    slot: int = 0  # out[slot] of an output
    first: bool = False  # the first x-shaped input: it gives the batch and the run-time sizes
    want: str = ""  # a C initializer list of the dimensions MATLAB's array has ("{3, 1}")
    want_rank: int = 0
    macro: str = ""  # templates/mex/roles.j2: the macro that reads or creates it
    finish: str = ""  # the macro run after the C call ("": none)
    matlab: str = ""  # what it is in MATLAB, for the help text


@dataclass(frozen=True)
class MexFunction:
    role: str  # the name MATLAB calls it by: NAME_mex('predict', ...)
    c_name: str
    args: list[MexArg]  # in the order the gateway handles them (x-shaped inputs first)
    call: str  # the C call's argument list
    inputs: list[str]
    outputs: list[str]
    has_shape: bool  # it reads x's dimensions
    doc: list[str]  # the C function's comment, line by line
    usage: str  # [y, ...] = NAME_mex('role', x, ...)

    @property
    def unused(self) -> list[str]:
        """The gateway function's parameters it does not read (a call without inputs)."""
        return [] if self.inputs else ["prhs"]


@dataclass(frozen=True)
class MexPlan:
    """What templates/mex/*.j2 need beyond the C plan."""

    name: str  # NAME_mex: the MEX function and its help file
    functions: list[MexFunction]
    mx_class: str
    class_name: str
    matlab_format: str
    layout: list[str]  # x's dimensions in MATLAB's order: a size, 0 the batch, -k the k-th run-time size
    layout_text: str  # the same as MATLAB writes a size vector: "[4 4 3 batch]"
    keep_dims: int  # the most dimensions an x-shaped array keeps (MATLAB has at least 2)
    codes: list[tuple[str, str]]  # the C return codes besides OK: (macro, meaning)
    param_fields: list[tuple[str, str, int]]  # NAME_params: (field, its MATLAB dimensions, rank)
    stats_type: str
    params_type: str
    taken_from_x: str  # what the gateway reads off x's dimensions, in words
    helpers: list[str]  # templates/mex/helpers.j2 macros the roles of the functions need


def _size_vector(dims: list[int | str]) -> str:
    return "[" + " ".join(str(d) for d in dims) + "]"


def _matlab_dims(dims: list[int]) -> list[int]:
    """A MATLAB array has at least two dimensions: a vector of n is n-by-1."""
    return dims + [1] * (2 - len(dims))


def _param_dims(plan: Plan) -> list[int]:
    """scale's and offset's dimensions in MATLAB: C-by-1, or the normalized dimensions of affine
    = "element" in MATLAB's order (format order reversed)."""
    if plan.affine != "element":
        return _matlab_dims([plan.channels])
    letters = plan.format.replace("B", "")
    shape = [d for ch, d in zip(letters, plan.dims, strict=True) if ch in plan.semantics.reduced]
    return _matlab_dims([int(d) for d in reversed(shape)])


def _codes(plan: Plan) -> list[tuple[str, str]]:
    codes = [(f"{plan.upper}_ERR_NULL", "a pointer argument is NULL"),
             (f"{plan.upper}_ERR_BATCH", "batch < 1, or batch too large for size_t offsets")]
    if plan.has_train_forward:
        codes.append((f"{plan.upper}_ERR_COUNT", "unbiased running variance needs more than one value per channel"))
    if plan.sizes:
        codes.append((f"{plan.upper}_ERR_SIZE", "a run-time size < 1, or sizes too large for size_t offsets"))
    return codes


def _gateway_functions(plan: Plan) -> list[Function]:
    fns = list(plan.public_functions)
    if plan.runtime_params:
        fns.insert(0, Function("params_init", f"{plan.name}_params_init", [f"{plan.name}_params *params"], ["params"],
                               "The parameters of the description this gateway was generated from.", []))
    return fns


def _function(plan: Plan, fn: Function) -> MexFunction:
    t, a = plan.ctype, plan.acc_type
    cls, cls_name = MX_CLASSES[t]
    expected = {"x": t, "rows": t, "param": t, "channel": t, "scalar": t, "stats": a, "acc": f"{plan.name}_stats",
                "params": f"{plan.name}_params", "batch": "int32_t", "size": "int32_t"}
    param = _param_dims(plan)
    layout = _size_vector(_x_dims(plan))
    sizes_call = {n: f"shape.sizes[{k}]" for k, n in enumerate(plan.sizes)}
    saved = f"{plan.upper}_SAVED_STATISTICS({', '.join(['shape.batch', *sizes_call.values()])})"
    c = plan.dims[plan.format.replace("B", "").index("C")]  # the layer's channels (plan.channels: its parameters)
    wants = {
        "rows": (f"{{{c}, (mwSize)shape.batch}}", 2, f"{cls_name} [{c} batch]"),
        "param": (f"{{{', '.join(map(str, param))}}}", len(param), f"{cls_name} {_size_vector(param)}"),
        "channel": (f"{{{plan.channels}, 1}}", 2, f"{cls_name} [{plan.channels} 1]"),
        "stats": (f"{{(mwSize){saved}, 1}}", 2,
                  f"{MX_CLASSES[a][1]} [n 1], n = {plan.upper}_SAVED_STATISTICS(batch{''.join(', ' + s for s in plan.sizes)})"),
        "x": ("", 0, f"{cls_name} {layout} (matlab_format {plan.format[::-1]})"),
        "acc": ("", 0, f"uint8 [bytes 1], the population statistics (sizeof({plan.name}_stats) bytes)"),
        "params": ("", 0, "struct of " + ", ".join(plan.params)),
        "scalar": ("", 0, "real scalar, single or double"),
    }
    decls: list[tuple[Declared, str, str]] = []
    for arg in fn.args:
        decl = parse(arg, fn.name)
        role = role_of(decl, fn.name, plan.sizes)
        if decl.ctype != expected[role.shape]:
            raise NormgenError(f"the mex target takes argument {decl.name!r} of {fn.name} as {expected[role.shape]}"
                               f" (role {role.shape!r}); it is declared {arg!r}")
        decls.append((decl, role.shape, direction(fn.role, decl, role)))
    has_x = any(shape == "x" and d == "in" for _, shape, d in decls)
    if not has_x and any(shape in ("batch", "size", "rows", "stats") for _, shape, _ in decls):
        raise NormgenError(f"the mex target takes {fn.name}'s batch and sizes from an x-shaped input; it has none")
    order = sorted(range(len(decls)), key=lambda i: 0 if decls[i][1] == "x" and decls[i][2] == "in" else 1)
    inputs: list[str] = []
    outputs: list[str] = []
    index_of: dict[int, int] = {}
    slot_of: dict[int, int] = {}
    for i, (decl, shape, d) in enumerate(decls):
        if shape in ("batch", "size"):
            continue
        if d in ("in", "inout"):
            inputs.append(decl.name)
            index_of[i] = len(inputs)
        if d in ("out", "inout"):
            outputs.append(decl.name)
            slot_of[i] = len(outputs) - 1
    if not outputs:
        raise NormgenError(f"the mex target found nothing {fn.name} writes")
    args: list[MexArg] = []
    first = True
    for i in order:
        decl, shape, d = decls[i]
        if shape in ("batch", "size"):
            continue
        arg_cls, arg_cls_name = MX_CLASSES[a] if shape == "stats" else (cls, cls_name)
        want, rank, matlab = wants[shape]
        args.append(MexArg(
            name=decl.name, shape=shape, direction=d, var=f"a_{decl.name}", ctype=decl.ctype, mx_class=arg_cls,
            class_name=arg_cls_name, index=index_of.get(i, 0), slot=slot_of.get(i, 0),
            first=shape == "x" and d == "in" and first, want=want, want_rank=rank, macro=f"{shape}_{d}",
            finish=f"{shape}_{d}_finish" if shape in FINISHED else "", matlab=matlab,
        ))
        if shape == "x" and d == "in":
            first = False
    call = []
    for decl, shape, _ in decls:
        call.append("shape.batch" if shape == "batch" else sizes_call[decl.name] if shape == "size" else f"a_{decl.name}")
    doc = [line.removeprefix(" * ").removeprefix(" *") for line in fn.doc.split("\n")]
    lhs = f"{outputs[0]} = " if len(outputs) == 1 else f"[{', '.join(outputs)}] = "
    usage = f"{lhs}{plan.name}_mex('{fn.role}'{''.join(', ' + i for i in inputs)})"
    return MexFunction(fn.role, fn.name, args, ", ".join(call), inputs, outputs, has_x, doc, usage)


def _x_dims(plan: Plan) -> list[int | str]:
    """x's dimensions in MATLAB's order (``matlab_format``), "batch" for B."""
    dims = iter(plan.dims)
    row_major = ["batch" if ch == "B" else next(dims) for ch in plan.format]
    return row_major[::-1]


def mex_plan(plan: Plan) -> MexPlan:
    """The gateway of a C plan."""
    if not plan.name[:1].isalpha():
        raise NormgenError(f"the mex target needs a layer name that begins with a letter, as MATLAB's function names"
                           f" and message identifiers do (NAME_mex, normgen:NAME:...); got {plan.name!r}")
    cls, cls_name = MX_CLASSES[plan.ctype]
    x_dims = _x_dims(plan)
    layout = ["0" if d == "batch" else f"-{plan.sizes.index(d) + 1}" if isinstance(d, str) else str(d) for d in x_dims]
    fields = []
    if plan.runtime_params:
        param = _param_dims(plan)
        for pname in plan.params:
            dims = param if pname in ("scale", "offset") else _matlab_dims([plan.channels])
            fields.append((pname, f"{{{', '.join(map(str, dims))}}}", len(dims)))
    functions = [_function(plan, f) for f in _gateway_functions(plan)]
    used = {h for f in functions for a in f.args for h in HELPERS.get(a.shape, ())}
    return MexPlan(
        name=f"{plan.name}_mex",
        functions=functions,
        mx_class=cls,
        class_name=cls_name,
        matlab_format=plan.format[::-1],
        layout=layout,
        layout_text=_size_vector(x_dims),
        keep_dims=max(len(x_dims), 2),
        codes=_codes(plan),
        param_fields=fields,
        stats_type=f"{plan.name}_stats",
        params_type=f"{plan.name}_params",
        taken_from_x=("the batch is taken" if not plan.sizes else
                      f"the batch and the run-time size{'s' if len(plan.sizes) > 1 else ''} {', '.join(plan.sizes)} are taken"),
        helpers=[h for h in HELPER_ORDER if h in used],
    )
