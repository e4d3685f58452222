"""The CUDA training kernels' shapes (templates/cuda/train.cu.j2, normgen/targets/cuda/training.py),
derived from the target-independent plan and its training half.

What each launcher launches is one table (:meth:`TrainCuda.calls`): the pycuda bench reads it as
numbers (:meth:`TrainCuda.launches`), the template renders it as the launchers' C
(:meth:`TrainCuda.grid_expr`, :meth:`TrainCuda.c_args`). The layer's statistic (centred, or
RMSNorm's mean square with the mean fixed at 0), the gradients it has (``plan.gradients``) and
its learnables (``plan.learnables``) select the kernels' sums and arguments here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import NormgenError
from ...lowering.plan import ONE, Extent, Function, Plan, as_core, size_local
from ...lowering.train import stat_index
from .plan import param_unit

#: Threads of every training kernel block.
CUDA_BLOCK = 256
#: The parameter arrays each CUDA training kernel reads. With run-time parameters such a kernel
#: takes the device ``const NAME_params *params`` first and reaches the arrays through it, as the
#: forward kernels do; with embedded ones it reads the static __device__ arrays (EMBEDDED_NAMES).
KERNEL_PARAMS = {
    "train_forward_save_fused": ("scale", "offset"),
    "backward_stats": ("scale",),
    "backward_dx": ("scale",),
    "backward_frozen_params": ("trained_mean", "trained_variance"),
    "backward_frozen_dx": ("scale", "trained_variance"),
}
#: How kernel bodies name the embedded parameter arrays (scale/offset are the forward's arrays).
EMBEDDED_NAMES = {
    "scale": "scale",
    "offset": "offset",
    "trained_mean": "train_trained_mean",
    "trained_variance": "train_trained_variance",
}
#: Scalar (by value, accumulation type) arguments of the update kernel.
SCALAR_ARGS = ("learn_rate", "l2", "momentum")
#: Element-wise training kernels stride over the tensor with at most this many blocks.
CUDA_ELEM_MAX_BLOCKS = 65536
CUDA_MAX_GRID = 2**31 - 1
ACC_BYTES = {"float": 4, "double": 8}


def _operand(e: Extent) -> str:
    text = e.expr("nb")
    return f"({text})" if " " in text else text


@dataclass(frozen=True)
class FlatAxis:
    """One plan axis as the CUDA training kernels index it by mixed radix."""

    extent: Extent
    stride: Extent
    keep: bool
    channel_mul: int
    stat_mul: Extent  # the axis index's weight in the statistic index (kept axes)

    @property
    def e(self) -> str:
        return _operand(self.extent)

    @property
    def st(self) -> str:
        return _operand(self.stride)

    @property
    def sm(self) -> str:
        return _operand(self.stat_mul)


@dataclass(frozen=True)
class KernelCall:
    """One kernel launch of a launcher, as a table row: the kernel, its grid (a GRIDS name), its
    arguments by name (the run-time struct, where the kernel reads it, is added first), the name
    of the launcher's argument array and the block size."""

    part: str
    grid: str
    args: tuple[str, ...]
    array: str = "args"
    block: int = CUDA_BLOCK


#: Grids of the training kernels: one block per statistic or per channel (parameter value),
#: element-wise grid-stride, one block, one thread per channel.
GRIDS = ("stats", "channels", "elements", "one", "channel_threads")
#: How the launchers name a launch argument in C (the rest are the launcher's own arguments).
C_NAMES = {"batch": "b", "workspace": "cws"}


@dataclass(frozen=True)
class CudaLaunch:
    kernel: str
    grid: int
    block: tuple[int, int, int]
    args: tuple[str, ...]


@dataclass(frozen=True)
class TrainCuda:
    """Launch shapes and index arithmetic of the CUDA training kernels (one statistic per block
    for the statistics, one channel per block for dscale/doffset, grid-stride element kernels).
    Every reduction is a fixed-order block sum: the same bits on every run, no atomics."""

    name: str
    T: str
    A: str
    axes: list[FlatAxis]  # memory order
    count: Extent  # elements per statistic
    stats: Extent  # statistics per call
    per_channel: Extent  # elements per channel
    elements: Extent
    channels: int
    batchnorm: bool
    running: bool  # batch norm: train_forward_save updates the running statistics
    launchers: list[Function]
    runtime_params: bool = False  # parameters come from a device NAME_params struct
    update: bool = False  # NAME_update (run-time parameters with something to learn only)
    #: the parameter arrays the layer has (plan.params; the others are fixed __device__ constants)
    params: tuple[str, ...] = ("scale", "offset")
    #: the parameter gradients the backward functions output (plan.gradients)
    gradients: tuple[str, ...] = ("dscale", "doffset")
    #: what NAME_update steps (plan.learnables)
    learnables: tuple[str, ...] = ("scale", "offset")
    #: whether statistics have a mean (False: RMSNorm, mean fixed at 0, variance mean(x^2))
    centered: bool = True
    #: what one value of scale/offset (and one block of the parameter-gradient kernels) is for
    param_unit: str = "channel"
    #: the run-time sizes (plan.sizes): kernel and launch arguments after batch, in format order
    sizes: tuple[str, ...] = ()
    #: the launchers before a fused layer wraps them (``launchers``: its static cores, named
    #: NAME_<role>_core, and the ones it keeps; normgen/targets/cuda/fused.py)
    plain: list[Function] = field(default_factory=list)

    @property
    def params_type(self) -> str:
        return f"{self.name}_params"

    @property
    def embedded_statistics(self) -> list[tuple[str, list[str]]]:
        """Batch norm with embedded parameters: the trained statistics backward_frozen's kernels
        read, static __device__ arrays of the .cu (with run-time parameters they are read from the
        struct; without parameter gradients the mean is not read), each with the comment lines
        above it."""
        if not self.batchnorm or self.runtime_params:
            return []
        parts = [k[len(self.name) + 1:] for k in self.kernels]
        read = {a for part in parts for a in KERNEL_PARAMS.get(part, ())}
        names = [k for k in ("trained_mean", "trained_variance") if k in read]
        return [(k, ["/* Trained statistics for backward_frozen, one per channel */"] if i == 0 else [])
                for i, k in enumerate(names)]

    @property
    def ref(self) -> dict[str, str]:
        """How a kernel body names each parameter array: the embedded arrays, or (run-time
        parameters) the locals that :meth:`param_locals` declares from the struct."""
        if self.runtime_params:
            return {k: k for k in EMBEDDED_NAMES}
        return dict(EMBEDDED_NAMES)

    def reads(self, part: str) -> tuple[str, ...]:
        """The parameter arrays (of the layer's) kernel ``part`` reads; the fixed constants of the
        ones it lacks are __device__ arrays that no struct carries."""
        return tuple(k for k in KERNEL_PARAMS.get(part, ()) if k in self.params)

    def takes_params(self, part: str) -> bool:
        """Whether kernel ``part`` takes the params struct (first): run-time parameters it reads."""
        return self.runtime_params and bool(self.reads(part))

    def param_lead(self, part: str) -> str:
        """The kernel's leading parameter: ``const NAME_params *params, `` or nothing."""
        return f"const {self.params_type} *params, " if self.takes_params(part) else ""

    def param_arg(self, part: str) -> str:
        """The launcher's leading kernel argument: ``(void *)&params, `` or nothing."""
        return "(void *)&params, " if self.takes_params(part) else ""

    def param_locals(self, part: str) -> str:
        """Lines opening the kernel body that reach each parameter array it reads through the
        struct (``const acc_t *scale = params->scale;``), as the forward kernels do; nothing with
        embedded parameters."""
        if not self.takes_params(part):
            return ""
        return "".join(f"    const acc_t *{k} = params->{k};\n" for k in self.reads(part))

    def arg_code(self, arg: str) -> str:
        """pycuda's prepare() code of a launch argument: int32 batch, A scalars, else a pointer."""
        if arg == "batch":
            return "i"
        if arg in self.sizes:
            return "Q"  # size_t
        if arg in SCALAR_ARGS:
            return "f" if self.A == "float" else "d"
        return "P"

    @property
    def kept(self) -> list[FlatAxis]:
        return [a for a in self.axes if a.keep]

    @property
    def reduced(self) -> list[FlatAxis]:
        return [a for a in self.axes if not a.keep]

    @property
    def channel_axes(self) -> list[FlatAxis]:
        return [a for a in self.axes if a.channel_mul]

    @property
    def other_axes(self) -> list[FlatAxis]:
        return [a for a in self.axes if not a.channel_mul]

    def kernel(self, part: str) -> str:
        return f"{self.name}_{part}"

    @property
    def kernels(self) -> list[str]:
        parts = ["train_forward_save_fused", "backward_stats"]
        parts += ["backward_params"] if self.gradients else []
        parts.append("backward_dx")
        if self.batchnorm:
            parts += ["backward_frozen_params"] if self.gradients else []
            parts += [
                "backward_frozen_dx",
                "stats_reset_kernel",
                "accumulate_merge",
                "accumulate_count",
                "finalize_kernel",
            ]
        if self.update:
            parts.append("update_kernel")
        return [self.kernel(p) for p in parts]

    # ---- the statistic and the gradients, for the kernel bodies ---------------------------------
    @property
    def dx_sums(self) -> list[tuple[str, str, int]]:
        """backward_stats: (block sum, the term each element adds, its workspace slot) of the
        means dx needs: mean(g) (centred statistics only) and mean(g * xhat), g = scale * dy."""
        sums = [("sg", "g", 3)] if self.centered else []
        return sums + [("sgx", "g * xhat", 4)]

    @property
    def mean_gradient(self) -> str:
        """The mean(g) term of backward_dx (none without a mean: RMSNorm)."""
        return " - ws[3 * nstat + s]" if self.centered else ""

    def param_sums(self, xhat: str) -> list[tuple[str, str, str]]:
        """(gradient output, its block sum, the term each element adds) of the parameter gradients
        the layer has: dscale = sum dy * xhat, doffset = sum dy (d = dy of the element)."""
        terms = {"dscale": ("a", f"d * {xhat}"), "doffset": ("b", "d")}
        return [(g, *terms[g]) for g in self.gradients]

    @property
    def param_sums_doc(self) -> str:
        return ", ".join({"dscale": "dscale = sum dy * xhat", "doffset": "doffset = sum dy"}[g]
                         for g in self.gradients)

    @property
    def update_doc(self) -> str:
        """The update kernel's comment after "on the run-time "."""
        rule = "v = momentum * v - learn_rate * lr_factor * (grad + l2 * l2_factor * p); p = p + v."
        if len(self.learnables) == 2:
            return f"scale\n * and offset: {rule}"
        return f"{self.learnables[0]}:\n * {rule}"

    @property
    def header_notes(self) -> list[str]:
        """Lines the .cuh's training comment adds for what the layer lacks or computes otherwise."""
        out = []
        if not self.centered:
            out.append("RMSNorm: the saved mean is 0 and var is mean(x^2); backward has no mean(g) term.")
        missing = [f"d{k}" for k in ("scale", "offset") if f"d{k}" not in self.gradients]
        if missing:
            out.append(f"The layer has no {' and no '.join(m[1:] for m in missing)}, so the backward functions"
                       f" take no {'/'.join(missing)}.")
        if self.param_unit != "channel":
            out.append("Per-element affine: scale, offset and their gradients have one value per element of the")
            out.append("normalized dimensions (flattened in format order), indexed where a channel index would be.")
        return out

    @property
    def notes(self) -> dict[str, str]:
        """Comment text that names the statistic."""
        if self.centered:
            return {
                "blocks": "Statistics blocks shift by their first element x0 and sum in fixed order, as the forward does.",
                "save": "shifted two-pass statistics, the saved mean and\n * 1/sqrt(var + epsilon)",
                "ws": "the mean as hi + lo,\n * 1/sqrt(var + epsilon), mean(g) and mean(g * xhat)",
                "dx": "dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + epsilon)",
            }
        return {
            "blocks": "RMSNorm: a statistic is mean(x^2), the mean 0 (no shift), summed in fixed order.",
            "save": "the sum of x^2, the saved mean (0) and\n * 1/sqrt(mean(x^2) + epsilon)",
            "ws": "the mean (0) as hi + lo,\n * 1/sqrt(mean(x^2) + epsilon) and mean(g * xhat)",
            "dx": "dx = (g - xhat * mean(g * xhat)) / sqrt(mean(x^2) + epsilon)",
        }

    # ---- launches -----------------------------------------------------------------------------
    def calls(self, role: str) -> list[KernelCall]:
        """What the launcher of ``role`` launches, in order (the run-time struct not yet added)."""
        running = ("running_mean", "running_var") if self.running else ()
        grads = self.gradients
        backward = [
            KernelCall("backward_stats", "stats", ("x", "dy", "batch", "saved_mean", "saved_invstd", "workspace"),
                       "sargs"),
            *([KernelCall("backward_params", "channels", ("x", "dy", "batch", "workspace", *grads), "pargs")]
              if grads else []),
            KernelCall("backward_dx", "elements", ("x", "dy", "dx", "batch", "workspace"), "dargs"),
        ]
        table = {
            "train_forward_save": [
                KernelCall("train_forward_save_fused", "stats", ("x", "y", "batch", *running, "saved_mean",
                                                                 "saved_invstd")),
            ],
            "backward": backward,
            "backward_saved": backward,
        }
        if self.batchnorm:
            table.update({
                "backward_frozen": [
                    *([KernelCall("backward_frozen_params", "channels", ("x", "dy", "batch", *grads), "pargs")]
                      if grads else []),
                    KernelCall("backward_frozen_dx", "elements", ("x", "dy", "dx", "batch"), "dargs"),
                ],
                "stats_reset": [KernelCall("stats_reset_kernel", "one", ("acc",))],
                "accumulate": [
                    KernelCall("accumulate_merge", "channels", ("acc", "x", "batch"), "margs"),
                    KernelCall("accumulate_count", "one", ("acc", "batch"), "cargs", 32),
                ],
                "finalize": [KernelCall("finalize_kernel", "channel_threads", ("acc", "trained_mean",
                                                                               "trained_variance"))],
            })
        if self.update:
            learn = self.learnables
            table["update"] = [KernelCall("update_kernel", "channel_threads",
                                          ("params", *[f"d{k}" for k in learn], *[f"velocity_{k}" for k in learn],
                                           *SCALAR_ARGS))]
        if role not in table:
            raise KeyError(f"layer {self.name!r} has no CUDA training function {role!r}")
        return table[role]

    def call_args(self, call: KernelCall) -> tuple[str, ...]:
        """The kernel's arguments by name: the run-time struct first where the kernel reads it, the
        run-time sizes after batch."""
        args = tuple(a for name in call.args for a in ((name, *self.sizes) if name == "batch" else (name,)))
        return (("params",) if self.takes_params(call.part) else ()) + args

    def c_args(self, call: KernelCall) -> str:
        """The launcher's C argument array (between the braces) for ``call``."""
        names = [C_NAMES.get(a, size_local(a) if a in self.sizes else a) for a in self.call_args(call)]
        if call.part == "backward_stats":
            names = ["ws" if n == "cws" else n for n in names]  # it writes the workspace
        return ", ".join(f"(void *)&{n}" for n in names)

    def grid_expr(self, grid: str) -> str:
        """The C expression of a grid (GRIDS), in the launchers (nb: the batch as size_t)."""
        return {
            "stats": f"(unsigned int)({self.stats.expr('nb')})",
            "channels": str(self.channels),
            "elements": f"(unsigned int)train_elem_grid(nb{''.join(f', {size_local(n)}' for n in self.sizes)})",
            "one": "1",
            "channel_threads": str(-(-self.channels // CUDA_BLOCK)),
        }[grid]

    def grid_value(self, grid: str, batch: int, sizes: dict[str, int] | None = None) -> int:
        """The number of blocks of a grid (GRIDS) for ``batch`` and the run-time ``sizes``."""
        return {
            "stats": self.stats.value(batch, sizes),
            "channels": self.channels,
            "elements": self.elem_grid(batch, sizes),
            "one": 1,
            "channel_threads": -(-self.channels // CUDA_BLOCK),
        }[grid]

    def workspace_size(self, batch: int, sizes: dict[str, int] | None = None) -> int:
        """Bytes of device workspace backward/backward_saved need: 5 values per statistic."""
        return 5 * self.stats.value(batch, sizes) * ACC_BYTES[self.A]

    def elem_grid(self, batch: int, sizes: dict[str, int] | None = None) -> int:
        n = self.elements.value(batch, sizes)
        return max(1, min(-(-n // CUDA_BLOCK), CUDA_ELEM_MAX_BLOCKS))

    def launches(self, role: str, batch: int, sizes: dict[str, int] | None = None) -> list[CudaLaunch]:
        """What the launcher of ``role`` runs for ``batch`` and the run-time ``sizes``: kernels,
        grids, blocks, arguments (:meth:`calls` in numbers; ``backward`` passes NULL saved
        statistics)."""
        sizes = dict(sizes or {})
        for n in self.sizes:
            if sizes.get(n, 0) < 1:
                raise NormgenError(f"layer {self.name!r}: run-time size {n} must be given and >= 1")
        out = []
        for call in self.calls(role):
            grid = self.grid_value(call.grid, batch, sizes)
            if grid > CUDA_MAX_GRID:
                raise NormgenError(f"layer {self.name!r}: the batch is too large for one grid ({grid} blocks)")
            args = self.call_args(call)
            if role == "backward":
                args = tuple("null" if a in ("saved_mean", "saved_invstd") else a for a in args)
            out.append(CudaLaunch(self.kernel(call.part), grid, (call.block, 1, 1), args))
        return out


def lower_train_cuda(plan: Plan) -> TrainCuda:
    """The CUDA training kernels of a plan lowered for the cuda target."""
    T, A = plan.ctype, plan.acc_type
    axes = []
    mul = ONE
    for a in reversed(plan.axes):
        axes.append(FlatAxis(a.extent, a.stride, a.keep, a.channel_mul, mul if a.keep else ONE))
        if a.keep:
            mul = mul * a.extent
    axes.reverse()
    per_channel = ONE
    for a in plan.axes:
        if not a.channel_mul:
            per_channel = per_channel * a.extent
    bn = plan.kind == "batchnorm"
    name = plan.name
    # run-time parameters: the functions that read parameters take the device struct first
    lead = [f"const {name}_params *params"] if plan.runtime_params else []
    lead_ptr = ["params"] if plan.runtime_params else []
    running = ["{T} *running_mean", "{T} *running_var"] if bn else []
    gradients = tuple(g for g, _ in plan.gradients)
    grads = [f"{T} *dx", *[f"{A} *{g}" for g in gradients], "int32_t batch", *plan.size_args]
    grad_ptrs = ["dx", *gradients]
    unit = param_unit(plan)
    grad_doc = (f", and {'/'.join(gradients)}\n * ({A}, one per {unit})"
                if gradients else " (the layer has no scale or offset, so\n * no parameter gradients)")
    learn = plan.learnables
    ws = ["void *workspace", "size_t workspace_bytes", "cudaStream_t stream"]
    doc_dev = "\n * All pointers are device pointers; the kernels are queued on stream."
    fns = [
        Function(
            "train_forward_save",
            f"{name}_train_forward_save",
            lead
            + [
                f"const {T} *x",
                f"{T} *y",
                "int32_t batch",
                *plan.size_args,
                *[r.format(T=T) for r in running],
                "double *saved_mean",
                "double *saved_invstd",
                "cudaStream_t stream",
            ],
            lead_ptr + ["x", "y", *(["running_mean", "running_var"] if bn else []), "saved_mean", "saved_invstd"],
            (
                "Training forward that also saves each statistic's mean and 1/sqrt(var + epsilon) (double,"
                f"\n * {plan.upper}_SAVED_STATISTICS({plan.macro_params}) of each) for {name}_backward_saved"
                + ("; updates running_mean/running_var." if bn else "; y is what predict computes.")
                + " y may be x."
                + doc_dev
            ),
            [],
        ),
        Function(
            "backward",
            f"{name}_backward",
            lead + [f"const {T} *x", f"const {T} *dy", *grads, *ws],
            lead_ptr + ["x", "dy", *grad_ptrs],
            (
                f"Backward of the training forward, statistics recomputed from x: dx{grad_doc}. dx may be x or dy."
                f" workspace: {name}_backward_workspace_size({plan.macro_params})"
                "\n * bytes, 16-byte aligned." + doc_dev
            ),
            [],
        ),
        Function(
            "backward_saved",
            f"{name}_backward_saved",
            lead
            + [
                f"const {T} *x",
                f"const {T} *dy",
                "const double *saved_mean",
                "const double *saved_invstd",
                *grads,
                *ws,
            ],
            lead_ptr + ["x", "dy", "saved_mean", "saved_invstd", *grad_ptrs],
            (f"{name}_backward with the statistics saved by {name}_train_forward_save." + doc_dev),
            [],
        ),
    ]
    if bn:
        fns += [
            Function(
                "backward_frozen",
                f"{name}_backward_frozen",
                lead + [f"const {T} *x", f"const {T} *dy", *grads, "cudaStream_t stream"],
                lead_ptr + ["x", "dy", *grad_ptrs],
                (
                    "Backward with the trained statistics held fixed (the gradient of predict). dx may be x or dy."
                    + doc_dev
                ),
                [],
            ),
            Function(
                "stats_reset",
                f"{name}_stats_reset",
                [f"{name}_stats *acc", "cudaStream_t stream"],
                ["acc"],
                "Empty a population-statistics accumulator (in device memory)." + doc_dev,
                [],
            ),
            Function(
                "accumulate",
                f"{name}_accumulate",
                [f"{name}_stats *acc", f"const {T} *x", "int32_t batch", *plan.size_args, "cudaStream_t stream"],
                ["acc", "x"],
                "Merge one batch into the population statistics (Chan's merge, in double)." + doc_dev,
                [],
            ),
            Function(
                "finalize",
                f"{name}_finalize",
                [f"const {name}_stats *acc", f"{A} *trained_mean", f"{A} *trained_variance", "cudaStream_t stream"],
                ["acc", "trained_mean", "trained_variance"],
                (
                    "The trained mean and variance ("
                    + ("M2 / (n - 1)" if plan.running_unbiased else "M2 / n")
                    + f") of everything accumulated, one per channel ({A}). With fewer than"
                    f"\n * {2 if plan.running_unbiased else 1} values accumulated the outputs are left untouched"
                    " (the count lives on the device:\n * the launcher does not synchronize to report it)." + doc_dev
                ),
                [],
            ),
        ]
    update = plan.runtime_params and bool(learn)
    if update:
        fns.append(
            Function(
                "update",
                f"{name}_update",
                [
                    f"{name}_params *params",
                    *[f"const {A} *d{k}" for k in learn],
                    *[f"{A} *velocity_{k}" for k in learn],
                    f"{A} learn_rate",
                    f"{A} l2",
                    f"{A} momentum",
                    "cudaStream_t stream",
                ],
                ["params", *[f"d{k}" for k in learn], *[f"velocity_{k}" for k in learn]],
                (
                    f"One SGD-with-momentum step (MATLAB 'sgdm') on {' and '.join('params->' + k for k in learn)},"
                    f" one thread per {unit}:\n *   v = momentum * v - learn_rate * lr_factor * (grad + l2 * l2_factor * p);"
                    " p = p + v\n * with the layer's ScaleLearnRateFactor/OffsetLearnRateFactor and"
                    f" ScaleL2Factor/OffsetL2Factor, in {A}.\n * {'/'.join(f'velocity_{k}' for k in learn)} (one per {unit})"
                    " start at zero and carry between steps." + doc_dev
                ),
                [],
            )
        )
    plain = fns
    if plan.fusion is not None:
        fns = [as_core(f) if f.role in plan.fusion.wrapped else f for f in fns if f.role not in plan.fusion.dropped]
    return TrainCuda(
        name=name,
        T=T,
        A=A,
        axes=axes,
        count=plan.per_acc_total,
        stats=stat_index(plan)[1],
        per_channel=per_channel,
        elements=plan.elements,
        channels=plan.channels,
        batchnorm=bn,
        running=bn,
        launchers=fns,
        runtime_params=plan.runtime_params,
        update=update,
        params=tuple(plan.params),
        gradients=gradients,
        learnables=tuple(learn),
        centered=plan.centered,
        param_unit=unit,
        sizes=tuple(plan.sizes),
        plain=plain,
    )
