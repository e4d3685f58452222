"""Every function of every float32 layer of the test grid (and its channels-first and channels-last float64
layers), and every float32 layer with
statistics = "float", with fused forms and run-time sizes: free of the warnings firmware projects
add (-Wdouble-promotion -Wshadow -Wconversion -Wcast-align -Wundef -Wvla) on the host compiler,
as errors; and a float-statistics file has no double in it."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from helpers import grid
from normgen import LayerNorm, RMSNorm, emit
from normgen.targets.c.build import FIRMWARE_WARNINGS, STRICT_FLAGS

CC = shutil.which("gcc") or shutil.which("cc")


def layers():
    # every other float32 layer of the grid (each kind, format family and affine form is there)
    base = list(grid(("float32",)))[::2] + [la for la in grid(("float64",)) if la.name.endswith(("BCSS_64", "BSSC_64"))]
    base += [LayerNorm(name="w_fused", format="BTC", shape=[6, 16], residual=True, residual_out=True,
                       activation="gelu", modulation="adaln"),
             LayerNorm(name="w_relu", format="BSSC", shape=[4, 4, 8], residual=True, activation="relu"),
             RMSNorm(name="w_rt", format="BTC", shape=["tokens", 64], residual=True)]
    return base + [la.replace(name=f"{la.name}_fs", statistics="float") for la in base if la.dtype == "float32"]


LAYERS = layers()


@pytest.mark.skipif(CC is None, reason="no C compiler")
def test_every_function_is_free_of_firmware_warnings(tmp_path):
    sources = []
    for layer in LAYERS:
        for name, text in emit(layer).items():
            (tmp_path / name).write_text(text)
        source = tmp_path / f"{layer.name}.c"
        if layer.statistics == "float":
            assert not re.search(r"\bdouble\b", source.read_text()), layer.name
        sources.append(source)
    bad = []
    for i in range(0, len(sources), 40):  # a compiler call per 40 files
        proc = subprocess.run([CC, *STRICT_FLAGS, *FIRMWARE_WARNINGS, "-fsyntax-only", *map(str, sources[i:i + 40])],
                              capture_output=True, text=True)
        if proc.returncode:
            bad.append(proc.stderr[:3000])
    assert not bad, bad
    assert len(sources) > 100
