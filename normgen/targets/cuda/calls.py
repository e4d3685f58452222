"""Calling a CUDA layer's public launchers by their arguments' names (normgen/targets/calls.py):
what every CUDA bench shares, whether it calls the kernels through pycuda or the launchers
themselves (the CPU emulator of the tests)."""

from __future__ import annotations

import numpy as np

from ... import reference
from ...errors import NormgenError
from ...lowering.fusion import FusedFunction
from ..calls import Argument, NamedCalls
from .fused import FusedCuda, Stage, fused_cuda
from .plan import derive
from .storage import from_storage, to_storage
from .train import lower_train_cuda

#: How the benches hold an argument of each C type (bfloat16: its values as float32; the device
#: holds its bits).
HOST_DTYPES = {"float": np.float32, "double": np.float64, "__half": np.float16, "__nv_bfloat16": np.float32}


class CudaCalls(NamedCalls):
    """NamedCalls over the CUDA launchers: a bench supplies ``_invoke`` and has ``layer``, ``plan``
    (lowered for cuda) and ``workspace`` (whether the ``_ws`` launcher runs where there is one)."""

    SUPPLIED = ("workspace", "workspace_bytes", "stream")

    @property
    def fused_cuda(self) -> FusedCuda:
        fc = getattr(self, "_fused_cuda", None)
        if fc is None:
            fc = self._fused_cuda = fused_cuda(self.plan, derive(self.plan), lower_train_cuda(self.plan))
        return fc

    def public(self, role: str):
        """The public launcher of ``role``: with ``workspace``, the _ws variant where there is one."""
        fc = self.fused_cuda
        found = [f for f in [*fc.declared(False), *fc.declared(True)] if f.role == role]
        if not found:
            have = ", ".join(dict.fromkeys(f.role for f in [*fc.declared(False), *fc.declared(True)]))
            raise NormgenError(f"layer {self.layer.name!r} has no function {role!r} (it has {have})")
        ws = [f for f in found if f.name.endswith("_ws")]
        return ws[0] if ws and getattr(self, "workspace", True) else found[0]

    def _host_dtype(self, a: Argument) -> np.dtype:
        return np.dtype(HOST_DTYPES[a.ctype])

    def _input(self, x) -> tuple[np.ndarray, tuple[int, ...]]:
        """(x as the bench holds it, (batch, run-time sizes in order))."""
        x = np.ascontiguousarray(x, dtype=HOST_DTYPES[self.plan.ctype])
        batch = reference.batch_of(self.layer, x)
        sizes = self.layer.sizes_of(x.shape)
        return x, (batch, *(sizes[n] for n in self.layer.sizes))

    def to_device_values(self, a: Argument, value: np.ndarray) -> np.ndarray:
        """An argument's array as the device stores it (element type: bfloat16 bits)."""
        if a.ctype == self.plan.ctype:
            return np.array(to_storage(value, self.layer.dtype), copy=True)
        return np.array(value, dtype=HOST_DTYPES[a.ctype], copy=True)

    def from_device_values(self, a: Argument, raw: np.ndarray) -> np.ndarray:
        if a.ctype == self.plan.ctype:
            return from_storage(raw, self.layer.dtype)
        return raw

    def stages_of(self, f) -> list[Stage]:
        """What launcher ``f`` runs: its stages, or (a plain launcher) itself."""
        if isinstance(f, FusedFunction):
            return self.fused_cuda.stages(f)
        return [Stage("core", core=f.name, args=tuple(_name(a) for a in f.args))]

    def core_arguments(self, stage: Stage, f) -> dict[str, str]:
        """A core stage's arguments: the core's parameter name → the public launcher's variable."""
        params = self.fused_cuda.cores.get(stage.core) or tuple(_name(a) for a in f.args)
        return dict(zip(params, stage.args, strict=True))


def _name(arg: str) -> str:
    return arg.split("*")[-1].split()[-1]
