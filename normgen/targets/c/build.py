"""Compiling generated C with cffi (API mode) and running it on NumPy arrays.

Generated sources are compiled on their own with strict C99 warnings as errors, then linked
into a cffi extension module. Modules are cached by a hash of the generated source, the flags
and the compiler's version (like pycuda's compiler cache); a failed build keeps its sources
in the directory the error message names.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ... import reference
from ...description.layers import Layer
from ...errors import NormgenError
from ...lowering import lower
from ...lowering.int8 import lower_int8
from ...lowering.plan import Plan
from ..cache import cache_dir, key
from ..calls import NamedCalls, argument_kinds
from ..render import emit
from .training import CTraining

STRICT_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror"]
#: The warnings firmware projects add (README "Firmware"); every generated file is free of them.
FIRMWARE_WARNINGS = ["-Wdouble-promotion", "-Wshadow", "-Wconversion", "-Wcast-align", "-Wundef", "-Wvla"]
DEFAULT_OPT = ["-O2"]
NUMPY_DTYPES = {"float32": np.float32, "float64": np.float64, "int8": np.int8}


class BuildError(NormgenError):
    """The C compiler rejected generated code."""


def cc() -> str:
    return os.environ.get("CC", "gcc")


def compiler_version(compiler: str) -> str:
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise NormgenError(f"C compiler {compiler!r} is not usable: {exc}") from None
    return out.splitlines()[0] if out else compiler


def opt_flags() -> list[str]:
    """Optimization flags: NORMGEN_CFLAGS (e.g. "-O3 -march=native") or -O2."""
    env = os.environ.get("NORMGEN_CFLAGS")
    return shlex.split(env) if env else list(DEFAULT_OPT)


def cdef(plan: Plan) -> str:
    """The declarations cffi needs: the params and population structs and every public function."""
    lines = []
    if plan.ctype == "int8_t":  # an int8 layer's plan (lowering/int8.py): its predict only
        return "".join(f"int {f.signature};\n" for f in plan.public_functions)
    if plan.runtime_params:
        members = "".join(f"    {plan.ctype} {p}[{plan.channels}];\n" for p in plan.params)
        lines.append(f"typedef struct {{\n{members}}} {plan.name}_params;")
        lines.append(f"int {plan.name}_params_init({plan.name}_params *params);")
    if plan.train.population:
        lines.append(
            f"typedef struct {{\n    {plan.acc_type} count;\n    {plan.acc_type} mean[{plan.channels}];\n"
            f"    {plan.acc_type} m2[{plan.channels}];\n}} {plan.train.stats_type};"
        )
    lines += [f"int {f.signature};" for f in plan.public_functions]
    lines += [f"int {f.signature};" for f in (plan.train.sync.functions if plan.train.sync else [])]
    return "\n".join(lines) + "\n"


def compile_c(layer: Layer, *, flags: list[str] | None = None):
    """Compile a layer's generated C into a cffi module (cached); returns (module, plan)."""
    import cffi

    plan = lower_int8(layer) if layer.dtype == "int8" else lower(layer, "c")
    files = emit(layer, "c")
    flags = opt_flags() if flags is None else flags
    if plan.parallel == "openmp" and "-fopenmp" not in flags:
        flags = [*flags, "-fopenmp"]  # the layer's `#pragma omp` loops (compiled and linked with it)
    compiler = cc()
    digest = key([*files.values(), cdef(plan), " ".join(flags), compiler_version(compiler),
                cffi.__version__, sys.version])
    modname = f"_normgen_{plan.name}_{digest}"
    root = cache_dir()
    built = list(root.glob(f"{modname}*.so"))
    if not built:
        work = Path(tempfile.mkdtemp(prefix=f"{modname}-", dir=root))
        for fname, text in files.items():
            (work / fname).write_text(text)
        obj = work / f"{plan.name}.o"
        cmd = [compiler, *STRICT_FLAGS, *flags, "-fPIC", "-c", str(work / f"{plan.name}.c"), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise BuildError(
                f"compiling the generated C of layer {plan.name!r} failed; sources kept in {work}\n"
                f"$ {shlex.join(cmd)}\n{proc.stderr}"
            )
        ffi = cffi.FFI()
        ffi.cdef(cdef(plan))
        ffi.set_source(
            modname, f'#include "{plan.name}.h"', include_dirs=[str(work)], extra_objects=[str(obj)],
            libraries=["m"], extra_link_args=[f for f in flags if f.startswith("-f")],
        )
        try:
            so = ffi.compile(tmpdir=str(work), verbose=False)
        except Exception as exc:  # distutils/setuptools errors carry the compiler output
            raise BuildError(f"building the cffi module of layer {plan.name!r} failed; sources kept in {work}: {exc}") from None
        target = root / Path(so).name
        os.replace(so, target)
        shutil.rmtree(work, ignore_errors=True)
        built = [target]
    spec = importlib.util.spec_from_file_location(modname, built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module, plan


class CompiledLayer(CTraining, NamedCalls):
    """A layer compiled for the C target, run on NumPy arrays shaped in the layer's format.

    ``running_mean`` / ``running_var`` (batch norm) start at the trained statistics and are
    updated by :meth:`train_forward`. With ``param_storage="runtime"``, ``params`` is the
    parameter struct passed to every call (set its fields with :meth:`set_params`).
    """

    ERRORS = {1: "a NULL pointer", 2: "batch < 1 or too large", 3: "too few values per channel for an unbiased variance",
              4: "a run-time size < 1 or too large"}

    def __init__(self, layer: Layer, *, flags: list[str] | None = None):
        if layer.dtype not in NUMPY_DTYPES:
            raise NormgenError(f"layer {layer.name!r}: dtype {layer.dtype} is not supported by the c target")
        self.layer = layer
        self.lib, self.plan = compile_c(layer, flags=flags)
        self.ffi = self.lib.ffi
        self._lib = self.lib.lib
        self.dtype = np.dtype(NUMPY_DTYPES[layer.dtype])
        self._lead: list = []
        if self.plan.runtime_params:
            self.params = self.ffi.new(f"{layer.name}_params *")
            self._check(getattr(self._lib, f"{layer.name}_params_init")(self.params), "params_init")
            self._lead = [self.params]
        if layer.kind == "batchnorm":
            self.running_mean = layer.trained_mean_values.astype(self.dtype)
            self.running_var = layer.trained_variance_values.astype(self.dtype)

    def _ptr(self, arr: np.ndarray):
        return self.ffi.cast(f"{self.plan.ctype} *", self.ffi.from_buffer(arr))

    def _check(self, rc: int, fn: str) -> None:
        if rc:
            raise NormgenError(f"{self.layer.name}_{fn} returned {rc} ({self.ERRORS.get(rc, 'unknown error')})")

    def _input(self, x: np.ndarray) -> tuple[np.ndarray, int]:
        """x as the functions take it, and their size arguments: (batch, run-time sizes...)."""
        batch = reference.batch_of(self.layer, x)
        if self.layer.dtype == "int8":
            reference.int8_input(self.layer, x)  # int8 values, never a float array cast
        sizes = self.layer.sizes_of(np.shape(x))
        return np.ascontiguousarray(x, dtype=self.dtype), (batch, *(sizes[n] for n in self.layer.sizes))

    def set_params(self, **arrays: np.ndarray) -> None:
        """Run-time parameters: set ``scale``, ``offset``, ``trained_mean``, ``trained_variance``."""
        if not self.plan.runtime_params:
            raise NormgenError(f"layer {self.layer.name!r} embeds its parameters; use param_storage='runtime'")
        for name, values in arrays.items():
            if name not in self.plan.params:
                raise NormgenError(f"layer {self.layer.name!r} has no parameter {name!r}")
            values = np.asarray(values, dtype=self.dtype).reshape(-1)
            if values.size != self.plan.channels:
                raise NormgenError(f"{name} needs {self.plan.channels} values, got {values.size}")
            buf = self.ffi.buffer(getattr(self.params, name))
            buf[:] = values.tobytes()

    def get_params(self) -> dict[str, np.ndarray]:
        if not self.plan.runtime_params:
            return {k: v.astype(self.dtype) for k, v in self.layer.parameter_arrays().items()}
        return {
            name: np.frombuffer(self.ffi.buffer(getattr(self.params, name)), dtype=self.dtype).copy()
            for name in self.plan.params
        }

    def _invoke(self, f, values: dict) -> None:
        """NamedCalls: call public function ``f`` with each argument's array or integer."""
        call = []
        for a in argument_kinds(f.args):
            v = values[a.name]
            if a.pointer and isinstance(v, np.ndarray):
                v = self.ffi.cast(f"{a.ctype} *", self.ffi.from_buffer(v))
            call.append(v)
        self._check(getattr(self._lib, f.name)(*call), f.role)

    def predict(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Inference on x; ``out`` may be x itself (in place). A fused layer: :meth:`run`."""
        x, dims = self._input(x)
        y = np.empty_like(x) if out is None else out
        fn = getattr(self._lib, f"{self.layer.name}_predict")
        self._check(fn(*self._lead, self._ptr(x), self._ptr(y), *dims), "predict")
        return y

    def train_forward(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Batch norm's training forward; updates ``running_mean`` and ``running_var``. ``out``
        may be x itself (in place)."""
        if self.layer.kind != "batchnorm":
            raise NormgenError(f"train_forward is for batch norm; layer {self.layer.name!r} is {self.layer.kind}")
        x, dims = self._input(x)
        y = np.empty_like(x) if out is None else out
        fn = getattr(self._lib, f"{self.layer.name}_train_forward")
        rc = fn(*self._lead, self._ptr(x), self._ptr(y), *dims, self._ptr(self.running_mean), self._ptr(self.running_var))
        self._check(rc, "train_forward")
        return y
