"""How the C core walks one statistic block: contiguous *runs*, accumulator *lanes*, OpenMP.

Derived from a :class:`normgen.plan.Plan` (``plan.sweep``); the templates only substitute it.

The core computes each statistic block's statistics chunk by chunk (two passes over a
cache-sized chunk, Chan's merge between chunks), then normalizes the block. Both passes walk
the block as *outer loops* around an innermost *run* over consecutive elements:

* **rows** (one statistic per block): the run is the innermost reduced axis. Its elements are
  summed into ``lanes`` independent partial sums (lane ``l`` takes element ``l`` of each block
  of ``lanes`` elements, and of the short block at the end), so the compiler vectorizes the sum
  without reassociating anything: the result is the same bits at every optimization level, no
  ``-ffast-math`` needed.
* **columns** (several statistics side by side in memory, e.g. channels-last batch norm or group
  norm): the run is the whole contiguous block of ``W`` inner elements (every axis after the
  chunk axis, flattened into ``j``), and lane ``j`` is column ``j``: a run adds one row of the
  block to ``W`` partial sums, again vectorized without reassociation. Each chunk's lanes are
  then added into the statistics they belong to (``lane_acc_expr``).

Partial sums are kept in the element type (eight float lanes per AVX register): a chunk is
short (at most ``CHUNK_ELEMS`` elements, at most ``CHUNK_ROWS`` per column), so each lane adds
a few hundred values at most, and the chunk's statistics use the *corrected* two-pass formula
(Chan, Golub & LeVeque): with m the chunk's first-pass mean rounded to the element type and
d = x - m, mean = m + sum(d)/n and M2 = sum(d^2) - sum(d)^2/n, which removes the error of m.
Chunks are merged in double (Chan's formula).

While the deviations of a chunk are summed from cache, the next chunk of the block is
prefetched (``NAME_PREFETCH``: ``__builtin_prefetch`` where the compiler has it, nothing
elsewhere), so that memory keeps streaming while the core computes.

The normalize pass is one subtract-subtract-multiply-add per element on the same runs,
``y = ((x - mean_hi) - mean_lo) * (rstd * scale[c]) + offset[c]``, reading per-column copies of
the statistic (``norm_lanes`` of them) in the columns case.
"""

from __future__ import annotations

from dataclasses import dataclass

from .plan import Axis, Extent, Loop, Plan, _offset

#: Bytes of independent partial sums in a rows run: 128 bytes are four AVX registers (eight
#: SSE2 ones), enough to hide the latency of the adds: 32 float lanes or 16 double lanes.
LANE_BYTES = 128
LANE_SIZES = {"float": 4, "double": 8}
#: Elements an OpenMP thread takes at a time (schedule(dynamic, n)).
OMP_GRAIN = 16384


def _static_elems(axes: list[Axis]) -> int:
    """Elements of a loop nest, counting a batched extent's static part only."""
    n = 1
    for a in axes:
        n *= a.extent.static
    return max(n, 1)


@dataclass(frozen=True)
class Sweep:
    blocked: bool  # rows: lanes are consecutive elements of a run; columns: lane j is column j
    lanes: int  # partial sums of one chunk
    outer: list[Loop]  # statistics pass: loops around the run (the chunk axis from c0 to c1)
    outer_full: list[Loop]  # normalize pass: the same loops over the whole block
    run: Loop  # statistics pass: the innermost loop
    run_full: Loop  # normalize pass: the innermost loop
    base_expr: str  # offset of the run's element 0, from the statistic and outer loop variables
    stride: str  # distance between consecutive run elements ("1": contiguous)
    lane_acc_expr: str  # the statistic (accumulator k) lane j adds into
    norm_lanes: int  # per-lane copies of the statistics the normalize pass reads (0: none, it reads k = 0)
    channel_expr: str  # channel of run element run.var
    omp_stat_collapse: int  # OpenMP: collapse(n) over the statistic loops (0: no pragma there)
    omp_norm: bool  # OpenMP: one statistic block only: parallel normalize over its outer loop
    omp_apply_collapse: int  # OpenMP: batch-norm predict: collapse(n) over its outer loops (0: none)
    omp_stat_chunk: int = 1  # iterations a thread takes at a time (schedule(dynamic, n)) at each site
    omp_norm_chunk: int = 1
    omp_apply_chunk: int = 1
    ctype: str = "float"
    split_mean: bool = True  # the mean is hi + lo in the element type (float32)
    norm: str = "rows"  # how pass 2 spells an element: see the properties below
    prefetch_shift: str = ""  # the next chunk's element is this far from the current one ("": no prefetch)
    prefetch_if: str = ""  # ... when this holds (there is a next chunk)
    line: int = 16  # elements of a 64-byte cache line

    @property
    def prefetch(self) -> bool:
        return bool(self.prefetch_shift)

    def at(self, index: str) -> str:
        """The offset from the run's base of run element ``index``."""
        return index if self.stride == "1" else f"({index}) * {self.stride}"

    # ---- pass 2, y = (x - mean) * rstd * scale[c] + offset[c], four ways:
    # "rows": one statistic, the channel varies along the run:
    #     y = ((x - hi) - lo) * (rs * scale[c]) + offset[c]
    # "rows_const": one statistic, one channel per run: g = rs * scale[c] and b = offset[c] - lo * g
    #     before the run, y = (x - hi) * g + b
    # "columns_fold": lane j's channel is fixed by j (and the statistic loops): g[j], b[j] per
    #     block, y = (x - hi[j]) * g[j] + b[j]
    # "columns": the channel varies with the chunk axis: y = ((x - hi[j]) - lo[j]) * (rs[j] * scale[c]) + offset[c]

    @property
    def lane_arrays(self) -> list[str]:
        """Per-column copies of the statistics pass 2 reads."""
        if self.norm == "columns_fold":
            return ["lhi", "lg", "lb"]
        if self.norm == "columns":
            return ["lhi", "llo", "lrs"] if self.split_mean else ["lhi", "lrs"]
        return []

    @property
    def lane_fill(self) -> list[str]:
        """Statements filling the lane arrays for column j of statistic k."""
        t = self.ctype
        lo = "mlo[k] * g" if self.split_mean else ""
        if self.norm == "columns_fold":
            b = f"offset[{self.channel_expr}]" + (f" - {lo}" if lo else "")
            return ["lhi[j] = mhi[k];", f"const {t} g = rs[k] * scale[{self.channel_expr}];", "lg[j] = g;", f"lb[j] = {b};"]
        return [f"{name}[j] = {src}[k];" for name, src in (("lhi", "mhi"), ("llo", "mlo"), ("lrs", "rs"))
                if name in self.lane_arrays]

    @property
    def norm_pre(self) -> list[str]:
        """Statements before each run of pass 2."""
        if self.norm != "rows_const":
            return []
        t = self.ctype
        b = f"offset[{self.channel_expr}]" + (" - mlo[0] * g" if self.split_mean else "")
        return [f"const {t} g = rs[0] * scale[{self.channel_expr}];", f"const {t} b = {b};"]

    def norm_stmt(self, x: str) -> str:
        """Pass 2's expression for the element x."""
        c = self.channel_expr
        if self.norm == "rows_const":
            return f"({x} - mhi[0]) * g + b"
        if self.norm == "columns_fold":
            return f"({x} - lhi[j]) * lg[j] + lb[j]"
        hi, lo, rs = ("mhi[0]", "mlo[0]", "rs[0]") if self.norm == "rows" else ("lhi[j]", "llo[j]", "lrs[j]")
        centered = f"({x} - {hi}) - {lo}" if self.split_mean else f"{x} - {hi}"
        return f"({centered}) * ({rs} * scale[{c}]) + offset[{c}]"


def _digit(var: str, stride: int, extent: int, total: int) -> str:
    """The index of an axis of (stride, extent) inside a flattened index ``var`` < total."""
    q = var if stride == 1 else f"{var} / {stride}"
    if stride * extent >= total:
        return q
    return f"{q} % {extent}" if stride == 1 else f"({q}) % {extent}"


def _flat_terms(axes: list[Axis], var: str, total: int, weight) -> list[str]:
    """sum of weight(axis) * (index of the axis in ``var``) over axes with a nonzero weight; a
    contiguous chain of axes whose weights equal their strides collapses into ``var % span``."""
    used = [a for a in axes if weight(a)]
    if not used:
        return []
    chain = sorted(used, key=lambda a: a.stride.static)
    contiguous = chain[0].stride.static == 1 and all(weight(a) == a.stride.static for a in chain) and all(
        nxt.stride.static == cur.stride.static * cur.extent.static for cur, nxt in zip(chain, chain[1:], strict=False)
    )
    if contiguous:
        span = chain[-1].stride.static * chain[-1].extent.static
        return [var if span >= total else f"{var} % {span}"]
    terms = []
    for a in used:
        d = _digit(var, a.stride.static, a.extent.static, total)
        w = weight(a)
        terms.append(d if w == 1 else f"({d}) * {w}")
    return terms


def _sum(terms: list[str]) -> str:
    return " + ".join(terms) if terms else "0"


def _acc_muls(domain: list[Axis]) -> dict[str, int]:
    """Accumulator index multiplier of each kept domain axis (row-major over the kept axes)."""
    muls = {}
    mul = 1
    for a in reversed(domain):
        if a.keep:
            muls[a.var] = mul
            mul *= a.extent.static
    return muls


def sweep_of(plan: Plan) -> Sweep:
    openmp = plan.parallel == "openmp"
    domain = plan.domain_axes
    stat = plan.stat_axes
    n_apply = len(plan.apply_axes)
    omp_apply = (max(1, n_apply - 1) if n_apply > 1 else 1) if openmp else 0
    # OpenMP hands out work dynamically, about OMP_GRAIN elements at a time, so that a thread
    # that was descheduled holds the others up by little; which thread computes a block does
    # not change its bits.
    apply_inner = _static_elems(plan.apply_axes[omp_apply:]) if omp_apply else 1
    omp_apply_chunk = max(1, OMP_GRAIN // apply_inner)
    omp_stat_chunk = max(1, OMP_GRAIN // _static_elems(domain))
    lanes = LANE_BYTES // LANE_SIZES[plan.ctype]
    line = 64 // LANE_SIZES[plan.ctype]
    # While the second pass of a chunk runs from cache, fetch the next chunk of the same block:
    # the same elements, chunk_iters steps further along the chunk axis.
    chunk = plan.chunk_axis
    shift = Extent(chunk.stride.static * plan.chunk_iters, chunk.stride.batched).expr()
    more = f"{chunk.var} + {plan.chunk_iters} < {chunk.count}"
    if plan.strategy == "rows":
        run_axis = domain[-1]
        if len(domain) == 1:
            outer, outer_full = [], []
            run = Loop(run_axis.var, "c0", "c1")
            # the chunk axis is the run itself: the whole block of lanes must exist
            more = f"{chunk.var} + {plan.chunk_iters + lanes} <= {chunk.count}"
        else:
            first = domain[0]
            outer = [Loop(first.var, "c0", "c1")] + plan.loops(domain[1:-1])
            outer_full = plan.loops(domain[:-1])
            run = Loop(run_axis.var, "0", run_axis.count)
        run_full = Loop(run_axis.var, "0", run_axis.count)
        base = _offset([a for a in plan.axes if a.var != run_axis.var])
        return Sweep(
            blocked=True, lanes=lanes, outer=outer, outer_full=outer_full, run=run, run_full=run_full,
            base_expr=base, stride=run_axis.step, lane_acc_expr="0", norm_lanes=0,
            channel_expr=plan.channel_expr,
            omp_stat_collapse=len(stat) if openmp else 0,
            omp_norm=openmp and not stat and bool(outer_full),
            omp_apply_collapse=omp_apply,
            omp_stat_chunk=omp_stat_chunk, omp_apply_chunk=omp_apply_chunk,
            omp_norm_chunk=max(1, OMP_GRAIN // _static_elems(domain[len(domain) - 1:])),
            ctype=plan.ctype, split_mean=plan.split_mean,
            norm="rows" if run_axis.channel_mul else "rows_const",
            prefetch_shift=shift if run_axis.step == "1" else "", prefetch_if=more, line=line,
        )
    first, inner = domain[0], domain[1:]
    width = 1
    for a in inner:
        width *= a.extent.static
    muls = _acc_muls(domain)
    lane_acc = _sum(_flat_terms(inner, "j", width, lambda a: muls.get(a.var, 0)))
    inner_vars = {a.var for a in inner}
    outer_channel = [a for a in plan.axes if a.channel_mul and a.var not in inner_vars]
    channel = [a.var if a.channel_mul == 1 else f"{a.var} * {a.channel_mul}" for a in outer_channel]
    channel += _flat_terms(inner, "j", width, lambda a: a.channel_mul)
    return Sweep(
        blocked=False, lanes=width,
        outer=[Loop(first.var, "c0", "c1")], outer_full=[Loop(first.var, "0", first.count)],
        run=Loop("j", "0", str(width)), run_full=Loop("j", "0", str(width)),
        base_expr=_offset(stat + [first]), stride="1", lane_acc_expr=lane_acc, norm_lanes=width,
        channel_expr=_sum(channel),
        omp_stat_collapse=len(stat) if openmp else 0,
        omp_norm=openmp and not stat,
        omp_apply_collapse=omp_apply,
        omp_stat_chunk=omp_stat_chunk, omp_apply_chunk=omp_apply_chunk,
        omp_norm_chunk=max(1, OMP_GRAIN // width),
        ctype=plan.ctype, split_mean=plan.split_mean,
        norm="columns" if first.channel_mul else "columns_fold",
        prefetch_shift=shift, prefetch_if=more, line=line,
    )
