"""Batch norm folded into the conv/linear layer before it (``normgen.fold``, ``normgen fold``).

Against PyTorch (Conv1d/2d/3d with groups, Linear, ConvTranspose2d, then BatchNorm in eval mode),
against normgen.reference's batch-norm predict, in the Keras and MATLAB weight layouts, and the
command's round trip and errors.

Tolerances: the folded layer and the unfolded pair each compute a sum of K products (K = the
weight's inputs per output, + 1 for the bias) and a few more roundings per element, so each is
within γ_(K+4)·M ≈ (K + 4)·u·M of the exact value, u = eps/2 of the dtype and M the same sums
taken over absolute values (|a|·(|x| ⊛ |W| + |bias|) + |μ·a| + |β|). Their difference is held to
twice that, (K + 4)·eps·M: rounding cannot exceed it, and a fold that is wrong in any term
(ε left out, μ or β misplaced) misses by a fraction of M itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normgen
from normgen import BatchNorm, GroupNorm, LayerNorm, NormgenError, fold, load_spec, reference
from normgen.cli import main


def _bn(channels: int, seed: int, fmt: str = "BC", shape=None, **kw) -> BatchNorm:
    rng = np.random.default_rng(seed)
    args = dict(trained_mean=rng.normal(0.0, 1.0, channels), trained_variance=rng.uniform(0.05, 3.0, channels),
                epsilon=0.05)
    if kw.get("affine", "channel") != "none":
        args["scale"] = rng.normal(1.0, 0.5, channels)
        if kw.get("bias", True):
            args["offset"] = rng.normal(0.0, 0.5, channels)
    args.update(kw)
    return BatchNorm(name="bn", format=fmt, shape=shape or [channels], **args)


def _bound(layer: BatchNorm, absdot: np.ndarray, bias: np.ndarray | None, k: int, eps: float,
           channel_axis: int) -> np.ndarray:
    """(K + 4)·eps·M, M broadcast over the output (channel on ``channel_axis``)."""
    a = np.abs(layer.scale_values) / np.sqrt(layer.trained_variance_values + layer.epsilon)
    b = np.zeros(layer.channels) if bias is None else np.abs(np.asarray(bias, dtype=np.float64))
    shape = [1] * absdot.ndim
    shape[channel_axis] = layer.channels
    m = a.reshape(shape) * (absdot + b.reshape(shape)) + (np.abs(layer.trained_mean_values * a)
                                                          + np.abs(layer.offset_values)).reshape(shape)
    return (k + 4) * eps * m


# ---- reference path (NumPy only) ------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"affine": "none"}], ids=["affine", "no-offset", "no-affine"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_then_reference_predict(kw, with_bias):
    """x @ W′ᵀ + b′ equals normgen.reference's batch-norm predict of x @ Wᵀ + b, in float64."""
    rng = np.random.default_rng(1)
    c, n_in = 7, 5
    layer = _bn(c, 2, **kw)
    w = rng.normal(size=(c, n_in))
    b = rng.normal(size=c) if with_bias else None
    x = rng.normal(size=(9, n_in))
    wf, bf = fold(layer, w, b)
    assert wf.dtype == np.float64 and wf.shape == w.shape and bf.shape == (c,)
    got = x @ wf.T + bf
    want = reference.predict(layer, x @ w.T + (0 if b is None else b))
    tol = _bound(layer, np.abs(x) @ np.abs(w).T, b, n_in + 1, np.finfo(np.float64).eps, 1)
    assert np.all(np.abs(got - want) <= tol)


def test_pointwise_conv_nchw_then_reference_predict():
    """A 1x1 convolution on NCHW data, the batch norm described as format BCSS."""
    rng = np.random.default_rng(3)
    c, cin = 6, 4
    layer = _bn(c, 4, fmt="BCSS", shape=[c, 5, 3])
    w = rng.normal(size=(c, cin, 1, 1))
    b = rng.normal(size=c)
    x = rng.normal(size=(2, cin, 5, 3))
    wf, bf = fold(layer, w, b)
    got = np.einsum("oi,nihw->nohw", wf[:, :, 0, 0], x) + bf[:, None, None]
    want = reference.predict(layer, np.einsum("oi,nihw->nohw", w[:, :, 0, 0], x) + b[:, None, None])
    tol = _bound(layer, np.einsum("oi,nihw->nohw", np.abs(w[:, :, 0, 0]), np.abs(x)), b, cin + 1,
                 np.finfo(np.float64).eps, 1)
    assert np.all(np.abs(got - want) <= tol)


@settings(max_examples=40, deadline=None)
@given(c=st.integers(1, 9), rest=st.lists(st.integers(1, 4), min_size=0, max_size=4), pos=st.integers(0, 4),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_drawn_shapes_and_axes(c, rest, pos, with_bias, seed):
    """Any weight rank and output-channel axis: folding along the axis where the channels are is
    folding the channel-first weight, moved; and the channel-first fold, flattened to a linear
    layer, is the reference's predict after it."""
    rng = np.random.default_rng(seed)
    layer = _bn(c, seed)
    w = rng.normal(size=(c, *rest))
    b = rng.normal(size=c) if with_bias else None
    pos = pos % w.ndim
    wf, bf = fold(layer, w, b)
    moved_wf, moved_bf = fold(layer, np.moveaxis(w, 0, pos), b, axis=pos)
    np.testing.assert_array_equal(np.moveaxis(moved_wf, pos, 0), wf)
    np.testing.assert_array_equal(moved_bf, bf)
    neg_wf, _ = fold(layer, np.moveaxis(w, 0, pos), b, axis=pos - w.ndim)
    np.testing.assert_array_equal(neg_wf, moved_wf)
    k = int(np.prod(rest, dtype=np.int64))
    x = rng.normal(size=(3, k))
    flat, flat_f = w.reshape(c, k), wf.reshape(c, k)
    got = x @ flat_f.T + bf
    want = reference.predict(layer, x @ flat.T + (0 if b is None else b))
    tol = _bound(layer, np.abs(x) @ np.abs(flat).T, b, k + 1, np.finfo(np.float64).eps, 1)
    assert np.all(np.abs(got - want) <= tol)


def test_dtypes():
    """The results take the weight's dtype (float64 for integers); the fold itself is float64."""
    layer = _bn(3, 5)
    w64 = np.random.default_rng(0).normal(size=(3, 2))
    for dt in (np.float16, np.float32, np.float64):
        wf, bf = fold(layer, w64.astype(dt), None)
        assert wf.dtype == dt and bf.dtype == dt
        exact, exact_b = fold(layer, w64.astype(dt).astype(np.float64))
        np.testing.assert_array_equal(wf, exact.astype(dt))  # rounded once, from float64
        np.testing.assert_array_equal(bf, exact_b.astype(dt))
    wf, bf = fold(layer, [[1, 2], [3, 4], [5, 6]], [1, 2, 3])
    assert wf.dtype == np.float64 and bf.dtype == np.float64
    a = layer.scale_values / np.sqrt(layer.trained_variance_values + layer.epsilon)
    np.testing.assert_allclose(wf[:, 1], [2 * a[0], 4 * a[1], 6 * a[2]], rtol=1e-15)


@pytest.mark.parametrize("call, words", [
    (lambda bn: fold(GroupNorm(name="gn", format="BC", shape=[4], num_groups=2), np.ones((4, 3))), ["'gn'", "groupnorm"]),
    (lambda bn: fold(LayerNorm(name="ln", format="BTC", shape=[2, 4]), np.ones((4, 3))), ["'ln'", "layernorm"]),
    (lambda bn: fold("bn", np.ones((4, 3))), ["str"]),
    (lambda bn: fold(bn, np.ones((5, 3))), ["(5, 3)", "5 output channels", "4 channels"]),
    (lambda bn: fold(bn, np.ones((3, 4))), ["(3, 4)", "3 output channels", "axis 0", "4 channels"]),
    (lambda bn: fold(bn, np.ones((4, 3)), axis=2), ["axis 2", "(4, 3)"]),
    (lambda bn: fold(bn, np.ones((4, 3)), axis=-3), ["axis -3"]),
    (lambda bn: fold(bn, np.ones((4, 3)), np.ones(3)), ["bias shape (3,)", "(4,)"]),
    (lambda bn: fold(bn, np.ones((4, 3)), np.ones((4, 1))), ["bias shape (4, 1)"]),
    (lambda bn: fold(bn, np.float32(1.0)), ["scalar"]),
    (lambda bn: fold(bn, np.ones((4, 3), dtype=complex)), ["complex128"]),
    (lambda bn: fold(bn, np.full((4, 3), np.nan)), ["nan", "weight"]),
])
def test_errors_name_the_bad_value(call, words):
    with pytest.raises(NormgenError) as info:
        call(_bn(4, 0))
    for w in words:
        assert w in str(info.value)


# ---- PyTorch --------------------------------------------------------------------------------------

torch_cases = pytest.mark.parametrize("dtype", ["float32", "float64"])


def _torch():
    return pytest.importorskip("torch", reason="the PyTorch comparisons need torch (pip install 'normgen[torch]')")


def _trained_bn(torch, bn, seed: int):
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(1.0 + 0.5 * torch.randn(c, generator=g))
        bn.bias.copy_(0.5 * torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(0.05 + 3.0 * torch.rand(c, generator=g))
    return bn.eval()


CONVS = {  # name: (spatial dims, kernel)
    "conv1d": (1, 3), "conv2d": (2, 3), "conv3d": (3, 2),
}


@torch_cases
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_then_batchnorm_against_torch(conv, with_bias, groups, dtype):
    torch = _torch()
    nn = torch.nn
    dims, k = CONVS[conv]
    cin, cout = 4, 6
    tdt = getattr(torch, dtype)
    torch.manual_seed(groups * 10 + dims)
    conv_mod = getattr(nn, f"Conv{dims}d")(cin, cout, k, groups=groups, bias=with_bias).to(tdt).eval()
    bn_mod = _trained_bn(torch, getattr(nn, f"BatchNorm{dims}d")(cout, eps=0.05).to(tdt), dims)
    x = torch.randn(2, cin, *([7] * dims), dtype=tdt)
    with torch.no_grad():
        want = bn_mod(conv_mod(x))
        spatial = list(want.shape[2:])
        layer = normgen.from_torch(bn_mod, shape=[cout, *spatial], name="bn")
        w = conv_mod.weight.detach().numpy()
        b = conv_mod.bias.detach().numpy() if with_bias else None
        wf, bf = fold(layer, w, b)
        assert wf.dtype == np.dtype(dtype) and bf.dtype == np.dtype(dtype)
        conv_fn = getattr(torch.nn.functional, f"conv{dims}d")
        got = conv_fn(x, torch.from_numpy(wf), torch.from_numpy(bf), groups=groups).numpy()
        absdot = conv_fn(x.double().abs(), conv_mod.weight.double().abs(), groups=groups).numpy()
    kk = cin // groups * k**dims + 1
    tol = _bound(layer, absdot, b, kk, np.finfo(dtype).eps, 1)
    assert np.all(np.abs(got - want.numpy()) <= tol), np.max(np.abs(got - want.numpy()) / tol)


@torch_cases
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_linear_then_batchnorm1d_against_torch(with_bias, dtype):
    torch = _torch()
    nn = torch.nn
    tdt = getattr(torch, dtype)
    torch.manual_seed(5)
    lin = nn.Linear(12, 8, bias=with_bias).to(tdt)
    bn_mod = _trained_bn(torch, nn.BatchNorm1d(8, eps=0.05).to(tdt), 5)
    x = torch.randn(16, 12, dtype=tdt)
    with torch.no_grad():
        want = bn_mod(lin(x)).numpy()
        layer = normgen.from_torch(bn_mod, shape=[8], name="bn")
        b = lin.bias.detach().numpy() if with_bias else None
        wf, bf = fold(layer, lin.weight.detach().numpy(), b)
        got = torch.nn.functional.linear(x, torch.from_numpy(wf), torch.from_numpy(bf)).numpy()
        absdot = (x.double().abs() @ lin.weight.double().abs().T).numpy()
    tol = _bound(layer, absdot, b, 12 + 1, np.finfo(dtype).eps, 1)
    assert np.all(np.abs(got - want) <= tol)


@torch_cases
def test_conv_transpose_axis_1_against_torch(dtype):
    """PyTorch ConvTranspose2d's weight is [Cin, Cout, kh, kw]: axis=1."""
    torch = _torch()
    nn = torch.nn
    tdt = getattr(torch, dtype)
    torch.manual_seed(6)
    convt = nn.ConvTranspose2d(3, 5, 3, stride=2).to(tdt)
    bn_mod = _trained_bn(torch, nn.BatchNorm2d(5, eps=0.05).to(tdt), 6)
    x = torch.randn(2, 3, 4, 5, dtype=tdt)
    with torch.no_grad():
        want = bn_mod(convt(x)).numpy()
        layer = normgen.from_torch(bn_mod, shape=[5, *want.shape[2:]], name="bn")
        with pytest.raises(NormgenError, match="3 output channels on axis 0"):
            fold(layer, convt.weight.detach().numpy(), convt.bias.detach().numpy())
        wf, bf = fold(layer, convt.weight.detach().numpy(), convt.bias.detach().numpy(), axis=1)
        got = torch.nn.functional.conv_transpose2d(x, torch.from_numpy(wf), torch.from_numpy(bf), stride=2).numpy()
        absdot = torch.nn.functional.conv_transpose2d(x.double().abs(), convt.weight.double().abs(), stride=2).numpy()
    tol = _bound(layer, absdot, convt.bias.detach().numpy(), 3 * 9 + 1, np.finfo(dtype).eps, 1)
    assert np.all(np.abs(got - want) <= tol)


@torch_cases
def test_keras_and_matlab_layouts(dtype):
    """Keras Conv2D kernels and MATLAB convolution2dLayer Weights are [kh, kw, Cin, Cout] (axis -1
    or 3), Keras Dense kernels [in, out] (axis -1), MATLAB fullyConnectedLayer Weights [out, in]
    (axis 0): folded there and moved to PyTorch's layout, the same numbers, and the same output as
    conv/linear then batch norm."""
    torch = _torch()
    nn = torch.nn
    tdt = getattr(torch, dtype)
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 6, 3, bias=True).to(tdt)
    bn_mod = _trained_bn(torch, nn.BatchNorm2d(6, eps=0.05).to(tdt), 7)
    x = torch.randn(2, 3, 8, 8, dtype=tdt)
    with torch.no_grad():
        want = bn_mod(conv(x)).numpy()
        layer = normgen.from_torch(bn_mod, shape=[6, 6, 6], name="bn")
        w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
        hwio = np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # Keras / MATLAB [kh, kw, Cin, Cout]
        for axis in (-1, 3):
            wf, bf = fold(layer, hwio, b, axis=axis)
            torch_wf = np.ascontiguousarray(wf.transpose(3, 2, 0, 1))
            np.testing.assert_array_equal(torch_wf, fold(layer, w, b)[0])
            got = torch.nn.functional.conv2d(x, torch.from_numpy(torch_wf), torch.from_numpy(bf)).numpy()
            absdot = torch.nn.functional.conv2d(x.double().abs(), conv.weight.double().abs()).numpy()
            tol = _bound(layer, absdot, b, 3 * 9 + 1, np.finfo(dtype).eps, 1)
            assert np.all(np.abs(got - want) <= tol)
        lin = nn.Linear(10, 6).to(tdt)
        bn1 = _trained_bn(torch, nn.BatchNorm1d(6, eps=0.05).to(tdt), 8)
        xl = torch.randn(5, 10, dtype=tdt)
        want = bn1(lin(xl)).numpy()
        layer1 = normgen.from_torch(bn1, shape=[6], name="bn1")
        lw, lb = lin.weight.detach().numpy(), lin.bias.detach().numpy()
        dense_wf, dense_bf = fold(layer1, np.ascontiguousarray(lw.T), lb, axis=-1)  # Keras Dense [in, out]
        fc_wf, fc_bf = fold(layer1, lw, lb, axis=0)  # MATLAB fullyConnectedLayer [out, in]
        np.testing.assert_array_equal(dense_wf.T, fc_wf)
        np.testing.assert_array_equal(dense_bf, fc_bf)
        got = (xl.numpy() @ dense_wf + dense_bf)
        tol = _bound(layer1, np.abs(xl.double().numpy()) @ np.abs(lw.astype(np.float64)).T, lb, 11,
                     np.finfo(dtype).eps, 1)
        assert np.all(np.abs(got - want) <= tol)


# ---- the command ----------------------------------------------------------------------------------

SPEC = """
[[layer]]
name = "bn"
kind = "batchnorm"
format = "BCSS"
shape = [4, 5, 5]
epsilon = 0.01
params = "bn.npz"
"""

TWO = SPEC + """
[[layer]]
name = "gn"
kind = "groupnorm"
format = "BCSS"
shape = [4, 5, 5]
num_groups = 2
"""


def _files(tmp_path: Path, spec: str = SPEC, weights: dict | None = None) -> tuple[Path, Path]:
    rng = np.random.default_rng(9)
    np.savez(tmp_path / "bn.npz", scale=rng.normal(1, 0.3, 4), offset=rng.normal(0, 0.3, 4),
             trained_mean=rng.normal(0, 1, 4), trained_variance=rng.uniform(0.1, 2, 4))
    (tmp_path / "spec.toml").write_text(spec)
    if weights is None:
        weights = {"weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
                   "bias": rng.normal(size=4).astype(np.float32)}
    np.savez(tmp_path / "w.npz", **weights)
    return tmp_path / "spec.toml", tmp_path / "w.npz"


def test_cli_round_trip(tmp_path, capsys):
    spec, w = _files(tmp_path)
    out = tmp_path / "folded.npz"
    assert main(["fold", str(spec), "--weights", str(w), "-o", str(out)]) == 0
    assert "folded.npz" in capsys.readouterr().out
    (layer,) = load_spec(spec)
    with np.load(w) as given, np.load(out) as got:
        assert sorted(got.files) == ["bias", "weight"]
        want_w, want_b = fold(layer, given["weight"], given["bias"])
        assert got["weight"].dtype == np.float32
        np.testing.assert_array_equal(got["weight"], want_w)
        np.testing.assert_array_equal(got["bias"], want_b)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    # Keras layout, no bias, --layer in a spec of two
    spec2, w2 = _files(tmp_path, TWO, {"weight": np.ones((3, 3, 2, 4))})
    out2 = tmp_path / "keras.npz"
    assert main(["fold", str(spec2), "--weights", str(w2), "-o", str(out2), "--layer", "bn", "--axis", "-1"]) == 0
    with np.load(out2) as got:
        want_w, want_b = fold(layer, np.ones((3, 3, 2, 4)), None, axis=-1)
        np.testing.assert_array_equal(got["weight"], want_w)
        np.testing.assert_array_equal(got["bias"], want_b)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("case", [
    "missing-weights", "weights-dir", "extra-key", "no-weight", "wrong-shape", "bias-shape", "not-npz", "groupnorm",
    "several-layers", "unknown-layer", "bad-axis", "output-dir", "output-folder-missing",
])
def test_cli_errors(case, tmp_path, capsys):
    spec, w = _files(tmp_path, TWO if case in ("groupnorm", "several-layers", "unknown-layer") else SPEC)
    out = tmp_path / "out.npz"
    extra: list[str] = []
    expect = {
        "missing-weights": "nothere.npz", "weights-dir": "is not a file", "extra-key": "'kernel'", "no-weight": "no array 'weight'",
        "wrong-shape": "4 channels", "bias-shape": "bias shape (5,)", "not-npz": "not a readable .npz",
        "groupnorm": "groupnorm", "several-layers": "--layer", "unknown-layer": "'nope'", "bad-axis": "axis 4",
        "output-dir": "is a directory", "output-folder-missing": "cannot write",
    }[case]
    if case == "missing-weights":
        w = tmp_path / "nothere.npz"
    elif case == "weights-dir":
        w.unlink()
        w.mkdir()
    elif case == "extra-key":
        np.savez(w, weight=np.ones((4, 3)), kernel=np.ones((4, 3)))
    elif case == "no-weight":
        np.savez(w, bias=np.ones(4))
    elif case == "wrong-shape":
        np.savez(w, weight=np.ones((5, 3)))
    elif case == "bias-shape":
        np.savez(w, weight=np.ones((4, 3)), bias=np.ones(5))
    elif case == "not-npz":
        w.write_bytes(b"not a zip archive at all")
    elif case == "groupnorm":
        extra = ["--layer", "gn"]
    elif case == "unknown-layer":
        extra = ["--layer", "nope"]
    elif case == "bad-axis":
        extra = ["--axis", "4"]
    elif case == "output-dir":
        out = tmp_path / "adir"
        out.mkdir()
    elif case == "output-folder-missing":
        out = tmp_path / "missing" / "out.npz"
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["fold", str(spec), "--weights", str(w), "-o", str(out), *extra])
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normgen: error: "), captured.err
    assert expect in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left
    if case != "output-dir":
        assert not out.exists()
