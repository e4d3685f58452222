"""The CUDA target's fused forms (README "Fused forms"; the stages are normgen/lowering/fusion.py's).

A fused layer's launchers of the wrapped roles become static host functions ``NAME_<fn>_core``
(:attr:`normgen.targets.cuda.plan.CudaPlan.launchers`, :func:`normgen.targets.cuda.train.lower_train_cuda`);
each public launcher (the :class:`~normgen.lowering.fusion.FusedFunction` of the plain one, with
the same workspace and stream arguments) checks its arguments and runs its :class:`Stage` s on the
stream, in order:

* ``add``: out = a + b, element-wise (h = x + residual into h or y before the core; dx += dh after
  it), computed in the accumulation type;
* ``dz`` (backward_saved): dx = dy * act'(m) * (1 + mod_scale[b, c]) from h, the saved statistics
  and the affine, m the modulated affine output; with a modulation one block per (b, c) also sums
  dmod_shift and dmod_scale over it (fixed-order block sums, no atomics: the same bits on every
  run), without one it is element-wise;
* ``core``: the static core launcher on the stage buffers;
* ``epilogue``: y = act(y * (1 + mod_scale[b, c]) + mod_shift[b, c]) over y in memory order.

Without a modulation the activation is applied inside the core kernels' normalize expression
(``Plan.activate``: ``NAME_act``), so it costs no pass. :meth:`FusedCuda.stages` is the one table
the template renders and the pycuda bench (normgen/targets/cuda/module.py) runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...lowering.fusion import ACTIVATIONS, Axis1, fused_function
from ...lowering.plan import ONE, Extent, Plan, size_local
from .plan import CudaPlan
from .train import CUDA_BLOCK, CUDA_ELEM_MAX_BLOCKS, CUDA_MAX_GRID, TrainCuda

#: The derivative of each activation in float (the accumulation type of float, half and
#: bfloat16 layers); double layers use normgen/lowering/fusion.py's ACTIVATIONS[...]["grad"].
FLOAT_GRADS = {
    "relu": ["return v > 0.0f ? 1.0f : 0.0f;"],
    "silu": ["const float s = 1.0f / (1.0f + expf(-v));", "return s * (1.0f + v * (1.0f - s));"],
    "gelu": ["return 0.5f * (1.0f + erff(v * 0.707106781186547524f)) + v * expf(-0.5f * v * v) * 0.398942280401432678f;"],
    "gelu_tanh": [
        "const float t = tanhf(0.797884560802865356f * (v + 0.044715f * v * v * v));",
        "return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * 0.797884560802865356f * (1.0f + 3.0f * 0.044715f * v * v);",
    ],
}
#: Kernel arguments the launchers pass by another name (the batch as an int, sizes as size_t locals).
C_NAMES = {"batch": "b"}
#: The modulated dz stage where C is innermost: a block is DZ_TILE channels (threadIdx.x, reads
#: coalesced along C) x DZ_ROWS row lanes (threadIdx.y) of one sample.
DZ_TILE = 32
DZ_ROWS = 8


@dataclass(frozen=True)
class Stage:
    """One step of a public launcher: a kernel launch (``kind`` add, dz, epilogue) with its grid
    ("elements" or "bc") and arguments by name, or the call of the core launcher (``core``, its
    arguments the public function's names)."""

    kind: str
    grid: str = ""
    args: tuple[str, ...] = ()
    core: str = ""

    @property
    def launches(self) -> bool:
        return self.kind != "core"


@dataclass(frozen=True)
class FusedCuda:
    """The fused forms of one layer for the CUDA templates and the pycuda bench (``fused`` False:
    a plain layer, whose declared launchers are the plain ones)."""

    name: str
    fused: bool
    forward: list  # the forward launchers the .cuh declares (Launcher or FusedFunction)
    training: list  # the training launchers the .cuh declares (Function or FusedFunction)
    functions: list  # the public fused launchers (FusedFunction), forward then training
    cores: dict  # core name -> its argument names, in order
    activation: str = "none"
    modulated: bool = False
    act: tuple[str, ...] = ()  # NAME_act's body (acc_t)
    act_grad: tuple[str, ...] = ()  # NAME_act_grad's body (acc_t), where a dz stage needs it
    channels: int = 0
    letters: tuple[Axis1, ...] = ()
    elements: Extent = ONE
    #: the dz stage: lines computing s (saved statistic) and p (scale/offset index) of offset o
    element_index: tuple[str, ...] = ()
    runtime_params: bool = False
    params_type: str = ""
    param_locals: str = ""  # dz: the scale/offset the layer has, from the run-time struct
    sizes: tuple[str, ...] = ()

    def declared(self, train: bool) -> list:
        """The launchers the .cuh declares: the forward (``train`` False) or the training part."""
        return self.training if train else self.forward

    # ---- (b, c) of an element ---------------------------------------------------------------------
    def _letter(self, ch: str) -> Axis1 | None:
        return next((a for a in self.letters if a.letter == ch), None)

    @property
    def has_batch(self) -> bool:
        return self._letter("B") is not None

    def _coord(self, ch: str, o: str) -> str:
        a = self._letter(ch)
        q = o if a.stride == ONE else f"{o} / {_op(a.stride)}"
        outer = self.letters[0] is a
        return q if outer else f"{_op_text(q)} % {_op(a.extent)}"

    @property
    def bc_of_offset(self) -> str:
        """The index of (b, c) in mod_shift/mod_scale of element offset ``o``."""
        c = self._coord("C", "o")
        if not self.has_batch:
            return c
        return f"({self._coord('B', 'o')}) * {self.channels} + {c}"

    @property
    def bc_base(self) -> str:
        """The offset of the first element of (b, c) = block ``bc`` (b = bc / C, c = bc % C)."""
        c = self._letter("C")
        terms = [f"(bc % {self.channels}) * {_op(c.stride)}" if c.stride != ONE else f"bc % {self.channels}"]
        if self.has_batch:
            b = self._letter("B")
            terms.insert(0, f"(bc / {self.channels}) * {_op(b.stride)}" if b.stride != ONE else f"bc / {self.channels}")
        return " + ".join(terms)

    @property
    def dz_tiled(self) -> bool:
        """The modulated dz stage reads tiles of DZ_TILE channels (C is innermost), else one (b, c)
        per block."""
        return self.modulated and self._letter("C").stride == ONE

    @property
    def dz_per_sample(self) -> int:
        """Blocks of the modulated dz stage per sample."""
        return -(-self.channels // DZ_TILE) if self.dz_tiled else self.channels

    @property
    def dz_sample(self) -> str:
        """The tiled dz block's sample."""
        return "blockIdx.x" if self.dz_per_sample == 1 else f"blockIdx.x / {self.dz_per_sample}"

    @property
    def dz_channel(self) -> str:
        """The tiled dz thread's channel."""
        if self.dz_per_sample == 1:
            return "threadIdx.x"
        return f"(blockIdx.x % {self.dz_per_sample}) * {DZ_TILE} + threadIdx.x"

    @property
    def batch_offset(self) -> str:
        """The offset of sample ``b``'s first element (0 without B)."""
        b = self._letter("B")
        if b is None:
            return "0"
        return "b" if b.stride == ONE else f"b * {_op(b.stride)}"

    @property
    def dz_tile(self) -> int:
        return DZ_TILE

    @property
    def dz_rows(self) -> int:
        return DZ_ROWS

    def block(self, stage: Stage) -> tuple[int, int, int]:
        """The block of a stage kernel."""
        if stage.kind == "dz" and self.dz_tiled:
            return (DZ_TILE, DZ_ROWS, 1)
        return (CUDA_BLOCK, 1, 1)

    @property
    def rest(self) -> list[Axis1]:
        """The letters other than B and C, innermost first (the dz block's element decoding)."""
        return [a for a in reversed(self.letters) if a.letter not in "BC"]

    @property
    def rest_count(self) -> Extent:
        out = ONE
        for a in self.rest:
            out = out * a.extent
        return out

    # ---- stages ----------------------------------------------------------------------------------
    def stages(self, f) -> list[Stage]:
        """What public launcher ``f`` runs, in order."""
        out = []
        dims = ("batch", *self.sizes)
        if f.h_buffer:
            out.append(Stage("add", "elements", ("x", "residual", f.h_buffer, *dims)))
        if f.dz:
            lead = ("params",) if self.runtime_params else ()
            mod = ("mod_shift", "mod_scale") if self.modulated else ()
            dmod = ("dmod_shift", "dmod_scale") if self.modulated else ()
            out.append(Stage("dz", "bc" if self.modulated else "elements",
                             (*lead, f.source, "dy", *mod, "saved_mean", "saved_invstd", "dx", *dmod, *dims)))
        out.append(Stage("core", core=f.core, args=f.call))
        if f.epilogue:
            out.append(Stage("epilogue", "elements", ("mod_shift", "mod_scale", "y", *dims)))
        if f.dh:
            out.append(Stage("add", "elements", ("dx", "dh", "dx", *dims)))
        return out

    def kernel(self, kind: str) -> str:
        return f"{self.name}_fused_{kind}"

    @property
    def stage_kinds(self) -> list[str]:
        """The kinds of stage kernel some public launcher runs (the .cu defines those)."""
        kinds = {s.kind for f in self.functions for s in self.stages(f) if s.launches}
        return [k for k in ("add", "dz", "epilogue") if k in kinds]

    @property
    def kernels(self) -> list[str]:
        return [self.kernel(k) for k in self.stage_kinds]

    def grid_value(self, grid: str, batch: int, sizes: dict[str, int] | None = None) -> int:
        if grid == "bc":
            return (batch if self.has_batch else 1) * self.dz_per_sample
        n = self.elements.value(batch, sizes)
        return max(1, min(-(-n // CUDA_BLOCK), CUDA_ELEM_MAX_BLOCKS))

    def grid_expr(self, grid: str) -> str:
        """A stage grid in the launchers (after the size locals; nb the batch as size_t)."""
        if grid == "bc":
            return f"(unsigned int)({'nb * ' if self.has_batch else ''}{self.dz_per_sample})"
        return f"(unsigned int)train_elem_grid(nb{''.join(f', {size_local(n)}' for n in self.sizes)})"

    @property
    def bc_guard(self) -> str:
        """The modulated dz grid's check in the launchers."""
        return f"nb * {self.dz_per_sample} > {CUDA_MAX_GRID}u" if self.has_batch else ""

    def c_args(self, stage: Stage) -> str:
        """The launcher's C argument array (between the braces) of a stage kernel."""
        names = [C_NAMES.get(a, size_local(a) if a in self.sizes else a) for a in stage.args]
        return ", ".join(f"(void *)&{n}" for n in names)

    def arg_code(self, arg: str) -> str:
        """pycuda's prepare() code of a stage kernel argument."""
        if arg == "batch":
            return "i"
        return "Q" if arg in self.sizes else "P"

    def workspace_check(self, f) -> str:
        """The condition (in the public launcher, before any stage writes) under which the core
        would refuse its workspace: the stages must not have written y or dx then."""
        if "void *workspace" not in f.args:
            return ""
        size = f"{self.name}_{'backward_' if f.role.startswith('backward') else ''}workspace_size"
        call = f"{size}(batch{''.join(f', {n}' for n in self.sizes)})"
        if f.role.startswith("backward"):
            return f"workspace == NULL || workspace_bytes < {call} || !aligned16(workspace)"
        return f"{call} > 0 && (workspace == NULL || workspace_bytes < {call} || !aligned16(workspace))"


def _op(e: Extent) -> str:
    return _op_text(e.expr("nb"))


def _op_text(text: str) -> str:
    """An expression as an operand of / or % (parenthesized unless it is one name or number)."""
    return f"({text})" if " " in text else text


def _element_index(plan: Plan) -> tuple[str, ...]:
    """s (the saved statistic, row-major over the kept axes) and p (the channel, or the element of
    the normalized dimensions) of element offset o, by mixed radix over the plan's axes."""
    lines = ["size_t s = 0;", "size_t p = 0;", "size_t rem = o;"]
    mul = ONE
    axes = list(reversed(plan.axes))
    for k, a in enumerate(axes):
        last = k == len(axes) - 1
        if a.keep or a.channel_mul:
            lines.append(f"const size_t i{k} = rem % {_op(a.extent)};")
            if not last:
                lines.append(f"rem /= {_op(a.extent)};")
            if a.keep:
                lines.append(f"s += i{k}{'' if mul == ONE else f' * {_op(mul)}'};")
            if a.channel_mul:
                lines.append(f"p += i{k}{'' if a.channel_mul == 1 else f' * {a.channel_mul}'};")
        elif not last:
            lines.append(f"rem /= {_op(a.extent)};")
        if a.keep:
            mul = mul * a.extent
    return tuple(lines)


def fused_cuda(plan: Plan, cp: CudaPlan, tc: TrainCuda) -> FusedCuda:
    """The fused forms of a plan lowered for the cuda target (a plain layer's: its launchers)."""
    if plan.fusion is None:
        return FusedCuda(plan.name, False, cp.launchers, tc.launchers, [], {})
    fusion = plan.fusion
    forward_plain = cp.plain_launchers
    train_plain = [f for f in tc.plain if f.role not in fusion.dropped]
    cores = {f"{f.name}_core": tuple(_arg_name(a) for a in f.args) for f in [*forward_plain, *train_plain]
             if f.role in fusion.wrapped}
    # fusion carries the layer's residual, residual_out, activation and modulation, all the
    # wrapper derivation reads of it
    pairs = [(fused_function(f, fusion, plan, fusion.dropped) if f.role in fusion.wrapped else None, f)
             for f in [*forward_plain, *train_plain]]
    public = [w or f for w, f in pairs]
    functions = [w for w, _ in pairs if w is not None]
    has_dz = any(f.dz for f in functions)
    grad: tuple[str, ...] = ()
    if fusion.activation != "none" and has_dz:
        grad = tuple(fusion.act_grad) if cp.A == "double" else tuple(FLOAT_GRADS[fusion.activation])
    letters = plan.fusion.letters
    return FusedCuda(
        plan.name, True, public[:len(forward_plain)], public[len(forward_plain):], functions, cores,
        activation=fusion.activation, modulated=fusion.modulated, act=_act(fusion.activation, cp.A), act_grad=grad,
        channels=next(a.extent.static for a in letters if a.letter == "C"), letters=letters,
        elements=plan.elements, element_index=_element_index(plan), runtime_params=plan.runtime_params,
        params_type=f"{plan.name}_params", param_locals=cp.param_locals, sizes=tuple(plan.sizes),
    )


def _arg_name(arg: str) -> str:
    return arg.split("*")[-1].split()[-1]


def _act(activation: str, acc: str) -> tuple[str, ...]:
    """The activation's body in the accumulation type, with the device's exponential (the C
    target's own vectorizable one is a CPU matter)."""
    if activation == "none":
        return ()
    return tuple(line.format(exp="expf" if acc == "float" else "exp") for line in ACTIVATIONS[activation][acc])
