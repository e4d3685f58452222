"""Layers over every kind × format family, shared by the test modules."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from normgen import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, NormgenError, RMSNorm

#: format → shape of the non-B dims (format order); one per family the issue names.
FORMATS = {
    "BC": [12],
    "BCSS": [12, 5, 7],
    "BSSC": [5, 7, 12],
    "TBC": [9, 12],
    "BTC": [9, 12],
    "BCSSS": [12, 3, 4, 5],
    "BCU": [12, 10],
    "CSS": [12, 6, 5],  # no B: batch 1
    "BCT": [12, 70],  # long contiguous rows
}
#: MATLAB-format cases: (matlab_format, shape in MATLAB order).
MATLAB_FORMATS = {"SSCB": [7, 5, 12], "CBT": [12, 9], "CB": [12]}


def params(channels: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"scale": rng.normal(1.0, 0.3, channels), "offset": rng.normal(0.0, 0.5, channels)}


def bn_stats(channels: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    return {"trained_mean": rng.normal(0.0, 1.0, channels), "trained_variance": rng.uniform(0.3, 3.0, channels)}


def kinds(fmt_kw: dict, channels: int, dtype: str, tag: str):
    """One layer of every kind (and each group-norm / layer-norm variant) for a format."""
    base = dict(fmt_kw, dtype=dtype, **params(channels, len(tag)))
    yield BatchNorm(name=f"bn_{tag}", **base, **bn_stats(channels, len(tag)))
    yield BatchNorm(name=f"bnb_{tag}", **base, running_variance="biased", mean_decay=0.3, variance_decay=0.2)
    yield GroupNorm(name=f"gn_{tag}", **base, num_groups=3)
    yield GroupNorm(name=f"gna_{tag}", **base, num_groups="allchannels")
    yield GroupNorm(name=f"gnc_{tag}", **base, num_groups="channelwise")
    yield InstanceNorm(name=f"in_{tag}", **base)
    for od in ("channel-only", "spatial-channel", "batch-excluded"):
        yield LayerNorm(name=f"ln{od[0]}_{tag}", **base, operation_dimension=od)
    scale_only = dict(fmt_kw, dtype=dtype, scale=base["scale"])
    for od in ("channel-only", "spatial-channel", "batch-excluded"):
        yield RMSNorm(name=f"rms{od[0]}_{tag}", **scale_only, operation_dimension=od)
    if dtype == "float32":
        # the affine variants: per element (where the normalized dimensions are next to each
        # other), without offset, without affine
        yield from _element(fmt_kw, dtype, tag)
        yield BatchNorm(name=f"bnnb_{tag}", **scale_only, bias=False, **bn_stats(channels, len(tag)))
        yield InstanceNorm(name=f"inna_{tag}", **fmt_kw, dtype=dtype, affine="none")
        yield GroupNorm(name=f"gnna_{tag}", **fmt_kw, dtype=dtype, affine="none", num_groups=3)


def _element(fmt_kw: dict, dtype: str, tag: str):
    """LayerNorm and RMSNorm with per-element affine, spatial-channel and batch-excluded."""
    rng = np.random.default_rng(len(tag) + 7)
    for cls, od, bias in ((LayerNorm, "spatial-channel", True), (RMSNorm, "batch-excluded", False),
                          (LayerNorm, "batch-excluded", False)):
        try:
            probe = cls(name="probe", **fmt_kw, operation_dimension=od, affine="element")
        except NormgenError:
            continue  # the normalized dimensions are not next to each other in this format
        shape = probe.param_shape
        arrays = {"scale": rng.normal(1.0, 0.3, shape)} | ({"offset": rng.normal(0.0, 0.5, shape)} if bias else {})
        yield cls(name=f"{cls.kind[:3]}e{od[0]}_{tag}", **fmt_kw, dtype=dtype, operation_dimension=od,
                  affine="element", bias=bias, **arrays)


def grid(dtypes=("float32", "float64")):
    for dtype in dtypes:
        for fmt, shape in FORMATS.items():
            yield from kinds({"format": fmt, "shape": shape}, 12, dtype, f"{fmt}_{dtype[-2:]}")
        for fmt, shape in MATLAB_FORMATS.items():
            yield from kinds({"matlab_format": fmt, "shape": shape}, 12, dtype, f"m{fmt}_{dtype[-2:]}")


@st.composite
def random_formats(draw, groups: int = 3, size: int = 6):
    """A random valid format (one C, at most one B and T, some S/U), with a group count (at most
    ``groups``), its channel count (a multiple of it) and the sizes of its non-B dimensions (the
    others at most ``size``): (format, groups, channels, shape)."""
    letters = ["C"] + draw(st.lists(st.sampled_from("SU"), max_size=3))
    if draw(st.booleans()):
        letters.append("B")
    if draw(st.booleans()):
        letters.append("T")
    fmt = "".join(draw(st.permutations(letters)))
    g = draw(st.integers(1, groups))
    channels = g * draw(st.integers(1, 3))
    shape = [channels if ch == "C" else draw(st.integers(1, size)) for ch in fmt if ch != "B"]
    return fmt, g, channels, shape
