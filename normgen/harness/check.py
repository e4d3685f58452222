"""Comparing a compiled layer with :mod:`normgen.reference` (``normgen check`` and the tests)."""

from __future__ import annotations

import dataclasses
import math
import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .. import reference
from ..description.layers import Layer
from ..errors import NormgenError

#: y passes when |y - ref| <= atol + rtol * |ref| everywhere (ref in float64 from the same input).
TOLERANCES = {
    "float32": (2e-5, 2e-5),
    "float64": (1e-12, 1e-12),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
DEFAULT_BATCHES = (1, 2, 5)


@dataclass(frozen=True)
class Comparison:
    layer: str
    function: str
    dtype: str
    batch: int
    max_abs: float
    max_rel: float  # max |y - ref| / max |ref|
    ok: bool
    #: int8: the outputs compared and how many of them are one quantization step off (None: a float layer)
    count: int = 0
    one_step: int | None = None


def compare(name: str, function: str, dtype: str, batch: int, got: np.ndarray, want: np.ndarray) -> Comparison:
    rtol, atol = TOLERANCES[dtype]
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    err = np.abs(got - want)
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.abs(want).max()) if want.size else 0.0
    ok = bool(np.all(err <= atol + rtol * np.abs(want))) and bool(np.all(np.isfinite(got)))
    return Comparison(name, function, dtype, batch, max_abs, max_abs / scale if scale else max_abs, ok)


def compare_int8(name: str, function: str, batch: int, got: np.ndarray, want: np.ndarray) -> Comparison:
    """int8 outputs pass when each is the reference's exactly or one quantization step off."""
    diff = np.abs(np.asarray(got).astype(np.int64) - np.asarray(want).astype(np.int64))
    worst = int(diff.max()) if diff.size else 0
    scale = float(np.abs(np.asarray(want).astype(np.float64)).max()) if diff.size else 0.0
    return Comparison(name, function, "int8", batch, float(worst), worst / scale if scale else float(worst),
                      worst <= 1, int(diff.size), int(np.count_nonzero(diff == 1)))


def int8_inputs(layer: Layer, batch: int, rng: np.random.Generator,
                sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Inputs of an int8 layer, by name: the full range uniformly; a narrow range (a few steps
    around a random centre); every value equal (each statistic's variance 0: y is the offset)."""
    shape = reference.full_shape(layer, batch, sizes)
    centre = int(rng.integers(-120, 121))
    return {
        "": rng.integers(-128, 128, shape).astype(np.int8),
        ":narrow": np.clip(centre + rng.integers(-3, 4, shape), -128, 127).astype(np.int8),
        ":equal": np.full(shape, centre, dtype=np.int8),
    }


def random_input(layer: Layer, batch: int, rng: np.random.Generator, sizes: dict[str, int] | None = None) -> np.ndarray:
    """Data in the layer's format (with its run-time ``sizes``) whose per-channel spread matches its
    trained statistics."""
    shape = reference.full_shape(layer, batch, sizes)
    x = rng.standard_normal(shape)
    if layer.kind == "batchnorm":
        cs = [1] * len(shape)
        cs[layer.fmt.letters.index("C")] = layer.channels
        x = x * np.sqrt(layer.trained_variance_values + 0.5).reshape(cs) + layer.trained_mean_values.reshape(cs)
    else:
        x = 2.0 * x + 0.5
    return x


def default_sizes(layer: Layer) -> list[dict[str, int]]:
    """Run-time sizes check tries when none are given: 1, 7 and 50 for every size."""
    return [{n: v for n in layer.sizes} for v in (1, 7, 50)] if layer.sizes else [{}]


#: Arrays ``check`` holds at once, in float64 copies of one input (x, its rounded copy, y, the
#: reference's intermediates; with training also dy, dx and the reference's backward), measured
#: with tracemalloc (5.2 and 9.5 at most) and rounded up.
COPIES = {False: 6, True: 12}


def available_memory() -> int | None:
    """Bytes this process may still allocate: the kernel's MemAvailable (else free pages), less
    where an address-space limit (``ulimit -v``, RLIMIT_AS) is lower; None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        used = 0
        try:
            with open("/proc/self/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmSize:"):
                        used = int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        room = max(soft - used, 0)
        avail = room if avail is None else min(avail, room)
    return avail


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_needed(layer: Layer, batches: Iterable[int], sizes: list[dict[str, int]], copies: int) -> tuple[int, int, dict]:
    """(bytes, batch, sizes) of the largest run: ``copies`` float64 arrays of its input."""
    best = (0, 1, {})
    for named in sizes or [{}]:
        dims = [named.get(d, 1) if isinstance(d, str) else d for d in layer.dims]
        for batch in batches if layer.fmt.has_batch else (1,):
            need = math.prod(dims) * batch * 8 * copies
            if need > best[0]:
                best = (need, batch, named)
    return best


def ensure_memory(layers: Iterable[tuple[Layer, Iterable[int], list[dict[str, int]]]], copies: int,
                  command: str) -> None:
    """Refuse, naming the figures, a run whose arrays would not fit the memory available now."""
    avail = available_memory()
    if avail is None:
        return
    for layer, batches, sizes in layers:
        need, batch, named = memory_needed(layer, list(batches), sizes, copies)
        if need > avail:
            at = f"batch {batch}" + "".join(f", {k} = {v}" for k, v in named.items())
            raise NormgenError(
                f"{command} of layer {layer.name!r} at {at} needs about {_gib(need)} ({need} bytes: {copies} float64"
                f" copies of its input), more than the {_gib(avail)} of memory available; choose a smaller batch"
                " or smaller sizes"
            )


def check_layer(
    compiled, layer: Layer, batches=DEFAULT_BATCHES, seed: int = 0, training: bool = False,
    sizes: list[dict[str, int]] | None = None,
) -> list[Comparison]:
    """Run predict (and batch norm's train_forward) at several batch sizes against the reference.

    With ``training``, also the backward pass (dx, dscale, doffset) and, for batch norm, the
    frozen backward, for a random upstream gradient dy. A layer with run-time sizes runs at each
    of ``sizes`` (default :func:`default_sizes`), the same compiled code every time; the function
    column then names them (``predict[tokens=7]``).
    """
    results = []
    for named in sizes or default_sizes(layer):
        tag = "[" + ",".join(f"{k}={v}" for k, v in named.items()) + "]" if named else ""
        for r in _check_at(compiled, layer, batches, seed, training, named):
            results.append(dataclasses.replace(r, function=r.function + tag))
    return results


def _check_at(compiled, layer: Layer, batches, seed: int, training: bool, sizes: dict[str, int]) -> list[Comparison]:
    rng = np.random.default_rng(seed)
    results = []
    storage = np.dtype(np.float32) if layer.dtype in ("float16", "bfloat16") else np.dtype(layer.dtype)
    for batch in batches if layer.fmt.has_batch else (1,):
        if layer.dtype == "int8":  # predict only, on int8 data: exact or one step off
            for tag, q in int8_inputs(layer, batch, rng, sizes).items():
                results.append(compare_int8(layer.name, f"predict{tag}", batch, compiled.predict(q),
                                            reference.predict(layer, q)))
            continue
        x = random_input(layer, batch, rng, sizes)
        x = compiled.quantize(x) if hasattr(compiled, "quantize") else x.astype(storage)
        if layer.fused:
            results += _check_fused(compiled, layer, batch, x, rng, training, storage)
            continue
        kept = layer.functions or layer.roles  # the functions generated
        if "predict" in kept:
            got = compiled.predict(x)
            results.append(compare(layer.name, "predict", layer.dtype, batch, got, reference.predict(layer, x)))
        if training:
            dy = rng.standard_normal(x.shape)
            dy = compiled.quantize(dy) if hasattr(compiled, "quantize") else dy.astype(storage)
            if "backward" in kept:
                got = compiled.backward(x, dy)
                results += _gradients(layer, batch, "backward", got, reference.backward(layer, x, dy))
            if "backward_frozen" in kept:
                got = compiled.backward_frozen(x, dy)
                results += _gradients(layer, batch, "backward_frozen", got, reference.backward_frozen(layer, x, dy))
        if "train_forward" in kept:
            if layer.running_variance == "unbiased" and reference.count(layer, batch, sizes) < 2:
                continue
            rm0 = np.array(compiled.running_mean, dtype=np.float64)
            rv0 = np.array(compiled.running_var, dtype=np.float64)
            y = compiled.train_forward(x)
            ry, rm, rv = reference.train_forward(layer, x, rm0, rv0)
            results.append(compare(layer.name, "train_forward", layer.dtype, batch, y, ry))
            results.append(compare(layer.name, "running_mean", layer.dtype, batch, compiled.running_mean, rm))
            results.append(compare(layer.name, "running_var", layer.dtype, batch, compiled.running_var, rv))
    return results


def _check_fused(compiled, layer: Layer, batch: int, x: np.ndarray, rng: np.random.Generator, training: bool,
                 storage: np.dtype) -> list[Comparison]:
    """A fused layer (README "Fused forms"): each public function's outputs, by name, against the
    reference given the same inputs (residual, mod_shift, mod_scale; dy, dh for the backward)."""
    from ..targets.calls import fused_reference

    def draw(shape, spread=1.0):
        a = spread * rng.standard_normal(shape)
        return compiled.quantize(a) if hasattr(compiled, "quantize") else a.astype(storage)

    inputs = {"x": x}
    if layer.residual:
        inputs["residual"] = draw(x.shape)
    if layer.modulation != "none":
        inputs["mod_shift"] = draw(batch * layer.channels)
        inputs["mod_scale"] = draw(batch * layer.channels, 0.5)
    roles = [f.role for f in compiled.plan.public_functions]
    results = []
    saved = None
    forward = ["predict", "train_forward"] + (["train_forward_save"] if training else [])
    for role in (r for r in forward if r in roles):
        if (layer.kind == "batchnorm" and role != "predict" and layer.running_variance == "unbiased"
                and reference.count(layer, batch, layer.sizes_of(x.shape)) < 2):
            continue
        running = (np.array(compiled.running_mean, dtype=np.float64), np.array(compiled.running_var, dtype=np.float64)) \
            if layer.kind == "batchnorm" else None
        got = compiled.run(role, **inputs)
        want = fused_reference(layer, role, inputs, running)
        results += [compare(layer.name, f"{role}:{k}", layer.dtype, batch, got[k], want[k]) for k in got]
        if role == "train_forward_save":
            saved = got
    if not training:
        return results
    h = reference.fused_input(layer, x, inputs.get("residual"))
    back = {"h" if layer.residual else "x": compiled.quantize(h) if hasattr(compiled, "quantize") else h.astype(storage),
            "dy": draw(x.shape), **{k: inputs[k] for k in ("mod_shift", "mod_scale") if k in inputs}}
    if layer.residual_out:
        back["dh"] = draw(x.shape)
    for role in ("backward", "backward_saved", "backward_frozen"):
        if role not in roles or (role == "backward_saved" and saved is None):
            continue
        args = dict(back, **({"saved_mean": saved["saved_mean"], "saved_invstd": saved["saved_invstd"]}
                             if role == "backward_saved" else {}))
        got = compiled.run(role, **args)
        want = fused_reference(layer, role, args)
        results += [compare(layer.name, f"{role}:{k}", layer.dtype, batch, got[k], want[k]) for k in got]
    return results


def _gradients(layer: Layer, batch: int, function: str, got, want) -> list[Comparison]:
    """dx and the parameter gradients the layer has (a layer without scale or offset has none)."""
    return [
        compare(layer.name, f"{function}:{part}", layer.dtype, batch, g, w)
        for part, g, w in zip(("dx", "dscale", "doffset"), got, want, strict=True)
        if g is not None
    ]
