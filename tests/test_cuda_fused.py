"""The fused forms on the CUDA target (README "Fused forms", normgen/targets/cuda/fused.py): the
residual add (h in y, or written out), the activation (inside the core kernels without a
modulation) and the adaLN modulation as stage kernels around the static cores.

1. the plan (pure Python): public launchers and their stages, static cores, dropped roles,
   unfused layers untouched;
2. nvcc: every FUSED layer (kinds x formats x fusions x dtypes, below), sm_80 and sm_90,
   warnings as errors; the public launchers exported, the cores not;
3. the CPU emulator (tests/cuda_emu): every public launcher of every FUSED layer, called through
   NamedCalls by name, against normgen.targets.calls.fused_reference (forward, training forward,
   backward_saved; backward and backward_frozen where the layer keeps them), both the plain and the
   _ws launchers; the launchers' argument errors leave the outputs untouched;
4. the pycuda bench: with a fake pycuda, CudaLayer.run launches what the emulated launcher
   launches, each kernel with the arguments its parameters declare; on a GPU (skipped without
   pycuda and a device) CudaLayer.run against the reference.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from test_cuda import _kernel_params, needs_gpu
from test_training import CUDA_TOL, _nvcc_check, emulated_library, needs_emu, needs_nvcc

from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormgenError, RMSNorm, emit
from normgen.harness.check import random_input
from normgen.lowering import lower
from normgen.targets.calls import argument_kinds, fused_reference
from normgen.targets.cuda.calls import CudaCalls
from normgen.targets.cuda.fused import fused_cuda
from normgen.targets.cuda.plan import derive
from normgen.targets.cuda.storage import round_to
from normgen.targets.cuda.train import lower_train_cuda
from normgen.targets.training import TrainingBench


def _p(seed, n):
    r = np.random.default_rng(seed)
    return dict(scale=1.0 + 0.3 * r.standard_normal(n), offset=0.2 * r.standard_normal(n))


def _bn(n, seed):
    r = np.random.default_rng(seed)
    return dict(trained_mean=r.standard_normal(n), trained_variance=0.5 + r.random(n))


RES = dict(residual=True)
RES_OUT = dict(residual=True, residual_out=True)
ADALN = dict(modulation="adaln")

#: The covering subset: every kind; NCHW, NHWC, BTC, TBC, BC, CB, TC (no B), SBSC, BCT with a
#: run-time size; every activation; the modulation with and without an activation; the residual
#: into y and written out; all four dtypes; per-channel, per-element and no affine; embedded and
#: run-time parameters; every kernel family: batch-norm predict's affine (uniform, consecutive,
#: general), segments (register-cached, looping, split), columns (single, split) and generic.
FUSED = [
    BatchNorm(name="fbn_nchw_relu", format="BCSS", shape=[3, 4, 5], activation="relu", **_p(1, 3), **_bn(3, 1)),
    BatchNorm(name="fbn_nhwc_silu16", format="BSSC", shape=[3, 5, 8], dtype="float16", activation="silu", **RES,
              **_p(2, 8), **_bn(8, 2)),
    BatchNorm(name="fbn_nchw_all64", format="BCSS", shape=[4, 4, 4], dtype="float64", activation="gelu", **ADALN,
              **RES_OUT, **_p(3, 4), **_bn(4, 3)),
    BatchNorm(name="fbn_bc_rt", format="BC", shape=[8], param_storage="runtime", **ADALN, activation="relu",
              **RES_OUT, **_p(4, 8), **_bn(8, 4)),
    BatchNorm(name="fbn_btc_res", format="BTC", shape=[6, 8], **RES_OUT, **_p(5, 8), **_bn(8, 5)),
    GroupNorm(name="fgn_nchw_silu_rt", format="BCSS", shape=[8, 4, 4], num_groups=4, activation="silu",
              param_storage="runtime", **_p(6, 8)),
    GroupNorm(name="fgn_nhwc_mod16", format="BSSC", shape=[4, 4, 8], num_groups=2, dtype="float16", **ADALN, **RES,
              **_p(7, 8)),
    GroupNorm(name="fgn_nchw_gt_bf", format="BCSS", shape=[6, 3, 3], num_groups=3, dtype="bfloat16",
              activation="gelu_tanh", **RES_OUT, **_p(8, 6)),
    GroupNorm(name="fgn_bct_steps", format="BCT", shape=[8, "steps"], num_groups=2, activation="silu", **RES,
              **_p(9, 8)),
    LayerNorm(name="fln_btc_res", format="BTC", shape=[6, 16], **RES_OUT, **_p(10, 16)),
    LayerNorm(name="fln_btc_dit", format="BTC", shape=[6, 32], affine="none", **ADALN),
    LayerNorm(name="fln_btc_mod_bf", format="BTC", shape=[5, 16], dtype="bfloat16", **ADALN, activation="silu",
              **RES_OUT, **_p(11, 16)),
    LayerNorm(name="fln_tbc_gelu64", format="TBC", shape=[5, 12], dtype="float64", activation="gelu", **RES,
              **_p(12, 12)),
    LayerNorm(name="fln_nchw_elem", format="BCSS", shape=[3, 4, 4], operation_dimension="spatial-channel",
              affine="element", scale=np.linspace(0.5, 1.5, 48).reshape(3, 4, 4),
              offset=np.linspace(-0.2, 0.2, 48).reshape(3, 4, 4), **ADALN, activation="relu"),
    LayerNorm(name="fln_nchw_cols16", format="BCSS", shape=[6, 3, 5], operation_dimension="channel-only",
              dtype="float16", activation="silu", **RES, **_p(13, 6)),
    LayerNorm(name="fln_bc_relu", format="BC", shape=[16], activation="relu", **_p(14, 16)),
    LayerNorm(name="fln_cb_mod", format="CB", shape=[16], **ADALN, **RES_OUT, **_p(15, 16)),
    LayerNorm(name="fln_tc_mod", format="TC", shape=[6, 8], **ADALN, activation="silu", **_p(16, 8)),
    LayerNorm(name="fln_long_ws", format="BTC", shape=[2, 12288], activation="gelu_tanh", **RES_OUT),
    RMSNorm(name="frms_btc_res", format="BTC", shape=[4, 32], **RES_OUT, scale=np.linspace(0.5, 1.5, 32)),
    RMSNorm(name="frms_tokens_mod", format="BTC", shape=["tokens", 16], **ADALN, activation="gelu",
            scale=np.linspace(0.5, 1.5, 16)),
    RMSNorm(name="frms_silu16", format="BTC", shape=[4, 64], dtype="float16", activation="silu", **RES,
            scale=np.linspace(0.5, 1.5, 64)),
    RMSNorm(name="frms_mod_bf", format="BTC", shape=[4, 24], dtype="bfloat16", **ADALN, activation="gelu_tanh",
            **RES_OUT, scale=np.linspace(0.5, 1.5, 24)),
    BatchNorm(name="fbn_c3_general", format="BCSS", shape=[3, 3, 3], activation="silu", **_p(19, 3), **_bn(3, 19)),
    BatchNorm(name="fbn_nhwc_split", format="BSSC", shape=[32, 32, 4], activation="relu", **RES_OUT, **_p(20, 4),
              **_bn(4, 20)),
    InstanceNorm(name="fin_sbsc_generic", format="SBSC", shape=[3, 4, 6], **ADALN, activation="gelu", **RES,
                 **_p(21, 6)),
    InstanceNorm(name="fin_nchw_mod", format="BCSS", shape=[4, 5, 5], **ADALN, activation="relu", **_p(17, 4)),
    InstanceNorm(name="fin_nhwc_gelu64", format="BSSC", shape=[3, 3, 8], dtype="float64", activation="gelu",
                 **RES_OUT, **_p(18, 8)),
]
SIZES = {"fgn_bct_steps": {"steps": 7}, "frms_tokens_mod": {"tokens": 5}}
FORWARD = ("predict", "train_forward", "train_forward_save")


def _by_name(name):
    return next(la for la in FUSED if la.name == name)


def _fc(layer):
    plan = lower(layer, "cuda")
    return fused_cuda(plan, derive(plan), lower_train_cuda(plan))


# ---- 1. the plan ----------------------------------------------------------------------------------


def test_public_launchers_wrap_static_cores():
    layer = _by_name("fln_btc_mod_bf")
    fc = _fc(layer)
    names = {f.name: f for f in fc.functions}
    assert set(names) == {"fln_btc_mod_bf_predict", "fln_btc_mod_bf_predict_ws", "fln_btc_mod_bf_train_forward_save",
                          "fln_btc_mod_bf_backward_saved"}
    f = names["fln_btc_mod_bf_predict_ws"]
    assert [a.name for a in argument_kinds(f.args)] == [
        "x", "residual", "mod_shift", "mod_scale", "y", "h", "batch", "workspace", "workspace_bytes", "stream"]
    assert [s.kind for s in fc.stages(f)] == ["add", "core", "epilogue"]
    assert fc.stages(f)[1].core == "fln_btc_mod_bf_predict_ws_core"
    b = names["fln_btc_mod_bf_backward_saved"]
    assert [s.kind for s in fc.stages(b)] == ["dz", "core", "add"]
    assert [a.name for a in argument_kinds(b.args)][:9] == [
        "h", "dy", "dh", "mod_shift", "mod_scale", "saved_mean", "saved_invstd", "dx", "dscale"]
    # backward and backward_frozen need the plain output: a layer with an activation lacks them
    roles = {f.role for f in [*fc.declared(False), *fc.declared(True)]}
    assert "backward" not in roles and "backward_saved" in roles
    text = emit(layer, "cuda")
    cu, cuh = text["fln_btc_mod_bf.cu"], text["fln_btc_mod_bf.cuh"]
    assert "static int fln_btc_mod_bf_predict_core(" in cu
    assert "fln_btc_mod_bf_backward(" not in cu and "_core" not in cuh
    assert 'extern "C" int fln_btc_mod_bf_backward_saved(const __nv_bfloat16 *h' in cu


def test_activation_only_runs_inside_the_core():
    """Without a modulation the activation is part of every kernel's normalize expression: the
    forward launchers run no stage kernel but the residual add."""
    layer = _by_name("fbn_nchw_relu")
    fc = _fc(layer)
    for f in fc.functions:
        kinds = [s.kind for s in fc.stages(f)]
        assert kinds == (["core"] if f.role in FORWARD else ["dz", "core"]), f.name
    cu = emit(layer, "cuda")["fbn_nchw_relu.cu"]
    assert cu.count("fbn_nchw_relu_act(") >= 5  # its definition, the affine kernel (units, tail), normalize, train_forward_save
    assert "fbn_nchw_relu_fused_epilogue" not in cu


def test_residual_only_keeps_every_backward():
    layer = _by_name("fbn_btc_res")
    fc = _fc(layer)
    assert {f.role for f in fc.functions} == set(FORWARD) | {"backward", "backward_saved", "backward_frozen"}
    bw = next(f for f in fc.functions if f.role == "backward")
    assert [s.kind for s in fc.stages(bw)] == ["core", "add"]  # dx += dh


def test_unfused_layers_have_no_fused_text():
    plain = LayerNorm(name="plain", format="BTC", shape=[6, 16])
    cu = emit(plain, "cuda")["plain.cu"]
    assert "_core" not in cu and "fused launchers" not in cu and "plain_act" not in cu
    assert not _fc(plain).fused


# ---- 2. nvcc --------------------------------------------------------------------------------------


@needs_nvcc
def test_fused_cuda_compiles_warning_free(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda la: _nvcc_check(la, tmp_path), FUSED))
    for layer, (rc, err, syms) in zip(FUSED, results, strict=True):
        assert rc == 0, f"{layer.name}:\n{err[:3000]}"
        fc = _fc(layer)
        for f in fc.functions:
            assert f.name in syms, f"{layer.name}: {f.name} is not exported"
        assert not any(s.endswith("_core") for s in syms), layer.name


# ---- 3. the CPU emulator ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fused_lib(tmp_path_factory):
    return emulated_library(FUSED, tmp_path_factory, tag="fused")


class EmulatedFused(CudaCalls, TrainingBench):
    """The generated public launchers run by the emulator, called with ctypes through
    NamedCalls.run (device pointers are host pointers there)."""

    def __init__(self, lib, layer, workspace=True):
        self.lib, self.layer, self.workspace = lib, layer, workspace
        self.plan = lower(layer, "cuda")
        self.dtype = np.dtype(np.float64)
        acc = np.float64 if self.plan.acc_type == "double" else np.float32
        self.params = None
        if self.plan.runtime_params:
            self.params = np.zeros(len(self.plan.params) * self.plan.channels, acc)
            assert getattr(lib, f"{layer.name}_params_init")(ctypes.c_void_p(self.params.ctypes.data)) == 0
        if layer.kind == "batchnorm":
            host = np.float64 if layer.dtype == "float64" else np.float32
            self.reset_running(host)
        for size_fn in ("workspace_size", "backward_workspace_size"):
            getattr(lib, f"{layer.name}_{size_fn}").restype = ctypes.c_size_t
        self.last_rc = 0

    def reset_running(self, host=np.float32):
        self.running_mean = round_to(self.layer.trained_mean_values, self.layer.dtype).astype(host)
        self.running_var = round_to(self.layer.trained_variance_values, self.layer.dtype).astype(host)

    def _invoke(self, f, values):
        sizes = [ctypes.c_int32(values[n]) for n in self.plan.sizes]
        call, device = [], {}
        for a in argument_kinds(f.args):
            if a.name == "stream":
                call.append(None)
            elif a.name == "workspace":
                fn = "backward_workspace_size" if f.role.startswith("backward") else "workspace_size"
                need = getattr(self.lib, f"{self.layer.name}_{fn}")(ctypes.c_int32(values["batch"]), *sizes)
                ws = np.zeros(need // 8 + 2, np.float64)
                call.append(ctypes.c_void_p(ws.ctypes.data))
                device["workspace"] = (a, ws)
            elif a.name == "workspace_bytes":
                call.append(ctypes.c_size_t(need))
            elif a.name == "params":
                call.append(ctypes.c_void_p(self.params.ctypes.data))
            elif a.pointer:
                dev = self.to_device_values(a, values[a.name])
                device[a.name] = (a, dev)
                call.append(ctypes.c_void_p(dev.ctypes.data))
            else:
                call.append(ctypes.c_int32(values[a.name]))
        rc = getattr(self.lib, f.name)(*call)
        if rc:
            raise NormgenError(f"{f.name} returned {rc}")
        for name, (a, dev) in device.items():
            if a.output and name != "workspace":
                host = values[name]
                host[...] = self.from_device_values(a, dev).reshape(host.shape)


def _inputs(layer, batch, rng, sizes):
    x = round_to(random_input(layer, batch, rng, sizes), layer.dtype)
    arrays = {"x": x}
    if layer.residual:
        arrays["residual"] = round_to(0.7 * rng.standard_normal(x.shape), layer.dtype)
    if layer.modulation != "none":
        arrays["mod_shift"] = round_to(0.4 * rng.standard_normal((batch, layer.channels)), layer.dtype)
        arrays["mod_scale"] = round_to(0.4 * rng.standard_normal((batch, layer.channels)), layer.dtype)
    return arrays


def _close(got, want, layer, what, factor=1.0):
    tol = CUDA_TOL[layer.dtype] * factor
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.size == want.size, (what, got.shape, want.shape)
    err = np.abs(got.reshape(-1) - want.reshape(-1)).max() / (1.0 + np.abs(want).max())
    assert err <= tol, f"{layer.name} {what}: scaled error {err:.3e} > {tol}"
    return err


#: The largest scaled error seen per dtype (the report of the emulator runs).
MAX_ERR: dict[str, float] = {}


def _record(layer, err):
    MAX_ERR[layer.dtype] = max(MAX_ERR.get(layer.dtype, 0.0), err)


@needs_emu
@pytest.mark.parametrize("layer", FUSED, ids=lambda la: la.name)
def test_fused_launchers_emulated_match_reference(fused_lib, layer):
    rng = np.random.default_rng(5)
    sizes = SIZES.get(layer.name, {})
    batch = 3 if layer.fmt.has_batch else 1
    arrays = _inputs(layer, batch, rng, sizes)
    bn = layer.kind == "batchnorm"
    # half and bfloat16 round h, y before the modulation and dx between the stages; the scaled
    # errors stay within the CUDA target's usual tolerance all the same
    factor = 1.0
    for workspace in (True, False):
        em = EmulatedFused(fused_lib, layer, workspace)
        roles = {f.role for f in [*em.fused_cuda.declared(False), *em.fused_cuda.declared(True)]}
        for role in ("predict", "train_forward", "train_forward_save"):
            if role not in roles:
                continue
            running = (em.running_mean.astype(np.float64), em.running_var.astype(np.float64)) if bn else None
            got = em.run(role, **arrays)
            want = fused_reference(layer, role, arrays, running)
            assert set(want) <= set(got), (role, set(want), set(got))
            for k, w in want.items():
                _record(layer, _close(got[k], w, layer, f"{role} {k} (workspace {workspace})", factor))
            if bn:
                em.reset_running(em.running_mean.dtype)
        h = arrays["x"] + arrays["residual"] if layer.residual else arrays["x"]
        h = round_to(h, layer.dtype)
        dy = round_to(rng.standard_normal(h.shape), layer.dtype)
        back = {("h" if layer.residual else "x"): h, "dy": dy}
        if layer.residual_out:
            back["dh"] = round_to(0.5 * rng.standard_normal(h.shape), layer.dtype)
        back.update({k: arrays[k] for k in ("mod_shift", "mod_scale") if k in arrays})
        from normgen import reference

        sm, si = reference.saved_statistics(layer, h)
        for role in ("backward_saved", "backward", "backward_frozen"):
            if role not in roles:
                continue
            inputs = dict(back, **({"saved_mean": sm, "saved_invstd": si} if role == "backward_saved" else {}))
            got = em.run(role, **inputs)
            want = fused_reference(layer, role, inputs)
            grads = {g for g, _ in em.plan.gradients}
            for k, w in want.items():
                if w is None or (k in ("dscale", "doffset") and k not in grads):
                    assert k not in got  # the layer has no such parameter
                    continue
                _record(layer, _close(got[k], w, layer, f"{role} {k} (workspace {workspace})", factor))
        expected = {"backward", "backward_frozen"} & roles
        if layer.activation != "none" or layer.modulation != "none":
            assert not expected
        elif bn:
            assert expected == {"backward", "backward_frozen"}


@needs_emu
def test_fused_launcher_errors_leave_outputs(fused_lib):
    layer = _by_name("fln_long_ws")
    lib = fused_lib
    rng = np.random.default_rng(1)
    x = round_to(random_input(layer, 2, rng), "float32").astype(np.float32)
    res = x.copy()
    y, h = np.full_like(x, 7.0), np.full_like(x, 7.0)
    p = lambda a: ctypes.c_void_p(a.ctypes.data)  # noqa: E731
    lib.fln_long_ws_workspace_size.restype = ctypes.c_size_t
    need = lib.fln_long_ws_workspace_size(2)
    assert need > 0  # the long rows split: the _ws launcher needs a workspace
    ws = np.zeros(need // 8 + 2)
    fn = lib.fln_long_ws_predict_ws
    assert fn(p(x), None, p(y), p(h), 2, p(ws), ctypes.c_size_t(need), None) == 1
    assert fn(p(x), p(res), p(y), p(h), 0, p(ws), ctypes.c_size_t(need), None) == 2
    assert fn(p(x), p(res), p(y), p(h), 2, p(ws), ctypes.c_size_t(need - 1), None) == 5
    assert fn(p(x), p(res), p(y), p(h), 2, None, ctypes.c_size_t(need), None) == 5
    assert (y == 7.0).all() and (h == 7.0).all()
    assert fn(p(x), p(res), p(y), p(h), 2, p(ws), ctypes.c_size_t(need), None) == 0
    np.testing.assert_allclose(h, 2 * x)
    lib.emu_set_fail_launches(1)
    try:
        assert fn(p(x), p(res), p(y), p(h), 2, p(ws), ctypes.c_size_t(need), None) == 4
    finally:
        lib.emu_set_fail_launches(0)


# ---- 4. the pycuda bench ----------------------------------------------------------------------------


def _recording_pycuda(layer, calls):
    """A pycuda stand-in that runs nothing: every prepared call is checked against the kernel's
    parameters in the rendered .cu and recorded as (kernel, grid, block)."""
    from test_cuda_training import _emu_pycuda

    drv, ga = _emu_pycuda(None, layer, calls)
    kernels = _kernel_params(emit(layer, "cuda")[f"{layer.name}.cu"])

    class Fn:
        def __init__(self, name):
            self.name = name

        def prepare(self, sig):
            self.sig = sig
            assert len(sig) == len(kernels[self.name]), self.name

        def _check(self, grid, block, args):
            assert len(args) == len(self.sig)
            for code, a, (ctype, pname) in zip(self.sig, args, kernels[self.name], strict=True):
                if code == "P":
                    assert ctype.endswith("*") and not isinstance(a, (np.integer, np.floating)), (self.name, pname)
                else:
                    want = {"i": np.int32, "Q": np.uint64}[code]
                    assert isinstance(a, want) and not ctype.endswith("*"), (self.name, pname, a)
            calls.append((self.name, grid[0], block[0]))

        def prepared_call(self, grid, block, *args):
            self._check(grid, block, args)

        def prepared_async_call(self, grid, block, stream, *args):
            self._check(grid, block, args)

    class Module:
        def get_function(self, name):
            return Fn(name)

    drv.module_from_file = staticmethod(lambda path: Module())
    return drv, ga


def _emulated_launches(lib):
    lib.emu_launch_count.restype = ctypes.c_size_t
    lib.emu_launch_kernel.restype = ctypes.c_char_p
    lib.emu_launch_kernel.argtypes = [ctypes.c_size_t]
    lib.emu_launch_dim.restype = ctypes.c_uint
    lib.emu_launch_dim.argtypes = [ctypes.c_size_t, ctypes.c_int]
    return [(lib.emu_launch_kernel(i).decode(), lib.emu_launch_dim(i, 0), lib.emu_launch_dim(i, 3))
            for i in range(lib.emu_launch_count())]


@needs_nvcc
@needs_emu
@pytest.mark.parametrize("name", ["fln_btc_mod_bf", "fbn_bc_rt", "frms_tokens_mod", "fgn_nchw_gt_bf"])
def test_bench_run_launches_what_the_launcher_launches(fused_lib, monkeypatch, tmp_path, name):
    """CudaLayer.run (the pycuda path, NamedCalls) runs each public launcher's stages and cores
    with the kernels, grids and arguments of the generated launcher: the same sequence the
    emulated launcher records."""
    import normgen.targets.cuda.module as nc

    layer = _by_name(name)
    monkeypatch.setenv("NORMGEN_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(nc, "_pycuda", lambda: _recording_pycuda(layer, calls))
    em = EmulatedFused(fused_lib, layer)
    cl = nc.CudaLayer(layer)
    rng = np.random.default_rng(3)
    sizes = SIZES.get(name, {})
    batch = 3 if layer.fmt.has_batch else 1
    arrays = _inputs(layer, batch, rng, sizes)
    roles = [f.role for f in em.fused_cuda.functions if f.role in FORWARD]
    assert roles
    for role in dict.fromkeys(roles):
        calls.clear()
        fused_lib.emu_clear_launches()
        out = cl.run(role, **arrays)
        em.run(role, **arrays)
        want = _emulated_launches(fused_lib)
        assert calls and calls == want, role
        assert set(out) >= {"y"}
    sm, si = np.zeros(em.saved_count(batch, *sizes.values())), np.ones(em.saved_count(batch, *sizes.values()))
    back = {("h" if layer.residual else "x"): arrays["x"], "dy": arrays["x"], "saved_mean": sm, "saved_invstd": si}
    if layer.residual_out:
        back["dh"] = arrays["x"]
    back.update({k: arrays[k] for k in ("mod_shift", "mod_scale") if k in arrays})
    calls.clear()
    fused_lib.emu_clear_launches()
    out = cl.run("backward_saved", **back)
    em.run("backward_saved", **back)
    want = _emulated_launches(fused_lib)
    assert any(c[0].endswith("_fused_dz") for c in want) and calls == want
    assert "dx" in out
    # the methods named after a function run the plain kernels: a fused layer has run() instead
    for method, args in (("predict", (arrays["x"],)), ("train_forward_save", (arrays["x"],)),
                         ("backward_saved", (arrays["x"], arrays["x"], sm, si))):
        with pytest.raises(NormgenError, match="has fused forms: call run"):
            getattr(cl, method)(*args)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layer", FUSED, ids=lambda la: la.name)
def test_fused_on_gpu(layer):
    from normgen import build

    rng = np.random.default_rng(8)
    sizes = SIZES.get(layer.name, {})
    batch = 3 if layer.fmt.has_batch else 1
    arrays = _inputs(layer, batch, rng, sizes)
    for workspace in (True, False):
        cl = build(layer, target="cuda", workspace=workspace)
        got = cl.run("predict", **arrays)
        for k, w in fused_reference(layer, "predict", arrays).items():
            _close(got[k], w, layer, f"predict {k}", 2.0)
        h = round_to(arrays["x"] + arrays["residual"], layer.dtype) if layer.residual else arrays["x"]
        from normgen import reference

        sm, si = reference.saved_statistics(layer, h)
        back = {("h" if layer.residual else "x"): h, "dy": round_to(rng.standard_normal(h.shape), layer.dtype),
                "saved_mean": sm, "saved_invstd": si}
        if layer.residual_out:
            back["dh"] = arrays["x"]
        back.update({k: arrays[k] for k in ("mod_shift", "mod_scale") if k in arrays})
        got = cl.run("backward_saved", **back)
        for k, w in fused_reference(layer, "backward_saved", back).items():
            if w is not None:
                _close(got[k], w, layer, f"backward_saved {k}", 8.0)


def test_bench_counts_and_builds_fused_inputs(fused_lib):
    """normgen bench (--target cuda): a fused layer's forward moves the residual, h and the
    modulation too, and its inputs are the named arrays its public launchers take."""
    from normgen.harness.bench import fused_inputs, traffic

    layer = _by_name("fln_btc_mod_bf")
    plain = LayerNorm(name="plain", format="BTC", shape=[5, 16], dtype="bfloat16")
    n = 3 * 5 * 16
    assert traffic(layer, "predict", 3) == traffic(plain, "predict", 3) + 2 * n * 2 + 2 * 3 * 16 * 2
    x = random_input(layer, 3, np.random.default_rng(0))
    inputs = fused_inputs(layer, x, np.random.default_rng(1))
    assert set(inputs) == {"x", "residual", "mod_shift", "mod_scale"}
    em = EmulatedFused(fused_lib, layer)
    out = em.run("predict", **inputs)
    assert set(out) == {"y", "h"}
    with pytest.raises(NormgenError, match="takes no input 'dh'"):
        em.run("predict", dh=x, **inputs)
