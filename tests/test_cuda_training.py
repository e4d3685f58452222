"""The CUDA training half with run-time parameters (param_storage="runtime", issue 4), and for
RMSNorm and the affine options (per element, none, no offset) in both storages.

With run-time parameters every CUDA training function that reads parameters (train_forward_save,
backward, backward_saved, backward_frozen) takes the device ``const NAME_params *params`` first,
as the forward launchers do, and ``NAME_update`` runs one SGD-with-momentum step on the device
struct (on the learnables the layer has; there is none without them). The backward functions take
and write only the gradients of the parameters the layer has (``plan.gradients``). Tested here,
reusing the helpers of tests/test_training.py and tests/test_cuda.py:

1. the plan (pure Python): launcher signatures, launch arguments, and that every kernel's
   parameters in the rendered .cu are what the pycuda bench passes (names, order, C types);
2. nvcc: full runtime-params .cu files (training half included) for every kind, sm_80 and sm_90,
   warnings as errors, every launcher and kernel exported;
3. the CPU emulator (tests/cuda_emu): backward, backward_saved, backward_frozen, train_forward_save
   and update against normgen.reference, with parameters set in the struct at run time (so values
   compiled into the file cannot pass), updates feeding the next backward, population statistics
   finalized into the struct; the pycuda bench's ``.update`` with a fake pycuda whose update
   kernel runs through the emulated launcher;
4. GPU (pycuda and a device; skipped, saying why, otherwise): CudaLayer's training methods.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest
from test_cuda import DYN_BATCHES, DYN_CASES, DYN_LAYERS, SizedEmu, _dyn_data, _kernel_params, needs_gpu
from test_training import (
    CUDA_TOL,
    EmulatedLayer,
    _bn_stats,
    _cuda_close,
    _nvcc_check,
    _params,
    emulated_library,
    lower_cuda,
    needs_emu,
    needs_nvcc,
)

from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormgenError, RMSNorm, emit, reference
from normgen.harness.check import random_input
from normgen.targets.cuda.module import round_to
from normgen.targets.cuda.plan import derive
from normgen.targets.cuda.train import lower_train_cuda

#: MATLAB's four factors, away from their defaults, so that the update shows it applies each one.
FACTORS = dict(scale_learn_rate_factor=2.0, offset_learn_rate_factor=0.5, scale_l2_factor=0.0, offset_l2_factor=3.0)


def runtime_layers():
    """Every kind with run-time parameters, over the CUDA layout families and all four dtypes."""
    p = dict(_params(13), param_storage="runtime", **FACTORS)
    return [
        BatchNorm(name="rbn_nchw32", format="BCSS", shape=[6, 3, 5], **p, **_bn_stats(5), mean_decay=0.2),
        BatchNorm(name="rbn_nhwc16", format="BSSC", shape=[3, 5, 6], dtype="float16", **p, **_bn_stats(6)),
        BatchNorm(
            name="rbn_bc64", format="BC", shape=[6], dtype="float64", running_variance="biased", **p, **_bn_stats(7)
        ),
        GroupNorm(name="rgn_nhwc_bf", format="BSSC", shape=[3, 5, 6], num_groups=3, dtype="bfloat16", **p),
        GroupNorm(name="rgn_sbsc64", format="SBSC", shape=[3, 4, 6], num_groups=2, dtype="float64", **p),  # generic
        LayerNorm(name="rln_btc32", format="BTC", shape=[4, 6], **p),
        LayerNorm(
            name="rln_css16", format="CSS", shape=[6, 3, 5], operation_dimension="batch-excluded", dtype="float16", **p
        ),
        InstanceNorm(name="rin_bcu64", format="BCU", shape=[6, 7], dtype="float64", **p),
        InstanceNorm(name="rin_tbc_bf", format="TBC", shape=[5, 6], dtype="bfloat16", **p),
        # RMSNorm (scale only; with an offset), per-element affines, batch norm without an offset
        # and without any affine (its struct holds the trained statistics only: no update)
        RMSNorm(name="rrms_btc32", format="BTC", shape=[4, 6], scale=p["scale"], param_storage="runtime", **FACTORS),
        RMSNorm(name="rrms_bcss_bf", format="BCSS", shape=[6, 3, 5], dtype="bfloat16", bias=True, **p),  # columns
        LayerNorm(name="rln_elem16", format="BCSS", shape=[6, 3, 5], operation_dimension="spatial-channel",
                  affine="element", dtype="float16", **_element((6, 3, 5), 14), param_storage="runtime", **FACTORS),
        RMSNorm(name="rrms_elem64", format="BTC", shape=[4, 6], operation_dimension="batch-excluded", affine="element",
                dtype="float64", **_element((4, 6), 15, bias=False), param_storage="runtime", **FACTORS),
        BatchNorm(name="rbn_nobias32", format="BSSC", shape=[3, 5, 6], bias=False, scale=p["scale"], **_bn_stats(8),
                  param_storage="runtime", **FACTORS),
        BatchNorm(name="rbn_none16", format="BCSS", shape=[6, 3, 5], affine="none", dtype="float16", **_bn_stats(9),
                  param_storage="runtime", **FACTORS),
    ]


def embedded_layers():
    """RMSNorm over the CUDA layout families, and the affine options, with embedded parameters
    (the channel-affine kinds with embedded parameters are tests/test_training.py's CUDA_GRID)."""
    p = _params(16)
    return [
        RMSNorm(name="erms_btc16", format="BTC", shape=[4, 6], dtype="float16", scale=p["scale"]),
        RMSNorm(name="erms_bcss32", format="BCSS", shape=[6, 3, 5], scale=p["scale"]),  # channel-only: columns
        RMSNorm(name="erms_generic64", format="SBSTC", shape=[3, 2, 2, 6], operation_dimension="spatial-channel",
                dtype="float64", scale=p["scale"]),
        RMSNorm(name="erms_sc_bf", format="BCSS", shape=[6, 3, 5], operation_dimension="spatial-channel",
                dtype="bfloat16", bias=True, **p),
        LayerNorm(name="eln_elem32", format="BTC", shape=[4, 6], operation_dimension="batch-excluded",
                  affine="element", **_element((4, 6), 17)),
        LayerNorm(name="eln_elem_nb64", format="BCSS", shape=[6, 3, 5], operation_dimension="spatial-channel",
                  affine="element", bias=False, dtype="float64", **_element((6, 3, 5), 18, bias=False)),
        RMSNorm(name="erms_elem32", format="BSSC", shape=[3, 5, 6], operation_dimension="spatial-channel",
                affine="element", **_element((3, 5, 6), 19, bias=False)),
        LayerNorm(name="eln_none32", format="BTC", shape=[4, 6], affine="none"),
        GroupNorm(name="egn_none16", format="BSSC", shape=[3, 5, 6], num_groups=3, affine="none", dtype="float16"),
        InstanceNorm(name="ein_none64", format="BCSS", shape=[6, 3, 5], affine="none", dtype="float64"),
        BatchNorm(name="ebn_none32", format="BCSS", shape=[6, 3, 5], affine="none", **_bn_stats(10)),
        BatchNorm(name="ebn_nobias_bf", format="BSSC", shape=[3, 5, 6], bias=False, dtype="bfloat16",
                  scale=p["scale"], **_bn_stats(11)),
    ]


def _element(shape, seed, bias=True):
    """Per-element scale (and offset) of ``shape``."""
    rng = np.random.default_rng(seed)
    out = {"scale": rng.normal(1.0, 0.5, shape)}
    if bias:
        out["offset"] = rng.normal(0.0, 0.5, shape)
    return out


RT_GRID = runtime_layers()
#: Both storages: every training test below that does not need the run-time struct runs on these.
TRAIN_GRID = RT_GRID + embedded_layers()
#: The run-time layers with something to learn (NAME_update).
UPDATE_GRID = [la for la in RT_GRID if la.learnable_arrays()]
#: Update steps: (learn_rate, l2, momentum).
STEPS = [(0.05, 0.01, 0.9), (0.1, 0.0, 0.5), (0.02, 0.1, 0.0)]


def _by_name(name):
    return next(la for la in TRAIN_GRID if la.name == name)


def _new_params(layer, seed):
    """Values other than the description's for the arrays the layer has, scale and offset in their
    shape (rounded to float32 when the device keeps them in float, so the reference sees exactly
    what the kernels read)."""
    rng = np.random.default_rng(seed)
    c = layer.channels
    new = {k: rng.normal(0.0, 1.0, layer.param_shape) for k in ("scale", "offset")}
    new = {k: v for k, v in new.items() if k in layer.learnable_arrays()}
    if layer.kind == "batchnorm":
        new.update(trained_mean=rng.normal(0.0, 1.0, c), trained_variance=rng.uniform(0.3, 3.0, c))
    acc = np.float64 if layer.dtype == "float64" else np.float32
    return {k: v.astype(acc).astype(np.float64) for k, v in new.items()}


class Emulated(EmulatedLayer):
    """tests/test_training.py's EmulatedLayer for every affine: the run-time struct's rows are the
    arrays the layer has (plan.params, plan.channels values each: one per channel, or per element
    of the normalized dimensions) and the backward functions take and write only the gradients it
    has (plan.gradients); an absent one comes back None."""

    def __init__(self, lib, layer):
        import ctypes

        self.ct = ctypes
        self.lib, self.layer = lib, layer
        self.plan = lower_cuda(layer)
        self.tc = lower_train_cuda(self.plan)
        self.storage = np.dtype({"float32": np.float32, "float64": np.float64, "float16": np.float16,
                                 "bfloat16": np.uint16}[layer.dtype])  # fmt: skip
        self.acc = np.dtype(np.float64 if self.tc.A == "double" else np.float32)
        getattr(lib, f"{layer.name}_backward_workspace_size").restype = ctypes.c_size_t
        self.params, self.lead = None, ()
        if self.tc.runtime_params:
            self.params = np.zeros((len(self.plan.params), self.plan.channels), self.acc)
            assert self.fn("params_init")(self.p(self.params)) == 0
            self.lead = (self.p(self.params),)

    def backward(self, x, dy, saved=None, out=None, role=None):
        """(dx, dscale, doffset) of NAME_backward, NAME_backward_saved (``saved``) or ``role``
        (backward_frozen)."""
        xs, dys = self.store(x), self.store(dy)
        dx = np.empty_like(xs) if out is None else out
        grads = {g: np.empty(self.plan.channels, self.acc) for g, _ in self.plan.gradients}
        gp = [self.p(a) for a in grads.values()]
        batch = reference.batch_of(self.layer, x)
        if role is not None:
            rc = self.fn(role)(*self.lead, self.p(xs), self.p(dys), self.p(dx), *gp, batch, None)
        else:
            ws, n = self.workspace(batch)
            stats = [] if saved is None else [self.p(np.ascontiguousarray(a, np.float64)) for a in saved]
            rc = self.fn("backward" if saved is None else "backward_saved")(
                *self.lead, self.p(xs), self.p(dys), *stats, self.p(dx), *gp, batch, self.p(ws), self.ct.c_size_t(n),
                None)  # fmt: skip
        assert rc == 0, rc
        return self.load(dx), grads.get("dscale"), grads.get("doffset")


def _close_grads(got, want, layer, what):
    """dx and the parameter gradients the layer has (None exactly for the ones it lacks)."""
    has = {f"d{k}" for k in layer.learnable_arrays()}
    for name, g, w in zip(("dx", "dscale", "doffset"), got, want, strict=True):
        assert (g is None) == (name != "dx" and name not in has), (what, name)
        if g is not None:
            _cuda_close(g, w, layer, f"{what} {name}")


def _batches(layer):
    return (1, 3) if layer.fmt.has_batch else (1,)


# ---- 1. the plan --------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", RT_GRID, ids=lambda la: la.name)
def test_runtime_training_signatures_and_launches(layer):
    """Functions that read parameters take the device struct first; NAME_update is generated for
    the learnables the layer has (none: no update); the backward functions take exactly its
    gradients; the launches name params first exactly for the kernels that read parameters of the
    struct (not the fixed constants of absent ones)."""
    plan = lower_cuda(layer)
    tc = lower_train_cuda(plan)
    name, A = layer.name, tc.A
    reads = {"train_forward_save", "backward", "backward_saved", "backward_frozen"}
    for f in tc.launchers:
        assert (f.args[0] == f"const {name}_params *params") == (f.role in reads), f.name
        assert (f.pointers[:1] == ["params"]) == (f.role in reads or f.role == "update"), f.name
        assert f.args[-1] == "cudaStream_t stream"
        if f.role.startswith("backward"):
            grads = [g for g, _ in plan.gradients]
            assert [a.split("*")[1] for a in f.args if a.endswith(("*dscale", "*doffset"))] == grads, f.name
            assert [p for p in f.pointers if p in ("dscale", "doffset")] == grads
    learn = plan.learnables
    updates = [f for f in tc.launchers if f.role == "update"]
    assert len(updates) == bool(learn) and (f"{name}_update_kernel" in tc.kernels) == bool(learn)
    if learn:
        assert updates[0].signature == (
            f"{name}_update({name}_params *params, " + "".join(f"const {A} *d{k}, " for k in learn)
            + "".join(f"{A} *velocity_{k}, " for k in learn) + f"{A} learn_rate, {A} l2, {A} momentum, cudaStream_t stream)"
        )
    assert (f"{name}_backward_params" in tc.kernels) == bool(plan.gradients)
    for role in tc.launchers:
        for launch in tc.launches(role.role, 2):
            part = launch.kernel[len(name) + 1 :]
            assert (launch.args[0] == "params") == bool(tc.reads(part)) or part == "update_kernel", launch
            assert set(tc.reads(part)) <= set(plan.params)
    # the embedded variant of the same layer: no struct, no update
    emb = lower_train_cuda(lower_cuda(layer.replace(param_storage="embedded")))
    assert not emb.update and all("params" not in f.args[0] for f in emb.launchers)
    assert all("params" not in L.args for f in emb.launchers for L in emb.launches(f.role, 2))


@pytest.mark.parametrize("layer", TRAIN_GRID, ids=lambda la: la.name)
def test_kernel_parameters_are_what_the_bench_passes(layer):
    """Every training kernel's parameters in the rendered .cu are the names of TrainCuda.launches
    (what CudaTraining passes through pycuda), in order, with matching C types: pointers 'P',
    int 'i', acc_t scalars 'f'/'d' (TrainCuda.arg_code). With run-time parameters no embedded
    parameter arrays are left but the fixed constants of a scale or offset the layer lacks."""
    cu = emit(layer, "cuda")[f"{layer.name}.cu"]
    kernels = _kernel_params(cu)
    tc = lower_train_cuda(lower_cuda(layer))
    assert set(tc.kernels) <= set(kernels)
    scalar = {"f": "acc_t", "d": "acc_t", "i": "int"}
    seen = set()
    for f in tc.launchers:
        for launch in tc.launches(f.role, 3 if layer.fmt.has_batch else 1):
            params = kernels[launch.kernel]
            names = [{"ws": "workspace"}.get(n, n) for _, n in params]
            assert len(names) == len(launch.args), launch.kernel
            assert all(a in (n, "null") for n, a in zip(names, launch.args, strict=True)), (launch.kernel, names)
            for (ctype, _), arg in zip(params, launch.args, strict=True):
                code = tc.arg_code(arg)
                assert ctype.endswith("*") if code == "P" else ctype == scalar[code], (launch.kernel, ctype, arg)
            seen.add(launch.kernel)
    assert seen == set(tc.kernels)
    arrays = set(re.findall(r"static __device__ (?:__align__\(16\) )?const acc_t (\w+)\[", cu))
    constants = set(lower_cuda(layer).constants)
    if tc.runtime_params:
        assert arrays == constants
    else:
        stats = [k for k, _ in tc.embedded_statistics]
        bn = {"fold_a", "fold_b", *(f"train_{k}" for k in stats)} if layer.kind == "batchnorm" else set()
        assert arrays == {"scale", "offset"} | bn
        # backward_frozen reads the trained mean only for the parameter gradients
        assert stats == (["trained_mean"] if tc.gradients else []) + ["trained_variance"] or not bn
    assert tc.arg_code("learn_rate") == ("d" if layer.dtype == "float64" else "f")


def test_embedded_training_text_unchanged_by_runtime_support():
    """Embedded layers keep their parameter arrays and kernels without a struct argument."""
    layer = _by_name("rbn_nchw32").replace(param_storage="embedded", name="ebn_nchw32")
    cu = emit(layer, "cuda")["ebn_nchw32.cu"]
    assert "static __device__ const acc_t train_trained_mean[6]" in cu
    assert "ebn_nchw32_backward_stats(const elem_t *x," in cu
    assert "_update" not in cu and "ebn_nchw32_params" not in cu + emit(layer, "cuda")["ebn_nchw32.cuh"]


# ---- 2. nvcc ------------------------------------------------------------------------------------


@needs_nvcc
def test_cuda_training_compiles_warning_free_sm80_sm90(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda la: _nvcc_check(la, tmp_path), TRAIN_GRID))
    for layer, (rc, err, syms) in zip(TRAIN_GRID, results, strict=True):
        assert rc == 0, f"{layer.name}:\n{err[:4000]}"
        cp = derive(lower_cuda(layer))
        tc = lower_train_cuda(lower_cuda(layer))
        want = {f.name for f in tc.launchers} | set(tc.kernels) | {f.name for f in cp.launchers} | set(cp.kernels)
        want.add(f"{layer.name}_backward_workspace_size")
        if tc.runtime_params:
            want.add(f"{layer.name}_params_init")
        assert want <= syms, f"{layer.name}: missing {sorted(want - syms)}"
        assert (f"{layer.name}_update" in syms) == tc.update


# ---- 3. the CPU emulator ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rt_emulated(tmp_path_factory):
    """Every TRAIN_GRID layer (both storages) under the emulator."""
    return emulated_library(TRAIN_GRID, tmp_path_factory, tag="rt_train")


def _set(em, values):
    """Write parameter arrays into the emulated struct (its rows are the layer's parameter arrays)."""
    names = list(em.plan.params)
    for k, v in values.items():
        em.params[names.index(k)] = np.reshape(v, -1)


def _get(em, name):
    return em.params[list(em.plan.params).index(name)].astype(np.float64)


def _shaped(layer, **arrays):
    """Flat scale/offset values in the layer's parameter shape (for Layer.replace)."""
    return {k: np.reshape(v, layer.param_shape) for k, v in arrays.items()}


@needs_emu
@pytest.mark.parametrize("layer", TRAIN_GRID, ids=lambda la: la.name)
def test_backward_emulated_matches_reference(rt_emulated, layer):
    """backward, train_forward_save (y, the saved statistics: RMSNorm's mean is 0), backward_saved
    and backward_frozen against the reference; with run-time parameters, set in the struct at run
    time (not the description's) so that values compiled into the file cannot pass."""
    em = Emulated(rt_emulated, layer)
    current = layer
    if em.tc.runtime_params:
        for k in em.plan.params:  # params_init
            want = getattr(layer, f"{k}_values")
            np.testing.assert_array_equal(_get(em, k), np.reshape(want, -1).astype(em.acc))
        new = _new_params(layer, 3)
        _set(em, new)
        current = layer.replace(**new)
    rng = np.random.default_rng(31)
    for batch in _batches(layer):
        x = round_to(random_input(current, batch, rng), layer.dtype)
        dy = round_to(rng.standard_normal(x.shape), layer.dtype)
        want = reference.backward(current, x, dy)
        _close_grads(em.backward(x, dy), want, layer, f"batch {batch} backward")
        xs = em.store(x)
        y = np.empty_like(xs)
        n = em.tc.stats.value(batch)
        sm, si = np.empty(n), np.empty(n)
        running = []
        if layer.kind == "batchnorm":
            c = layer.channels
            rm0, rv0 = round_to(np.zeros(c), layer.dtype), round_to(np.ones(c), layer.dtype)
            rm, rv = em.store(rm0), em.store(rv0)
            running = [em.p(rm), em.p(rv)]
        rc = em.fn("train_forward_save")(*em.lead, em.p(xs), em.p(y), batch, *running, em.p(sm), em.p(si), None)
        if layer.kind == "batchnorm" and layer.running_variance == "unbiased" and reference.count(layer, batch) < 2:
            assert rc == 3
            continue
        assert rc == 0
        wm, wi = reference.saved_statistics(current, x)
        _cuda_close(sm, wm, layer, "saved mean")
        np.testing.assert_allclose(si, wi, rtol=CUDA_TOL[layer.dtype] * 10)
        if layer.kind == "batchnorm":
            wy, wrm, wrv = reference.train_forward(current, x, rm0, rv0)
            _cuda_close(em.load(rm), wrm, layer, "running mean")
            _cuda_close(em.load(rv), wrv, layer, "running var")
        else:
            wy = reference.predict(current, x)
        _cuda_close(em.load(y), wy, layer, "train_forward_save y")
        _close_grads(em.backward(x, dy, saved=(sm, si)), want, layer, f"batch {batch} backward_saved")
        if layer.kind == "batchnorm":
            _close_grads(em.backward(x, dy, role="backward_frozen"), reference.backward_frozen(current, x, dy), layer,
                         f"batch {batch} backward_frozen")  # fmt: skip


def _update(em, grads, velocities, step):
    """NAME_update on the learnables the layer has: gradients and velocities by name."""
    scalar = ctypes.c_double if em.acc == np.float64 else ctypes.c_float
    learn = em.plan.learnables
    return em.fn("update")(*em.lead, *[em.p(grads[k]) for k in learn], *[em.p(velocities[k]) for k in learn],
                           *map(scalar, step), None)  # fmt: skip


@needs_emu
@pytest.mark.parametrize("layer", UPDATE_GRID, ids=lambda la: la.name)
def test_runtime_update_emulated_matches_sgdm(rt_emulated, layer):
    """NAME_update follows reference.sgdm_update with the layer's four factors, over steps with
    different learn rates, L2 and momentum, on the learnables the layer has (an absent offset is
    never written: it is not in the struct); the next backward (and backward_frozen) reads the
    updated struct; the trained statistics are left alone."""
    em = Emulated(rt_emulated, layer)
    learn = em.plan.learnables
    n = em.plan.channels
    frozen_stats = {k: _get(em, k) for k in ("trained_mean", "trained_variance") if layer.kind == "batchnorm"}
    p = {k: _get(em, k) if k in learn else np.zeros(n) for k in ("scale", "offset")}
    vel = {k: np.zeros(n, em.acc) for k in learn}
    want_v = {k: np.zeros(n) for k in ("scale", "offset")}
    current = layer.replace(**_shaped(layer, **{k: p[k] for k in learn}))
    rng = np.random.default_rng(17)
    batch = 2 if layer.fmt.has_batch else 1
    exact = {"rtol": 1e-12, "atol": 1e-12} if em.acc == np.float64 else {"rtol": 2e-6, "atol": 2e-6}
    for i, step in enumerate(STEPS):
        x = round_to(random_input(layer, batch, rng), layer.dtype)
        dy = round_to(rng.standard_normal(x.shape), layer.dtype)
        dx, ds, do = em.backward(x, dy)
        _close_grads((dx, ds, do), reference.backward(current, x, dy), layer, f"step {i} backward")
        grads = {"scale": ds, "offset": do}
        assert _update(em, grads, vel, step) == 0
        lr, l2, mom = step
        g = {k: grads[k].astype(np.float64) if k in learn else np.zeros(n) for k in ("scale", "offset")}
        s, o, vs, vo = reference.sgdm_update(layer, p["scale"], p["offset"], g["scale"], g["offset"], want_v["scale"],
                                             want_v["offset"], learn_rate=lr, l2=l2, momentum=mom)  # fmt: skip
        for k, wp, wv in (("scale", s, vs), ("offset", o, vo)):
            if k in learn:
                np.testing.assert_allclose(_get(em, k), wp, **exact, err_msg=f"step {i} {k}")
                np.testing.assert_allclose(vel[k], wv, **exact, err_msg=f"step {i} velocity_{k}")
        # carry on from exactly what the device holds
        p = {k: _get(em, k) if k in learn else np.zeros(n) for k in ("scale", "offset")}
        want_v = {k: vel[k].astype(np.float64) if k in learn else np.zeros(n) for k in ("scale", "offset")}
        current = layer.replace(**_shaped(layer, **{k: p[k] for k in learn}))
    for k, v in frozen_stats.items():
        np.testing.assert_array_equal(_get(em, k), v)
    if layer.kind == "batchnorm":
        x = round_to(random_input(layer, batch, rng), layer.dtype)
        dy = round_to(rng.standard_normal(x.shape), layer.dtype)
        _close_grads(em.backward(x, dy, role="backward_frozen"), reference.backward_frozen(current, x, dy), layer,
                     "backward_frozen after update")  # fmt: skip


@needs_emu
def test_runtime_population_into_params_and_errors_emulated(rt_emulated):
    """finalize writes straight into the struct's trained statistics (device pointers into it),
    which backward_frozen then uses; NULL arguments are refused with nothing written."""
    layer = _by_name("rbn_nhwc16")
    em = Emulated(rt_emulated, layer)
    acc = np.zeros(1 + 2 * layer.channels)
    assert em.fn("stats_reset")(em.p(acc), None) == 0
    rng = np.random.default_rng(8)
    parts = [round_to(random_input(layer, b, rng), layer.dtype) for b in (2, 3)]
    for part in parts:
        assert em.fn("accumulate")(em.p(acc), em.p(em.store(part)), reference.batch_of(layer, part), None) == 0
    names = list(layer.parameter_arrays())
    row = em.params.strides[0]
    base = em.params.ctypes.data
    tm, tv = (ctypes.c_void_p(base + row * names.index(k)) for k in ("trained_mean", "trained_variance"))
    assert em.fn("finalize")(em.p(acc), tm, tv, None) == 0
    state = reference.population_empty(layer)
    for part in parts:
        state = reference.population_accumulate(layer, state, part)
    want_mean, want_var = reference.population_finalize(layer, state)
    np.testing.assert_allclose(_get(em, "trained_mean"), want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_get(em, "trained_variance"), want_var, rtol=1e-6)
    current = layer.replace(trained_mean=_get(em, "trained_mean"), trained_variance=_get(em, "trained_variance"))
    x, dy = parts[0], round_to(rng.standard_normal(parts[0].shape), layer.dtype)
    _close_grads(em.backward(x, dy, role="backward_frozen"), reference.backward_frozen(current, x, dy), layer,
                 "backward_frozen after finalize")  # fmt: skip
    # errors: a NULL struct or array is refused, nothing is written
    before = em.params.copy()
    v = np.zeros(6, em.acc)
    g = np.ones(6, em.acc)
    assert em.fn("update")(None, em.p(g), em.p(g), em.p(v), em.p(v), *map(ctypes.c_float, STEPS[0]), None) == 1
    assert em.fn("update")(*em.lead, em.p(g), None, em.p(v), em.p(v), *map(ctypes.c_float, STEPS[0]), None) == 1
    assert em.fn("update")(*em.lead, em.p(g), em.p(g), em.p(v), None, *map(ctypes.c_float, STEPS[0]), None) == 1
    np.testing.assert_array_equal(em.params, before)
    xs, out = em.store(x), np.zeros_like(em.store(x))
    ws, n = em.workspace(2)
    assert em.fn("backward")(None, em.p(xs), em.p(xs), em.p(out), em.p(g), em.p(g), 2, em.p(ws), ctypes.c_size_t(n),
                             None) == 1  # fmt: skip
    assert em.fn("backward_frozen")(None, em.p(xs), em.p(xs), em.p(out), em.p(g), em.p(g), 2, None) == 1
    assert not out.any() and (g == 1).all()


# ---- the pycuda bench without a GPU: a fake pycuda over host memory ------------------------------


class _Mem:
    """Fake device memory: host bytes; int() is the address, as a pycuda DeviceAllocation's."""

    def __init__(self, nbytes):
        self.buf = np.zeros(max(nbytes, 16) // 8 + 2, np.float64)  # 16-byte aligned by NumPy

    def __int__(self):
        return self.buf.ctypes.data


class _GPUArray:
    def __init__(self, a):
        self.shape, self.dtype = a.shape, a.dtype
        self.gpudata = _Mem(a.nbytes)
        self._view()[...] = a

    def _view(self):
        n = int(np.prod(self.shape))
        return self.gpudata.buf.view(np.uint8)[: n * self.dtype.itemsize].view(self.dtype).reshape(self.shape)

    def get(self):
        return self._view().copy()


def _emu_pycuda(lib, layer, calls):
    """A pycuda stand-in: every prepared call is checked against the kernel's parameters in the
    rendered .cu and recorded; the update kernel runs through the emulated NAME_update launcher
    (same arguments, plus the stream)."""
    kernels = _kernel_params(emit(layer, "cuda")[f"{layer.name}.cu"])
    codes = {"f": ctypes.c_float, "d": ctypes.c_double}

    class Fn:
        def __init__(self, name):
            self.name = name

        def prepare(self, sig):
            self.sig = sig
            assert len(sig) == len(kernels[self.name]), self.name

        def prepared_call(self, grid, block, *args):
            assert len(args) == len(self.sig)
            for code, a, (ctype, pname) in zip(self.sig, args, kernels[self.name], strict=True):
                if code == "P":
                    assert ctype.endswith("*") and not isinstance(a, (np.floating, float)), (self.name, pname)
                else:
                    want = {"i": np.int32, "f": np.float32, "d": np.float64}[code]
                    assert isinstance(a, want) and not ctype.endswith("*"), (self.name, pname, a)
            calls.append((self.name, grid, block))
            if self.name == f"{layer.name}_update_kernel":
                c_args = [ctypes.c_void_p(int(a)) if code == "P" else codes[code](a)
                          for code, a in zip(self.sig, args, strict=True)]  # fmt: skip
                assert getattr(lib, f"{layer.name}_update")(*c_args, None) == 0

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

    class Drv:
        Context = Ctx

        @staticmethod
        def module_from_file(path):
            assert Path(path).stat().st_size > 0
            return Module()

        @staticmethod
        def mem_alloc(n):
            return _Mem(n)

        @staticmethod
        def memcpy_htod(dst, src):
            dst.buf.view(np.uint8)[: src.nbytes] = np.ascontiguousarray(src).view(np.uint8).reshape(-1)

        @staticmethod
        def memcpy_dtoh(dst, src):
            dst.view(np.uint8).reshape(-1)[...] = src.buf.view(np.uint8)[: dst.nbytes]

    class GA:
        GPUArray = _GPUArray

        @staticmethod
        def to_gpu(a):
            return _GPUArray(np.ascontiguousarray(a))

        @staticmethod
        def empty(n, dtype):
            return _GPUArray(np.zeros(n, dtype))

        @staticmethod
        def empty_like(a):
            return _GPUArray(np.zeros(a.shape, a.dtype))

    return Drv, GA


@needs_nvcc
@needs_emu
@pytest.mark.parametrize("name", ["rgn_nhwc_bf", "rbn_bc64", "rrms_btc32", "rrms_elem64"])
def test_bench_update_through_emulated_kernel(rt_emulated, monkeypatch, tmp_path, name):
    """CudaLayer.update (the pycuda path) marshals the device struct, gradients, velocities and
    scalars as the update kernel declares them; run by the emulator, the result follows
    reference.sgdm_update and lands in get_params() and velocity_scale/velocity_offset. Only the
    learnables the layer has: a layer without an offset takes doffset=None. The backward launches
    carry the struct first and the layer's gradients only. Same Python API as the C bench's
    .update()."""
    import normgen.targets.cuda.module as nc

    layer = _by_name(name)
    monkeypatch.setenv("NORMGEN_CACHE", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(nc, "_pycuda", lambda: _emu_pycuda(rt_emulated, layer, calls))
    cl = nc.CudaLayer(layer)
    learn = cl.plan.learnables
    n = cl.plan.channels
    acc = np.float64 if layer.dtype == "float64" else np.float32
    s, o = layer.scale_values.astype(acc).astype(np.float64), layer.offset_values.astype(acc).astype(np.float64)
    vs, vo = np.zeros(n), np.zeros(n)
    rng = np.random.default_rng(2)
    for lr, l2, mom in STEPS:
        ds, do = rng.standard_normal(n), rng.standard_normal(n) if "offset" in learn else None
        cl.update(ds, do, learn_rate=lr, l2=l2, momentum=mom)
        ds = ds.astype(acc).astype(np.float64)
        do = do.astype(acc).astype(np.float64) if do is not None else np.zeros(n)
        s, o, vs, vo = reference.sgdm_update(layer, s, o, ds, do, vs, vo, learn_rate=lr, l2=l2, momentum=mom)
        got = cl.get_params()
        assert set(got) == set(cl.plan.params)
        tol = {"rtol": 1e-12} if acc == np.float64 else {"rtol": 2e-6, "atol": 2e-6}
        np.testing.assert_allclose(got["scale"], s, **tol)
        np.testing.assert_allclose(cl.velocity_scale, vs, **tol)
        if "offset" in learn:
            np.testing.assert_allclose(got["offset"], o, **tol)
            np.testing.assert_allclose(cl.velocity_offset, vo, **tol)
        assert cl.velocity_scale.dtype == acc and got["scale"].dtype == acc
        s, vs = np.asarray(got["scale"], np.float64), np.asarray(cl.velocity_scale, np.float64)
        if "offset" in learn:
            o, vo = np.asarray(got["offset"], np.float64), np.asarray(cl.velocity_offset, np.float64)
    zeros = np.zeros(n) if "offset" in learn else None
    cl.update(np.zeros(n), zeros)  # MATLAB's defaults
    cl.reset_velocity()
    assert not cl.velocity_scale.any()
    with pytest.raises(NormgenError, match=f"dscale needs {n} values"):
        cl.update(np.zeros(n - 1), zeros)
    if "offset" not in learn:
        with pytest.raises(NormgenError, match="has no offset: doffset must be None"):
            cl.update(np.zeros(n), np.zeros(n))
    tc = lower_train_cuda(lower_cuda(layer))
    calls.clear()
    x = round_to(random_input(layer, 2 if layer.fmt.has_batch else 1, rng), layer.dtype)
    dx, dscale, doffset = cl.backward(x, x)
    assert dscale.shape == (n,) and (doffset is None) == ("offset" not in learn)
    batch = reference.batch_of(layer, x)
    assert calls == [(L.kernel, (L.grid, 1), L.block) for L in tc.launches("backward", batch)]


# ---- 4. GPU -------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("layer", TRAIN_GRID, ids=lambda la: la.name)
def test_training_on_gpu(layer):
    """CudaLayer on a GPU: parameters set at run time (run-time storage), backward,
    backward_saved, backward_frozen (the gradients the layer has, None for the others), update
    steps on its learnables and population statistics into the struct."""
    from normgen import build

    c = build(layer, "cuda")
    current = layer
    runtime = layer.param_storage == "runtime"
    if runtime:
        new = _new_params(layer, 4)
        c.set_params(**new)
        current = layer.replace(**new)
    rng = np.random.default_rng(3)
    batch = 3 if layer.fmt.has_batch else 1
    x = round_to(random_input(current, batch, rng), layer.dtype)
    dy = round_to(rng.standard_normal(x.shape), layer.dtype)
    want = reference.backward(current, x, dy)
    _close_grads(c.backward(x, dy), want, layer, "gpu backward")
    _, sm, si = c.train_forward_save(x)
    _close_grads(c.backward_saved(x, dy, sm, si), want, layer, "gpu backward_saved")
    if layer.kind == "batchnorm":
        _close_grads(c.backward_frozen(x, dy), reference.backward_frozen(current, x, dy), layer, "gpu backward_frozen")
    learn = c.plan.learnables
    if runtime and learn:
        n = c.plan.channels
        p = {k: np.reshape(getattr(current, f"{k}_values"), -1) for k in ("scale", "offset")}
        v = {k: np.zeros(n) for k in ("scale", "offset")}
        for lr, l2, mom in STEPS:
            _, ds, do = c.backward(x, dy)
            c.update(ds, do, learn_rate=lr, l2=l2, momentum=mom)
            g = {"scale": ds.astype(np.float64), "offset": np.zeros(n) if do is None else do.astype(np.float64)}
            s, o, vs, vo = reference.sgdm_update(layer, p["scale"], p["offset"], g["scale"], g["offset"], v["scale"],
                                                 v["offset"], learn_rate=lr, l2=l2, momentum=mom)  # fmt: skip
            got = c.get_params()
            for k, w in (("scale", s), ("offset", o)):
                if k in learn:
                    np.testing.assert_allclose(got[k], w, rtol=CUDA_TOL["float32"], atol=CUDA_TOL["float32"])
                    p[k] = got[k].astype(np.float64)
                    v[k] = getattr(c, f"velocity_{k}").astype(np.float64)
        updated = current.replace(**_shaped(layer, **{k: p[k] for k in learn}))
        _close_grads(c.backward(x, dy), reference.backward(updated, x, dy), layer, "gpu backward after update")
    if layer.kind == "batchnorm":
        c.reset_stats()
        c.accumulate(x)
        mean, var = c.finalize()
        if runtime:
            np.testing.assert_array_equal(c.get_params()["trained_mean"], mean)
        state = reference.population_accumulate(layer, reference.population_empty(layer), x)
        for g, w in zip((mean, var), reference.population_finalize(layer, state), strict=True):
            _cuda_close(g, w, layer, "gpu population")


# ---- 5. run-time sizes --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dyn_lib(tmp_path_factory):
    """The run-time-size layers of tests/test_cuda.py and the emulator as one shared library (the
    same cached build as there)."""
    return emulated_library(DYN_LAYERS, tmp_path_factory, tag="sizes")


def _grads(em, tc):
    """The parameter-gradient outputs the layer has (plan.gradients order), in the accumulation type."""
    acc = np.float64 if tc.A == "double" else np.float32
    return {g: np.full(em.layer.channels if em.cp.plan.affine != "element" else em.cp.plan.channels, np.nan, acc)
            for g in tc.gradients}


def _check_gradients(em, x, got_dx, grads, want, what) -> float:
    """dx and the parameter gradients the layer has against the reference's (dx, dscale, doffset);
    the largest |dx - reference|."""
    dx = em.load(got_dx).reshape(x.shape)
    _cuda_close(dx, want[0], em.layer, f"{what} dx")
    for g, w in zip(("dscale", "doffset"), want[1:], strict=True):
        if g in grads:
            _cuda_close(grads[g].reshape(-1), np.asarray(w).reshape(-1), em.layer, f"{what} {g}")
    return float(np.abs(dx - want[0]).max())


def _train_launches(em, tc, role, batch, sizes):
    return [(L.kernel, L.grid, L.block) for L in tc.launches(role, batch, sizes)]


@needs_emu
@pytest.mark.parametrize("layer,sizes_list", DYN_CASES, ids=[la.name for la, _ in DYN_CASES])
def test_runtime_sizes_training_emulated(dyn_lib, layer, sizes_list):
    """The training launchers of one compiled file called at several run-time sizes and batches:
    train_forward_save (saved statistics, y, running statistics), backward, backward_saved,
    backward_frozen and the population statistics (batch norm) against normgen.reference, and the
    launches they make against TrainCuda.launches for those sizes."""
    em = SizedEmu(dyn_lib, layer)
    tc = lower_train_cuda(lower_cuda(layer))
    ct = ctypes
    bn = layer.kind == "batchnorm"
    rng = np.random.default_rng(17)
    worst = 0.0
    population = reference.population_empty(layer)
    if bn:
        acc_struct = np.zeros(1 + 2 * layer.channels, np.float64)
        assert em.fn("stats_reset")(em.p(acc_struct), None) == 0
    for i, sizes in enumerate(sizes_list):
        for batch in DYN_BATCHES:
            tag = f"batch {batch} {sizes}"
            S = em.sizes(sizes)
            x = _dyn_data(layer, batch, sizes, seed=100 + 10 * i + batch)
            dy = round_to(rng.standard_normal(x.shape), layer.dtype)
            xs, dys = em.store(x), em.store(dy)
            n = em.fn("backward_workspace_size")(batch, *S)
            assert n == tc.workspace_size(batch, sizes), tag
            ws = np.zeros(n // 8 + 4, np.float64)
            want = reference.backward(layer, x, dy)

            # backward: statistics recomputed from x
            dx, grads = np.zeros_like(xs), _grads(em, tc)
            em.lib.emu_clear_launches()
            rc = em.fn("backward")(*em.lead, em.p(xs), em.p(dys), em.p(dx), *[em.p(a) for a in grads.values()], batch,
                                   *S, em.p(ws), ct.c_size_t(n), None)
            assert rc == 0, tag
            assert em.launches() == _train_launches(em, tc, "backward", batch, sizes), tag
            worst = max(worst, _check_gradients(em, x, dx, grads, want, f"{tag} backward"))
            # train_forward_save, then backward_saved from what it saved
            y = np.zeros_like(xs)
            nstat = tc.stats.value(batch, sizes)
            sm, si = np.full(nstat, np.nan), np.full(nstat, np.nan)
            args = [*em.lead, em.p(xs), em.p(y), batch, *S]
            if bn:
                rm0 = round_to(layer.trained_mean_values, layer.dtype)
                rv0 = round_to(layer.trained_variance_values, layer.dtype)
                rm, rv = em.store(rm0), em.store(rv0)
                args += [em.p(rm), em.p(rv)]
            rc = em.fn("train_forward_save")(*args, em.p(sm), em.p(si), None)
            if bn and layer.running_variance == "unbiased" and reference.count(layer, batch, sizes) < 2:
                assert rc == 3 and em.launches() == [], tag
                continue
            assert rc == 0, tag
            assert em.launches() == _train_launches(em, tc, "train_forward_save", batch, sizes), tag
            wm, wi = reference.saved_statistics(layer, x)
            _cuda_close(sm, wm, layer, f"{tag} saved mean")
            np.testing.assert_allclose(si, wi, rtol=CUDA_TOL[layer.dtype] * 10)
            if bn:
                wy, wrm, wrv = reference.train_forward(layer, x, rm0, rv0)
                _cuda_close(em.load(rm), wrm, layer, f"{tag} running_mean")
                _cuda_close(em.load(rv), wrv, layer, f"{tag} running_var")
            else:
                wy = reference.predict(layer, x)
            _cuda_close(em.load(y).reshape(x.shape), wy, layer, f"{tag} train_forward_save y")
            dx, grads = np.zeros_like(xs), _grads(em, tc)
            rc = em.fn("backward_saved")(*em.lead, em.p(xs), em.p(dys), em.p(sm), em.p(si), em.p(dx),
                                         *[em.p(a) for a in grads.values()], batch, *S, em.p(ws), ct.c_size_t(n), None)
            assert rc == 0, tag
            assert em.launches() == _train_launches(em, tc, "backward_saved", batch, sizes), tag
            worst = max(worst, _check_gradients(em, x, dx, grads, want, f"{tag} backward_saved"))
            if bn:
                dx, grads = np.zeros_like(xs), _grads(em, tc)
                rc = em.fn("backward_frozen")(*em.lead, em.p(xs), em.p(dys), em.p(dx),
                                              *[em.p(a) for a in grads.values()], batch, *S, None)
                assert rc == 0, tag
                assert em.launches() == _train_launches(em, tc, "backward_frozen", batch, sizes), tag
                want = reference.backward_frozen(layer, x, dy)
                worst = max(worst, _check_gradients(em, x, dx, grads, want, f"{tag} backward_frozen"))
                # population statistics over every size and batch called so far
                assert em.fn("accumulate")(em.p(acc_struct), em.p(xs), batch, *S, None) == 0
                assert em.launches()[-2:] == _train_launches(em, tc, "accumulate", batch, sizes), tag
                population = reference.population_accumulate(layer, population, x)
    if bn:
        tm, tv = (np.zeros(layer.channels, np.float64 if tc.A == "double" else np.float32) for _ in range(2))
        assert em.fn("finalize")(em.p(acc_struct), em.p(tm), em.p(tv), None) == 0
        wm, wv = reference.population_finalize(layer, population)
        _cuda_close(tm, wm, layer, "population mean")
        _cuda_close(tv, wv, layer, "population variance")
    print(f"{layer.name}: max |dx - reference| {worst:.3g}")


@needs_emu
def test_runtime_size_errors_training_emulated(dyn_lib):
    """The training launchers return NAME_ERR_SIZE (6) for a size < 1, launching nothing."""
    for layer, _ in DYN_CASES[:4]:
        em = SizedEmu(dyn_lib, layer)
        tc = lower_train_cuda(lower_cuda(layer))
        x = _dyn_data(layer, 1, {n: 2 for n in layer.sizes})
        xs = em.store(x)
        grads = [em.p(a) for a in _grads(em, tc).values()]
        ws = np.zeros(4096, np.float64)
        bad = [0 if i == 0 else 2 for i in range(len(layer.sizes))]
        saved = [em.p(np.zeros(64)), em.p(np.zeros(64))]
        run = [em.p(em.store(layer.trained_mean_values)), em.p(em.store(layer.trained_variance_values))] \
            if layer.kind == "batchnorm" else []
        rcs = [
            em.fn("backward")(*em.lead, em.p(xs), em.p(xs), em.p(xs), *grads, 1, *bad, em.p(ws),
                              ctypes.c_size_t(ws.nbytes), None),
            em.fn("backward_saved")(*em.lead, em.p(xs), em.p(xs), *saved, em.p(xs), *grads, 1, *bad, em.p(ws),
                                    ctypes.c_size_t(ws.nbytes), None),
            em.fn("train_forward_save")(*em.lead, em.p(xs), em.p(xs), 1, *bad, *run, *saved, None),
        ]
        if layer.kind == "batchnorm":
            acc_struct = np.zeros(1 + 2 * layer.channels, np.float64)
            rcs += [em.fn("backward_frozen")(*em.lead, em.p(xs), em.p(xs), em.p(xs), *grads, 1, *bad, None),
                    em.fn("accumulate")(em.p(acc_struct), em.p(xs), 1, *bad, None)]
        assert rcs == [6] * len(rcs), (layer.name, rcs)
        assert em.launches() == []
        assert em.fn("backward_workspace_size")(1, *bad) == 0
