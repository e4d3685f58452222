"""``normgen bench``: time the generated functions against copy bandwidth, PyTorch and ONNX Runtime.

For every layer of a spec and every generated function (``predict``; batch norm's
``train_forward`` and ``train_forward_sync``; ``backward`` where the layer has one) the bench
reports:

* the median time of one call, over ``--repeat`` samples taken after a warm-up;
* GB/s = bytes moved / time, counting each tensor byte read and each tensor byte written
  once (see :func:`traffic`): predict reads x and writes y (2·N·s bytes for N elements of
  s bytes); train_forward also reads and writes the running mean and variance (+4·C·s);
* the bandwidth of a plain copy of the same number of bytes, measured in the same run and
  interleaved sample by sample with the generated function (C: ``numpy.copyto`` of a buffer
  holding half the bytes, one thread; CUDA: a device-to-device ``memcpy``), and the fraction
  of it the generated function reaches;
* PyTorch's time for the same operation (``torch.nn.functional`` in the matching memory
  format, ``torch.set_num_threads(threads)``), the same PyTorch expression through
  ``torch.compile`` (C target; compiled once, before timing) and ONNX Runtime's (a one-node model
  built with ``onnx.helper``, ``intra_op_num_threads = threads``) when they are importable, each
  sampled in turn with the generated function as the copy is, and their time divided by the
  generated function's in that same stretch (> 1: normgen is faster);
* ``train_forward_sync`` (C, batch norm) is the data-parallel training forward on one process:
  ``NAME_sync_stats`` + ``NAME_stats_merge`` + ``NAME_sync_finish`` + ``NAME_sync_normalize``
  with no collective between them; ``split_cost`` is its time over the fused ``train_forward``'s,
  the two sampled in turn: what cutting the forward at its reduction costs before any network.

Batch sizes are run-time arguments, so the spec cannot hold them: ``--batch N`` sets every
layer's batch; otherwise the sidecar file ``SPEC.bench.toml`` beside the spec (or ``--config``)
gives them::

    [bench]
    default_batch = 1          # layers not listed below
    [bench.batch]
    rn50_bn_nchw = 16          # layer name = batch size
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__, reference
from ..description.layers import Layer
from ..errors import NormgenError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_FLAGS = "-O3 -march=native"
#: A timing sample lasts at least this long (short functions are called several times per sample).
MIN_SAMPLE_S = 2e-3
ROLES = ("predict", "train_forward", "train_forward_save", "train_forward_sync", "backward", "backward_saved",
         "backward_frozen")
#: the training half's gradients (docs/training.md): PyTorch's counterpart is autograd's backward
BACKWARD_ROLES = ("backward", "backward_saved", "backward_frozen")
NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


# ---- arguments -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``normgen bench`` (the spec positional is added by the CLI)."""
    p.add_argument("--target", choices=("c", "cuda"), default="c")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for PyTorch/ONNX Runtime and for layers built with OpenMP (default 1)")
    p.add_argument("--openmp", action="store_true",
                   help="build every layer with parallel = \"openmp\" (C target), whatever the spec says")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size of every layer (overrides SPEC.bench.toml)")
    p.add_argument("--config", default=None,
                   help="bench sidecar TOML with per-layer batch sizes (default: SPEC.bench.toml beside the spec)")
    p.add_argument("--repeat", type=int, default=15, help="timing samples per measurement; the median is reported (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    p.add_argument("--flags", default=None,
                   help=f"C optimization flags (default: $NORMGEN_CFLAGS, else {DEFAULT_FLAGS!r})")
    p.add_argument("--layer", action="append", default=None, metavar="NAME",
                   help="bench only this layer (repeatable)")
    p.add_argument("--function", action="append", choices=ROLES, default=None,
                   help="bench only this function (repeatable)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile comparison (C target: it compiles each PyTorch expression once)")
    p.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime comparison")
    p.add_argument("--json", default=None, metavar="FILE", help="write every result as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw GB/s per workload (normgen, copy, PyTorch, ONNX Runtime); needs matplotlib")


# ---- results ---------------------------------------------------------------------------------


@dataclass
class Result:
    layer: str
    function: str
    kind: str
    format: str
    shape: list[int]  # full shape of x, B included, format order
    dtype: str
    batch: int
    parallel: str
    threads: int  # threads the generated code ran on
    bytes: int
    time_s: float
    gbps: float
    copy_time_s: float  # a copy of the same number of bytes
    copy_gbps: float
    fraction_of_copy: float
    torch_time_s: float | None = None  # as PyTorch is called (its output allocated each call)
    torch_speedup: float | None = None  # torch time / normgen time, the two sampled in turn
    torch_reuse_time_s: float | None = None  # the same with freed memory reused (no fresh-page faults)
    torch_reuse_speedup: float | None = None
    torch_note: str = ""
    ort_time_s: float | None = None
    ort_speedup: float | None = None
    ort_note: str = ""
    samples: int = 0
    #: normgen's own time in the runs that sampled it in turn with PyTorch, PyTorch with freed
    #: memory reused, and ONNX Runtime: each speed-up divides by the time measured beside it
    time_vs_torch_s: float | None = None
    time_vs_torch_reuse_s: float | None = None
    time_vs_ort_s: float | None = None
    #: the PyTorch expression through torch.compile (inductor, fullgraph): its time per call, the
    #: speed-up against it, normgen's time sampled in turn with it, and the seconds its compile took
    torch_compile_time_s: float | None = None
    torch_compile_speedup: float | None = None
    time_vs_torch_compile_s: float | None = None
    torch_compile_build_s: float | None = None
    torch_compile_note: str = ""
    torch_compile_reuse_time_s: float | None = None  # with freed memory reused, as torch_reuse_time_s
    torch_compile_reuse_speedup: float | None = None
    time_vs_torch_compile_reuse_s: float | None = None
    #: train_forward_sync: the fused train_forward's time, normgen's split sampled in turn with it,
    #: and split_cost = time_vs_fused_s / fused_time_s (> 1: the split is slower)
    fused_time_s: float | None = None
    time_vs_fused_s: float | None = None
    split_cost: float | None = None


@dataclass
class Report:
    normgen_version: str
    target: str
    spec: str
    threads: int
    flags: str
    machine: dict
    bytes_counted: str
    results: list[Result] = field(default_factory=list)


BYTES_DOC = (
    "bytes = every tensor byte read plus every tensor byte written, each once: predict reads x and "
    "writes y (2*N*s for N elements of s bytes); train_forward also reads and writes the running "
    "mean and variance (+4*C*s), and so does train_forward_sync; backward reads x and dy and writes dx, dscale and "
    "doffset (3*N*s + 2*C*s). Fused forms add their tensors: residual read and h written (N*s each), "
    "mod_shift and mod_scale read (2*batch*C*s), dh read. "
    "Parameter reads (scale, offset, folded constants: C values) are not counted. "
    "copy = a plain copy of a buffer of bytes/2, so it reads and writes the same number of bytes."
)


def traffic(layer: Layer, role: str, batch: int) -> int:
    """Bytes a function moves (see BYTES_DOC)."""
    s = np.dtype(NUMPY_DTYPES.get(layer.dtype, np.float32)).itemsize if layer.dtype != "bfloat16" else 2
    n = int(np.prod(reference.full_shape(layer, batch)))
    mod = 2 * batch * layer.channels * s if layer.modulation != "none" else 0
    if role == "predict":
        return (2 + layer.residual + layer.residual_out) * n * s + mod
    if role in ("train_forward", "train_forward_sync"):
        return (2 + layer.residual + layer.residual_out) * n * s + mod + 4 * layer.channels * s
    saved = 2 * 8 * (layer.channels if layer.kind == "batchnorm" else n // reference.count(layer, batch))
    if role == "train_forward_save":
        running = 4 * layer.channels * s if layer.kind == "batchnorm" else 0
        return (2 + layer.residual + layer.residual_out) * n * s + mod + running + saved
    if role in BACKWARD_ROLES:
        return (3 + layer.residual_out) * n * s + 2 * layer.channels * s + (saved if role == "backward_saved" else 0)
    raise NormgenError(f"unknown function role {role!r}")


# ---- progress ---------------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr (tqdm: steps done, rate and time left) with the step being timed
    as its description; tqdm is optional (the ``bench`` extra): without it nothing is drawn."""

    def __init__(self, total: int, stream=None):
        self.total = total
        self.done = 0
        self.bar = None
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, file=sys.stderr if stream is None else stream, unit="step",
                        dynamic_ncols=True, leave=False)

    def step(self, what: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(what, refresh=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def extend(self, steps: int) -> None:
        """More steps than counted at the start (a phase whose size is known only later)."""
        self.total += steps
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- timing ----------------------------------------------------------------------------------


def _calibrate(fn: Callable[[], object], warmup: int) -> int:
    """Calls per sample so that a sample lasts at least MIN_SAMPLE_S."""
    for _ in range(max(1, warmup)):
        fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(np.ceil(MIN_SAMPLE_S / one)))


def _sample(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call over ``calls`` calls, after one untimed call: each function is timed in
    its own steady state (its data where its previous call left it), not in the caches the
    function sampled before it left behind."""
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def time_interleaved(fns: list[Callable[[], object]], repeat: int, warmup: int) -> list[float]:
    """Median seconds per call of each function, their samples interleaved so that a change in
    the machine's state (another process, frequency) affects all of them alike."""
    calls = [_calibrate(f, warmup) for f in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeat)):
        for i, f in enumerate(fns):
            samples[i].append(_sample(f, calls[i]))
    return [statistics.median(s) for s in samples]


# ---- configuration ---------------------------------------------------------------------------


def sidecar_path(spec: str | Path) -> Path:
    spec = Path(spec)
    return spec.with_name(spec.stem + ".bench.toml")


@dataclass
class BenchConfig:
    """Run-time settings of each layer: its batch size, its run-time sizes and the functions to time."""

    batch: dict[str, int]
    functions: dict[str, list[str]]
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)


def load_config(layers: list[Layer], spec: str, config: str | None, batch: int | None) -> BenchConfig:
    """Batch size of each layer: --batch, else the sidecar's [bench.batch] table, else its
    default_batch (1 when there is no sidecar); functions: the sidecar's [bench.functions]."""
    names = [layer.name for layer in layers]
    path = Path(config) if config else sidecar_path(spec)
    table: dict = {}
    functions: dict = {}
    run_sizes: dict = {}
    default = 1
    if path.is_file():
        where = f"bench config {str(path)!r}"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise NormgenError(f"{where} is not valid TOML: {exc}") from None
        bench = data.get("bench", {})
        extra = sorted(set(data) - {"bench"}) + sorted(set(bench) - {"default_batch", "batch", "functions", "sizes"})
        if extra:
            raise NormgenError(f"{where}: unknown key {extra[0]!r} (keys: [bench] default_batch, "
                               "[bench.batch], [bench.functions], [bench.sizes])")
        run_sizes = bench.get("sizes", {})
        if not isinstance(run_sizes, dict) or any(not isinstance(v, dict) for v in run_sizes.values()):
            raise NormgenError(f"{where}: [bench.sizes] holds a table of run-time sizes per layer, e.g."
                               " llm_ln = { tokens = 2048 }")
        default = bench.get("default_batch", 1)
        table = bench.get("batch", {})
        functions = bench.get("functions", {})
        if not isinstance(table, dict) or not isinstance(functions, dict):
            raise NormgenError(f"{where}: [bench.batch] and [bench.functions] are tables keyed by layer name")
        for name, value in [("default_batch", default), *table.items()]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise NormgenError(f"{where}: batch of {name!r} must be a positive integer, got {value!r}")
        for name, value in functions.items():
            if not isinstance(value, list) or not value or any(v not in ROLES for v in value):
                raise NormgenError(f"{where}: functions of {name!r} must be a list from {', '.join(ROLES)}, got {value!r}")
        unknown = sorted((set(table) | set(functions) | set(run_sizes)) - set(names))
        if unknown and not config:
            # a sidecar may describe layers that --layer filtered away; only a typo is an error
            unknown = [u for u in unknown if u not in _spec_names(spec)]
        if unknown:
            raise NormgenError(f"{where} names layer {unknown[0]!r}, which the spec does not have")
    elif config:
        raise NormgenError(f"bench config {str(path)!r} does not exist")
    if batch is not None:
        if batch < 1:
            raise NormgenError(f"--batch must be a positive integer, got {batch}")
        table, default = {}, batch
    for layer in layers:  # every run-time size has a value, checked as the generated code checks it
        layer.at_sizes(run_sizes.get(layer.name, {}))
    return BenchConfig({n: table.get(n, default) for n in names}, {n: functions[n] for n in names if n in functions},
                       {n: dict(run_sizes.get(n, {})) for n in names})


def _spec_names(spec: str) -> set[str]:
    from ..description.spec import load_spec

    return {layer.name for layer in load_spec(spec)}


def machine_info(target: str) -> dict:
    info = {"system": platform.system(), "machine": platform.machine(), "cpu": platform.processor() or "",
            "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__}
    info.update(_cpuinfo())
    if target == "c":
        from ..targets.c.build import cc, compiler_version

        info["compiler"] = compiler_version(cc())
    return info


def _cpuinfo() -> dict:
    """What identifies this CPU where a virtual machine names it only "AMD EPYC": its family and
    model numbers, its widest vectors and the caches the first core sees (Linux; nothing elsewhere)."""
    info: dict = {}
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        return info
    if "model name" in fields:
        info["cpu"] = fields["model name"]
    for key, name in (("cpu family", "cpu_family"), ("model", "cpu_model")):
        if key in fields:
            info[name] = fields[key]
    flags = set(fields.get("flags", "").split())
    widest = [isa for isa in ("avx512f", "avx2", "avx", "sse2") if isa in flags]
    if widest:
        info["vectors"] = widest[0]
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            caches[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    if caches:
        info["caches"] = caches
    return info


# ---- the generated C ---------------------------------------------------------------------------


def _set_omp_threads(threads: int) -> bool:
    """omp_set_num_threads for the libgomp the generated modules link (cffi modules live in this
    process, so OMP_NUM_THREADS would only be read once, when libgomp is first loaded)."""
    name = ctypes.util.find_library("gomp") or "libgomp.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return False
    lib.omp_set_num_threads(ctypes.c_int(threads))
    return True


#: Byte alignment of every buffer the bench hands a function (normgen's, the copy's, PyTorch's and
#: ONNX Runtime's): PyTorch's CPU allocator aligns its tensors so, NumPy only to 16 bytes.
ALIGN = 64


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(n * dtype.itemsize + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip: skip + n * dtype.itemsize].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray, dtype=None) -> np.ndarray:
    out = aligned_empty(a.shape, dtype or a.dtype)
    out[...] = a
    return out


class CFunctions:
    """Direct calls of the generated C through the cffi module, on preallocated buffers."""

    def __init__(self, layer: Layer, flags: list[str], batch: int, rng: np.random.Generator,
                 sizes: dict[str, int] | None = None):
        from ..targets.c.build import CompiledLayer
        from .check import random_input

        self.layer = layer
        self.compiled = CompiledLayer(layer, flags=flags)
        self.ffi = self.compiled.ffi
        self.lib = self.compiled._lib
        dtype = self.compiled.dtype
        self.x = aligned_copy(random_input(layer, batch, rng, sizes), dtype)
        self.y = aligned_empty(self.x.shape, dtype)
        self.batch = batch
        _, self.dims = self.compiled._input(self.x)  # the size arguments of every call: batch, run-time sizes
        self.rm = np.array(getattr(self.compiled, "running_mean", np.zeros(layer.channels)), dtype=dtype)
        self.rv = np.array(getattr(self.compiled, "running_var", np.ones(layer.channels)), dtype=dtype)
        self._keep: list = []

    def _p(self, arr: np.ndarray):
        ptr = self.ffi.cast(f"{self.compiled.plan.ctype} *", self.ffi.from_buffer(arr))
        self._keep.append(ptr)
        return ptr

    def roles(self) -> list[str]:
        roles = [f.role for f in self.compiled.plan.public_functions]
        train = getattr(self.compiled.plan, "train", None)
        if hasattr(self.compiled, "backward") and train is not None:
            roles += [r for r in ("train_forward_save", *BACKWARD_ROLES) if r in train.roles]
        if train is not None and train.sync is not None:
            roles.append("train_forward_sync")
        return [r for r in ROLES if r in roles]

    def fused_inputs(self) -> dict[str, np.ndarray]:
        """A fused layer's other inputs (residual, mod_shift, mod_scale), drawn once."""
        if not hasattr(self, "_fused"):
            rng = np.random.default_rng(2)
            self._fused = {}
            if self.layer.residual:
                self._fused["residual"] = aligned_copy(rng.standard_normal(self.x.shape), self.x.dtype)
            if self.layer.modulation != "none":
                for k in ("mod_shift", "mod_scale"):
                    self._fused[k] = aligned_copy(0.5 * rng.standard_normal(self.batch * self.layer.channels), self.x.dtype)
        return self._fused

    def _named_call(self, role: str) -> Callable[[], object]:
        """A fused layer's public function on preallocated buffers, its arguments by name
        (normgen/targets/calls.py)."""
        from ..targets.calls import SAVED, X_SHAPED, argument_kinds

        f = self.compiled.public(role)
        arrays = {"x": self.x, "y": self.y, **self.fused_inputs(), "running_mean": self.rm, "running_var": self.rv}
        sizes = dict(zip(["batch", *self.layer.sizes], self.dims, strict=True))
        args = []
        for a in argument_kinds(f.args):
            if not a.pointer:
                args.append(sizes[a.name])
            elif a.name == "params":
                args.append(self.compiled.params)
            else:
                if a.name not in arrays:
                    shape = self.x.shape if a.name in X_SHAPED else self.compiled._count(a.name, self.x, self.batch, self.dims)
                    arrays[a.name] = (aligned_copy(np.random.default_rng(3).standard_normal(shape), self.x.dtype)
                                      if a.const else aligned_empty(shape, np.float64 if a.name in SAVED else self.x.dtype))
                ptr = self.ffi.cast(f"{a.ctype} *", self.ffi.from_buffer(arrays[a.name]))
                self._keep.append(ptr)
                args.append(ptr)
        fn = getattr(self.lib, f.name)
        self._arrays = arrays

        def go(fn=fn, args=args):
            rc = fn(*args)
            if rc:
                raise NormgenError(f"{f.name} returned {rc}")

        return go

    def call(self, role: str) -> Callable[[], object]:
        name = self.layer.name
        lead = list(self.compiled._lead)
        if self.layer.fused:
            return self._named_call(role)
        if role == "predict":
            fn = getattr(self.lib, f"{name}_predict")
            args = [*lead, self._p(self.x), self._p(self.y), *self.dims]
        elif role == "train_forward":
            fn = getattr(self.lib, f"{name}_train_forward")
            args = [*lead, self._p(self.x), self._p(self.y), *self.dims, self._p(self.rm), self._p(self.rv)]
        elif role in BACKWARD_ROLES or role == "train_forward_save":
            return self._training(role)
        elif role == "train_forward_sync":
            return self._sync_forward()
        else:  # pragma: no cover
            raise NormgenError(f"unknown function role {role!r}")

        def go(fn=fn, args=args, role=role):
            rc = fn(*args)
            if rc:
                raise NormgenError(f"{name}_{role} returned {rc}")

        return go

    def _training(self, role: str) -> Callable[[], object]:
        """``NAME_train_forward_save(x, y, batch, [running_mean, running_var], saved_mean,
        saved_invstd)`` and ``NAME_backward[_saved|_frozen](x, dy, [saved_mean, saved_invstd], dx,
        dscale, doffset, batch)`` (docs/training.md) on preallocated buffers; backward_saved reads
        the statistics that one train_forward_save call saved."""
        name, plan = self.layer.name, self.compiled.plan
        if not hasattr(self, "dy"):
            self.dy = aligned_copy(np.random.default_rng(1).standard_normal(self.x.shape), self.x.dtype)
            self.dx = aligned_empty(self.x.shape, self.x.dtype)
            self.grads = [aligned_empty(plan.channels, self.x.dtype) for _ in plan.gradients]
            n = self.compiled.saved_count(*self.dims)
            acc = np.float64 if plan.acc_type == "double" else np.float32  # the saved statistics' type
            self.saved = [aligned_empty(n, acc) for _ in range(2)]
            self.compiled.train_forward_save(self.x, out=(self.y, *self.saved))
        acc = [self.ffi.cast(f"{plan.acc_type} *", self.ffi.from_buffer(a)) for a in self.saved]
        self._keep += acc
        lead = list(self.compiled._lead)
        if role == "train_forward_save":
            running = [self._p(self.rm), self._p(self.rv)] if self.layer.kind == "batchnorm" else []
            args = [*lead, self._p(self.x), self._p(self.y), *self.dims, *running, *acc]
        else:
            args = [*lead, self._p(self.x), self._p(self.dy), *(acc if role == "backward_saved" else []),
                    self._p(self.dx), *map(self._p, self.grads), *self.dims]
        fn = getattr(self.lib, f"{name}_{role}")

        def go(fn=fn, args=args):
            rc = fn(*args)
            if rc:
                raise NormgenError(f"{name}_{role} returned {rc}")

        return go

    def _sync_forward(self) -> Callable[[], object]:
        """The data-parallel training forward on one process (normgen/lowering/sync.py): the shard's
        statistics, merged (one part), finished (running update) and applied, on preallocated buffers."""
        name, c = self.layer.name, self.compiled.plan.channels
        stats, acc = np.zeros(1 + 2 * c), np.zeros(1 + 2 * c)
        mean, inv = np.empty(c), np.empty(c)
        self._keep += [stats, acc, mean, inv]
        st = self.ffi.cast(f"{name}_stats *", self.ffi.from_buffer(stats))
        ac = self.ffi.cast(f"{name}_stats *", self.ffi.from_buffer(acc))
        mp, ip = (self.ffi.cast("double *", self.ffi.from_buffer(a)) for a in (mean, inv))
        fn = {r: getattr(self.lib, f"{name}_{r}") for r in ("sync_stats", "stats_merge", "sync_finish", "sync_normalize")}
        x, y, rm, rv = self._p(self.x), self._p(self.y), self._p(self.rm), self._p(self.rv)
        lead, dims = list(self.compiled._lead), self.dims

        def go():
            acc.fill(0.0)
            rc = (fn["sync_stats"](x, st, *dims) or fn["stats_merge"](ac, st) or fn["sync_finish"](ac, rm, rv, mp, ip)
                  or fn["sync_normalize"](*lead, x, mp, ip, y, *dims))
            if rc:
                raise NormgenError(f"{name}'s synchronized forward returned {rc}")

        return go


# ---- PyTorch -----------------------------------------------------------------------------------


def _torch_logical(layer: Layer, x: np.ndarray, device: str = "cpu"):
    """x as a torch tensor in PyTorch's (N, C, *) order whose strides are normgen's layout
    (NHWC data gives a channels_last tensor); None if torch cannot take the layout."""
    import torch

    letters = layer.fmt.letters
    t = torch.from_numpy(aligned_copy(np.asarray(x))).to(device)
    order = ([letters.index("B")] if "B" in letters else []) + [letters.index("C")]
    order += [i for i, ch in enumerate(letters) if ch not in "BC"]
    v = t.permute(order)
    if "B" not in letters:
        v = v.unsqueeze(0)
    return v


def torch_case(layer: Layer, role: str, x: np.ndarray, device: str = "cpu",
               fused: dict[str, np.ndarray] | None = None) -> tuple[Callable[[], object] | None, str]:
    """A zero-argument callable running PyTorch's version of one generated function, and a note.
    A fused layer (README "Fused forms") runs as PyTorch composes it: x + residual, the norm,
    then z * (1 + mod_scale) + mod_shift and the activation (``fused``: those inputs by name).
    A gradient (BACKWARD_ROLES) is autograd's backward of the forward it differentiates (batch
    norm's training forward, or its predict for ``backward_frozen``), the forward run once here:
    ``torch.autograd.grad`` of x, scale and offset with the graph retained, PyTorch's backward
    kernels alone. ``train_forward_save`` is PyTorch's training forward (which keeps its
    statistics for the backward in any case)."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, "torch not importable"
    grad = role in BACKWARD_ROLES
    if grad and layer.fused:
        return None, "not compared"
    if role == "train_forward_save":
        role = "train_forward" if layer.kind == "batchnorm" else "predict"
    elif grad:
        role = "train_forward" if layer.kind == "batchnorm" and role != "backward_frozen" else "predict"
    letters = layer.fmt.letters
    dt = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}[layer.dtype]
    fused = fused or {}
    v = _torch_logical(layer, x, device).to(dt)
    rv = _torch_logical(layer, fused["residual"], device).to(dt) if "residual" in fused else None

    def vec(a):
        return torch.tensor(np.array(a, dtype=np.float64), device=device).to(dt)

    w = vec(layer.scale_values) if layer.has_scale else None
    b = vec(layer.offset_values) if layer.has_offset else None
    if grad:
        w, b = (p.requires_grad_(True) if p is not None else None for p in (w, b))
    eps = layer.epsilon
    note = "channels_last" if v.dim() >= 3 and not v.is_contiguous() and v.is_contiguous(
        memory_format=torch.channels_last if v.dim() == 4 else torch.contiguous_format) else ""
    # the logical tensor's letters: B, C, then the rest in format order
    order = [ch for ch in "BC" if ch in letters] + [ch for ch in letters if ch not in "BC"]
    if "B" not in letters:
        order = ["B"] + order
    op, how = _torch_op(layer, role, v, w, b, eps, F, vec)
    if op is None:
        if layer.affine == "element" or getattr(layer, "resolved_dimension", "") == "channel-only":
            # PyTorch's normalized_shape: the normalized dimensions moved to the end, in format order
            t = torch.from_numpy(aligned_copy(np.asarray(x))).to(device).to(dt)
            pos = [i for i, ch in enumerate(letters) if ch != "B" and ch in layer.normalized_letters()]
            dest = list(range(t.dim() - len(pos), t.dim()))
            v = t.movedim(pos, dest)
            if rv is not None:
                rv = torch.from_numpy(aligned_copy(np.asarray(fused["residual"]))).to(device).to(dt).movedim(pos, dest)
            shape = tuple(v.shape[t.dim() - len(pos):])
            ws = w.reshape(shape) if w is not None else None
            bs = b.reshape(shape) if b is not None else None
            how = "" if v.is_contiguous() else ", strided"
            keep = [ch for i, ch in enumerate(letters) if i not in pos]
            order = keep + [letters[i] for i in pos]
            if layer.kind == "rmsnorm":
                op, how = (lambda t: F.rms_norm(t, shape, ws, eps)), "rms_norm" + how
            else:
                op, how = (lambda t: F.layer_norm(t, shape, ws, bs, eps)), "layer_norm" + how
        else:
            return None, how
    note = ", ".join(n for n in (note, how) if n)
    if grad:
        return _autograd(torch, op, v, [p for p in (w, b) if p is not None]), ", ".join(n for n in (note, "autograd") if n)
    if not layer.fused:
        return (lambda: op(v)), note
    pre = (lambda: v + rv) if rv is not None else (lambda: v)
    post = _torch_post(layer, fused, order, device, dt, torch, F)
    return (lambda: post(op(pre()))), ", ".join(n for n in (note, "composed") if n)


def _autograd(torch, op, v, params: list) -> Callable[[], object]:
    """PyTorch's backward of ``op`` at ``v``: the forward once, then each call
    ``torch.autograd.grad`` of v and the parameters for one dy (strided as the output is; the
    callable's ``dy``)."""
    leaf = v.detach().requires_grad_(True)
    out = op(leaf)
    dy = torch.randn_like(out)
    inputs = [leaf, *params]

    def go():
        return torch.autograd.grad(out, inputs, dy, retain_graph=True)

    go.dy = dy  # what the gradient is taken for (tests compare with the reference)
    return go


def _torch_op(layer: Layer, role: str, v, w, b, eps, F, vec):
    """(the PyTorch function of the logical tensor, a note); (None, why) where it takes the
    normalized dimensions last (layer norm, RMSNorm: torch_case does those) or has none.
    ``vec``: a parameter array as a tensor of the layer's dtype."""
    if layer.kind == "batchnorm":
        rm, rv = vec(layer.trained_mean_values), vec(layer.trained_variance_values)
        if role == "predict":
            return (lambda t: F.batch_norm(t, rm, rv, w, b, False, 0.0, eps)), ""
        return (lambda t: F.batch_norm(t, rm, rv, w, b, True, layer.mean_decay, eps)), ""
    if role != "predict":
        return None, "no such function"
    if layer.kind == "groupnorm":
        return (lambda t: F.group_norm(t, layer.groups, w, b, eps)), ""
    if layer.kind == "instancenorm":
        if v.dim() < 3:
            return None, "instance norm needs a dimension besides B and C"
        return (lambda t: F.instance_norm(t, weight=w, bias=b, eps=eps)), ""
    od = layer.resolved_dimension
    if layer.affine == "element" or od == "channel-only":
        return None, ""
    if layer.kind == "rmsnorm":
        return None, "per-channel RMSNorm over several dimensions has no PyTorch op"
    if od == "spatial-channel" and "T" in layer.fmt.letters:
        return None, "spatial-channel with T has no PyTorch op"
    # spatial-channel (no T) and batch-excluded: one statistic per batch with per-channel affine
    return (lambda t: F.group_norm(t, 1, w, b, eps)), "group_norm(G=1)"


def _torch_post(layer: Layer, fused: dict, order: list[str], device: str, dt, torch, F):
    """The modulation and the activation, as PyTorch code would write them after the norm."""
    acts = {"none": lambda t: t, "relu": F.relu, "silu": F.silu, "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
    act = acts[layer.activation]
    if layer.modulation == "none":
        return act
    shape = [-1 if ch == "B" else layer.channels if ch == "C" else 1 for ch in order]
    shift, scale = (torch.from_numpy(np.asarray(fused[k]).reshape(-1, layer.channels)).to(device).to(dt)
                    for k in ("mod_shift", "mod_scale"))
    if order.index("C") < order.index("B"):
        shift, scale = shift.T, scale.T
    shift, scale = shift.reshape(shape), scale.reshape(shape)
    return lambda t: act(t * (1 + scale) + shift)


def torch_compile_case(layer: Layer, role: str, x: np.ndarray, fused: dict[str, np.ndarray] | None = None,
                       ) -> tuple[Callable[[], object] | None, str, float | None]:
    """:func:`torch_case`'s expression through ``torch.compile`` (inductor, ``fullgraph=True``,
    static shapes), compiled here by its first call, outside any timing, and checked against the
    eager result: (the compiled callable, a note, seconds the compile took). None where torch.compile
    is missing or fails on this machine (inductor needs a C++ compiler), with the reason. Gradients
    are not compiled (autograd's backward is PyTorch's column)."""
    if role in BACKWARD_ROLES:
        return None, "not compared (a gradient)", None
    fn, note = torch_case(layer, role, x, fused=fused)
    if fn is None:
        return None, note, None
    import torch

    if not hasattr(torch, "compile"):
        return None, "torch.compile not available", None
    want = fn()
    try:
        torch.compiler.reset()  # each workload compiled afresh, not recompiled past dynamo's cache limit
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        got = compiled()
        build_s = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - dynamo and inductor raise many types; the column is skipped
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"torch.compile failed: {type(exc).__name__}: {first[:80]}", None
    pairs = zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,), strict=True)
    if not all(torch.allclose(g.double(), w.double(), rtol=1e-4, atol=1e-4) for g, w in pairs):
        return None, "torch.compile's output differs from eager PyTorch's", None
    return compiled, note, build_s


# ---- ONNX Runtime --------------------------------------------------------------------------------


def ort_case(layer: Layer, role: str, x: np.ndarray, threads: int,
             fused: dict[str, np.ndarray] | None = None) -> tuple[Callable[[], object] | None, str]:
    """ONNX Runtime's version of a function: a one-node model run with preallocated outputs."""
    try:
        import onnxruntime  # noqa: F401 (availability: _ort_session uses it)
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None, "onnxruntime/onnx not importable"
    if role not in ("predict", "train_forward", "train_forward_sync"):
        return None, "not compared"
    if layer.dtype not in ("float32", "float64"):
        return None, f"{layer.dtype} not compared"
    if layer.fused:
        return _ort_skip_case(layer, role, x, threads, fused or {})
    letters = layer.fmt.letters
    channel_first = letters.startswith("BC") or (not layer.fmt.has_batch and letters.startswith("C"))
    xin = x if layer.fmt.has_batch else x[None]
    np_t = np.dtype(layer.dtype)
    tp = TensorProto.FLOAT if layer.dtype == "float32" else TensorProto.DOUBLE
    inits: dict[str, np.ndarray] = {"s": np.asarray(layer.scale_values, dtype=np_t),
                                    "b": np.asarray(layer.offset_values, dtype=np_t)}
    normalized = layer.normalized_letters() if layer.kind in ("layernorm", "rmsnorm") else ""
    trailing = bool(normalized) and letters.endswith(normalized) and (layer.affine == "element" or normalized == "C")
    outputs = ["y"]
    opset = 17
    if layer.kind == "batchnorm":
        if not channel_first:
            return None, "ONNX BatchNormalization is channel-first only"
        inits["m"] = np.asarray(layer.trained_mean_values, dtype=np_t)
        inits["v"] = np.asarray(layer.trained_variance_values, dtype=np_t)
        attrs = {"epsilon": layer.epsilon}
        opset = 15
        if role == "train_forward":
            attrs.update(training_mode=1, momentum=1.0 - layer.mean_decay)
            outputs = ["y", "rm", "rv"]
        node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], outputs, **attrs)
    elif role != "predict":
        return None, "no such function"
    elif layer.kind == "groupnorm":
        if not channel_first:
            return None, "ONNX GroupNormalization is channel-first only"
        opset = 21
        node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], epsilon=layer.epsilon,
                                num_groups=layer.groups)
    elif layer.kind == "instancenorm":
        if not channel_first or xin.ndim < 3:
            return None, "ONNX InstanceNormalization is channel-first with a spatial dimension"
        node = helper.make_node("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=layer.epsilon)
    elif trailing:
        # LayerNormalization / RMSNormalization over the trailing axes, γ and β of their shape
        axis = len(letters) - len(normalized) + (0 if layer.fmt.has_batch else 1)
        shape = layer.param_shape
        inits = {"s": inits["s"].reshape(shape)} | ({"b": inits["b"].reshape(shape)} if layer.has_offset else {})
        if layer.kind == "rmsnorm":
            opset = 23
            node = helper.make_node("RMSNormalization", ["x", "s"], ["y"], epsilon=layer.epsilon, axis=axis)
        else:
            node = helper.make_node("LayerNormalization", ["x", *inits], ["y"], epsilon=layer.epsilon, axis=axis)
    elif layer.kind == "rmsnorm" or layer.affine == "element":
        return None, "not over trailing dimensions with their own affine: no ONNX op"
    else:
        od = layer.resolved_dimension
        if od == "channel-only":
            if not letters.endswith("C"):
                return None, "ONNX LayerNormalization normalizes trailing dimensions"
            node = helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], epsilon=layer.epsilon, axis=-1)
        elif od == "spatial-channel" and "T" in letters:
            return None, "spatial-channel with T not compared"
        else:
            if not channel_first:
                return None, "channel-last spatial-channel layer norm not compared"
            opset = 21
            node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], epsilon=layer.epsilon, num_groups=1)
    graph = helper.make_graph(
        [node], layer.name, [helper.make_tensor_value_info("x", tp, list(xin.shape))],
        [helper.make_tensor_value_info(o, tp, None) for o in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    sess = _ort_session(model, threads)
    if isinstance(sess, str):
        return None, sess
    xo = aligned_copy(np.asarray(xin), np_t)
    y = aligned_empty(xo.shape, np_t)
    binding = sess.io_binding()
    binding.bind_cpu_input("x", xo)
    binding.bind_output("y", "cpu", 0, np_t, list(y.shape), y.ctypes.data)
    keep = [xo, y]
    for o in outputs[1:]:
        buf = np.empty(layer.channels, dtype=np_t)
        keep.append(buf)
        binding.bind_output(o, "cpu", 0, np_t, [layer.channels], buf.ctypes.data)

    def go(sess=sess, binding=binding, keep=keep):
        sess.run_with_iobinding(binding)

    return go, f"opset {opset}"


def _ort_session(model, threads: int):
    """An ONNX Runtime session of ``model`` on one CPU thread pool of ``threads``, or why not."""
    import onnxruntime as ort

    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        return f"onnxruntime rejected the model: {str(exc).splitlines()[0][:80]}"


def _ort_skip_case(layer: Layer, role: str, x: np.ndarray, threads: int,
                   fused: dict[str, np.ndarray]) -> tuple[Callable[[], object] | None, str]:
    """Residual + layer norm / RMSNorm over the last dimension: ONNX Runtime's contrib
    SkipLayerNormalization / SkipSimplifiedLayerNormalization (h as its input_skip_bias_sum)."""
    from onnx import TensorProto, helper, numpy_helper

    if role != "predict" or not layer.residual or layer.activation != "none" or layer.modulation != "none":
        return None, "no ONNX Runtime op for this fused form"
    if (layer.kind not in ("layernorm", "rmsnorm") or layer.resolved_dimension != "channel-only"
            or not layer.fmt.letters.endswith("C") or layer.affine != "channel" or layer.dtype != "float32"
            or x.ndim != 3):
        return None, "SkipLayerNormalization: float32 [batch, sequence, hidden] normalized over hidden"
    op = "SkipLayerNormalization" if layer.kind == "layernorm" else "SkipSimplifiedLayerNormalization"
    inits = {"s": np.asarray(layer.scale_values, dtype=np.float32)}
    if layer.kind == "layernorm":
        inits["b"] = np.asarray(layer.offset_values, dtype=np.float32)
    outputs = ["y", "", "", "h"] if layer.residual_out else ["y"]
    node = helper.make_node(op, ["x", "r", *inits], outputs, domain="com.microsoft", epsilon=layer.epsilon)
    tp = TensorProto.FLOAT
    graph = helper.make_graph(
        [node], layer.name, [helper.make_tensor_value_info(n, tp, list(x.shape)) for n in ("x", "r")],
        [helper.make_tensor_value_info(o, tp, None) for o in outputs if o],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    sess = _ort_session(model, threads)
    if isinstance(sess, str):
        return None, sess
    keep = [aligned_copy(x, np.float32), aligned_copy(fused["residual"], np.float32)]
    binding = sess.io_binding()
    for name, arr in zip(("x", "r"), keep, strict=True):
        binding.bind_cpu_input(name, arr)
    for o in (o for o in outputs if o):
        buf = aligned_empty(x.shape, np.float32)
        keep.append(buf)
        binding.bind_output(o, "cpu", 0, np.float32, list(x.shape), buf.ctypes.data)

    def go(sess=sess, binding=binding, keep=keep):
        sess.run_with_iobinding(binding)

    return go, f"com.microsoft {op}"


def _keep_freed_memory() -> None:
    """Let glibc keep and reuse freed blocks (no trimming, no mmap for big blocks), so that
    PyTorch's per-call output allocation does not page-fault fresh memory on every call: its time
    is then its kernel's, which is the fair (and for normgen, conservative) comparison."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# ---- the C bench ----------------------------------------------------------------------------------


def _copy_pair(nbytes: int, x: np.ndarray, y: np.ndarray) -> Callable[[], object]:
    """A zero-argument plain copy moving ``nbytes`` (read + written)."""
    half = nbytes // 2
    if x.nbytes == half:
        return lambda: np.copyto(y, x)
    src = aligned_empty(half, np.uint8)
    src[...] = 1
    dst = aligned_empty(half, np.uint8)
    return lambda: np.copyto(dst, src)


def bench_c(layers: list[Layer], cfg: BenchConfig, args: argparse.Namespace) -> Report:
    from ..targets.c.build import BuildError

    flags_text = args.flags if args.flags is not None else os.environ.get("NORMGEN_CFLAGS") or DEFAULT_FLAGS
    flags = shlex.split(flags_text)
    report = Report(__version__, "c", str(args.spec), args.threads, flags_text, machine_info("c"), BYTES_DOC)
    rng = np.random.default_rng(0)
    plans = []
    for layer in layers:
        if layer.dtype == "int8":
            raise NormgenError(f"layer {layer.name!r}: normgen bench times float32 and float64 layers, not int8"
                               " (normgen check compiles and runs it)")
        if layer.dtype not in ("float32", "float64"):
            raise NormgenError(f"layer {layer.name!r}: dtype {layer.dtype} is not supported by the c target")
        if args.openmp and layer.parallel != "openmp":
            layer = layer.replace(parallel="openmp")
        plans.append(layer)
    progress = Progress(_total(plans, cfg, args))
    have_torch = not args.no_torch and _importable("torch")
    have_ort = not args.no_ort and _importable("onnxruntime")
    have_compile = have_torch and not args.no_compile
    if have_torch:
        import torch

        torch.set_num_threads(args.threads)
    omp_ok = True
    try:
        for layer in plans:
            progress.step(f"{layer.name}: compiling ({' '.join(flags)}{' -fopenmp' if layer.parallel == 'openmp' else ''})")
            try:
                fns = CFunctions(layer, flags, cfg.batch[layer.name], rng, cfg.sizes.get(layer.name))
            except BuildError:
                progress.close()
                raise
            threads = 1
            if layer.parallel == "openmp":
                omp_ok = _set_omp_threads(args.threads) and omp_ok
                threads = args.threads
            for role in fns.roles():
                if not _wanted(args, cfg, layer.name, role):
                    continue
                where = f"{layer.name}.{role} (batch {fns.batch})"
                fixed = layer.at_sizes(cfg.sizes.get(layer.name, {}))  # what this call computes
                nbytes = traffic(fixed, role, fns.batch)
                progress.step(f"{where}: normgen vs copy")
                ours = fns.call(role)
                t_ours, t_copy = time_interleaved([ours, _copy_pair(nbytes, fns.x, fns.y)], args.repeat, args.warmup)
                res = Result(layer.name, role, layer.kind, layer.fmt.letters, list(fns.x.shape), layer.dtype,
                             fns.batch, layer.parallel, threads, nbytes, t_ours, nbytes / t_ours / 1e9,
                             t_copy, nbytes / t_copy / 1e9, t_copy / t_ours, samples=args.repeat)
                if role == "train_forward_sync":
                    progress.step(f"{where}: split vs fused train_forward")
                    res.time_vs_fused_s, res.fused_time_s = time_interleaved([ours, fns.call("train_forward")],
                                                                             args.repeat, args.warmup)
                    res.split_cost = res.time_vs_fused_s / res.fused_time_s
                if have_torch:
                    progress.step(f"{where}: normgen vs PyTorch")
                    fn, res.torch_note = torch_case(fixed, role, fns.x, fused=fns.fused_inputs())
                    if fn is not None:
                        res.time_vs_torch_s, res.torch_time_s = time_interleaved([ours, fn], args.repeat, args.warmup)
                        res.torch_speedup = res.torch_time_s / res.time_vs_torch_s
                else:
                    res.torch_note = "skipped" if args.no_torch else "torch not importable"
                if have_ort:
                    progress.step(f"{where}: normgen vs ONNX Runtime")
                    fn, res.ort_note = ort_case(fixed, "train_forward" if role == "train_forward_sync" else role,
                                                fns.x, args.threads, fused=fns.fused_inputs())
                    if fn is not None:
                        res.time_vs_ort_s, res.ort_time_s = time_interleaved([ours, fn], args.repeat, args.warmup)
                        res.ort_speedup = res.ort_time_s / res.time_vs_ort_s
                else:
                    res.ort_note = "skipped" if args.no_ort else "onnxruntime not importable"
                if have_compile:
                    progress.step(f"{where}: normgen vs torch.compile (compiling)")
                    fn, res.torch_compile_note, res.torch_compile_build_s = torch_compile_case(
                        fixed, role, fns.x, fns.fused_inputs())
                    if fn is not None:
                        progress.step(f"{where}: normgen vs torch.compile")
                        res.time_vs_torch_compile_s, res.torch_compile_time_s = time_interleaved(
                            [ours, fn], args.repeat, args.warmup)
                        res.torch_compile_speedup = res.torch_compile_time_s / res.time_vs_torch_compile_s
                    del fn
                else:
                    res.torch_compile_note = "skipped" if args.no_compile or args.no_torch else "torch not importable"
                report.results.append(res)
                progress.advance()
            del fns
        if have_torch:
            _torch_reused(plans, cfg, report, args, progress, flags)
    finally:
        progress.close()
    if not omp_ok:
        print("normgen bench: warning: libgomp not found; OpenMP layers ran with OMP_NUM_THREADS", file=sys.stderr)
    return report


def _wanted(args: argparse.Namespace, cfg: BenchConfig, name: str, role: str) -> bool:
    """--function wins over the sidecar's [bench.functions]; neither: every function."""
    chosen = args.function or cfg.functions.get(name)
    return not chosen or role in chosen


def _roles(layer: Layer, target: str) -> list[str]:
    """The functions of a layer the bench times, in ROLES order."""
    from ..lowering import lower

    plan = lower(layer, target)
    roles = {f.role for f in plan.functions}
    try:
        roles.update(plan.train.roles if target == "c" else [])
        if target == "c" and plan.train.sync is not None:
            roles.add("train_forward_sync")
    except (AttributeError, ImportError, NormgenError):  # no training half
        pass
    return [r for r in ROLES if r in roles]


def _total(layers: list[Layer], cfg: BenchConfig, args: argparse.Namespace) -> int:
    n = 0
    for layer in layers:
        n += sum(_wanted(args, cfg, layer.name, r) for r in _roles(layer, args.target))
    return max(n, 1)


def _torch_reused(layers: list[Layer], cfg: BenchConfig, report: Report, args: argparse.Namespace,
                  progress: Progress, flags: list[str]) -> None:
    """PyTorch (and its torch.compile) again, once glibc keeps freed memory (see _keep_freed_memory): its kernel's time
    without the page faults of a fresh output, sampled in turn with the generated function (built
    again: its build is cached) on the same data. Run after everything else because glibc's
    settings cannot be put back."""
    _keep_freed_memory()
    by_name = {layer.name: layer for layer in layers}
    rng = np.random.default_rng(0)
    progress.extend(sum((res.torch_time_s is not None) + (res.torch_compile_time_s is not None) for res in report.results))
    fns: CFunctions | None = None
    for res in report.results:
        if res.torch_time_s is None:
            continue
        layer = by_name[res.layer]
        progress.step(f"{res.layer}.{res.function}: normgen vs PyTorch, freed memory reused")
        if fns is None or fns.layer.name != res.layer:
            fns = None  # the previous layer's buffers freed before this layer's are allocated
            fns = CFunctions(layer, flags, res.batch, rng, cfg.sizes.get(layer.name))
        fn, _ = torch_case(layer.at_sizes(cfg.sizes.get(layer.name, {})), res.function, fns.x,
                           fused=fns.fused_inputs())
        if fn is not None:
            res.time_vs_torch_reuse_s, res.torch_reuse_time_s = time_interleaved(
                [fns.call(res.function), fn], args.repeat, args.warmup)
            res.torch_reuse_speedup = res.torch_reuse_time_s / res.time_vs_torch_reuse_s
        progress.advance()
        if res.torch_compile_time_s is not None:
            progress.step(f"{res.layer}.{res.function}: normgen vs torch.compile, freed memory reused")
            fn, _, _ = torch_compile_case(layer.at_sizes(cfg.sizes.get(layer.name, {})), res.function, fns.x,
                                          fns.fused_inputs())
            if fn is not None:
                res.time_vs_torch_compile_reuse_s, res.torch_compile_reuse_time_s = time_interleaved(
                    [fns.call(res.function), fn], args.repeat, args.warmup)
                res.torch_compile_reuse_speedup = res.torch_compile_reuse_time_s / res.time_vs_torch_compile_reuse_s
            del fn
            progress.advance()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---- the CUDA bench ---------------------------------------------------------------------------------


def bench_cuda(layers: list[Layer], cfg: BenchConfig, args: argparse.Namespace) -> Report:
    """Time the CUDA kernels with CUDA events (``CudaLayer.time``), against a device-to-device
    copy of the same bytes and torch.cuda, all on pycuda's primary context (shared with torch)."""
    try:
        from ..targets.cuda.module import CudaLayer, _pycuda, to_storage
    except ImportError as exc:
        raise NormgenError(f"the CUDA target is not available: {exc}") from None
    drv, gpuarray = _pycuda()  # NormgenError without pycuda
    try:
        dev = drv.Context.get_device()
    except Exception as exc:  # noqa: BLE001 - pycuda raises its own driver errors
        raise NormgenError(f"normgen bench --target cuda needs a CUDA GPU: {exc}") from None
    from .check import random_input

    info = machine_info("cuda")
    info["gpu"] = dev.name()
    report = Report(__version__, "cuda", str(args.spec), 1, "nvcc (normgen.targets.cuda defaults)", info, BYTES_DOC)
    have_torch = not args.no_torch and _importable("torch")
    rng = np.random.default_rng(0)
    progress = Progress(_total(layers, cfg, args))
    calls = 10

    def events_time(fn: Callable[[], object]) -> float:
        for _ in range(max(1, args.warmup)):
            fn()
        drv.Context.synchronize()
        start, stop = drv.Event(), drv.Event()
        samples = []
        for _ in range(max(1, args.repeat)):
            start.record()
            for _ in range(calls):
                fn()
            stop.record()
            stop.synchronize()
            samples.append(start.time_till(stop) / 1e3 / calls)
        return statistics.median(samples)

    try:
        for layer in layers:
            progress.step(f"{layer.name}: compiling (nvcc)")
            cl = CudaLayer(layer)
            batch = cfg.batch[layer.name]
            x = random_input(layer, batch, rng, cfg.sizes.get(layer.name))
            x_gpu = gpuarray.to_gpu(to_storage(x, layer.dtype))
            fixed = layer.at_sizes(cfg.sizes.get(layer.name, {}))  # what these calls compute
            roles = ["predict"] + (["train_forward"] if layer.kind == "batchnorm" else [])
            inputs = fused_inputs(layer, x, rng) if layer.fused else {}
            for role in roles:
                if not _wanted(args, cfg, layer.name, role):
                    continue
                where = f"{layer.name}.{role} (batch {batch})"
                nbytes = traffic(fixed, role, batch)
                progress.step(f"{where}: CUDA kernels vs device copy")
                if layer.fused:
                    # the public launcher's stages and core kernels, on device copies of its inputs
                    t_ours = events_time(cl.on_device(role, **inputs))
                else:
                    cl.time(role, x_gpu, repeat=2, warmup=max(1, args.warmup))
                    t_ours = statistics.median(cl.time(role, x_gpu, repeat=calls, warmup=0)
                                               for _ in range(args.repeat))
                half = nbytes // 2
                src, dst = drv.mem_alloc(half), drv.mem_alloc(half)
                t_copy = events_time(lambda src=src, dst=dst, half=half: drv.memcpy_dtod(dst, src, half))
                src.free()
                dst.free()
                res = Result(layer.name, role, layer.kind, layer.fmt.letters, list(x.shape), layer.dtype, batch,
                             "cuda", 0, nbytes, t_ours, nbytes / t_ours / 1e9, t_copy, nbytes / t_copy / 1e9,
                             t_copy / t_ours, samples=args.repeat, ort_note="not compared on cuda",
                             torch_compile_note="not compared on cuda")
                if layer.fused:
                    res.torch_note = "fused forms: not compared"
                elif have_torch:
                    import torch

                    progress.step(f"{where}: torch.cuda")
                    tf, res.torch_note = torch_case(fixed, role, x, device="cuda")
                    if tf is not None:
                        res.torch_time_s = _torch_cuda_time(torch, tf, args.repeat, args.warmup)
                        res.torch_speedup = res.torch_time_s / t_ours
                else:
                    res.torch_note = "skipped" if args.no_torch else "torch not importable"
                report.results.append(res)
                progress.advance()
            del x_gpu, cl
    finally:
        progress.close()
    return report


def fused_inputs(layer: Layer, x: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The named inputs of a fused layer's forward launchers (README "Fused forms"): x, and the
    residual and the modulation's shift and scale ([batch, C]) where it has them."""
    out = {"x": x}
    if layer.residual:
        out["residual"] = rng.standard_normal(x.shape)
    if layer.modulation != "none":
        batch = reference.batch_of(layer, x)
        out["mod_shift"] = 0.1 * rng.standard_normal((batch, layer.channels))
        out["mod_scale"] = 0.1 * rng.standard_normal((batch, layer.channels))
    return out


def _torch_cuda_time(torch, fn: Callable[[], object], repeat: int, warmup: int, calls: int = 20) -> float:
    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(max(1, repeat)):
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3 / calls)
    return statistics.median(samples)


# ---- output --------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: Report, out=None) -> None:
    out = sys.stdout if out is None else out
    m = report.machine
    where = m.get("gpu") or m.get("cpu") or m.get("machine")
    if not m.get("gpu") and "cpu_family" in m:
        where += f" (family {m['cpu_family']} model {m.get('cpu_model', '?')}, {m.get('vectors', '?')})"
    print(f"normgen {report.normgen_version} bench, target {report.target}, {where}, "
          f"{report.threads} thread(s), flags {report.flags!r}", file=out)
    head = (f"{'workload':34} {'shape':18} {'MB':>6} {'us':>9} {'GB/s':>6} {'copy':>6} {'%copy':>5} "
            f"{'torch us':>9} {'x torch':>7} {'x reuse':>7} {'compile us':>10} {'x comp':>6} {'x reuse':>7} {'ort us':>9} {'x ort':>6}")
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in report.results:
        shape = "x".join(map(str, r.shape))
        print(f"{r.layer + '.' + r.function:34} {shape:18} {r.bytes / 1e6:6.1f} {r.time_s * 1e6:9.1f} "
              f"{r.gbps:6.2f} {r.copy_gbps:6.2f} {100 * r.fraction_of_copy:4.0f}% "
              f"{_fmt(r.torch_time_s and r.torch_time_s * 1e6, '9.1f'):>9} {_fmt(r.torch_speedup, '6.2f'):>7} "
              f"{_fmt(r.torch_reuse_speedup, '6.2f'):>7} "
              f"{_fmt(r.torch_compile_time_s and r.torch_compile_time_s * 1e6, '10.1f'):>10} "
              f"{_fmt(r.torch_compile_speedup, '5.2f'):>6} {_fmt(r.torch_compile_reuse_speedup, '6.2f'):>7} "
              f"{_fmt(r.ort_time_s and r.ort_time_s * 1e6, '9.1f'):>9} {_fmt(r.ort_speedup, '5.2f'):>6}", file=out)
    print("GB/s: bytes read + written / median time; copy: a plain copy of the same bytes, sampled in turn "
          "with normgen; x torch / x comp / x ort: their time / normgen's, the two sampled in turn (> 1: "
          "normgen faster; comp: the PyTorch expression through torch.compile, compiled before timing); "
          "x reuse: the column before it again with freed memory reused (no page faults for PyTorch's fresh output)", file=out)
    notes = sorted({r.torch_compile_note for r in report.results if r.torch_compile_time_s is None
                    and r.torch_compile_note.startswith("torch.compile")})
    for note in notes:
        print(f"torch.compile column skipped: {note}", file=out)
    for r in report.results:
        if r.split_cost is not None:
            print(f"{r.layer}.train_forward_sync: {r.time_vs_fused_s * 1e6:.1f} us against the fused train_forward's "
                  f"{r.fused_time_s * 1e6:.1f} us, sampled in turn: split cost x{r.split_cost:.2f}", file=out)


def write_plot(report: Report, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NormgenError("--plot needs matplotlib: pip install matplotlib (or pip install 'normgen[bench]')") from None
    rs = report.results
    labels = [f"{r.layer}\n{r.function}" for r in rs]
    series = [("normgen", [r.gbps for r in rs]), ("copy", [r.copy_gbps for r in rs])]
    if any(r.torch_time_s for r in rs):
        series.append(("PyTorch", [r.bytes / r.torch_time_s / 1e9 if r.torch_time_s else 0.0 for r in rs]))
    if any(r.torch_compile_time_s for r in rs):
        series.append(("torch.compile", [r.bytes / r.torch_compile_time_s / 1e9 if r.torch_compile_time_s else 0.0
                                         for r in rs]))
    if any(r.ort_time_s for r in rs):
        series.append(("ONNX Runtime", [r.bytes / r.ort_time_s / 1e9 if r.ort_time_s else 0.0 for r in rs]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rs) + 2), 4.5))
    xs = np.arange(len(rs))
    for i, (name, values) in enumerate(series):
        ax.bar(xs + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("GB/s (bytes read + written)")
    where = report.machine.get("gpu") or report.machine.get("cpu", "")
    ax.set_title(f"normgen bench ({report.target}, {report.threads} thread(s)) — {where}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """``normgen bench``: returns the exit status."""
    from ..description.spec import load_spec

    if args.threads < 1:
        raise NormgenError(f"--threads must be a positive integer, got {args.threads}")
    if args.repeat < 1:
        raise NormgenError(f"--repeat must be a positive integer, got {args.repeat}")
    layers = load_spec(args.spec)
    if args.layer:
        names = {layer.name for layer in layers}
        missing = [n for n in args.layer if n not in names]
        if missing:
            raise NormgenError(f"--layer {missing[0]!r}: the spec has layers {', '.join(sorted(names))}")
        layers = [layer for layer in layers if layer.name in args.layer]
    cfg = load_config(layers, args.spec, args.config, args.batch)
    from .check import COPIES, ensure_memory

    # x, y, dy, dx, their float64 sources, the copy baseline and PyTorch's tensors: check's training figure
    ensure_memory([(layer, [cfg.batch[layer.name]], [cfg.sizes.get(layer.name, {})]) for layer in layers],
                  COPIES[True], "bench")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise NormgenError("--plot needs matplotlib: pip install matplotlib (or pip install 'normgen[bench]')") from None
    if args.target == "cuda":
        report = bench_cuda(layers, cfg, args)
    else:
        report = bench_c(layers, cfg, args)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
