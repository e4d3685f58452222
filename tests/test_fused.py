"""The fused forms (README "Fused forms"): residual add with h out, activation, adaLN modulation.

Three tiers: the description and its errors; the reference against PyTorch compositions and
autograd; the generated C (compiled with cffi) against the reference, every public function of
hypothesis-drawn kinds × formats × fusions × dtypes."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normgen
from normgen import reference
from normgen.errors import NormgenError
from normgen.harness.check import check_layer
from normgen.lowering import lower
from normgen.targets.calls import fused_reference
from normgen.targets.render import emit

KINDS = {
    "batchnorm": normgen.BatchNorm,
    "groupnorm": normgen.GroupNorm,
    "layernorm": normgen.LayerNorm,
    "instancenorm": normgen.InstanceNorm,
    "rmsnorm": normgen.RMSNorm,
}
#: (kind, format, shape, extra arguments): every kind, channels first and last, run-time sizes,
#: element affine, a format without B and one with C before B.
CASES = [
    ("batchnorm", "BCS", [6, 10], {}),
    ("batchnorm", "BSSC", [3, 4, 8], {}),
    ("groupnorm", "BCS", [8, 10], {"num_groups": 2}),
    ("groupnorm", "BSC", ["S", 8], {"num_groups": 4}),
    ("layernorm", "BTC", ["T", 8], {}),
    ("layernorm", "BTC", [5, 8], {"affine": "element"}),
    ("layernorm", "BCS", [8, 9], {"operation_dimension": "batch-excluded"}),
    ("rmsnorm", "BTC", [5, 8], {}),
    ("rmsnorm", "BTC", [5, 8], {"bias": True}),
    ("instancenorm", "BCS", [8, 9], {}),
    ("instancenorm", "SCB", [9, 8], {}),
    ("layernorm", "TC", [6, 8], {}),
]
FUSIONS = [
    {"residual": True},
    {"residual": True, "residual_out": True},
    {"activation": "relu"},
    {"activation": "silu"},
    {"activation": "gelu"},
    {"activation": "gelu_tanh"},
    {"modulation": "adaln"},
    {"residual": True, "activation": "silu"},
    {"residual": True, "residual_out": True, "activation": "gelu_tanh", "modulation": "adaln"},
]


def make(kind, fmt, shape, extra, fusion, dtype="float32", name="fz"):
    return KINDS[kind](name=name, format=fmt, shape=shape, dtype=dtype, **extra, **fusion)


# ---- the description ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    ({"residual_out": True}, "residual_out = true writes h = x + residual; it needs residual = true"),
    ({"activation": "tanh"}, "activation 'tanh' is not one of 'none', 'relu', 'silu', 'gelu', 'gelu_tanh'"),
    ({"modulation": "film"}, "modulation 'film' is not one of 'none', 'adaln'"),
    ({"residual": "yes"}, "residual must be true or false, got 'yes'"),
])
def test_bad_fusion_is_an_error_naming_it(bad, message):
    with pytest.raises(NormgenError, match=re.escape(message)):
        normgen.LayerNorm(name="ln", format="BTC", shape=[4, 8], **bad)


def test_spec_keys_and_provenance(tmp_path):
    spec = tmp_path / "f.toml"
    spec.write_text('[[layer]]\nname = "ln"\nkind = "layernorm"\nformat = "BTC"\nshape = [4, 8]\n'
                    'residual = true\nresidual_out = true\nactivation = "silu"\nmodulation = "adaln"\n')
    (layer,) = normgen.load_spec(spec)
    assert (layer.residual, layer.residual_out, layer.activation, layer.modulation) == (True, True, "silu", "adaln")
    header = emit(layer)["ln.h"]
    assert re.search(r"activation +silu", header) and re.search(r"modulation +adaln", header)
    assert ("int ln_predict(const float *x, const float *residual, const float *mod_shift, const float *mod_scale,"
            " float *y, float *h, int32_t batch);") in header
    # the cores are the file's own
    assert "_core" not in header and "static int ln_predict_core(" in emit(layer)["ln.c"]


def test_plain_layers_have_no_stages():
    plan = lower(normgen.LayerNorm(name="ln", format="BTC", shape=[4, 8]))
    assert plan.fusion is None and not any(f.static for f in plan.public_functions)
    assert "_act" not in emit(normgen.LayerNorm(name="ln", format="BTC", shape=[4, 8]))["ln.c"]


def test_activation_or_modulation_drops_the_backwards_that_cannot_undo_it():
    roles = {f.role for f in lower(make("batchnorm", "BCS", [4, 8], {}, {"activation": "silu"})).public_functions}
    assert "backward_saved" in roles and "backward" not in roles and "backward_frozen" not in roles
    roles = {f.role for f in lower(make("batchnorm", "BCS", [4, 8], {}, {"residual": True})).public_functions}
    assert {"backward", "backward_saved", "backward_frozen"} <= roles


# ---- the reference against PyTorch --------------------------------------------------------------


def _torch():
    """PyTorch, imported per test: the C tiers run without it."""
    return pytest.importorskip("torch")


def test_reference_rms_norm_of_a_sum_is_torchs():
    t = _torch()
    rng = np.random.default_rng(0)
    layer = normgen.RMSNorm(name="r", format="BTC", shape=[5, 16], residual=True, residual_out=True,
                            scale=rng.standard_normal(16), dtype="float64")
    x, r = rng.standard_normal((3, 5, 16)), rng.standard_normal((3, 5, 16))
    want = t.nn.functional.rms_norm(t.tensor(x + r), (16,), t.tensor(layer.scale_values), 1e-5).numpy()
    assert np.abs(reference.predict(layer, x, residual=r) - want).max() < 1e-12


def test_reference_silu_of_group_norm_is_torchs():
    t = _torch()
    rng = np.random.default_rng(1)
    layer = normgen.GroupNorm(name="g", format="BCSS", shape=[8, 4, 4], num_groups=2, activation="silu",
                              scale=rng.standard_normal(8), offset=rng.standard_normal(8))
    x = rng.standard_normal((2, 8, 4, 4))
    F = t.nn.functional
    want = F.silu(F.group_norm(t.tensor(x), 2, t.tensor(layer.scale_values), t.tensor(layer.offset_values))).numpy()
    assert np.abs(reference.predict(layer, x) - want).max() < 1e-12


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_reference_activations_are_torchs(act):
    t = _torch()
    F = t.nn.functional
    ops = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}
    z = np.linspace(-9, 9, 1001)
    assert np.abs(reference.activate(act, z) - ops[act](t.tensor(z)).numpy()).max() < 1e-12
    zt = t.tensor(z, requires_grad=True)
    ops[act](zt).sum().backward()
    assert np.abs(reference.activation_grad(act, z) - zt.grad.numpy()).max() < 1e-12


def test_reference_adaln_is_dits_modulate():
    t = _torch()
    rng = np.random.default_rng(2)
    layer = normgen.LayerNorm(name="dit", format="BTC", shape=[6, 12], affine="none", epsilon=1e-6, modulation="adaln")
    x, shift, scale = rng.standard_normal((2, 6, 12)), rng.standard_normal((2, 12)), rng.standard_normal((2, 12))
    z = t.nn.functional.layer_norm(t.tensor(x), (12,), eps=1e-6)
    want = (z * (1 + t.tensor(scale).unsqueeze(1)) + t.tensor(shift).unsqueeze(1)).numpy()  # DiT's modulate
    assert np.abs(reference.predict(layer, x, mod_shift=shift, mod_scale=scale) - want).max() < 1e-12


@pytest.mark.parametrize("kind, fmt, shape, extra", [c for c in CASES if c[1] in ("BTC", "BCS", "SCB")])
def test_reference_backward_is_autograds(kind, fmt, shape, extra):
    """dx (the gradient of x and of residual, dh added), dscale, doffset, dmod_shift, dmod_scale
    of the fully fused layer against autograd of the same composition in float64."""
    t = _torch()
    layer = make(kind, fmt, shape, extra, FUSIONS[-1], dtype="float64")
    sizes = {n: 4 for n in layer.sizes}
    layer = layer.at_sizes(sizes) if sizes else layer
    rng = np.random.default_rng(3)
    xs = reference.full_shape(layer, 3)
    x, r = (t.tensor(rng.standard_normal(xs), requires_grad=True) for _ in range(2))
    ms, mc = (t.tensor(rng.standard_normal(3 * layer.channels), requires_grad=True) for _ in range(2))
    h = x + r
    hn = h.detach().numpy()
    mean, inv = reference.saved_statistics(layer, hn)
    # the composition in torch, from the reference's own statistics (which the forward test checks)
    view, axes, _ = reference.grouped_view(layer, h.detach().numpy())
    hv = h.reshape(view.shape)
    mu = hv.mean(dim=axes, keepdim=True) if reference.semantics(layer).centered else 0
    var = ((hv - mu) ** 2).mean(dim=axes, keepdim=True)
    ps = reference._affine_shape(layer, h.dim())
    z = ((hv - mu) / t.sqrt(var + layer.epsilon)).reshape(h.shape)
    z = z * t.tensor(layer.scale_values).reshape(ps) + t.tensor(layer.offset_values).reshape(ps)
    letters = layer.fmt.letters
    bc = [-1 if ch == "B" else layer.channels if ch == "C" else 1 for ch in letters]
    first = letters.index("C") < letters.index("B")
    sh = (ms.reshape(3, -1).T if first else ms.reshape(3, -1)).reshape(bc)
    sc = (mc.reshape(3, -1).T if first else mc.reshape(3, -1)).reshape(bc)
    y = t.nn.functional.gelu(z * (1 + sc) + sh, approximate="tanh")
    fused = {"residual": r.detach().numpy(), "mod_shift": ms.detach().numpy(), "mod_scale": mc.detach().numpy()}
    forward = reference.train_forward(layer, x.detach().numpy(), **fused)[0] if kind == "batchnorm" else \
        reference.predict(layer, x.detach().numpy(), **fused)  # batch statistics, as the composition's
    assert np.abs(y.detach().numpy() - forward).max() < 1e-12
    dy, dh = t.tensor(rng.standard_normal(xs)), t.tensor(rng.standard_normal(xs))
    ((y * dy).sum() + (h * dh).sum()).backward()
    dx, _, _, dms, dmc = reference.backward_saved(layer, hn, dy.numpy(), mean, inv, dh=dh.numpy(),
                                                  mod_shift=ms.detach().numpy(), mod_scale=mc.detach().numpy())
    for got, want in ((dx, x.grad), (dx, r.grad), (dms, ms.grad), (dmc, mc.grad)):
        assert np.abs(got - want.numpy().reshape(got.shape)).max() < 1e-10


def test_reference_fused_inputs_are_checked():
    layer = normgen.LayerNorm(name="ln", format="BTC", shape=[4, 8], residual=True, modulation="adaln")
    x = np.zeros((2, 4, 8))
    with pytest.raises(NormgenError, match="residual must be shaped like x"):
        reference.predict(layer, x, mod_shift=np.zeros(16), mod_scale=np.zeros(16))
    with pytest.raises(NormgenError, match=r"mod_scale must hold \[batch, C\] = \[2, 8\] values, got shape \(8,\)"):
        reference.predict(layer, x, residual=x, mod_shift=np.zeros(16), mod_scale=np.zeros(8))


# ---- the generated C ------------------------------------------------------------------------------


def _compiled(layer):
    from normgen.targets.c.build import CompiledLayer

    return CompiledLayer(layer)


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), fusion=st.sampled_from(FUSIONS), dtype=st.sampled_from(["float32", "float64"]),
       batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_c_matches_the_reference(case, fusion, dtype, batch, seed):
    """Every public function of a drawn fused layer, every output, within the dtype's tolerance."""
    kind, fmt, shape, extra = case
    layer = make(kind, fmt, shape, extra, fusion, dtype)
    compiled = _compiled(layer)
    sizes = [{n: 5 for n in layer.sizes}] if layer.sizes else None
    rows = check_layer(compiled, layer, batches=(batch,), seed=seed, training=True, sizes=sizes)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    functions = {r.function.split(":")[0].split("[")[0] for r in rows}
    assert "predict" in functions and "backward_saved" in functions


def test_c_every_kind_and_fusion_compiles_warning_free(tmp_path):
    """-Wall -Wextra -pedantic -Werror (C99) for every case × fusion, float32 and float64."""
    for kind, fmt, shape, extra in CASES:
        for fusion in FUSIONS:
            for dtype in ("float32", "float64"):
                files = emit(make(kind, fmt, shape, extra, fusion, dtype))
                for name, text in files.items():
                    (tmp_path / name).write_text(text)
                cmd = ["gcc", "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O2", "-c",
                       str(tmp_path / "fz.c"), "-o", str(tmp_path / "fz.o")]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                assert proc.returncode == 0, (kind, fmt, fusion, dtype, proc.stderr)


def test_c_residual_into_y_in_place_and_h_out():
    """residual without h out normalizes x + residual in y (y may be x); with h out, h is written."""
    rng = np.random.default_rng(4)
    layer = normgen.LayerNorm(name="rin", format="BTC", shape=[7, 16], residual=True)
    c = _compiled(layer)
    x, r = rng.standard_normal((2, 7, 16)).astype(np.float32), rng.standard_normal((2, 7, 16)).astype(np.float32)
    want = reference.predict(layer, x, residual=r)
    buf = x.copy()
    rc = c._lib.rin_predict(c._ptr(buf), c._ptr(r), c._ptr(buf), 2)
    assert rc == 0 and np.abs(buf - want).max() < 1e-5
    layer = normgen.LayerNorm(name="rout", format="BTC", shape=[7, 16], residual=True, residual_out=True)
    out = _compiled(layer).run("predict", x=x, residual=r)
    assert np.array_equal(out["h"], x + r) and np.abs(out["y"] - want).max() < 1e-5


def test_c_errors_leave_outputs_untouched():
    layer = normgen.LayerNorm(name="err", format="BTC", shape=[3, 8], residual=True, residual_out=True)
    c = _compiled(layer)
    x = np.ones((1, 3, 8), np.float32)
    y, h = np.full_like(x, 7), np.full_like(x, 7)
    ffi = c.ffi
    assert c._lib.err_predict(c._ptr(x), ffi.NULL, c._ptr(y), c._ptr(h), 1) == 1  # ERR_NULL: residual
    assert c._lib.err_predict(c._ptr(x), c._ptr(x), c._ptr(y), c._ptr(h), 0) == 2  # ERR_BATCH
    assert (y == 7).all() and (h == 7).all()


def test_c_large_mean_with_a_residual_stays_exact():
    """x + residual = 1e4 + N(0, 1e-2) in float32: h normalized to the float32 tolerance (the
    core's exact statistics, on h as float32 holds it)."""
    rng = np.random.default_rng(5)
    layer = normgen.LayerNorm(name="big", format="BTC", shape=[4, 4096], residual=True)
    x = (5e3 + 1e-2 * rng.standard_normal((1, 4, 4096))).astype(np.float32)
    r = np.full_like(x, 5e3)
    y = _compiled(layer).run("predict", x=x, residual=r)["y"]
    want = reference.predict(layer, x, residual=r)
    assert np.abs(y - want).max() <= 2e-5 * (1 + np.abs(want).max())


def test_fused_reference_names_every_output():
    layer = make("batchnorm", "BCS", [4, 8], {}, {"residual": True, "residual_out": True})
    x = np.random.default_rng(6).standard_normal((2, 4, 8))
    out = fused_reference(layer, "train_forward_save", {"x": x, "residual": x},
                          (np.zeros(4), np.ones(4)))
    assert set(out) == {"h", "y", "running_mean", "running_var", "saved_mean", "saved_invstd"}


def test_mex_gateway_of_a_fused_layer_under_octave(tmp_path):
    """`--target mex` over a fused layer: MATLAB's C x T x B arrays (and C-by-batch modulation)
    through the gateway built with mkoctfile, against the reference."""
    import shutil

    if not (shutil.which("octave") and shutil.which("mkoctfile")):
        pytest.skip("octave and mkoctfile are not installed (apt-get install octave liboctave-dev)")
    sio = pytest.importorskip("scipy.io")
    layer = normgen.LayerNorm(name="fmx", format="BTC", shape=["T", 8], residual=True, residual_out=True,
                              activation="gelu", modulation="adaln")
    for name, text in emit(layer, "mex").items():
        (tmp_path / name).write_text(text)
    subprocess.run(["mkoctfile", "--mex", "fmx_mex.c", "fmx.c", "-o", "fmx_mex"], cwd=tmp_path, check=True,
                   capture_output=True)
    rng = np.random.default_rng(7)
    b, t, c = 2, 5, 8
    x, r, dy, dh = (rng.standard_normal((b, t, c)).astype(np.float32) for _ in range(4))
    ms, mc = (rng.standard_normal((b, c)).astype(np.float32) for _ in range(2))
    m = {"x": x, "r": r, "dy": dy, "dh": dh}
    sio.savemat(tmp_path / "in.mat", {**{k: np.asfortranarray(v.transpose(2, 1, 0)) for k, v in m.items()},
                                      "ms": np.asfortranarray(ms.T), "mc": np.asfortranarray(mc.T)})
    script = ("load in.mat; [y, h, sm, si] = fmx_mex('train_forward_save', x, r, ms, mc);"
              " [dx, ds, doff, dms, dmc] = fmx_mex('backward_saved', h, dy, dh, ms, mc, sm, si);"
              " save('-v7', 'out.mat', 'y', 'h', 'dx', 'dms', 'dmc');")
    subprocess.run(["octave", "--no-gui", "-q", "--eval", script], cwd=tmp_path, check=True, capture_output=True)
    out = sio.loadmat(tmp_path / "out.mat")
    got = {k: out[k].transpose(2, 1, 0) for k in ("y", "h", "dx")}
    bound = layer.at_sizes({"T": t})
    assert np.abs(got["y"] - reference.predict(bound, x, residual=r, mod_shift=ms, mod_scale=mc)).max() < 1e-5
    assert np.array_equal(got["h"], x + r)
    h = (x + r).astype(np.float64)
    mean, inv = reference.saved_statistics(bound, h)
    dx, _, _, dms, dmc = reference.backward_saved(bound, h, dy, mean, inv, dh=dh, mod_shift=ms, mod_scale=mc)
    assert np.abs(got["dx"] - dx).max() < 1e-4
    assert np.abs(out["dms"].T.reshape(-1) - dms).max() < 1e-4 and np.abs(out["dmc"].T.reshape(-1) - dmc).max() < 1e-4


def test_c_backward_saved_in_place_on_dy():
    """An activated layer's backward_saved with dx == dy (its documented aliasing)."""
    rng = np.random.default_rng(8)
    layer = normgen.LayerNorm(name="alias", format="BTC", shape=[6, 16], activation="silu")
    c = _compiled(layer)
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    saved = c.run("train_forward_save", x=x)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    want = c.run("backward_saved", x=x, dy=dy, saved_mean=saved["saved_mean"], saved_invstd=saved["saved_invstd"])
    buf = dy.copy()
    ds, do = np.empty(16, np.float32), np.empty(16, np.float32)
    acc = c._acc_ptr
    rc = c._lib.alias_backward_saved(c._ptr(x), c._ptr(buf), acc(saved["saved_mean"]), acc(saved["saved_invstd"]),
                                     c._ptr(buf), c._ptr(ds), c._ptr(do), 2)
    assert rc == 0 and np.array_equal(buf, want["dx"]) and np.array_equal(ds, want["dscale"])
