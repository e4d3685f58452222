"""The CUDA target's launch shapes, derived from the target-independent :class:`~normgen.lowering.plan.Plan`.

There is no second lowering here: the plan's merged axes (memory order, kept or reduced,
extents, strides, channel multipliers) are regrouped into the shape the CUDA kernels index, and
every launch shape is a function of the plan and the run-time batch. The same numbers are
rendered into the host launchers (``templates/cuda/layer.cu.j2``) and used by
:class:`normgen.targets.cuda.module.CudaLayer`, which calls the ``__global__`` kernels directly; a test runs the
rendered launchers under a CPU emulator and checks that they launch exactly what
:meth:`CudaPlan.launches` says.

Kernel families (one per layer and function; the decision is made here, not in templates):

* ``affine`` — batch-norm predict: y = x·a_c + b_c with folded constants, one multiply-add per
  element, 128-bit units of ``vec`` elements. ``mode`` says how the channel varies inside a unit:
  ``uniform`` (per-channel planes, NCHW), ``consecutive`` (channel vectors, NHWC) or ``general``.
* ``segments`` — every statistic's domain is ``nseg`` contiguous segments of ``seg`` elements
  (layer norm rows, instance/group norm NCHW, batch norm NCHW planes). One block per statistic
  (``fused``; x held in registers when the domain is small enough, so it is read once), or
  ``partial`` + ``apply`` over ``parts`` slices of the domain with a workspace of partial
  statistics.
* ``columns`` — statistics are positions (or groups of ``r2`` adjacent positions) of rows of
  ``w`` contiguous elements, reduced over ``r1`` rows (batch/instance/group norm NHWC, layer norm
  over C in NCHW). A block is ``tx`` × ``ty`` threads over a tile of the row; parts split the rows.
* ``generic`` — any other layout: one block per statistic, offsets by mixed radix.

Statistics are shifted by the first element of their domain (``x0``) before accumulating,
so the mean is kept as x0 + mean(x − x0) and y = ((x − x0) − mean_d)·(rstd·γ) + β stays
accurate when the mean is large against the spread. RMSNorm (``statistic == "mean_square"``)
runs the same kernels with x0 and the mean fixed at 0 and M2 the sum of x²: a statistic is
(n, 0, Σx²), which Chan's merge adds up exactly as it merges centred statistics.

Parameters: the scale and offset the layer has (``plan.params``) are embedded ``__device__``
arrays or members of the run-time ``NAME_params`` struct; the ones it lacks
(``plan.constants``: ones, zeros) are ``__device__`` arrays in every storage mode, so every
kernel applies y = x̂·scale[c] + offset[c] alike. With ``affine = "element"`` the plan's channel
index runs over the normalized elements (``plan.channels`` of them), and the kernels index it
like a channel.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ...errors import NormgenError
from ...lowering.plan import ONE, TARGET_CTYPES, Axis, Extent, Plan, size_local

#: Bytes of one vector access.
VEC_BYTES = 16
SIZEOF = {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2}
#: Threads of affine, looping-segment, generic and column blocks.
BLOCK = 256
#: Largest grid.x a launch may use.
MAX_GRID = 2**31 - 1
#: Affine kernels stride over the tensor with at most this many blocks.
AFFINE_MAX_BLOCKS = 65536
#: Registers (32-bit) a thread may spend holding its slice of x in a cached fused kernel.
CACHE_REGS = 32
CACHE_MAX_THREADS = 1024
#: A grid of at least this many blocks keeps every SM of current GPUs busy; below it, and when
#: the domain is long enough, the workspace variant splits each statistic's domain into parts.
#: (Fixed numbers, not device queries: launch shapes, and so the bits of the result, do not
#: depend on the GPU.)
FILL_BLOCKS = 264
SPLIT_BLOCKS = 1056
#: Segments: a statistic of at most SPLIT_MIN_UNITS units is never split; a part holds at least
#: PART_MIN_UNITS units (4 per thread of a block).
SPLIT_MIN_UNITS = 2048
PART_MIN_UNITS = 1024
#: Columns: a part holds at least PART_MIN_ROWS rows per row lane (threadIdx.y); fewer than twice
#: that per lane in all are never split.
PART_MIN_ROWS = 4
MAX_PARTS = 512
#: Shortest inner reduced run read as segments (below it, as columns of a row).
SEGMENT_MIN = 32
#: Threads along a row in a column block.
COLUMN_TX = 32

CONVERT = {
    "float": ("", ""),
    "double": ("", ""),
    "__half": ("__half2float", "__float2half_rn"),
    "__nv_bfloat16": ("__bfloat162float", "__float2bfloat16_rn"),
}
HEADERS = {"__half": ["cuda_fp16.h"], "__nv_bfloat16": ["cuda_bf16.h"]}

#: The affine's arrays: learned (plan.params) or fixed (plan.constants).
AFFINE_ARRAYS = ("scale", "offset")
#: How a statistic is taken, by the plan's semantics: "shifted" (centred) or "mean_square".
STATISTICS = {"mean_variance": "shifted", "mean_square": "mean_square"}

ERRORS = {
    1: "a NULL pointer",
    2: "batch < 1, or a batch too large for the grid",
    3: "too few values per channel for an unbiased variance",
    4: "a kernel launch failed",
    5: "the workspace is missing, too small or not aligned to 16 bytes",
    6: "a run-time size < 1, or sizes whose product with the batch overflows size_t",
}


def param_unit(plan: Plan) -> str:
    """What one value of scale and offset belongs to: a channel, or (``affine = "element"``) an
    element of the normalized dimensions (the plan indexes those like channels)."""
    return "normalized element" if plan.affine == "element" else "channel"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _ex(e: Extent) -> str:
    """An extent as a C operand (parenthesized when it is a product)."""
    text = e.expr("nb")
    return f"({text})" if " " in text else text


def _index_type(e: Extent) -> str:
    """32-bit indices where an extent is static and small (cheaper division by constants)."""
    return "unsigned int" if not e.dynamic and e.static < 2**31 else "size_t"


def _prod(exts) -> Extent:
    out = ONE
    for e in exts:
        out = out * e
    return out


@dataclass(frozen=True)
class Group:
    """Adjacent plan axes with one role (kept or reduced), memory order."""

    keep: bool
    axes: tuple[Axis, ...]

    @property
    def extent(self) -> Extent:
        return _prod(a.extent for a in self.axes)


def _groups(axes: list[Axis]) -> list[Group]:
    out: list[Group] = []
    for a in axes:
        if out and out[-1].keep == a.keep:
            out[-1] = Group(a.keep, out[-1].axes + (a,))
        else:
            out.append(Group(a.keep, (a,)))
    return out


def _join_groups(axes: tuple[Axis, ...]) -> tuple[Axis, ...]:
    """Group norm's adjacent G and g axes index the channel as one C axis."""
    out: list[Axis] = []
    for ax in axes:
        prev = out[-1] if out else None
        if prev and prev.letters == "G" and ax.letters == "g" and prev.channel_mul == ax.extent.static:
            out[-1] = Axis("C", prev.extent * ax.extent, ax.stride, ax.keep, 1, ax.var)
        else:
            out.append(ax)
    return tuple(out)


def _chan_terms(axes: tuple[Axis, ...], var: str) -> list[str]:
    """Channel contribution of the channel axes among ``axes`` (one index ``var`` over them)."""
    axes = _join_groups(axes)
    terms = []
    for i, ax in enumerate(axes):
        if not ax.channel_mul:
            continue
        inner = _prod(a.extent for a in axes[i + 1:])
        t = var if inner == ONE else f"{var} / {_ex(inner)}"
        if i > 0:
            t = f"({t}) % {_ex(ax.extent)}" if inner != ONE else f"{t} % {_ex(ax.extent)}"
        if ax.channel_mul != 1:
            t = f"({t}) * {ax.channel_mul}"
        terms.append(t)
    return terms


def _sum(terms: list[str]) -> str:
    return " + ".join(terms) if terms else "0"


def _uniform_over_unit(axes: tuple[Axis, ...], vec: int) -> bool:
    """Whether the channel part of ``axes`` is the same for ``vec`` consecutive indices that
    start at a multiple of ``vec``."""
    for i, ax in enumerate(axes):
        if ax.channel_mul:
            inner = _prod(a.extent for a in axes[i + 1:])
            if inner.dynamic or inner.static % vec:
                return False
    return True


def _consecutive_over_unit(axes: tuple[Axis, ...], vec: int) -> bool:
    """Whether the channel part of ``axes`` is c, c + 1, ..., c + vec - 1 over a unit: the only
    channel axis is the innermost, its extent a multiple of ``vec``."""
    ch = [a for a in _join_groups(axes) if a.channel_mul]
    return (vec > 1 and len(ch) == 1 and ch[0] is _join_groups(axes)[-1] and ch[0].channel_mul == 1
            and not ch[0].extent.dynamic and ch[0].extent.static % vec == 0)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: 1-D grid, block (x, y, z), argument names in order."""

    kernel: str
    grid: int
    block: tuple[int, int, int]
    args: tuple[str, ...]


@dataclass(frozen=True)
class Launcher:
    """One host entry point: ``int name(args)``."""

    role: str  # "predict" | "train_forward"
    name: str
    args: list[str]
    pointers: list[str]
    doc: str
    workspace: bool  # the _ws variant
    reduces: bool  # runs the reduction kernels (else the affine kernel)
    static: bool = False  # a fused layer's core (normgen/targets/cuda/fused.py): NAME_<fn>_core

    @property
    def signature(self) -> str:
        return f"{self.name}({', '.join(self.args)})"

    @property
    def linkage(self) -> str:
        return "static " if self.static else 'extern "C" '


@dataclass(frozen=True)
class Affine:
    elements: Extent
    channels: int
    inner: Extent  # elements per channel plane
    vec: int
    mode: str  # "uniform" | "consecutive" | "general"

    def grid(self, nb: int, sizes: dict[str, int] | None = None) -> int:
        units = self.elements.value(nb, sizes) // self.vec
        return max(1, min(cdiv(units, BLOCK), AFFINE_MAX_BLOCKS))


@dataclass(frozen=True)
class Segments:
    a: Extent  # outer kept
    k: Extent  # inner kept (between the segments)
    nseg: Extent  # segments per statistic
    seg: Extent  # elements per segment
    vec: int
    astride: Extent
    kstride: Extent
    sstride: Extent
    cached: bool
    cache_threads: int
    items: int  # units per thread when cached
    chan_stat: str  # channel part from a, k
    chan_dom: str  # channel part from r1 (segment), r2 (element in segment)
    chan_per_unit: bool
    chan_vec: bool  # channels c .. c + vec - 1 over a unit: parameters read as vectors

    @property
    def rtype(self) -> str:
        """C type of an index inside a segment."""
        return _index_type(self.seg)

    @property
    def segu(self) -> Extent:
        return Extent(self.seg.static // self.vec, self.seg.batched, self.seg.sizes)

    @property
    def one_k(self) -> bool:
        """One statistic per a (k is 1 for every batch and size)."""
        return self.k == ONE

    @property
    def one_seg(self) -> bool:
        """One segment per statistic (for every batch and size)."""
        return self.nseg == ONE

    @property
    def stats(self) -> Extent:
        return self.a * self.k

    @property
    def units(self) -> Extent:
        return self.nseg * self.segu

    @property
    def count(self) -> Extent:
        return self.nseg * self.seg

    @property
    def fused_threads(self) -> int:
        return self.cache_threads if self.cached else BLOCK

    def parts(self, nb: int, sizes: dict[str, int] | None = None) -> int:
        s, nu = self.stats.value(nb, sizes), self.units.value(nb, sizes)
        if s >= FILL_BLOCKS or nu <= SPLIT_MIN_UNITS:
            return 1
        p = min(cdiv(SPLIT_BLOCKS, s), cdiv(nu, PART_MIN_UNITS), MAX_PARTS)
        return cdiv(nu, cdiv(nu, p))

    def grid(self, nb: int, parts: int, sizes: dict[str, int] | None = None) -> int:
        return self.stats.value(nb, sizes) * parts


@dataclass(frozen=True)
class Columns:
    a: Extent
    r1: Extent  # rows reduced over
    k: Extent  # statistics per row
    r2: int  # adjacent positions per statistic
    vec: int
    tx: int
    ty: int
    chan: str  # channel from a, r1 (row), w (position in the row)
    chan_per_unit: bool
    chan_rowfree: bool  # the channel does not depend on the row: parameters read once per thread

    @property
    def w(self) -> Extent:
        return self.k * Extent(self.r2)

    @property
    def wtype(self) -> str:
        """C type of a position in a row."""
        return _index_type(self.w)

    @property
    def wu(self) -> Extent:
        w = self.w
        return Extent(w.static // self.vec, w.batched, w.sizes)

    @property
    def nst(self) -> int:
        """Statistics per tile."""
        return self.tx * self.vec // self.r2

    @property
    def tiles(self) -> str:
        return f"({_ex(self.wu)} + {self.tx - 1}) / {self.tx}"

    @property
    def stats(self) -> Extent:
        return self.a * self.k

    @property
    def count(self) -> Extent:
        return self.r1 * Extent(self.r2)

    def ntiles(self, nb: int, sizes: dict[str, int] | None = None) -> int:
        return cdiv(self.wu.value(nb, sizes), self.tx)

    def parts(self, nb: int, sizes: dict[str, int] | None = None) -> int:
        b0, rows = self.a.value(nb, sizes) * self.ntiles(nb, sizes), self.r1.value(nb, sizes)
        if b0 >= FILL_BLOCKS or rows <= 2 * self.ty * PART_MIN_ROWS:
            return 1
        p = min(cdiv(SPLIT_BLOCKS, b0), cdiv(rows, self.ty * PART_MIN_ROWS), MAX_PARTS)
        return cdiv(rows, cdiv(rows, p))

    def grid(self, nb: int, parts: int, sizes: dict[str, int] | None = None) -> int:
        return self.a.value(nb, sizes) * self.ntiles(nb, sizes) * parts


@dataclass(frozen=True)
class GenericAxis:
    var: str
    extent: Extent
    stride: Extent
    channel_mul: int


@dataclass(frozen=True)
class Generic:
    kept: list[GenericAxis]  # innermost first
    reduced: list[GenericAxis]  # innermost first
    stats: Extent
    count: Extent

    def parts(self, nb: int, sizes: dict[str, int] | None = None) -> int:
        return 1

    def grid(self, nb: int, parts: int, sizes: dict[str, int] | None = None) -> int:
        return self.stats.value(nb, sizes)


@dataclass(frozen=True)
class CudaPlan:
    """Everything the CUDA templates and :class:`normgen.targets.cuda.module.CudaLayer` need beyond the plan."""

    plan: Plan
    T: str  # storage type
    A: str  # accumulation (and parameter) type
    vec: int  # elements of one 128-bit access
    to_acc: str
    to_elem: str
    headers: list[str]
    fma: str
    rsqrt: str
    ratio: str  # a / b for merge weights: __fdividef (2 ulp) in float, exact in double
    affine: Affine | None  # batch-norm predict
    family: str  # "segments" | "columns" | "generic": the reduction kernels
    reduce_role: str  # the function the reduction kernels serve
    segments: Segments | None
    columns: Columns | None
    generic: Generic | None
    #: how a statistic is taken (STATISTICS): "shifted" (mean and M2 of x − x0) or "mean_square"
    #: (RMSNorm: x0 and the mean fixed at 0, M2 = Σx²); the templates pick their statistic
    #: pieces by it
    statistic: str = "shifted"

    @property
    def constants(self) -> dict[str, int]:
        """The module's launch-shape constants, for the launchers' copy of the formulas."""
        return {k: globals()[k] for k in ("BLOCK", "MAX_GRID", "AFFINE_MAX_BLOCKS", "FILL_BLOCKS", "SPLIT_BLOCKS",
                                          "SPLIT_MIN_UNITS", "PART_MIN_UNITS", "PART_MIN_ROWS", "MAX_PARTS")}

    # ---- names ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def upper(self) -> str:
        return self.plan.upper

    @property
    def guard(self) -> str:
        return f"NORMGEN_{self.upper}_CUH"

    @property
    def namespace(self) -> str:
        return f"normgen_{self.name}"

    @property
    def update_running(self) -> bool:
        return self.reduce_role == "train_forward"

    @property
    def layout(self) -> Segments | Columns | Generic:
        return {"segments": self.segments, "columns": self.columns, "generic": self.generic}[self.family]

    def kernel(self, role: str, part: str) -> str:
        return f"{self.name}_{role}_{part}"

    @property
    def kernels(self) -> list[str]:
        """Every ``extern "C" __global__`` kernel of the .cu file."""
        out = [self.kernel("predict", "affine")] if self.affine else []
        out.append(self.kernel(self.reduce_role, "fused"))
        if self.family != "generic":
            out += [self.kernel(self.reduce_role, p) for p in ("partial", "finalize", "apply")]
        return out

    @property
    def runtime_params(self) -> bool:
        """Parameters come from a device ``NAME_params`` struct passed to every call."""
        return self.plan.runtime_params

    @property
    def params_type(self) -> str:
        return f"{self.name}_params"

    @property
    def param_arrays(self) -> dict[str, list[str]]:
        """Device arrays of the .cu (in the accumulation type): scale and offset (embedded, or the
        fixed constants of the ones the layer lacks, in every storage mode) and batch norm's folded
        a, b (embedded only)."""
        out = {}
        for k in AFFINE_ARRAYS:
            if k in self.plan.constants:
                out[k] = self.plan.constants[k]
            elif not self.runtime_params:
                out[k] = self.plan.params[k]
        if self.affine and not self.runtime_params:
            out.update({"fold_a": self.plan.folded["a"], "fold_b": self.plan.folded["b"]})
        return out

    @property
    def param_unit(self) -> str:
        return param_unit(self.plan)

    def array_doc(self, name: str) -> str:
        """The comment above device array ``name``."""
        per = f"one per {self.param_unit}"
        if name in self.plan.constants:
            value = "1" if name == "scale" else "0"
            return f"{name}: fixed at {value} (the layer has none to learn), {per}"
        return f"{name}, {per}"

    @property
    def param_locals(self) -> str:
        """Run-time parameters: lines opening a kernel body that reach the scale and offset the
        layer has through the struct (its constants are the device arrays); nothing otherwise."""
        if not self.runtime_params:
            return ""
        return "".join(f"    const acc_t *{k} = params->{k};\n" for k in AFFINE_ARRAYS if k in self.plan.params)

    def struct_ref(self, name: str, struct: str = "p") -> str:
        """Parameter ``name`` from the run-time struct pointer ``struct``, or its constant array."""
        return name if name in self.plan.constants else f"{struct}->{name}"

    @property
    def centered(self) -> bool:
        """Whether a statistic has a mean (and is shifted by x0 to take it)."""
        return self.statistic == "shifted"

    def shift(self, first: str, valid: str = "") -> str:
        """The shift x0 of a statistic whose first element is ``first`` (read only where the
        condition ``valid`` holds, 0 elsewhere): that element, or 0 where there is no mean (RMSNorm)."""
        if not self.centered:
            return "0"
        return f"{valid} ? to_acc({first}) : (acc_t)0" if valid else f"to_acc({first})"

    @property
    def cached_passes(self) -> str:
        """What the register-cached kernel's passes over its registers compute."""
        return ("two passes over them give the mean and the variance" if self.centered
                else "one pass over them gives the mean of x^2")

    @property
    def normalize_doc(self) -> str:
        """y as the kernels compute it from the statistic (comment text)."""
        return ("y = ((x - x0) - mean) * (rstd * scale) + offset" if self.centered
                else "y = x * (rstd * scale) + offset")

    @property
    def statistic_doc(self) -> list[str]:
        """The .cu file's note on how statistics are taken (comment lines)."""
        if self.centered:
            return [
                "Statistics are shifted by the first element x0 of their domain before they are accumulated",
                "(float for half/bfloat16/float, double for double), so the mean is x0 + mean(x - x0), and",
                "y = ((x - x0) - mean(x - x0)) * (rstd * scale) + offset stays accurate for a large mean.",
            ]
        return [
            "RMSNorm: no mean is subtracted. Each statistic is mean(x^2), summed in acc_t (float for",
            "half/bfloat16/float, double for double), and y = x * (rstd * scale) + offset with",
            "rstd = 1/sqrt(mean(x^2) + epsilon). The kernels are the centred ones with x0 and the mean",
            "fixed at 0: a statistic (n, 0, sum of x^2) merges with Chan's formula as a plain sum.",
        ]

    @staticmethod
    def op(e: Extent) -> str:
        """An extent as an operand of / or % (parenthesized when it is a product)."""
        return _ex(e)

    # ---- run-time sizes, as the templates spell them (all empty without run-time sizes) ----------
    @property
    def size_params(self) -> str:
        """A kernel's (and a host helper's) size parameters after ``int batch``: ``, size_t n_tokens``,
        the names its extents use. The size names themselves appear in the launchers' signatures
        only (names beginning with ``n_`` are no size's: no kernel name can collide with one)."""
        return "".join(f", size_t {size_local(n)}" for n in self.plan.sizes)

    @property
    def size_locals(self) -> str:
        """Lines a launcher declares after checking the sizes: their size_t locals (``n_tokens``)."""
        return "".join(f"    const size_t {size_local(n)} = (size_t){n};\n" for n in self.plan.sizes)

    @property
    def dim_params(self) -> str:
        """Helper parameters after ``size_t nb``: ``, size_t n_tokens``."""
        return "".join(f", size_t {size_local(n)}" for n in self.plan.sizes)

    @property
    def dim_args(self) -> str:
        """Helper arguments after ``nb``: ``, n_tokens``."""
        return "".join(f", {size_local(n)}" for n in self.plan.sizes)

    @property
    def dim_voids(self) -> str:
        """Lines a helper taking :attr:`dim_params` opens with (some helpers do not read them all)."""
        return "".join(f"    (void){size_local(n)};\n" for n in self.plan.sizes)

    @property
    def workspace_guard(self) -> list[str]:
        """NAME_workspace_size's check of the sizes: 0 for a size < 1 or an overflowing product."""
        return [line.replace(f"return {self.upper}_ERR_SIZE;", "return 0;") for line in self.plan.size_guard]

    @property
    def size_call(self) -> str:
        """A launcher's size arguments passed on to a host helper after ``batch``: ``, (size_t)tokens``."""
        return "".join(f", (size_t){n}" for n in self.plan.sizes)

    @property
    def size_pass(self) -> str:
        """A launcher's size arguments passed on to another ``extern "C"`` function: ``, tokens``."""
        return "".join(f", {n}" for n in self.plan.sizes)

    @property
    def size_decl(self) -> str:
        """The size parameters of an ``extern "C"`` function after ``int32_t batch``: ``, int32_t tokens``."""
        return "".join(f", int32_t {n}" for n in self.plan.sizes)

    @property
    def size_ptrs(self) -> str:
        """Kernel argument pointers of the sizes after ``(void *)&b``: ``, (void *)&n_tokens``."""
        return "".join(f", (void *)&{size_local(n)}" for n in self.plan.sizes)

    @property
    def launchers(self) -> list[Launcher]:
        """The host functions the .cu defines: :attr:`plain_launchers`, those of the roles a fused
        layer wraps made its static cores (``NAME_<fn>_core``, normgen/targets/cuda/fused.py)."""
        wrapped = self.plan.fusion.wrapped if self.plan.fusion is not None else ()
        return [dataclasses.replace(f, name=f"{f.name}_core", static=True) if f.role in wrapped else f
                for f in self.plain_launchers]

    @property
    def plain_launchers(self) -> list[Launcher]:
        """Host entry points: every plan function taking a stream, and a ``_ws`` variant (with a
        workspace) of the function that reduces."""
        out = []
        for f in dataclasses.replace(self.plan, core_roles=()).functions:
            reduces = f.role == self.reduce_role
            ptrs = "x, y" + (", running_mean, running_var" if f.role == "train_forward" else "")
            doc = f"{f.doc}\n * {ptrs} are device pointers; the kernels are queued on stream."
            if reduces:
                plain = doc + ("\n * Needs no workspace: one block per statistic (or per tile of statistics) reads"
                               f"\n * its whole domain; {f.name}_ws is faster when there are few statistics.")
                ws = doc + (f"\n * workspace: {self.name}_workspace_size({self.plan.macro_params}) bytes of device memory, 16-byte aligned"
                            "\n * (NULL allowed when that is 0); long reductions then split over many blocks."
                            f"\n * The result may differ in the last bits from {f.name} (another summation"
                            "\n * order); each is deterministic.")
                out.append(Launcher(f.role, f.name, f.args + ["cudaStream_t stream"], f.pointers, plain, False, True))
                out.append(Launcher(f.role, f.name + "_ws",
                                    f.args + ["void *workspace", "size_t workspace_bytes", "cudaStream_t stream"],
                                    f.pointers, ws, True, True))
            else:
                out.append(Launcher(f.role, f.name, f.args + ["cudaStream_t stream"], f.pointers, doc, False, False))
        return out

    # ---- launch shapes (mirrored by the launchers) ----------------------------------------------
    def _sizes(self, sizes: dict[str, int] | None) -> dict[str, int]:
        """The run-time sizes of one call, checked: every size of the plan, each >= 1."""
        sizes = dict(sizes or {})
        for n in self.plan.sizes:
            if n not in sizes:
                raise NormgenError(f"layer {self.name!r}: no value for run-time size {n!r}")
            if sizes[n] < 1:
                raise NormgenError(f"layer {self.name!r}: run-time size {n} must be >= 1, got {sizes[n]}")
        return sizes

    def parts(self, batch: int, workspace: bool = True, sizes: dict[str, int] | None = None) -> int:
        """How many parts each statistic's domain is split into (1: the fused kernel)."""
        return self.layout.parts(batch, self._sizes(sizes)) if workspace else 1

    def workspace_size(self, batch: int, sizes: dict[str, int] | None = None) -> int:
        """Bytes of workspace the _ws launcher needs for ``batch`` and the run-time ``sizes`` (0 when
        it needs none)."""
        p = self.parts(batch, True, sizes)
        if p == 1:
            return 0
        return self.layout.stats.value(batch, sizes) * (3 + 2 * p) * SIZEOF[self.A]

    @property
    def size_names(self) -> tuple[str, ...]:
        """The run-time sizes: kernel and launch arguments after batch, in format order."""
        return tuple(self.plan.sizes)

    def launches(self, role: str, batch: int, workspace: bool = True,
                 sizes: dict[str, int] | None = None) -> list[Launch]:
        """The kernels a launcher runs for ``batch`` and the run-time ``sizes``: the same grids and
        blocks as the .cu."""
        if batch < 1:
            raise NormgenError(f"batch must be >= 1, got {batch}")
        sizes = self._sizes(sizes)
        dims = ("batch", *self.size_names)
        lead = ("params",) if self.runtime_params else ()
        if role == "predict" and self.affine:
            return [Launch(self.kernel("predict", "affine"), self.affine.grid(batch, sizes), (BLOCK, 1, 1),
                           lead + ("x", "y") + dims)]
        if role != self.reduce_role:
            raise NormgenError(f"layer {self.name!r} has no function {role!r}")
        running = ("running_mean", "running_var") if self.update_running else ()
        lay = self.layout
        p = self.parts(batch, workspace, sizes)
        block = self.block
        if p == 1:
            g = lay.grid(batch, 1, sizes)
            self._check_grid(g)
            return [Launch(self.kernel(role, "fused"), g, self.fused_block, lead + ("x", "y") + dims + running)]
        g = lay.grid(batch, p, sizes)
        self._check_grid(g)
        return [
            Launch(self.kernel(role, "partial"), g, block, ("x",) + dims + ("parts", "workspace")),
            Launch(self.kernel(role, "finalize"), self.finalize_grid(batch, sizes), (BLOCK, 1, 1),
                   dims + ("parts",) + running + ("workspace",)),
            Launch(self.kernel(role, "apply"), g, block, lead + ("x", "y") + dims + ("parts", "workspace")),
        ]

    def finalize_grid(self, batch: int, sizes: dict[str, int] | None = None) -> int:
        """One warp per statistic."""
        return cdiv(self.layout.stats.value(batch, sizes), BLOCK // 32)

    def _check_grid(self, g: int) -> None:
        if g > MAX_GRID:
            raise NormgenError(f"layer {self.name!r}: the batch is too large for one grid ({g} blocks)")

    @property
    def block(self) -> tuple[int, int, int]:
        if self.family == "columns":
            return (self.columns.tx, self.columns.ty, 1)
        return (BLOCK, 1, 1)

    @property
    def fused_block(self) -> tuple[int, int, int]:
        if self.family == "segments":
            return (self.segments.fused_threads, 1, 1)
        return self.block

    # ---- traffic, for benchmarks (no pycuda needed) ---------------------------------------------
    def bytes_moved(self, role: str, batch: int, workspace: bool = True,
                    sizes: dict[str, int] | None = None) -> dict[str, int]:
        """Bytes of x and y: ``minimum`` (x read once, y written once) and ``actual`` (what the
        chosen kernels read and write, workspace and parameters left out)."""
        n = self.plan.elements.value(batch, sizes) * SIZEOF[self.T]
        reads = 1
        if not (role == "predict" and self.affine):
            fused = self.parts(batch, workspace, sizes) == 1
            reads = 1 if fused and self.family == "segments" and self.segments.cached else 2
        return {"minimum": 2 * n, "actual": (reads + 1) * n}


# ---- derivation ----------------------------------------------------------------------------------
def _affine(plan: Plan, vec: int) -> Affine:
    ax = plan.apply_axes
    c = next(i for i, a in enumerate(ax) if a.channel_mul)
    inner = _prod(a.extent for a in ax[c + 1:])
    if not inner.dynamic and inner.static % vec == 0:
        mode = "uniform"
    elif inner == ONE and plan.channels % vec == 0:
        mode = "consecutive"
    else:
        mode = "general"
    return Affine(plan.elements, plan.channels, inner, vec, mode)


def _fit4(groups: list[Group]) -> tuple[Group | None, Group | None, Group | None, Group | None] | None:
    """Match [A kept] [R1 reduced] [K kept] [R2 reduced]; None when the layout has more runs."""
    slots: list[Group | None] = [None, None, None, None]
    i = 0
    for slot, keep in enumerate((True, False, True, False)):
        if i < len(groups) and groups[i].keep == keep:
            slots[slot] = groups[i]
            i += 1
    if i != len(groups):
        return None
    return slots[0], slots[1], slots[2], slots[3]


def _ext(g: Group | None) -> Extent:
    return g.extent if g else ONE


def _axes_of(g: Group | None) -> tuple[Axis, ...]:
    return g.axes if g else ()


def _tile_units(wu: Extent, unit_group: int) -> int:
    """Units along the row per column block: a multiple of ``unit_group`` (so tiles hold whole
    statistics) near COLUMN_TX..2*COLUMN_TX, the whole row when it is that short, else the one
    that leaves the fewest idle threads in the last tile."""
    smallest = unit_group * cdiv(COLUMN_TX, unit_group)
    if wu.dynamic:
        return smallest
    if wu.static <= 2 * COLUMN_TX:
        return wu.static
    cands = range(smallest, max(smallest, 2 * COLUMN_TX) + 1, unit_group)
    return min(cands, key=lambda t: (cdiv(wu.static, t) * t - wu.static, -t))


#: Names the CUDA launchers declare or call beside their arguments, and the pycuda bench's launch
#: argument names: no run-time size may take one.
CUDA_SIZE_RESERVED = frozenset(
    """aargs aligned16 args b cargs cudaLaunchKernel cudaStream_t cws dargs dim3 fargs fgrid grid
    launch_failed margs need np null pargs parts sargs train_elem_grid train_launch_failed units
    uintptr_t""".split()
)


def _check_size_names(plan: Plan) -> None:
    """A run-time size is a parameter of the ``extern "C"`` launchers (the kernels take it as
    ``size_t n_NAME``), so it may not be a name those launchers' bodies declare or call
    (CUDA_SIZE_RESERVED), beyond the names every target reserves (normgen/description/layers.py)."""
    taken = [n for n in plan.sizes if n in CUDA_SIZE_RESERVED]
    if taken:
        raise NormgenError(
            f"layer {plan.name!r}: run-time size {taken[0]!r} is a name the cuda launchers use"
            f" (reserved there: {', '.join(sorted(CUDA_SIZE_RESERVED))}); choose another name"
        )


def derive(plan: Plan) -> CudaPlan:
    """A plan lowered for the cuda target → its CUDA launch shapes."""
    if (plan.ctype, plan.acc_type) not in TARGET_CTYPES["cuda"].values():
        raise NormgenError(f"plan of layer {plan.name!r} was not lowered for the cuda target: use lower(layer, 'cuda')")
    _check_size_names(plan)
    T, A = plan.ctype, plan.acc_type
    vec = VEC_BYTES // SIZEOF[T]
    regs_per_acc = SIZEOF[A] // 4
    affine = _affine(plan, vec) if plan.kind == "batchnorm" else None
    reduce_role = "train_forward" if plan.kind == "batchnorm" else "predict"
    groups = _groups(plan.axes)
    fit = _fit4(groups)
    segments = columns = generic = None
    if fit is not None:
        ga, gr1, gk, gr2 = fit
        if gk is None:
            # Rows: every kept axis outside, the domain is one contiguous run.
            run = _prod([_ext(gr1), _ext(gr2)])
            family = "segments"
            gk_ext, nseg, seg = ONE, ONE, run
            dom_axes = _axes_of(gr1) + _axes_of(gr2)
        elif gr2 is not None and (gr2.extent.dynamic or gr2.extent.static >= SEGMENT_MIN):
            family = "segments"
            gk_ext, nseg, seg = gk.extent, _ext(gr1), gr2.extent
            dom_axes = _axes_of(gr2)
        else:
            family = "columns"
        if family == "segments":
            # no vectors over a dynamic segment: its length need not be a multiple of vec
            v = vec if not seg.dynamic and seg.static % vec == 0 else 1
            units = nseg * Extent(seg.static // v, seg.batched, seg.sizes)
            items_max = max(1, CACHE_REGS // (v * regs_per_acc))
            cached = not units.dynamic and units.static <= CACHE_MAX_THREADS * items_max
            cthreads = min(CACHE_MAX_THREADS, max(32, 32 * cdiv(cdiv(units.static, items_max), 32))) if cached else 0
            items = cdiv(units.static, cthreads) if cached else 0
            chan_stat = _sum(_chan_terms(_axes_of(ga), "a") + _chan_terms(_axes_of(gk), "k"))
            r1_terms = _chan_terms(_axes_of(gr1), "r1") if gk is not None else []
            chan_dom = _sum(r1_terms + _chan_terms(dom_axes, "r2"))
            segments = Segments(
                a=_ext(ga), k=gk_ext, nseg=nseg, seg=seg, vec=v,
                astride=nseg * gk_ext * seg, kstride=seg if gk is not None else ONE, sstride=gk_ext * seg,
                cached=cached, cache_threads=cthreads, items=items,
                chan_stat=chan_stat, chan_dom=chan_dom, chan_per_unit=_uniform_over_unit(dom_axes, v),
                chan_vec=not r1_terms and _consecutive_over_unit(dom_axes, v),
            )
        else:
            r2 = _ext(gr2).static
            w = gk.extent * Extent(r2)
            v = vec if not w.dynamic and w.static % vec == 0 else 1
            wu = Extent(w.static // v, w.batched, w.sizes)
            unit_group = (r2 * v // math.gcd(r2, v)) // v  # units per whole number of statistics
            tx = _tile_units(wu, unit_group)
            ty = max(1, BLOCK // tx)
            r1 = _ext(gr1)
            if not r1.dynamic:
                ty = min(ty, r1.static)
            w_axes = _axes_of(gk) + _axes_of(gr2)
            row_terms = _chan_terms(_axes_of(gr1), "r1")
            chan = _sum(_chan_terms(_axes_of(ga), "a") + row_terms + _chan_terms(w_axes, "w"))
            columns = Columns(a=_ext(ga), r1=r1, k=gk.extent, r2=r2, vec=v, tx=tx, ty=ty, chan=chan,
                              chan_per_unit=_uniform_over_unit(w_axes, v), chan_rowfree=not row_terms)
    else:
        family = "generic"
        if plan.kind == "batchnorm":
            raise AssertionError("batch norm keeps only C: its layout always fits [R1][K][R2]")
        kept = [GenericAxis(a.var, a.extent, a.stride, a.channel_mul) for a in reversed(plan.axes) if a.keep]
        red = [GenericAxis(a.var, a.extent, a.stride, a.channel_mul) for a in reversed(plan.axes) if not a.keep]
        generic = Generic(kept, red, _prod(a.extent for a in kept), _prod(a.extent for a in red))
    conv = CONVERT[T]
    return CudaPlan(
        plan=plan, T=T, A=A, vec=vec, to_acc=conv[0], to_elem=conv[1], headers=HEADERS.get(T, []),
        fma="fmaf" if A == "float" else "fma", rsqrt="rsqrtf" if A == "float" else "rsqrt",
        ratio="__fdividef(a, b)" if A == "float" else "a / b",
        affine=affine, family=family, reduce_role=reduce_role,
        segments=segments, columns=columns, generic=generic,
        statistic=STATISTICS[plan.semantics.statistic],
    )


def cuda_plan(layer) -> CudaPlan:
    """A layer → its CUDA plan (lowered for the cuda target)."""
    from ...lowering import lower

    return derive(lower(layer, "cuda"))
