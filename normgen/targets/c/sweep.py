"""How the C core walks one statistic block: contiguous *runs*, accumulator *lanes*, OpenMP.

Derived from a :class:`normgen.lowering.plan.Plan` (``sweep_of(plan)``, the C target's plan extension); the templates only substitute it.

The core computes each statistic block's statistics chunk by chunk (cache-sized chunks,
Chan's merge between chunks), then normalizes the block. Both passes walk
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
short (at most ``CHUNK_ELEMS`` elements, ``COLUMN_CHUNK_ELEMS`` for columns, at most
``CHUNK_ROWS`` per column), so each lane adds
a few hundred values at most. Chunks are merged in double (Chan's formula).

*Rows* take a chunk's statistics in one sweep: the sums of d = x - K and d^2 about a shift K
(the mean of the block's first ``shift_probe`` elements for its first chunk, the block's mean
so far after that), mean = K + sum(d)/n and M2 = sum(d^2) - sum(d)^2/n. That is exact as long
as K is near the chunk's mean; where it is more than one standard deviation off (sum(d)^2 >
n * sum(d^2) / 2: M2 would lose more than one bit to the cancellation), the chunk is redone,
from cache, as the corrected two-pass below. *Columns* do the same with each column's mean so
far as its K (the first chunk always a two-pass), summing ``tile`` columns at a time in
registers over all the rows of a chunk while the same columns ``tile_ahead`` rows on are
fetched. The training
backward always uses the corrected two-pass (Chan, Golub & LeVeque): with m the chunk's
first-pass mean rounded to the element type and d = x - m, mean = m + sum(d)/n and
M2 = sum(d^2) - sum(d)^2/n, which removes the error of m.

While the deviations of a chunk are summed, the next chunk of the block is prefetched
(``NAME_PREFETCH``: ``__builtin_prefetch`` where the compiler has it, nothing elsewhere), so
that memory keeps streaming while the core computes.

*Pipelined* rows (one thread): the statistic loops are flattened into one index sb, and the
statistics sweep of block sb + 1 runs in the same loop as the normalize pass of block sb (its
own lane loop over the same elements), so that x streams in from memory while y is written.
A block's statistics are the same bits either way: the OpenMP variant computes each block on
its own and agrees exactly.

The normalize pass is one subtract-subtract-multiply-add per element on the same runs,
``y = ((x - mean_hi) - mean_lo) * (rstd * scale[c]) + offset[c]``, reading per-column copies of
the statistic (``norm_lanes`` of them) in the columns case. Where every row of a columns
block is whole 64-byte lines (``rotate``), pass 2 takes the block as rows that begin on y's first
line, with rotated copies of those per-column values, so that no line of y is split between two
rows.

The training backward walks the same runs and lanes (see the comment above ``grad_cols``): its
gradient sums ride on the statistics' second sweep, so that x and dy are each read once to
compute them, and one more elementwise pass writes dx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...lowering.plan import CTYPE_SIZES, Axis, Extent, Loop, Plan, Rotation, _offset, rows_of_whole_lines

#: Bytes of independent partial sums in a rows run: 128 bytes are four AVX registers (eight
#: SSE2 ones), enough to hide the latency of the adds: 32 float lanes or 16 double lanes.
LANE_BYTES = 128
LANE_SIZES = CTYPE_SIZES
#: Rows: elements whose mean is the first chunk's shift (within about a third of a standard
#: deviation of the block's mean for most data, so the one-sweep statistics rarely need redoing).
SHIFT_PROBE = 8
#: The suffix of the rotated copies of per-column arrays (``Sweep.rotate``).
ROTATED = "_r"
#: Columns: the statistics tiles fetch the same columns this many rows ahead.
TILE_PREFETCH_ROWS = 16
#: Columns: the statistics tiles also fetch the next tile's columns of the row they are on, where
#: rows are at least this many bytes apart (a tile's walk down the chunk then steps from page to
#: page, which the hardware prefetchers do not follow: float64 rows of 1024 channels, 8 KB apart,
#: ran their training forward 7-11 % faster so, benchmarks/README.md).
TILE_PREFETCH_NEXT_BYTES = 4096
#: Rows: a lane loop of at most this many iterations is kept a loop (NAME_LANE_LOOP, GCC's
#: ``unroll 1``). GCC unrolls such a short loop completely (16 is its limit for a complete peel)
#: and then vectorizes the run loop around the straight-line lanes, transposing each group of
#: blocks with permutations: float64 rows (16 double lanes of 128 bytes) ran 1.6x slower that way
#: than with the lane loop vectorized (benchmarks/README.md). Unrolling changes no arithmetic.
UNROLLED_LANES = 16
#: backward_saved: its one sweep of x and dy fetches the next chunk of both meanwhile where the
#: hardware prefetchers do not follow the chunks: rows whose next chunk is not the next memory
#: (batch norm NCHW: a channel's chunks are samples apart), or columns whose rows are at least
#: this many bytes and less than TILE_PREFETCH_NEXT_BYTES (channels-last group norm's 1280-byte
#: rows). Measured (benchmarks/README.md): 8-12 % and 31-34 % faster there; 0-6 % slower with the
#: next chunk adjacent (group norm NCHW), 11-17 % with channels-last batch norm's 256-byte rows and
#: 8-10 % with float64 rows of 8 KB, which keep their code.
SAVED_PREFETCH_ROW_BYTES = 1024
#: Elements an OpenMP thread takes at a time (schedule(dynamic, n)).
OMP_GRAIN = 16384
#: Backward, rows strategy with the channel along the run: runs whose dy and dy * xhat the per-channel
#: partial sums (element type) take before they are added into the accumulator type.
CHANNEL_RUNS = 16
#: Backward, rows strategy: blocks of lanes whose products the element-type gradient lanes sum
#: before they are moved into lanes of the accumulator type.
GRAD_BLOCKS = 8


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
    acc_type: str = "double"  # the type statistics and gradient sums are merged in
    channel_lane: str = "0"  # rows: the channel of blocked run element ``run.var + l``; columns: channel_expr
    run_blocks: bool = True  # rows: a run can hold a whole block of lanes (else only the short block is emitted)
    channels: int = 1
    local_channels: int = 1  # rows: channels of one statistic block (its reduced channel axis, else 1)
    local_channel_expr: str = "0"  # rows: the channel's index among them (the domain's channel axis)
    stat_channel_expr: str = ""  # rows: the channel of local channel 0 ("": 0), followed by " + "
    partials_from: str = "0"  # rows, channel along the run: the channel of run element 0
    partials_len: int = 1  # ... and the channels of a run
    nacc: int = 1  # statistics of a block
    #: rows, one thread: block sb + 1's statistics sweep is fused with block sb's normalize pass
    #: (the statistic loops flattened into one index sb, ``stat_blocks`` of them)
    pipelined: bool = False
    #: the function applied to each output (a fused activation, Plan.act_fn), or ""
    act: str = ""
    stat_blocks: str = "1"
    stat_index: tuple[str, ...] = ()  # statements giving the statistic loops' variables from sb
    stat_first: tuple[str, ...] = ()  # ... their values for block 0
    next_shift: str = "0"  # elements from a block's first element to the next block's
    block_first: str = "0"  # offset of a block's first element, from the statistic loops' variables
    #: rows: leading elements of a block's first run whose mean is the first chunk's shift K
    shift_probe: int = 1
    #: ... where the run's length is known at run time only: the C expression for that count, at most
    #: shift_probe ("": shift_probe itself)
    shift_probe_count: str = ""
    #: columns: the statistics sum ``tile`` columns at a time in registers over a chunk's rows,
    #: fetching the same columns ``tile_ahead`` rows on (``tile_shift`` elements)
    tile: int = 1
    tile_ahead: int = 0
    tile_shift: str = "0"
    tile_next: bool = False  # ... and the next tile's columns of the same row (TILE_PREFETCH_NEXT_BYTES)
    #: backward_saved's sweep fetches the next chunk of x and dy (SAVED_PREFETCH_ROW_BYTES)
    saved_prefetch: bool = False
    #: columns, where pass 2 reads per-column values only ("columns_fold") and the block's rows
    #: lie back to back as whole 64-byte lines: pass 2 walks the block as rows that
    #: begin on y's first line, with the per-column values rotated to match (``norm_rotated``), so
    #: that no line of y is split between two rows
    rotate: bool = False
    #: batch-norm predict's rows of whole lines (Plan.apply_rotate), written rotated
    apply_rotation: Rotation | None = None
    #: how a block's statistic is taken (core.j2's ``statistic`` table): "shifted" (mean and M2 about
    #: a shift, redone as a two-pass where the shift is too far off) or "mean_square" (RMSNorm)
    statistic: str = "shifted"
    per_acc_tail: int = 1  # columns: the columns of one statistic
    offset: bool = True  # the layer has an offset (RMSNorm's pass 2 leaves out a fixed offset of 0)
    #: batch norm's backward_frozen, where the channel is fixed along the contiguous innermost run
    #: (NCHW): dscale's and doffset's sums over a run go through this many independent lanes of the
    #: accumulator type, added into the channel's sums in lane order at the run's end, so that
    #: the compiler vectorizes them without reassociating (0: the channel varies along the run,
    #: and each element adds into its channel's sums directly)
    frozen_lanes: int = 0
    #: rows: lines before each loop over a block of lanes (UNROLLED_LANES), and whether the layer's
    #: file defines NAME_LANE_LOOP for them (a fused activation's helpers define it otherwise)
    lane_loop: tuple[str, ...] = ()
    define_lane_loop: bool = False

    @property
    def centered(self) -> bool:
        return self.statistic == "shifted"

    @property
    def separate_grad_sweep(self) -> bool:
        """backward: the gradient sums take a sweep of their own after the statistics (RMSNorm,
        whose statistic has no second sweep for them to ride on) instead of riding on it."""
        return not self.centered

    @property
    def mean_gradient(self) -> str:
        """The term of dx's r[k] from the mean's gradient (none without a mean: RMSNorm)."""
        return " - s1[k] / n" if self.centered else ""

    @property
    def unused_sums(self) -> list[str]:
        """backward: statements marking sums the dx of this statistic does not read."""
        return [] if self.centered else ["(void)s1; /* no mean, so its gradient sum(g) is not needed */"]

    @property
    def square_merge(self) -> list[str]:
        """mean_square: statements adding a chunk's lanes of x^2 into m2 and n."""
        if self.blocked:
            return [f"{self.acc_type} s2 = 0;", f"for (size_t l = 0; l < {self.lanes}; ++l) {{", "    s2 += lane2[l];",
                    "}", "m2[0] += s2;", f"n += ({self.acc_type})((c1 - c0) * {self.per_acc_tail_expr});"]
        return [f"for (size_t j = 0; j < {self.lanes}; ++j) {{", f"    m2[{self.lane_acc_expr}] += lane2[j];", "}",
                f"n += ({self.acc_type})(c1 - c0);"]

    @property
    def square_finish(self) -> list[str]:
        """mean_square: statements after the last chunk (columns: n counts every column's rows)."""
        return [] if self.blocked or self.per_acc_tail == 1 else [f"n *= {self.per_acc_tail};"]

    per_acc_tail_expr: str = "1"  # rows: reduced elements per chunk-axis step (plan.per_acc_tail)

    @property
    def tiles(self) -> list[tuple[str, int]]:
        """columns: (first column, columns) of the tile loops: the full tiles (a loop over j0),
        then the short one at the end."""
        full, tail = divmod(self.lanes, self.tile)
        out = [("j0", self.tile)] if full else []
        if tail:
            out.append((str(full * self.tile), tail))
        return out

    @property
    def prefetch(self) -> bool:
        return bool(self.prefetch_shift)

    def at(self, index: str) -> str:
        """The offset from the run's base of run element ``index``."""
        return index if self.stride == "1" else f"({index}) * {self.stride}"

    def norm_lane(self, x: str) -> str:
        """Pass 2's expression for blocked run element ``run.var + l`` (the fused sweep)."""
        return self._act(self.norm_stmt(x, self.channel_lane))

    def _act(self, expr: str) -> str:
        """The output: the normalized element, activated where the layer fuses an activation."""
        return f"{self.act}({expr})" if self.act else expr

    # ---- pass 2, y = (x - mean) * rstd * scale[c] + offset[c], four ways:
    # "rows": one statistic, the channel varies along the run:
    #     y = ((x - hi) - lo) * (rs * scale[c]) + offset[c]
    # "rows_const": one statistic, one channel per run: g = rs * scale[c] and b = offset[c] - lo * g
    #     before the run, y = (x - hi) * g + b
    # "columns_fold": lane j's channel is fixed by j (and the statistic loops): g[j], b[j] per
    #     block, y = (x - hi[j]) * g[j] + b[j]
    # "columns": the channel varies with the chunk axis: y = ((x - hi[j]) - lo[j]) * (rs[j] * scale[c]) + offset[c]

    # Without a mean (RMSNorm, ``centered`` False) the same four ways leave out hi, lo (and the
    # offset where the layer has none): y = x * (rs * scale[c]) [+ offset[c]], x * g [+ b],
    # x * g[j] [+ b[j]].

    @property
    def block_arrays(self) -> list[str]:
        """The per-statistic values pass 2 reads: the mean as hi (+ lo) in T, and rs."""
        if not self.centered:
            return ["rs"]
        return ["mhi", "mlo", "rs"] if self.split_mean else ["mhi", "rs"]

    @property
    def mean_parts(self) -> list[str]:
        """Statements setting the mean's hi (and lo) part of statistic k (none without a mean)."""
        t, a = self.ctype, self.acc_type
        if not self.centered:
            return []
        if not self.split_mean:
            return [f"mhi[k] = ({t})(mean[k] + mean_lo[k]);"]
        return [f"mhi[k] = ({t})mean[k];", f"mlo[k] = ({t})((mean[k] - ({a})mhi[k]) + mean_lo[k]);"]

    @property
    def dx_weight(self) -> str:
        """backward: dx's factor r, 0 for a statistic of one element where the mean is subtracted
        (x - mean = 0: y does not depend on x); RMSNorm's y = x / sqrt(x^2 + eps) does."""
        return "n > 1 ? inv[k] : 0" if self.centered else "inv[k]"

    @property
    def saved_mean(self) -> str:
        """What train_forward_save saves as statistic k's mean (RMSNorm subtracts none: 0)."""
        return "mean[k]" if self.centered else "0"

    def _plus(self, term: str) -> str:
        """`` + term`` where RMSNorm has an offset (always for the other kinds)."""
        return f" + {term}" if self.centered or self.offset else ""

    @property
    def lane_arrays(self) -> list[str]:
        """Per-column copies of the statistics pass 2 reads."""
        if not self.centered:
            return {"columns_fold": ["lg"] + (["lb"] if self.offset else []), "columns": ["lrs"]}.get(self.norm, [])
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
        if not self.centered and self.norm == "columns_fold":
            return [f"const {t} g = rs[k] * scale[{self.channel_expr}];", "lg[j] = g;"] + (
                [f"lb[j] = offset[{self.channel_expr}];"] if self.offset else [])
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
        if not self.centered:
            return [f"const {t} g = rs[0] * scale[{self.channel_expr}];"] + (
                [f"const {t} b = offset[{self.channel_expr}];"] if self.offset else [])
        b = f"offset[{self.channel_expr}]" + (" - mlo[0] * g" if self.split_mean else "")
        return [f"const {t} g = rs[0] * scale[{self.channel_expr}];", f"const {t} b = {b};"]

    def norm_body(self, i: str, target: str = "") -> list[str]:
        """Pass 2's statement for run element ``i`` (``target``: where y goes instead of yr[i],
        a buffer that is streamed out)."""
        return [f"{target or f'yr[{i}]'} = {self._act(self.norm_stmt(f'xr[{i}]'))};"]

    @property
    def rotation(self) -> Rotation | None:
        """rotate: the block's rows, and the per-column arrays pass 2 reads, rotated (norm_rotated
        reads them)."""
        if not self.rotate:
            return None
        return Rotation(self.lanes, self.outer_full[0], self.run_full.var,
                        self.block_first if self.block_first != "0" else "",
                        tuple((a, a + ROTATED) for a in self.lane_arrays), self.omp_norm_chunk)

    def norm_rotated(self, i: str, target: str = "") -> list[str]:
        """norm_body reading the rotated copies of the per-column values (``rotate``) for column
        ``i`` of a row."""
        return [f"{target or f'yr[{i}]'} = {self._act(self.norm_stmt(f'xr[{i}]', lanes=ROTATED, column=i))};"]

    def norm_stmt(self, x: str, channel: str = "", lanes: str = "", column: str = "j") -> str:
        """Pass 2's expression for the element x (of channel ``channel``: channel_expr by default;
        ``lanes``: the suffix of the per-column arrays it reads, at ``column``)."""
        c = channel or self.channel_expr
        j = column
        if not self.centered:
            if self.norm == "rows_const":
                return f"{x} * g{self._plus('b')}"
            if self.norm == "columns_fold":
                return f"{x} * lg{lanes}[{j}]{self._plus(f'lb{lanes}[{j}]')}"
            rs = "rs[0]" if self.norm == "rows" else f"lrs{lanes}[{j}]"
            return f"{x} * ({rs} * scale[{c}]){self._plus(f'offset[{c}]')}"
        if self.norm == "rows_const":
            return f"({x} - mhi[0]) * g + b"
        if self.norm == "columns_fold":
            return f"({x} - lhi{lanes}[{j}]) * lg{lanes}[{j}] + lb{lanes}[{j}]"
        hi, lo, rs = ("mhi[0]", "mlo[0]", "rs[0]") if self.norm == "rows" else ("lhi[j]", "llo[j]", "lrs[j]")
        centered = f"({x} - {hi}) - {lo}" if self.split_mean else f"{x} - {hi}"
        return f"({centered}) * ({rs} * scale[{c}]) + offset[{c}]"

    # ---- the training backward (core.j2 `statistics` and `backward`, c/train.c.j2), per block:
    #
    # Gradient sums: lanes sum, per chunk, dy and dy * dev, or g = scale[c] * dy and g * dev where a
    # lane mixes channels ("rows", "columns"), with dev = x - shift in T (exact for a large mean).
    # In `backward` they ride on the statistics' second sweep (shift: the chunk's own mean m, or
    # lmean[j] per column: x and dy are read once); in `backward_saved` they are a sweep of their
    # own (shift: the saved mean). The products are rounded to T once; their sums are A: rows keep
    # lanes of T (registers) moved into lanes of A (da, db) every GRAD_BLOCKS blocks, columns keep
    # one lane of A per column. After each run (one channel along it: "rows_const") or chunk the
    # lanes are added into the block's gradient columns ca (sum of dy or g) and cb (sum of dy or g
    # times x - ref), moved from the shift to the block's reference ref (the first chunk's mean)
    # exactly: b + (shift - ref) * a. With the mean known, a column gives
    # sum(dy * xhat) = inv * (cb - (mean - ref) * ca): fold_grads adds the columns into the
    # statistic's s1 = sum(g) and s2 = sum(g * xhat) and, where a column has one channel, into that
    # channel's gscale = sum(dy * xhat) and goffset = sum(dy) (the function's arrays, A).
    # Gradient columns, by how the channel runs (as in pass 2 of the forward):
    # "rows_const": one per channel of the block (one channel per run: with several in a block,
    #     the lanes are added up after each run, else after each chunk);
    # "rows": one (the channel varies along the run, each element of a run its own channel);
    # "columns_fold" and "columns": one per column j.
    #
    # Pass D writes dx = dy * (scale[c] * pw) + ((x - mhi) * q + r) with pw = inv,
    # q = -inv^2 * mean(g * xhat), r = inv * (inv * mean(g * xhat) * corr - mean(g)) per statistic
    # (all 0 for a statistic of one element, whose x-hat is 0). Where a gradient column mixes
    # channels, pass D also sums each element's dy and dy * xhat per channel: "rows" into partial
    # sums of T per channel (fa, fb) added into A every CHANNEL_RUNS runs, "columns" into A per run.

    @property
    def grad_cols(self) -> int:
        """Gradient columns (ca, cb) of a block."""
        if self.norm == "rows_const":
            return self.local_channels
        return 1 if self.norm == "rows" else self.lanes

    @property
    def grad_ref(self) -> int:
        """References of a block: one per column in the columns strategy."""
        return 1 if self.blocked else self.lanes

    def up(self, expr: str, into: str = "") -> str:
        """``expr`` (of the element type) converted to ``into`` (the accumulation type) where the
        two differ, spelled out (-Wdouble-promotion)."""
        into = into or self.acc_type
        return expr if into == self.ctype else f"({into}){expr}"

    def grad_body(self, dy: str, lane: str) -> list[str]:
        """Statements adding element dy (deviation ``dev``) into lane ``lane``."""
        t, lt = self.ctype, self.grad_lane_type
        d = "d" if self.norm in ("rows_const", "columns_fold") else "g"
        head = ([f"const {t} d = {dy};"] if d == "d" else
                [f"const {t} g = {dy} * {f'scale[{self.channel_lane}]' if self.norm == 'rows' else 'sc'};"])
        return head + [f"ga[{lane}] += {self.up(d, lt)};", f"gb[{lane}] += {self.up(f'({d} * dev)', lt)};"]

    @property
    def grad_lane_type(self) -> str:
        """Type of the gradient lanes ga, gb: rows, T (moved into the lanes da, db of A every
        grad_blocks blocks); columns, A (they are memory, one per column, anyway)."""
        return self.ctype if self.blocked else self.acc_type

    @property
    def grad_blocks(self) -> int:
        return GRAD_BLOCKS

    @property
    def grad_every(self) -> list[str]:
        """rows: statements after every grad_blocks blocks of lanes: ga, gb moved into da, db (none
        where the element type is the accumulation type: the lanes are as wide already)."""
        if not self._wide_lanes:
            return []
        return [f"for (size_t l = 0; l < {self.lanes}; ++l) {{", f"    da[l] += {self.up('ga[l]')};",
                f"    db[l] += {self.up('gb[l]')};",
                "    ga[l] = 0;", "    gb[l] = 0;", "}"]

    @property
    def _wide_lanes(self) -> bool:
        """rows: the gradient lanes of T are moved into lanes of A (da, db) every grad_blocks blocks."""
        return self.blocked and self.ctype != self.acc_type

    def _zero_lanes(self, n: int, var: str) -> list[str]:
        wide = ["    da[l] = 0;", "    db[l] = 0;"] if self._wide_lanes else []
        return [f"for (size_t {var} = 0; {var} < {n}; ++{var}) {{", f"    ga[{var}] = 0;", f"    gb[{var}] = 0;", *wide,
                "}"]

    def _move(self, shift: str, a: str, ref: str) -> str:
        return f" + (({self.acc_type}){shift} - {ref}) * {a}" if shift else ""

    @property
    def _per_run(self) -> bool:
        """rows_const with several channels in a block: the lanes are added up after each run."""
        return self.norm == "rows_const" and self.local_channels > 1

    @property
    def grad_chunk_pre(self) -> list[str]:
        """Statements before each chunk of the gradient sums."""
        return [] if self._per_run else self._zero_lanes(self.lanes, "l" if self.blocked else "j")

    @property
    def grad_run_pre(self) -> list[str]:
        """Statements before each run of the gradient sums."""
        if self._per_run:
            return self._zero_lanes(self.lanes, "l")
        if self.norm == "columns":
            return [f"const {self.ctype} sc = scale[{self.channel_expr}];"]
        return []

    def _add_lanes(self) -> list[str]:
        a = self.acc_type
        return [f"{a} a = 0, b = 0;", f"for (size_t l = 0; l < {self.lanes}; ++l) {{",
                *((f"    a += da[l] + {self.up('ga[l]')};", f"    b += db[l] + {self.up('gb[l]')};") if self._wide_lanes
                  else ("    a += ga[l];", "    b += gb[l];")), "}"]

    def grad_run_post(self, shift: str) -> list[str]:
        """Statements after each run of the gradient sums (``shift``: the chunk's shift, "" for
        the block's reference)."""
        if self.norm == "rows_const" and not self._per_run:
            return self.grad_every  # the lanes of T moved into A: the next run starts a new group of blocks
        if self.norm != "rows_const":
            return []
        cl = self.local_channel_expr
        return self._add_lanes() + [f"ca[{cl}] += a;", f"cb[{cl}] += b{self._move(shift, 'a', 'ref[0]')};"]

    def grad_chunk_post(self, shift: str) -> list[str]:
        """Statements after each chunk of the gradient sums."""
        if self._per_run:
            return []
        if self.blocked:
            return self._add_lanes() + ["ca[0] += a;", f"cb[0] += b{self._move(shift, 'a', 'ref[0]')};"]
        return [f"for (size_t j = 0; j < {self.lanes}; ++j) {{", "    ca[j] += ga[j];",
                f"    cb[j] += gb[j]{self._move(shift and shift + '[j]', 'ga[j]', 'ref[j]')};", "}"]

    @property
    def fold_grads(self) -> list[str]:
        """Statements adding the gradient columns into s1, s2 (and gscale, goffset)."""
        a = self.acc_type
        if self.norm == "rows":
            return ["s1[0] = ca[0];", "s2[0] = inv[0] * (cb[0] - ((mean[0] - ref[0]) + mean_lo[0]) * ca[0]);"]
        if self.norm == "columns":
            return [f"for (size_t j = 0; j < {self.lanes}; ++j) {{", f"    const size_t k = {self.lane_acc_expr};",
                    "    s1[k] += ca[j];", "    s2[k] += inv[k] * (cb[j] - ((mean[k] - ref[j]) + mean_lo[k]) * ca[j]);", "}"]
        if self.norm == "rows_const":
            head = [f"for (size_t cl = 0; cl < {self.local_channels}; ++cl) {{", "    const size_t k = 0;",
                    f"    const size_t c = {self.stat_channel_expr}cl;", "    const size_t j = cl;",
                    f"    const {a} dref = (mean[0] - ref[0]) + mean_lo[0];"]
        else:
            head = [f"for (size_t j = 0; j < {self.lanes}; ++j) {{", f"    const size_t k = {self.lane_acc_expr};",
                    f"    const size_t c = {self.channel_expr};", f"    const {a} dref = (mean[k] - ref[j]) + mean_lo[k];"]
        return head + [f"    const {a} bx = inv[k] * (cb[j] - dref * ca[j]);", "    gscale[c] += bx;",
                       "    goffset[c] += ca[j];", f"    s1[k] += ({a})scale[c] * ca[j];",
                       f"    s2[k] += ({a})scale[c] * bx;", "}"]

    # ---- pass D

    @property
    def dx_lane_fill(self) -> list[str]:
        """Statements filling the per-column copies pass D reads (column j of statistic k)."""
        if self.norm == "columns_fold":
            return [f"lp[j] = scale[{self.channel_expr}] * pw[k];", "lhi[j] = mhi[k];", "lq[j] = q[k];",
                    "lr[j] = r[k];"]
        if self.norm == "columns":
            return ["lpw[j] = pw[k];", "lhi[j] = mhi[k];", "lq[j] = q[k];", "lr[j] = r[k];"] + (
                ["llo[j] = mlo[k];"] if self.split_mean else []) + ["lrs[j] = rs[k];"]
        return []

    @property
    def dx_lane_arrays(self) -> list[str]:
        return [line.split("[", 1)[0] for line in self.dx_lane_fill]

    @property
    def backward_stat_arrays(self) -> list[str]:
        """Per-statistic arrays (T) of pass D."""
        xhat = (["mlo"] if self.split_mean else []) + ["rs"] if self.channel_sums else []
        return ["mhi", *xhat, "pw", "q", "r"]

    @property
    def channel_sums(self) -> str:
        """Where pass D sums dy and dy * xhat per channel: "partials" (rows), "run" (columns), ""."""
        return {"rows": "partials", "columns": "run"}.get(self.norm, "")

    def _xhat(self, lo: str, rs: str) -> str:
        return f"(dev - {lo}) * {rs}" if self.split_mean else f"dev * {rs}"

    @property
    def dx_pre(self) -> list[str]:
        """Statements before each run of pass D."""
        t, a = self.ctype, self.acc_type
        if self.norm == "rows_const":
            return [f"const {t} p = scale[{self.channel_expr}] * pw[0];"]
        if self.norm == "columns":
            return [f"const size_t c = {self.channel_expr};", f"const {t} sc = scale[c];", f"{a} ra = 0, rb = 0;"]
        return []

    def dx_body(self, i: str, target: str = "") -> list[str]:
        """Pass D's statements for run element ``i`` (xr[i], dyr[i] read before dxr[i] is written;
        ``target``: where dx goes instead of dxr[i], a buffer that is streamed out)."""
        t, a = self.ctype, self.acc_type
        x, dy, dx = f"xr[{i}]", f"dyr[{i}]", target or f"dxr[{i}]"
        if self.norm == "rows_const":
            return [f"{dx} = {dy} * p + (({x} - mhi[0]) * q[0] + r[0]);"]
        if self.norm == "columns_fold":
            return [f"{dx} = {dy} * lp[j] + (({x} - lhi[j]) * lq[j] + lr[j]);"]
        if self.norm == "rows":
            return [f"const size_t c = {self.channel_expr};", f"const {t} d = {dy};", f"const {t} dev = {x} - mhi[0];",
                    f"{dx} = d * (scale[c] * pw[0]) + (dev * q[0] + r[0]);", "fa[c] += d;",
                    f"fb[c] += d * ({self._xhat('mlo[0]', 'rs[0]')});"]
        return [f"const {t} d = {dy};", f"const {t} dev = {x} - lhi[j];",
                f"{dx} = d * (sc * lpw[j]) + (dev * lq[j] + lr[j]);", f"ra += ({a})d;",
                f"rb += ({a})(d * ({self._xhat('llo[j]', 'lrs[j]')}));"]

    @property
    def dx_post(self) -> list[str]:
        """Statements after each run of pass D."""
        if self.norm == "rows":
            return [f"if (++fill == {CHANNEL_RUNS}) {{", *("    " + s for s in self.flush_partials), "    fill = 0;", "}"]
        if self.norm == "columns":
            return ["gscale[c] += rb;", "goffset[c] += ra;"]
        return []

    @property
    def dx_block_post(self) -> list[str]:
        """Statements after pass D of a block: rows, where a run holds some of the channels only,
        the partial sums of the block's channels are added in (the next block has others)."""
        if self.norm != "rows" or self.partials_global:
            return []
        return [*self.flush_partials, "fill = 0;"]

    @property
    def channel_runs(self) -> int:
        return CHANNEL_RUNS

    @property
    def backward_stack_bytes(self) -> int:
        """Bytes of the arrays `backward` keeps on the stack (backward_saved keeps fewer)."""
        t, a = LANE_SIZES[self.ctype], LANE_SIZES[self.acc_type]
        lanes, n = self.lanes, self.nacc
        total = 2 * self.channels * a + (2 * self.channels * t if self.channel_sums == "partials" else 0)
        total += 2 * lanes * LANE_SIZES[self.grad_lane_type] + (2 * lanes * a if self.grad_every else 0)
        total += (2 * self.grad_cols + self.grad_ref) * a
        total += 2 * n * a + 2 * lanes * t + (0 if self.blocked else 2 * lanes * a + lanes * t)
        total += 4 * n * a + len(self.backward_stat_arrays) * n * t + len(self.dx_lane_arrays) * lanes * t
        return total

    @property
    def partials_global(self) -> bool:
        """rows: every run holds every channel, so the count of runs holds for all partial sums."""
        return self.partials_len == self.channels

    @property
    def flush_partials(self) -> list[str]:
        """rows: the partial sums of the current run's channels added into gscale, goffset and emptied."""
        start = "0" if self.partials_global else self.partials_from
        stop = f"{start} + {self.partials_len}" if start != "0" else str(self.partials_len)
        return [f"for (size_t c = {start}; c < {stop}; ++c) {{", f"    gscale[c] += {self.up('fb[c]')};", f"    goffset[c] += {self.up('fa[c]')};",
                "    fa[c] = 0;", "    fb[c] = 0;", "}"]

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


def _mul(index: str, mul: int) -> str:
    return index if mul == 1 else f"{index} * {mul}"


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


def _paren(expr: str) -> str:
    wrapped = expr.startswith("(") and expr.endswith(")") and expr.count("(") == 1
    return f"({expr})" if " " in expr and not wrapped else expr


def _digits(stat: list[Axis], index: str) -> list[str]:
    """The statistic loops' indices of flattened statistic block ``index`` (row-major)."""
    digits, inner = [], []
    for k in range(len(stat) - 1, -1, -1):
        a = stat[k]
        q = f"{index} / {_paren(' * '.join(inner))}" if inner else index
        digits.append(f"{_paren(q)} % {_paren(a.count)}" if k else q)
        inner.append(a.count)
    return list(reversed(digits))


def _pipeline(plan: Plan, openmp: bool) -> dict:
    """The statistic loops flattened for the pipelined rows core (see Sweep.pipelined)."""
    stat = plan.stat_axes
    if openmp or not stat or not plan.centered:
        return {}
    count = Extent(1)
    for a in stat:
        count = count * a.extent
    index = [f"const size_t {a.var} = {d};" for a, d in zip(stat, _digits(stat, "sb"), strict=True)]
    if len(stat) == 1:
        shift = stat[0].step
    else:
        nxt = " + ".join(f"{_paren(d)} * {a.step}" for a, d in zip(stat, _digits(stat, "(sb + 1)"), strict=True))
        shift = f"({nxt}) - ({plan.stat_offset_expr})"
    return dict(
        pipelined=True, stat_blocks=count.expr(), stat_index=tuple(index),
        stat_first=tuple(f"const size_t {a.var} = 0;" for a in stat), next_shift=shift,
    )


def _frozen_lanes(plan: Plan) -> int:
    """Sweep.frozen_lanes: LANE_BYTES of accumulator-type lanes where batch norm's innermost apply
    loop is a contiguous run along which the channel does not change."""
    run = plan.apply_run
    if plan.kind != "batchnorm" or run is None or run[0] in re.findall(r"\w+", plan.apply_channel_expr):
        return 0
    return LANE_BYTES // LANE_SIZES[plan.acc_type]


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
    step = plan.chunk_step
    shift = (chunk.stride * Extent(plan.chunk_iters)).expr() if step.isdigit() else f"{chunk.stride.expr()} * {step}"
    more = f"{chunk.var} + {step} < {chunk.count}"
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
        run_len = min(plan.chunk_iters, run_axis.extent.static) if len(domain) == 1 else run_axis.extent.static
        local = [a for a in domain if a.channel_mul and a.var != run_axis.var]
        assert len(local) <= 1 and all(a.channel_mul == 1 for a in local), "one reduced channel axis"
        stat_ch = [_mul(a.var, a.channel_mul) for a in stat if a.channel_mul]
        lane_index = {run_axis.var: f"({run_axis.var} + l)"}
        channel_lane = _sum([_mul(lane_index.get(a.var, a.var), a.channel_mul) for a in plan.axes if a.channel_mul])
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
            acc_type=plan.acc_type, channel_lane=channel_lane,
            run_blocks=run_axis.extent.dynamic or run_len >= lanes,
            channels=plan.channels,
            local_channels=local[0].extent.static if local else 1,
            local_channel_expr=local[0].var if local else "0",
            stat_channel_expr="".join(f"{t} + " for t in stat_ch),
            partials_from=_sum(stat_ch),
            partials_len=run_axis.extent.static if run_axis.channel_mul else 1, nacc=plan.nacc,
            shift_probe=SHIFT_PROBE if run_axis.extent.dynamic else min(SHIFT_PROBE, run_len),
            shift_probe_count=(f"({run_axis.count} < {SHIFT_PROBE}u ? {run_axis.count} : {SHIFT_PROBE}u)"
                               if run_axis.extent.dynamic else ""),
            block_first=plan.stat_offset_expr,
            apply_rotation=plan.apply_rotation(omp_apply_chunk),
            statistic="shifted" if plan.centered else "mean_square",
            per_acc_tail_expr=plan.per_acc_tail.expr(),
            offset="offset" in plan.params, act=plan.act_fn, frozen_lanes=_frozen_lanes(plan),
            saved_prefetch=run_axis.step == "1" and len(domain) > 1 and not domain[0].stride.dynamic
            and domain[0].stride.static != _static_elems(domain[1:]),
            lane_loop=(f"{plan.upper}_LANE_LOOP",) if lanes <= UNROLLED_LANES else (),
            define_lane_loop=lanes <= UNROLLED_LANES and not plan.lane_pragma,
            **_pipeline(plan, openmp),
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
        acc_type=plan.acc_type, channel_lane=_sum(channel), channels=plan.channels, nacc=plan.nacc,
        tile=lanes, tile_ahead=TILE_PREFETCH_ROWS, frozen_lanes=_frozen_lanes(plan),
        tile_next=not first.stride.dynamic and first.stride.static * plan.itemsize >= TILE_PREFETCH_NEXT_BYTES,
        saved_prefetch=not first.stride.dynamic
        and SAVED_PREFETCH_ROW_BYTES <= first.stride.static * plan.itemsize < TILE_PREFETCH_NEXT_BYTES,
        tile_shift=(first.stride * Extent(TILE_PREFETCH_ROWS)).expr(),
        rotate=not first.channel_mul and rows_of_whole_lines(width, first.stride, plan.itemsize),
        block_first=plan.stat_offset_expr,
        apply_rotation=plan.apply_rotation(omp_apply_chunk),
        statistic="shifted" if plan.centered else "mean_square",
        per_acc_tail=plan.per_acc_tail.static,
        offset="offset" in plan.params, act=plan.act_fn,
    )
