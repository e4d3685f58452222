"""The C target's synchronized batch-norm functions on NumPy arrays (issue 20): the pieces
:mod:`normgen.distributed` runs around the collectives of torch.distributed.

Statistics travel as float64 arrays of ``1 + 2·C`` values laid out as ``NAME_stats`` (count,
mean[C], m2[C]); the backward's sums as ``2·C`` values (Σdy[C], Σdy·(x − mean)[C]).
"""

from __future__ import annotations

import numpy as np

from ...errors import NormgenError


class CSync:
    """Synchronized batch-norm methods of :class:`normgen.targets.c.build.CompiledLayer` (mixed in
    through :class:`normgen.targets.c.training.CTraining`)."""

    def _sync_fn(self, role: str):
        self._require_batchnorm(f"the synchronized {role}")
        return getattr(self._lib, f"{self.layer.name}_{role}")

    def _shard(self, x) -> tuple[np.ndarray, tuple[int, ...]]:
        """x and its size arguments, where the batch may be 0 (an empty shard)."""
        x = np.asarray(x)
        letters = self.layer.fmt.letters
        if self.layer.fmt.has_batch and x.ndim == len(letters) and x.shape[letters.index("B")] == 0:
            probe = list(x.shape)
            probe[letters.index("B")] = 1
            _, dims = self._input(np.zeros(probe, dtype=self.dtype))  # checks the other sizes
            return np.ascontiguousarray(x, dtype=self.dtype), (0, *dims[1:])
        return self._input(x)

    def _doubles(self, name: str, values, n: int) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        if values.size != n:
            raise NormgenError(f"{name} needs {n} values, got {values.size}")
        return values

    def _dptr(self, arr: np.ndarray):
        return self.ffi.cast("double *", self.ffi.from_buffer(arr))

    def _stats_ptr(self, arr: np.ndarray):
        return self.ffi.cast(f"{self.layer.name}_stats *", self.ffi.from_buffer(arr))

    @property
    def stats_size(self) -> int:
        """Doubles of one shard's statistics (``NAME_SYNC_STATS_DOUBLES``): count, mean[C], m2[C]."""
        return 1 + 2 * self.plan.channels

    def sync_stats(self, x) -> np.ndarray:
        """This shard's (count, mean[C], M2[C]) as one float64 array; x may hold 0 samples."""
        x, dims = self._shard(x)
        out = np.empty(self.stats_size)
        self._train_check(self._sync_fn("sync_stats")(self._ptr(x), self._stats_ptr(out), *dims), "sync_stats")
        return out

    def stats_merge(self, parts) -> np.ndarray:
        """The statistics of the shards ``parts`` (one row each) merged in row order (Chan's formula)."""
        parts = np.ascontiguousarray(parts, dtype=np.float64).reshape(-1, self.stats_size)
        acc = np.zeros(self.stats_size)
        fn = self._sync_fn("stats_merge")
        for row in parts:
            self._train_check(fn(self._stats_ptr(acc), self._stats_ptr(np.ascontiguousarray(row))), "stats_merge")
        return acc

    def sync_finish(self, stats, *, update_running: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(mean, 1/sqrt(var + ε)) per channel from merged statistics; with ``update_running`` the
        running statistics are updated as one process with the whole batch would."""
        stats = self._doubles("stats", stats, self.stats_size)
        c = self.plan.channels
        mean, inv = np.empty(c), np.empty(c)
        running = ([self._ptr(self.running_mean), self._ptr(self.running_var)] if update_running
                   else [self.ffi.NULL, self.ffi.NULL])
        rc = self._sync_fn("sync_finish")(self._stats_ptr(stats), *running, self._dptr(mean), self._dptr(inv))
        self._train_check(rc, "sync_finish")
        return mean, inv

    def sync_normalize(self, x, mean, invstd, out: np.ndarray | None = None) -> np.ndarray:
        """y of this shard from the merged statistics' (mean, invstd)."""
        x, dims = self._shard(x)
        c = self.plan.channels
        y = np.empty_like(x) if out is None else out
        rc = self._sync_fn("sync_normalize")(
            *self._lead, self._ptr(x), self._dptr(self._doubles("mean", mean, c)),
            self._dptr(self._doubles("invstd", invstd, c)), self._ptr(y), *dims)
        self._train_check(rc, "sync_normalize")
        return y

    def sync_backward_sums(self, x, dy, mean) -> np.ndarray:
        """This shard's (Σdy[C], Σdy·(x − mean)[C]), float64."""
        x, dims = self._shard(x)
        dy = self._dy(x, dy)
        sums = np.empty(2 * self.plan.channels)
        rc = self._sync_fn("sync_backward_sums")(
            self._ptr(x), self._ptr(dy), self._dptr(self._doubles("mean", mean, self.plan.channels)),
            self._dptr(sums), *dims)
        self._train_check(rc, "sync_backward_sums")
        return sums

    def sync_backward(self, x, dy, mean, invstd, sums, count: float):
        """(dx, dscale, doffset) of this shard from the global sums and count; a gradient the
        layer has no parameter for is None."""
        x, dims = self._shard(x)
        dy = self._dy(x, dy)
        c = self.plan.channels
        dx = np.empty_like(x)
        grads = {g: np.empty(c, dtype=self.dtype) for g, _ in self.plan.gradients}
        rc = self._sync_fn("sync_backward")(
            *self._lead, self._ptr(x), self._ptr(dy), self._dptr(self._doubles("mean", mean, c)),
            self._dptr(self._doubles("invstd", invstd, c)), self._dptr(self._doubles("sums", sums, 2 * c)),
            float(count), self._ptr(dx), *[self._ptr(g) for g in grads.values()], *dims)
        self._train_check(rc, "sync_backward")
        return dx, grads.get("dscale"), grads.get("doffset")
