"""The CUDA training kernels' shapes (templates/cuda/train.cu.j2, normgen/targets/cuda/training.py),
derived from the target-independent plan and its training half."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import NormgenError
from ...lowering.plan import ONE, Extent, Function, Plan
from ...lowering.train import stat_index

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
    update: bool = False  # NAME_update (run-time parameters only)

    @property
    def params_type(self) -> str:
        return f"{self.name}_params"

    @property
    def embedded_statistics(self) -> bool:
        """Batch norm with embedded parameters: backward_frozen's trained statistics are static
        __device__ arrays of the .cu (with run-time parameters they are read from the struct)."""
        return self.batchnorm and not self.runtime_params

    @property
    def ref(self) -> dict[str, str]:
        """How a kernel body names each parameter array: the embedded arrays, or (run-time
        parameters) the locals that :meth:`param_locals` declares from the struct."""
        if self.runtime_params:
            return {k: k for k in EMBEDDED_NAMES}
        return dict(EMBEDDED_NAMES)

    def reads(self, part: str) -> tuple[str, ...]:
        """The parameter arrays kernel ``part`` reads."""
        return KERNEL_PARAMS.get(part, ())

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
        parts = ["train_forward_save_fused", "backward_stats", "backward_params", "backward_dx"]
        if self.batchnorm:
            parts += [
                "backward_frozen_params",
                "backward_frozen_dx",
                "stats_reset_kernel",
                "accumulate_merge",
                "accumulate_count",
                "finalize_kernel",
            ]
        if self.update:
            parts.append("update_kernel")
        return [self.kernel(p) for p in parts]

    def workspace_size(self, batch: int) -> int:
        """Bytes of device workspace backward/backward_saved need: 5 values per statistic."""
        return 5 * self.stats.value(batch) * ACC_BYTES[self.A]

    def elem_grid(self, batch: int) -> int:
        n = self.elements.value(batch)
        return max(1, min(-(-n // CUDA_BLOCK), CUDA_ELEM_MAX_BLOCKS))

    def launches(self, role: str, batch: int) -> list[CudaLaunch]:
        """What the launcher of ``role`` runs for ``batch``: kernels, grids, blocks, arguments."""
        b = (CUDA_BLOCK, 1, 1)
        s, c = self.stats.value(batch), self.channels
        running = ("running_mean", "running_var") if self.running else ()
        k = self.kernel
        table = {
            "train_forward_save": [
                CudaLaunch(
                    k("train_forward_save_fused"), s, b, ("x", "y", "batch", *running, "saved_mean", "saved_invstd")
                )
            ],
            "backward": [
                CudaLaunch(k("backward_stats"), s, b, ("x", "dy", "batch", "null", "null", "workspace")),
                CudaLaunch(k("backward_params"), c, b, ("x", "dy", "batch", "workspace", "dscale", "doffset")),
                CudaLaunch(k("backward_dx"), self.elem_grid(batch), b, ("x", "dy", "dx", "batch", "workspace")),
            ],
            "backward_saved": [
                CudaLaunch(k("backward_stats"), s, b, ("x", "dy", "batch", "saved_mean", "saved_invstd", "workspace")),
                CudaLaunch(k("backward_params"), c, b, ("x", "dy", "batch", "workspace", "dscale", "doffset")),
                CudaLaunch(k("backward_dx"), self.elem_grid(batch), b, ("x", "dy", "dx", "batch", "workspace")),
            ],
        }
        if self.batchnorm:
            table.update(
                {
                    "backward_frozen": [
                        CudaLaunch(k("backward_frozen_params"), c, b, ("x", "dy", "batch", "dscale", "doffset")),
                        CudaLaunch(k("backward_frozen_dx"), self.elem_grid(batch), b, ("x", "dy", "dx", "batch")),
                    ],
                    "stats_reset": [CudaLaunch(k("stats_reset_kernel"), 1, b, ("acc",))],
                    "accumulate": [
                        CudaLaunch(k("accumulate_merge"), c, b, ("acc", "x", "batch")),
                        CudaLaunch(k("accumulate_count"), 1, (32, 1, 1), ("acc", "batch")),
                    ],
                    "finalize": [
                        CudaLaunch(
                            k("finalize_kernel"), -(-c // CUDA_BLOCK), b, ("acc", "trained_mean", "trained_variance")
                        )
                    ],
                }
            )
        if self.update:
            table["update"] = [
                CudaLaunch(
                    k("update_kernel"),
                    -(-c // CUDA_BLOCK),
                    b,
                    ("params", "dscale", "doffset", "velocity_scale", "velocity_offset", *SCALAR_ARGS),
                )
            ]
        if role not in table:
            raise KeyError(f"layer {self.name!r} has no CUDA training function {role!r}")
        out = []
        for launch in table[role]:
            if launch.grid > CUDA_MAX_GRID:
                raise NormgenError(f"layer {self.name!r}: the batch is too large for one grid ({launch.grid} blocks)")
            if self.takes_params(launch.kernel[len(self.name) + 1 :]):
                launch = CudaLaunch(launch.kernel, launch.grid, launch.block, ("params", *launch.args))
            out.append(launch)
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
    grads = [f"{T} *dx", f"{A} *dscale", f"{A} *doffset", "int32_t batch"]
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
                *[r.format(T=T) for r in running],
                "double *saved_mean",
                "double *saved_invstd",
                "cudaStream_t stream",
            ],
            lead_ptr + ["x", "y", *(["running_mean", "running_var"] if bn else []), "saved_mean", "saved_invstd"],
            (
                "Training forward that also saves each statistic's mean and 1/sqrt(var + epsilon) (double,"
                f"\n * {plan.upper}_SAVED_STATISTICS(batch) of each) for {name}_backward_saved"
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
            lead_ptr + ["x", "dy", "dx", "dscale", "doffset"],
            (
                "Backward of the training forward, statistics recomputed from x: dx, and dscale/doffset"
                f"\n * ({A}, one per channel). dx may be x or dy. workspace: {name}_backward_workspace_size(batch)"
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
            lead_ptr + ["x", "dy", "saved_mean", "saved_invstd", "dx", "dscale", "doffset"],
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
                lead_ptr + ["x", "dy", "dx", "dscale", "doffset"],
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
                [f"{name}_stats *acc", f"const {T} *x", "int32_t batch", "cudaStream_t stream"],
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
    if plan.runtime_params:
        fns.append(
            Function(
                "update",
                f"{name}_update",
                [
                    f"{name}_params *params",
                    f"const {A} *dscale",
                    f"const {A} *doffset",
                    f"{A} *velocity_scale",
                    f"{A} *velocity_offset",
                    f"{A} learn_rate",
                    f"{A} l2",
                    f"{A} momentum",
                    "cudaStream_t stream",
                ],
                ["params", "dscale", "doffset", "velocity_scale", "velocity_offset"],
                (
                    "One SGD-with-momentum step (MATLAB 'sgdm') on params->scale and params->offset, one thread"
                    " per channel:\n *   v = momentum * v - learn_rate * lr_factor * (grad + l2 * l2_factor * p);"
                    " p = p + v\n * with the layer's ScaleLearnRateFactor/OffsetLearnRateFactor and"
                    f" ScaleL2Factor/OffsetL2Factor, in {A}.\n * velocity_scale/velocity_offset (one per channel)"
                    " start at zero and carry between steps." + doc_dev
                ),
                [],
            )
        )
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
        update=plan.runtime_params,
    )
