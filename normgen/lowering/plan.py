"""Lowering: a layer description → a target-independent :class:`Plan`.

The plan resolves everything a template needs, so templates only substitute and loop:

* the tensor as a list of *axes* in memory order (outermost first). Adjacent dimensions with the
  same role merge into one axis; the channel axis never merges, and group norm's C splits
  into a kept group axis G and a reduced axis C/G. An axis's extent is a static number, times
  the run-time batch when it holds B;
* which axes index a statistic (*kept*) and which are reduced over;
* the loop structure of the one normalization core: *statistic loops* (kept axes outside every
  reduced axis) around a *domain* (the rest, in memory order) whose statistics are accumulated
  chunk by chunk (cache-sized chunks, Chan's merge between them: normgen/targets/c/sweep.py) into
  ``nacc`` accumulators, one per kept position inside the domain;
* folded constants and parameter arrays as literals of the element type.

One core serves every kind: what differs between batch, group, layer and instance norm is only
which axes are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import __version__
from ..description.kinds import Semantics, reduced_letters, semantics
from ..description.layers import Layer
from ..errors import NormgenError

#: Elements of one statistics chunk: two passes over it stay in L1/L2.
CHUNK_ELEMS = 8192
#: The same for the columns strategy, whose every chunk ends in a merge of each column's sums
#: (a dozen double operations a column): longer chunks, from L2, take fewer of them.
COLUMN_CHUNK_ELEMS = 40960
#: Most rows of one columns chunk: each column's partial sums add at most this many values.
CHUNK_ROWS = 256
#: Most accumulators a domain may keep on the stack (columns strategy); beyond it rows are used.
MAX_ACCUMULATORS = 1024
#: Most elements in one row of a columns domain (the partial sums kept per column on the stack).
MAX_COLUMNS = 1024
#: Shortest contiguous reduced run for which the rows strategy is used when columns are possible.
MIN_ROW_RUN = 64
#: Default NAME_STREAM_BYTES: a call whose tensors (x and y; x, dy and dx for the backward) hold
#: at least this many bytes stores its output with streaming (non-temporal) stores. Three
#: quarters of a 32 MiB last-level cache: below it x and y stay in cache from call to call, and
#: the next layer reads y there.
STREAM_BYTES = 24 << 20
#: A core's L2 on the machines this is tuned for: a statistic block larger than this is read from
#: memory twice (its statistics, then its normalize pass), which counts in NAME_STREAM_BYTES.
BLOCK_CACHE_BYTES = 1 << 20
#: Most elements of y computed into a stack buffer before they are streamed out.
STREAM_CHUNK = 1024

#: How each target spells an element type, and the type statistics accumulate in.
CTYPES = {
    "float32": ("float", "double"),
    "float64": ("double", "double"),
}
#: The same per target. CUDA stores half and bfloat16 too and accumulates in float (double for
#: float64); its parameter arrays are kept in the accumulation type (PARAMS_IN_ACC).
TARGET_CTYPES = {
    "c": CTYPES,
    "cuda": {
        "float32": ("float", "float"),
        "float64": ("double", "double"),
        "float16": ("__half", "float"),
        "bfloat16": ("__nv_bfloat16", "float"),
    },
}
PARAMS_IN_ACC = {"cuda"}
#: Bytes of each C element type.
CTYPE_SIZES = {"float": 4, "double": 8}


def size_local(name: str) -> str:
    """The C local (size_t) that holds run-time size ``name`` inside a generated function."""
    return f"n_{name}"


@dataclass(frozen=True)
class Extent:
    """``static`` elements, times the run-time batch when ``batched`` and the run-time sizes
    ``sizes`` (names, sorted; a name may repeat)."""

    static: int
    batched: bool = False
    sizes: tuple[str, ...] = ()

    @property
    def dynamic(self) -> bool:
        """Known only at run time (the batch or a run-time size is a factor)."""
        return self.batched or bool(self.sizes)

    def __mul__(self, other: Extent) -> Extent:
        if self.batched and other.batched:
            raise AssertionError("B appears once in a format")
        return Extent(self.static * other.static, self.batched or other.batched,
                      tuple(sorted(self.sizes + other.sizes)))

    def expr(self, batch: str = "nb", size=size_local) -> str:
        """The C expression: ``batch`` for the batch, ``size(name)`` for each run-time size."""
        terms = ([batch] if self.batched else []) + [size(n) for n in self.sizes]
        if not terms:
            return str(self.static)
        return " * ".join(terms + ([str(self.static)] if self.static != 1 else []))

    def arg_expr(self, batch: str = "(size_t)batch") -> str:
        """The expression from the function's arguments (before their size_t locals exist)."""
        return self.expr(batch, lambda n: f"(size_t){n}")

    def macro_expr(self, batch: str = "(size_t)(batch)") -> str:
        """The expression in a macro whose parameters are batch and the run-time sizes."""
        return self.expr(batch, lambda n: f"(size_t)({n})")

    @property
    def dynamic_part(self) -> Extent:
        """The factors known at run time only (the batch and the run-time sizes)."""
        return Extent(1, self.batched, self.sizes)

    def value(self, batch: int, sizes: dict[str, int] | None = None) -> int:
        v = self.static * (batch if self.batched else 1)
        for n in self.sizes:
            v *= sizes[n]  # type: ignore[index]
        return v


ONE = Extent(1)


@dataclass(frozen=True)
class Axis:
    """One loop of the core: a run of format dimensions with one role."""

    letters: str  # the format letters it covers ("G"/"g" for group norm's split C)
    extent: Extent
    stride: Extent
    keep: bool  # indexes a statistic (True) or is reduced over (False)
    channel_mul: int  # contribution of this axis's index to the channel index (0: none)
    var: str = ""

    @property
    def count(self) -> str:
        return self.extent.expr()

    @property
    def step(self) -> str:
        return self.stride.expr()


@dataclass(frozen=True)
class Loop:
    """A loop as a template prints it: ``for (var = start; var < stop; ++var)``."""

    var: str
    start: str
    stop: str


@dataclass(frozen=True)
class Rotation:
    """A block whose rows of ``width`` elements lie back to back, each whole 64-byte lines, and
    whose per-element values depend on the column only: its output can be written as rows that
    begin on y's first line, r columns in, with the per-column arrays copied rotated by r
    (templates/c/core.j2 ``rotated_pass``), so that no line of y is split between two rows."""

    width: int
    row: Loop  # the loop over the block's rows
    run_var: str  # the column loop's variable
    base: str  # offset of the block's first element ("": 0)
    arrays: tuple[tuple[str, str], ...]  # (per-column array, its rotated copy)
    omp_chunk: int  # rows an OpenMP thread takes at a time


def rows_of_whole_lines(width: int, stride: Extent, itemsize: int) -> bool:
    """Whether rows of ``width`` elements ``stride`` apart lie back to back as whole 64-byte lines."""
    return not stride.dynamic and stride.static == width and width * itemsize % 64 == 0


@dataclass(frozen=True)
class Function:
    """One generated entry point: ``int name(args)``."""

    role: str  # "predict" | "train_forward"
    name: str
    args: list[str]
    pointers: list[str]  # arguments checked against NULL
    doc: str
    uses: list[str]  # parameter arrays the body reads
    static: bool = False  # a fused layer's core, called by its public function (lowering/fusion.py)

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(self.args)})"

    @property
    def linkage(self) -> str:
        return "static " if self.static else ""


def as_core(f: Function) -> Function:
    """A function as a fused layer's core: static, named NAME_<role>_core."""
    return Function(f.role, f"{f.name}_core", f.args, f.pointers, f.doc, f.uses, static=True)


@dataclass(frozen=True)
class Plan:
    """Everything the templates of every target need; no decisions are left to them."""

    version: str
    name: str
    kind: str
    dtype: str
    ctype: str
    acc_type: str
    description: list[tuple[str, str]]
    channels: int
    epsilon: float
    epsilon_literal: str
    param_storage: str
    parallel: str
    axes: list[Axis]
    strategy: str  # "rows" | "columns"
    stat_axes: list[Axis]
    domain_axes: list[Axis]
    nacc: int
    chunk_iters: int  # chunk-axis steps per chunk (for the static part of the inner extent)
    #: The C expression for the chunk-axis steps of one statistics chunk: chunk_iters, or, where the
    #: elements of one step depend on run-time sizes, about CHUNK_ELEMS elements' worth of them
    #: computed from those sizes (at least 1).
    chunk_step: str
    offset_expr: str  # element offset from every loop variable
    channel_expr: str
    acc_expr: str
    stat_offset_expr: str  # offset of a statistic block from the statistic loops
    per_acc_tail: Extent  # reduced elements per accumulator for one iteration of the chunk axis
    per_acc_total: Extent  # reduced elements per accumulator (the statistic's count)
    apply_axes: list[Axis]  # batch-norm predict: every dimension, merged except C
    apply_offset_expr: str
    apply_channel_expr: str
    elements: Extent  # elements of x
    params: dict[str, list[str]]  # name → literals, in the element type (the arrays the layer has)
    folded: dict[str, list[str]]  # batch norm predict: a = γ/√(σ²+ε), b = β − μ·a
    reduced_letters: str
    statistic_over: str
    statistic_per: str
    decays: dict[str, str] = field(default_factory=dict)
    running_unbiased: bool = False
    #: MATLAB's per-parameter factors (scale/offset learn-rate and L2 factors), for the update step.
    learn_factors: dict[str, float] = field(default_factory=dict)

    format: str = ""
    has_batch: bool = True
    #: What is computed, independent of any target: the statistic, what it reduces over.
    semantics: Semantics | None = None
    #: The affine's fixed arrays where the layer has no scale (ones) or offset (zeros): every
    #: function applies y = xhat * scale + offset alike; static const arrays in every storage mode.
    constants: dict[str, list[str]] = field(default_factory=dict)
    #: How γ and β are shaped: "channel", "element" (one per element of the normalized
    #: dimensions, indexed like channels: plan.channels of them) or "none".
    affine: str = "channel"
    #: The run-time sizes (names, in format order): int32_t arguments after batch.
    sizes: tuple[str, ...] = ()
    #: The size of each non-B dimension in format order (a name for a run-time size).
    dims: tuple[int | str, ...] = ()
    #: What one value of scale (offset, their gradients) belongs to, for the documentation.
    param_per: str = "one per channel, summed over everything sharing the channel"
    #: The training half (backward, update, population statistics): normgen/lowering/train.py,
    #: attached by :func:`normgen.lowering.lower`.
    train: Any = None
    #: The fused forms' stages and public functions (normgen/lowering/fusion.py); None: a plain layer.
    fusion: Any = None
    #: The roles whose functions are a fused layer's static cores (``NAME_<role>_core``).
    core_roles: tuple[str, ...] = ()
    #: The roles of the functions generated (the layer's ``functions``); None: every one it has.
    kept_roles: tuple[str, ...] | None = None

    @property
    def size_args(self) -> list[str]:
        """The run-time sizes' arguments, after ``int32_t batch``."""
        return [f"int32_t {n}" for n in self.sizes]

    @property
    def size_locals(self) -> list[str]:
        """The function-level locals holding the run-time sizes (after the arguments are checked)."""
        return [f"const size_t {size_local(n)} = (size_t){n};" for n in self.sizes]

    @property
    def size_guard(self) -> list[str]:
        """Statements returning NAME_ERR_SIZE for a run-time size < 1 or one whose product with the
        batch and the fixed sizes overflows size_t (after batch is checked)."""
        if not self.sizes:
            return []
        err = f"return {self.upper}_ERR_SIZE;"
        lines = [f"if ({' || '.join(f'{n} < 1' for n in self.sizes)}) {{", f"    {err}", "}", "{",
                 f"    size_t total = (size_t)batch * {self.elements.static}u;"]
        for n in self.sizes:
            lines += [f"    if ((size_t){n} > SIZE_MAX / total) {{", f"        {err}", "    }",
                      f"    total *= (size_t){n};"]
        return lines + ["    (void)total;", "}"]

    @property
    def macro_params(self) -> str:
        """The parameters of the header's size macros: batch, then the run-time sizes."""
        return ", ".join(["batch", *self.sizes])

    @property
    def per_batch(self) -> tuple[str, str]:
        """NAME_ELEMENTS_PER_BATCH: (its parameter list, its value): a number, or a function-like
        macro of the run-time sizes."""
        per = Extent(self.elements.static, False, self.elements.sizes)
        if not self.sizes:
            return "", str(per.static)
        return f"({', '.join(self.sizes)})", f"({per.macro_expr()})"

    @property
    def sqrt(self) -> str:
        """The square root of the accumulation type (sqrtf in float: no double promotion)."""
        return "sqrtf" if self.acc_type == "float" else "sqrt"

    def acc_literal(self, value: float) -> str:
        """A constant spelled in the accumulation type (0.5f in float)."""
        return literal(value, self.acc_type)

    @property
    def has_train_forward(self) -> bool:
        return self.kind == "batchnorm"

    @property
    def upper(self) -> str:
        return self.name.upper()

    @property
    def itemsize(self) -> int:
        return CTYPE_SIZES[self.ctype]

    #: Calls whose tensors hold at least this many bytes stream their output past the caches
    #: (NAME_STREAM_BYTES in the generated C, which a build can redefine).
    stream_bytes = STREAM_BYTES
    stream_chunk = STREAM_CHUNK

    def stream_tensors(self, reads: int, writes: int = 1) -> str:
        """The C expression for NAME_STREAMED's k: how many times a call of the core moves a
        tensor's bytes, for ``reads`` input tensors and ``writes`` output ones: each input once,
        twice where a statistic block is larger than a core's L2 (BLOCK_CACHE_BYTES), so that the
        normalize pass reads it from memory again."""
        block = Extent(self.itemsize)
        for a in self.domain_axes:
            block = block * a.extent
        if not block.dynamic:
            return str(reads * (2 if block.static > BLOCK_CACHE_BYTES else 1) + writes)
        twice = f"({block.expr()} > {BLOCK_CACHE_BYTES}u)"
        return f"{reads + writes} + {twice if reads == 1 else f'{reads} * {twice}'}"

    @property
    def apply_run(self) -> tuple[str, str, str] | None:
        """Batch-norm predict: (variable, length, offset of its start) of the innermost loop when it
        is contiguous, the run streamed as one; None otherwise."""
        inner = self.apply_axes[-1]
        if inner.stride != ONE or len(self.apply_axes) < 2:
            return None
        return inner.var, inner.count, _offset(self.apply_axes[:-1]) or "0"

    def apply_body(self, i: str, target: str = "") -> list[str]:
        """Batch-norm predict's statement for element ``i`` of the run at o0 (apply_run);
        ``target``: where y goes instead of y[o0 + i], a buffer that is streamed out."""
        a, b, c = self.fold_ref["a"], self.fold_ref["b"], self.apply_channel_expr
        return [f"{target or f'y[o0 + {i}]'} = {self.activate(f'x[o0 + {i}] * {a}[{c}] + {b}[{c}]')};"]

    @property
    def apply_rotate(self) -> bool:
        """Batch-norm predict with the channel innermost, its rows (one per position) back to back
        as whole 64-byte lines: written as apply_rotation says."""
        run = self.apply_run
        return (run is not None and len(self.apply_axes) == 2 and self.apply_channel_expr == run[0]
                and rows_of_whole_lines(self.channels, self.apply_axes[0].stride, self.itemsize))

    def apply_rotation(self, omp_chunk: int) -> Rotation | None:
        """apply_rotate: the rows, and the folded constants rotated (apply_rotated reads them);
        ``omp_chunk``: rows an OpenMP thread takes at a time (the target's choice)."""
        if not self.apply_rotate:
            return None
        a, b = self.fold_ref["a"], self.fold_ref["b"]
        return Rotation(self.channels, self.apply_loops[0], self.apply_run[0], "", ((a, "a_r"), (b, "b_r")), omp_chunk)

    def apply_row(self, i: str, target: str = "") -> list[str]:
        """Batch-norm predict's statement for element ``i`` of the row at xr, yr (apply_rotation;
        ``target`` as in apply_body)."""
        a, b = self.fold_ref["a"], self.fold_ref["b"]
        return [f"{target or f'yr[{i}]'} = {self.activate(f'xr[{i}] * {a}[{i}] + {b}[{i}]')};"]

    def apply_rotated(self, i: str, target: str = "") -> list[str]:
        """apply_row with the rotated copies a_r, b_r of the folded constants."""
        return [f"{target or f'yr[{i}]'} = {self.activate(f'xr[{i}] * a_r[{i}] + b_r[{i}]')};"]

    @property
    def guard(self) -> str:
        return f"NORMGEN_{self.upper}_H"

    @property
    def runtime_params(self) -> bool:
        return self.param_storage == "runtime"

    @property
    def split_mean(self) -> bool:
        """Keep the mean as hi + lo in the element type, so x - mean stays exact for data whose
        mean is large against its spread (float32)."""
        return self.ctype == "float"

    @property
    def param_ref(self) -> dict[str, str]:
        """How function bodies reach each parameter array (and each affine constant)."""
        ref = {k: f"{self.name}_{k}" for k in self.constants}
        if self.runtime_params:
            return {**ref, **{k: f"params->{k}" for k in self.params}}
        return {**ref, **{k: f"{self.name}_{k}" for k in self.params}}

    @property
    def centered(self) -> bool:
        """Whether the mean is a statistic and subtracted (False: RMSNorm's mean square)."""
        return self.semantics.centered

    @property
    def affine_uses(self) -> list[str]:
        """The arrays the normalize step reads: scale, and offset unless RMSNorm has none (the
        other kinds add their fixed offset of zeros)."""
        return ["scale", "offset"] if self.centered or "offset" in self.params else ["scale"]

    @property
    def learnables(self) -> list[str]:
        """The learnable arrays the layer has, in order (scale, offset)."""
        return [k for k in ("scale", "offset") if k in self.params]

    @property
    def gradients(self) -> tuple[tuple[str, str], ...]:
        """The gradient outputs of the backward functions: (argument, the sum it is stored from),
        one per learnable array the layer has."""
        return tuple((f"d{k}", f"g{k}") for k in self.learnables)

    @property
    def fold_ref(self) -> dict[str, str]:
        if self.runtime_params:
            return {"a": "fold_a", "b": "fold_b"}
        return {"a": f"{self.name}_fold_a", "b": f"{self.name}_fold_b"}

    @property
    def functions(self) -> list[Function]:
        t = self.ctype
        lead = [f"const {self.name}_params *params"] if self.runtime_params else []
        lead_ptr = ["params"] if self.runtime_params else []
        folded_at_generation = self.kind == "batchnorm" and not self.runtime_params
        affine = self.affine_uses
        predict_uses = ([] if folded_at_generation else
                        [*affine, "trained_mean", "trained_variance"] if self.kind == "batchnorm" else affine)
        fns = [
            Function(
                "predict",
                f"{self.name}_predict",
                lead + [f"const {t} *x", f"{t} *y", "int32_t batch", *self.size_args],
                lead_ptr + ["x", "y"],
                "Inference: y = normalize(x). x and y hold batch * "
                f"{Extent(self.elements.static, False, self.elements.sizes).expr('batch', str)} elements in format"
                f" {self.format}; y may be x.",
                predict_uses,
            )
        ]
        if self.has_train_forward:
            fns.append(
                Function(
                    "train_forward",
                    f"{self.name}_train_forward",
                    lead + [f"const {t} *x", f"{t} *y", "int32_t batch", *self.size_args, f"{t} *running_mean",
                            f"{t} *running_var"],
                    lead_ptr + ["x", "y", "running_mean", "running_var"],
                    "Training forward: normalize with the batch's mean and biased variance, then update\n"
                    " * running_mean and running_var (one per channel) in place: r = decay * batch + (1 - decay) * r.",
                    ["scale", "offset"],
                )
            )
        return [as_core(f) if f.role in self.core_roles else f for f in fns if self.keeps(f.role)]

    def keeps(self, role: str) -> bool:
        """Whether the function of ``role`` is generated (the layer's ``functions``)."""
        return self.kept_roles is None or role in self.kept_roles

    @property
    def fold_embedded(self) -> bool:
        """Batch norm's folded predict constants (NAME_fold_a, NAME_fold_b) are static arrays:
        embedded parameters, and a predict that reads them."""
        return self.kind == "batchnorm" and not self.runtime_params and self.keeps("predict")

    @property
    def act_fn(self) -> str:
        """The function the core's normalize step applies to each output (a fused activation
        without a modulation: lowering/fusion.py), or ""."""
        return f"{self.name}_act" if self.fusion is not None and self.fusion.act_in_core else ""

    @property
    def lane_pragma(self) -> list[str]:
        """Before a loop over a block of lanes whose body applies the activation: a loop, not
        unrolled into straight-line code, so that the compiler vectorizes the activation's
        comparisons (NAME_LANE_LOOP, defined by the fused forms' helpers)."""
        return [f"{self.upper}_LANE_LOOP"] if self.act_fn else []

    def activate(self, expr: str) -> str:
        return f"{self.act_fn}({expr})" if self.act_fn else expr

    def declared(self, train: bool) -> list[Function]:
        """The public functions of the header's forward (``train`` False: predict, train_forward)
        or training part."""
        return [f for f in self.public_functions if (f.role not in ("predict", "train_forward")) == train]

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles of the functions generated: the public functions', and "sync" for batch
        norm's data-parallel group (NAME_sync_*, lowering/sync.py)."""
        return (*(f.role for f in self.public_functions), *(("sync",) if self.train.sync is not None else ()))

    @property
    def public_functions(self) -> list[Function]:
        """Every function the header declares: the plain ones, or a fused layer's public ones and
        the training functions it does not wrap."""
        every = self.functions + self.train.functions
        if self.fusion is None:
            return every
        return [*self.fusion.functions, *(f for f in every if not f.static)]

    @property
    def _used(self) -> set[str]:
        fused = self.fusion.functions if self.fusion is not None else []
        sync = self.train.sync.functions if self.train.sync is not None else []
        return {name for f in self.functions + self.train.functions + fused + sync for name in f.uses}

    @property
    def embedded_params(self) -> dict[str, list[str]]:
        """The parameter arrays some function reads, embedded as static const arrays."""
        return {k: v for k, v in self.params.items() if k in self._used}

    @property
    def used_constants(self) -> dict[str, list[str]]:
        """The affine constants some function reads."""
        return {k: v for k, v in self.constants.items() if k in self._used}

    @property
    def stat_loops(self) -> list[Loop]:
        return self.loops(self.stat_axes)

    @property
    def domain_full_loops(self) -> list[Loop]:
        return self.loops(self.domain_axes)

    @property
    def apply_loops(self) -> list[Loop]:
        return self.loops(self.apply_axes)

    @property
    def chunk_axis(self) -> Axis:
        return self.domain_axes[0]

    @property
    def stat_comment(self) -> str:
        what = "mean and variance" if self.centered else "mean of x^2"
        return f"{what} of each statistic {self.statistic_per} over {self.statistic_over}"

    @property
    def normalize_comment(self) -> str:
        """What pass 2 computes, for the generated comments."""
        if self.centered:
            return "y = (x - mean) / sqrt(var + epsilon) * scale + offset"
        return "y = x / sqrt(mean(x^2) + epsilon) * scale" + (" + offset" if "offset" in self.params else "")

    @property
    def acc_channel_expr(self) -> str:
        """Batch norm: the channel of accumulator k (statistic loops hold C, or k is C)."""
        return "k" if self.strategy == "columns" else self.channel_expr

    def loops(self, axes: list[Axis]) -> list[Loop]:
        return [Loop(a.var, "0", a.count) for a in axes]

    @property
    def domain_loops(self) -> list[Loop]:
        """The domain inside one chunk: the first (chunk) axis runs from c0 to c1."""
        loops = self.loops(self.domain_axes)
        first = self.domain_axes[0]
        return [Loop(first.var, "c0", "c1")] + loops[1:]


def literal(value: float, ctype: str) -> str:
    """A C literal that rounds to exactly ``value`` in ``ctype``."""
    text = str(np.float32(value)) if ctype == "float" else str(np.float64(value))
    if not any(ch in text for ch in ".en"):
        text += ".0"
    return text + ("f" if ctype == "float" else "")


def extent_of(size: int | str) -> Extent:
    """A dimension's size: a number, or the name of a run-time size."""
    return Extent(1, sizes=(size,)) if isinstance(size, str) else Extent(size)


def _axes(layer: Layer) -> list[Axis]:
    """Format dimensions → merged axes with roles, memory order (outermost first)."""
    sem = semantics(layer)
    reduce = sem.reduced
    raw: list[tuple[str, Extent, bool, bool]] = []  # letters, extent, keep, is_channel_part
    dims = iter(layer.dims)
    element = layer.affine == "element"
    for ch in layer.fmt.letters:
        if ch == "B":
            raw.append(("B", Extent(1, True), "B" not in reduce, False))
            continue
        size = next(dims)
        if element and ch in reduce:
            # element affine: the normalized dimensions (next to each other, layers.py checks)
            # are one parameter axis, indexed like a channel axis of param_count values
            if raw and raw[-1][3]:
                raw[-1] = (raw[-1][0] + ch, raw[-1][1] * Extent(size), False, True)
            else:
                raw.append((ch, Extent(size), False, True))
        elif ch == "C" and sem.grouped:
            g = layer.groups
            raw.append(("G", Extent(g), True, True))
            raw.append(("g", Extent(size // g), False, True))
        else:
            raw.append((ch, extent_of(size), ch not in reduce, ch == "C" and not element))
    # Drop static size-1 dimensions (they do not move the offset) unless they carry the channel.
    raw = [r for r in raw if r[1].dynamic or r[1].static > 1 or r[3]]
    merged: list[list] = []
    for letters, ext, keep, is_ch in raw:
        if merged and not is_ch and not merged[-1][3] and merged[-1][2] == keep:
            merged[-1][0] += letters
            merged[-1][1] = merged[-1][1] * ext
        else:
            merged.append([letters, ext, keep, is_ch])
    axes: list[Axis] = []
    stride = ONE
    for letters, ext, keep, is_ch in reversed(merged):
        if not is_ch:
            mul = 0
        elif letters == "G":
            mul = layer.channels // layer.groups
        else:
            mul = 1
        axes.append(Axis(letters, ext, stride, keep, mul))
        stride = stride * ext
    axes.reverse()
    return [Axis(a.letters, a.extent, a.stride, a.keep, a.channel_mul, f"i{k}") for k, a in enumerate(axes)]


def _apply_axes(layer: Layer) -> list[Axis]:
    """Every dimension merged into outer × C × inner (batch norm's one multiply-add pass)."""
    letters = layer.fmt.letters
    c = letters.index("C")
    parts = []
    ext = ONE
    dims = iter(layer.dims)
    sizes = []
    for ch in letters:
        sizes.append(Extent(1, True) if ch == "B" else extent_of(next(dims)))
    for rng, is_ch in ((range(0, c), False), (range(c, c + 1), True), (range(c + 1, len(letters)), False)):
        ext = ONE
        for i in rng:
            ext = ext * sizes[i]
        if is_ch or ext.dynamic or ext.static > 1:
            parts.append((letters[rng.start:rng.stop], ext, is_ch))
    axes = []
    stride = ONE
    for lt, ext, is_ch in reversed(parts):
        axes.append(Axis(lt, ext, stride, not is_ch, 1 if is_ch else 0))
        stride = stride * ext
    axes.reverse()
    return [Axis(a.letters, a.extent, a.stride, a.keep, a.channel_mul, f"j{k}") for k, a in enumerate(axes)]


def _sum_expr(terms: list[str]) -> str:
    return " + ".join(terms) if terms else "0"


def _offset(axes: list[Axis]) -> str:
    return _sum_expr([a.var if a.stride == ONE else f"{a.var} * {a.step}" for a in axes])


def _channel(axes: list[Axis]) -> str:
    return _sum_expr([a.var if a.channel_mul == 1 else f"{a.var} * {a.channel_mul}" for a in axes if a.channel_mul])


def _strategy(axes: list[Axis]) -> tuple[str, list[Axis], list[Axis]]:
    """Choose rows (every kept axis outside, one accumulator) or columns (kept axes inside the
    first reduced axis accumulate side by side, x swept in memory order)."""
    first_r = next(i for i, a in enumerate(axes) if not a.keep)
    inner_keep = [a for a in axes[first_r:] if a.keep]
    nacc = int(np.prod([a.extent.static for a in inner_keep])) if inner_keep else 1
    inner = axes[first_r + 1:]
    width = int(np.prod([a.extent.static for a in inner])) if inner else 1
    columns_ok = (bool(inner_keep) and not any(a.extent.dynamic for a in inner) and nacc <= MAX_ACCUMULATORS
                  and width <= MAX_COLUMNS)
    last_reduced = axes[-1] if not axes[-1].keep else None
    long_rows = last_reduced is not None and (last_reduced.extent.dynamic or last_reduced.extent.static >= MIN_ROW_RUN)
    if columns_ok and not long_rows:
        return "columns", axes[:first_r], axes[first_r:]
    return "rows", [a for a in axes if a.keep], [a for a in axes if not a.keep]


def _statistic_words(layer: Layer) -> tuple[str, str]:
    red = reduced_letters(layer)
    names = {"B": "B", "S": "S", "T": "T", "U": "U", "C": "C"}
    over = [names[ch] for ch in "BCSTU" if ch in red and ch in layer.fmt.letters]
    if layer.kind == "groupnorm":
        over.append(f"the {layer.channels // layer.groups} channels of each of {layer.groups} groups")
    per = [ch for ch in layer.fmt.letters if ch not in red and ch in "BCT"]
    if layer.kind == "groupnorm":
        per = [ch for ch in per if ch != "C"] + ["group"]
    if layer.kind in ("layernorm", "rmsnorm") and layer.resolved_dimension == "channel-only":
        per = ["every non-C position"]
    return ", ".join(over) or "nothing", "(" + ", ".join(per) + ")" if per else "the whole tensor"


def lower_forward(layer: Layer, target: str = "c") -> Plan:
    """Resolve a layer into the forward plan its templates render (the training half is
    :func:`normgen.lowering.train.lower_train`'s)."""
    ctypes = TARGET_CTYPES.get(target, CTYPES)
    if layer.dtype not in ctypes:
        raise NormgenError(
            f"layer {layer.name!r}: dtype {layer.dtype!r} is not supported by the {target} target "
            f"(it supports {', '.join(ctypes)})"
        )
    ctype, acc = ctypes[layer.dtype]
    if layer.statistics == "float":
        acc = "float"  # float32 only (the description checks); CUDA's float32 accumulates in float anyway
    ptype = acc if target in PARAMS_IN_ACC else ctype  # how parameter literals are spelled
    sem = semantics(layer)
    axes = _axes(layer)
    if all(a.keep for a in axes):
        # Nothing is reduced (every statistic over a single element): a reduced axis of size 1.
        axes = axes + [Axis("", ONE, ONE, False, 0, f"i{len(axes)}")]
    strategy, stat_axes, domain_axes = _strategy(axes)
    nacc = int(np.prod([a.extent.static for a in domain_axes if a.keep])) if strategy == "columns" else 1
    inner = ONE
    for a in domain_axes[1:]:
        inner = inner * a.extent
    chunk_iters = max(1, CHUNK_ELEMS // inner.static)
    if strategy == "columns":
        chunk_iters = min(max(1, COLUMN_CHUNK_ELEMS // inner.static), CHUNK_ROWS)
    chunk_step = str(chunk_iters)
    if inner.dynamic:
        n = inner.expr()
        chunk_step = f"({n} < {CHUNK_ELEMS}u ? {CHUNK_ELEMS}u / ({n}) : 1u)"
    per_acc_tail = ONE
    for a in domain_axes[1:]:
        if not a.keep:
            per_acc_tail = per_acc_tail * a.extent
    per_acc_total = per_acc_tail * domain_axes[0].extent
    acc_terms = []
    mul = 1
    for a in reversed(domain_axes):
        if a.keep:
            acc_terms.append(a.var if mul == 1 else f"{a.var} * {mul}")
            mul *= a.extent.static
    apply_axes = _apply_axes(layer)
    params = {k: [literal(v, ptype) for v in arr] for k, arr in layer.parameter_arrays().items()}
    constants = {k: [literal(v, ptype) for v in getattr(layer, f"{k}_values")]
                 for k in ("scale", "offset") if k not in params}
    folded: dict[str, list[str]] = {}
    decays: dict[str, str] = {}
    if layer.kind == "batchnorm":
        a = layer.scale_values / np.sqrt(layer.trained_variance_values + layer.epsilon)
        b = layer.offset_values - layer.trained_mean_values * a
        folded = {"a": [literal(v, ptype) for v in a], "b": [literal(v, ptype) for v in b]}
        decays = {"mean": literal(layer.mean_decay, acc), "variance": literal(layer.variance_decay, acc)}
    elements = ONE
    for ax in axes:
        elements = elements * ax.extent
    over, per = _statistic_words(layer)
    return Plan(
        version=__version__,
        name=layer.name,
        kind=layer.kind,
        dtype=layer.dtype,
        ctype=ctype,
        acc_type=acc,
        description=layer.describe(),
        channels=layer.param_count if layer.affine == "element" else layer.channels,
        epsilon=layer.epsilon,
        epsilon_literal=literal(layer.epsilon, acc),
        param_storage=layer.param_storage,
        parallel=layer.parallel,
        axes=axes,
        strategy=strategy,
        stat_axes=stat_axes,
        domain_axes=domain_axes,
        nacc=nacc,
        chunk_iters=chunk_iters,
        chunk_step=chunk_step,
        offset_expr=_offset(axes),
        channel_expr=_channel(axes),
        acc_expr=_sum_expr(list(reversed(acc_terms))),
        stat_offset_expr=_offset(stat_axes),
        per_acc_tail=per_acc_tail,
        per_acc_total=per_acc_total,
        apply_axes=apply_axes,
        apply_offset_expr=_offset(apply_axes),
        apply_channel_expr=_channel(apply_axes),
        elements=elements,
        params=params,
        folded=folded,
        reduced_letters=sem.reduced,
        statistic_over=over,
        statistic_per=per,
        decays=decays,
        running_unbiased=getattr(layer, "running_variance", "biased") == "unbiased",
        learn_factors={f: getattr(layer, f) for f in (
            "scale_learn_rate_factor", "offset_learn_rate_factor", "scale_l2_factor", "offset_l2_factor")},
        format=layer.fmt.letters,
        has_batch=layer.fmt.has_batch,
        semantics=sem,
        kept_roles=layer.functions,
        sizes=layer.sizes,
        dims=layer.dims,
        constants=constants,
        affine=layer.affine,
        param_per=(f"one per element of the normalized dimensions {layer.normalized_letters()}"
                   f" {list(layer.param_shape)}, summed over the rest" if layer.affine == "element"
                   else "one per channel, summed over everything sharing the channel"),
    )
