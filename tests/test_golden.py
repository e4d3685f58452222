"""Tier 2: rendered files compared with committed ones (tests/golden/).

Refresh after an intended change to the templates, and review the diff:
    NORMGEN_REGENERATE=1 python -m pytest tests/test_golden.py tests/test_examples.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from normgen import BatchNorm, GroupNorm, LayerNorm, RMSNorm
from normgen.targets.render import emit

GOLDEN = Path(__file__).resolve().parent / "golden"
REGENERATE = os.environ.get("NORMGEN_REGENERATE") == "1"
CUDA = (Path(__file__).resolve().parent.parent / "templates" / "cuda" / "layer.cu.j2").is_file()

LAYERS = {
    "bn_nchw": BatchNorm(name="bn_nchw", format="BCSS", shape=[3, 4, 4], scale=[1.0, 0.5, 2.0],
                         offset=[0.0, 0.1, -0.1], trained_mean=[0.5, 0.0, -1.0], trained_variance=[1.0, 4.0, 0.25]),
    "gn_nhwc": GroupNorm(name="gn_nhwc", format="BSSC", shape=[4, 4, 6], num_groups=3,
                         scale=np.linspace(0.5, 1.5, 6), offset=np.linspace(-0.5, 0.5, 6)),
    "ln_runtime": LayerNorm(name="ln_runtime", format="BTC", shape=[16, 8], param_storage="runtime", epsilon=1e-6),
    # RMSNorm over a run-time number of tokens; layer norm over (C, H, W) with per-element scale, no offset
    "rms_tokens": RMSNorm(name="rms_tokens", format="BTC", shape=["tokens", 8], scale=np.linspace(0.5, 1.5, 8)),
    "ln_element": LayerNorm(name="ln_element", format="BCSS", shape=[3, 4, 4], operation_dimension="spatial-channel",
                            affine="element", bias=False, scale=np.linspace(0.5, 1.5, 48).reshape(3, 4, 4)),
}
#: int8 layers (C target only): float arithmetic, and integer arithmetic over run-time tokens.
INT8 = {
    "gn_int8": GroupNorm(name="gn_int8", format="BSSC", shape=[4, 4, 6], num_groups=3, dtype="int8", input_scale=0.05,
                         input_zero_point=-3, output_scale=0.03, output_zero_point=5, scale=np.linspace(0.5, 1.5, 6),
                         offset=np.linspace(-0.5, 0.5, 6)),
    "rms_int8": RMSNorm(name="rms_int8", format="BTC", shape=["tokens", 8], dtype="int8", input_scale=0.1,
                        output_scale=0.02, arithmetic="integer", scale=np.linspace(0.5, 1.5, 8)),
}
CASES = [(name, "c") for name in [*LAYERS, *INT8]] + ([(name, "cuda") for name in LAYERS] if CUDA else [])
#: The mex target's own files (its NAME.h, NAME.c are the C target's, compared above).
CASES += [(name, "mex") for name in ("bn_nchw", "ln_runtime", "rms_tokens", "ln_element")]


@pytest.mark.parametrize("name,target", CASES)
def test_golden(name, target):
    files = emit({**LAYERS, **INT8}[name], target)
    if target == "mex":
        assert {f: t for f, t in files.items() if not f.startswith(f"{name}_mex.")} == emit(LAYERS[name], "c")
        files = {f: t for f, t in files.items() if f.startswith(f"{name}_mex.")}
    for fname, text in files.items():
        path = GOLDEN / target / fname
        if REGENERATE:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        assert path.is_file(), f"missing golden file {path}; run NORMGEN_REGENERATE=1 pytest {__file__}"
        assert text == path.read_text(), f"{fname} differs from {path}"
