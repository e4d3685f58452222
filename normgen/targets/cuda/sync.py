"""The CUDA launchers of batch norm's synchronized (data-parallel) functions
(normgen/lowering/sync.py; templates/cuda/sync.cu.j2): the C functions' arguments on device
pointers and a stream. Gradients are in the accumulation type, as the other CUDA backward
functions give them; the statistics, saved mean/invstd and sums are double, as on the C target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import NormgenError
from ...lowering.plan import Function, Plan
from ..training import TRAIN_ERRORS
from .storage import from_storage, to_storage

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


class CudaSync:
    """Synchronized batch-norm methods of :class:`normgen.targets.cuda.module.CudaLayer` (mixed in
    through :class:`normgen.targets.cuda.training.CudaTraining`): the kernels of
    templates/cuda/sync.cu.j2 through pycuda, with the C bench's methods (NumPy in and out;
    statistics and sums float64, dscale/doffset in the accumulation type)."""

    def _sync_call(self, kernel: str, grid: int, *args) -> None:
        self._require_batchnorm("the synchronized functions")
        fn = self.module.get_function(f"{self.layer.name}_{kernel}")
        fn(*args, block=(256, 1, 1), grid=(max(1, grid), 1))
        self._drv.Context.synchronize()

    def _sync_lead(self, kernel: str) -> list:
        sc = lower_sync_cuda(self.plan)
        return [self._params] if sc.runtime_params and sc.reads(kernel) else []

    def _sync_x(self, x):
        """(x on the device or None for an empty shard, batch, the size arguments)."""
        shape = tuple(np.shape(x))
        letters = self.layer.fmt.letters
        if self.layer.fmt.has_batch and len(shape) == len(letters) and shape[letters.index("B")] == 0:
            probe = list(shape)
            probe[letters.index("B")] = 1
            _, sizes = self._dims(np.zeros(probe, np.uint8))
            return None, 0, [np.uint64(sizes[n]) for n in self.layer.sizes]
        batch, sizes = self._dims(np.broadcast_to(np.zeros((), np.uint8), shape))
        return self._gpu(to_storage(x, self.layer.dtype)), batch, [np.uint64(sizes[n]) for n in self.layer.sizes]

    def _sync_grid(self, batch: int, sizes) -> int:
        return self._tc().elem_grid(batch, {n: int(v) for n, v in zip(self.layer.sizes, sizes, strict=True)})

    @property
    def stats_size(self) -> int:
        return 1 + 2 * self.plan.channels

    def sync_stats(self, x) -> np.ndarray:
        x_gpu, batch, sizes = self._sync_x(x)
        if x_gpu is None:
            return np.zeros(self.stats_size)
        out = self._gpuarray.empty(self.stats_size, np.float64)
        self._sync_call("sync_stats_kernel", self.plan.channels, out.gpudata, x_gpu.gpudata, np.int32(batch), *sizes)
        return out.get()

    def stats_merge(self, parts) -> np.ndarray:
        parts = np.ascontiguousarray(parts, dtype=np.float64).reshape(-1, self.stats_size)
        acc = self._gpu(np.zeros(self.stats_size))
        for row in parts:
            part = self._gpu(row)
            self._sync_call("stats_merge_kernel", 1, acc.gpudata, part.gpudata)
        return acc.get()

    def sync_finish(self, stats, *, update_running: bool = True):
        stats = np.ascontiguousarray(stats, dtype=np.float64).reshape(-1)
        if stats[0] < (2 if self.plan.running_unbiased else 1):
            raise NormgenError(f"{self.layer.name}_sync_finish: {TRAIN_ERRORS[3]}")
        c = self.plan.channels
        g = self._gpu(stats)
        mean, inv = self._gpuarray.empty(c, np.float64), self._gpuarray.empty(c, np.float64)
        if update_running:
            rm = self._gpu(to_storage(self.running_mean, self.layer.dtype))
            rv = self._gpu(to_storage(self.running_var, self.layer.dtype))
            running = [rm.gpudata, rv.gpudata]
        else:
            running = [np.intp(0), np.intp(0)]
        self._sync_call("sync_finish_kernel", -(-c // 256), g.gpudata, *running, mean.gpudata, inv.gpudata)
        if update_running:
            host = self.running_mean.dtype
            self.running_mean = from_storage(rm.get(), self.layer.dtype).astype(host)
            self.running_var = from_storage(rv.get(), self.layer.dtype).astype(host)
        return mean.get(), inv.get()

    def sync_normalize(self, x, mean, invstd, out=None):
        x_gpu, batch, sizes = self._sync_x(x)
        if x_gpu is None:
            return np.empty(np.shape(x), self.dtype)
        y = self._gpuarray.empty_like(x_gpu)
        m, i = self._gpu(np.asarray(mean, np.float64)), self._gpu(np.asarray(invstd, np.float64))
        self._sync_call("sync_normalize_kernel", self._sync_grid(batch, sizes), *self._sync_lead("sync_normalize_kernel"),
                        x_gpu.gpudata, m.gpudata, i.gpudata, y.gpudata, np.int32(batch), *sizes)
        return self._host(y)

    def sync_backward_sums(self, x, dy, mean) -> np.ndarray:
        x_gpu, batch, sizes = self._sync_x(x)
        if x_gpu is None:
            return np.zeros(2 * self.plan.channels)
        dy_gpu = self._gpu(to_storage(dy, self.layer.dtype))
        m = self._gpu(np.asarray(mean, np.float64))
        sums = self._gpuarray.empty(2 * self.plan.channels, np.float64)
        self._sync_call("sync_backward_sums_kernel", self.plan.channels, x_gpu.gpudata, dy_gpu.gpudata, m.gpudata,
                        sums.gpudata, np.int32(batch), *sizes)
        return sums.get()

    def sync_backward(self, x, dy, mean, invstd, sums, count: float):
        x_gpu, batch, sizes = self._sync_x(x)
        c = self.plan.channels
        m, i = self._gpu(np.asarray(mean, np.float64)), self._gpu(np.asarray(invstd, np.float64))
        s = self._gpu(np.asarray(sums, np.float64))
        acc = self._acc_dtype()
        grads = {g: self._gpuarray.empty(c, acc) for g, _ in self.plan.gradients}
        if grads:
            self._sync_call("sync_backward_params", -(-c // 256), i.gpudata, s.gpudata,
                            *[g.gpudata for g in grads.values()])
        dx = np.empty(np.shape(x), self.dtype)
        if x_gpu is not None:
            dy_gpu = self._gpu(to_storage(dy, self.layer.dtype))
            dx_gpu = self._gpuarray.empty_like(x_gpu)
            self._sync_call("sync_backward_dx", self._sync_grid(batch, sizes), *self._sync_lead("sync_backward_dx"),
                            x_gpu.gpudata, dy_gpu.gpudata, m.gpudata, i.gpudata, s.gpudata, np.float64(count),
                            dx_gpu.gpudata, np.int32(batch), *sizes)
            dx = self._host(dx_gpu)
        out = {g: a.get() for g, a in grads.items()}
        return dx, out.get("dscale"), out.get("doffset")
