"""The training half of normgen.reference, checked against outside oracles (issue 4):

1. central finite differences of the reference's own forward (float64);
2. PyTorch autograd of torch.nn.functional's norms (and of the generic forward for formats no
   functional takes directly), when torch is installed;
3. the SGD-with-momentum step written out by hand, and population statistics against the
   statistics of the concatenated data.
"""

from __future__ import annotations

import numpy as np
import pytest

from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormgenError, reference

# (format, shape of the non-B dims, batch): every layout family the issue names.
FORMATS = [
    ("BC", [6], 5),
    ("BCSS", [6, 3, 4], 2),
    ("BSSC", [3, 4, 6], 2),
    ("TBC", [4, 6], 3),
    ("BTC", [4, 6], 3),
    ("BCSSS", [6, 2, 3, 2], 2),
    ("BCU", [6, 5], 2),
    ("CSS", [6, 3, 4], 1),  # no B: batch 1
]
FORMAT_IDS = [f[0] for f in FORMATS]


def make_layers(fmt, shape, seed=0):
    rng = np.random.default_rng(seed)
    c = 6
    kw = dict(format=fmt, shape=shape, dtype="float64", epsilon=1e-3,
              scale=rng.normal(1.0, 0.5, c), offset=rng.normal(0.0, 0.5, c))  # fmt: skip
    stats = dict(trained_mean=rng.normal(0.0, 1.0, c), trained_variance=rng.uniform(0.5, 2.0, c))
    return [
        BatchNorm(name="bn", **kw, **stats),
        GroupNorm(name="gn", **kw, num_groups=3),
        GroupNorm(name="gna", **kw, num_groups="allchannels"),
        GroupNorm(name="gnc", **kw, num_groups="channelwise"),
        InstanceNorm(name="inorm", **kw),
        LayerNorm(name="lnc", **kw, operation_dimension="channel-only"),
        LayerNorm(name="lns", **kw, operation_dimension="spatial-channel"),
        LayerNorm(name="lnb", **kw, operation_dimension="batch-excluded"),
    ]


CASES = [(f, layer) for f, shape, _ in FORMATS for layer in make_layers(f, shape)]
CASE_IDS = [f"{f}-{layer.name}" for f, layer in CASES]


def data(layer, batch, seed=1):
    rng = np.random.default_rng(seed)
    shape = reference.full_shape(layer, batch)
    return 1.5 + 2.0 * rng.standard_normal(shape), rng.standard_normal(shape)


def batch_for(fmt):
    return next(b for f, _, b in FORMATS if f == fmt)


def forward_train(layer, x):
    """The training-mode forward whose gradient backward() is: batch statistics for batch norm."""
    mean, var = reference.statistics(layer, x)
    return reference._normalize(layer, x, mean, var)


# ---- 1. finite differences ----------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "layer"), CASES, ids=CASE_IDS)
def test_backward_matches_finite_differences(fmt, layer):
    x, w = data(layer, batch_for(fmt))
    dx, dscale, doffset = reference.backward(layer, x, w)  # dy = w: the gradient of L = Σ w·y
    h = 1e-6

    def loss(xx, lay=layer):
        return float(np.sum(w * forward_train(lay, xx)))

    rng = np.random.default_rng(2)
    for idx in rng.choice(x.size, size=min(x.size, 12), replace=False):
        e = np.zeros(x.size)
        e[idx] = h
        e = e.reshape(x.shape)
        fd = (loss(x + e) - loss(x - e)) / (2 * h)
        assert abs(fd - dx.reshape(-1)[idx]) < 1e-6 * (1 + abs(fd)), (idx, fd, dx.reshape(-1)[idx])
    for c in range(layer.channels):
        e = np.zeros(layer.channels)
        e[c] = h
        for name, grad in (("scale", dscale), ("offset", doffset)):
            base = getattr(layer, f"{name}_values")
            up, down = layer.replace(**{name: base + e}), layer.replace(**{name: base - e})
            fd = (loss(x, up) - loss(x, down)) / (2 * h)
            assert abs(fd - grad[c]) < 1e-6 * (1 + abs(fd)), (name, c, fd, grad[c])


@pytest.mark.parametrize("fmt", FORMAT_IDS)
def test_backward_frozen_matches_finite_differences(fmt):
    shape = next(s for f, s, _ in FORMATS if f == fmt)
    layer = make_layers(fmt, shape)[0]
    x, w = data(layer, batch_for(fmt))
    dx, dscale, doffset = reference.backward_frozen(layer, x, w)
    h = 1e-6

    def loss(xx, lay=layer):
        return float(np.sum(w * reference.predict(lay, xx)))

    # predict is affine in x: the finite difference is exact up to rounding
    for idx in range(0, x.size, max(1, x.size // 10)):
        e = np.zeros(x.size)
        e[idx] = h
        e = e.reshape(x.shape)
        fd = (loss(x + e) - loss(x - e)) / (2 * h)
        assert abs(fd - dx.reshape(-1)[idx]) < 1e-6 * (1 + abs(fd))
    for name, grad in (("scale", dscale), ("offset", doffset)):
        base = getattr(layer, f"{name}_values")
        for c in range(layer.channels):
            e = np.zeros(layer.channels)
            e[c] = h
            fd = (loss(x, layer.replace(**{name: base + e})) - loss(x, layer.replace(**{name: base - e}))) / (2 * h)
            assert abs(fd - grad[c]) < 1e-6 * (1 + abs(fd))


@pytest.mark.parametrize(("fmt", "layer"), CASES[:8], ids=CASE_IDS[:8])
def test_backward_saved_equals_backward(fmt, layer):
    x, dy = data(layer, batch_for(fmt))
    mean, invstd = reference.saved_statistics(layer, x)
    n_stats = layer.channels if layer.kind == "batchnorm" else x.size // reference.count(layer, batch_for(fmt))
    assert mean.shape == invstd.shape == (n_stats,)
    for a, b in zip(
        reference.backward(layer, x, dy), reference.backward_saved(layer, x, dy, mean, invstd), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_saved_layout_is_row_major_over_kept_dims():
    """Group norm BSSC: statistic (b, g) is saved at b * G + g."""
    layer = GroupNorm(name="g", format="BSSC", shape=[2, 3, 6], num_groups=3)
    x, _ = data(layer, 4)
    mean, _ = reference.saved_statistics(layer, x)
    view = x.reshape(4, 2, 3, 3, 2)  # B, S, S, G, C/G
    for b in range(4):
        for g in range(3):
            assert mean[b * 3 + g] == pytest.approx(view[b, :, :, g, :].mean(), rel=1e-13)


@pytest.mark.parametrize("kind", ["bn", "gnc", "lnc"])
def test_single_element_statistics_have_zero_dx(kind):
    """A statistic over one element: x̂ = 0, y = β, so dx = 0 and dscale = 0; doffset = Σ dy."""
    if kind == "bn":
        layer = BatchNorm(name="b", format="BC", shape=[4])
    elif kind == "gnc":
        layer = GroupNorm(name="g", format="BC", shape=[4], num_groups="channelwise")
    else:
        layer = LayerNorm(name="l", format="BSC", shape=[3, 1], operation_dimension="channel-only")
    x, dy = data(layer, 1)
    dx, dscale, doffset = reference.backward(layer, x, dy)
    np.testing.assert_array_equal(dx, 0.0)
    np.testing.assert_array_equal(dscale, 0.0)
    np.testing.assert_allclose(doffset, reference._channel_sum(layer, dy))


# ---- 2. PyTorch autograd -------------------------------------------------------------------


def _torch_grads(torch, fn, x, dy, scale, offset):
    tx, ts, to = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, scale, offset))
    y = fn(tx, ts, to)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return tx.grad.numpy(), ts.grad.numpy(), to.grad.numpy()


def _close(got, want):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def _nchw(x, fmt):
    """x in a channels-second layout (B, C, ...) for torch.nn.functional, and the way back."""
    letters = fmt if "B" in fmt else "B" + fmt
    x = x if "B" in fmt else x[None]
    order = [letters.index("B"), letters.index("C")] + [i for i, ch in enumerate(letters) if ch not in "BC"]
    inverse = np.argsort(order)

    def back(a):
        a = a.transpose(inverse)
        return a if "B" in fmt else a[0]

    return np.ascontiguousarray(x.transpose(order)), back


TORCH_NATIVE = ["BCSS", "BSSC", "BCSSS", "BCU", "CSS"]


@pytest.mark.parametrize("fmt", TORCH_NATIVE)
@pytest.mark.parametrize("which", ["batch_norm", "group_norm", "instance_norm", "frozen"])
def test_torch_functional_autograd(fmt, which):
    torch = pytest.importorskip("torch")
    nnf = torch.nn.functional
    shape = next(s for f, s, _ in FORMATS if f == fmt)
    bn, gn, _, _, inorm, *_ = make_layers(fmt, shape)
    layer = {"batch_norm": bn, "frozen": bn, "group_norm": gn, "instance_norm": inorm}[which]
    x, dy = data(layer, batch_for(fmt))
    xt, back = _nchw(x, fmt)
    dyt, _ = _nchw(dy, fmt)
    eps = layer.epsilon
    if which == "batch_norm":
        fn = lambda t, s, o: nnf.batch_norm(t, None, None, s, o, training=True, eps=eps)  # noqa: E731
        want = reference.backward(layer, x, dy)
    elif which == "frozen":
        rm, rv = (torch.tensor(a) for a in (layer.trained_mean_values, layer.trained_variance_values))
        fn = lambda t, s, o: nnf.batch_norm(t, rm, rv, s, o, training=False, eps=eps)  # noqa: E731
        want = reference.backward_frozen(layer, x, dy)
    elif which == "group_norm":
        fn = lambda t, s, o: nnf.group_norm(t, layer.groups, s, o, eps=eps)  # noqa: E731
        want = reference.backward(layer, x, dy)
    else:
        fn = lambda t, s, o: nnf.instance_norm(t, weight=s, bias=o, eps=eps)  # noqa: E731
        want = reference.backward(layer, x, dy)
    gx, gs, go = _torch_grads(torch, fn, xt, dyt, layer.scale_values, layer.offset_values)
    _close(want, (back(gx), gs, go))


@pytest.mark.parametrize("fmt", ["BTC", "TBC", "BC", "BSSC"])
def test_torch_layer_norm_autograd(fmt):
    """Channel-only layer norm is nnf.layer_norm over the (innermost) C."""
    torch = pytest.importorskip("torch")
    nnf = torch.nn.functional
    shape = next(s for f, s, _ in FORMATS if f == fmt)
    layer = next(la for la in make_layers(fmt, shape) if la.name == "lnc")
    x, dy = data(layer, batch_for(fmt))
    fn = lambda t, s, o: nnf.layer_norm(t, (layer.channels,), s, o, eps=layer.epsilon)  # noqa: E731
    _close(reference.backward(layer, x, dy), _torch_grads(torch, fn, x, dy, layer.scale_values, layer.offset_values))


@pytest.mark.parametrize(("fmt", "layer"), CASES, ids=CASE_IDS)
def test_torch_autograd_of_generic_forward(fmt, layer):
    """Every kind and format: autograd through the forward written in torch (mean/var over the
    grouped view, as DESIGN.md §3 defines it) against the hand-derived backward."""
    torch = pytest.importorskip("torch")
    x, dy = data(layer, batch_for(fmt))
    view_shape = reference.grouped_view(layer, x)[0].shape
    _, axes, _ = reference.grouped_view(layer, x)
    cs = [1] * x.ndim
    cs[layer.fmt.letters.index("C")] = layer.channels

    def fn(t, s, o):
        v = t.reshape(view_shape)
        if not axes:  # torch reads dim=() as "every dim"; here nothing is reduced
            mean, var = v, torch.zeros_like(v)
        else:
            mean = v.mean(dim=axes, keepdim=True)
            var = ((v - mean) ** 2).mean(dim=axes, keepdim=True)
        z = ((v - mean) / torch.sqrt(var + layer.epsilon)).reshape(t.shape)
        return z * s.reshape(cs) + o.reshape(cs)

    _close(reference.backward(layer, x, dy), _torch_grads(torch, fn, x, dy, layer.scale_values, layer.offset_values))


def test_torch_single_element_groups():
    """Group norm with one element per group and layer norm over one channel: PyTorch computes
    them (dx = 0); batch norm with one value per channel PyTorch rejects, normgen computes the
    same limit (documented in docs/training.md)."""
    torch = pytest.importorskip("torch")
    nnf = torch.nn.functional
    layer = GroupNorm(name="g", format="BC", shape=[4], num_groups="channelwise", scale=[1.0, 2.0, -1.0, 0.5])
    x, dy = data(layer, 3)
    fn = lambda t, s, o: nnf.group_norm(t, 4, s, o, eps=layer.epsilon)  # noqa: E731
    _close(reference.backward(layer, x, dy), _torch_grads(torch, fn, x, dy, layer.scale_values, layer.offset_values))
    with pytest.raises(ValueError):
        nnf.batch_norm(torch.zeros(1, 4), None, None, training=True)


# ---- 3. update and population statistics --------------------------------------------------


def test_sgdm_update_by_hand():
    layer = BatchNorm(name="b", format="BC", shape=[3], scale_learn_rate_factor=2.0, offset_learn_rate_factor=0.5,
                      scale_l2_factor=0.0, offset_l2_factor=3.0)  # fmt: skip
    p_s, p_o = np.array([1.0, 2.0, -1.0]), np.array([0.5, 0.0, -0.5])
    g_s, g_o = np.array([0.1, -0.2, 0.3]), np.array([1.0, 2.0, 3.0])
    v_s, v_o = np.array([0.01, 0.02, 0.03]), np.array([-0.1, 0.0, 0.1])
    lr, l2, mom = 0.01, 1e-4, 0.9
    s, o, vs, vo = reference.sgdm_update(layer, p_s, p_o, g_s, g_o, v_s, v_o, learn_rate=lr, l2=l2, momentum=mom)
    want_vs = mom * v_s - lr * 2.0 * (g_s + l2 * 0.0 * p_s)
    want_vo = mom * v_o - lr * 0.5 * (g_o + l2 * 3.0 * p_o)
    np.testing.assert_allclose(vs, want_vs, rtol=1e-15)
    np.testing.assert_allclose(vo, want_vo, rtol=1e-15)
    np.testing.assert_allclose(s, p_s + want_vs, rtol=1e-15)
    np.testing.assert_allclose(o, p_o + want_vo, rtol=1e-15)


def test_sgdm_matches_torch_sgd_without_dampening():
    """With v' = -v/lr the step is PyTorch's SGD (momentum, weight_decay, no dampening)."""
    torch = pytest.importorskip("torch")
    layer = BatchNorm(name="b", format="BC", shape=[3])
    rng = np.random.default_rng(0)
    p = torch.tensor(rng.normal(size=3), requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.8, weight_decay=0.01)
    s, o = p.detach().numpy().copy(), np.zeros(3)
    vs, vo = np.zeros(3), np.zeros(3)
    for _ in range(4):
        g = rng.normal(size=3)
        p.grad = torch.tensor(g)
        opt.step()
        s, o, vs, vo = reference.sgdm_update(
            layer, s, o, g, np.zeros(3), vs, vo, learn_rate=0.05, l2=0.01, momentum=0.8
        )
    np.testing.assert_allclose(s, p.detach().numpy(), rtol=1e-13)


@pytest.mark.parametrize("running_variance", ["unbiased", "biased"])
@pytest.mark.parametrize("fmt", ["BCSS", "BSSC", "TBC", "BC"])
def test_population_equals_concatenated_statistics(fmt, running_variance):
    shape = next(s for f, s, _ in FORMATS if f == fmt)
    layer = make_layers(fmt, shape)[0].replace(running_variance=running_variance)
    rng = np.random.default_rng(3)
    batches = [1e3 + rng.standard_normal(reference.full_shape(layer, b)) for b in (1, 3, 2, 5)]
    state = reference.population_empty(layer)
    for xb in batches:
        state = reference.population_accumulate(layer, state, xb)
    mean, var = reference.population_finalize(layer, state)
    b_axis = layer.fmt.letters.index("B")
    whole = np.concatenate(batches, axis=b_axis)
    c = layer.fmt.letters.index("C")
    rows = np.moveaxis(whole, c, 0).reshape(layer.channels, -1)
    np.testing.assert_allclose(mean, rows.mean(axis=1), rtol=1e-14)
    np.testing.assert_allclose(var, rows.var(axis=1, ddof=1 if running_variance == "unbiased" else 0), rtol=1e-10)
    assert state[0] == rows.shape[1]


def test_population_errors():
    layer = BatchNorm(name="b", format="BC", shape=[2])
    with pytest.raises(NormgenError, match="at least 2 values"):
        reference.population_finalize(layer, reference.population_empty(layer))
    with pytest.raises(NormgenError, match="batch norm"):
        reference.population_accumulate(
            InstanceNorm(name="i", format="BCS", shape=[2, 3]), (0, 0, 0), np.zeros((1, 2, 3))
        )
