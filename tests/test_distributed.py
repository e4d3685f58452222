"""Data-parallel batch norm (issue 20): the generated synchronized functions split over shards in
one process, and normgen.distributed over torch.distributed (gloo, 3 processes on this machine),
against normgen.reference and PyTorch's batch_norm and autograd on the concatenated batch."""

from __future__ import annotations

import socket

import numpy as np
import pytest

import normgen
from normgen import BatchNorm, NormgenError, distributed, reference

from helpers import bn_stats, params

#: (layer keywords, shard sizes): uneven shards, a shard of one sample and an empty one.
CASES = {
    "nchw64": (dict(format="BCSS", shape=[4, 5, 3], dtype="float64"), [1, 0, 5]),
    "nhwc32": (dict(format="BSSC", shape=[3, 4, 6], dtype="float32"), [3, 1, 4]),
    "feat64": (dict(format="BC", shape=[6], dtype="float64", running_variance="biased", mean_decay=0.3,
                    variance_decay=0.2, bias=False), [2, 2, 3]),
    "tokens32": (dict(format="BCT", shape=[5, "t"], dtype="float32", param_storage="runtime"), [2, 3, 1]),
    "tbc64": (dict(format="TBC", shape=[3, 4], dtype="float64", affine="none"), [1, 4, 2]),
}
WORLD = 3
#: (rtol, atol) against the float64 oracles on the float32-rounded input.
TOL = {"float64": (0.0, 1e-9), "float32": (2e-5, 2e-5)}


def _layer(key: str) -> BatchNorm:
    kw, _ = CASES[key]
    channels = kw["shape"][kw["format"].replace("B", "").index("C")]
    extra = {} if kw.get("affine") == "none" else params(channels, 7)
    if kw.get("bias") is False:
        extra.pop("offset", None)
    return BatchNorm(name=f"dp_{key}", **kw, **extra, **bn_stats(channels, 7))


def _data(layer: BatchNorm, shards: list[int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (mean far from 0), a second training batch x2 and dy, in the layer's format and dtype."""
    rng = np.random.default_rng(seed)
    shape = reference.full_shape(layer, sum(shards), {n: 7 for n in layer.sizes})
    x = (rng.standard_normal(shape) * 1.5 + 4.0).astype(layer.dtype)
    x2 = (rng.standard_normal(shape) * 0.5 - 1.0).astype(layer.dtype)
    dy = rng.standard_normal(shape).astype(layer.dtype)
    return x, x2, dy


def _split(layer: BatchNorm, a: np.ndarray, shards: list[int]) -> list[np.ndarray]:
    axis = layer.fmt.letters.index("B")
    return np.split(a, np.cumsum(shards)[:-1], axis=axis)


def _expected(layer: BatchNorm, x, x2, dy):
    """What one process with the whole batch computes (normgen.reference): y of two training
    steps, the running statistics after them, and the backward of the second."""
    y1, rm, rv = reference.train_forward(layer, x, layer.trained_mean_values, layer.trained_variance_values)
    y2, rm, rv = reference.train_forward(layer, x2, rm, rv)
    dx, ds, do = reference.backward(layer, x2, dy)
    has = layer.parameter_arrays()
    return {"y1": y1, "y2": y2, "rm": rm, "rv": rv, "dx": dx, "dscale": ds if "scale" in has else None,
            "doffset": do if "offset" in has else None}


def _close(name, got, want, dtype):
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("key", sorted(CASES))
def test_split_in_one_process_matches_reference(key):
    """The generated functions on shards, merged here without a collective, give the whole batch's
    y, running statistics and gradients; the merge is Chan's and order-independent up to rounding."""
    layer = _layer(key)
    shards = CASES[key][1]
    m = normgen.build(layer)
    x, x2, dy = _data(layer, shards, 1)
    want = _expected(layer, x, x2, dy)
    axis = layer.fmt.letters.index("B")
    ys = {}
    for step, xs in (("y1", x), ("y2", x2)):
        parts = _split(layer, xs, shards)
        stats = m.stats_merge(np.stack([m.sync_stats(p) for p in parts]))
        assert stats[0] == reference.count(layer, sum(shards), {n: 7 for n in layer.sizes})
        mean, inv = m.sync_finish(stats)
        ys[step] = np.concatenate([m.sync_normalize(p, mean, inv) for p in parts], axis=axis)
        _close(step, ys[step], want[step], layer.dtype)
    _close("running_mean", m.running_mean, want["rm"], layer.dtype)
    _close("running_var", m.running_var, want["rv"], layer.dtype)
    parts, dys = _split(layer, x2, shards), _split(layer, dy, shards)
    sums = sum(m.sync_backward_sums(p, d, mean) for p, d in zip(parts, dys, strict=True))
    outs = [m.sync_backward(p, d, mean, inv, sums, stats[0]) for p, d in zip(parts, dys, strict=True)]
    _close("dx", np.concatenate([o[0] for o in outs], axis=axis), want["dx"], layer.dtype)
    for i, g in ((1, "dscale"), (2, "doffset")):
        if want[g] is None:
            assert all(o[i] is None for o in outs)
        else:
            _close(g, outs[0][i], want[g], layer.dtype)


def test_merge_is_chan_and_handles_empty_parts():
    layer = _layer("nchw64")
    m = normgen.build(layer)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 4, 5, 3)) + 1e6, rng.standard_normal((5, 4, 5, 3)) + 1e6
    sa, sb = m.sync_stats(a), m.sync_stats(b)
    empty = m.sync_stats(np.zeros((0, 4, 5, 3)))
    np.testing.assert_array_equal(empty, np.zeros_like(empty))
    merged = m.stats_merge(np.stack([empty, sa, empty, sb]))
    whole = np.concatenate([a, b]).transpose(1, 0, 2, 3).reshape(4, -1)
    assert merged[0] == whole.shape[1]
    np.testing.assert_allclose(merged[1:5], whole.mean(axis=1), rtol=1e-15)
    np.testing.assert_allclose(merged[5:], ((whole - whole.mean(axis=1, keepdims=True)) ** 2).sum(axis=1), rtol=1e-9)
    # by hand, Chan's formula
    n, nb_ = sa[0], sb[0]
    delta = sb[1:5] - sa[1:5]
    np.testing.assert_allclose(merged[1:5], sa[1:5] + delta * nb_ / (n + nb_), rtol=1e-15)
    # an all-empty batch has no statistics: finish refuses and writes nothing
    before = m.running_mean.copy()
    with pytest.raises(NormgenError, match="returned 3"):
        m.sync_finish(m.stats_merge(np.stack([empty, empty])))
    np.testing.assert_array_equal(m.running_mean, before)


def test_errors_without_process_group_or_for_other_kinds():
    pytest.importorskip("torch")
    m = normgen.build(_layer("feat64"))
    with pytest.raises(NormgenError, match="init_process_group"):
        distributed.train_forward(m, np.ones((2, 6)))
    ln = normgen.build(normgen.LayerNorm(name="dp_ln", format="BC", shape=[6]))
    with pytest.raises(NormgenError, match="is for batch norm"):
        distributed.backward(ln, np.ones((2, 6)), np.ones((2, 6)))


# ---- several processes: torch.distributed (gloo over 127.0.0.1) --------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, backend: str, keys: list[str]) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for key in keys:
            layer = _layer(key)
            shards = CASES[key][1]
            m = normgen.build(layer, target="cuda" if backend == "nccl" else "c")
            x, x2, dy = (_split(layer, a, shards)[rank] for a in _data(layer, shards, 1))
            results[f"{key}/y1"] = distributed.train_forward(m, x)
            results[f"{key}/y2"] = distributed.train_forward(m, x2)
            results[f"{key}/rm"], results[f"{key}/rv"] = m.running_mean, m.running_var
            dx, ds, do = distributed.backward(m, x2, dy)
            results[f"{key}/dx"] = dx
            for g, v in (("dscale", ds), ("doffset", do)):
                if v is not None:
                    results[f"{key}/{g}"] = v
        np.savez(f"{out}/rank{rank}.npz", **results)
    finally:
        dist.destroy_process_group()


def _run(tmp_path, backend: str, keys: list[str]) -> list[dict]:
    mp = pytest.importorskip("torch.multiprocessing")
    for key in keys:  # compiled once here, loaded from the cache by every process
        normgen.build(_layer(key), target="cuda" if backend == "nccl" else "c")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path), backend, keys), nprocs=WORLD, join=True)
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(WORLD)]


def _to_torch_layout(layer: BatchNorm, a: np.ndarray) -> np.ndarray:
    """(B, C, rest...) as torch's batch_norm takes it."""
    letters = layer.fmt.letters
    order = [letters.index("B"), letters.index("C")] + [i for i, ch in enumerate(letters) if ch not in "BC"]
    return np.ascontiguousarray(a.transpose(order))


def _torch_expected(layer: BatchNorm, x, x2, dy):
    """PyTorch on the concatenated batch, float64: F.batch_norm (training) twice, autograd of the second."""
    import torch
    import torch.nn.functional as F

    t = lambda a: torch.tensor(_to_torch_layout(layer, a), dtype=torch.float64)  # noqa: E731
    p = layer.parameter_arrays()
    rm = torch.tensor(layer.trained_mean_values, dtype=torch.float64)
    rv = torch.tensor(layer.trained_variance_values, dtype=torch.float64)
    w = torch.tensor(p["scale"], dtype=torch.float64, requires_grad=True) if "scale" in p else None
    b = torch.tensor(p["offset"], dtype=torch.float64, requires_grad=True) if "offset" in p else None
    out = {}
    if layer.mean_decay != layer.variance_decay or layer.running_variance != "unbiased":
        return None  # PyTorch has one momentum and an unbiased running variance only
    out["y1"] = F.batch_norm(t(x), rm, rv, w, b, training=True, momentum=layer.mean_decay, eps=layer.epsilon)
    xt = t(x2).requires_grad_(True)
    y2 = F.batch_norm(xt, rm, rv, w, b, training=True, momentum=layer.mean_decay, eps=layer.epsilon)
    y2.backward(t(dy))
    out.update(y2=y2, rm=rm, rv=rv, dx=xt.grad, dscale=None if w is None else w.grad,
               doffset=None if b is None else b.grad)
    return {k: None if v is None else v.detach().numpy() for k, v in out.items()}


def test_gloo_processes_match_one_process_and_pytorch(tmp_path):
    """3 processes, shards of uneven size (one of 1 sample, one empty): y, running statistics,
    dx, dscale, doffset against normgen.reference and PyTorch on the whole batch; running
    statistics and gradients bit-identical on every process."""
    pytest.importorskip("torch.distributed")
    keys = sorted(CASES)
    ranks = _run(tmp_path, "gloo", keys)
    for key in keys:
        layer = _layer(key)
        shards = CASES[key][1]
        x, x2, dy = _data(layer, shards, 1)
        axis = layer.fmt.letters.index("B")
        got = {k: np.concatenate([r[f"{key}/{k}"] for r in ranks], axis=axis) for k in ("y1", "y2", "dx")}
        for k in ("rm", "rv", "dscale", "doffset"):
            if f"{key}/{k}" in ranks[0]:
                for r in ranks[1:]:
                    np.testing.assert_array_equal(r[f"{key}/{k}"], ranks[0][f"{key}/{k}"], err_msg=f"{key} {k}")
                got[k] = ranks[0][f"{key}/{k}"]
        want = _expected(layer, x, x2, dy)
        for k, v in want.items():
            if v is None:
                assert k not in got, (key, k)
            else:
                _close(f"{key} {k} vs reference", got[k], v, layer.dtype)
        oracle = _torch_expected(layer, x, x2, dy)
        if oracle is not None:
            for k, v in oracle.items():
                if v is not None:
                    g = _to_torch_layout(layer, got[k]) if k in ("y1", "y2", "dx") else got[k]
                    _close(f"{key} {k} vs PyTorch", g, v, layer.dtype)


@pytest.mark.gpu
def test_nccl_processes_on_gpus(tmp_path):
    """The same over NCCL with the CUDA target, where there are GPUs (one per process)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.device_count() < WORLD:
        pytest.skip(f"NCCL needs {WORLD} CUDA GPUs; this machine has {torch.cuda.device_count()}")
    pytest.importorskip("pycuda")
    ranks = _run(tmp_path, "nccl", ["nchw64", "nhwc32"])
    for key in ("nchw64", "nhwc32"):
        layer = _layer(key)
        x, x2, dy = _data(layer, CASES[key][1], 1)
        axis = layer.fmt.letters.index("B")
        want = _expected(layer, x, x2, dy)
        _close(f"{key} y2", np.concatenate([r[f"{key}/y2"] for r in ranks], axis=axis), want["y2"], layer.dtype)
        _close(f"{key} dx", np.concatenate([r[f"{key}/dx"] for r in ranks], axis=axis), want["dx"], layer.dtype)
        _close(f"{key} rv", ranks[1][f"{key}/rv"], want["rv"], layer.dtype)
