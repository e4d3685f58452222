"""The CUDA target, in four tiers, for every kind (RMSNorm included) and affine (per channel, per
element, none; with and without offset).

1. Launch shapes (pure Python): every layout family, the split decision, workspace sizes.
2. Compile checks: every generated .cu, across kinds x layouts x dtypes, compiled by nvcc for
   sm_80 and sm_90 with warnings as errors; the launchers and kernels must be exported.
3. CPU emulation: the generated .cu (kernels *and* host launchers) compiled with g++ against
   tests/cuda_emu (threads as fibers, barriers and warp shuffles emulated) and run; y and the
   running statistics are compared with normgen.reference, and the launches the launchers make
   with what normgen.targets.cuda.plan says pycuda must launch.
4. GPU (pycuda): CudaLayer against normgen.reference, on a GPU only.

Tolerances (after rounding x to the storage type; |y| ~ 1): float64 1e-9, float32 2e-4,
float16 2e-3 (rtol and atol; half of a float16 ulp is 4.9e-4 relative), bfloat16 1.6e-2
(half of a bfloat16 ulp is 3.9e-3 relative).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from normgen import reference
from normgen.description.layers import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from normgen.errors import NormgenError
from normgen.lowering import lower
from normgen.targets.cuda import plan as cpm
from normgen.targets.cuda.module import from_storage, round_to, storage_dtype, to_storage
from normgen.targets.cuda.plan import derive
from normgen.targets.render import emit

HERE = Path(__file__).resolve().parent
EMU = HERE / "cuda_emu"
DTYPES = ("float32", "float64", "float16", "bfloat16")
TOL = {"float64": 1e-9, "float32": 2e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
#: Layouts: plain features, NCHW, NHWC, time-major, batch-first sequences, 3-D NCHW, with a U,
#: without a B, and one with more alternation than the [A][R1][K][R2] families (generic).
FORMATS = ("BC", "BCSS", "BSSC", "TBC", "BTC", "BCSSS", "BUC", "SSC", "SBSC")
SIZES = {"C": 12, "T": 5, "U": 3, "S": (5, 4, 3)}


def _dims(fmt: str, channels: int = SIZES["C"]) -> list[int]:
    out, s = [], 0
    for ch in fmt.replace("B", ""):
        if ch == "S":
            out.append(SIZES["S"][s % 3])
            s += 1
        else:
            out.append(channels if ch == "C" else SIZES[ch])
    return out


CLASSES = {"batchnorm": BatchNorm, "groupnorm": GroupNorm, "layernorm": LayerNorm, "instancenorm": InstanceNorm,
           "rmsnorm": RMSNorm}


def make(kind: str, fmt: str, dtype: str = "float32", *, name: str | None = None, channels: int = SIZES["C"], **kw):
    """A layer with random scale and offset of the shape its ``affine`` gives them (only those it
    has: ``bias``, ``affine="none"``), and for batch norm random trained statistics."""
    rng = np.random.default_rng(len(fmt) * 7 + len(kind))
    shape = kw.pop("shape", None) or _dims(fmt, channels)
    c = shape[fmt.replace("B", "").index("C")]
    cls = CLASSES[kind]
    if kind == "groupnorm":
        kw.setdefault("num_groups", 3)
    affine = kw.get("affine", "channel")
    pshape = (c,)
    if affine == "element":
        probe = cls(name="probe", format=fmt, shape=shape, **{k: v for k, v in kw.items() if k != "bias"})
        pshape = probe.param_shape
    scale, offset = rng.uniform(0.5, 1.5, pshape), rng.normal(0, 0.5, pshape)
    has_offset = affine != "none" and kw.get("bias", cls.default_bias)
    common = dict(name=name or f"{kind[:2]}_{fmt.lower()}_{dtype}", format=fmt, shape=shape, dtype=dtype)
    if affine != "none":
        common["scale"] = scale
    if has_offset:
        common["offset"] = offset
    common.update(kw)
    if kind == "batchnorm":
        common.setdefault("trained_mean", rng.normal(0, 1, c))
        common.setdefault("trained_variance", rng.uniform(0.5, 2, c))
    return cls(**common)


#: The four MATLAB kinds (the covering arrays below pair them with layouts and dtypes) and RMSNorm.
KINDS = ("batchnorm", "groupnorm", "layernorm", "instancenorm")
ALL_KINDS = (*KINDS, "rmsnorm")


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", name), os.X_OK):
            return os.path.join(root, "bin", name)
    return None


NVCC = _tool("nvcc")
GXX = shutil.which("g++")


def _cuda_include() -> Path | None:
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    if NVCC:
        cands.append(str(Path(NVCC).resolve().parent.parent))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c) / "include"
    return None


CUDA_INCLUDE = _cuda_include()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA toolkit missing)")
needs_emu = pytest.mark.skipif(GXX is None or CUDA_INCLUDE is None,
                               reason="the CPU emulator needs g++ and the CUDA headers (cuda_fp16.h)")


# ---- 1. launch shapes ---------------------------------------------------------------------------
def _cp(layer):
    return derive(lower(layer, "cuda"))


@pytest.mark.parametrize("fmt,shape,kind,family", [
    ("BCSS", [12, 8, 8], "batchnorm", "segments"),  # planes of 64
    ("BCSS", [12, 5, 4], "batchnorm", "columns"),  # planes of 20: rows of C * 20
    ("BSSC", [8, 8, 12], "batchnorm", "columns"), ("BC", [12], "batchnorm", "columns"),
    ("CB", [12], "batchnorm", "segments"),  # B innermost: one run per channel
    ("BTC", [5, 12], "layernorm", "segments"), ("BCSS", [12, 5, 4], "layernorm", "segments"),
    ("BSSC", [5, 4, 12], "groupnorm", "columns"), ("BCSS", [12, 5, 4], "groupnorm", "segments"),
    ("BCSS", [12, 5, 4], "instancenorm", "segments"), ("BSSC", [5, 4, 12], "instancenorm", "columns"),
    ("SBSC", [5, 4, 12], "instancenorm", "generic"), ("TBC", [5, 12], "instancenorm", "columns"),
    ("BTC", [5, 12], "rmsnorm", "segments"), ("BCSS", [12, 5, 4], "rmsnorm", "columns"),  # channel-only
    ("BSSC", [5, 4, 12], "rmsnorm", "segments"), ("CB", [12], "rmsnorm", "columns"),
])
def test_family(fmt, shape, kind, family):
    assert _cp(make(kind, fmt, shape=shape)).family == family


def test_rmsnorm_statistic_and_affine_arrays():
    """RMSNorm takes the mean-square statistic (no shift, no mean term); the scale and offset a
    layer lacks are fixed __device__ arrays in every storage mode, never struct members."""
    rms = _cp(make("rmsnorm", "BTC"))
    assert (rms.statistic, rms.centered, rms.shift("x[base]")) == ("mean_square", False, "0")
    assert list(rms.param_arrays) == ["scale", "offset"] and set(rms.plan.constants) == {"offset"}
    assert "fixed at 0" in rms.array_doc("offset") and rms.param_locals == ""
    assert _cp(make("layernorm", "BTC")).shift("x[base]") == "to_acc(x[base])"
    rt = _cp(make("rmsnorm", "BTC", param_storage="runtime"))
    assert list(rt.param_arrays) == ["offset"] and list(rt.plan.params) == ["scale"]
    assert rt.param_locals == "    const acc_t *scale = params->scale;\n"
    files = emit(make("rmsnorm", "BTC", param_storage="runtime"), "cuda")
    cu, cuh = files["rm_btc_float32.cu"], files["rm_btc_float32.cuh"]
    assert "static __device__ __align__(16) const acc_t offset[12]" in cu and "acc_t offset[" not in cuh
    assert "to_acc(x[base])" not in cu and "const acc_t shift = 0;" in cu
    bn = _cp(make("batchnorm", "BSSC", affine="none", param_storage="runtime"))
    assert list(bn.plan.params) == ["trained_mean", "trained_variance"] and list(bn.param_arrays) == ["scale", "offset"]
    assert bn.struct_ref("scale") == "scale" and bn.struct_ref("trained_mean") == "p->trained_mean"


@pytest.mark.parametrize("fmt,shape,od,family,vec", [
    ("BCSS", [12, 5, 4], "spatial-channel", "segments", True),  # one run of 240 per (batch)
    ("BCSS", [12, 5, 4], "channel-only", "columns", False),  # the parameter index is the row
    ("BTC", [5, 12], "batch-excluded", "segments", True),
])
def test_element_affine_indexes_parameters_like_channels(fmt, shape, od, family, vec):
    """affine="element": one parameter axis over the normalized dimensions, plan.channels values,
    indexed like a channel (vector loads where a unit's parameters are consecutive)."""
    layer = make("layernorm", fmt, shape=shape, operation_dimension=od, affine="element")
    cp = _cp(layer)
    assert cp.family == family and cp.plan.channels == int(np.prod(layer.param_shape))
    assert cp.param_unit == "normalized element" and len(cp.param_arrays["scale"]) == cp.plan.channels
    if family == "segments":
        assert cp.segments.chan_vec == vec


def test_types_and_parameters_per_target():
    bn = make("batchnorm", "BCSS", "float16")
    p = lower(bn, "cuda")
    assert (p.ctype, p.acc_type) == ("__half", "float")
    assert all(v.endswith("f") for v in p.params["scale"] + p.folded["a"])  # kept in float
    assert lower(make("batchnorm", "BCSS", "bfloat16"), "cuda").ctype == "__nv_bfloat16"
    assert lower(make("batchnorm", "BCSS", "float64"), "cuda").acc_type == "double"
    with pytest.raises(NormgenError, match="not supported by the c target"):
        lower(bn, "c")
    c = lower(make("batchnorm", "BCSS", "float32"), "c")
    assert (c.ctype, c.acc_type) == ("float", "double")  # the C target keeps double accumulation
    with pytest.raises(NormgenError, match="lowered for the cuda target"):
        derive(c)


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_launch_shapes_cover_every_statistic(kind, fmt):
    cp = _cp(make(kind, fmt))
    for batch in (1, 2, 7) if "B" in fmt else (1,):
        for ws in (False, True):
            launches = cp.launches(cp.reduce_role, batch, ws)
            parts = cp.parts(batch, ws)
            assert len(launches) == (1 if parts == 1 else 3)
            lay = cp.layout
            assert launches[0].grid == lay.grid(batch, parts)
            # the statistics times their count is every element
            assert lay.stats.value(batch) * lay.count.value(batch) == cp.plan.elements.value(batch)
            assert (cp.workspace_size(batch) == 0) == (cp.parts(batch) == 1)
            for L in launches:
                assert 1 <= L.block[0] * L.block[1] <= 1024 and L.grid >= 1


def test_split_decisions_for_benchmark_shapes():
    """The workloads of issue 3 take the paths the docs say."""
    ln = _cp(LayerNorm(name="ln", format="BC", shape=[4096], dtype="float16"))
    assert ln.segments.cached and ln.parts(4096) == 1
    assert ln.bytes_moved("predict", 4096)["actual"] == ln.bytes_moved("predict", 4096)["minimum"]
    odd = _cp(LayerNorm(name="ln", format="BC", shape=[2041], dtype="float16"))
    assert odd.segments.vec == 1 and odd.segments.cached
    bn = _cp(BatchNorm(name="bn", format="BCSS", shape=[256, 56, 56], dtype="float32"))
    assert bn.affine.mode == "uniform" and bn.parts(32) > 1 and bn.workspace_size(32) > 0
    nhwc = _cp(BatchNorm(name="bn", format="BSSC", shape=[56, 56, 256], dtype="float16"))
    assert nhwc.affine.mode == "consecutive" and nhwc.family == "columns" and nhwc.parts(32) > 1
    gn = _cp(GroupNorm(name="gn", format="BSSC", shape=[64, 64, 320], num_groups=32, dtype="float16"))
    assert gn.family == "columns" and gn.parts(2) > 1
    inn = _cp(InstanceNorm(name="inn", format="BCSS", shape=[64, 128, 128]))
    assert inn.parts(16) == 1  # 1024 statistics fill the GPU


def test_output_is_byte_identical_and_has_provenance():
    layer = make("groupnorm", "BSSC", "float16")
    a, b = emit(layer, "cuda"), emit(layer, "cuda")
    assert a == b and set(a) == {f"{layer.name}.cuh", f"{layer.name}.cu"}
    for text in a.values():
        assert text.startswith("/*\n * CUDA") and "Generated by normgen" in text and "num_groups" in text
    assert 'extern "C" __global__' in a[f"{layer.name}.cu"]


def test_runtime_params_take_a_params_struct():
    layer = make("batchnorm", "BCSS", param_storage="runtime")
    cp = _cp(layer)
    assert cp.runtime_params and cp.param_arrays == {}
    assert all(f.args[0] == f"const {layer.name}_params *params" for f in cp.launchers)
    for role in ("predict", "train_forward"):
        for ws in (False, True):
            for L in cp.launches(role, 2, ws):
                assert (L.args[0] == "params") == (not L.kernel.endswith(("_partial", "_finalize")))


#: Run-time parameters (a device params struct). Their training half (backward, update) is tested
#: in tests/test_cuda_training.py.
RUNTIME_LAYERS = [
    LayerNorm(name="rt_ln", format="BTC", shape=[5, 12], param_storage="runtime", epsilon=1e-6),
    BatchNorm(name="rt_bn", format="BCSS", shape=[3, 8, 8], param_storage="runtime", dtype="float16",
              scale=[1.0, 0.5, 2.0], offset=[0.0, 0.1, -0.1], trained_mean=[0.5, 0.0, -1.0],
              trained_variance=[1.0, 4.0, 0.25]),
    GroupNorm(name="rt_gn", format="BSSC", shape=[4, 4, 6], num_groups=3, param_storage="runtime",
              scale=np.linspace(0.5, 1.5, 6), offset=np.linspace(-0.5, 0.5, 6), dtype="bfloat16"),
    InstanceNorm(name="rt_in", format="SBSC", shape=[3, 4, 5], param_storage="runtime", dtype="float64",
                 scale=np.linspace(0.5, 1.5, 5)),
    # scale only, the offset a fixed __device__ array; per element; batch norm without an offset
    # or without any affine (its struct holds the trained statistics only)
    make("rmsnorm", "BTC", "float16", name="rt_rms", param_storage="runtime"),
    make("layernorm", "BCSS", "float32", name="rt_ln_elem", shape=[12, 5, 4], operation_dimension="spatial-channel",
         affine="element", param_storage="runtime"),
    make("rmsnorm", "BTC", "float64", name="rt_rms_elem", operation_dimension="batch-excluded", affine="element",
         bias=True, param_storage="runtime"),
    make("batchnorm", "BSSC", "float32", name="rt_bn_nobias", bias=False, param_storage="runtime"),
    make("batchnorm", "BCSS", "float16", name="rt_bn_none", shape=[6, 8, 8], affine="none", param_storage="runtime"),
]

#: RMSNorm over its statistic domains and layout families, and the affine options (per element,
#: none, without offset) over the kinds that take them, embedded.
AFFINE_LAYERS = [
    make("rmsnorm", "BCSS", "float32", name="rms_chw_sc", operation_dimension="spatial-channel"),
    make("rmsnorm", "BTC", "float64", name="rms_btc_be", operation_dimension="batch-excluded"),
    make("rmsnorm", "SBSTC", "float32", name="rms_generic", shape=[3, 4, 2, 12], operation_dimension="spatial-channel"),
    make("rmsnorm", "CB", "float32", name="rms_cb", shape=[6]),  # rows of `batch`: columns
    make("rmsnorm", "BC", "float64", name="rms_long", shape=[16500]),  # too long for registers
    make("rmsnorm", "BSSC", "bfloat16", name="rms_bias", bias=True),
    make("layernorm", "BCSS", "float32", name="ln_elem_sc", shape=[12, 5, 4], operation_dimension="spatial-channel",
         affine="element"),
    make("layernorm", "BCSS", "float16", name="ln_elem_co", shape=[12, 5, 4], operation_dimension="channel-only",
         affine="element", bias=False),
    make("layernorm", "BTC", "bfloat16", name="ln_elem_be", operation_dimension="batch-excluded", affine="element",
         bias=False),
    make("rmsnorm", "BSSC", "float32", name="rms_elem_sc", operation_dimension="spatial-channel", affine="element"),
    make("rmsnorm", "BTC", "float64", name="rms_elem_be", operation_dimension="batch-excluded", affine="element",
         bias=True),
    make("layernorm", "BTC", "float32", name="ln_none", affine="none"),
    make("groupnorm", "BSSC", "float16", name="gn_none", affine="none"),
    make("instancenorm", "BCSS", "bfloat16", name="in_none", affine="none"),
    make("instancenorm", "SBSC", "float64", name="in_none_generic", affine="none"),
    make("batchnorm", "BCSS", "float32", name="bn_none", shape=[6, 8, 8], affine="none"),  # segments
    make("batchnorm", "BSSC", "float16", name="bn_none_nhwc", affine="none"),
    make("batchnorm", "BSSC", "float32", name="bn_nobias", bias=False),
    make("batchnorm", "TBC", "float64", name="bn_nobias_tbc", bias=False),
]


# ---- 2. nvcc compile checks ---------------------------------------------------------------------
def _compile_grid():
    """kinds x layouts x dtypes as a covering array: every (layout, dtype) pair, each with a
    different kind, so that every (kind, layout) and (kind, dtype) pair occurs too (the whole
    product with NORMGEN_CUDA_FULL_GRID=1; nvcc takes ~3 s per layer for both architectures)."""
    if os.environ.get("NORMGEN_CUDA_FULL_GRID") == "1":
        layers = [make(k, f, d) for k in KINDS for f in FORMATS for d in DTYPES]
    else:
        layers = [make(KINDS[(i + j) % len(KINDS)], f, d) for i, f in enumerate(FORMATS) for j, d in enumerate(DTYPES)]
    # RMSNorm over every layout, the dtypes in turn
    layers += [make("rmsnorm", f, DTYPES[i % len(DTYPES)]) for i, f in enumerate(FORMATS)]
    # odd sizes: hidden 2041, prime channel counts, one-element statistics
    layers += [
        LayerNorm(name="ln_2041_f16", format="BC", shape=[2041], dtype="float16"),
        LayerNorm(name="ln_2041_bf16", format="BTC", shape=[3, 2041], dtype="bfloat16"),
        BatchNorm(name="bn_prime", format="BSSC", shape=[7, 7, 2039], dtype="float16"),
        GroupNorm(name="gn_wide", format="BSSC", shape=[4, 4, 2046], num_groups=31, dtype="float16"),
        InstanceNorm(name="in_point", format="BC", shape=[5]),
        GroupNorm(name="gn_chw_all", format="BCSS", shape=[6, 3, 3], num_groups="allchannels", dtype="float64"),
    ]
    return layers + RUNTIME_LAYERS + AFFINE_LAYERS + DYN_LAYERS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every layer of the grid compiled by nvcc in batches (both architectures per call, two
    calls at a time): {layer name: (return code, stderr, exported symbols)}."""
    if NVCC is None:
        pytest.skip("nvcc is not installed (CUDA toolkit missing)")
    root = tmp_path_factory.mktemp("nvcc")
    layers = _compile_grid()
    for layer in layers:
        for fname, text in emit(layer, "cuda").items():
            (root / fname).write_text(text)
    size = -(-len(layers) // 4)
    chunks = [layers[i:i + size] for i in range(0, len(layers), size)]

    def build(i, chunk):
        unit = root / f"unit{i}.cu"
        unit.write_text("".join(f'#include "{layer.name}.cu"\n' for layer in chunk))
        obj = root / f"unit{i}.o"
        cmd = [NVCC, "-std=c++17", "-O0", "-gencode", "arch=compute_80,code=sm_80",
               "-gencode", "arch=compute_90,code=sm_90", "-Werror", "all-warnings",
               "-Xcompiler", "-Wall,-Wextra,-Werror", "-c", str(unit), "-o", str(obj)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        syms: set[str] = set()
        if proc.returncode == 0:
            nm = subprocess.run(["nm", "-g", "--defined-only", str(obj)], capture_output=True, text=True)
            syms = {line.split()[-1] for line in nm.stdout.splitlines() if " T " in line}
        return {layer.name: (proc.returncode, proc.stderr, syms) for layer in chunk}

    out: dict = {}
    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        for result in pool.map(lambda ic: build(*ic), enumerate(chunks)):
            out.update(result)
    return layers, out


@needs_nvcc
def test_nvcc_compiles_every_layer_warning_free(compiled):
    layers, results = compiled
    failures = {name: err for name, (rc, err, _) in results.items() if rc}
    assert not failures, next(iter(failures.values()))[:4000]
    for layer in layers:
        cp = _cp(layer)
        syms = results[layer.name][2]
        want = {f.name for f in cp.launchers} | set(cp.kernels) | {f"{layer.name}_workspace_size"}
        if cp.runtime_params:
            want.add(f"{layer.name}_params_init")
        assert want <= syms, f"{layer.name}: missing {sorted(want - syms)}"


@needs_nvcc
def test_benchmark_kernels_do_not_spill(tmp_path):
    """The CUDA benchmark workloads (benchmarks/cuda.toml) compiled at -O3 for sm_90: ptxas
    reports every kernel, none with a register spill (register-cached rows stay in registers,
    within each kernel's __launch_bounds__)."""
    import re

    from normgen.description.spec import load_spec

    layers = load_spec(Path(__file__).parent.parent / "benchmarks" / "cuda.toml")
    for layer in layers:
        for fname, text in emit(layer, "cuda").items():
            (tmp_path / fname).write_text(text)
    halves = [layers[0::2], layers[1::2]]

    def ptxas(i):
        unit = tmp_path / f"unit{i}.cu"
        unit.write_text("".join(f'#include "{layer.name}.cu"\n' for layer in halves[i]))
        cmd = [NVCC, "-std=c++17", "-O3", "-arch=sm_90", "-cubin", "-Xptxas", "-v", str(unit),
               "-o", str(tmp_path / f"unit{i}.cubin")]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)

    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(ptxas, range(2)))
    spills, seen = {}, set()
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[:4000]
        props = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                           r"(\d+) bytes spill loads", proc.stderr)
        for name, _, stores, loads in props:
            seen.add(name)
            if int(stores) or int(loads):
                spills[name] = (int(stores), int(loads))
    want = {k for layer in layers for k in _cp(layer).kernels}
    assert want <= seen, f"ptxas did not report {sorted(want - seen)[:5]}"
    assert not spills, f"kernels spilling registers (stores, loads bytes): {spills}"


# ---- 3. CPU emulation ---------------------------------------------------------------------------
class Emulator:
    """Builds emulator binaries of generated layers (one per layer, with a precompiled emu.h)."""

    def __init__(self, root: Path):
        self.root = root
        self.flags = ["-std=c++17", "-O1", "-w", f"-I{root}", f"-I{CUDA_INCLUDE}"]
        shutil.copy(EMU / "emu.h", root / "emu.h")
        shutil.copy(EMU / "cuda_runtime.h", root / "cuda_runtime.h")
        subprocess.run([GXX, *self.flags, "-x", "c++-header", str(root / "emu.h"), "-o", str(root / "emu.h.gch")],
                       check=True)
        subprocess.run([GXX, *self.flags, "-include", "emu.h", "-c", str(EMU / "emu.cpp"), "-o", str(root / "emu.o")],
                       check=True)

    def build(self, layer) -> Path:
        """Compile the layer's .cu with the driver into one emulator executable (cached by name)."""
        d = self.root / layer.name
        exe = d / "run"
        if exe.exists():
            return exe
        d.mkdir(exist_ok=True)
        for fname, text in emit(layer, "cuda").items():
            (d / fname).write_text(text)
        train = ["-DHAS_TRAIN"] if layer.kind == "batchnorm" else []
        if layer.param_storage == "runtime":
            train.append("-DRUNTIME_PARAMS")
        cmd = [GXX, *self.flags, f"-I{d}", "-include", "emu.h", f"-DLAYER={layer.name}",
               f'-DLAYER_SOURCE="{layer.name}.cu"', *train, str(EMU / "driver.cpp"), str(self.root / "emu.o"),
               "-rdynamic", "-ldl", "-o", str(d / "run.tmp")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[:4000]
        os.replace(d / "run.tmp", exe)
        return exe

    def build_many(self, layers) -> None:
        """Build several layers, two compilers at a time."""
        with cf.ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(self.build, layers))

    def run(self, layer, mode, x=None, batch=1, *, offset=0, inplace=False, rm=None, rv=None):
        exe = self.build(layer)
        work = exe.parent
        if x is not None:
            to_storage(x, layer.dtype).tofile(work / "x.bin")
        if rm is not None:
            to_storage(rm, layer.dtype).tofile(work / "rm.bin")
            to_storage(rv, layer.dtype).tofile(work / "rv.bin")
        proc = subprocess.run([str(exe), mode, str(batch), str(offset), str(int(inplace)), str(work)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        info = {"launches": [], "stdout": proc.stdout}
        for line in proc.stdout.splitlines():
            parts = line.split()
            if parts[0] == "launch":
                info["launches"].append((parts[1], int(parts[2]), (int(parts[3]), int(parts[4]), 1)))
            elif len(parts) == 2:
                info[parts[0]] = int(parts[1])
        if x is not None and mode in ("predict", "predict_ws", "train_forward", "train_forward_ws"):
            sd = storage_dtype(layer.dtype)
            info["y"] = from_storage(np.fromfile(work / "y.bin", sd), layer.dtype).astype(np.float64).reshape(x.shape)
            if rm is not None:
                info["rm"] = from_storage(np.fromfile(work / "rm_out.bin", sd), layer.dtype).astype(np.float64)
                info["rv"] = from_storage(np.fromfile(work / "rv_out.bin", sd), layer.dtype).astype(np.float64)
        return info


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulator, with the layers of the unpatched tests built up front (in parallel)."""
    if GXX is None or CUDA_INCLUDE is None:
        pytest.skip("the CPU emulator needs g++ and the CUDA headers (cuda_fp16.h)")
    emu = Emulator(tmp_path_factory.mktemp("emu"))
    emu.build_many([make(*case) for case in EMU_GRID] + ODD_LAYERS + VARIANT_LAYERS
                   + [_large_mean_layer(k, f) for k, f in LARGE_MEAN] + [_error_layer(k) for k in ALL_KINDS])
    return emu


@pytest.fixture
def small_parts(monkeypatch):
    """Split thresholds low enough that the small test tensors take the split (workspace) path."""
    monkeypatch.setattr(cpm, "FILL_BLOCKS", 10**9)
    monkeypatch.setattr(cpm, "SPLIT_MIN_UNITS", 6)
    monkeypatch.setattr(cpm, "PART_MIN_UNITS", 3)
    monkeypatch.setattr(cpm, "PART_MIN_ROWS", 1)


def _close(layer, got, want, what):
    tol = TOL[layer.dtype]
    err = np.abs(got - want) - tol * np.abs(want)
    assert np.all(err <= tol), f"{layer.name} {what}: max |err| {np.abs(got - want).max():.3g} (tol {tol})"


def _data(layer, batch, seed=0, mean=0.5, spread=2.0):
    rng = np.random.default_rng(seed)
    x = mean + spread * rng.standard_normal(reference.full_shape(layer, batch))
    return round_to(x, layer.dtype)


def _check_launches(layer, info, role, batch, ws):
    cp = _cp(layer)
    want = [(L.kernel, L.grid, L.block) for L in cp.launches(role, batch, ws)]
    assert info["launches"] == want
    if ws:
        assert info["workspace"] == cp.workspace_size(batch)


def _emulate(emulator, layer, batch, *, ws, seed=0, offset=0, inplace=False, **data):
    x = _data(layer, batch, seed, **data)
    role = "train_forward" if layer.kind == "batchnorm" else "predict"
    mode = role + ("_ws" if ws else "")
    if layer.kind == "batchnorm":
        rm, rv = round_to(layer.trained_mean_values, layer.dtype), round_to(layer.trained_variance_values, layer.dtype)
        info = emulator.run(layer, mode, x, batch, offset=offset, inplace=inplace, rm=rm, rv=rv)
        if _cp(layer).layout.count.value(batch) < 2 and layer.running_variance == "unbiased":
            assert info["rc"] == 3 and info["launches"] == []  # one value per channel
            return info
        assert info["rc"] == 0
        y, nrm, nrv = reference.train_forward(layer, x, rm, rv)
        _close(layer, info["rm"], round_to(nrm, layer.dtype), "running_mean")
        _close(layer, info["rv"], round_to(nrv, layer.dtype), "running_var")
    else:
        info = emulator.run(layer, mode, x, batch, offset=offset, inplace=inplace)
        assert info["rc"] == 0
        y = reference.predict(layer, x)
    _close(layer, info["y"], y, mode)
    _check_launches(layer, info, role, batch, ws)
    if ws and info.get("small_workspace") is not None:
        assert info["small_workspace"] == 5
    return info


#: Every kind x layout in float32; every kind x other dtype, NCHW and NHWC alternating.
EMU_GRID = [(k, f, "float32") for k in ALL_KINDS for f in FORMATS] + [
    (k, ("BCSS", "BSSC")[(i + j) % 2], d) for i, k in enumerate(ALL_KINDS)
    for j, d in enumerate(("float64", "float16", "bfloat16"))
]


@needs_emu
@pytest.mark.parametrize("kind,fmt,dtype", EMU_GRID, ids=lambda v: v)
def test_emulated_matches_reference(emulator, kind, fmt, dtype):
    layer = make(kind, fmt, dtype)
    for batch in (1, 3) if "B" in fmt else (1,):
        _emulate(emulator, layer, batch, ws=False, seed=batch)
    _emulate(emulator, layer, 2 if "B" in fmt else 1, ws=True, seed=5)
    if kind == "batchnorm":
        batch = 2 if "B" in fmt else 1
        x = _data(layer, batch, 3)
        info = emulator.run(layer, "predict", x, batch)
        assert info["rc"] == 0
        _close(layer, info["y"], reference.predict(layer, x), "predict")
        _check_launches(layer, info, "predict", batch, False)


def _case_id(v) -> str:
    if isinstance(v, dict):
        return "-".join(f"{k}={w}" for k, w in v.items()) or "default"
    return str(v) if v is None or isinstance(v, str) else "x".join(map(str, v))


@needs_emu
@pytest.mark.parametrize("kind,fmt,dtype,shape,kw", [
    ("batchnorm", "BCSS", "float32", None, {}), ("batchnorm", "BCSS", "float16", [6, 8, 8], {}),
    ("batchnorm", "BSSC", "float16", None, {}), ("batchnorm", "TBC", "float64", None, {}),
    ("groupnorm", "BSSC", "float32", [14, 14, 12], {}), ("groupnorm", "BCSS", "bfloat16", None, {}),
    ("layernorm", "BTC", "float32", [2, 96], {}), ("layernorm", "BCSS", "float16", None, {}),
    ("instancenorm", "BSSC", "float32", [14, 14, 12], {}), ("instancenorm", "BCSSS", "float64", None, {}),
    ("layernorm", "SSC", "float32", None, {}),
    ("rmsnorm", "BTC", "float32", [2, 96], {}), ("rmsnorm", "BCSS", "float16", [64, 8, 16], {}),
    ("rmsnorm", "BCSS", "float64", None, {"operation_dimension": "spatial-channel"}),
    ("layernorm", "BCSS", "float32", None, {"operation_dimension": "spatial-channel", "affine": "element"}),
    ("rmsnorm", "BCSS", "bfloat16", [64, 8, 16], {"affine": "element", "bias": True}),  # columns, per element
    ("batchnorm", "BCSS", "float32", [6, 8, 8], {"affine": "none"}),
    ("groupnorm", "BSSC", "float16", [14, 14, 12], {"bias": False}),
], ids=_case_id)
def test_emulated_split_path(emulator, small_parts, kind, fmt, dtype, shape, kw):
    """The partial/finalize/apply kernels with a workspace, with thresholds lowered so that
    small tensors split; also misaligned (scalar loads) and in place."""
    extra = {"shape": shape} if shape else {}
    tag = "".join(f"_{str(v)[:2]}" for v in kw.values())
    layer = make(kind, fmt, dtype, name=f"split_{kind[:2]}_{fmt.lower()}_{dtype}_{len(extra)}{tag}", **extra, **kw)
    cp = _cp(layer)
    batch = next((b for b in range(3, 65) if cp.parts(b) > 1), 1) if "B" in fmt else 1
    assert cp.parts(batch) > 1, "the test shape should split"
    _emulate(emulator, layer, batch, ws=True, seed=1)
    _emulate(emulator, layer, batch, ws=True, seed=2, offset=1)
    _emulate(emulator, layer, batch, ws=True, seed=3, inplace=True)


LARGE_MEAN = [("layernorm", "BTC"), ("groupnorm", "BSSC"), ("instancenorm", "BCSS"), ("batchnorm", "BSSC"),
              ("batchnorm", "BCSS")]


def _large_mean_layer(kind, fmt):
    return make(kind, fmt, "float32", name=f"big_{kind[:2]}_{fmt.lower()}")


def _error_layer(kind):
    return make(kind, "BSSC", name=f"err_{kind[:2]}")


@needs_emu
@pytest.mark.parametrize("kind,fmt", LARGE_MEAN)
def test_emulated_large_mean(emulator, kind, fmt):
    """x = 1e4 + N(0, 1e-2) in float32: the shift by x0 keeps the variance accurate."""
    layer = _large_mean_layer(kind, fmt)
    _emulate(emulator, layer, 3, ws=False, mean=1e4, spread=1e-2)
    _emulate(emulator, layer, 3, ws=True, mean=1e4, spread=1e-2, seed=4)


ODD_LAYERS = [
    LayerNorm(name="odd_ln", format="BC", shape=[2041], dtype="float16"),
    GroupNorm(name="odd_gn", format="BSSC", shape=[3, 3, 35], num_groups=7, dtype="float32"),
    GroupNorm(name="odd_gn_chw", format="BCSS", shape=[35, 3, 3], num_groups=5, dtype="bfloat16"),
    BatchNorm(name="odd_bn", format="BSSC", shape=[3, 3, 37], dtype="float16"),
    InstanceNorm(name="odd_in", format="BC", shape=[5]),
    GroupNorm(name="odd_all", format="BSSC", shape=[4, 4, 6], num_groups="allchannels"),
    LayerNorm(name="odd_ln_chw", format="BCSS", shape=[3, 40, 7], operation_dimension="channel-only",
              dtype="float16"),
    BatchNorm(name="odd_bn_cb", format="CB", shape=[5]),  # B innermost: a run of `batch` per channel
    BatchNorm(name="odd_bn_scb", format="SCB", shape=[4, 3], dtype="float16"),  # segments of `batch`
    LayerNorm(name="odd_ln_cb", format="CB", shape=[6], operation_dimension="channel-only"),  # rows of `batch`
    InstanceNorm(name="odd_in_tbc", format="TBC", shape=[9, 5], dtype="bfloat16"),  # statistics per row: B x C
]


@needs_emu
@pytest.mark.parametrize("layer", ODD_LAYERS, ids=lambda layer: layer.name)
def test_emulated_odd_sizes(emulator, layer):
    _emulate(emulator, layer, 2, ws=False)
    _emulate(emulator, layer, 2, ws=True, seed=1, offset=1)


#: Run-time parameters, RMSNorm and the affine options.
VARIANT_LAYERS = RUNTIME_LAYERS + AFFINE_LAYERS


@needs_emu
@pytest.mark.parametrize("layer", VARIANT_LAYERS, ids=lambda layer: layer.name)
def test_emulated_variants(emulator, layer):
    """param_storage="runtime": the kernels read the device params struct (NAME_params_init's
    values here; there are no embedded parameter arrays to fall back on, only the fixed constants
    of a scale or offset the layer lacks). RMSNorm's statistics; per-element, absent and
    offset-free affines, embedded and run-time."""
    cu = emit(layer, "cuda")[f"{layer.name}.cu"]
    arrays = set(re.findall(r"static __device__ __align__\(16\) const acc_t (\w+)\[", cu))
    want = set(_cp(layer).plan.constants)
    if layer.param_storage == "embedded":
        want |= {"scale", "offset"} | ({"fold_a", "fold_b"} if layer.kind == "batchnorm" else set())
    assert arrays == want
    _emulate(emulator, layer, 2, ws=False)
    _emulate(emulator, layer, 3, ws=True, seed=1)
    if layer.kind == "batchnorm":
        x = _data(layer, 2, 3)
        info = emulator.run(layer, "predict", x, 2)
        assert info["rc"] == 0
        _close(layer, info["y"], reference.predict(layer, x), "predict")


@needs_emu
@pytest.mark.parametrize("kind,fmt,shape", [("batchnorm", "BCSS", [12, 5, 4]), ("batchnorm", "BCSS", [6, 8, 8]),
                                            ("groupnorm", "BSSC", [14, 14, 12]), ("layernorm", "BTC", [2, 96]),
                                            ("instancenorm", "SBSC", [5, 4, 12]), ("rmsnorm", "BCSS", [128, 16, 16]),
                                            ("rmsnorm", "BSSC", [5, 4, 96])])
def test_launchers_launch_what_cuda_plan_says(emulator, small_parts, kind, fmt, shape):
    """For batches 1..40 the rendered launchers and CudaPlan agree on every launch and
    workspace size (with the split thresholds lowered, so both paths occur)."""
    layer = make(kind, fmt, shape=shape, name=f"shape_{kind[:2]}_{fmt.lower()}_{shape[-1]}")
    info = emulator.run(layer, "shapes", batch=40)
    cp = _cp(layer)
    blocks = info["stdout"].split("batch ")[1:]
    assert len(blocks) == 40
    saw_split = False
    for b, text in enumerate(blocks, start=1):
        lines = text.splitlines()
        assert lines[0] == f"{b} workspace {cp.workspace_size(b)}"
        assert lines[1] == "rcs 0 0 0"
        got = [(p[1], int(p[2]), (int(p[3]), int(p[4]), 1)) for p in (ln.split() for ln in lines[2:])]
        want = [(L.kernel, L.grid, L.block) for L in cp.launches("predict", b, False)]
        if cp.affine:
            want += [(L.kernel, L.grid, L.block) for L in cp.launches("train_forward", b, False)]
        want += [(L.kernel, L.grid, L.block) for L in cp.launches(cp.reduce_role, b, True)]
        assert got == want, b
        saw_split |= cp.parts(b) > 1
    assert saw_split or cp.family == "generic"


@needs_emu
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_error_codes(emulator, kind):
    info = emulator.run(_error_layer(kind), "errors")
    assert (info["null"], info["batch"], info["launch_error"], info["workspace_size0"]) == (1, 2, 4, 0)


# ---- 4. GPU -------------------------------------------------------------------------------------
def _gpu_reason() -> str | None:
    try:
        import pycuda.driver as drv
    except ImportError:
        return "pycuda is not installed"
    try:
        drv.init()
        if drv.Device.count() == 0:
            return "no CUDA device"
    except Exception as exc:  # noqa: BLE001 - any driver failure means no usable GPU
        return f"no usable CUDA device ({exc})"
    if NVCC is None:
        return "nvcc is not installed"
    return None


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"GPU tests: {GPU_REASON}")


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ("BC", "BCSS", "BSSC", "TBC", "BTC", "BCSSS", "BUC", "SSC", "SBSC"))
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_gpu_matches_reference(kind, fmt, dtype):
    from normgen import build

    layer = make(kind, fmt, dtype, name=f"gpu_{kind[:2]}_{fmt.lower()}_{dtype}")
    for workspace in (True, False):
        cl = build(layer, target="cuda", workspace=workspace)
        for batch in (1, 4) if "B" in fmt else (1,):
            x = _data(layer, batch, seed=batch)
            if kind == "batchnorm":
                y = np.asarray(cl.predict(x), dtype=np.float64)
                _close(layer, y, reference.predict(layer, x), "predict")
                rm, rv = cl.running_mean.astype(np.float64), cl.running_var.astype(np.float64)
                y = np.asarray(cl.train_forward(x), dtype=np.float64)
                want, nrm, nrv = reference.train_forward(layer, x, rm, rv)
                _close(layer, y, want, "train_forward")
                _close(layer, cl.running_mean.astype(np.float64), round_to(nrm, dtype), "running_mean")
            else:
                y = np.asarray(cl.predict(x), dtype=np.float64)
                _close(layer, y, reference.predict(layer, x), "predict")


@needs_gpu
@pytest.mark.parametrize("layer", VARIANT_LAYERS, ids=lambda layer: layer.name)
def test_gpu_variants(layer):
    """RMSNorm's other statistic domains and the affine options on a GPU, both kernel paths."""
    from normgen import build

    batch = 3 if layer.fmt.has_batch else 1
    for workspace in (True, False):
        cl = build(layer, target="cuda", workspace=workspace)
        x = _data(layer, batch, seed=7)
        _close(layer, np.asarray(cl.predict(x), dtype=np.float64), reference.predict(layer, x), "predict")
        if layer.kind == "batchnorm":
            y = np.asarray(cl.train_forward(x), dtype=np.float64)
            _close(layer, y, reference.train_forward(layer, x)[0], "train_forward")


@needs_gpu
def test_gpu_arrays_in_place_and_timing():
    import pycuda.gpuarray as gpuarray

    from normgen.targets.cuda.module import CudaLayer

    layer = LayerNorm(name="gpu_ln_big", format="BC", shape=[4096], dtype="float16")
    cl = CudaLayer(layer)
    x = _data(layer, 64)
    xg = gpuarray.to_gpu(to_storage(x, "float16"))
    yg = cl.predict(xg)
    assert isinstance(yg, gpuarray.GPUArray)
    _close(layer, yg.get().astype(np.float64), reference.predict(layer, x), "gpuarray")
    cl.predict(xg, out=xg)  # in place
    _close(layer, xg.get().astype(np.float64), reference.predict(layer, x), "in place")
    assert cl.time("predict", xg, repeat=3) > 0
    assert cl.bytes_moved("predict", 64)["minimum"] == 2 * 64 * 4096 * 2


@needs_gpu
def test_gpu_deterministic_and_large_mean():
    from normgen.targets.cuda.module import CudaLayer

    layer = BatchNorm(name="gpu_bn_det", format="BCSS", shape=[64, 56, 56])
    cl = CudaLayer(layer)
    x = _data(layer, 16, mean=1e4, spread=1e-2)
    y1, y2 = cl.train_forward(x), cl.train_forward(x)
    assert np.array_equal(y1, y2)
    want, _, _ = reference.train_forward(layer, x)
    _close(layer, y1.astype(np.float64), want, "large mean")


# ---- pycuda marshalling, without a GPU ----------------------------------------------------------

def _kernel_params(cu_text: str) -> dict[str, list[tuple[str, str]]]:
    """extern "C" __global__ kernels of a .cu → [(C type, name)] of their parameters."""
    import re

    out = {}
    for m in re.finditer(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)\(([^)]*)\)', cu_text):
        params = []
        for p in m.group(2).split(","):
            p = p.strip()
            name = re.findall(r"\w+$", p)[0]
            params.append((p[: -len(name)].strip(), name))
        out[m.group(1)] = params
    return out


@pytest.mark.parametrize("kind,fmt", [("batchnorm", "BCSS"), ("batchnorm", "BSSC"), ("groupnorm", "BSSC"),
                                      ("layernorm", "BTC"), ("instancenorm", "SBSC"), ("rmsnorm", "BCSS"),
                                      ("rmsnorm", "BTC")])
def test_kernel_parameters_match_launch_arguments(small_parts, kind, fmt):
    """What CudaLayer passes (CudaPlan.launches' argument names, 'P' or 'i') is what each kernel takes."""
    shape = {"BSSC": [14, 14, 12], "BTC": [2, 96]}.get(fmt)
    if kind == "rmsnorm" and fmt == "BCSS":
        shape = [128, 16, 16]  # channel-only: columns with enough rows (channels) to split
    layer = make(kind, fmt, shape=shape, name=f"sig_{kind[:2]}_{fmt.lower()}")
    cp = _cp(layer)
    kernels = _kernel_params(emit(layer, "cuda")[f"{layer.name}.cu"])
    assert set(cp.kernels) <= set(kernels)
    seen = set()
    for batch in (1, 2, 3, 30):
        for ws in (False, True):
            for role in ("predict", cp.reduce_role):
                for L in cp.launches(role, batch, ws):
                    params = kernels[L.kernel]
                    names = [{"ws": "workspace"}.get(n, n) for _, n in params]
                    assert names == list(L.args), L.kernel
                    for (ctype, _), arg in zip(params, L.args, strict=True):
                        assert ("*" in ctype) == (arg not in ("batch", "parts")), (L.kernel, ctype, arg)
                    seen.add(L.kernel)
    assert seen == set(cp.kernels) or cp.family == "generic"


class _FakeArray:
    def __init__(self, a):
        self.a = np.array(a)
        self.shape, self.dtype, self.gpudata = self.a.shape, self.a.dtype, id(self)

    def get(self):
        return self.a.copy()

    def set(self, a):
        self.a[...] = a


def _fake_pycuda(calls):
    class Fn:
        def __init__(self, name):
            self.name = name

        def prepare(self, sig):
            self.sig = sig

        def prepared_async_call(self, grid, block, stream, *args):
            assert len(args) == len(self.sig)
            for t, a in zip(self.sig, args, strict=True):
                kind = {"i": np.int32, "Q": np.uint64}.get(t)
                assert isinstance(a, kind) if kind else not isinstance(a, np.integer)
            calls.append((self.name, grid, block, self.sig, args))

    class Module:
        def get_function(self, name):
            return Fn(name)

    class Ctx:
        @staticmethod
        def get_device():
            class Dev:
                def compute_capability(self):
                    return (8, 0)
            return Dev()

        @staticmethod
        def synchronize():
            pass

    class FakeEvent:
        def record(self):
            pass

        def synchronize(self):
            pass

        def time_till(self, other):
            return 1.0

    class Drv:
        Context = Ctx

        @staticmethod
        def module_from_file(path):
            assert Path(path).stat().st_size > 0
            return Module()

        @staticmethod
        def mem_alloc(n):
            return ("alloc", n)

        @staticmethod
        def memcpy_htod(dst, src):
            assert dst[1] == src.nbytes

        Event = FakeEvent

    class GA:
        GPUArray = _FakeArray

        @staticmethod
        def to_gpu(a):
            return _FakeArray(a)

        @staticmethod
        def empty_like(a):
            return _FakeArray(np.zeros_like(a.a))

    return Drv, GA


@needs_nvcc
def test_cuda_layer_marshalling_without_gpu(monkeypatch, tmp_path):
    """CudaLayer (with pycuda faked) compiles a cubin with nvcc and issues exactly the launches of
    CudaPlan, with pointer and int32 arguments in kernel order, for NumPy and GPU-array inputs."""
    import normgen.targets.cuda.module as nc

    monkeypatch.setenv("NORMGEN_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(nc, "_pycuda", lambda: _fake_pycuda(calls))
    layer = BatchNorm(name="fake_bn", format="BSSC", shape=[12, 12, 8], dtype="bfloat16")
    cl = nc.CudaLayer(layer)
    assert cl.arch == "sm_80" and cl.cubin.exists()
    x = _data(layer, 3)
    assert np.array_equal(cl.quantize(x), x)  # _data is already rounded to bfloat16
    y = cl.predict(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert [c[0] for c in calls] == [L.kernel for L in cl.cp.launches("predict", 3)]
    calls.clear()
    cl.train_forward(x)
    assert [(c[0], c[1][0], c[2]) for c in calls] == [(L.kernel, L.grid, L.block) for L in cl.cp.launches("train_forward", 3)]
    calls.clear()
    xg = _FakeArray(to_storage(x, "bfloat16"))
    assert isinstance(cl.predict(xg), _FakeArray)
    assert cl.time("train_forward", xg, repeat=2, warmup=1) == pytest.approx(1.0 / 1e3 / 2)
    with pytest.raises(NormgenError, match="GPUArray input must be"):
        cl.predict(_FakeArray(x.astype(np.float32)))
    calls.clear()
    rt = nc.CudaLayer(RUNTIME_LAYERS[0])
    rt.set_params(scale=np.full(12, 2.0))
    assert rt.get_params()["scale"][0] == 2.0
    rt.predict(_data(RUNTIME_LAYERS[0], 2))
    assert all(c[3][0] == "P" for c in calls) and len(calls[0][3]) == 4  # params, x, y, batch
    # scale only (RMSNorm): the struct holds scale alone; per element: plan.channels values
    rms = nc.CudaLayer(next(la for la in RUNTIME_LAYERS if la.name == "rt_rms"))
    assert set(rms.get_params()) == {"scale"}
    with pytest.raises(NormgenError, match="has no parameter 'offset'"):
        rms.set_params(offset=np.zeros(12))
    elem = nc.CudaLayer(next(la for la in RUNTIME_LAYERS if la.name == "rt_ln_elem"))
    elem.set_params(scale=np.full((12, 5, 4), 2.0))
    assert elem.get_params()["scale"].shape == (240,)
    with pytest.raises(NormgenError, match="scale needs 240 values"):
        elem.set_params(scale=np.zeros(12))


# ---- 5. run-time sizes ----------------------------------------------------------------------------
#: Layers with run-time sizes over every kernel family, each with the sizes it is called at (1, and
#: sizes that are not multiples of the vector width; the largest split into parts with a workspace
#: where the family splits). One compiled file per layer serves every size.
DYN_CASES = [
    # batch-norm predict (affine, general: planes of h*w) and train_forward on segments of h*w
    (make("batchnorm", "BCSS", "float32", name="dyn_bn_nchw", shape=[6, "h", "w"]),
     [{"h": 1, "w": 1}, {"h": 3, "w": 5}, {"h": 50, "w": 47}]),
    # affine over channel vectors (NHWC: consecutive), columns over a run-time number of rows
    (make("batchnorm", "BSSC", "float16", name="dyn_bn_nhwc", shape=["h", "w", 16]),
     [{"h": 1, "w": 1}, {"h": 5, "w": 3}, {"h": 33, "w": 35}]),
    # segments of a fixed length (S = 48, vectorized), a run-time number of them (T x B)
    (make("batchnorm", "TBCS", "float64", name="dyn_bn_tbcs", shape=["t", 6, 48]),
     [{"t": 1}, {"t": 3}, {"t": 50}]),
    # rows of C over a run-time number of tokens: register-cached fused kernel
    (make("layernorm", "BTC", "float32", name="dyn_ln_btc", shape=["tokens", 96]), [{"tokens": n} for n in (1, 7, 50)]),
    (make("layernorm", "BTC", "float64", name="dyn_ln_btc64", shape=["tokens", 40], param_storage="runtime"),
     [{"tokens": n} for n in (1, 3, 11)]),
    (make("rmsnorm", "TBC", "float16", name="dyn_rms_tbc", shape=["t", 64]), [{"t": n} for n in (1, 5, 9)]),
    # segments of run-time length (instance/group norm planes): not cached, not vectorized
    (make("instancenorm", "BCSS", "bfloat16", name="dyn_in_bcss", shape=[5, "h", 7]), [{"h": n} for n in (1, 3, 9)]),
    (make("groupnorm", "BCSS", "float64", name="dyn_gn_bcss", shape=[6, "h", "w"], num_groups=2),
     [{"h": 1, "w": 1}, {"h": 2, "w": 5}, {"h": 7, "w": 3}]),
    (make("groupnorm", "BCSS", "float16", name="dyn_gn_bcss16", shape=[6, "h", "w"], num_groups=3),
     [{"h": 1, "w": 1}, {"h": 3, "w": 3}, {"h": 45, "w": 47}]),
    # columns: a run-time number of rows of C
    (make("groupnorm", "BSSC", "float64", name="dyn_gn_bssc", shape=["h", "w", 12], num_groups=3),
     [{"h": 1, "w": 1}, {"h": 3, "w": 5}, {"h": 6, "w": 7}]),
    (make("instancenorm", "BSSC", "float32", name="dyn_in_bssc", shape=["h", "w", 12]),
     [{"h": 1, "w": 1}, {"h": 5, "w": 3}, {"h": 40, "w": 33}]),
    # columns: rows of run-time length (layer norm over C of NCHW)
    (make("layernorm", "BCSS", "float16", name="dyn_ln_chw", shape=[16, "h", "w"], operation_dimension="channel-only"),
     [{"h": 1, "w": 1}, {"h": 3, "w": 5}, {"h": 7, "w": 9}]),
    (make("rmsnorm", "BCSS", "float32", name="dyn_rms_chw", shape=[8, "h", "w"]),
     [{"h": 1, "w": 1}, {"h": 2, "w": 3}, {"h": 5, "w": 7}]),
    # per-element affine over C, a run-time number of tokens
    (make("layernorm", "BTC", "float32", name="dyn_ln_elem", shape=["tokens", 24], affine="element"),
     [{"tokens": n} for n in (1, 2, 9)]),
    # generic: kept dimensions on both sides of a reduced one
    (make("groupnorm", "SBSC", "float64", name="dyn_gn_sbsc", shape=["s", 4, 6], num_groups=2),
     [{"s": n} for n in (1, 3, 5)]),
    (make("instancenorm", "SBSC", "float16", name="dyn_in_sbsc", shape=["s", 4, 12]), [{"s": n} for n in (1, 2, 5)]),
]
DYN_LAYERS = [layer for layer, _ in DYN_CASES]
DYN_BATCHES = (1, 2)


def test_runtime_sizes_cover_every_family_and_choose_safe_shapes():
    """Every family occurs with a dynamic extent; nothing vectorizes or caches in registers over
    a dynamic extent; the split decision follows the sizes (fused at small sizes, split at large)."""
    fams = {}
    for layer, sizes_list in DYN_CASES:
        cp = _cp(layer)
        assert cp.plan.sizes == layer.sizes
        fams.setdefault(cp.family, []).append(layer.name)
        if cp.affine:
            fams.setdefault("affine", []).append(layer.name)
            if cp.affine.inner.dynamic:
                assert cp.affine.mode == "general"
        if cp.segments:
            sg = cp.segments
            fams.setdefault("cached" if sg.cached else "fused", []).append(layer.name)
            assert not (sg.seg.dynamic and sg.vec > 1)
            assert not (sg.units.dynamic and sg.cached)
        if cp.columns:
            assert not (cp.columns.w.dynamic and cp.columns.vec > 1)
        parts = [cp.parts(b, True, s) for s in sizes_list for b in DYN_BATCHES]
        if layer.name in ("dyn_bn_nchw", "dyn_bn_nhwc", "dyn_gn_bcss16", "dyn_in_bssc"):
            assert parts[0] == 1 and max(parts) > 1, (layer.name, parts)
            fams.setdefault("split", []).append(layer.name)
    assert {"affine", "segments", "columns", "generic", "cached", "fused", "split"} <= set(fams), fams


def test_runtime_size_launch_shapes_need_the_sizes():
    cp = _cp(DYN_LAYERS[0])
    with pytest.raises(NormgenError, match="run-time size 'h'"):
        cp.launches("predict", 1)
    with pytest.raises(NormgenError, match="must be >= 1"):
        cp.launches("predict", 1, sizes={"h": 0, "w": 3})
    # the same grid formula at every size: the affine kernel's units are the elements / vec
    for h, w in ((1, 1), (3, 5), (50, 47)):
        (L,) = cp.launches("predict", 2, sizes={"h": h, "w": w})
        assert L.grid == max(1, min(-(-(2 * 6 * h * w // cp.affine.vec) // cpm.BLOCK), cpm.AFFINE_MAX_BLOCKS))
        assert L.args == ("x", "y", "batch", "h", "w")


def _dyn_data(layer, batch, sizes, seed=0):
    rng = np.random.default_rng(seed)
    x = 0.5 + 2.0 * rng.standard_normal(reference.full_shape(layer, batch, sizes))
    return round_to(x, layer.dtype)


class SizedEmu:
    """A layer with run-time sizes, its launchers called through ctypes from one emulator library
    (device pointers are host pointers there); the launches they make are read back from the
    emulator's record."""

    def __init__(self, lib, layer):
        import ctypes

        self.ct, self.lib, self.layer, self.cp = ctypes, lib, layer, _cp(layer)
        self.storage = storage_dtype(layer.dtype)
        lib.emu_launch_count.restype = ctypes.c_size_t
        lib.emu_launch_kernel.restype = ctypes.c_char_p
        lib.emu_launch_kernel.argtypes = [ctypes.c_size_t]
        lib.emu_launch_dim.restype = ctypes.c_uint
        lib.emu_launch_dim.argtypes = [ctypes.c_size_t, ctypes.c_int]
        for f in ("workspace_size", "backward_workspace_size"):
            getattr(lib, f"{layer.name}_{f}").restype = ctypes.c_size_t
        self.lead = ()
        if self.cp.runtime_params:
            acc = np.float64 if self.cp.A == "double" else np.float32
            self.params = np.zeros((len(layer.parameter_arrays()), layer.channels), acc)
            assert self.fn("params_init")(self.p(self.params)) == 0
            self.lead = (self.p(self.params),)

    def fn(self, role):
        return getattr(self.lib, f"{self.layer.name}_{role}")

    def p(self, a):
        return None if a is None else self.ct.c_void_p(a.ctypes.data)

    def store(self, a):
        return np.array(to_storage(a, self.layer.dtype), copy=True)

    def load(self, a):
        return from_storage(a, self.layer.dtype).astype(np.float64)

    def sizes(self, sizes):
        return [int(sizes[n]) for n in self.layer.sizes]

    def launches(self):
        lib = self.lib
        out = [(lib.emu_launch_kernel(i).decode(), lib.emu_launch_dim(i, 0),
                (lib.emu_launch_dim(i, 3), lib.emu_launch_dim(i, 4), 1)) for i in range(lib.emu_launch_count())]
        lib.emu_clear_launches()
        return out

    def workspace(self, batch, sizes):
        n = self.fn("workspace_size")(batch, *self.sizes(sizes))
        return np.zeros(n // 8 + 4, np.float64), n  # 16-byte aligned by NumPy

    def run(self, role, x, batch, sizes, ws, rm=None, rv=None):
        """(return code, y, launches) of one call of the launcher of ``role`` (``_ws`` with ``ws``)."""
        self.lib.emu_clear_launches()
        xs = self.store(x)
        y = np.zeros_like(xs)
        args = [*self.lead, self.p(xs), self.p(y), batch, *self.sizes(sizes)]
        if role == "train_forward":
            args += [self.p(rm), self.p(rv)]
        if ws:
            buf, n = self.workspace(batch, sizes)
            args += [self.p(buf), self.ct.c_size_t(n)]
        rc = self.fn(role + ("_ws" if ws else ""))(*args, None)
        return rc, self.load(y).reshape(x.shape), self.launches()


@pytest.fixture(scope="module")
def dyn_lib(tmp_path_factory):
    """Every DYN_CASES layer and the emulator as one shared library (cached by its sources)."""
    if GXX is None or CUDA_INCLUDE is None:
        pytest.skip("the CPU emulator needs g++ and the CUDA headers (cuda_fp16.h)")
    from test_training import emulated_library

    return emulated_library(DYN_LAYERS, tmp_path_factory, tag="sizes")


@needs_emu
@pytest.mark.parametrize("layer,sizes_list", DYN_CASES, ids=[la.name for la in DYN_LAYERS])
def test_runtime_sizes_emulated(dyn_lib, layer, sizes_list):
    """One compiled file called at several sizes and batches, with and without a workspace:
    y (and batch norm's running statistics) match normgen.reference, and the launchers launch
    what CudaPlan.launches says for those sizes (workspace sizes included)."""
    em = SizedEmu(dyn_lib, layer)
    cp = em.cp
    role = cp.reduce_role
    worst = 0.0
    for i, sizes in enumerate(sizes_list):
        for batch in DYN_BATCHES:
            x = _dyn_data(layer, batch, sizes, seed=10 * i + batch)
            tag = f"batch {batch} {sizes}"
            assert em.fn("workspace_size")(batch, *em.sizes(sizes)) == cp.workspace_size(batch, sizes), tag
            for ws in (False, True):
                if role == "train_forward":
                    rm0 = round_to(layer.trained_mean_values, layer.dtype)
                    rv0 = round_to(layer.trained_variance_values, layer.dtype)
                    rm, rv = em.store(rm0), em.store(rv0)
                    rc, y, launches = em.run(role, x, batch, sizes, ws, rm, rv)
                    if layer.running_variance == "unbiased" and reference.count(layer, batch, sizes) < 2:
                        assert rc == 3 and launches == [], tag
                        continue
                    want, wrm, wrv = reference.train_forward(layer, x, rm0, rv0)
                    _close(layer, em.load(rm), round_to(wrm, layer.dtype), f"{tag} running_mean")
                    _close(layer, em.load(rv), round_to(wrv, layer.dtype), f"{tag} running_var")
                else:
                    rc, y, launches = em.run(role, x, batch, sizes, ws)
                    want = reference.predict(layer, x)
                assert rc == 0, tag
                _close(layer, y, want, f"{tag} {role}{'_ws' if ws else ''}")
                worst = max(worst, float(np.abs(y - want).max()))
                assert launches == [(L.kernel, L.grid, L.block) for L in cp.launches(role, batch, ws, sizes)], tag
            if cp.affine:
                rc, y, launches = em.run("predict", x, batch, sizes, False)
                assert rc == 0, tag
                want = reference.predict(layer, x)
                _close(layer, y, want, f"{tag} predict")
                worst = max(worst, float(np.abs(y - want).max()))
                assert launches == [(L.kernel, L.grid, L.block) for L in cp.launches("predict", batch, False, sizes)]
    print(f"{layer.name}: max |y - reference| {worst:.3g}")


@needs_emu
def test_runtime_size_errors_emulated(dyn_lib):
    """A size < 1, or sizes whose product with the batch overflows size_t: NAME_ERR_SIZE (6), no
    launch, y untouched; the workspace-size functions say 0."""
    for layer in (DYN_LAYERS[0], DYN_LAYERS[3], DYN_LAYERS[4]):
        em = SizedEmu(dyn_lib, layer)
        cuh = emit(layer, "cuda")[f"{layer.name}.cuh"]
        assert f"#define {layer.name.upper()}_ERR_SIZE 6" in cuh
        good = {n: 2 for n in layer.sizes}
        x = _dyn_data(layer, 1, good)
        bad = [{**good, layer.sizes[0]: 0}, {**good, layer.sizes[-1]: -3},
               {n: 2**31 - 1 for n in layer.sizes}]
        for sizes in bad:
            for ws in (False, True):
                if layer.kind == "batchnorm":
                    rm, rv = em.store(layer.trained_mean_values), em.store(layer.trained_variance_values)
                    args = [*em.lead, em.p(em.store(x)), em.p(em.store(x)), 2**31 - 1 if sizes[layer.sizes[0]] > 2
                            else 1, *em.sizes(sizes), em.p(rm), em.p(rv)]
                    role = "train_forward"
                else:
                    args = [*em.lead, em.p(em.store(x)), em.p(em.store(x)),
                            2**31 - 1 if sizes[layer.sizes[0]] > 2 else 1, *em.sizes(sizes)]
                    role = "predict"
                if ws:
                    args += [None, em.ct.c_size_t(0)]
                assert em.fn(role + ("_ws" if ws else ""))(*args, None) == 6, (layer.name, sizes, ws)
                assert em.launches() == []
            big = 2**31 - 1 if sizes[layer.sizes[0]] > 2 else 1  # the batch that makes the product overflow
            assert em.fn("workspace_size")(big, *em.sizes(sizes)) == 0
            assert em.fn("backward_workspace_size")(big, *em.sizes(sizes)) == 0


@needs_nvcc
def test_cuda_layer_passes_run_time_sizes_without_gpu(monkeypatch, tmp_path):
    """CudaLayer (pycuda faked) takes the sizes from x's shape and passes them after batch as
    size_t (prepare code "Q"), with the launches of CudaPlan for those sizes; the training bench
    likewise with TrainCuda's."""
    import normgen.targets.cuda.module as nc

    monkeypatch.setenv("NORMGEN_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(nc, "_pycuda", lambda: _fake_pycuda(calls))
    layer, sizes_list = DYN_CASES[0]
    cl = nc.CudaLayer(layer)
    for sizes in sizes_list:
        for role in ("predict", "train_forward"):
            calls.clear()
            getattr(cl, role)(_dyn_data(layer, 2, sizes))
            want = cl.cp.launches(role, 2, True, sizes)
            assert [(c[0], c[1][0], c[2]) for c in calls] == [(L.kernel, L.grid, L.block) for L in want]
            for c, L in zip(calls, want, strict=True):
                at = L.args.index("batch")
                assert c[3][at:at + 3] == "iQQ" and [int(v) for v in c[4][at + 1:at + 3]] == [sizes["h"], sizes["w"]]


def test_cuda_refuses_size_names_its_launchers_use():
    """A size named like a local of the CUDA launchers is one clear error (the C target takes it)."""
    layer = LayerNorm(name="ln_grid", format="BTC", shape=["grid", 8])
    emit(layer, "c")
    with pytest.raises(NormgenError, match="run-time size 'grid' is a name the cuda launchers use"):
        emit(layer, "cuda")
