"""The CUDA target's training test bench: the training kernels called through pycuda with the
launch shapes of :class:`normgen.targets.cuda.train.TrainCuda`."""

from __future__ import annotations

import numpy as np

from ... import reference
from ...errors import NormgenError
from ..training import SGDM_DEFAULTS, TRAIN_ERRORS, TrainingBench
from .storage import from_storage, to_storage
from .sync import CudaSync
from .train import lower_train_cuda


class CudaTraining(CudaSync, TrainingBench):
    """Training methods of :class:`normgen.targets.cuda.module.CudaLayer` (mixed in): the training kernels are
    called through pycuda with the launch shapes of :class:`normgen.targets.cuda.train.TrainCuda`, the
    numbers the generated launchers use. NumPy arrays in and out; saved statistics float64,
    dscale/doffset in the accumulation type (float, double for float64), as on the device, and
    None for a parameter the layer does not have (``bias=False``, ``affine="none"``)."""

    def _tc(self):
        return lower_train_cuda(self.plan)

    def _require_unfused(self, role: str) -> None:
        """The methods named after a function call its plain kernels: a fused layer's public
        launcher of ``role`` takes more arguments and runs its stages too (``run``)."""
        fusion = self.plan.fusion
        if fusion is not None and (role in fusion.wrapped or role in fusion.dropped):
            raise NormgenError(f"layer {self.layer.name!r} has fused forms: call run({role!r}, **arrays) with its"
                               " named inputs")

    def _acc_dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self._tc().A == "double" else np.float32)

    def _train_launch(self, role: str, batch: int, values: dict, sizes: dict[str, int] | None = None) -> None:
        tc = self._tc()
        sizes = sizes or {}
        values = dict(values, batch=np.int32(batch), null=np.intp(0), **{n: np.uint64(v) for n, v in sizes.items()})
        if tc.runtime_params:
            values.setdefault("params", self._params)  # the device NAME_params struct
        for launch in tc.launches(role, batch, sizes):
            fn = self.module.get_function(launch.kernel)
            fn.prepare("".join(tc.arg_code(a) for a in launch.args))
            fn.prepared_call((launch.grid, 1), launch.block, *[values[a] for a in launch.args])
        self._drv.Context.synchronize()

    def _gpu(self, a):
        return self._gpuarray.to_gpu(np.ascontiguousarray(a))

    def _x(self, x):
        """(x on the device, batch, run-time sizes by name)."""
        shape = np.shape(x)
        batch = reference.batch_of(self.layer, np.broadcast_to(np.zeros((), np.uint8), shape))
        return self._gpu(to_storage(x, self.layer.dtype)), batch, self.layer.sizes_of(shape)

    def _host(self, a_gpu):
        return from_storage(a_gpu.get(), self.layer.dtype)

    def train_forward_save(self, x):
        """(y, saved_mean, saved_invstd); batch norm also updates running_mean/running_var."""
        self._require_unfused("train_forward_save")
        x_gpu, batch, sizes = self._x(x)
        y_gpu = self._gpuarray.empty_like(x_gpu)
        n = self.saved_count(batch, *sizes.values())
        mean, inv = self._gpuarray.empty(n, np.float64), self._gpuarray.empty(n, np.float64)
        values = {"x": x_gpu.gpudata, "y": y_gpu.gpudata, "saved_mean": mean.gpudata, "saved_invstd": inv.gpudata}
        if self.layer.kind == "batchnorm":
            if self.plan.running_unbiased and reference.count(self.layer, batch, sizes) < 2:
                raise NormgenError(f"{self.layer.name}_train_forward_save returned 3 ({TRAIN_ERRORS[3]})")
            rm = self._gpu(to_storage(self.running_mean, self.layer.dtype))
            rv = self._gpu(to_storage(self.running_var, self.layer.dtype))
            values.update(running_mean=rm.gpudata, running_var=rv.gpudata)
        self._train_launch("train_forward_save", batch, values, sizes)
        if self.layer.kind == "batchnorm":
            host = self.running_mean.dtype
            self.running_mean = from_storage(rm.get(), self.layer.dtype).astype(host)
            self.running_var = from_storage(rv.get(), self.layer.dtype).astype(host)
        return self._host(y_gpu), mean.get(), inv.get()

    def _backward(self, role: str, x, dy, saved=()):
        """(dx, dscale, doffset); a gradient the layer has no parameter for is None."""
        self._require_unfused(role)
        x_gpu, batch, sizes = self._x(x)
        if np.shape(dy) != np.shape(x):
            raise NormgenError(f"layer {self.layer.name!r}: dy has shape {np.shape(dy)}, x has {np.shape(x)}")
        dy_gpu = self._gpu(to_storage(dy, self.layer.dtype))
        dx_gpu = self._gpuarray.empty_like(x_gpu)
        acc = self._acc_dtype()
        grads = {g: self._gpuarray.empty(self.plan.channels, acc) for g, _ in self.plan.gradients}
        values = {"x": x_gpu.gpudata, "dy": dy_gpu.gpudata, "dx": dx_gpu.gpudata,
                  **{g: a.gpudata for g, a in grads.items()}}
        if role != "backward_frozen":
            ws = self._drv.mem_alloc(max(16, self._tc().workspace_size(batch, sizes)))
            values["workspace"] = ws
        keep = []
        for name, arr in zip(("saved_mean", "saved_invstd"), saved, strict=False):  # saved: () or both
            arr = np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)
            want = self.saved_count(batch, *sizes.values())
            if arr.size != want:
                raise NormgenError(f"{name} needs {want} values for batch {batch}, got {arr.size}")
            g = self._gpu(arr)
            keep.append(g)
            values[name] = g.gpudata
        self._train_launch(role, batch, values, sizes)
        out = {g: a.get() for g, a in grads.items()}
        return self._host(dx_gpu), out.get("dscale"), out.get("doffset")

    def backward(self, x, dy):
        """(dx, dscale, doffset): the gradient of the training forward, statistics from x."""
        return self._backward("backward", x, dy)

    def backward_saved(self, x, dy, saved_mean, saved_invstd):
        return self._backward("backward_saved", x, dy, (saved_mean, saved_invstd))

    def backward_frozen(self, x, dy):
        self._require_batchnorm("backward_frozen")
        return self._backward("backward_frozen", x, dy)

    def reset_velocity(self) -> None:
        """Zero the momentum state that :meth:`update` carries between steps (accumulation type,
        like the parameters on the device)."""
        acc = self._acc_dtype()
        self.velocity_scale = np.zeros(self.plan.channels, dtype=acc)
        self.velocity_offset = np.zeros(self.plan.channels, dtype=acc)

    def update(
        self,
        dscale,
        doffset=None,
        *,
        learn_rate: float = SGDM_DEFAULTS["learn_rate"],
        l2: float = SGDM_DEFAULTS["l2"],
        momentum: float = SGDM_DEFAULTS["momentum"],
    ) -> None:
        """One SGD-with-momentum step (the ``NAME_update`` kernel) on the device parameter struct,
        keeping the velocities in ``velocity_scale``/``velocity_offset``; :meth:`get_params`
        returns the updated values. Defaults: MATLAB's sgdm defaults. Only the parameters the
        layer has are stepped: ``doffset`` must be None without an offset (``bias=False``)."""
        self._require_runtime("update")
        learn = self.plan.learnables
        grads = self._learnable_gradients(dscale, doffset)
        if not hasattr(self, "velocity_scale"):
            self.reset_velocity()
        acc = self._acc_dtype()
        dev = {f"d{k}": self._gpu(self._per_channel(f"d{k}", grads[k], acc)) for k in learn}
        dev.update({f"velocity_{k}": self._gpu(getattr(self, f"velocity_{k}").astype(acc)) for k in learn})
        values = {
            **{n: a.gpudata for n, a in dev.items()},
            "learn_rate": acc.type(learn_rate),
            "l2": acc.type(l2),
            "momentum": acc.type(momentum),
        }
        self._train_launch("update", 1, values)
        for k in learn:
            setattr(self, f"velocity_{k}", dev[f"velocity_{k}"].get())
        self._download_params()

    def _stats_buffer(self):
        if getattr(self, "_stats_gpu", None) is None:
            self._stats_gpu = self._drv.mem_alloc(8 * (1 + 2 * self.layer.channels))
            self._train_launch("stats_reset", 1, {"acc": self._stats_gpu})
        return self._stats_gpu

    def reset_stats(self) -> None:
        self._require_batchnorm("population statistics")
        self._train_launch("stats_reset", 1, {"acc": self._stats_buffer()})

    def accumulate(self, x) -> None:
        self._require_batchnorm("population statistics")
        x_gpu, batch, sizes = self._x(x)
        self._train_launch("accumulate", batch, {"acc": self._stats_buffer(), "x": x_gpu.gpudata}, sizes)

    @property
    def stats_count(self) -> float:
        if getattr(self, "_stats_gpu", None) is None:
            return 0.0
        out = np.empty(1, np.float64)
        self._drv.memcpy_dtoh(out, self._stats_gpu)
        return float(out[0])

    def finalize(self):
        """(trained mean, trained variance) in the accumulation type. With run-time parameters
        they are written into the device parameter struct (so predict uses them) as well."""
        self._require_batchnorm("population statistics")
        need = 2 if self.plan.running_unbiased else 1
        if self.stats_count < need:
            raise NormgenError(f"{self.layer.name}_finalize: {TRAIN_ERRORS[3]}")
        acc = self._acc_dtype()
        mean, var = self._gpuarray.empty(self.layer.channels, acc), self._gpuarray.empty(self.layer.channels, acc)
        self._train_launch(
            "finalize", 1, {"acc": self._stats_buffer(), "trained_mean": mean.gpudata, "trained_variance": var.gpudata}
        )
        mean, var = mean.get(), var.get()
        if self.plan.runtime_params:
            self.set_params(trained_mean=mean, trained_variance=var)
        return mean, var
