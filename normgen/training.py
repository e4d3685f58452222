"""The training half of the test bench (issue 4, docs/training.md): backward, saved statistics,
parameter update and population statistics on the compiled layers of each target.

:class:`TrainingBench` holds what every target shares (argument checks, velocity state, the
error for embedded parameters); each target supplies ``_call(role, *arrays, ...)``-style
primitives in its own mixin (:class:`CTraining` for the C target, :class:`CudaTraining` for
CUDA). Both have the same methods; with ``param_storage="runtime"`` ``.update(...)`` steps the
run-time parameters (the C struct, or the CUDA device struct) and ``.get_params()`` reads them.
"""

from __future__ import annotations

import numpy as np

from . import reference
from .errors import NormgenError

#: MATLAB trainingOptions('sgdm') defaults: InitialLearnRate, L2Regularization, Momentum.
SGDM_DEFAULTS = {"learn_rate": 0.01, "l2": 1e-4, "momentum": 0.9}

TRAIN_ERRORS = {
    1: "a NULL pointer",
    2: "batch < 1 or too large",
    3: "too few values per channel (an unbiased variance needs two)",
}


class TrainingBench:
    """Target-independent parts of the training test bench."""

    layer: object
    dtype: np.dtype

    def _require_batchnorm(self, what: str) -> None:
        if self.layer.kind != "batchnorm":
            raise NormgenError(f"{what} is for batch norm; layer {self.layer.name!r} is {self.layer.kind}")

    def _require_runtime(self, what: str) -> None:
        if self.layer.param_storage != "runtime":
            raise NormgenError(
                f"{what} needs run-time parameters: layer {self.layer.name!r} embeds its scale and offset as"
                " static const arrays (param_storage='embedded'), so there is nothing to update; describe it"
                " with param_storage='runtime'"
            )

    def _dy(self, x: np.ndarray, dy: np.ndarray) -> np.ndarray:
        dy = np.asarray(dy)
        if dy.shape != x.shape:
            raise NormgenError(f"layer {self.layer.name!r}: dy has shape {dy.shape}, x has {x.shape}")
        return np.ascontiguousarray(dy, dtype=self.dtype)

    def _per_channel(self, name: str, values: np.ndarray, dtype=None) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=self.dtype if dtype is None else dtype).reshape(-1)
        if values.size != self.layer.channels:
            raise NormgenError(f"{name} needs {self.layer.channels} values (one per channel), got {values.size}")
        return values

    def saved_count(self, batch: int) -> int:
        """How many statistics train_forward_save saves (and backward_saved reads) for a batch."""
        if self.layer.kind == "batchnorm":
            return self.layer.channels
        return int(np.prod(reference.full_shape(self.layer, batch))) // reference.count(self.layer, batch)

    def reset_velocity(self) -> None:
        """Zero the momentum state that :meth:`update` carries between steps."""
        self.velocity_scale = np.zeros(self.layer.channels, dtype=self.dtype)
        self.velocity_offset = np.zeros(self.layer.channels, dtype=self.dtype)


class CTraining(TrainingBench):
    """Training methods of :class:`normgen.build.CompiledLayer` (mixed in)."""

    def _train_fn(self, role: str):
        return getattr(self._lib, f"{self.layer.name}_{role}")

    def _train_check(self, rc: int, role: str) -> None:
        if rc:
            raise NormgenError(f"{self.layer.name}_{role} returned {rc} ({TRAIN_ERRORS.get(rc, 'unknown error')})")

    def _acc_ptr(self, arr: np.ndarray):
        return self.ffi.cast(f"{self.plan.acc_type} *", self.ffi.from_buffer(arr))

    def train_forward_save(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training forward that also returns the saved (mean, 1/sqrt(var + ε)) per statistic,
        float64, laid out as :func:`normgen.reference.saved_statistics`. Batch norm also updates
        ``running_mean``/``running_var`` as :meth:`train_forward` does."""
        x, batch = self._input(x)
        y = np.empty_like(x)
        n = self.saved_count(batch)
        mean, inv = np.empty(n), np.empty(n)
        running = [self._ptr(self.running_mean), self._ptr(self.running_var)] if self.layer.kind == "batchnorm" else []
        rc = self._train_fn("train_forward_save")(
            *self._lead, self._ptr(x), self._ptr(y), batch, *running, self._acc_ptr(mean), self._acc_ptr(inv)
        )
        self._train_check(rc, "train_forward_save")
        return y, mean, inv

    def _backward(self, role: str, x, dy, saved=()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, batch = self._input(x)
        dy = self._dy(x, dy)
        dx = np.empty_like(x)
        dscale = np.empty(self.layer.channels, dtype=self.dtype)
        doffset = np.empty(self.layer.channels, dtype=self.dtype)
        extra = []
        for name, arr in zip(("saved_mean", "saved_invstd"), saved, strict=False):  # saved: () or both
            arr = np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)
            if arr.size != self.saved_count(batch):
                raise NormgenError(f"{name} needs {self.saved_count(batch)} values for batch {batch}, got {arr.size}")
            extra.append(arr)
        rc = self._train_fn(role)(
            *self._lead,
            self._ptr(x),
            self._ptr(dy),
            *[self._acc_ptr(a) for a in extra],
            self._ptr(dx),
            self._ptr(dscale),
            self._ptr(doffset),
            batch,
        )
        self._train_check(rc, role)
        return dx, dscale, doffset

    def backward(self, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dx, dscale, doffset): the gradient of the training forward, statistics from x."""
        return self._backward("backward", x, dy)

    def backward_saved(self, x, dy, saved_mean, saved_invstd) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`backward` with the statistics returned by :meth:`train_forward_save`."""
        return self._backward("backward_saved", x, dy, (saved_mean, saved_invstd))

    def backward_frozen(self, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch norm: (dx, dscale, doffset) with the trained statistics held fixed."""
        self._require_batchnorm("backward_frozen")
        return self._backward("backward_frozen", x, dy)

    def update(
        self,
        dscale,
        doffset,
        *,
        learn_rate: float = SGDM_DEFAULTS["learn_rate"],
        l2: float = SGDM_DEFAULTS["l2"],
        momentum: float = SGDM_DEFAULTS["momentum"],
    ) -> None:
        """One SGD-with-momentum step on the run-time scale and offset (``params``), keeping the
        velocities in ``velocity_scale``/``velocity_offset``. Defaults: MATLAB's sgdm defaults."""
        self._require_runtime("update")
        if not hasattr(self, "velocity_scale"):
            self.reset_velocity()
        gs, go = self._per_channel("dscale", dscale), self._per_channel("doffset", doffset)
        rc = self._train_fn("update")(
            self.params,
            self._ptr(gs),
            self._ptr(go),
            self._ptr(self.velocity_scale),
            self._ptr(self.velocity_offset),
            learn_rate,
            l2,
            momentum,
        )
        self._train_check(rc, "update")

    def reset_stats(self) -> None:
        """Empty the population-statistics accumulator."""
        self._require_batchnorm("population statistics")
        self._stats = self.ffi.new(f"{self.layer.name}_stats *")
        self._train_check(self._train_fn("stats_reset")(self._stats), "stats_reset")

    def accumulate(self, x: np.ndarray) -> None:
        """Merge a batch into the population statistics."""
        self._require_batchnorm("population statistics")
        if getattr(self, "_stats", None) is None:
            self.reset_stats()
        x, batch = self._input(x)
        self._train_check(self._train_fn("accumulate")(self._stats, self._ptr(x), batch), "accumulate")

    @property
    def stats_count(self) -> float:
        """Values per channel accumulated so far."""
        return 0.0 if getattr(self, "_stats", None) is None else float(self._stats.count)

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """(trained mean, trained variance) of everything accumulated. With run-time parameters
        they are written into ``params`` (so predict uses them) as well."""
        self._require_batchnorm("population statistics")
        if getattr(self, "_stats", None) is None:
            self.reset_stats()
        mean = np.empty(self.layer.channels, dtype=self.dtype)
        var = np.empty(self.layer.channels, dtype=self.dtype)
        self._train_check(self._train_fn("finalize")(self._stats, self._ptr(mean), self._ptr(var)), "finalize")
        if self.plan.runtime_params:
            self.set_params(trained_mean=mean, trained_variance=var)
        return mean, var


class CudaTraining(TrainingBench):
    """Training methods of :class:`normgen.cuda.CudaLayer` (mixed in): the training kernels are
    called through pycuda with the launch shapes of :class:`normgen.train_plan.TrainCuda`, the
    numbers the generated launchers use. NumPy arrays in and out; saved statistics float64,
    dscale/doffset in the accumulation type (float, double for float64), as on the device."""

    def _tc(self):
        return self.plan.train.cuda

    def _acc_dtype(self) -> np.dtype:
        return np.dtype(np.float64 if self._tc().A == "double" else np.float32)

    def _train_launch(self, role: str, batch: int, values: dict) -> None:
        tc = self._tc()
        values = dict(values, batch=np.int32(batch), null=np.intp(0))
        if tc.runtime_params:
            values.setdefault("params", self._params)  # the device NAME_params struct
        for launch in tc.launches(role, batch):
            fn = self.module.get_function(launch.kernel)
            fn.prepare("".join(tc.arg_code(a) for a in launch.args))
            fn.prepared_call((launch.grid, 1), launch.block, *[values[a] for a in launch.args])
        self._drv.Context.synchronize()

    def _gpu(self, a):
        return self._gpuarray.to_gpu(np.ascontiguousarray(a))

    def _x(self, x):
        from .cuda import to_storage

        batch = reference.batch_of(self.layer, np.broadcast_to(np.zeros((), np.uint8), np.shape(x)))
        return self._gpu(to_storage(x, self.layer.dtype)), batch

    def _host(self, a_gpu):
        from .cuda import from_storage

        return from_storage(a_gpu.get(), self.layer.dtype)

    def train_forward_save(self, x):
        """(y, saved_mean, saved_invstd); batch norm also updates running_mean/running_var."""
        from .cuda import from_storage, to_storage

        x_gpu, batch = self._x(x)
        y_gpu = self._gpuarray.empty_like(x_gpu)
        n = self.saved_count(batch)
        mean, inv = self._gpuarray.empty(n, np.float64), self._gpuarray.empty(n, np.float64)
        values = {"x": x_gpu.gpudata, "y": y_gpu.gpudata, "saved_mean": mean.gpudata, "saved_invstd": inv.gpudata}
        if self.layer.kind == "batchnorm":
            if self.plan.running_unbiased and reference.count(self.layer, batch) < 2:
                raise NormgenError(f"{self.layer.name}_train_forward_save returned 3 ({TRAIN_ERRORS[3]})")
            rm = self._gpu(to_storage(self.running_mean, self.layer.dtype))
            rv = self._gpu(to_storage(self.running_var, self.layer.dtype))
            values.update(running_mean=rm.gpudata, running_var=rv.gpudata)
        self._train_launch("train_forward_save", batch, values)
        if self.layer.kind == "batchnorm":
            host = self.running_mean.dtype
            self.running_mean = from_storage(rm.get(), self.layer.dtype).astype(host)
            self.running_var = from_storage(rv.get(), self.layer.dtype).astype(host)
        return self._host(y_gpu), mean.get(), inv.get()

    def _backward(self, role: str, x, dy, saved=()):
        from .cuda import to_storage

        x_gpu, batch = self._x(x)
        if np.shape(dy) != np.shape(x):
            raise NormgenError(f"layer {self.layer.name!r}: dy has shape {np.shape(dy)}, x has {np.shape(x)}")
        dy_gpu = self._gpu(to_storage(dy, self.layer.dtype))
        dx_gpu = self._gpuarray.empty_like(x_gpu)
        acc = self._acc_dtype()
        ds, do = self._gpuarray.empty(self.layer.channels, acc), self._gpuarray.empty(self.layer.channels, acc)
        values = {
            "x": x_gpu.gpudata,
            "dy": dy_gpu.gpudata,
            "dx": dx_gpu.gpudata,
            "dscale": ds.gpudata,
            "doffset": do.gpudata,
        }
        if role != "backward_frozen":
            ws = self._drv.mem_alloc(max(16, self._tc().workspace_size(batch)))
            values["workspace"] = ws
        keep = []
        for name, arr in zip(("saved_mean", "saved_invstd"), saved, strict=False):  # saved: () or both
            arr = np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)
            if arr.size != self.saved_count(batch):
                raise NormgenError(f"{name} needs {self.saved_count(batch)} values for batch {batch}, got {arr.size}")
            g = self._gpu(arr)
            keep.append(g)
            values[name] = g.gpudata
        self._train_launch(role, batch, values)
        return self._host(dx_gpu), ds.get(), do.get()

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
        self.velocity_scale = np.zeros(self.layer.channels, dtype=acc)
        self.velocity_offset = np.zeros(self.layer.channels, dtype=acc)

    def update(
        self,
        dscale,
        doffset,
        *,
        learn_rate: float = SGDM_DEFAULTS["learn_rate"],
        l2: float = SGDM_DEFAULTS["l2"],
        momentum: float = SGDM_DEFAULTS["momentum"],
    ) -> None:
        """One SGD-with-momentum step (the ``NAME_update`` kernel) on the device parameter struct,
        keeping the velocities in ``velocity_scale``/``velocity_offset``; :meth:`get_params`
        returns the updated values. Defaults: MATLAB's sgdm defaults."""
        self._require_runtime("update")
        if not hasattr(self, "velocity_scale"):
            self.reset_velocity()
        acc = self._acc_dtype()
        ds, do = (self._gpu(self._per_channel(n, g, acc)) for n, g in (("dscale", dscale), ("doffset", doffset)))
        vs, vo = self._gpu(self.velocity_scale.astype(acc)), self._gpu(self.velocity_offset.astype(acc))
        values = {
            "dscale": ds.gpudata,
            "doffset": do.gpudata,
            "velocity_scale": vs.gpudata,
            "velocity_offset": vo.gpudata,
            "learn_rate": acc.type(learn_rate),
            "l2": acc.type(l2),
            "momentum": acc.type(momentum),
        }
        self._train_launch("update", 1, values)
        self.velocity_scale, self.velocity_offset = vs.get(), vo.get()
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
        x_gpu, batch = self._x(x)
        self._train_launch("accumulate", batch, {"acc": self._stats_buffer(), "x": x_gpu.gpudata})

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
