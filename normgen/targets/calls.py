"""Calling a generated function by its arguments' names (the fused forms' benches).

A fused layer's functions take more arguments than a plain one's (README "Fused forms"), in an
order the lowering fixes (normgen/lowering/fusion.py). :func:`argument_kinds` says what each
argument of a public function is, from its name; a bench passes arrays by name and gets the
outputs back by name, whichever target runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import reference
from ..errors import NormgenError

#: What each pointer argument holds, by name.
X_SHAPED = ("x", "residual", "h", "y", "dy", "dh", "dx")  # shaped like x
PER_SAMPLE = ("mod_shift", "mod_scale", "dmod_shift", "dmod_scale")  # [batch, C]
PER_PARAM = ("dscale", "doffset")  # one per parameter value
SAVED = ("saved_mean", "saved_invstd")  # one per statistic, accumulation type
RUNNING = ("running_mean", "running_var")  # one per channel, read and updated
#: The NumPy dtype of each accumulation type (the saved statistics, the population statistics).
ACC_DTYPES = {"float": np.float32, "double": np.float64}


@dataclass(frozen=True)
class Argument:
    name: str
    ctype: str
    pointer: bool
    const: bool

    @property
    def output(self) -> bool:
        return self.pointer and not self.const


def argument_kinds(args: list[str]) -> list[Argument]:
    """Each C argument (``const float *x``, ``int32_t batch``) as an :class:`Argument`."""
    out = []
    for arg in args:
        words = arg.replace("*", " * ").split()
        out.append(Argument(words[-1], " ".join(w for w in words[:-1] if w not in ("const", "*")),
                            "*" in words, words[0] == "const"))
    return out


class NamedCalls:
    """``run(role, **arrays)`` for the benches of both targets. A target supplies ``_invoke(f,
    values)`` (the call, given each argument's NumPy array or integer, outputs filled in place) and
    the attributes every bench has (layer, plan, dtype, running_mean/var, _lead, _input)."""

    #: Arguments the target's ``_invoke`` passes itself (the CUDA workspace and stream): ``run``
    #: leaves them out of ``values``.
    SUPPLIED: tuple[str, ...] = ()

    def _host_dtype(self, a: Argument) -> np.dtype:
        """The NumPy dtype of argument ``a``'s array on the bench (saved statistics: the
        accumulation type's)."""
        return np.dtype(ACC_DTYPES[self.plan.acc_type] if a.name in SAVED else self.dtype)

    def public(self, role: str):
        for f in self.plan.public_functions:
            if f.role == role:
                return f
        have = ", ".join(f.role for f in self.plan.public_functions)
        raise NormgenError(f"layer {self.layer.name!r} has no function {role!r} (it has {have})")

    def run(self, role: str, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        """Call the layer's public function ``role`` with the named input arrays; returns its
        outputs by name (running statistics are updated on the bench, as train_forward does)."""
        f, values, outputs = self.arguments(role, **arrays)
        self._invoke(f, values)
        outputs.update({a.name: np.array(getattr(self, a.name)) for a in argument_kinds(f.args) if a.name in RUNNING})
        return outputs

    def arguments(self, role: str, **arrays: np.ndarray) -> tuple[object, dict, dict[str, np.ndarray]]:
        """(the public function ``role``, every argument's value by name, the output arrays by
        name) for a call with the named input arrays, checked."""
        f = self.public(role)
        args = argument_kinds(f.args)
        first = next((a.name for a in args if a.name in X_SHAPED and a.const), None)
        if first is None or first not in arrays:
            raise NormgenError(f"{f.name} needs {first!r}")
        x, dims = self._input(arrays[first])
        batch = dims[0]
        sizes = dict(zip(self.layer.sizes, dims[1:], strict=True))
        unknown = set(arrays) - {a.name for a in args if a.const}
        if unknown:
            raise NormgenError(f"{f.name} takes no input {sorted(unknown)[0]!r}")
        values: dict[str, object] = {}
        outputs: dict[str, np.ndarray] = {}
        for a in args:
            if a.name in self.SUPPLIED:
                continue
            if not a.pointer:
                values[a.name] = batch if a.name == "batch" else sizes[a.name]
                continue
            if a.name == "params":
                values[a.name] = self.params
                continue
            dtype = self._host_dtype(a)
            count = self._count(a.name, x, batch, dims)
            if a.name in RUNNING:
                values[a.name] = getattr(self, a.name)
                continue
            if a.const:
                if a.name not in arrays:
                    raise NormgenError(f"{f.name} needs {a.name!r}")
                arr = np.ascontiguousarray(arrays[a.name], dtype=dtype)
                if a.name in X_SHAPED and arr.shape != x.shape or arr.size != count:
                    raise NormgenError(f"{f.name}: {a.name} has shape {arr.shape}; it needs {count} values"
                                       + (f", shaped {x.shape}" if a.name in X_SHAPED else ""))
                values[a.name] = arr if a.name != first else x
            else:
                arr = np.empty(x.shape if a.name in X_SHAPED else count, dtype=dtype)
                values[a.name] = outputs[a.name] = arr
        return f, values, outputs

    def _count(self, name: str, x: np.ndarray, batch: int, dims) -> int:
        if name in X_SHAPED:
            return x.size
        if name in PER_SAMPLE:
            return batch * self.layer.channels
        if name in PER_PARAM:
            return self.plan.channels
        if name in SAVED:
            return self.saved_count(*dims)
        if name in RUNNING:
            return self.layer.channels
        raise NormgenError(f"argument {name!r} of layer {self.layer.name!r} is not one a bench can pass")


def fused_reference(layer, role: str, arrays: dict[str, np.ndarray], running=None) -> dict[str, np.ndarray]:
    """What :mod:`normgen.reference` says the public function ``role`` of a fused layer returns,
    by output name, for the same named inputs."""
    mod = {k: arrays[k] for k in ("mod_shift", "mod_scale") if k in arrays}
    if role in ("predict", "train_forward", "train_forward_save"):
        x = arrays["x"]
        res = arrays.get("residual")
        out = {}
        if layer.residual_out:
            out["h"] = reference.fused_input(layer, x, res)
        if role == "predict":
            out["y"] = reference.predict(layer, x, residual=res, **mod)
            return out
        h = reference.fused_input(layer, x, res)
        if layer.kind == "batchnorm":
            out["y"], out["running_mean"], out["running_var"] = reference.train_forward(
                layer, x, *running, residual=res, **mod)
        else:
            out["y"] = reference.predict(layer, x, residual=res, **mod)
        if role == "train_forward_save":
            out["saved_mean"], out["saved_invstd"] = reference.saved_statistics(layer, h)
        return out
    h = arrays["h" if layer.residual else "x"]
    extra = dict(mod, **({"dh": arrays["dh"]} if layer.residual_out else {}))
    if role == "backward_saved":
        got = reference.backward_saved(layer, h, arrays["dy"], arrays["saved_mean"], arrays["saved_invstd"], **extra)
    elif role == "backward_frozen":
        got = reference.backward_frozen(layer, h, arrays["dy"], **extra)
    else:
        got = reference.backward(layer, h, arrays["dy"], **extra)
    names = ["dx", "dscale", "doffset", "dmod_shift", "dmod_scale"]
    return dict(zip(names, got, strict=False))
