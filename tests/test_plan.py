"""Tier 1: the lowering, checked without compiling anything.

An interpreter walks a plan's loops exactly as the C core does and proves that every element
is visited once per pass, that accumulators group elements exactly as the reference does,
and that channel indices agree with the format.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from helpers import grid
from normgen import BatchNorm, GroupNorm, LayerNorm, NormgenError
from normgen.lowering import lower
from normgen.lowering.plan import MAX_ACCUMULATORS
from normgen.reference import full_shape, grouped_view
from normgen.targets.c.sweep import sweep_of

LAYERS = list(grid(dtypes=("float32",)))


def _eval(expr: str, env: dict) -> int:
    """A plan's C expression over size_t values (C's / on them is Python's //)."""
    return int(eval(expr.replace(" / ", " // "), {}, env))  # noqa: S307 - expressions come from the plan


def walk(plan, batch: int):
    """Yield (statistic-block id, accumulator, offset, channel) for every element, in the
    order of the core's normalize pass."""
    env = {"nb": batch}
    stat_ranges = [range(_eval(a.count, env)) for a in plan.stat_axes]
    for block, stat_idx in enumerate(itertools.product(*stat_ranges)):
        env.update({a.var: i for a, i in zip(plan.stat_axes, stat_idx, strict=True)})
        dom_ranges = [range(_eval(a.count, env)) for a in plan.domain_axes]
        for dom_idx in itertools.product(*dom_ranges):
            env.update({a.var: i for a, i in zip(plan.domain_axes, dom_idx, strict=True)})
            yield block, _eval(plan.acc_expr, env), _eval(plan.offset_expr, env), _eval(plan.channel_expr, env)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: l.name)
@pytest.mark.parametrize("batch", [1, 3])
def test_core_loops_partition_like_the_reference(layer, batch):
    if not layer.fmt.has_batch and batch != 1:
        pytest.skip("format has no B")
    plan = lower(layer)
    shape = full_shape(layer, batch)
    n = int(np.prod(shape))
    offsets = np.arange(n).reshape(shape)
    # Reference grouping: the statistic each element belongs to.
    view, axes, _ = grouped_view(layer, offsets)
    kept = [a for a in range(view.ndim) if a not in axes]
    stat_of = np.empty(n, dtype=np.int64)
    moved = np.moveaxis(view, kept, list(range(len(kept))))
    for sid, idx in enumerate(np.ndindex(*moved.shape[: len(kept)])):
        stat_of[moved[idx].reshape(-1)] = sid
    channel_of = np.indices(shape)[layer.fmt.letters.index("C")].reshape(-1)
    if layer.affine == "element":
        # the parameter index: row-major over the normalized dimensions (the plan's "channel")
        normalized = [i for i, ch in enumerate(layer.fmt.letters) if ch != "B" and ch in layer.normalized_letters()]
        idx = np.indices(shape)
        channel_of = np.ravel_multi_index(tuple(idx[i] for i in normalized), [shape[i] for i in normalized]).reshape(-1)

    seen = np.zeros(n, dtype=np.int64)
    groups: dict[tuple[int, int], set[int]] = {}
    for block, acc, off, ch in walk(plan, batch):
        assert 0 <= acc < plan.nacc
        seen[off] += 1
        assert ch == channel_of[off], f"offset {off}: channel {ch}, format says {channel_of[off]}"
        groups.setdefault((block, acc), set()).add(stat_of[off])
    assert (seen == 1).all(), "every element is visited exactly once"
    # one statistic per (block, accumulator), and every statistic has one (block, accumulator)
    assert all(len(s) == 1 for s in groups.values())
    assert len(groups) == len(set(stat_of.tolist()))
    # per-accumulator count the core divides by
    count = plan.per_acc_total.value(batch)
    assert count == n // len(groups)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: l.name)
def test_axes_describe_the_tensor(layer):
    plan = lower(layer)
    # extents multiply to the element count, strides are products of inner extents
    stride = 1
    for a in reversed(plan.axes):
        assert a.stride.static == stride or a.stride.batched
        stride *= a.extent.static
    assert plan.elements.static == int(np.prod(layer.dims))
    # the apply (batch-norm predict) loops cover the tensor with the channel as one axis
    assert sum(a.channel_mul == 1 for a in plan.apply_axes) == 1
    assert int(np.prod([a.extent.static for a in plan.apply_axes])) == plan.elements.static
    # stat loops hold only kept axes; a columns domain starts with a reduced (chunk) axis
    assert all(a.keep for a in plan.stat_axes)
    assert not plan.domain_axes[0].keep
    assert plan.nacc <= MAX_ACCUMULATORS


def test_strategy_follows_the_layout():
    nchw = lower(BatchNorm(name="a", format="BCSS", shape=[64, 56, 56]))
    nhwc = lower(BatchNorm(name="b", format="BSSC", shape=[56, 56, 64]))
    assert nchw.strategy == "rows" and [a.letters for a in nchw.stat_axes] == ["C"]
    assert nhwc.strategy == "columns" and nhwc.nacc == 64  # channel vectors, x swept in memory order
    gn = lower(GroupNorm(name="g", format="BSSC", shape=[64, 64, 320], num_groups=32))
    assert gn.strategy == "columns" and gn.nacc == 32
    ln = lower(LayerNorm(name="l", format="BTC", shape=[10, 4096]))
    assert ln.strategy == "rows" and ln.domain_axes[-1].stride.static == 1  # contiguous rows


def test_groupnorm_split_and_layernorm_auto():
    gn = lower(GroupNorm(name="g", format="BCSS", shape=[12, 4, 4], num_groups=4))
    assert [a.letters for a in gn.axes] == ["B", "G", "g", "SS"]
    assert lower(LayerNorm(name="l", format="BCSS", shape=[4, 5, 5])).reduced_letters == "SUC"
    assert lower(LayerNorm(name="l", format="BTC", shape=[5, 4])).reduced_letters == "C"
    assert lower(LayerNorm(name="l", format="BCS", shape=[4, 5])).reduced_letters == "C"


def test_c_target_rejects_half_types():
    with pytest.raises(NormgenError, match="float16"):
        lower(BatchNorm(name="h", format="BC", shape=[4], dtype="float16"), "c")


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: l.name)
def test_backward_channel_indices(layer):
    """The training backward's per-channel bookkeeping (normgen/targets/c/sweep.py): rows with one channel
    per run index the block's channels as stat_channel + local; rows with the channel along the
    run keep partial sums for channels partials_from .. + partials_len, which hold the run's."""
    plan = lower(layer)
    W = sweep_of(plan)
    if W.norm not in ("rows_const", "rows"):
        pytest.skip("columns: the forward's channel_expr per column")
    env = {"nb": 2}
    stat_ranges = [range(_eval(a.count, env)) for a in plan.stat_axes]
    for stat_idx in itertools.product(*stat_ranges):
        env.update({a.var: i for a, i in zip(plan.stat_axes, stat_idx, strict=True)})
        dom_ranges = [range(_eval(a.count, env)) for a in plan.domain_axes]
        for dom_idx in itertools.product(*dom_ranges):
            env.update({a.var: i for a, i in zip(plan.domain_axes, dom_idx, strict=True)})
            ch = _eval(plan.channel_expr, env)
            if W.norm == "rows_const":
                local = _eval(W.local_channel_expr, env)
                assert 0 <= local < W.local_channels
                assert _eval(W.stat_channel_expr + str(local), env) == ch
            else:
                start = 0 if W.partials_global else _eval(W.partials_from, env)
                assert start <= ch < start + W.partials_len <= plan.channels


@pytest.mark.parametrize("layer", LAYERS, ids=lambda l: l.name)
@pytest.mark.parametrize("batch", [1, 3])
def test_pipeline_visits_the_blocks_in_loop_order(layer, batch):
    """The pipelined rows core (normgen/targets/c/sweep.py) flattens the statistic loops into one index sb:
    its statements give the loops' variables in the same order as the nested loops, the block's
    first element is at block_first, and next_shift moves block sb's offsets onto block sb + 1's."""
    if not layer.fmt.has_batch and batch != 1:
        pytest.skip("format has no B")
    plan = lower(layer)
    W = sweep_of(plan)
    if W.blocked:  # every rows core, pipelined or not: K's elements start at the block's first
        assert W.block_first == plan.stat_offset_expr == sweep_of(lower(layer.replace(parallel="openmp"))).block_first
    if not W.pipelined:
        # RMSNorm's statistic (a sum of squares, mean_square in core.j2) has no pipelined form
        assert plan.strategy == "columns" or not plan.stat_axes or plan.parallel == "openmp" or not plan.centered
        return
    env = {"nb": batch}
    nested = list(itertools.product(*[range(_eval(a.count, env)) for a in plan.stat_axes]))
    assert _eval(W.stat_blocks, env) == len(nested)

    def variables(sb: int) -> dict:
        local = dict(env, sb=sb)
        for line in W.stat_index:  # "const size_t i0 = sb / 32;"
            name, expr = line.removeprefix("const size_t ").rstrip(";").split(" = ", 1)
            local[name] = _eval(expr, local)
        return local

    zero = dict(env)
    for line in W.stat_first:
        name, expr = line.removeprefix("const size_t ").rstrip(";").split(" = ", 1)
        zero[name] = _eval(expr, zero)
    firsts = []
    for sb, idx in enumerate(nested):
        local = variables(sb)
        assert tuple(local[a.var] for a in plan.stat_axes) == idx
        firsts.append(_eval(W.block_first, local))
        if sb + 1 < len(nested):
            assert firsts[-1] + _eval(W.next_shift, local) == _eval(W.block_first, variables(sb + 1))
    assert firsts[0] == _eval(W.block_first, zero) == 0
    assert firsts == sorted(firsts)  # blocks in memory order: the shift is never negative
    # the first chunk's shift reads the leading elements of the block's first run
    assert 1 <= W.shift_probe <= 8
