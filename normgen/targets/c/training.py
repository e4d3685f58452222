"""The C target's training test bench: backward, saved statistics, parameter update and
population statistics through cffi (docs/training.md)."""

from __future__ import annotations

import numpy as np

from ...errors import NormgenError
from ..calls import ACC_DTYPES
from ..training import SGDM_DEFAULTS, TRAIN_ERRORS, TrainingBench
from .sync import CSync


class CTraining(CSync, TrainingBench):
    """Training methods of :class:`normgen.targets.c.build.CompiledLayer` (mixed in)."""

    def _train_fn(self, role: str):
        return getattr(self._lib, f"{self.layer.name}_{role}")

    def _train_check(self, rc: int, role: str) -> None:
        if rc:
            raise NormgenError(f"{self.layer.name}_{role} returned {rc} ({TRAIN_ERRORS.get(rc, 'unknown error')})")

    def _acc_ptr(self, arr: np.ndarray):
        return self.ffi.cast(f"{self.plan.acc_type} *", self.ffi.from_buffer(arr))

    def _outputs(self, out, specs: list[tuple[str, tuple, np.dtype] | None]) -> list[np.ndarray | None]:
        """The output arrays of a call: ``out`` (a tuple with an array or None for each output;
        a single array for the first) checked against ``specs`` (name, shape, dtype; None where
        the layer has no such output), new arrays where it gives none. An array given must be
        C-contiguous, writable, of the dtype and of the shape (a per-channel or per-statistic
        output: of the size), so that the C function writes into it, not into a copy."""
        given = (out,) if isinstance(out, np.ndarray) else tuple(out or ())
        if len(given) > len(specs):
            raise NormgenError(f"out= has {len(given)} arrays; this function writes {len(specs)}")
        arrays = []
        for i, spec in enumerate(specs):
            arr = given[i] if i < len(given) else None
            if spec is None:
                if arr is not None:
                    raise NormgenError(f"layer {self.layer.name!r} has no output number {i + 1} here: pass None")
                arrays.append(None)
                continue
            name, shape, dtype = spec
            if arr is None:
                arrays.append(np.empty(shape, dtype=dtype))
                continue
            size = int(np.prod(shape))
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or not arr.flags.c_contiguous \
                    or not arr.flags.writeable or (arr.shape != tuple(shape) if len(shape) > 1 else arr.size != size):
                raise NormgenError(f"out= {name} must be a writable C-contiguous {np.dtype(dtype).name} array of"
                                   f" {'shape ' + str(tuple(shape)) if len(shape) > 1 else str(size) + ' values'}")
            arrays.append(arr)
        return arrays

    def train_forward_save(self, x: np.ndarray, out=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Training forward that also returns the saved (mean, 1/sqrt(var + ε)) per statistic,
        in the accumulation type (float64; float32 with ``statistics = "float"``), laid out as
        :func:`normgen.reference.saved_statistics`. Batch norm also updates
        ``running_mean``/``running_var`` as :meth:`train_forward` does. ``out``: preallocated
        ``(y, saved_mean, saved_invstd)`` (any of them None: allocated here); y may be x."""
        x, dims = self._input(x)
        n = self.saved_count(*dims)
        acc = np.dtype(ACC_DTYPES[self.plan.acc_type])  # the saved statistics' type
        y, mean, inv = self._outputs(out, [("y", x.shape, self.dtype), ("saved_mean", (n,), acc),
                                           ("saved_invstd", (n,), acc)])
        running = [self._ptr(self.running_mean), self._ptr(self.running_var)] if self.layer.kind == "batchnorm" else []
        rc = self._train_fn("train_forward_save")(
            *self._lead, self._ptr(x), self._ptr(y), *dims, *running, self._acc_ptr(mean), self._acc_ptr(inv)
        )
        self._train_check(rc, "train_forward_save")
        return y, mean, inv

    def _backward(self, role: str, x, dy, saved=(), out=None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(dx, dscale, doffset); a gradient the layer has no parameter for is None. ``out``:
        preallocated ``(dx, dscale, doffset)`` (None for any to allocate; dx may be x or dy)."""
        x, dims = self._input(x)
        dy = self._dy(x, dy)
        have = {g for g, _ in self.plan.gradients}
        c = (self.plan.channels,)
        dx, dscale, doffset = self._outputs(out, [("dx", x.shape, self.dtype)] + [
            (g, c, self.dtype) if g in have else None for g in ("dscale", "doffset")])
        grads = {g: a for g, a in (("dscale", dscale), ("doffset", doffset)) if a is not None}
        extra = []
        for name, arr in zip(("saved_mean", "saved_invstd"), saved, strict=False):  # saved: () or both
            arr = np.ascontiguousarray(arr, dtype=ACC_DTYPES[self.plan.acc_type]).reshape(-1)
            if arr.size != self.saved_count(*dims):
                raise NormgenError(f"{name} needs {self.saved_count(*dims)} values for batch {dims[0]}, got {arr.size}")
            extra.append(arr)
        rc = self._train_fn(role)(
            *self._lead,
            self._ptr(x),
            self._ptr(dy),
            *[self._acc_ptr(a) for a in extra],
            self._ptr(dx),
            *[self._ptr(g) for g in grads.values()],
            *dims,
        )
        self._train_check(rc, role)
        return dx, grads.get("dscale"), grads.get("doffset")

    def backward(self, x: np.ndarray, dy: np.ndarray, out=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dx, dscale, doffset): the gradient of the training forward, statistics from x.
        ``out``: preallocated ``(dx, dscale, doffset)``, any of them None."""
        return self._backward("backward", x, dy, out=out)

    def backward_saved(self, x, dy, saved_mean, saved_invstd, out=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`backward` with the statistics returned by :meth:`train_forward_save`."""
        return self._backward("backward_saved", x, dy, (saved_mean, saved_invstd), out=out)

    def backward_frozen(self, x: np.ndarray, dy: np.ndarray, out=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Batch norm: (dx, dscale, doffset) with the trained statistics held fixed."""
        self._require_batchnorm("backward_frozen")
        return self._backward("backward_frozen", x, dy, out=out)

    def update(
        self,
        dscale,
        doffset=None,
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
        learn = self.plan.learnables
        grads = self._learnable_gradients(dscale, doffset)
        rc = self._train_fn("update")(
            self.params,
            *[self._ptr(self._per_channel(f"d{k}", grads[k])) for k in learn],
            *[self._ptr(getattr(self, f"velocity_{k}")) for k in learn],
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
        x, dims = self._input(x)
        self._train_check(self._train_fn("accumulate")(self._stats, self._ptr(x), *dims), "accumulate")

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
