"""Compiling generated CUDA with nvcc and running its kernels through pycuda.

:class:`CudaLayer` is the CUDA target's test bench, with the C target's API
(:class:`normgen.targets.c.build.CompiledLayer`): ``.predict(x)`` and, for batch norm, ``.train_forward(x)``
updating ``.running_mean`` / ``.running_var``. It takes NumPy arrays (copied to and from the
device) or pycuda ``GPUArray`` s (used in place). pycuda cannot call the generated host launchers,
so the ``extern "C" __global__`` kernels are called directly with the launch shapes of
:meth:`normgen.targets.cuda.plan.CudaPlan.launches` — the same numbers the launchers are rendered with.

bfloat16 has no NumPy dtype: NumPy inputs of a bfloat16 layer are rounded to bfloat16
(round-to-nearest-even) and outputs come back as float32; on the device a bfloat16 tensor is a
``uint16`` ``GPUArray`` of the bits (:func:`to_storage` / :func:`from_storage` convert).

Everything above :class:`CudaLayer` works without pycuda or a GPU (compiling needs nvcc only).
Compiled cubins are cached like the C target's modules: keyed by a hash of the generated
source, the flags, the architecture and nvcc's version, under ``$NORMGEN_CACHE`` (or
``~/.cache/normgen``); a failed build keeps its sources in the directory its error names.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ... import reference
from ...description.layers import Layer
from ...errors import NormgenError
from ...lowering import lower
from ..cache import cache_dir, key
from ..calls import argument_kinds
from ..render import emit
from .calls import CudaCalls
from .plan import ERRORS, CudaPlan, derive
from .storage import from_storage, round_to, storage_dtype, to_storage  # noqa: F401  (re-exported)
from .training import CudaTraining

#: nvcc flags of every build (the architecture is added per device).
NVCC_FLAGS = ["-std=c++17", "-O3"]
#: Warnings as errors, for compile checks.
STRICT_FLAGS = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


class CudaBuildError(NormgenError):
    """nvcc rejected generated code."""


def nvcc() -> str:
    """The nvcc to use: $NVCC, nvcc on PATH, or $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc."""
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise NormgenError("nvcc was not found: install the CUDA toolkit, or set NVCC or CUDA_HOME")


def nvcc_version(path: str | None = None) -> str:
    path = path or nvcc()
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise NormgenError(f"nvcc {path!r} is not usable: {exc}") from None
    return out.strip().splitlines()[-1] if out.strip() else path


# ---- building -------------------------------------------------------------------------------------
def compile_cubin(layer: Layer, arch: str, *, flags: list[str] | None = None) -> tuple[Path, CudaPlan]:
    """Compile a layer's generated CUDA for ``arch`` (e.g. "sm_90") into a cubin (cached)."""
    cp = derive(lower(layer, "cuda"))
    files = emit(layer, "cuda")
    flags = list(NVCC_FLAGS if flags is None else flags)
    compiler = nvcc()
    digest = key([*files.values(), " ".join(flags), arch, nvcc_version(compiler)])
    root = cache_dir()
    cubin = root / f"_normgen_{cp.name}_{digest}.{arch}.cubin"
    if not cubin.exists():
        work = Path(tempfile.mkdtemp(prefix=f"_normgen_{cp.name}_{digest}-", dir=root))
        for fname, text in files.items():
            (work / fname).write_text(text)
        out = work / "layer.cubin"
        cmd = [compiler, *flags, f"-arch={arch}", "-cubin", "-I", str(work), str(work / f"{cp.name}.cu"), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise CudaBuildError(
                f"nvcc rejected the generated CUDA of layer {cp.name!r}; sources kept in {work}\n"
                f"$ {shlex.join(cmd)}\n{proc.stderr}"
            )
        os.replace(out, cubin)
        shutil.rmtree(work, ignore_errors=True)
    return cubin, cp


def bytes_moved(layer: Layer, role: str, batch: int, workspace: bool = True,
                sizes: dict[str, int] | None = None) -> dict[str, int]:
    """Bytes of x and y a function moves (``minimum``: read x once, write y once; ``actual``:
    what its kernels read and write), for GB/s figures. No pycuda needed."""
    return derive(lower(layer, "cuda")).bytes_moved(role, batch, workspace, sizes)


def _pycuda():
    try:
        import pycuda.driver as drv
        import pycuda.gpuarray as gpuarray

        try:
            import pycuda.autoprimaryctx  # noqa: F401  (shares the primary context with torch, cupy)
        except ImportError:  # pycuda older than 2021.1
            import pycuda.autoinit  # noqa: F401
    except ImportError as exc:
        raise NormgenError(f"the cuda target's test bench needs pycuda and a GPU: {exc}") from None
    return drv, gpuarray


def _is_gpuarray(x) -> bool:
    return hasattr(x, "gpudata") and hasattr(x, "shape")


class CudaLayer(CudaTraining, CudaCalls):
    """A layer compiled for the CUDA target, its kernels called through pycuda.

    ``workspace=True`` (the default) runs what the ``_ws`` launchers run (split reductions when
    there are few statistics); ``workspace=False`` what the plain launchers run. A fused layer's
    public launchers (README "Fused forms") run by name: ``run(role, **arrays)`` (NamedCalls), each
    stage kernel and core launch as the generated launcher queues them.
    """

    ERRORS = ERRORS

    def __init__(self, layer: Layer, *, arch: str | None = None, flags: list[str] | None = None,
                 workspace: bool = True):
        drv, gpuarray = _pycuda()
        self._drv, self._gpuarray = drv, gpuarray
        if arch is None:
            major, minor = drv.Context.get_device().compute_capability()
            arch = f"sm_{major}{minor}"
        self.layer = layer
        self.arch = arch
        self.workspace = workspace
        self.cubin, self.cp = compile_cubin(layer, arch, flags=flags)
        self.plan = self.cp.plan
        self.module = drv.module_from_file(str(self.cubin))
        self.dtype = storage_dtype(layer.dtype)
        self._functions: dict[str, object] = {}
        self._ws = None
        self._ws_bytes = 0
        self._params = None
        if self.cp.runtime_params:
            acc = np.float32 if self.cp.A == "float" else np.float64
            self._param_values = {k: v.astype(acc) for k, v in layer.parameter_arrays().items()}
            self._params = drv.mem_alloc(sum(v.nbytes for v in self._param_values.values()))
            self._upload_params()
        if layer.kind == "batchnorm":
            host = np.float32 if layer.dtype == "bfloat16" else self.dtype
            self.running_mean = round_to(layer.trained_mean_values, layer.dtype).astype(host)
            self.running_var = round_to(layer.trained_variance_values, layer.dtype).astype(host)
            self._rm = gpuarray.to_gpu(to_storage(self.running_mean, layer.dtype))
            self._rv = gpuarray.to_gpu(to_storage(self.running_var, layer.dtype))

    # ---- run-time parameters (param_storage="runtime") --------------------------------------------
    def _upload_params(self) -> None:
        packed = np.concatenate([self._param_values[k] for k in self.plan.params])
        self._drv.memcpy_htod(self._params, packed)

    def _download_params(self) -> None:
        """Read the device struct back (after the update kernel wrote it)."""
        sizes = [self._param_values[k].size for k in self.plan.params]
        packed = np.empty(sum(sizes), dtype=np.float32 if self.cp.A == "float" else np.float64)
        self._drv.memcpy_dtoh(packed, self._params)
        for k, part in zip(self.plan.params, np.split(packed, np.cumsum(sizes)[:-1]), strict=True):
            self._param_values[k] = part.copy()

    def set_params(self, **arrays: np.ndarray) -> None:
        """Run-time parameters: set ``scale``, ``offset``, ``trained_mean``, ``trained_variance``
        (those the layer has; copied into the device ``NAME_params`` struct the kernels read).
        scale and offset take ``plan.channels`` values: one per channel, or per element of the
        normalized dimensions (``affine="element"``, flattened in format order)."""
        if not self.cp.runtime_params:
            raise NormgenError(f"layer {self.layer.name!r} embeds its parameters; use param_storage='runtime'")
        for name, values in arrays.items():
            if name not in self._param_values:
                raise NormgenError(f"layer {self.layer.name!r} has no parameter {name!r}")
            values = np.asarray(values, dtype=self._param_values[name].dtype).reshape(-1)
            if values.size != self._param_values[name].size:
                raise NormgenError(f"{name} needs {self._param_values[name].size} values, got {values.size}")
            self._param_values[name] = values
        self._upload_params()

    def get_params(self) -> dict[str, np.ndarray]:
        if not self.cp.runtime_params:
            return {k: v.copy() for k, v in self.layer.parameter_arrays().items()}
        return {k: v.copy() for k, v in self._param_values.items()}

    @property
    def params(self):
        """The device ``NAME_params`` struct (run-time parameters), or None."""
        return self._params

    # ---- calls by name (NamedCalls): a public launcher's stages and cores --------------------------
    def _invoke(self, f, values: dict) -> None:
        """Run public launcher ``f`` on device copies of ``values`` (NumPy arrays by argument name,
        and the batch and sizes); its outputs are copied back into those arrays."""
        queue, dev, kinds = self._queued(f, values)
        queue()
        self._drv.Context.synchronize()
        for n, a in kinds.items():
            if a.output:
                host = values[n]
                host[...] = self.from_device_values(a, dev[n].get()).reshape(host.shape)

    def _queued(self, f, values: dict):
        """(a function queueing launcher ``f``'s stages and cores on the default stream, the device
        copies of its arrays by name, their arguments by name)."""
        batch = int(values["batch"])
        sizes = {n: int(values[n]) for n in self.plan.sizes}
        kinds = {a.name: a for a in argument_kinds(f.args) if a.pointer and a.name in values and a.name != "params"}
        dev = {n: self._gpuarray.to_gpu(self.to_device_values(a, values[n])) for n, a in kinds.items()}

        def queue() -> None:
            for stage in self.stages_of(f):
                if stage.launches:
                    self._stage(stage, dev, batch, sizes)
                else:
                    self._core(f.role, self.core_arguments(stage, f), dev, batch, sizes)

        return queue, dev, kinds

    def on_device(self, role: str, **arrays: np.ndarray) -> Callable[[], None]:
        """Public launcher ``role`` on device copies of the named ``arrays`` (copied once): each
        call of the result queues its kernels, nothing copied and nothing synchronized (the
        bench times it)."""
        f, values, _ = self.arguments(role, **arrays)
        return self._queued(f, values)[0]

    def _stage(self, stage, dev: dict, batch: int, sizes: dict[str, int]) -> None:
        fc = self.fused_cuda
        scalars = {"batch": np.int32(batch), "params": self._params, **{n: np.uint64(v) for n, v in sizes.items()}}
        args = [scalars[a] if a in scalars else dev[a].gpudata for a in stage.args]
        fn = self._function(fc.kernel(stage.kind), stage.args)
        fn.prepared_async_call((fc.grid_value(stage.grid, batch, sizes), 1), fc.block(stage), None, *args)

    def _core(self, role: str, names: dict[str, str], dev: dict, batch: int, sizes: dict[str, int]) -> None:
        """The core launcher of ``role`` on the stage buffers (``names``: its argument → the public
        launcher's buffer)."""
        if role in ("predict", "train_forward"):
            kept = getattr(self, "_rm", None), getattr(self, "_rv", None)
            if role == "train_forward":
                self._rm, self._rv = dev[names["running_mean"]], dev[names["running_var"]]
            try:
                self._launch(role, dev[names["x"]], dev[names["y"]], batch, sizes=sizes)
            finally:
                self._rm, self._rv = kept
            return
        values = {core: dev[public].gpudata for core, public in names.items() if public in dev}
        if "workspace" in names:
            values["workspace"] = self._drv.mem_alloc(max(16, self._tc().workspace_size(batch, sizes)))
        self._train_launch(role, batch, values, sizes)

    # ---- launching -----------------------------------------------------------------------------
    def _function(self, name: str, args: tuple[str, ...]):
        fn = self._functions.get(name)
        if fn is None:
            fn = self.module.get_function(name)
            codes = {"batch": "i", "parts": "i", **{n: "Q" for n in self.plan.sizes}}  # sizes are size_t
            fn.prepare("".join(codes.get(a, "P") for a in args))
            self._functions[name] = fn
        return fn

    def _workspace(self, batch: int, sizes: dict[str, int] | None = None):
        need = self.cp.workspace_size(batch, sizes) if self.workspace else 0
        if need > self._ws_bytes:
            self._ws = self._drv.mem_alloc(need)
            self._ws_bytes = need
        return self._ws

    def launches(self, role: str, batch: int, sizes: dict[str, int] | None = None):
        """The kernel launches of one call (see :meth:`CudaPlan.launches`); ``sizes``: the
        run-time sizes, by name."""
        return self.cp.launches(role, batch, self.workspace, sizes)

    def _launch(self, role: str, x_gpu, y_gpu, batch: int, stream=None, sizes: dict[str, int] | None = None) -> None:
        sizes = sizes or {}
        values = {"x": x_gpu.gpudata, "y": y_gpu.gpudata, "batch": np.int32(batch), "params": self._params,
                  **{n: np.uint64(v) for n, v in sizes.items()}}
        launches = self.launches(role, batch, sizes)
        if any(len(L.args) and "workspace" in L.args for L in launches):
            values["workspace"] = self._workspace(batch, sizes)
        if role == "train_forward":
            values["running_mean"], values["running_var"] = self._rm.gpudata, self._rv.gpudata
        values["parts"] = np.int32(self.cp.parts(batch, self.workspace, sizes))
        for L in launches:
            fn = self._function(L.kernel, L.args)
            fn.prepared_async_call((L.grid, 1), L.block, stream, *[values[a] for a in L.args])

    def _batch(self, x) -> int:
        return self._dims(x)[0]

    def _dims(self, x) -> tuple[int, dict[str, int]]:
        """(batch, run-time sizes by name) of an input (NumPy or GPUArray), checked against the layer."""
        shape = tuple(x.shape)
        batch = reference.batch_of(self.layer, np.broadcast_to(np.zeros((), np.uint8), shape))
        return batch, self.layer.sizes_of(shape)

    def _run(self, role: str, x, out=None):
        self._require_unfused(role)
        on_gpu = _is_gpuarray(x)
        batch, sizes = self._dims(x)
        if on_gpu:
            if x.dtype != self.dtype:
                raise NormgenError(f"layer {self.layer.name!r}: a GPUArray input must be {self.dtype}, got {x.dtype}")
            x_gpu = x
        else:
            x_gpu = self._gpuarray.to_gpu(to_storage(x, self.layer.dtype))
        y_gpu = out if out is not None and _is_gpuarray(out) else self._gpuarray.empty_like(x_gpu)
        if role == "train_forward":
            self._rm.set(to_storage(self.running_mean, self.layer.dtype))
            self._rv.set(to_storage(self.running_var, self.layer.dtype))
        self._launch(role, x_gpu, y_gpu, batch, sizes=sizes)
        self._drv.Context.synchronize()
        if role == "train_forward":
            host = self.running_mean.dtype
            self.running_mean = from_storage(self._rm.get(), self.layer.dtype).astype(host)
            self.running_var = from_storage(self._rv.get(), self.layer.dtype).astype(host)
        if on_gpu:
            return y_gpu
        y = from_storage(y_gpu.get(), self.layer.dtype)
        if out is not None:
            out[...] = y
            return out
        return y

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """x rounded to the layer's storage type, as float64 (what the kernels read; used by
        ``normgen check`` so that the reference sees the same input)."""
        return round_to(x, self.layer.dtype)

    def predict(self, x, out=None):
        """Inference on x (NumPy or GPUArray); ``out`` may be x itself."""
        return self._run("predict", x, out)

    def train_forward(self, x):
        """Batch norm's training forward; updates ``running_mean`` and ``running_var``."""
        if self.layer.kind != "batchnorm":
            raise NormgenError(f"train_forward is for batch norm; layer {self.layer.name!r} is {self.layer.kind}")
        batch, sizes = self._dims(x)
        if self.plan.running_unbiased and self.cp.layout.count.value(batch, sizes) < 2:
            raise NormgenError(f"{self.layer.name}_train_forward: {ERRORS[3]}")
        return self._run("train_forward", x)

    # ---- benchmarking --------------------------------------------------------------------------
    def time(self, fn_name: str, x_gpu, repeat: int = 20, warmup: int = 3) -> float:
        """Seconds per call of ``fn_name`` ("predict" / "train_forward") on a GPUArray, timed with
        CUDA events around ``repeat`` back-to-back calls (kernels only: no copies)."""
        if not _is_gpuarray(x_gpu):
            raise NormgenError("time() takes a pycuda GPUArray (copies would be timed otherwise)")
        self._require_unfused(fn_name)
        batch, sizes = self._dims(x_gpu)
        y_gpu = self._gpuarray.empty_like(x_gpu)
        for _ in range(warmup):
            self._launch(fn_name, x_gpu, y_gpu, batch, sizes=sizes)
        start, end = self._drv.Event(), self._drv.Event()
        start.record()
        for _ in range(repeat):
            self._launch(fn_name, x_gpu, y_gpu, batch, sizes=sizes)
        end.record()
        end.synchronize()
        return start.time_till(end) / 1e3 / repeat

    def bytes_moved(self, fn_name: str, batch: int, sizes: dict[str, int] | None = None) -> dict[str, int]:
        return self.cp.bytes_moved(fn_name, batch, self.workspace, sizes)
