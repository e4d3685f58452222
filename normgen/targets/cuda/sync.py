"""The CUDA launchers of batch norm's synchronized (data-parallel) functions
(normgen/lowering/sync.py; templates/cuda/sync.cu.j2): the C functions' arguments on device
pointers and a stream. Gradients are in the accumulation type, as the other CUDA backward
functions give them; the statistics, saved mean/invstd and sums are double, as on the C target."""

from __future__ import annotations

from dataclasses import dataclass

from ...lowering.plan import Function, Plan

#: The parameter arrays each synchronized kernel reads (those the layer has come from the
#: run-time struct; the others are the forward's fixed __device__ arrays).
SYNC_PARAMS = {"sync_normalize_kernel": ("scale", "offset"), "sync_backward_dx": ("scale",)}


@dataclass(frozen=True)
class SyncCuda:
    launchers: list[Function]
    kernels: list[str]
    params: tuple[str, ...]  # the parameter arrays the layer has
    runtime_params: bool
    params_type: str

    def function(self, role: str) -> Function:
        return next(f for f in self.launchers if f.role == role)

    def reads(self, part: str) -> tuple[str, ...]:
        return tuple(k for k in SYNC_PARAMS.get(part, ()) if k in self.params)

    def param_lead(self, part: str) -> str:
        """The kernel's leading parameter: the run-time struct where it reads parameters from it."""
        return f"const {self.params_type} *params, " if self.runtime_params and self.reads(part) else ""

    def param_arg(self, part: str) -> str:
        return "(void *)&params, " if self.runtime_params and self.reads(part) else ""

    def param_locals(self, part: str) -> str:
        if not self.runtime_params:
            return ""
        return "".join(f"    const acc_t *{k} = params->{k};\n" for k in self.reads(part))


def lower_sync_cuda(plan: Plan) -> SyncCuda | None:
    """The CUDA launchers of a batch norm's synchronized functions (None for the other kinds)."""
    sync = plan.train.sync
    if sync is None:
        return None
    t, a = plan.ctype, plan.acc_type
    doc_dev = "\n * All pointers are device pointers; the kernels are queued on stream."
    launchers = []
    for f in sync.functions:
        args = [arg.replace(f"{t} *d", f"{a} *d") if arg.startswith(f"{t} *d") else arg for arg in f.args]
        doc = f.doc
        if f.role == "sync_finish":
            doc = doc.replace(f"it returns {plan.upper}_ERR_COUNT and writes nothing",
                              "the outputs are left untouched (the count lives on the\n * device: the launcher"
                              " does not synchronize to report it)")
        launchers.append(Function(f.role, f.name, [*args, "cudaStream_t stream"], f.pointers, doc + doc_dev, f.uses))
    kernels = ["sync_stats_kernel", "stats_merge_kernel", "sync_finish_kernel", "sync_normalize_kernel",
               "sync_backward_sums_kernel", "sync_backward_dx", *(["sync_backward_params"] if plan.gradients else [])]
    return SyncCuda(launchers, [f"{plan.name}_{k}" for k in kernels], tuple(plan.params), plan.runtime_params,
                    f"{plan.name}_params")
