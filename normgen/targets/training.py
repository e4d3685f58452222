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

from .. import reference
from ..errors import NormgenError

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
        if values.size != self.plan.channels:
            raise NormgenError(f"{name} needs {self.plan.channels} values ({self.plan.param_per}), got {values.size}")
        return values

    def _learnable_gradients(self, dscale, doffset) -> dict:
        """{"scale": dscale, "offset": doffset}, checked against the parameters the layer has: a
        gradient is given exactly for each (None for one it lacks)."""
        learn = self.plan.learnables
        grads = {"scale": dscale, "offset": doffset}
        for k in ("scale", "offset"):
            if (grads[k] is None) == (k in learn):
                raise NormgenError(f"layer {self.layer.name!r} {'has' if k in learn else 'has no'} {k}: d{k}"
                                   f" {'is needed' if k in learn else 'must be None'}")
        return grads

    def saved_count(self, batch: int, *sizes: int) -> int:
        """How many statistics train_forward_save saves (and backward_saved reads) for a batch (and
        the run-time sizes, in order)."""
        if self.layer.kind == "batchnorm":
            return self.layer.channels
        named = dict(zip(self.layer.sizes, sizes, strict=True))
        return (int(np.prod(reference.full_shape(self.layer, batch, named)))
                // reference.count(self.layer, batch, named))

    def reset_velocity(self) -> None:
        """Zero the momentum state that :meth:`update` carries between steps."""
        self.velocity_scale = np.zeros(self.plan.channels, dtype=self.dtype)
        self.velocity_offset = np.zeros(self.plan.channels, dtype=self.dtype)
